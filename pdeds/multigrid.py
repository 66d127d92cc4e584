"""Multigrid resolution schedules (METHOD.md sec. 5).

Levels 0 (coarsest) .. L (finest) with resolutions N_l = N_L / 2^(L-l) by default. One
fully convolutional network trains at every level; a *visit* trains at one level for a budget
of steps, then hands the weights to the next visit. The visit orders:

    half-v : 0, 1, .., L
    V(l)   : l, V(l-1), l                 V(0) = 0
    W(l)   : l, W(l-1), W(l-1), l         W(0) = 0
    F(l)   : l, F(l-1), V(l-1), l         F(0) = 0
    custom : any explicit list of levels

with adjacent equal levels merged. ``plan`` turns a ``ScheduleConfig`` into the list of
``Visit`` (level, resolution, steps, batch sizes, LR scale) the training loop follows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from pdeds.errors import PdedsError

CYCLES = ("single", "half-v", "v", "w", "f", "custom")
OPTIMIZER_STATE = ("keep", "reset")


def _merge(seq: list[int]) -> list[int]:
    """Drop each level equal to its predecessor (adjacent visits at one level are one visit)."""
    return [x for i, x in enumerate(seq) if i == 0 or x != seq[i - 1]]


def _v(l: int) -> list[int]:
    return [0] if l == 0 else [l, *_v(l - 1), l]


def _w(l: int) -> list[int]:
    return [0] if l == 0 else [l, *_w(l - 1), *_w(l - 1), l]


def _f(l: int) -> list[int]:
    return [0] if l == 0 else [l, *_f(l - 1), *_v(l - 1), l]


def visits(cycle: str, levels: int | list[int]) -> list[int]:
    """Visit sequence of ``cycle`` over ``levels`` levels (level 0 coarsest), repeats merged.

    Args:
        cycle: "half-v", "v", "w", "f" or "single"; or "custom" with ``levels`` the explicit
            list of levels.
        levels: number of levels L + 1 (>= 1), or the explicit list for "custom".
    """
    if cycle == "custom":
        if (
            not isinstance(levels, list)
            or not levels
            or any(not isinstance(x, int) or x < 0 for x in levels)
        ):
            raise PdedsError(
                f"custom cycle needs a non-empty list of levels >= 0, got {levels!r}; "
                "e.g. schedule.custom: [2, 0, 1, 2]"
            )
        return _merge(list(levels))
    if cycle not in CYCLES:
        raise PdedsError(f"unknown cycle {cycle!r}; choose one of {', '.join(CYCLES)}")
    if not isinstance(levels, int) or isinstance(levels, bool) or levels < 1:
        raise PdedsError(f"the number of levels must be an integer >= 1, got {levels!r}")
    top = levels - 1
    if cycle == "single":
        return [top]
    seq = {"half-v": list(range(levels)), "v": _v(top), "w": _w(top), "f": _f(top)}[cycle]
    return _merge(seq)


@dataclass
class LevelConfig:
    """Per-level settings (list them coarsest first); unset keys keep the run's values."""

    micro_batch: int | None = None
    """Micro-batch per rank at this level (accumulation steps follow from ``batch``)."""
    batch: int | None = None
    """Global batch at this level (default: the DeepSpeed config's train_batch_size)."""
    lr_scale: float = 1.0
    """Learning-rate multiplier at this level."""
    steps: int | None = None
    """Steps of each visit at this level (absolute budget)."""
    epochs: float | None = None
    """Epochs of each visit at this level (absolute budget, steps = ceil(epochs * K / batch))."""
    time: float | None = None
    """Share of train.time_limit for each visit at this level (shares of all visits are
    normalised to the budget): the visit ends after the first step at which the run's training
    time passes its end, whatever the machine's speed."""


