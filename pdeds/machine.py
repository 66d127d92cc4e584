"""Facts about the machine a process runs on: free memory, a free port, the CPU's kernels.

Every layer may ask these (the physics' reference solver checks memory before it allocates,
the study and the planner size runs, the engine set-up picks a rendezvous port), so they live
here, below everything else, and import nothing of pdeds.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

GiB = float(2**30)


def available_memory_gib(meminfo: str = "/proc/meminfo") -> float:
    """MemAvailable of ``meminfo`` (Linux), else the physical memory (sysconf), in GiB."""
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GiB
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GiB


def available_bytes(gpu: bool) -> float:
    """Free memory now: of the current CUDA device when ``gpu``, else of the host (MemAvailable)."""
    if gpu:
        import torch

        return float(torch.cuda.mem_get_info()[0])
    return available_memory_gib() * GiB


def size_text(x: float) -> str:
    """Bytes in KiB / MiB / GiB / TiB with 3 significant digits."""
    for unit, size in (("TiB", 2.0**40), ("GiB", 2.0**30), ("MiB", 2.0**20), ("KiB", 2.0**10)):
        if x >= size:
            return f"{x / size:.3g} {unit}"
    return f"{x:.0f} B"


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_capability() -> str:
    """The CPU kernels torch runs (e.g. "AVX512", "AVX2"; ATEN_CPU_CAPABILITY lowers it)."""
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def native_bf16() -> bool:
    """True when oneDNN has native bf16 kernels on this CPU (else bf16 work keeps fp32 copies)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
