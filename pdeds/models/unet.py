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
n / 2^depth >= 2 (the multigrid schedules of METHOD.md sec. 5 rely on this).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pdeds.errors import PdedsError
from pdeds.models.norms import NORM_KINDS, make_norm
from pdeds.physics.fem import apply_dirichlet

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
}
"""The values ``UNetConfig.activation`` accepts."""


@dataclass
class UNetConfig:
    """Architecture of the U-Net (the ``model`` section of the config)."""

    depth: int = 3
    """Number of 2x downsamplings (levels below the finest)."""
    width: int = 16
    """Channels at the finest level."""
    growth: float = 2.0
    """Channel multiplier per level: c_s = round(width * growth^s)."""
    norm: str = "group"
    """Normalisation after each conv: batch | sync_batch | instance | group | none."""
    groups: int = 8
    """Groups for group norm, lowered to the largest divisor of the channel count."""
    activation: str = "gelu"
    """Nonlinearity: gelu | relu | silu | tanh | leaky_relu."""
    checkpoint: bool = False
    """Recompute each encoder/decoder stage in backward instead of storing its activations."""
    blocks: int = 2
    """(conv, norm, act) triples per stage."""

    def validate(self) -> None:
        """Raise PdedsError naming the first bad key and the fix."""
        _require_int(self.depth, "model.depth", 1)
        _require_int(self.width, "model.width", 1)
        _require_int(self.groups, "model.groups", 1)
        _require_int(self.blocks, "model.blocks", 1)
        if isinstance(self.growth, bool) or not isinstance(self.growth, (int, float)):
            raise PdedsError(f"model.growth: {self.growth!r} is not a number; use e.g. 2.0")
        if self.growth <= 0:
            raise PdedsError(f"model.growth: {self.growth!r} must be > 0; use e.g. 2.0")
        _require_choice(self.norm, "model.norm", NORM_KINDS)
        _require_choice(self.activation, "model.activation", tuple(ACTIVATIONS))
        if not isinstance(self.checkpoint, bool):
            raise PdedsError(f"model.checkpoint: {self.checkpoint!r} is not a bool; use true/false")

    def channels(self) -> list[int]:
        """c_s = max(1, round(width * growth^s)) for levels s = 0 .. depth."""
        return [max(1, round(self.width * self.growth**s)) for s in range(self.depth + 1)]


