"""The training loss of one micro-batch (METHOD.md sec. 3).

    loss = mean_b J_h(U_b)                      (train.loss_weighting: none)
    loss = mean_b J_h(U_b) / |J_h(g_b)|         (train.loss_weighting: lifting)

with g the lifting u = 1 - x1 (for f = 0, J_h(g_b) = 1/2 int nu_b). The weight is a constant
per sample, so each sample's minimiser is unchanged. DeepSpeed averages the micro-batch losses
over accumulation steps and ranks: the step's loss is the mean over the global batch.
"""

from __future__ import annotations

import torch

from pdeds.physics import fem


def micro_batch_loss(u: torch.Tensor, nu: torch.Tensor, f: float, weighting: str) -> torch.Tensor:
    """Scalar loss of predictions ``u`` for diffusivities ``nu``, computed in float32."""
    j = fem.energy(u.float(), nu, f)
    if weighting == "lifting":
        with torch.no_grad():
            lift = fem.apply_dirichlet(torch.zeros_like(nu))
            scale = fem.energy(lift, nu, f).abs()
        j = j / scale
    return j.mean()
