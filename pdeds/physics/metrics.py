"""Quality figures of a predicted field against the reference solution (METHOD.md sec. 3).

    rel_l2     = ||U - U*|| / ||U*||                       (nodal Euclidean norms)
    energy_gap = (J_h(U) - J_h(U*)) / |J_h(U*)|           (>= 0, since U* minimises J_h)

Both are per sample, shape (B,), computed in float64.
"""

from __future__ import annotations

import torch

from pdeds.physics import fem


def rel_l2(u: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Relative L2 error per sample."""
    u64, r64 = u.detach().to(torch.float64), ref.detach().to(torch.float64)
    return (u64 - r64).flatten(1).norm(dim=1) / r64.flatten(1).norm(dim=1)


def energy_gap(
    u: torch.Tensor, ref: torch.Tensor, nu: torch.Tensor, f: fem.Load = 0.0
) -> torch.Tensor:
    """Relative energy gap per sample."""
    nu64 = nu.detach().to(torch.float64)
    f64 = f.detach().to(torch.float64) if isinstance(f, torch.Tensor) else f
    j = fem.energy(u.detach().to(torch.float64), nu64, f64)
    j_ref = fem.energy(ref.detach().to(torch.float64), nu64, f64)
    return (j - j_ref) / j_ref.abs()
