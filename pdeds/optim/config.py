"""The experiment's ``optim:`` section and its validation (the one place optimizer keys are
checked).

``OptimConfig`` holds the keys every optimizer shares and one sub-section per optimizer that has
its own (``lbfgs:``, ``kfac:``); ``validate`` names the first bad key and its fix. Which
optimizer runs under which DeepSpeed settings is ``pdeds.optim.compat``'s business.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdeds.errors import PdedsError
from pdeds.optim.factory import OPTIMIZERS
from pdeds.optim.first_order import FIRST_ORDER
from pdeds.optim.gauss_newton import GaussNewtonConfig
from pdeds.optim.gauss_newton import validate as validate_gauss_newton
from pdeds.optim.kfac_factors import DAMPING_MODES, FACTOR_AVERAGES
from pdeds.optim.lbfgs import LINE_SEARCHES, LBFGSConfig
from pdeds.optim.switch import validate as validate_switch

KFAC_INNER = ("sgd", "adam", "adamw")
"""Torch optimizers K-FAC can precondition (``optim.kfac.inner``)."""

KFAC_CURVATURE = ("empirical", "ggn")
"""Whose second moment K-FAC's output factor G is (``optim.kfac.curvature``): the loss
gradient's (empirical Fisher) or the loss's Gauss-Newton matrix, sampled (``KFACConfig``)."""

KFAC_PRECONDITION = ("backward", "step")
"""Where K-FAC preconditions (``optim.kfac.precondition``): each rank's local gradient during
backward, with the factors of earlier steps (ZeRO 0-2), or the reduced gradient in ``step()``,
with this step's factors (ZeRO 0 only; the K-FAC of before issue 13)."""


@dataclass
class KFACConfig:
    """The ``optim.kfac`` section (``optim.lr``, ``momentum``, ``betas``, ``eps`` and
    ``weight_decay`` configure the inner torch optimizer)."""

    inner: str = "adam"
    """Torch optimizer that steps on the preconditioned gradient: sgd | adam | adamw."""
    damping: float = 3e-2
    """Tikhonov damping: the step is (A (x) G + gamma I)^-1 applied to the gradient, gamma set
    by ``damping_mode`` from this number."""
    damping_mode: str = "relative"
    """"relative": gamma_l = damping * (tr A_l / dim A_l)(tr G_l / dim G_l), a fraction of the
    layer's mean curvature, so it does not depend on the loss's scale or the resolution (A sums
    over output locations); "absolute": gamma = damping for every layer (the default before
    relative damping: absolute 1e-3 with factor_decay 0.95)."""
    factor_decay: float = 0.99
    """Running-average weight xi: A <- xi A + (1 - xi) A_batch (the same for G); 0.99 at one
    update per 10 steps averages over the last ~1000 steps (sampled factors are noisy: 0.95 was
    slower to Adam's error at 2-D 128^2, analysis/bench_optim.py)."""
    factor_average: str = "ema"
    """"ema": the first update's factors, then A <- xi A + (1 - xi) A_batch (the first batch
    keeps a weight of 1 / (1 - xi) updates: a preconditioner that stays near its first
    estimate); "mean": the weight min(xi, k / (k + 1)) at the k-th update after the first, the
    plain mean of the updates until the average spans 1 / (1 - xi) of them (Martens & Grosse
    2015). Measured (analysis/bench_optim.py, 300 s caps, Zen 5): at 3-D 32^3 the two are within
    noise (time to Adam's final error 0.26 vs 0.28 of Adam's at batch 8, 0.37 vs 0.38 at 64);
    at 2-D 64^2 "mean" is slower at batch 64 (0.38 vs 0.28); earlier, worse at 2-D 128^2."""
    factor_update_steps: int = 10
    """Recompute A, G (forward/backward hooks run) every this many optimizer steps."""
    inv_update_steps: int = 50
    """Recompute the eigendecompositions of A, G every this many optimizer steps."""
    factor_locations: int = 512
    """Output locations per sample each layer's factors are estimated from, drawn at random
    from the seed and the step (the same on every rank); 0 = every location."""
    factor_samples: int = 16
    """Samples of each factor step's global batch the factors come from: every rank's first
    ceil(factor_samples / (ranks x micro-batch)) micro-batches (at least one), that is the
    batch's first samples, the same ones for any rank count whose ranks x micro-batch divides
    it; 0 = the whole batch. A factor step then costs about one micro-batch more at any batch
    size (batch 64 in 8 micro-batches: a factor step of all 64 costs 2x a step)."""
    max_factor_dim: int = 512
    """Precondition only layers whose factors A, G are at most this size (a 3^3 convolution
    with C inputs has A of 27 C + 1); larger layers keep their plain gradient. Their A costs
    (27 C)^3 to decompose and is estimated from few rows where they run on coarse grids.
    0 = every supported layer."""
    warmup_steps: int = 5
    """First-order steps (the inner optimizer alone) while the factors warm up; the first
    eigendecomposition follows them. 0 = precondition from the first step."""
    kl_clip: float = 1e-3
    """KL-clip: scale the step by min(1, sqrt(kl_clip / (lr^2 sum <V, g>))); 0 disables it."""
    precondition: str = "backward"
    """"backward": each rank's local gradient, before DeepSpeed reduces it, with the factors of
    earlier steps (ZeRO 0-2); "step": the reduced gradient in step() with this step's factors
    (ZeRO 0 only)."""
    curvature: str = "empirical"
    """"empirical": G from the loss gradient at each layer's output (it vanishes as the loss
    reaches its minimum); "ggn": G from the loss's own curvature, J^T (w K) J with K the
    stiffness, sampled by one extra forward/backward of the batch on factor steps with
    cotangents v ~ N(0, w K) (``KFACPreconditioner.collect_curvature``)."""
    seed: int = 0
    """Seed of the factor location (and curvature cotangent) draws."""


