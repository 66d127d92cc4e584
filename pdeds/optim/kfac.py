"""K-FAC: a Kronecker-factored preconditioner in front of a torch optimizer (SGD, Adam, AdamW).

For every supported layer (``kfac_layers``) the Fisher block of W_mat = [W | b] is approximated
by A (x) G (KFC scaling for convolutions, Grosse & Martens 2016),

    A = 1/N sum_{n,t} a_{n,t} a_{n,t}^T,        G = 1/(N T) sum_{n,t} Ds_{n,t} Ds_{n,t}^T,

over the N samples of the global batch and their T output locations; Ds is the gradient of the
per-sample loss J_n at the layer output (the empirical Fisher, as kfac-pytorch). Cheap factors:
the sums over t run over L = ``factor_locations`` locations drawn from (seed, step, layer, T),
the same on every rank and for every sample (A's sum is scaled by T / L), from the first
``factor_samples`` samples of the global batch (whole micro-batches: ``factor_rounds``), and only
every ``factor_update_steps`` steps; running averages A <- xi A + (1 - xi) A_batch (same for G;
``factor_average: mean`` uses min(xi, k / (k + 1)) at the k-th update after the first);
eigendecompositions A = Q_A diag(l_A) Q_A^T, G = Q_G diag(l_G) Q_G^T every ``inv_update_steps``,
spread over the ranks (``kfac_distributed``). The preconditioned gradient of a layer is the
damped Kronecker inverse

    V = P dW_mat = (G (x) A + gamma I)^-1 dW_mat
      = Q_G [(Q_G^T dW_mat Q_A) / (l_G l_A^T + gamma)] Q_A^T,

with gamma = ``damping`` ("absolute") or, "relative", gamma_l = damping * mean(l_A) mean(l_G)
= damping (tr A / dim A)(tr G / dim G) per layer, refreshed with the eigenbases. A sums over
the output locations, so its eigenvalues grow with the grid (the shared FMG refine stage's with
its finest call, 4x per doubling in 2-D) while G shrinks with the refine scale: a fixed gamma is
a different preconditioner at every resolution and, at 2-D 128^2, a near-exact inverse that
amplifies the least-curved directions; the relative one is the same fraction of each layer's
curvature at any resolution. The whole step is scaled by the KL-clip
nu = min(1, sqrt(kl_clip / (lr^2 S))),
S = sum_layers <V, dW_mat> = sum_layers <V, P^-1 V>. The inner torch optimizer then steps on
the gradients as they are (norm layers keep their plain gradient).

Where it preconditions (``precondition``):

- "backward" (default, ZeRO 0-2). With the factors fixed during a step, P is linear, so it can
  act on each rank's local gradient of each micro-batch: a hook on the autograd node of every
  layer replaces its weight / bias gradients by P of them before their AccumulateGrad nodes run,
  that is before DeepSpeed's post-accumulate gradient hooks reduce (ZeRO 0) or reduce-scatter
  into partitions (ZeRO 1/2) them. DeepSpeed's averaging then yields P of the averaged gradient,
  as on 1 rank. The factors of step s are those collected up to step s - 1 (the sums of step s
  are reduced after its update), and the first ``warmup_steps`` steps are the inner optimizer
  alone while the factors warm up. S needs the reduced V of whole layers: under ZeRO 0 it is
  the layers' ``.grad`` in ``step()``; under ZeRO 1/2 the ranks' local V are averaged in one
  all-reduce (one parameter-sized buffer), and nu scales every gradient the inner optimizer
  holds. Under ZeRO 0 without DeepSpeed's gradient clipping (``hook_gradients`` False),
  ``.grad`` accumulates whole until DeepSpeed all-reduces it after the step's last micro-batch,
  so no hook is needed: the same P acts once, in ``step()``, on the reduced gradient
  (``precondition_held``), the same step at one application instead of one per micro-batch
  (batch 64 in 8 micro-batches, 2-D 64^2: 1.07x an Adam step instead of 1.16x).
- "step" (ZeRO 0): in ``step()``, on the reduced gradient, with factors that include this step's
  statistics; nu scales the K-FAC layers only. This is the K-FAC of before issue 13.

Per-sample scaling. The loss a rank differentiates is the mean over its N_r samples of the
step (DeepSpeed divides each micro-batch mean by the accumulation steps), so a hook sees
Ds / N_r and the G sum is rescaled by (c N_r)^2 before it is reduced, c the layer's calls per
forward (1, or one per level for the FMG refine stage: a constant factor of that layer's G,
which relative damping and an inner Adam do not see). With ``factor_samples`` the sums come
from N_c <= N_r samples and A is divided by c N_c, G still rescaled by (c N_r)^2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pdeds import distributed, dsconfig
from pdeds.errors import PdedsError
from pdeds.optim import kfac_distributed as comm
from pdeds.optim.first_order import first_order
from pdeds.optim.kfac_layers import LayerHelper, preconditioned_layers

assign_inversions = comm.assign_inversions

DAMPING_MODES = ("absolute", "relative")
"""How ``damping`` sets each layer's gamma: as it is, or times the layer's mean eigenvalue
product (``optim.kfac.damping_mode``)."""

FACTOR_AVERAGES = ("ema", "mean")
"""How the factors' running average starts (``optim.kfac.factor_average``)."""


