"""What K-FAC sends over the wire: factor sums, eigenbases, the preconditioned gradient.

Every collective of K-FAC is one of the functions here, each one flat all-reduce:

- ``reduce_sums``: this step's factor sums and sample / row counts of all layers;
- ``share_eigenbases``: each rank eigendecomposes its share of the factors (``assign``), writes
  its results into a zero buffer, and the sum of the buffers is every result (adding zeros is
  exact), so every rank holds bitwise-identical eigenbases;
- ``reduce_mean``: the ranks' local preconditioned gradients, for the KL-clip under ZeRO 1/2
  (where no rank holds a whole reduced layer).
"""

from __future__ import annotations

import torch

from pdeds import distributed


def assign_inversions(sizes: list[int], world: int) -> list[int]:
    """Owner rank of each eigendecomposition: largest cost n^3 first, to the least-loaded rank.

    Deterministic (ties broken by index, then by rank), so every rank computes the same plan.
    """
    load = [0.0] * world
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += float(sizes[i]) ** 3
    return owner


def _all_reduce_flat(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum of each tensor over ranks, in ONE all-reduce of their concatenation."""
    flat = distributed.all_reduce_sum(torch.cat([t.reshape(-1) for t in tensors]))
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()
    return out


def reduce_sums(sums: list[torch.Tensor], counts: list[float]) -> tuple[list, list[float]]:
    """(summed tensors, summed counts) over ranks, in one all-reduce."""
    ref = sums[0]
    both = _all_reduce_flat(sums + [torch.tensor(counts, dtype=ref.dtype, device=ref.device)])
    return both[:-1], both[-1].tolist()


def share_eigenbases(factors: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(eigenvalues clamped at 0, eigenvectors) of every symmetric factor, each computed (in
    float64) on the rank ``assign_inversions`` gives it and shared in one all-reduce."""
    sizes = [f.shape[0] for f in factors]
    owner = assign_inversions(sizes, distributed.world_size())
    me = distributed.rank()
    parts = []
    for f, n, r in zip(factors, sizes, owner, strict=True):
        if r == me:
            evals, evecs = torch.linalg.eigh(f.double())
            parts += [evals.clamp_min(0.0).to(f.dtype), evecs.to(f.dtype)]
        else:
            parts += [f.new_zeros(n), f.new_zeros(n, n)]
    shared = _all_reduce_flat(parts)
    return [(shared[2 * i].clone(), shared[2 * i + 1].clone()) for i in range(len(factors))]


def reduce_mean(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Mean of each tensor over ranks (DeepSpeed's gradient averaging), in one all-reduce."""
    world = distributed.world_size()
    return [t / world for t in _all_reduce_flat(tensors)] if world > 1 else tensors
