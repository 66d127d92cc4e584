"""K-FAC: factors against explicitly unfolded patches (all and sampled locations), the
Gauss-Newton factors against the assembled curvature, the damped Kronecker inverse, the
backward-hook preconditioning against the explicit one, ranks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pdeds import distributed
from pdeds.optim.kfac import KFACPreconditioner, assign_inversions
from pdeds.optim.kfac_layers import LayerHelper
from pdeds.testing.distributed import run_ranks

F64 = torch.float64


def _conv_patch(x: torch.Tensor, m: nn.Conv3d, t: tuple[int, ...]) -> torch.Tensor:
    """a_t for every sample from the definition y[o,t] = sum_{i,k} W[o,i,k] x_pad[i, t s + k dl]."""
    xp = nn.functional.pad(x, [p for p in reversed(m.padding) for _ in range(2)])
    cols = []
    for k in itertools.product(*(range(kk) for kk in m.kernel_size)):
        idx = tuple(tj * s + kj * dl for tj, kj, s, dl in zip(t, k, m.stride, m.dilation))
        cols.append(xp[(slice(None), slice(None)) + idx])  # (N, C)
    return torch.stack(cols, dim=-1).reshape(x.shape[0], -1)  # (N, C * K), ordered (i, k)


def _transpose_patch(x: torch.Tensor, m: nn.ConvTranspose3d, t: tuple[int, ...]) -> torch.Tensor:
    """a_t from y[o,t] = sum_{i,k} W[i,o,k] x[i,u] over t = u s - p + k dl (0 if no such u)."""
    cols = []
    for k in itertools.product(*(range(kk) for kk in m.kernel_size)):
        u = []
        for tj, kj, s, p, dl, n in zip(t, k, m.stride, m.padding, m.dilation, x.shape[2:]):
            q = tj + p - kj * dl
            u.append(q // s if q % s == 0 and 0 <= q // s < n else None)
        if None in u:
            cols.append(x.new_zeros(x.shape[:2]))
        else:
            cols.append(x[(slice(None), slice(None)) + tuple(u)])
    return torch.stack(cols, dim=-1).reshape(x.shape[0], -1)


def _explicit_factors(layer: nn.Module, x: torch.Tensor, c: torch.Tensor, where=None):
    """A and G of the loss mean_n J_n, J_n = 1/2 sum c y_n^2 (so Ds_n = c y_n), by loops over
    the flat output locations ``where`` (all if None; A's sum scaled by T / L)."""
    y = layer(x).detach()
    ds = c * y
    n, spatial = x.shape[0], y.shape[2:]
    patch = _transpose_patch if isinstance(layer, nn.ConvTranspose3d) else _conv_patch
    grid = list(itertools.product(*(range(s) for s in spatial)))
    picked = grid if where is None else [grid[i] for i in where]
    a_sum, g_sum = 0.0, 0.0
    for t in picked:
        a = torch.cat([patch(x, layer, t), torch.ones(n, 1, dtype=x.dtype)], dim=1)
        g = ds[(slice(None), slice(None)) + t]
        a_sum = a_sum + a.T @ a
        g_sum = g_sum + g.T @ g
    return a_sum * len(grid) / (len(picked) * n), g_sum / (n * len(picked))


LAYERS = {
    "conv3d": lambda: nn.Conv3d(2, 3, 3, padding=1),
    "conv3d_strided_dilated": lambda: nn.Conv3d(2, 3, 3, stride=2, padding=2, dilation=2),
    "conv_transpose3d": lambda: nn.ConvTranspose3d(2, 3, 2, stride=2),
    "conv_transpose3d_padded": lambda: nn.ConvTranspose3d(
        2, 3, 3, stride=2, padding=1, output_padding=1
    ),
}


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_factors_equal_explicit_patch_expectations(kind):
    torch.manual_seed(0)
    layer = LAYERS[kind]().to(F64)
    x = torch.randn(3, 2, 4, 3, 5, dtype=F64)
    c = torch.rand_like(layer(x)[:1]) + 0.5
    for locations in (0, 7):
        pre = KFACPreconditioner(layer, damping=1e-3, factor_locations=locations, seed=3)
        loss = (0.5 * c * layer(x) ** 2).flatten(1).sum(1).mean()
        loss.backward()
        where = pre._locations(0, layer(x))
        assert (where is None) == (locations == 0)
        pre.precondition_reduced(lr=0.1)
        pre.remove_hooks()
        layer.zero_grad()
        where = None if where is None else where.tolist()
        a_ref, g_ref = _explicit_factors(layer, x, c, where)
        st = pre.factors[""]
        torch.testing.assert_close(st["A"], a_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(st["G"], g_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["absolute", "relative"])
@pytest.mark.parametrize("kind", ["conv3d", "conv_transpose3d"])
def test_preconditioned_gradient_is_the_damped_kronecker_inverse(kind, mode):
    """(G (x) A + gamma I)^-1 grad by a dense solve; relative: gamma = damping * the layer's
    mean eigenvalue product, (tr A / dim A)(tr G / dim G), from the factors themselves."""
    torch.manual_seed(1)
    layer = LAYERS[kind]().to(F64)
    x = torch.randn(2, 2, 4, 4, 2, dtype=F64)
    damping = 0.05
    pre = KFACPreconditioner(layer, damping=damping, damping_mode=mode)
    (layer(x) ** 3).mean().backward()
    helper = LayerHelper("layer", layer)
    grad = helper.grad_matrix().clone()
    pre.precondition_reduced(lr=0.1)
    st = pre.factors[""]
    gamma = damping
    if mode == "relative":
        mean_a = torch.trace(st["A"]) / st["A"].shape[0]
        mean_g = torch.trace(st["G"]) / st["G"].shape[0]
        gamma = damping * float(mean_a * mean_g)
        assert abs(gamma / damping - 1) > 0.1  # the test distinguishes the two modes
    fisher = torch.kron(st["G"], st["A"]) + gamma * torch.eye(grad.numel(), dtype=F64)
    expected = torch.linalg.solve(fisher, grad.reshape(-1)).reshape(grad.shape)
    torch.testing.assert_close(helper.grad_matrix(), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("average", ["mean", "ema"])
def test_factor_average_is_the_mean_of_the_updates_then_an_ema(average):
    """factor_average mean: after k updates (xi = 0.99) A and G are the plain means of the k
    batches' explicit factors; ema: the first batch's weight is xi^(k-1), the others' (1 - xi)."""
    torch.manual_seed(5)
    layer = nn.Conv3d(2, 3, 3, padding=1).to(F64)
    c = torch.rand(1, 3, 3, 4, 3, dtype=F64) + 0.5
    pre = KFACPreconditioner(layer, factor_decay=0.99, factor_average=average)
    refs = []
    for _ in range(3):
        x = torch.randn(2, 2, 3, 4, 3, dtype=F64)
        (0.5 * c * layer(x) ** 2).flatten(1).sum(1).mean().backward()
        pre.precondition_reduced(lr=0.1)
        layer.zero_grad()
        refs.append(_explicit_factors(layer, x, c))
    if average == "mean":
        weights = [1 / 3] * 3
    else:
        weights = [0.99**2, 0.01 * 0.99, 0.01]
    for i, key in enumerate("AG"):
        want = sum(w * r[i] for w, r in zip(weights, refs, strict=True))
        torch.testing.assert_close(pre.factors[""][key], want, rtol=1e-12, atol=1e-12)


def test_relative_damping_does_not_depend_on_the_loss_scale():
    """Loss c J: G and the gradient scale by c^2 and c, so with gamma relative to the factors
    the preconditioned gradient is V / c for every c; a fixed gamma changes its direction."""
    torch.manual_seed(4)
    layer = nn.Conv3d(2, 3, 3, padding=1).to(F64)
    x = torch.randn(2, 2, 3, 4, 3, dtype=F64)
    helper = LayerHelper("layer", layer)
    for mode in ("relative", "absolute"):
        scaled = []
        for c in (1.0, 1e3):
            pre = KFACPreconditioner(layer, damping=0.05, damping_mode=mode)
            (c * (layer(x) ** 3).mean()).backward()
            pre.precondition_reduced(lr=0.1)
            scaled.append(c * helper.grad_matrix())
            pre.remove_hooks()
            layer.zero_grad()
        if mode == "relative":
            torch.testing.assert_close(scaled[1], scaled[0], rtol=1e-9, atol=0)
        else:
            assert not torch.allclose(scaled[1], scaled[0], rtol=1e-2)


def test_checkpointed_recomputation_is_not_counted_twice():
    torch.manual_seed(2)
    layer = nn.Conv3d(1, 2, 3, padding=1).to(F64)
    x = torch.randn(2, 1, 3, 3, 3, dtype=F64)
    factors = []
    for recompute in (False, True):
        pre = KFACPreconditioner(layer)
        y = checkpoint(layer, x, use_reentrant=False) if recompute else layer(x)
        (y**2).mean().backward()
        pre.precondition_reduced(lr=0.1)
        factors.append((pre.factors[""]["A"], pre.factors[""]["G"]))
        pre.remove_hooks()
        layer.zero_grad()
    torch.testing.assert_close(factors[0], factors[1], rtol=0, atol=0)


@pytest.mark.parametrize("recompute", [False, True])
def test_backward_hook_preconditions_each_micro_batch_like_the_explicit_inverse(recompute):
    """With fixed factors, the gradients accumulated from hook-preconditioned micro-batches are
    P of the plain accumulated gradient (P linear), also through a checkpointed layer."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv3d(1, 3, 3, padding=1), nn.Tanh(), nn.ConvTranspose3d(3, 2, 2, 2))
    net = net.to(F64)
    xs = torch.randn(2, 2, 1, 3, 3, 3, dtype=F64).unbind(0)

    def accumulate() -> list[torch.Tensor]:
        net.zero_grad()
        for x in xs:
            y = checkpoint(net, x, use_reentrant=False) if recompute else net(x)
            (y**3).mean().backward()
        return [p.grad.clone() for p in net.parameters()]

    pre = KFACPreconditioner(net, damping=0.1, precondition="backward", warmup_steps=1)
    accumulate()
    pre._after_step(None, (), {})  # factors and eigenbases from that step
    preconditioned = accumulate()
    pre.remove_hooks()
    plain = accumulate()
    for p, g in zip(net.parameters(), plain, strict=True):
        p.grad = g
    for h in pre.layers:
        h.set_grad_matrix(pre._apply(h, h.grad_matrix()))
    for got, p in zip(preconditioned, net.parameters(), strict=True):
        torch.testing.assert_close(got, p.grad, rtol=1e-10, atol=1e-14)


def test_inversions_are_assigned_greedily_by_cost():
    assert assign_inversions([10, 2, 8, 8, 3], 2) == [0, 1, 1, 1, 0]
    assert assign_inversions([5, 5, 5], 1) == [0, 0, 0]


# ---- 2 ranks vs 1 ---------------------------------------------------------------------------

BATCH, MICRO = 8, 2


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1), nn.Tanh(),
        nn.Conv3d(4, 4, 2, stride=2), nn.Tanh(),
        nn.ConvTranspose3d(4, 2, 2, stride=2), nn.Tanh(),
        nn.Conv3d(2, 1, 1),
    ).to(F64)  # fmt: skip


def _kfac_steps(
    steps: int = 2, where: str = "step", hooks: bool = True, samples: int = 0
) -> list[list[float]]:
    """This rank's share of a fixed batch, micro-batch j of rank r its slice
    [(j W + r) m, (j W + r + 1) m) as the trainer splits it; gradients averaged like
    DeepSpeed's. Returns the preconditioned gradients and the factors of each step."""
    world, rank = distributed.world_size(), distributed.rank()
    model = _net()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(BATCH, 1, 4, 4, 4, generator=gen, dtype=F64)
    target = torch.sin(2 * x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    pre = KFACPreconditioner(
        model,
        damping=1e-2,
        factor_decay=0.5,
        precondition=where,
        warmup_steps=int(where == "backward"),
        factor_locations=5,
        factor_samples=samples,
        kl_clip=1e-3,
        hook_gradients=hooks,
    )
    pre.attach(opt)
    rounds = BATCH // (world * MICRO)
    starts = [(j * world + rank) * MICRO for j in range(rounds)]
    mine = [slice(s, s + MICRO) for s in starts]
    out = []
    for _ in range(steps):
        opt.zero_grad()
        for sl in mine:
            loss = ((model(x[sl]) - target[sl]) ** 2).flatten(1).sum(1).mean() / rounds
            loss.backward()
        for p in model.parameters():
            distributed.all_reduce_sum(p.grad).div_(world)
        opt.step()
        grads = [p.grad.reshape(-1) for p in model.parameters()]
        factors = [st[k].reshape(-1) for st in pre.factors.values() for k in "AG"]
        out.append(torch.cat(grads + factors).tolist())
    return out


@pytest.mark.parametrize(
    "where, hooks, samples",
    [("step", True, 0), ("backward", True, 0), ("backward", False, 0), ("backward", True, 4)],
)
def test_preconditioned_gradients_on_two_ranks_equal_one_rank(where, hooks, samples):
    """Also with factors from the batch's first 4 samples: 2 of 1 rank's 4 micro-batches, the
    first of each of 2 ranks' 2."""
    one = _kfac_steps(3, where, hooks, samples)
    two = run_ranks(_kfac_steps, 2, 3, where, hooks, samples, timeout=180)
    assert two[0] == two[1]  # bitwise: every rank holds the same shared eigenbases
    for step_one, step_two in zip(one, two[0], strict=True):
        np.testing.assert_allclose(step_two, step_one, rtol=1e-9, atol=1e-13)


def test_once_per_step_equals_the_micro_batch_hooks():
    """ZeRO 0's P of the reduced gradient in step() is the hooks' per-micro-batch P (P linear,
    the same factors), KL-clip included, to round-off."""
    hooked = _kfac_steps(3, "backward", hooks=True)
    once = _kfac_steps(3, "backward", hooks=False)
    np.testing.assert_allclose(once, hooked, rtol=1e-10, atol=1e-14)


def test_factor_samples_take_the_first_micro_batches():
    """factor_samples 4 of a batch of 8 in micro-batches of 2: the factors (A, G per sample,
    G from Ds = N_r x the hooked gradient of the step's mean loss) are those of a step on the
    first 4 samples alone; a step on all 8 gives others."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 1, 4, 4, 4, generator=gen, dtype=F64)

    def factors(samples: int, batch: int) -> list[torch.Tensor]:
        model = _net()
        pre = KFACPreconditioner(model, factor_samples=samples, factor_decay=0.0)
        parts = x[:batch].split(MICRO)
        for xi in parts:
            (model(xi) ** 2).flatten(1).sum(1).mean().div(len(parts)).backward()
        pre.precondition_reduced(lr=0.1)
        assert pre._collected_samples == min(samples or batch, batch)
        return [st[k] for st in pre.factors.values() for k in "AG"]

    for got, want in zip(factors(4, 8), factors(0, 4), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert any(not torch.allclose(a, b) for a, b in zip(factors(0, 8), factors(0, 4), strict=True))


def test_gauss_newton_factors_average_to_the_loss_curvature():
    """curvature ggn: G from output cotangents v_b ~ N(0, w_b K_b) averages to the Gauss-Newton
    factor 1/(N T) sum_{n,t} (dU_n/ds_t)^T w_n K_n (dU_n/ds_t), with K_n the assembled stiffness
    (``reference.assemble``) and dU/ds from unit cotangents; A is the plain patch factor."""
    from pdeds.physics import reference
    from pdeds.train.step import lifting_energy, output_curvature

    model = _net()
    gen = torch.Generator().manual_seed(2)
    nu = torch.exp(0.5 * torch.randn(2, 1, 4, 4, 4, generator=gen, dtype=F64))

    class Loss:
        @staticmethod
        def curvature(idx):
            return output_curvature(nu[torch.as_tensor(idx)], 0.0, "lifting")

    pre = KFACPreconditioner(model, factor_decay=0.0, curvature="ggn")
    draws = 200  # measured at 600: rel errors 0.002-0.024
    for k in range(draws):
        pre.seed, pre.factor_decay = k, k / (k + 1)  # the running mean of the draws' factors
        pre.collect_curvature(model, [np.array([0, 1])], Loss)
        pre._update_factors()
    # exact: dU/ds of every layer output by unit cotangents at the output nodes
    outs: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda m_, i, o, n=n: outs.__setitem__(n, o))
        for n, m in model.named_modules()
        if n in pre.factors
    ]
    u = model(nu)
    for h in hooks:
        h.remove()
    w = 1.0 / lifting_energy(nu, 0.0)
    names, ys = list(outs), list(outs.values())
    g_exact = {name: 0.0 for name in names}
    for n in range(2):
        K = w[n] * torch.from_numpy(reference.assemble(nu[n, 0].numpy())[0].toarray())
        jac: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        for i in range(u[n].numel()):
            e = torch.zeros_like(u)
            e[n].view(-1)[i] = 1.0
            for name, gy in zip(names, torch.autograd.grad(u, ys, e, retain_graph=True)):
                jac[name].append(gy[n].reshape(gy.shape[1], -1))  # (C, T)
        for name in names:
            j = torch.stack(jac[name])  # (nodes, C, T)
            g_exact[name] = g_exact[name] + torch.einsum("ict,ij,jdt->cd", j, K, j)
    for name, y in outs.items():
        g_exact[name] = g_exact[name] / (2 * y[0, 0].numel())
        g_mc = pre.factors[name]["G"]
        err = torch.linalg.norm(g_mc - g_exact[name]) / torch.linalg.norm(g_exact[name])
        assert err < 0.15, (name, float(err))


# ---- through the trainer: ZeRO 0, 1, 2 on 2 ranks vs 1 -------------------------------------

KFAC_TRAIN = [
    "optim.name=kfac",
    "optim.lr=3e-3",
    "optim.kfac.warmup_steps=1",
    "optim.kfac.factor_update_steps=1",
    "optim.kfac.inv_update_steps=2",
    "optim.kfac.factor_locations=64",
    "optim.kfac.kl_clip=1e-6",
    "train.steps=4",
]
"""Preconditioned from step 2, an eigen refresh at step 3, sampled locations, a binding KL-clip."""


def test_two_ranks_equal_one_rank_under_zero_0_1_2(tmp_path):
    """Hook preconditioning of each rank's local gradient before DeepSpeed reduces (ZeRO 0 with
    gradient clipping) or partitions (ZeRO 1/2) it, and the once-per-step P of the reduced
    gradient (ZeRO 0), reproduce the 1-rank run of the same path (METHOD.md sec. 6). The two
    paths are the same step up to round-off, which Adam's first steps amplify in near-zero
    gradient entries (``test_once_per_step_equals_the_micro_batch_hooks`` checks them in f64)."""
    from trainer_util import train_cases

    hooks = [*KFAC_TRAIN, "deepspeed.config=ds_configs/zero1.json"]
    ggn = [*hooks, "optim.kfac.curvature=ggn"]
    refs = [("once", KFAC_TRAIN), ("hooks", hooks), ("ggn", ggn)]
    one = run_ranks(train_cases, 1, str(tmp_path / "one"), refs, timeout=240)[0]
    cases = [
        (f"zero{s}", KFAC_TRAIN + [f"deepspeed.config=ds_configs/zero{s}.json"]) for s in (0, 1, 2)
    ]
    cases.append(("ggn_zero1", ggn))
    two = run_ranks(train_cases, 2, str(tmp_path / "two"), cases, timeout=400)[0]
    against = {"zero0": "once", "zero1": "hooks", "zero2": "hooks", "ggn_zero1": "ggn"}
    for name, _ in cases:
        ref = one[against[name]]
        assert ref["losses"][4] < ref["losses"][1]
        got = two[name]
        assert got["losses"].keys() == ref["losses"].keys(), name
        for step, loss in ref["losses"].items():
            assert got["losses"][step] == pytest.approx(loss, rel=1e-5), (name, step)
        for key, w in ref["weights"].items():
            torch.testing.assert_close(got["weights"][key], w, rtol=1e-4, atol=1e-6, msg=key)
    for step, loss in one["once"]["losses"].items():  # the two paths: one step
        assert one["hooks"]["losses"][step] == pytest.approx(loss, rel=1e-5), step


def test_defaults_lower_the_loss_from_the_first_steps(tmp_path):
    """optim.name: kfac and nothing else (before issue 13, 5 steps raised the quickstart loss
    from 1.000 to 1.344): every step's loss is below the first, also once preconditioning
    starts after the warm-up (step 6), and the last is the lowest."""
    from trainer_util import train_cases

    # one held batch (the 4 training samples), so that the losses of the steps compare; the
    # optim defaults (TINY sets lr 1e-4 for SGD)
    defaults = ["optim.name=kfac", "optim.lr=1e-3", "data.train_samples=4", "train.steps=10"]
    cases = [("defaults", defaults), ("ggn", [*defaults, "optim.kfac.curvature=ggn"])]
    runs = run_ranks(train_cases, 1, str(tmp_path), cases, timeout=240)[0]
    for name, _ in cases:
        losses = runs[name]["losses"]
        first = losses[1]
        assert all(loss < first for step, loss in losses.items() if step > 1), (name, losses)
        assert losses[10] == min(losses.values()), (name, losses)
