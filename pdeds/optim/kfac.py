"""K-FAC: Kronecker-factored natural-gradient optimizer for Linear and (transposed) convolutions.

For every supported layer (``kfac_layers``) the Fisher block of W_mat = [W | b] is approximated
by A (x) G (KFC scaling for convolutions, Grosse & Martens 2016),

    A = 1/N sum_{n,t} a_{n,t} a_{n,t}^T,        G = 1/(N T) sum_{n,t} Ds_{n,t} Ds_{n,t}^T,

over the N samples of the global batch and their T output locations; Ds is the gradient of the
per-sample loss J_n at the layer output (the empirical Fisher, as kfac-pytorch). Running
averages A <- xi A + (1 - xi) A_batch (same for G) are refreshed every ``factor_update_steps``;
eigendecompositions A = Q_A diag(l_A) Q_A^T, G = Q_G diag(l_G) Q_G^T every ``inv_update_steps``.
The preconditioned gradient of the layer is the exact damped Kronecker inverse

    V = (G (x) A + gamma I)^-1 dW_mat = Q_G [ (Q_G^T dW_mat Q_A) / (l_G l_A^T + gamma) ] Q_A^T,

scaled by the KL-clip nu = min(1, sqrt(kl_clip / (lr^2 sum_layers <V, dW_mat>))), and handed
to the inner update (SGD with momentum, or Adam); parameters of other layers (norms) get the
inner update with their plain gradient.

Per-sample scaling. The loss a rank differentiates is the mean over its N_r samples of the
step (DeepSpeed divides each micro-batch mean by the accumulation steps), so a hook sees
Ds / N_r and the G sum is rescaled by N_r^2 before it is reduced.

Distributed (see ``_update_factors`` / ``_update_eigen``): the factor sums and counts of all
layers cross the wire in ONE all-reduce; the eigendecompositions are assigned to ranks greedily
by cost (largest n^3 first, to the least-loaded rank) and shared by one all-reduce of a buffer in
which every rank fills only its own results (adding zeros is exact), so every rank holds
bitwise-identical eigenbases and the preconditioned gradient equals the 1-rank one up to the
round-off of the reduced sums.

DeepSpeed. K-FAC is a client optimizer that runs in the standard loop (its hooks collect
statistics during ``engine(...)`` / ``engine.backward``). It needs each layer's whole gradient
matrix in ``step()``, so it runs under ZeRO 0 only: under ZeRO 1/2 the client optimizer sees a
flat fp32 slice of the reduced gradient that cuts across layers, and the KL-clip needs
<V, dW> over the whole averaged gradient. ``prepare_ds_config`` refuses ZeRO >= 1, offload and
fp16/bf16 (whose wrappers hand the client fp32 master copies the hooks do not see).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pdeds import distributed
from pdeds.errors import PdedsError
from pdeds.optim.kfac_layers import LayerHelper, supported

INNER_OPTIMIZERS = ("sgd", "adam")


@dataclass
class KFACConfig:
    """The ``optim.kfac`` section (``optim.lr``, ``momentum``, ``betas``, ``eps`` and
    ``weight_decay`` configure the inner update)."""

    damping: float = 1e-3
    """Tikhonov damping gamma: the step is (A (x) G + gamma I)^-1 applied to the gradient."""
    factor_decay: float = 0.95
    """Running-average weight xi: A <- xi A + (1 - xi) A_batch (the same for G)."""
    factor_update_steps: int = 1
    """Recompute A, G (forward/backward hooks run) every this many optimizer steps."""
    inv_update_steps: int = 10
    """Recompute the eigendecompositions of A, G every this many optimizer steps."""
    kl_clip: float = 1e-3
    """KL-clip: scale preconditioned gradients by min(1, sqrt(kl_clip / (lr^2 sum <V, g>)));
    0 disables it."""
    inner: str = "sgd"
    """Update applied to the preconditioned gradient: "sgd" (heavy ball, optim.momentum) or
    "adam" (optim.betas, optim.eps)."""


def build_kfac(model: nn.Module, cfg: Any) -> KFAC:
    """The K-FAC client optimizer for ``cfg`` (an ``OptimConfig`` with name "kfac")."""
    c: KFACConfig = cfg.kfac
    return KFAC(
        model,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        betas=(float(cfg.betas[0]), float(cfg.betas[1])),
        eps=cfg.eps,
        damping=c.damping,
        factor_decay=c.factor_decay,
        factor_update_steps=c.factor_update_steps,
        inv_update_steps=c.inv_update_steps,
        kl_clip=c.kl_clip,
        inner=c.inner,
    )


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


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. a checkpointed stage recomputing)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


class KFAC(torch.optim.Optimizer):
    """K-FAC preconditioning + SGD-momentum or Adam, as a torch optimizer.

    Args:
        model: the network; hooks are registered on its supported layers.
        lr, momentum, weight_decay, betas, eps: the inner update (weight decay is L2, added to
            the preconditioned gradient).
        damping, factor_decay, factor_update_steps, inv_update_steps, kl_clip, inner: see
            ``KFACConfig``.
    """

    needs_closure = False

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float = 1e-2,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        damping: float = 1e-3,
        factor_decay: float = 0.95,
        factor_update_steps: int = 1,
        inv_update_steps: int = 10,
        kl_clip: float = 1e-3,
        inner: str = "sgd",
    ) -> None:
        if inner not in INNER_OPTIMIZERS:
            raise PdedsError(f"optim.kfac.inner: {inner!r} is not one of {INNER_OPTIMIZERS}")
        params = [p for p in model.parameters() if p.requires_grad]
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            betas=betas,
            eps=eps,
            damping=damping,
            factor_decay=factor_decay,
            kl_clip=kl_clip,
        )
        super().__init__(params, defaults)
        self.inner = inner
        self.factor_update_steps = factor_update_steps
        self.inv_update_steps = inv_update_steps
        self.layers = [
            LayerHelper(name, m)
            for name, m in model.named_modules()
            if supported(m) and m.weight.requires_grad
        ]
        self.param_groups[0].setdefault("kfac_steps", 0)
        self._sums: dict[str, dict[str, Any]] = {}
        self._handles = [h.module.register_forward_hook(self._forward_hook(h)) for h in self.layers]

    @property
    def steps(self) -> int:
        """Optimizer steps taken (kept in the param group so checkpoints carry it)."""
        return int(self.param_groups[0]["kfac_steps"])

    @steps.setter
    def steps(self, value: int) -> None:
        self.param_groups[0]["kfac_steps"] = value

    # ---- statistics -----------------------------------------------------------------------

    def collecting(self) -> bool:
        """True on steps whose forward/backward passes feed the factors."""
        return self.steps % self.factor_update_steps == 0

    def _forward_hook(self, h: LayerHelper) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if (
                not self.collecting()
                or not torch.is_grad_enabled()
                or not isinstance(output, torch.Tensor)
                or not output.requires_grad
                or _in_backward()
            ):
                return
            with torch.no_grad():
                x = inputs[0].detach()
                dtype = _factor_dtype(x.dtype)
                a = h.patches(x.to(dtype), output.detach())
                a_outer = a.T @ a
            n = x.shape[0]

            def grad_hook(gy: torch.Tensor) -> None:
                with torch.no_grad():
                    g = h.output_rows(gy.detach().to(dtype))
                    acc = self._sums.setdefault(
                        h.name, {"A": 0.0, "G": 0.0, "samples": 0, "rows": 0}
                    )
                    acc["A"] = acc["A"] + a_outer
                    acc["G"] = acc["G"] + g.T @ g
                    acc["samples"] += n
                    acc["rows"] += g.shape[0]

            output.register_hook(grad_hook)

        return hook

    def reset_state(self) -> None:
        """Forget factors, eigenbases and inner moments; the next step rebuilds the factors.

        Used when the problem changes under the optimizer (e.g. a multigrid level switch: A sums
        over output locations, so it scales with the resolution)."""
        self.state.clear()
        self._sums = {}
        self.steps = 0

    def remove_hooks(self) -> None:
        """Detach K-FAC from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _state(self, h: LayerHelper) -> dict:
        return self.state[h.module.weight]

    def _update_factors(self) -> None:
        """Reduce this step's factor sums over ranks (one all-reduce) and update the averages."""
        xi = self.param_groups[0]["factor_decay"]
        chunks, counts = [], []
        dtype = _factor_dtype(self.layers[0].module.weight.dtype) if self.layers else None
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
            chunks += [(acc["G"] * float(n_r) ** 2).reshape(-1), acc["A"].reshape(-1)]
            counts += [float(n_r), float(acc["rows"])]
        if not chunks:
            return
        flat = torch.cat(chunks + [torch.tensor(counts, dtype=dtype, device=chunks[0].device)])
        flat = distributed.all_reduce_sum(flat)
        offset = 0
        total = flat[-len(counts) :].tolist()
        for i, h in enumerate(self.layers):
            g_sum = flat[offset : offset + h.g_dim**2].view(h.g_dim, h.g_dim)
            offset += h.g_dim**2
            a_sum = flat[offset : offset + h.a_dim**2].view(h.a_dim, h.a_dim)
            offset += h.a_dim**2
            samples, rows = total[2 * i], total[2 * i + 1]
            if samples == 0:
                continue
            a_batch, g_batch = a_sum / samples, g_sum / rows
            st = self._state(h)
            if "A" not in st:
                st["A"], st["G"] = a_batch.clone(), g_batch.clone()
            else:
                st["A"].mul_(xi).add_(a_batch, alpha=1 - xi)
                st["G"].mul_(xi).add_(g_batch, alpha=1 - xi)
        self._sums = {}

    def _update_eigen(self) -> None:
        """Eigendecompose every factor on its assigned rank; share results in one all-reduce."""
        items = [(h, key) for h in self.layers if "A" in self._state(h) for key in ("A", "G")]
        if not items:
            return
        sizes = [self._state(h)[key].shape[0] for h, key in items]
        owner = assign_inversions(sizes, distributed.world_size())
        me = distributed.rank()
        ref = self._state(items[0][0])["A"]
        flat = ref.new_zeros(sum(n * n + n for n in sizes))
        offset = 0
        for (h, key), n, r in zip(items, sizes, owner, strict=True):
            if r == me:
                evals, evecs = torch.linalg.eigh(self._state(h)[key].double())
                flat[offset : offset + n] = evals.clamp_min(0.0).to(flat.dtype)
                flat[offset + n : offset + n + n * n] = evecs.reshape(-1).to(flat.dtype)
            offset += n + n * n
        flat = distributed.all_reduce_sum(flat)
        offset = 0
        for (h, key), n in zip(items, sizes, strict=True):
            st = self._state(h)
            st["eval_" + key] = flat[offset : offset + n].clone()
            st["evec_" + key] = flat[offset + n : offset + n + n * n].view(n, n).clone()
            offset += n + n * n

    # ---- preconditioning ------------------------------------------------------------------

    @torch.no_grad()
    def precondition(self) -> None:
        """Replace each K-FAC layer's gradient by its KL-clipped preconditioned gradient.

        Refreshes factors / eigenbases first when this step is due for it.
        """
        self._check_params()
        if self.collecting():
            self._update_factors()
        if self.steps % self.inv_update_steps == 0:
            self._update_eigen()
        group = self.param_groups[0]
        gamma, lr, kl_clip = group["damping"], group["lr"], group["kl_clip"]
        updates: list[tuple[LayerHelper, torch.Tensor]] = []
        vg = 0.0
        for h in self.layers:
            st = self._state(h)
            if "evec_A" not in st or h.module.weight.grad is None:
                continue
            qa, qg, la, lg = st["evec_A"], st["evec_G"], st["eval_A"], st["eval_G"]
            grad = h.grad_matrix().to(qa.dtype)
            v = qg.T @ grad @ qa
            v = v / (lg[:, None] * la[None, :] + gamma)
            v = qg @ v @ qa.T
            vg += float((v * grad).sum())
            updates.append((h, v))
        nu = 1.0
        if kl_clip > 0 and vg * lr**2 > 0:
            nu = min(1.0, math.sqrt(kl_clip / (vg * lr**2)))
        for h, v in updates:
            h.set_grad_matrix(v * nu)

    def _check_params(self) -> None:
        held = {id(p) for p in self.param_groups[0]["params"]}
        for h in self.layers:
            if any(id(p) not in held for p in h.params()):
                raise PdedsError(
                    "K-FAC no longer holds the model's parameters (a ZeRO stage >= 1 or fp16/bf16 "
                    "wrapper replaced them); use zero_optimization.stage 0 and fp32"
                )

    # ---- the step -------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Precondition the gradients, then apply the inner update; returns closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.precondition()
        if self.inner == "sgd":
            self._sgd()
        else:
            self._adam()
        self.steps += 1
        return loss

    def _sgd(self) -> None:
        group = self.param_groups[0]
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            d = p.grad.add(p, alpha=wd) if wd else p.grad
            st = self.state[p]
            if mu:
                buf = st.get("momentum_buffer")
                if buf is None:
                    buf = st["momentum_buffer"] = d.clone()
                else:
                    buf.mul_(mu).add_(d)
                d = buf
            p.add_(d, alpha=-lr)

    def _adam(self) -> None:
        group = self.param_groups[0]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        b1, b2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            d = p.grad.add(p, alpha=wd) if wd else p.grad
            st = self.state[p]
            if "exp_avg" not in st:
                st["adam_step"] = 0
                st["exp_avg"] = torch.zeros_like(p)
                st["exp_avg_sq"] = torch.zeros_like(p)
            st["adam_step"] += 1
            k = st["adam_step"]
            st["exp_avg"].mul_(b1).add_(d, alpha=1 - b1)
            st["exp_avg_sq"].mul_(b2).addcmul_(d, d, value=1 - b2)
            m_hat = st["exp_avg"] / (1 - b1**k)
            v_hat = st["exp_avg_sq"] / (1 - b2**k)
            p.addcdiv_(m_hat, v_hat.sqrt().add_(eps), value=-lr)


def _factor_dtype(dtype: torch.dtype) -> torch.dtype:
    """Factors accumulate in at least float32."""
    return torch.promote_types(dtype, torch.float32)