@dataclass
class OptimConfig:
    """The experiment's ``optim:`` section."""

    name: str = "adam"
    """Optimizer: one of ``pdeds.optim.factory.OPTIMIZERS`` (adam | adamw | sgd | lbfgs | kfac |
    gauss_newton)."""
    lr: float = 1e-3
    """Learning rate. L-BFGS: the first trial step of each line search (use 1: the quasi-Newton
    step; the very first iteration tries lr * min(1, 1/|g|_1)). K-FAC: the inner update's rate."""
    weight_decay: float = 0.0
    """L2 penalty (Adam, SGD, K-FAC inner) or decoupled decay (AdamW); not used by L-BFGS."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam moment decay rates (beta1, beta2)."""
    eps: float = 1e-8
    """Adam denominator guard."""
    momentum: float = 0.9
    """SGD heavy-ball momentum (also K-FAC's inner SGD)."""
    lbfgs: LBFGSConfig = field(default_factory=LBFGSConfig)
    """L-BFGS settings, used when name == "lbfgs"."""
    kfac: KFACConfig = field(default_factory=KFACConfig)
    """K-FAC settings, used when name == "kfac"."""
    gauss_newton: GaussNewtonConfig = field(default_factory=GaussNewtonConfig)
    """Gauss-Newton settings, used when name == "gauss_newton" (``pdeds.optim.gauss_newton``)."""
    switch_after: int = 0
    """Steps of a first-order phase (optimizer ``first`` at ``first_lr``) before ``name`` takes
    over (``pdeds.optim.switch``); 0 = no first phase."""
    first: str = "adam"
    """The first phase's optimizer: adam | adamw | sgd (with switch_after > 0)."""
    first_lr: float = 1e-3
    """The first phase's learning rate (``lr`` is the second phase's)."""

    def validate(self) -> None:
        """Raise PdedsError naming the first bad key and its fix."""
        if self.name not in OPTIMIZERS:
            raise PdedsError(f"optim.name: {self.name!r} is not one of {', '.join(OPTIMIZERS)}")
        _positive("optim.lr", self.lr)
        _at_least("optim.weight_decay", self.weight_decay, 0.0)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise PdedsError(f"optim.betas: {self.betas!r} must be two numbers in [0, 1)")
        _positive("optim.eps", self.eps)
        if not 0.0 <= self.momentum < 1.0:
            raise PdedsError(f"optim.momentum: {self.momentum} must lie in [0, 1)")
        if self.name == "lbfgs" and self.weight_decay > 0:
            raise PdedsError(
                "optim.weight_decay is not used by L-BFGS; set it to 0 (optim.lbfgs.damping adds "
                "curvature instead)"
            )
        validate_lbfgs(self.lbfgs)
        validate_kfac(self.kfac)
        validate_gauss_newton(self.gauss_newton)
        validate_switch(self, FIRST_ORDER)


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise PdedsError(f"{key}: {value} must be > 0; set a positive number")


