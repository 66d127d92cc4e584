"""Normalisation layers for the U-Net, including a batch norm over the global batch.

Batch norm in training mode normalises channel c with the moments of the *global* batch
(every rank's samples together, METHOD.md sec. 6):

    mean_c = S1_c / N,   var_c = S2_c / N - mean_c^2,
    y = (x - mean_c) / sqrt(var_c + eps) * w_c + b_c

where S1_c = sum x, S2_c = sum x^2 and N (values per channel) are summed over ranks in a single
all-reduce that autograd differentiates through, so input gradients are those of the full-batch
computation. ``torch.nn.SyncBatchNorm`` refuses CPU tensors (DEEPSPEED_CPU.md), hence this one.
"""

from __future__ import annotations

import torch
from torch import nn

from pdeds.distributed import all_reduce_sum_autograd
from pdeds.errors import PdedsError

NORM_KINDS = ("batch", "sync_batch", "instance", "group", "none")
"""The values ``make_norm`` (and ``UNetConfig.norm``) accept."""


class SyncBatchNorm(nn.Module):
    """Batch norm over the global batch for inputs (B, C, ...) of any spatial rank.

    Training mode uses the global-batch moments above and updates the running statistics like
    ``torch.nn.BatchNorm``: r_mean <- (1 - m) r_mean + m mean, r_var <- (1 - m) r_var +
    m var N / (N - 1). Because mean and var are all-reduced, the running statistics are the same
    on every rank. Eval mode normalises with the running statistics. Statistics are computed in
    float32 whatever the input dtype; the output has the input's dtype. A rank may hold an empty
    batch (it still joins the all-reduce). The buffer names match ``torch.nn.BatchNorm*d``, so
    state dicts are interchangeable.

    Works without a process group (one rank), and on gloo and nccl.
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float = 0.1) -> None:
        """Args:
        num_features: channels C.
        eps: added to the variance before the square root.
        momentum: weight m of the newest batch in the running statistics.
        """
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` (B, C, ...) per channel; see the class docstring."""
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"SyncBatchNorm({self.num_features}) got input of shape {tuple(x.shape)}"
            )
        if self.training:
            mean, var, count = self._global_moments(x)
            self._update_running_stats(mean.detach(), var.detach(), count)
        else:
            mean, var = self.running_mean.float(), self.running_var.float()
        scale = self.weight.float() * torch.rsqrt(var + self.eps)
        shift = self.bias.float() - mean * scale
        shape = (1, self.num_features) + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.view(shape), x.float(), scale.view(shape)).to(x.dtype)

    def _global_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Global-batch mean and biased variance per channel (float32) and the global count N."""
        c = self.num_features
        dims = [0, *range(2, x.dim())]
        x32 = x.float()
        count = torch.full((1,), x32.numel() / c, dtype=torch.float32, device=x.device)
        stats = all_reduce_sum_autograd(torch.cat([x32.sum(dims), x32.square().sum(dims), count]))
        # N = 0 (every rank empty) would divide by zero; N >= 1 keeps the empty result finite.
        n = stats[2 * c].detach().clamp(min=1.0)
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean.square()).clamp(min=0.0)
        return mean, var, n

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        """Exponential moving average with the unbiased variance, as torch BatchNorm does."""
        m = self.momentum
        unbiased = var * n / (n - 1.0).clamp(min=1.0)
        self.running_mean.copy_((1.0 - m) * self.running_mean.float() + m * mean)
        self.running_var.copy_((1.0 - m) * self.running_var.float() + m * unbiased)
        self.num_batches_tracked.add_(1)


def largest_divisor_at_most(channels: int, groups: int) -> int:
    """The largest g <= ``groups`` that divides ``channels`` (GroupNorm needs C % g == 0)."""
    return max(g for g in range(1, min(groups, channels) + 1) if channels % g == 0)


def make_norm(kind: str, channels: int, dim: int, groups: int) -> nn.Module:
    """The normalisation layer ``kind`` for ``channels`` channels of a ``dim``-D field.

    Args:
        kind: "batch" (nn.BatchNorm{2,3}d, per-rank statistics), "sync_batch"
            (SyncBatchNorm, global-batch statistics), "instance" (affine InstanceNorm{2,3}d),
            "group" (GroupNorm with the largest divisor of ``channels`` <= ``groups`` groups) or
            "none" (identity).
        channels: channels C of the normalised tensor.
        dim: spatial dimension, 2 or 3.
        groups: requested number of groups for "group".
    """
    if dim not in (2, 3):
        raise PdedsError(f"dimension {dim} is not supported; use 2 or 3")
    if kind == "batch":
        return nn.BatchNorm2d(channels) if dim == 2 else nn.BatchNorm3d(channels)
    if kind == "sync_batch":
        return SyncBatchNorm(channels)
    if kind == "instance":
        cls = nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d
        return cls(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(largest_divisor_at_most(channels, groups), channels)
    if kind == "none":
        return nn.Identity()
    raise PdedsError(f"norm {kind!r} is not one of {', '.join(NORM_KINDS)}; pick one of them")
