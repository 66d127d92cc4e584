"""What K-FAC estimates: each layer's Kronecker factors, their eigenbases and damping.

For every supported layer (``kfac_layers``) the Fisher block of W_mat = [W | b] is approximated
by A (x) G (KFC scaling for convolutions, Grosse & Martens 2016),

    A = 1/N sum_{n,t} a_{n,t} a_{n,t}^T,        G = 1/(N T) sum_{n,t} Ds_{n,t} Ds_{n,t}^T,

over the N samples of the global batch and their T output locations; Ds is the gradient of the
per-sample loss J_n at the layer output (the empirical Fisher, as kfac-pytorch), or with
``curvature: ggn`` a cotangent drawn from the loss's own curvature (``collect_curvature``).
Cheap factors: the sums over t run over L = ``factor_locations`` locations drawn from (seed,
step, layer, T), the same on every rank and for every sample (A's sum is scaled by T / L), from
the first ``factor_samples`` samples of the global batch (whole micro-batches:
``factor_rounds``), and only every ``factor_update_steps`` steps; running averages
A <- xi A + (1 - xi) A_batch (same for G; ``factor_average: mean`` uses min(xi, k / (k + 1)) at
the k-th update after the first); eigendecompositions A = Q_A diag(l_A) Q_A^T,
G = Q_G diag(l_G) Q_G^T, spread over the ranks (``kfac_distributed``). The damped Kronecker
inverse of a layer is

    V = P dW_mat = (G (x) A + gamma I)^-1 dW_mat
      = Q_G [(Q_G^T dW_mat Q_A) / (l_G l_A^T + gamma)] Q_A^T,

with gamma = ``damping`` ("absolute") or, "relative", gamma_l = damping * mean(l_A) mean(l_G)
= damping (tr A / dim A)(tr G / dim G) per layer, refreshed with the eigenbases. A sums over
the output locations, so its eigenvalues grow with the grid (the shared FMG refine stage's with
its finest call, 4x per doubling in 2-D) while G shrinks with the refine scale: a fixed gamma is
a different preconditioner at every resolution and, at 2-D 128^2, a near-exact inverse that
amplifies the least-curved directions; the relative one is the same fraction of each layer's
curvature at any resolution.

Per-sample scaling. The loss a rank differentiates is the mean over its N_r samples of the
step (DeepSpeed divides each micro-batch mean by the accumulation steps), so a hook sees
Ds / N_r and the G sum is rescaled by (c N_r)^2 before it is reduced, c the layer's calls per
forward (1, or one per level for the FMG refine stage: a constant factor of that layer's G,
which relative damping and an inner Adam do not see). With ``factor_samples`` the sums come
from N_c <= N_r samples and A is divided by c N_c, G still rescaled by (c N_r)^2.

Where and when the inverse acts on the gradient is ``pdeds.optim.kfac``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pdeds import distributed
from pdeds.errors import PdedsError
from pdeds.optim import kfac_distributed as comm
from pdeds.optim.kfac_layers import LayerHelper, preconditioned_layers

DAMPING_MODES = ("absolute", "relative")
"""How ``damping`` sets each layer's gamma: as it is, or times the layer's mean eigenvalue
product (``optim.kfac.damping_mode``)."""

FACTOR_AVERAGES = ("ema", "mean")
"""How the factors' running average starts (``optim.kfac.factor_average``)."""


