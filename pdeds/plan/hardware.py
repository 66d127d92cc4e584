"""Where the run goes: ``nodes`` x ``gpus_per_node`` ranks, the memory of one device and of a
node's host, and the fraction of device memory the plan keeps free.

A rank may use ``usable_bytes = gpu_mem_gib x 2^30 x (1 - reserve)`` bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pdeds.errors import PdedsError
from pdeds.machine import GiB


@dataclass(frozen=True)
class Hardware:
    """Where the run goes: ``nodes`` x ``gpus_per_node`` ranks."""

    gpus_per_node: int = 1
    nodes: int = 1
    gpu_mem_gib: float = 80.0
    """Memory of one device (GiB); for CPU ranks, the memory one rank may use."""
    host_mem_gib: float | None = None
    """Host memory per node (GiB); None = not checked."""
    reserve: float = 0.1
    """Fraction of device memory kept free for the CUDA context, cuDNN workspaces outside the
    caching allocator, and fragmentation (none of which torch's peak statistics count)."""

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def usable_bytes(self) -> float:
        return self.gpu_mem_gib * GiB * (1.0 - self.reserve)

    def validate(self) -> None:
        """Raise PdedsError naming the bad flag and the fix."""
        for flag, v in (("--gpus", self.gpus_per_node), ("--nodes", self.nodes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise PdedsError(f"{flag}: must be an integer >= 1, got {v!r}; e.g. {flag} 8")
        if not (self.gpu_mem_gib > 0 and math.isfinite(self.gpu_mem_gib)):
            raise PdedsError(f"--gpu-mem: must be a positive number of GiB, got {self.gpu_mem_gib}")
        if self.host_mem_gib is not None and not (
            self.host_mem_gib > 0 and math.isfinite(self.host_mem_gib)
        ):
            raise PdedsError(
                f"--host-mem: must be a positive number of GiB, got {self.host_mem_gib}"
            )
        if not 0.0 <= self.reserve < 1.0:
            raise PdedsError(f"--reserve: must lie in [0, 1), got {self.reserve}; e.g. 0.1")