def build_kfac(model: nn.Module, cfg: Any, ds: dict | None = None) -> torch.optim.Optimizer:
    """The inner torch optimizer ``cfg.kfac.inner`` over the model's parameters with a
    ``KFACPreconditioner`` attached (``opt.kfac``); ``cfg`` is an ``OptimConfig``."""
    c = cfg.kfac
    opt = first_order(c.inner, [p for p in model.parameters() if p.requires_grad], cfg)
    view = dsconfig.read(ds) if ds is not None else None
    pre = KFACPreconditioner(
        model,
        damping=c.damping,
        damping_mode=c.damping_mode,
        factor_decay=c.factor_decay,
        factor_average=c.factor_average,
        factor_update_steps=c.factor_update_steps,
        inv_update_steps=c.inv_update_steps,
        factor_locations=c.factor_locations,
        factor_samples=c.factor_samples,
        max_factor_dim=c.max_factor_dim,
        warmup_steps=c.warmup_steps,
        kl_clip=c.kl_clip,
        precondition=c.precondition,
        curvature=c.curvature,
        seed=c.seed,
        hook_gradients=view is None or view.stage > 0 or view.gradient_clipping > 0,
    )
    pre.attach(opt)
    return opt


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. a checkpointed stage recomputing)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def _factor_dtype(dtype: torch.dtype) -> torch.dtype:
    """Factors accumulate in at least float32."""
    return torch.promote_types(dtype, torch.float32)