def autograd_running() -> bool:
    """True while autograd runs a backward pass (e.g. a checkpointed stage recomputing)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def _factor_dtype(dtype: torch.dtype) -> torch.dtype:
    """Factors accumulate in at least float32."""
    return torch.promote_types(dtype, torch.float32)


class KFACFactors:
    """The factor statistics of the supported layers of ``model`` (``factors[name]``: A, G,
    their eigenvalues / eigenvectors, gamma, the update count), and the damped inverse.

    Args:
        model: the network; a forward pre-hook on it counts the step's micro-batches.
        damping, damping_mode, factor_decay, factor_average, factor_update_steps,
        factor_locations, factor_samples, max_factor_dim, warmup_steps, curvature, seed: see
        ``pdeds.optim.config.KFACConfig``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        damping: float,
        damping_mode: str,
        factor_decay: float,
        factor_average: str,
        factor_update_steps: int,
        factor_locations: int,
        factor_samples: int,
        max_factor_dim: int,
        warmup_steps: int,
        curvature: str,
        seed: int,
    ) -> None:
        self.damping, self.factor_decay, self.seed = damping, factor_decay, seed
        self.factor_update_steps, self.warmup_steps = factor_update_steps, warmup_steps
        self.factor_locations, self.factor_samples = factor_locations, factor_samples
        self.ggn = curvature == "ggn"
        if damping_mode not in DAMPING_MODES:
            raise PdedsError(f"K-FAC damping_mode {damping_mode!r}: use absolute or relative")
        self.relative_damping = damping_mode == "relative"
        if factor_average not in FACTOR_AVERAGES:
            raise PdedsError(f"K-FAC factor_average {factor_average!r}: use ema or mean")
        self.mean_start = factor_average == "mean"
        self.layers = preconditioned_layers(model, max_factor_dim)
        self.steps = 0
        self.factors: dict[str, dict[str, torch.Tensor]] = {}
        self._sums: dict[str, dict[str, Any]] = {}
        self._pass: list[tuple] | None = None  # a Gauss-Newton factor pass's layer records
        self._reset_counts()
        self._handles = [model.register_forward_pre_hook(self._count_micro_batch)]

    def _reset_counts(self) -> None:
        """This rank's training forwards (micro-batches) of the current step, their samples and
        those of the ones that feed the factors (``factor_samples``)."""
        self._micro, self._step_samples, self._collected_samples = 0, 0, 0
        self._collecting_now = True

    # ---- schedule -------------------------------------------------------------------------

    def collecting(self) -> bool:
        """True on steps whose forward/backward passes feed the factors."""
        return self.steps < self.warmup_steps or self.steps % self.factor_update_steps == 0

    def factor_rounds(self, micro: int) -> int:
        """Micro-batches of each rank's step that feed the factors: ceil(S / (W m)) for
        S = ``factor_samples``, W ranks and m samples per micro-batch (0 = all of them).

        Micro-batch j of rank r is the slice [(j W + r) m, (j W + r + 1) m) of the global batch
        (``pdeds.train.data.split_global_batch``), so the first R rounds are its first R W m
        samples: the same samples on any rank count whose W m divides S."""
        if self.factor_samples <= 0:
            return 1 << 62
        return max(1, -(-self.factor_samples // (distributed.world_size() * max(1, micro))))

    def _count_micro_batch(self, module: nn.Module, args: tuple) -> None:
        """Root forward pre-hook: count this step's training forwards (micro-batches) and decide
        whether this one feeds the factors (one of the first ``factor_rounds``)."""
        if not torch.is_grad_enabled() or autograd_running() or self._pass is not None:
            return
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        m = x.shape[0] if x is not None and x.dim() > 0 else 1
        self._micro += 1
        self._step_samples += m
        self._collecting_now = self._micro <= self.factor_rounds(m)
        if self._collecting_now and self.collecting():
            self._collected_samples += m

    # ---- statistics -----------------------------------------------------------------------

    def _key(self, *parts: int) -> int:
        """A seed from (seed, step, parts): the same on every rank."""
        key = self.seed * 1_000_003 + self.steps
        for p in parts:
            key = key * 1_000_003 + p
        return key % (1 << 62)

    def _locations(self, index: int, y: torch.Tensor) -> torch.Tensor | None:
        """The L output locations of layer ``index`` this step (None = all T)."""
        t = math.prod(y.shape[2:]) if y.dim() > 2 else 1
        if self.factor_locations == 0 or self.factor_locations >= t:
            return None
        gen = torch.Generator().manual_seed(self._key(index, t))
        picked = torch.randperm(t, generator=gen)[: self.factor_locations]
        return picked.sort().values.to(y.device)

    def _input_sum(
        self, index: int, h: LayerHelper, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """This call's locations and its A sum sum_{n,t} a a^T (scaled by T / L when sampled)."""
        where = self._locations(index, y)
        a = h.patches(x.detach().to(_factor_dtype(x.dtype)), y.detach(), where)
        a_outer = a.T @ a
        if where is not None:
            a_outer *= math.prod(y.shape[2:]) / len(where)
        return where, a_outer

    @torch.no_grad()
    def _add(
        self, h: LayerHelper, a_outer: torch.Tensor, gy: torch.Tensor, where: Any, n: int
    ) -> None:
        """Add one call's A sum and the G sum of its output gradient ``gy`` (n samples)."""
        g = h.output_rows(gy.detach().to(a_outer.dtype), where)
        acc = self._sums.setdefault(h.name, {"A": 0.0, "G": 0.0, "samples": 0, "rows": 0})
        acc["A"] = acc["A"] + a_outer
        acc["G"] = acc["G"] + g.T @ g
        acc["samples"] += n
        acc["rows"] += g.shape[0]

    def _collect(self, index: int, h: LayerHelper, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add this call's A sum and its G sum when y's gradient (the loss's) arrives."""
        where, a_outer = self._input_sum(index, h, x, y)
        y.register_hook(lambda gy: self._add(h, a_outer, gy, where, x.shape[0]))

    def collect_curvature(self, engine: Any, micro_batches: Any, loss_fn: Callable) -> None:
        """``curvature: ggn``: on a factor step, the statistics of the loss's Gauss-Newton
        matrix J^T (w K) J instead of the empirical Fisher.

        For each of this rank's micro-batches: one forward of ``engine.module`` (hooks record
        every layer's input and output), then one backward of the cotangent v_b / N_r at the
        output, v_b ~ N(0, w_b K_b) drawn from (seed, step, sample id) (``OutputCurvature.sample``,
        ``fem.stiffness_sample``), to the layer outputs only (no parameter gradient is formed or
        reduced). Then E[Ds Ds^T] = (dU/ds)^T w K (dU/ds) at each location: G is the sampled
        Gauss-Newton factor (Martens & Grosse's "K-FAC with sampled curvature"). N_r = the rank's
        samples of the step, the scale ``_update_factors`` undoes, as for the loss's gradient.
        """
        if not self.ggn or not self.collecting():
            return
        if not callable(getattr(loss_fn, "curvature", None)):
            raise PdedsError(
                "optim.kfac.curvature ggn needs the loss's output curvature (loss_fn.curvature); "
                "build the loss with pdeds.train.step.make_loss_fn, or use curvature empirical"
            )
        module = getattr(engine, "module", engine)  # not the engine: no backward hooks of its
        dtype = next(module.parameters()).dtype
        micro_batches = list(micro_batches)
        if micro_batches:
            micro_batches = micro_batches[: self.factor_rounds(len(micro_batches[0]))]
        n_r = sum(len(mb) for mb in micro_batches)
        for mb in micro_batches:
            c = loss_fn.curvature(mb)
            self._pass = []
            try:
                with torch.enable_grad():
                    u = module(c.inputs.to(dtype))
                records = self._pass
            finally:
                self._pass = None
            v = c.sample([self._key(int(i)) for i in mb]) / n_r
            grads = torch.autograd.grad(
                u, [r[3] for r in records], v.to(u.dtype), allow_unused=True
            )
            for (index, h, x, y), gy in zip(records, grads, strict=True):
                if gy is not None:
                    where, a_outer = self._input_sum(index, h, x, y)
                    self._add(h, a_outer, gy, where, x.shape[0])

    def _update_factors(self) -> None:
        """Reduce this step's factor sums over ranks (one all-reduce) and update the averages."""
        if not self.layers:
            return
        dtype = _factor_dtype(self.layers[0].module.weight.dtype)
        # the loss a hook differentiated is the mean over all N_r samples of the rank's step;
        # the G sums came from N_c of them: Ds = N_r (the hook's gradient), per collected sample
        ratio = 1.0
        if not self.ggn and 0 < self._collected_samples < self._step_samples:
            ratio = self._step_samples / self._collected_samples
        chunks, counts = [], []
        for h in self.layers:
            acc = self._sums.get(h.name)
            w = h.module.weight
            if acc is None:
                chunks += [
                    w.new_zeros(h.g_dim**2, dtype=dtype),
                    w.new_zeros(h.a_dim**2, dtype=dtype),
                ]
                counts += [0.0, 0.0]
                continue
            n_r = acc["samples"]
            chunks += [(acc["G"] * (n_r * ratio) ** 2).reshape(-1), acc["A"].reshape(-1)]
            counts += [float(n_r), float(acc["rows"])]
        sums, total = comm.reduce_sums(chunks, counts)
        xi = self.factor_decay
        for i, h in enumerate(self.layers):
            samples, rows = total[2 * i], total[2 * i + 1]
            if samples == 0:
                continue
            g_batch = sums[2 * i].view(h.g_dim, h.g_dim) / rows
            a_batch = sums[2 * i + 1].view(h.a_dim, h.a_dim) / samples
            st = self.factors.setdefault(h.name, {})
            if "A" not in st:
                st["A"], st["G"] = a_batch.clone(), g_batch.clone()
                st["updates"] = 1
            else:
                k = st.get("updates", 1)
                w = min(xi, k / (k + 1)) if self.mean_start else xi
                st["A"].mul_(w).add_(a_batch, alpha=1 - w)
                st["G"].mul_(w).add_(g_batch, alpha=1 - w)
                st["updates"] = k + 1
        self._sums = {}

    def _update_eigen(self) -> None:
        """Eigenbases of every factor, each decomposed on one rank, shared by all."""
        items = [(h.name, key) for h in self.layers if h.name in self.factors for key in "AG"]
        if not items:
            return
        shared = comm.share_eigenbases([self.factors[name][key] for name, key in items])
        for (name, key), (evals, evecs) in zip(items, shared, strict=True):
            self.factors[name]["eval_" + key] = evals
            self.factors[name]["evec_" + key] = evecs
        for name in dict.fromkeys(name for name, _ in items):
            st = self.factors[name]
            st["gamma"] = self._gamma(st["eval_A"], st["eval_G"])

    def _gamma(self, eval_a: torch.Tensor, eval_g: torch.Tensor) -> float:
        """The layer's damping: ``damping``, or (relative) damping * mean(l_A) * mean(l_G) =
        damping * (tr A / dim A)(tr G / dim G) (``damping`` if that vanishes)."""
        if not self.relative_damping:
            return self.damping
        scale = float(eval_a.clamp(min=0).mean() * eval_g.clamp(min=0).mean())
        return self.damping * scale if scale > 0 else self.damping

    # ---- the damped Kronecker inverse -----------------------------------------------------

    def _apply(self, h: LayerHelper, mat: torch.Tensor) -> torch.Tensor:
        """V = P mat, the damped Kronecker inverse (module docstring)."""
        st = self.factors[h.name]
        qa, qg, la, lg = st["evec_A"], st["evec_G"], st["eval_A"], st["eval_G"]
        v = qg.T @ mat.to(qa.dtype) @ qa
        v = v / (lg[:, None] * la[None, :] + st.get("gamma", self.damping))
        return qg @ v @ qa.T

    def _curvature(self, h: LayerHelper, v: torch.Tensor) -> float:
        """<V, P^-1 V> = sum (Q_G^T V Q_A)^2 (l_G l_A^T + gamma): the layer's term of S."""
        st = self.factors[h.name]
        r = st["evec_G"].T @ v.to(st["evec_A"].dtype) @ st["evec_A"]
        scale = st["eval_G"][:, None] * st["eval_A"][None, :] + st.get("gamma", self.damping)
        return float((r * r * scale).sum())
