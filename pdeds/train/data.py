"""Training samples: which coefficient vectors a step uses, in what order, and their nu fields.

Fixed set (``data.train_samples: K > 0``). Every sample of an epoch is used exactly once across
ranks whatever the world size: the sample stream is the concatenation of per-epoch permutations
of range(K) (permutation e seeded by (seed, e)); global step s takes the next ``batch`` entries of
the stream (crossing epoch boundaries when K is not a multiple of the batch), so every global
batch is full and the stream does not depend on the number of ranks or the micro-batch split.

Fresh stream (``data.train_samples: 0``, METHOD.md sec. 3). Stream entry i is a new vector a_i,
a deterministic function of (seed, i): block b = i // BLOCK of vectors is drawn from
U([-3, 3]^m) by a generator seeded with (seed, b) (with ``sobol``: points b BLOCK .. (b+1) BLOCK
of one scrambled Sobol sequence seeded with seed). The loss therefore does not depend on the rank
count, and a resumed run draws what the uninterrupted one would have.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pdeds.config import ExperimentConfig
from pdeds.errors import PdedsError
from pdeds.machine import available_bytes, size_text
from pdeds.physics import kl

CACHE_BYTES = 1 << 30
"""nu fields of the whole training set at one resolution are cached below this size."""
BLOCK = 1024
"""Coefficient vectors of a fresh stream drawn by one generator."""


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
    cache_bytes: int = CACHE_BYTES
    """nu of the whole set at one resolution is kept when it needs at most this many bytes."""
    _cache: dict[int, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.coeffs.shape[0]

    def nu(self, idx: np.ndarray, res: int) -> torch.Tensor:
        """nu (len(idx), 1, res..) float32 on the device."""
        if res not in self._cache and len(self) * res**self.dim * 4 <= self.cache_bytes:
            self._cache.clear()
            self._cache[res] = self._evaluate(np.arange(len(self)), res)
        if res in self._cache:
            return self._cache[res][torch.as_tensor(idx, device=self.device)]
        return self._evaluate(idx, res)

    def _evaluate(self, idx: np.ndarray, res: int) -> torch.Tensor:
        c = torch.as_tensor(self.coeffs[idx], dtype=torch.float64, device=self.device)
        return kl.diffusivity(c, res, dim=self.dim, eta=self.eta, family=self.family).float()


@dataclass
class FreshSamples:
    """The fresh stream: entry i is sample i, vector a_i of (seed, i); nu per call, no cache."""

    modes: int
    seed: int
    sobol: bool
    dim: int
    eta: float
    family: str
    device: torch.device
    _blocks: dict[int, np.ndarray] = field(default_factory=dict)

    def indices(self, start: int, count: int) -> np.ndarray:
        """Stream entries [start, start + count): the sample ids themselves."""
        return np.arange(start, start + count, dtype=np.int64)

    def coeffs(self, idx: np.ndarray) -> np.ndarray:
        """(len(idx), m) coefficient vectors a_i, the same however the indices are chunked."""
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((len(idx), self.modes))
        for b in np.unique(idx // BLOCK):
            rows = idx // BLOCK == b
            out[rows] = self._block(int(b))[idx[rows] % BLOCK]
        return out

    def _block(self, b: int) -> np.ndarray:
        """Vectors b BLOCK .. (b + 1) BLOCK - 1 (the last few blocks are kept)."""
        if b not in self._blocks:
            if len(self._blocks) > 4:
                self._blocks.pop(min(self._blocks))
            if self.sobol:
                engine = torch.quasirandom.SobolEngine(self.modes, scramble=True, seed=self.seed)
                engine.fast_forward(b * BLOCK)
                unit = engine.draw(BLOCK, dtype=torch.float64).numpy()
            else:
                unit = np.random.default_rng([self.seed, b]).random((BLOCK, self.modes))
            self._blocks[b] = (2.0 * unit - 1.0) * kl.COEFF_RANGE
        return self._blocks[b]

    def nu(self, idx: np.ndarray, res: int) -> torch.Tensor:
        """nu (len(idx), 1, res..) float32 on the device, evaluated from a_i."""
        c = torch.as_tensor(self.coeffs(idx), dtype=torch.float64, device=self.device)
        return kl.diffusivity(c, res, dim=self.dim, eta=self.eta, family=self.family).float()


def training_memory_problem(cfg: ExperimentConfig) -> str | None:
    """Why this host cannot hold the fixed training set, or None. Per sample it keeps its
    coefficient vector (m float64) and one entry of each of two epoch permutations (int64):
    K (8 m + 16) bytes; nu fields are cached only below ``CACHE_BYTES``."""
    k = cfg.data.train_samples
    if k == 0 or cfg.data.path is not None:
        return None
    need, free = k * (8 * cfg.problem.modes + 16), available_bytes(False)
    if need <= free:
        return None
    return (
        f"data.train_samples {k:,}: the fixed training set needs {size_text(need)} of host "
        f"memory, {size_text(free)} is available; lower data.train_samples, or set it to 0 for "
        "an unlimited stream of fresh samples"
    )


def batch_problem(cfg: ExperimentConfig, samples: int, batches: list[int]) -> str | None:
    """Why a global batch of a fixed training set of ``samples`` would repeat samples, or None."""
    big = max(batches, default=0)
    if samples == 0 or big <= samples:
        return None
    where = f"data.path {cfg.data.path}" if cfg.data.path else "data.train_samples"
    return (
        f"a global batch of {big} is larger than the {samples} training samples ({where}): "
        f"every step would repeat samples; use at least {big} training samples or a smaller "
        "ds.train_batch_size (or schedule.level[].batch)"
    )


def training_coeffs(cfg: ExperimentConfig) -> np.ndarray | None:
    """The fixed training set: drawn with data.seed, or read from data.path; None for a fresh
    stream (data.train_samples: 0)."""
    d, p = cfg.data, cfg.problem
    if d.train_samples == 0:
        return None
    if d.path is None:
        return kl.sample_coefficients(d.train_samples, p.modes, d.seed, sobol=d.sobol)
    from pdeds.data.hdf5 import read_coefficients

    coeffs, _ = read_coefficients(d.path)
    if coeffs.shape[1] != p.modes:
        raise PdedsError(
            f"data.path {d.path} holds {coeffs.shape[1]} modes but problem.modes is "
            f"{p.modes}; make them agree"
        )
    return coeffs[: d.train_samples]


def training_samples(cfg: ExperimentConfig, coeffs: np.ndarray | None, device: torch.device):
    """(stream, data) of a run: ``stream.indices(start, count)`` are the sample ids of stream
    entries [start, start + count), ``data.nu(ids, res)`` their fields. One object serves both
    for a fresh stream (``coeffs`` None)."""
    p = cfg.problem
    if coeffs is None:
        d = cfg.data
        fresh = FreshSamples(p.modes, d.seed, d.sobol, p.dim, p.eta, p.family, device)
        return fresh, fresh
    data = TrainingSet(coeffs, p.dim, p.eta, p.family, device)
    return SampleStream(len(coeffs), cfg.data.seed), data