def _require_int(value: object, key: str, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise PdedsError(f"{key}: {value!r} is not an integer >= {least}; set it to one")


def _require_choice(value: object, key: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise PdedsError(f"{key}: {value!r} is not one of {', '.join(choices)}; pick one of them")


def allowed_resolutions(depth: int, up_to: int) -> list[int]:
    """Node counts n <= ``up_to`` that pass ``depth`` halvings.

    Each stride-2 downsampling halves n exactly, and the coarsest level keeps >= 2 nodes:
    n % 2^depth == 0 and n >= 2^(depth + 1).
    """
    step = 2**depth
    return list(range(2 * step, up_to + 1, step))


def _conv(dim: int, cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Module:
    cls = nn.Conv2d if dim == 2 else nn.Conv3d
    return cls(cin, cout, kernel, stride=stride, padding=(kernel - 1) // 2)


def _up(dim: int, cin: int, cout: int) -> nn.Module:
    cls = nn.ConvTranspose2d if dim == 2 else nn.ConvTranspose3d
    return cls(cin, cout, 2, stride=2)


def _block(dim: int, cin: int, cout: int, cfg: UNetConfig) -> nn.Sequential:
    """``cfg.blocks`` x (3^d conv with zero padding, norm, activation)."""
    layers: list[nn.Module] = []
    for i in range(cfg.blocks):
        layers += [
            _conv(dim, cin if i == 0 else cout, cout, 3),
            make_norm(cfg.norm, cout, dim, cfg.groups),
            ACTIVATIONS[cfg.activation](),
        ]
    return nn.Sequential(*layers)


class _UpStage(nn.Module):
    """Decoder stage: upsample level s + 1, concatenate the level-s skip, apply a block."""

    def __init__(self, dim: int, coarse: int, fine: int, cfg: UNetConfig) -> None:
        super().__init__()
        self.up = _up(dim, coarse, fine)
        self.block = _block(dim, 2 * fine, fine, cfg)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.up(x), skip], dim=1))


class UNet(nn.Module):
    """nu (B, 1, n..) -> U (B, 1, n..) with U = 1 on x1 = 0 and U = 0 on x1 = 1 for any weights.

    The output is float32 whatever the weights' dtype (float32 or bfloat16): the lifting and
    the energy need more than bf16's 8 mantissa bits.
    """

    def __init__(self, dim: int, cfg: UNetConfig) -> None:
        """Args:
        dim: spatial dimension, 2 (Conv2d) or 3 (Conv3d).
        cfg: architecture; validated here.
        """
        super().__init__()
        if dim not in (2, 3):
            raise PdedsError(f"dimension {dim} is not supported; use 2 or 3")
        cfg.validate()
        self.dim = dim
        self.cfg = cfg
        c = cfg.channels()
        self.encoder = nn.ModuleList([_block(dim, 1 + dim, c[0], cfg)])
        for s in range(1, cfg.depth + 1):
            down = _conv(dim, c[s - 1], c[s], 2, stride=2)
            self.encoder.append(nn.Sequential(down, _block(dim, c[s], c[s], cfg)))
        self.decoder = nn.ModuleList(_UpStage(dim, c[s + 1], c[s], cfg) for s in range(cfg.depth))
        self.head = _conv(dim, c[0], 1, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def check_resolution(self, n: int) -> None:
        """Raise PdedsError unless n nodes per axis pass ``depth`` 2x downsamplings."""
        depth, step = self.cfg.depth, 2**self.cfg.depth
        if n % step != 0 or n // step < 2:
            examples = ", ".join(str(step * 2**k) for k in (1, 2, 3))
            raise PdedsError(
                f"resolution n={n} cannot pass {depth} 2x downsamplings; use a multiple of "
                f"{step} that is >= {2 * step} (e.g. {examples})"
            )

    def features(self, nu: torch.Tensor) -> torch.Tensor:
        """[log nu, x_1, .., x_d] computed in float32, cast to the conv weights' dtype."""
        spatial = tuple(nu.shape[2:])
        axes = [torch.linspace(0.0, 1.0, n, device=nu.device) for n in spatial]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij"))
        coords = coords.unsqueeze(0).expand(nu.shape[0], -1, *spatial)
        feats = torch.cat([nu.float().log(), coords], dim=1)
        return feats.to(self.head.weight.dtype)

    def forward(self, nu: torch.Tensor) -> torch.Tensor:
        """U = g + m * w(nu); see the module docstring."""
        if nu.dim() != self.dim + 2 or nu.shape[1] != 1:
            raise PdedsError(
                f"UNet({self.dim}-D) got nu of shape {tuple(nu.shape)}; pass (B, 1"
                + ", n" * self.dim
                + ")"
            )
        for n in nu.shape[2:]:
            self.check_resolution(n)
        x = self.features(nu)
        skips = []
        for stage in self.encoder:
            x = self._run(stage, x)
            skips.append(x)
        skips.pop()
        for s in reversed(range(self.cfg.depth)):
            x = self._run(self.decoder[s], x, skips.pop())
        # The lifting is added in float32: in bf16, 1 - x1 itself would be rounded to 8 bits.
        return apply_dirichlet(self.head(x).float())

    def _run(self, stage: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        """Apply a stage, through activation checkpointing when configured and grad is on."""
        if self.cfg.checkpoint and torch.is_grad_enabled():
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


def build_model(dim: int, cfg: UNetConfig) -> UNet:
    """The U-Net for ``dim``-D fields described by ``cfg`` (validated)."""
    return UNet(dim, cfg)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
