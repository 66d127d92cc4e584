"""Per-layer K-FAC algebra: patches, output gradients and the gradient matrix of one layer.

Every supported layer is, at each output location t of sample n, the affine map
s_{n,t} = W_mat a_{n,t} with a_{n,t} = [patch of the input feeding location t; 1] and
W_mat = [W reshaped to (out, fan_in) | b]. Its weight gradient is then
dW_mat = sum_{n,t} Ds_{n,t} a_{n,t}^T, and K-FAC (with KFC's spatial assumptions for
convolutions, Grosse & Martens 2016) approximates that block of the Fisher by A (x) G with

    A = 1/N sum_n sum_t a_{n,t} a_{n,t}^T,      G = 1/(N T) sum_n sum_t Ds_{n,t} Ds_{n,t}^T,

N samples, T output locations per sample, Ds the per-sample loss's gradient at s.

- Linear: a = the input row (any leading dims beyond the batch count as locations).
- ConvNd (1-3 d): a = the zero-padded input patch under the kernel at t, ordered (in_channel,
  kernel offsets) like ``weight[o]``.
- ConvTransposeNd: y[o, t] = sum_{i,k} W[i, o, k] x[i, u] over t = u stride - padding + k
  dilation, so the "patch" at t holds x[i, u] at (i, k) when such a u exists, else 0. It is the
  patch of a direct convolution of the zero-inserted input with the flipped kernel, which is how
  it is computed. Note W's layout (in, out/groups, k..): W_mat is W permuted to (out, in, k..).

Grouped convolutions (groups > 1) are not supported (their blocks would need per-group
factors); ``supported`` says which modules are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def supported(module: nn.Module) -> bool:
    """True for Linear and (transposed) convolutions with groups == 1."""
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, CONV + CONV_TRANSPOSE):
        return module.groups == 1
    return False


def preconditioned_layers(model: nn.Module, max_factor_dim: int = 0) -> list[LayerHelper]:
    """The layers K-FAC preconditions: supported, trainable, and (``max_factor_dim`` > 0) with
    both factors of at most that size; the others keep their plain gradient."""
    out = []
    for name, m in model.named_modules():
        if supported(m) and m.weight.requires_grad:
            h = LayerHelper(name, m)
            if max_factor_dim == 0 or max(h.a_dim, h.g_dim) <= max_factor_dim:
                out.append(h)
    return out


def _append_ones(a: torch.Tensor) -> torch.Tensor:
    return torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)


def _windows(x: torch.Tensor, kernel: tuple, dilation: tuple, stride: tuple) -> torch.Tensor:
    """(N, C, n..) -> (N, T, C * prod(kernel)) windows, offsets ordered (C, k_1, .., k_d)."""
    d = len(kernel)
    for j in range(d):
        span = dilation[j] * (kernel[j] - 1) + 1
        x = x.unfold(2 + j, span, stride[j])
        if dilation[j] > 1:
            x = x[..., :: dilation[j]]
    # x: (N, C, T_1..T_d, K_1..K_d) -> (N, T_1..T_d, C, K_1..K_d)
    x = x.movedim(1, 1 + d)
    n = x.shape[0]
    t = math.prod(x.shape[1 : 1 + d])
    return x.reshape(n, t, -1)


class LayerHelper:
    """K-FAC view of one supported module (see the module docstring for the math)."""

    def __init__(self, name: str, module: nn.Module) -> None:
        if not supported(module):
            raise ValueError(f"K-FAC does not support {type(module).__name__} ({name})")
        self.name = name
        self.module = module
        self.has_bias = getattr(module, "bias", None) is not None
        weight = module.weight
        if isinstance(module, nn.Linear):
            fan_in = weight.shape[1]
            self.out = weight.shape[0]
        elif isinstance(module, CONV_TRANSPOSE):
            fan_in = weight.shape[0] * math.prod(weight.shape[2:])
            self.out = weight.shape[1]
        else:
            fan_in = math.prod(weight.shape[1:])
            self.out = weight.shape[0]
        self.a_dim = fan_in + int(self.has_bias)
        self.g_dim = self.out

    def params(self) -> list[nn.Parameter]:
        """The layer's weight (and bias)."""
        return [self.module.weight] + ([self.module.bias] if self.has_bias else [])

    # ---- forward: activations -------------------------------------------------------------

    def patches(
        self, x: torch.Tensor, y: torch.Tensor, locations: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows a_{n,t} (with the trailing 1 if the layer has a bias): (N * T, a_dim), or
        (N * L, a_dim) for the L output ``locations`` (flat indices into y's spatial shape;
        None = all), sample-major.

        Args:
            x: the layer's input; y: its output (gives T and the location grid).
        """
        m = self.module
        if isinstance(m, nn.Linear):
            a = x.reshape(x.shape[0], -1, x.shape[-1])
            a = a if locations is None else a[:, locations]
            a = a.reshape(-1, x.shape[-1])
        elif locations is not None:
            a = self._gathered_patches(x, y, locations)
        elif isinstance(m, CONV_TRANSPOSE):
            a = self._transpose_patches(x, y)
        else:
            a = self._conv_patches(x)
        return _append_ones(a) if self.has_bias else a

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        return F.pad(x, m._reversed_padding_repeated_twice, mode=mode)

    def _conv_patches(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        a = _windows(self._padded(x), m.kernel_size, m.dilation, m.stride)
        return a.reshape(-1, a.shape[-1])

    def _zero_inserted(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The zero-inserted, padded input whose direct convolution with the flipped kernel (stride
        1) is the transposed convolution of ``x``."""
        m = self.module
        d = x.dim() - 2
        n_in = x.shape[2:]
        # Zero-insert: z[u * stride] = x[u].
        z = x.new_zeros(x.shape[:2] + tuple((n - 1) * s + 1 for n, s in zip(n_in, m.stride)))
        z[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in m.stride)] = x
        pads: list[int] = []
        for j in reversed(range(d)):
            left = m.dilation[j] * (m.kernel_size[j] - 1) - m.padding[j]
            right = y.shape[2 + j] + m.dilation[j] * (m.kernel_size[j] - 1) - left - z.shape[2 + j]
            pads += [left, right]
        return F.pad(z, pads)

    def _transpose_patches(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        m = self.module
        d = x.dim() - 2
        a = _windows(self._zero_inserted(x, y), m.kernel_size, m.dilation, (1,) * d)
        # The direct convolution's offset m pairs with W's offset k = K - 1 - m: flip.
        a = a.reshape(a.shape[:2] + (x.shape[1],) + tuple(m.kernel_size))
        a = a.flip(dims=tuple(range(3, 3 + d)))
        return a.reshape(-1, self.a_dim - int(self.has_bias))

    def _gathered_patches(
        self, x: torch.Tensor, y: torch.Tensor, locations: torch.Tensor
    ) -> torch.Tensor:
        """Patches at the output ``locations`` only, gathered from the padded input:
        a_t[i, k] = x_pad[i, t s + k dl] (convolution) or z[i, t + (K - 1 - k) dl] (transposed:
        the zero-inserted input, stride 1, flipped kernel)."""
        m = self.module
        transposed = isinstance(m, CONV_TRANSPOSE)
        xp = self._zero_inserted(x, y) if transposed else self._padded(x)
        grid, kernel = y.shape[2:], tuple(m.kernel_size)
        offsets = torch.arange(math.prod(kernel), device=x.device)
        flat = torch.zeros(len(locations), len(offsets), dtype=torch.long, device=x.device)
        t_rest, k_rest, span = locations.clone(), offsets.clone(), 1
        for j in reversed(range(len(grid))):
            t_j, t_rest = t_rest % grid[j], t_rest // grid[j]
            k_j, k_rest = k_rest % kernel[j], k_rest // kernel[j]
            if transposed:
                pos = t_j[:, None] + (kernel[j] - 1 - k_j[None, :]) * m.dilation[j]
            else:
                pos = t_j[:, None] * m.stride[j] + k_j[None, :] * m.dilation[j]
            flat += pos * span
            span *= xp.shape[2 + j]
        n, c = xp.shape[:2]
        a = xp.reshape(n, c, -1)[:, :, flat.reshape(-1)].reshape(n, c, len(locations), -1)
        return a.permute(0, 2, 1, 3).reshape(n * len(locations), -1)

    # ---- backward: output gradients -------------------------------------------------------

    def output_rows(self, gy: torch.Tensor, locations: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of dL/ds, (N * T, g_dim) or (N * L, g_dim) at ``locations``: channels last."""
        if isinstance(self.module, nn.Linear):
            g = gy.reshape(gy.shape[0], -1, gy.shape[-1])
            g = g if locations is None else g[:, locations]
            return g.reshape(-1, gy.shape[-1])
        g = gy.reshape(gy.shape[0], gy.shape[1], -1)
        g = g if locations is None else g[:, :, locations]
        return g.movedim(1, -1).reshape(-1, gy.shape[1])

    # ---- gradient matrix ------------------------------------------------------------------

    def matrix(self, gw: torch.Tensor, gb: torch.Tensor | None) -> torch.Tensor:
        """[dW reshaped to (out, fan_in) | db]: (g_dim, a_dim), from weight / bias gradients."""
        if isinstance(self.module, CONV_TRANSPOSE):
            gw = gw.transpose(0, 1)
        g = gw.reshape(self.out, -1)
        if self.has_bias:
            gb = gb if gb is not None else g.new_zeros(self.out)
            g = torch.cat([g, gb.reshape(-1, 1).to(g.dtype)], dim=1)
        return g

    def split(self, mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inverse of ``matrix``: (weight-shaped, bias-shaped or None) in the weight's dtype."""
        w = self.module.weight
        body = mat[:, : mat.shape[1] - int(self.has_bias)]
        if isinstance(self.module, CONV_TRANSPOSE):
            shape = (w.shape[1], w.shape[0]) + tuple(w.shape[2:])
            gw = body.reshape(shape).transpose(0, 1)
        else:
            gw = body.reshape(w.shape)
        gb = mat[:, -1].contiguous().to(w.dtype) if self.has_bias else None
        return gw.contiguous().to(w.dtype), gb

    def grad_matrix(self) -> torch.Tensor:
        """``matrix`` of the layer's current ``.grad`` (zeros where absent)."""
        w = self.module.weight
        gw = w.grad if w.grad is not None else torch.zeros_like(w)
        gb = self.module.bias.grad if self.has_bias else None
        return self.matrix(gw, gb)

    def set_grad_matrix(self, mat: torch.Tensor) -> None:
        """Write a (g_dim, a_dim) matrix back into weight.grad (and bias.grad)."""
        gw, gb = self.split(mat)
        self.module.weight.grad = gw
        if self.has_bias:
            self.module.bias.grad = gb
