"""Training samples: the coefficient set, the order it is visited in, its nu fields.

Every sample of an epoch is used exactly once across ranks whatever the world size: the
sample stream is the concatenation of per-epoch permutations of range(K) (permutation e
seeded by (seed, e)); global step s takes the next ``batch`` entries of the stream (crossing
epoch boundaries when K is not a multiple of the batch), so every global batch is full and the
stream does not depend on the number of ranks or the micro-batch split.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pdeds.physics import kl

CACHE_BYTES = 1 << 30
"""nu fields of the whole training set at one resolution are cached below this size."""


class SampleStream:
    """Indices of the sample stream perm_0 ++ perm_1 ++ ... over K samples."""

    def __init__(self, samples: int, seed: int) -> None:
        self.samples = samples
        self.seed = seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[epoch] = rng.permutation(self.samples)
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> np.ndarray:
        """Stream entries [start, start + count)."""
        out = np.empty(count, dtype=np.int64)
        pos = 0
        while pos < count:
            epoch, offset = divmod(start + pos, self.samples)
            take = min(count - pos, self.samples - offset)
            out[pos : pos + take] = self._perm(epoch)[offset : offset + take]
            pos += take
        return out


def split_global_batch(
    idx: np.ndarray, micro_batch: int, world: int, rank: int
) -> list[np.ndarray]:
    """This rank's micro-batches of a global batch: micro-batch j of rank r is the slice
    [(j W + r) m, (j W + r + 1) m) of the batch (W ranks, m = micro-batch)."""
    per = micro_batch * world
    if len(idx) % per:
        raise ValueError(
            f"global batch {len(idx)} is not a multiple of micro {micro_batch} x {world}"
        )
    return [
        idx[(j * world + rank) * micro_batch : (j * world + rank + 1) * micro_batch]
        for j in range(len(idx) // per)
    ]


@dataclass
class TrainingSet:
    """Coefficient vectors and their nu fields at any resolution (closed-form, METHOD.md sec. 2)."""

    coeffs: np.ndarray
    dim: int
    eta: float
    family: str
    device: torch.device
    _cache: dict[int, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.coeffs.shape[0]

    def nu(self, idx: np.ndarray, res: int) -> torch.Tensor:
        """nu (len(idx), 1, res..) float32 on the device."""
        if res not in self._cache and len(self) * res**self.dim * 4 <= CACHE_BYTES:
            self._cache.clear()
            self._cache[res] = self._evaluate(np.arange(len(self)), res)
        if res in self._cache:
            return self._cache[res][torch.as_tensor(idx, device=self.device)]
        return self._evaluate(idx, res)

    def _evaluate(self, idx: np.ndarray, res: int) -> torch.Tensor:
        c = torch.as_tensor(self.coeffs[idx], dtype=torch.float64, device=self.device)
        return kl.diffusivity(c, res, dim=self.dim, eta=self.eta, family=self.family).float()