class KFACPreconditioner:
    """K-FAC factors and preconditioning for the supported layers of ``model``.

    Args:
        model: the network; forward hooks are registered on its supported layers.
        damping, damping_mode, factor_decay, factor_average, factor_update_steps, inv_update_steps,
        factor_locations, factor_samples, max_factor_dim, warmup_steps, kl_clip, precondition,
        curvature, seed: see ``pdeds.optim.config.KFACConfig`` (the defaults here are the K-FAC
        of before issue 13).
        hook_gradients: "backward" mode: precondition each micro-batch's gradient in a hook
            (True), or (False: ZeRO 0 without DeepSpeed's gradient clipping, where ``.grad``
            accumulates whole until DeepSpeed reduces it after the last micro-batch) the reduced
            gradient once per step in ``step()``, with the same factors: P is linear, so it is
            the same step at one application instead of one per micro-batch.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        damping: float = 1e-3,
        damping_mode: str = "absolute",
        factor_decay: float = 0.95,
        factor_average: str = "ema",
        factor_update_steps: int = 1,
        inv_update_steps: int = 1,
        factor_locations: int = 0,
        factor_samples: int = 0,
        max_factor_dim: int = 0,
        warmup_steps: int = 0,
        kl_clip: float = 0.0,
        precondition: str = "step",
        curvature: str = "empirical",
        seed: int = 0,
        hook_gradients: bool = True,
    ) -> None:
        self.damping, self.factor_decay, self.kl_clip = damping, factor_decay, kl_clip
        self.factor_update_steps, self.inv_update_steps = factor_update_steps, inv_update_steps
        self.factor_locations, self.warmup_steps = factor_locations, warmup_steps
        self.in_backward, self.seed = precondition == "backward", seed
        self.hook_gradients, self.factor_samples = hook_gradients, factor_samples
        # this rank's training forwards (micro-batches) of the current step, their samples and
        # those of the ones that feed the factors (``factor_samples``)
        self._micro, self._step_samples, self._collected_samples = 0, 0, 0
        self._collecting_now = True
        self.ggn = curvature == "ggn"
        if damping_mode not in DAMPING_MODES:
            raise PdedsError(f"K-FAC damping_mode {damping_mode!r}: use absolute or relative")
        self.relative_damping = damping_mode == "relative"
        if factor_average not in FACTOR_AVERAGES:
            raise PdedsError(f"K-FAC factor_average {factor_average!r}: use ema or mean")
        self.mean_start = factor_average == "mean"
        self._pass: list[tuple] | None = None
        self.layers = preconditioned_layers(model, max_factor_dim)
        self.steps = 0
        self.factors: dict[str, dict[str, torch.Tensor]] = {}
        self._sums: dict[str, dict[str, Any]] = {}
        self._local_v: dict[str, torch.Tensor] = {}
        self._handles = [
            h.module.register_forward_hook(self._forward_hook(i, h))
            for i, h in enumerate(self.layers)
        ]
        self._handles.append(model.register_forward_pre_hook(self._count_micro_batch))

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
        if not torch.is_grad_enabled() or _in_backward() or self._pass is not None:
            return
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        m = x.shape[0] if x is not None and x.dim() > 0 else 1
        self._micro += 1
        self._step_samples += m
        self._collecting_now = self._micro <= self.factor_rounds(m)
        if self._collecting_now and self.collecting():
            self._collected_samples += m

    def _eigen_due(self) -> bool:
        """Refresh the eigenbases now? "step": at steps 0, k, 2k..; "backward": after the step
        that ends the warm-up and every k steps after it (k = inv_update_steps)."""
        if not self.in_backward:
            return self.steps % self.inv_update_steps == 0
        after = self.steps + 1 - max(1, self.warmup_steps)
        return after >= 0 and after % self.inv_update_steps == 0

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

    def _forward_hook(self, index: int, h: LayerHelper) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if (
                not torch.is_grad_enabled()
                or not isinstance(output, torch.Tensor)
                or not output.requires_grad
                or _in_backward()
            ):
                return
            if self._pass is not None:  # a Gauss-Newton factor pass (collect_curvature)
                self._pass.append((index, h, inputs[0], output))
                return
            if self.collecting() and not self.ggn and self._collecting_now:
                self._collect(index, h, inputs[0], output)
            hooked = self.in_backward and self.hook_gradients
            if hooked and "evec_A" in self.factors.get(h.name, {}):
                self._hook_node(h, output)

        return hook

    @torch.no_grad()
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

    # ---- preconditioning ------------------------------------------------------------------

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

    def _hook_node(self, h: LayerHelper, y: torch.Tensor) -> None:
        """Precondition the weight / bias gradients y's autograd node produces (backward mode)."""
        node = y.grad_fn
        slots = {}
        for i, (fn, _) in enumerate(getattr(node, "next_functions", ())):
            for key, p in (("w", h.module.weight), ("b", getattr(h.module, "bias", None))):
                if p is not None and getattr(fn, "variable", None) is p:
                    slots[key] = i
        if "w" not in slots or (h.has_bias and "b" not in slots):
            raise PdedsError(
                f"K-FAC cannot precondition {h.name} in backward (its weight reaches autograd "
                "through another operation); set optim.kfac.precondition: step and ZeRO stage 0"
            )

        def node_hook(grad_inputs: tuple, grad_outputs: tuple) -> tuple | None:
            gw = grad_inputs[slots["w"]]
            if gw is None:
                return None
            gb = grad_inputs[slots["b"]] if h.has_bias else None
            v = self._apply(h, h.matrix(gw, gb))
            if self.kl_clip > 0:
                old = self._local_v.get(h.name)
                self._local_v[h.name] = v if old is None else old + v
            new_w, new_b = h.split(v)
            out = list(grad_inputs)
            out[slots["w"]] = new_w
            if h.has_bias:
                out[slots["b"]] = new_b
            return tuple(out)

        node.register_hook(node_hook)

    def _kl_scale(self, s: float, lr: float) -> float:
        """nu = min(1, sqrt(kl_clip / (lr^2 S))) (1 without a clip)."""
        if self.kl_clip > 0 and s * lr**2 > 0:
            return min(1.0, math.sqrt(self.kl_clip / (s * lr**2)))
        return 1.0

    @torch.no_grad()
    def precondition_reduced(self, lr: float) -> None:
        """ "step" mode: refresh the factors / eigenbases when due, then replace each layer's
        (reduced) gradient by nu V."""
        if self.collecting():
            self._update_factors()
        if self._eigen_due():
            self._update_eigen()
        updates, s = self._preconditioned_grads()
        nu = self._kl_scale(s, lr)
        for h, v in updates:
            h.set_grad_matrix(v * nu)

    def _preconditioned_grads(self) -> tuple[list[tuple[LayerHelper, torch.Tensor]], float]:
        """V = P dW_mat of every layer with eigenbases and a ``.grad``, and S = sum <V, dW_mat>."""
        updates, s = [], 0.0
        for h in self.layers:
            if "evec_A" not in self.factors.get(h.name, {}) or h.module.weight.grad is None:
                continue
            grad = h.grad_matrix()
            v = self._apply(h, grad)
            s += float((v * grad.to(v.dtype)).sum())
            updates.append((h, v))
        return updates, s

    @torch.no_grad()
    def precondition_held(self, optimizer: torch.optim.Optimizer) -> None:
        """ "backward" mode without gradient hooks (ZeRO 0): replace each layer's reduced
        gradient by V = P of it, with the factors of the earlier steps, then scale every
        gradient ``optimizer`` holds by nu (S = sum <V, dW_mat>): what the hooks' per-micro-batch
        P and ``clip_preconditioned`` make of the same step."""
        updates, s = self._preconditioned_grads()
        for h, v in updates:
            h.set_grad_matrix(v)
        nu = self._kl_scale(s, optimizer.param_groups[0]["lr"])
        if self.kl_clip > 0 and nu < 1.0:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(nu)

    @torch.no_grad()
    def clip_preconditioned(self, optimizer: torch.optim.Optimizer) -> None:
        """ "backward" mode: scale every gradient ``optimizer`` holds by nu, S from the reduced V
        of whole layers (their ``.grad`` when it holds them, else the ranks' local V averaged)."""
        names = [h for h in self.layers if h.name in self._local_v]
        if self.kl_clip <= 0 or not names:
            return
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if all(id(h.module.weight) in held for h in names):
            reduced = [h.grad_matrix() for h in names]
        else:
            reduced = comm.reduce_mean([self._local_v[h.name] for h in names])
        s = sum(self._curvature(h, v) for h, v in zip(names, reduced, strict=True))
        nu = self._kl_scale(s, optimizer.param_groups[0]["lr"])
        if nu < 1.0:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(nu)

    # ---- the optimizer's step hooks -------------------------------------------------------

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Run in front of ``optimizer.step()`` (and after it), carry the factors in its
        ``state_dict``; ``optimizer.kfac`` is this preconditioner."""
        optimizer.register_step_pre_hook(self._before_step)
        optimizer.register_step_post_hook(self._after_step)
        optimizer.register_state_dict_post_hook(self._save)
        optimizer.register_load_state_dict_pre_hook(self._load)
        optimizer.kfac = self  # type: ignore[attr-defined]

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.in_backward and not self.hook_gradients:
            self._check_params(optimizer)
            self.precondition_held(optimizer)
            return
        if self.in_backward:
            self.clip_preconditioned(optimizer)
            return
        self._check_params(optimizer)
        self.precondition_reduced(optimizer.param_groups[0]["lr"])

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.in_backward:
            if self.collecting():
                self._update_factors()
            if self._eigen_due():
                self._update_eigen()
            self._local_v = {}
        self._micro, self._step_samples, self._collected_samples = 0, 0, 0
        self.steps += 1

    def _check_params(self, optimizer: torch.optim.Optimizer) -> None:
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for h in self.layers:
            if any(id(p) not in held for p in h.params()):
                raise PdedsError(
                    "K-FAC no longer holds the model's parameters (a ZeRO stage >= 1 or fp16/bf16 "
                    "wrapper replaced them); use zero_optimization.stage 0 and fp32, or "
                    "optim.kfac.precondition: backward"
                )

    def state_dict(self) -> dict[str, Any]:
        """Step count and factors (eigenbases included)."""
        return {"steps": self.steps, "factors": self.factors}

    def _save(self, optimizer: torch.optim.Optimizer, state: dict) -> dict:
        return {**state, "kfac": self.state_dict()}

    def _load(self, optimizer: torch.optim.Optimizer, state: dict) -> dict:
        state = dict(state)
        saved = state.pop("kfac", None)
        if saved is not None:
            self.steps = int(saved["steps"])
            self.factors = {k: dict(v) for k, v in saved["factors"].items()}
        return state

    def reset_state(self) -> None:
        """Forget factors and eigenbases; the warm-up starts again.

        Used when the problem changes under the optimizer (e.g. a multigrid level switch: A sums
        over output locations, so it scales with the resolution)."""
        self.factors, self._sums, self._local_v = {}, {}, {}
        self._micro, self._step_samples, self._collected_samples = 0, 0, 0
        self.steps = 0

    def remove_hooks(self) -> None:
        """Detach K-FAC from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
