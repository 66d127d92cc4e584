"""How the planner measures: the peak bytes a callable allocates (``measure_peak``), and jobs run
in a fresh ``python -m pdeds.plan TASK`` process (``run_subprocess``), so that each measurement
starts from an empty allocator and no process-group state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from pdeds.errors import PdedsError


def measure_peak(fn: Callable[[], Any], device: Any) -> float:
    """Peak bytes allocated by ``fn()`` above what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU: the running sum of the
    allocator's records in torch's profiler (``profile_memory``), i.e. the same tensor-allocator
    view; memory freed that was allocated before ``fn`` is not subtracted.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return float(peak)


def run_subprocess(task: str, job: dict[str, Any], timeout: float) -> Any:
    """Run ``python -m pdeds.plan TASK`` with ``job`` on stdin; its last stdout line is JSON."""
    env = dict(os.environ)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pdeds.plan", task],
            input=json.dumps(job),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        raise PdedsError(
            f"plan {task}: the measuring subprocess ran past {timeout:.0f} s; "
            "pass smaller --calibrate-res (or --check) resolutions"
        ) from None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise PdedsError(f"plan {task}: the measuring subprocess failed ({tail}); run it again")
    return json.loads(lines[-1])
