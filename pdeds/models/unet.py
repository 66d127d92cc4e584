"""A fully convolutional U-Net from diffusivity nu to a field U with exact Dirichlet values.

    features = [log nu, x_1, .., x_d]             (B, 1 + d, n..), x_a = i_a / (n_a - 1) in [0, 1]
    w        = head(decoder(encoder(features)))   (B, 1, n..)
    U        = g + m * w                          (pdeds.physics.fem.apply_dirichlet)

Level s (0 = finest) works on n / 2^s nodes per axis with c_s = round(width * growth^s)
channels. Encoder stage 0 is ``blocks`` x (3^d conv, norm, act) on the features; stage s >= 1
downsamples with a stride-2 2^d conv and applies the same block; stage ``depth`` is the
bottleneck. Decoder stage s upsamples level s + 1 with a stride-2 2^d transposed conv,
concatenates the encoder's level-s output and applies a block. The 1x1 head starts at zero, so
an untrained network returns exactly the lifting g = 1 - x1.

Being fully convolutional, the same weights run at every resolution n with n % 2^depth == 0 and
n / 2^depth >= 2, but they do not mean the same operator there: the 3^d kernels act in index
space (a patch of 3 h) and the coarsest level has n / 2^depth nodes, so both shrink physically
as n grows. A U-Net trained at n = 32 is barely better than the lifting at 64 and 128 (2-D:
rel-L2 4.9e-2 at 32, 0.17 at 64, 0.30 at 128). ``pdeds.models.fmg`` is the network that
transfers; the U-Net stays for comparison and as the core of that network.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pdeds.errors import PdedsError
from pdeds.models.config import ACTIVATIONS, ModelConfig
from pdeds.models.norms import make_norm
from pdeds.physics.fem import apply_dirichlet


@dataclass
class UNetConfig(ModelConfig):
    """A ``model`` section that asks for the U-Net (``arch: unet``)."""

    arch: str = "unet"


def allowed_resolutions(depth: int, up_to: int) -> list[int]:
    """Node counts n <= ``up_to`` that pass ``depth`` halvings.

    Each stride-2 downsampling halves n exactly, and the coarsest level keeps >= 2 nodes:
    n % 2^depth == 0 and n >= 2^(depth + 1).
    """
    step = 2**depth
    return list(range(2 * step, up_to + 1, step))


class _TinyGridInFloat32:
    """A 16-bit convolution of a grid thinner than its kernel runs in float32.

    oneDNN's bf16 backward of a 3^3 convolution on a grid with an axis of 2 nodes returns
    non-finite gradients in about a third of the calls (torch 2.13 on AVX-512-BF16 CPUs); the
    full-multigrid core's coarsest level is such a grid. Float32 there costs nothing.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.bfloat16, torch.float16) and min(x.shape[2:]) < max(self.kernel_size):
            bias = None if self.bias is None else self.bias.float()
            return self._conv_forward(x.float(), self.weight.float(), bias).to(x.dtype)
        return super().forward(x)


class Conv2d(_TinyGridInFloat32, nn.Conv2d):
    """nn.Conv2d, float32 on grids thinner than the kernel (see _TinyGridInFloat32)."""


class Conv3d(_TinyGridInFloat32, nn.Conv3d):
    """nn.Conv3d, float32 on grids thinner than the kernel (see _TinyGridInFloat32)."""


def _conv(
    dim: int, cin: int, cout: int, kernel: int, stride: int = 1, padding_mode: str = "zeros"
) -> nn.Module:
    cls = Conv2d if dim == 2 else Conv3d
    return cls(
        cin, cout, kernel, stride=stride, padding=(kernel - 1) // 2, padding_mode=padding_mode
    )


def _up(dim: int, cin: int, cout: int) -> nn.Module:
    cls = nn.ConvTranspose2d if dim == 2 else nn.ConvTranspose3d
    return cls(cin, cout, 2, stride=2)


def _block(
    dim: int, cin: int, cout: int, cfg: ModelConfig, padding_mode: str = "zeros"
) -> nn.Sequential:
    """``cfg.blocks`` x (3^d conv, norm, activation); zero padding unless ``padding_mode``."""
    layers: list[nn.Module] = []
    for i in range(cfg.blocks):
        layers += [
            _conv(dim, cin if i == 0 else cout, cout, 3, padding_mode=padding_mode),
            make_norm(cfg.norm, cout, dim, cfg.groups),
            ACTIVATIONS[cfg.activation](),
        ]
    return nn.Sequential(*layers)


class _UpStage(nn.Module):
    """Decoder stage: upsample level s + 1, concatenate the level-s skip, apply a block."""

    def __init__(self, dim: int, coarse: int, fine: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.up = _up(dim, coarse, fine)
        self.block = _block(dim, 2 * fine, fine, cfg)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.up(x), skip], dim=1))