def _at_least(key: str, value: float, low: float) -> None:
    if not value >= low:
        raise PdedsError(f"{key}: {value} must be >= {low}")


def _integer_at_least(key: str, value: int, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise PdedsError(f"{key}: {value!r} must be an integer >= {low}")


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise PdedsError(f"{key}: {value!r} is not one of {', '.join(choices)}")


def validate_lbfgs(c: LBFGSConfig) -> None:
    """Check the ``optim.lbfgs`` section."""
    _integer_at_least("optim.lbfgs.history_size", c.history_size, 1)
    _integer_at_least("optim.lbfgs.max_iter", c.max_iter, 1)
    _integer_at_least("optim.lbfgs.max_evals", c.max_evals, 2)
    _integer_at_least("optim.lbfgs.hold_steps", c.hold_steps, 0)
    _one_of("optim.lbfgs.line_search", c.line_search, LINE_SEARCHES)
    _at_least("optim.lbfgs.damping", c.damping, 0.0)
    if not 0.0 < c.wolfe_c1 < c.wolfe_c2 < 1.0:
        raise PdedsError(
            f"optim.lbfgs.wolfe_c1, wolfe_c2: {c.wolfe_c1}, {c.wolfe_c2} must satisfy "
            "0 < c1 < c2 < 1 (e.g. 1e-4 and 0.9)"
        )
    _at_least("optim.lbfgs.tolerance_grad", c.tolerance_grad, 0.0)
    _at_least("optim.lbfgs.tolerance_change", c.tolerance_change, 0.0)


def validate_kfac(c: KFACConfig) -> None:
    """Check the ``optim.kfac`` section."""
    _positive("optim.kfac.damping", c.damping)
    if not 0.0 <= c.factor_decay < 1.0:
        raise PdedsError(f"optim.kfac.factor_decay: {c.factor_decay} must lie in [0, 1)")
    _integer_at_least("optim.kfac.factor_update_steps", c.factor_update_steps, 1)
    _integer_at_least("optim.kfac.inv_update_steps", c.inv_update_steps, 1)
    _integer_at_least("optim.kfac.factor_locations", c.factor_locations, 0)
    _integer_at_least("optim.kfac.factor_samples", c.factor_samples, 0)
    _integer_at_least("optim.kfac.max_factor_dim", c.max_factor_dim, 0)
    _integer_at_least("optim.kfac.warmup_steps", c.warmup_steps, 0)
    _integer_at_least("optim.kfac.seed", c.seed, 0)
    _at_least("optim.kfac.kl_clip", c.kl_clip, 0.0)
    _one_of("optim.kfac.inner", c.inner, KFAC_INNER)
    _one_of("optim.kfac.precondition", c.precondition, KFAC_PRECONDITION)
    _one_of("optim.kfac.curvature", c.curvature, KFAC_CURVATURE)
    _one_of("optim.kfac.damping_mode", c.damping_mode, DAMPING_MODES)
    _one_of("optim.kfac.factor_average", c.factor_average, FACTOR_AVERAGES)