@dataclass
class ScheduleConfig:
    """The resolution schedule. ``cycle: single`` trains at problem.res only (the baseline)."""

    cycle: str = "single"
    """single | half-v | v | w | f | custom."""
    levels: int = 1
    """Number of levels L + 1 (ignored for single)."""
    resolutions: list[int] | None = None
    """Nodes per axis of each level, coarsest first; default problem.res / 2^(L-l)."""
    custom: list[int] | None = None
    """The explicit visit list for cycle: custom."""
    cycles: int = 1
    """How many times the cycle is run back to back."""
    coarse_factor: float = 1.0
    """Without absolute budgets, train.steps is shared over the visits with weight
    coarse_factor^(L - l) x 1 for a visit at level l: coarser levels get k x more steps."""
    level: list[LevelConfig] = field(default_factory=list)
    """Per-level overrides, coarsest first (empty, or one entry per level)."""
    optimizer_state: str = "keep"
    """At a level switch: keep the optimizer state, or reset it."""

    def n_levels(self) -> int:
        if self.cycle == "single":
            return 1
        if self.cycle == "custom":
            return max(self.custom or [0]) + 1
        return self.levels

    def resolutions_for(self, finest: int) -> list[int]:
        """Nodes per axis of every level, coarsest first."""
        n = self.n_levels()
        if self.resolutions is not None and self.cycle != "single":
            return list(self.resolutions)
        return [finest // 2 ** (n - 1 - l) for l in range(n)]

    def validate(self) -> None:
        if self.cycle not in CYCLES:
            raise PdedsError(f"schedule.cycle: {self.cycle!r} is not one of {', '.join(CYCLES)}")
        if self.cycle == "custom":
            visits("custom", self.custom)
        elif self.custom is not None:
            raise PdedsError(
                "schedule.custom: only used with cycle: custom; remove it or set cycle"
            )
        else:
            visits(self.cycle, self.levels)
        n = self.n_levels()
        if self.resolutions is not None and self.cycle != "single":
            if len(self.resolutions) != n:
                raise PdedsError(
                    f"schedule.resolutions: {len(self.resolutions)} values for {n} levels; "
                    "give one per level, coarsest first"
                )
            if any(b <= a for a, b in zip(self.resolutions, self.resolutions[1:])):
                raise PdedsError("schedule.resolutions: must increase from coarsest to finest")
        if self.cycles < 1:
            raise PdedsError(f"schedule.cycles: must be >= 1, got {self.cycles}")
        if not self.coarse_factor > 0:
            raise PdedsError(f"schedule.coarse_factor: must be > 0, got {self.coarse_factor}")
        if self.level and len(self.level) != n:
            raise PdedsError(
                f"schedule.level: {len(self.level)} entries for {n} levels; give one per level "
                "(coarsest first) or none"
            )
        absolute = [lv.steps is not None or lv.epochs is not None for lv in self.level]
        timed = [lv.time is not None for lv in self.level]
        if any(absolute) and not all(absolute) or any(timed) and not all(timed):
            raise PdedsError(
                "schedule.level: give every level a steps, epochs or time budget, or none of "
                "them (then train.steps is shared by coarse_factor)"
            )
        if any(absolute) and any(timed):
            raise PdedsError("schedule.level: give each level steps/epochs or time, not both")
        for i, lv in enumerate(self.level):
            if lv.steps is not None and lv.epochs is not None:
                raise PdedsError(f"schedule.level[{i}]: set steps or epochs, not both")
            for key in ("micro_batch", "batch", "steps"):
                v = getattr(lv, key)
                if v is not None and v < 1:
                    raise PdedsError(f"schedule.level[{i}].{key}: must be >= 1, got {v}")
            if lv.epochs is not None and not lv.epochs > 0:
                raise PdedsError(f"schedule.level[{i}].epochs: must be > 0, got {lv.epochs}")
            if lv.time is not None and not lv.time > 0:
                raise PdedsError(f"schedule.level[{i}].time: must be > 0, got {lv.time}")
            if not lv.lr_scale > 0:
                raise PdedsError(f"schedule.level[{i}].lr_scale: must be > 0, got {lv.lr_scale}")
        if self.optimizer_state not in OPTIMIZER_STATE:
            raise PdedsError(
                f"schedule.optimizer_state: {self.optimizer_state!r} is not one of keep, reset"
            )


@dataclass(frozen=True)
class Visit:
    """One stretch of training at one level."""

    index: int
    level: int
    res: int
    start: int
    """Global step at which the visit starts."""
    steps: int
    batch: int
    micro_batch: int
    lr_scale: float
    sample_offset: int
    """Position in the sample stream (samples consumed before this visit)."""
    until_s: float | None = None
    """A time-budgeted visit ends after the first step at which the run's training time passes
    this (``close``); its ``steps`` is OPEN until then."""

    @property
    def end(self) -> int:
        return self.start + self.steps

    def samples_after(self, step: int) -> int:
        """Stream samples drawn by the run's first ``step`` steps (``step`` in this visit):
        sample_offset + (step - start) x batch."""
        return self.sample_offset + (min(step, self.end) - self.start) * self.batch

    def stream_position(self, step: int, hold: int = 1) -> int:
        """First stream entry of global step ``step``'s batch. A batch is held for ``hold``
        steps (L-BFGS's ``hold_steps``; 0 = the visit's first batch for the whole visit):
        sample_offset + floor((step - start) / hold) x batch."""
        k = (step - self.start) // hold if hold > 0 else 0
        return self.sample_offset + k * self.batch


OPEN = 1 << 40
"""Steps of a time-budgeted visit that has not ended yet."""


def _share(total: int, weights: list[float]) -> list[int]:
    """Integers >= 1 proportional to ``weights`` summing to ``total`` (largest remainder)."""
    if total < len(weights):
        raise PdedsError(
            f"train.steps={total} is fewer than the {len(weights)} visits of the schedule; "
            f"raise train.steps to at least {len(weights)}"
        )
    s = sum(weights)
    raw = [total * w / s for w in weights]
    out = [max(1, math.floor(r)) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (out[i] - raw[i], i))
    i = 0
    while sum(out) < total:
        out[order[i % len(order)]] += 1
        i += 1
    while sum(out) > total:
        j = max((k for k in range(len(out)) if out[k] > 1), key=lambda k: out[k] - raw[k])
        out[j] -= 1
    return out


def plan(
    cfg: ScheduleConfig,
    *,
    finest_res: int,
    total_steps: int,
    samples: int,
    batch: int,
    micro_batch: int,
    world: int,
    time_limit_s: float | None = None,
) -> list[Visit]:
    """The visits of a run, in order, with their steps and batch sizes.

    Args:
        cfg: the validated schedule.
        finest_res: problem.res.
        total_steps: train.steps, shared over the visits unless levels carry absolute budgets.
        samples: training-set size K (for epoch budgets; a fresh stream has none: 0).
        batch, micro_batch: the DeepSpeed config's global and per-rank micro-batch.
        world: number of data-parallel ranks.
        time_limit_s: train.time_limit in seconds (needed by time-budgeted levels).
    """
    n = cfg.n_levels()
    seq = visits("custom", cfg.custom) if cfg.cycle == "custom" else visits(cfg.cycle, n)
    seq = _merge(seq * cfg.cycles)
    res = cfg.resolutions_for(finest_res)
    top = n - 1
    levels = cfg.level or [LevelConfig() for _ in range(n)]
    batches, micros = [], []
    for l, lv in enumerate(levels):
        b = lv.batch or batch
        m = lv.micro_batch or (micro_batch if lv.batch is None else None)
        if m is None:
            m = min(micro_batch, b // world) if b >= world else 1
        if b % (m * world):
            raise PdedsError(
                f"schedule.level[{l}]: global batch {b} is not divisible by micro-batch {m} x "
                f"{world} rank(s); change schedule.level[{l}].batch or .micro_batch"
            )
        batches.append(b)
        micros.append(m)
    ends: list[float | None] = [None] * len(seq)
    if cfg.level and levels[0].time is not None:
        if not time_limit_s:
            raise PdedsError(
                "schedule.level[].time: shares of the time budget need train.time_limit; set it "
                "(e.g. --time-limit 4m) or give the levels steps"
            )
        shares = [levels[l].time for l in seq]
        ends = [time_limit_s * sum(shares[: i + 1]) / sum(shares) for i in range(len(seq))]
        steps = [OPEN] * len(seq)
    elif cfg.level and (levels[0].steps is not None or levels[0].epochs is not None):
        steps = []
        for l in seq:
            lv = levels[l]
            steps.append(lv.steps or max(1, math.ceil(lv.epochs * samples / batches[l])))
    else:
        steps = _share(total_steps, [cfg.coarse_factor ** (top - l) for l in seq])
    out, start, offset = [], 0, 0
    for i, (l, s) in enumerate(zip(seq, steps)):
        out.append(
            Visit(
                index=i,
                level=l,
                res=res[l],
                start=start,
                steps=s,
                batch=batches[l],
                micro_batch=micros[l],
                lr_scale=levels[l].lr_scale,
                sample_offset=offset,
                until_s=ends[i],
            )
        )
        start += s
        offset += s * batches[l]
    return out


def close(visits_: list[Visit], index: int, step: int) -> list[Visit]:
    """The plan with visit ``index`` ended after global step ``step`` (its last step is
    step - 1) and the visits after it moved to follow: their starts and sample offsets."""
    out = list(visits_[:index])
    start, offset = visits_[index].start, visits_[index].sample_offset
    for v in visits_[index:]:
        steps = step - start if v.index == index else v.steps
        out.append(replace(v, start=start, steps=steps, sample_offset=offset))
        start, offset = start + steps, offset + steps * v.batch
    return out


def visit_at(visits_: list[Visit], step: int) -> Visit:
    """The visit that global step ``step`` belongs to (the last one past the end)."""
    for v in visits_:
        if step < v.end:
            return v
    return visits_[-1]


def samples_seen(visits_: list[Visit], step: int) -> int:
    """Training samples drawn by the first ``step`` steps of the run."""
    return visit_at(visits_, step).samples_after(step)