class UNetBody(nn.Module):
    """The U-Net's encoder and decoder: (B, cin, n..) features -> (B, c_0, n..) latent.

    The full U-Net adds the input features and the head; the full-multigrid network
    (``pdeds.models.fmg``) uses a body as its core on the coarse grid.
    """

    def __init__(self, dim: int, cin: int, cfg: ModelConfig) -> None:
        super().__init__()
        if dim not in (2, 3):
            raise PdedsError(f"dimension {dim} is not supported; use 2 or 3")
        self.dim = dim
        self.cfg = cfg
        c = cfg.channels()
        self.encoder = nn.ModuleList([_block(dim, cin, c[0], cfg)])
        for s in range(1, cfg.depth + 1):
            down = _conv(dim, c[s - 1], c[s], 2, stride=2)
            self.encoder.append(nn.Sequential(down, _block(dim, c[s], c[s], cfg)))
        self.decoder = nn.ModuleList(_UpStage(dim, c[s + 1], c[s], cfg) for s in range(cfg.depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The latent of ``x`` (a module call, so ZeRO-3's parameter hooks see the body)."""
        return self.latent(x)

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder down to level ``depth``, decoder back up with the skips."""
        skips = []
        for stage in self.encoder:
            x = run_stage(stage, self.cfg.checkpoint, x)
            skips.append(x)
        skips.pop()
        for s in reversed(range(self.cfg.depth)):
            x = run_stage(self.decoder[s], self.cfg.checkpoint, x, skips.pop())
        return x


class UNet(UNetBody):
    """nu (B, 1, n..) -> U (B, 1, n..) with U = 1 on x1 = 0 and U = 0 on x1 = 1 for any weights.

    The output is float32 whatever the weights' dtype (float32 or bfloat16): the lifting and
    the energy need more than bf16's 8 mantissa bits.
    """

    def __init__(self, dim: int, cfg: ModelConfig) -> None:
        """Args:
        dim: spatial dimension, 2 (Conv2d) or 3 (Conv3d).
        cfg: architecture; validated here.
        """
        cfg.validate()
        super().__init__(dim, 1 + dim, cfg)
        self.head = _conv(dim, cfg.channels()[0], 1, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def check_resolution(self, n: int) -> None:
        """Raise PdedsError unless n nodes per axis pass ``depth`` 2x downsamplings."""
        why = unet_resolution_problem(self.cfg.depth, n)
        if why is not None:
            raise PdedsError(why)

    def features(self, nu: torch.Tensor) -> torch.Tensor:
        """[log nu, x_1, .., x_d] computed in float32, cast to the conv weights' dtype."""
        return input_features(nu).to(self.head.weight.dtype)

    def forward(self, nu: torch.Tensor) -> torch.Tensor:
        """U = g + m * w(nu); see the module docstring."""
        check_input(nu, self.dim, "UNet")
        for n in nu.shape[2:]:
            self.check_resolution(n)
        x = self.latent(self.features(nu))
        # The lifting is added in float32: in bf16, 1 - x1 itself would be rounded to 8 bits.
        return apply_dirichlet(self.head(x).float())


def input_features(nu: torch.Tensor) -> torch.Tensor:
    """[log nu, x_1, .., x_d] in float32, x_a = i_a / (n_a - 1): (B, 1 + d, n..)."""
    spatial = tuple(nu.shape[2:])
    axes = [torch.linspace(0.0, 1.0, n, device=nu.device) for n in spatial]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    coords = coords.unsqueeze(0).expand(nu.shape[0], -1, *spatial)
    return torch.cat([nu.float().log(), coords], dim=1)


def check_input(nu: torch.Tensor, dim: int, name: str) -> None:
    """Raise PdedsError unless nu has shape (B, 1, n..) with ``dim`` spatial axes."""
    if nu.dim() != dim + 2 or nu.shape[1] != 1:
        raise PdedsError(
            f"{name}({dim}-D) got nu of shape {tuple(nu.shape)}; pass (B, 1" + ", n" * dim + ")"
        )


def unet_resolution_problem(depth: int, n: int) -> str | None:
    """Why n nodes per axis cannot pass ``depth`` 2x downsamplings (None if they can)."""
    step = 2**depth
    if n % step == 0 and n // step >= 2:
        return None
    examples = ", ".join(str(step * 2**k) for k in (1, 2, 3))
    return (
        f"resolution n={n} cannot pass {depth} 2x downsamplings; use a multiple of "
        f"{step} that is >= {2 * step} (e.g. {examples})"
    )


def run_stage(stage: nn.Module, checkpointed: bool, *inputs: torch.Tensor) -> torch.Tensor:
    """Apply a stage, through activation checkpointing when asked and grad is on."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(_recompute_keeps_stats(stage), *inputs, use_reentrant=False)
    return stage(*inputs)


def _recompute_keeps_stats(stage: nn.Module) -> Callable[..., torch.Tensor]:
    """``stage``'s forward for checkpoint; the recomputation in backward leaves buffers alone.

    Batch norm updates its running statistics on every training-mode call; without this the
    recomputation would apply the momentum update a second time per step.
    """
    calls = 0

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 1:
            return stage(*inputs)
        saved = [b.clone() for b in stage.buffers()]
        try:
            return stage(*inputs)
        finally:
            with torch.no_grad():
                for buf, old in zip(stage.buffers(), saved):
                    buf.copy_(old)

    return run


def build_model(dim: int, cfg: ModelConfig) -> nn.Module:
    """The network ``cfg.arch`` names (``pdeds.models.build_model``; kept importable here)."""
    from pdeds.models import build_model as build

    return build(dim, cfg)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
