"""A full-multigrid network: the same weights mean the same operator nu -> u at every resolution.

Like full multigrid, it solves on a coarse grid, then interpolates and corrects grid by grid:

    m_0 = core_res,   m_k = min(2 m_{k-1}, n),   h_k = 1 / (m_k - 1)      (until m_K = n)
    a_k = R_k [log nu, x]                                   input resampled to m_k nodes per axis
    z_0 = core(a_0)                                         a U-Net body on the m_0 grid
    z_k = P_k z_{k-1} + (h_k / h_1)^p  S(P_k z_{k-1}, a_k)  one stage S, shared by every k
    U   = g + m * head(z_K)                                 (pdeds.physics.fem.apply_dirichlet)

R_k and P_k are multilinear interpolation between nodal grids (nodes at i / (m - 1)), S is
[P z, lift(a)] -> (3^d conv, norm, act) x blocks -> 1x1, with replicate padding (the discrete
analogue of the natural boundary condition on the lateral faces), and p = refine_power.

Why it transfers (measured in the module's tests and analysis/bench_multigrid.py):
- the core always sees the input resampled to the same physical grid, so it computes the same
  coarse latent from the same nu at any n;
- the Q1 solutions of spacings h and 2h differ by O(h^2) (2-D: 1.3e-2 between 32 and 64 nodes,
  2.9e-3 between 64 and 128), so a stage applied one level finer than it was trained must add a
  correction about 4x smaller: the (h_k / h_1)^2 factor makes the shared stage do that, and the
  latent converges as n grows. Without it (p = 0) the stage adds an index-space correction of
  the same size at every level and zero-shot errors grow 3.4x per doubling.

Its parameters do not depend on n; any n >= core_res runs. S and the head start at zero, so an
untrained network returns exactly the lifting g = 1 - x1.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from pdeds.errors import PdedsError
from pdeds.models.config import ModelConfig
from pdeds.models.unet import UNetBody, _block, _conv, check_input, input_features, run_stage
from pdeds.physics.fem import apply_dirichlet


def resample(x: torch.Tensor, nodes: int) -> torch.Tensor:
    """Multilinear interpolation of nodal fields (B, C, n..) to ``nodes`` nodes per axis."""
    size = (nodes,) * (x.dim() - 2)
    if tuple(x.shape[2:]) == size:
        return x
    mode = "bilinear" if x.dim() == 4 else "trilinear"
    return F.interpolate(x, size=size, mode=mode, align_corners=True)


def stage_nodes(core_res: int, n: int) -> list[int]:
    """m_0 = core_res, m_k = min(2 m_{k-1}, n) up to n: the grids of the core and the stages."""
    nodes = [core_res]
    while nodes[-1] < n:
        nodes.append(min(2 * nodes[-1], n))
    return nodes


class RefineStage(nn.Module):
    """z -> P z + s * S(P z, a): one correction on the next grid (see the module docstring)."""

    def __init__(self, dim: int, cfg: ModelConfig) -> None:
        super().__init__()
        w = cfg.width
        self.lift = _conv(dim, 1 + dim, w, 1)
        self.block = _block(dim, 2 * w, w, cfg, padding_mode="replicate")
        self.out = _conv(dim, w, w, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z: torch.Tensor, a: torch.Tensor, scale: float) -> torch.Tensor:
        """z on the coarser grid, a = input features on this grid, scale = (h_k / h_1)^p."""
        z = resample(z, a.shape[-1])
        return z + scale * self.out(self.block(torch.cat([z, self.lift(a)], dim=1)))


class FMGNet(nn.Module):
    """nu (B, 1, n..) -> U (B, 1, n..) with exact Dirichlet values, for any n >= core_res.

    The output is float32 whatever the weights' dtype (float32 or bfloat16).
    """

    def __init__(self, dim: int, cfg: ModelConfig) -> None:
        """Args:
        dim: spatial dimension, 2 or 3.
        cfg: architecture (``arch: fmg``); validated here.
        """
        super().__init__()
        cfg.validate()
        self.dim = dim
        self.cfg = cfg
        self.core = UNetBody(dim, 1 + dim, dataclasses.replace(cfg, depth=cfg.core_depth))
        self.stage = RefineStage(dim, cfg)
        self.head = _conv(dim, cfg.width, 1, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def check_resolution(self, n: int) -> None:
        """Raise PdedsError unless n >= core_res nodes per axis."""
        why = fmg_resolution_problem(self.cfg.core_res, n)
        if why is not None:
            raise PdedsError(why)

    def forward(self, nu: torch.Tensor) -> torch.Tensor:
        """U = g + m * head(z_K); see the module docstring."""
        check_input(nu, self.dim, "FMGNet")
        n = nu.shape[-1]
        if any(s != n for s in nu.shape[2:]):
            raise PdedsError(f"FMGNet needs the same nodes on every axis, got {tuple(nu.shape)}")
        self.check_resolution(n)
        dtype = self.head.weight.dtype
        feats = input_features(nu).to(dtype)
        nodes = stage_nodes(self.cfg.core_res, n)
        z = self.core(resample(feats, nodes[0]))  # its stages checkpoint themselves
        h1 = 1.0 / (nodes[1] - 1) if len(nodes) > 1 else 1.0
        for m in nodes[1:]:
            scale = (1.0 / (m - 1) / h1) ** self.cfg.refine_power
            z = run_stage(self.stage, self.cfg.checkpoint, z, resample(feats, m), scale)
        # The lifting is added in float32: in bf16, 1 - x1 itself would be rounded to 8 bits.
        return apply_dirichlet(self.head(z).float())


def fmg_resolution_problem(core_res: int, n: int) -> str | None:
    """Why the full-multigrid network cannot run at n nodes per axis (None if it can)."""
    if n >= core_res:
        return None
    return (
        f"resolution n={n} is coarser than the network's core grid of {core_res} nodes; "
        f"use n >= {core_res} or lower model.core_res"
    )
