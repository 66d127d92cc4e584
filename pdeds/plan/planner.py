"""``make_plan``: the memory plan of a resolved experiment on given hardware.

Per rank, at every level of the schedule (resolution n and micro-batch b as the trainer derives
them for the world size: ``pdeds.config.visits_for``), M(n, b) = S + B + A(n, b) must not
exceed the usable device memory; the largest micro-batch is the largest b that does not. The
host must hold the offloaded states. If the run does not fit, ``advice.Search`` says what to
change.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pdeds.dsconfig import DeepSpeedView
from pdeds.errors import PdedsError
from pdeds.machine import GiB
from pdeds.plan.measure import StepCheck
from pdeds.plan.states import ModelStates, count_params, model_states, optimizer_bytes
from pdeds.plan.symbolic import Activations, Variant

LIMITS = {"--gpus": 1024, "--nodes": 100_000, "--gpu-mem": 2.0**20, "--host-mem": 2.0**20}
"""Largest accepted values (devices per node, nodes, GiB = 1 PiB): beyond them a plan means
nothing."""
FRESH_CAP = 1 << 16
"""The largest micro-batch reported for a fresh stream (data.train_samples: 0), which has no
training-set size to cap it."""


@dataclass(frozen=True)
class Hardware:
    """Where the run goes: ``nodes`` x ``gpus_per_node`` ranks."""

    gpus_per_node: int = 1
    nodes: int = 1
    gpu_mem_gib: float = 80.0
    """Memory of one device (GiB); for CPU ranks, the memory one rank may use."""
    host_mem_gib: float | None = None
    """Host memory per node (GiB); None = not checked."""
    reserve: float = 0.1
    """Fraction of device memory kept free for the CUDA context, kernel workspaces (no op's
    output, so not in A) and fragmentation."""

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def usable_bytes(self) -> float:
        """gpu_mem_gib x 2^30 x (1 - reserve)."""
        return self.gpu_mem_gib * GiB * (1.0 - self.reserve)

    def validate(self) -> None:
        """Raise PdedsError naming the bad flag, its range and an example."""
        for flag, v, eg in (("--gpus", self.gpus_per_node, 8), ("--nodes", self.nodes, 2)):
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= LIMITS[flag]:
                raise PdedsError(
                    f"{flag}: must be an integer from 1 to {LIMITS[flag]:,}, got {v!r}; "
                    f"e.g. {flag} {eg}"
                )
        for flag, x in (("--gpu-mem", self.gpu_mem_gib), ("--host-mem", self.host_mem_gib)):
            if x is not None and not (math.isfinite(x) and 0 < x <= LIMITS[flag]):
                raise PdedsError(
                    f"{flag}: must be a positive number of GiB up to {LIMITS[flag]:,.0f} "
                    f"(1 PiB), got {x:g}; e.g. {flag} 80"
                )
        if not 0.0 <= self.reserve < 1.0:
            raise PdedsError(f"--reserve: must lie in [0, 1), got {self.reserve}; e.g. 0.1")


@dataclass
class LevelPlan:
    """One level of the schedule at its micro-batch."""

    level: int
    res: int
    batch: int
    """Global batch of the level."""
    micro_batch: int
    activations: float
    """A(n, b): the step's peak above the model states (network, loss, transient gradients)."""
    device_total: float
    """M(n, b) = S + B + A(n, b)."""
    fits: bool
    max_micro_batch: int
    """The largest b with M(n, b) <= usable (0: not even 1), at most data.train_samples (no
    micro-batch holds more distinct samples; FRESH_CAP for a fresh stream)."""


@dataclass
class Plan:
    """The answer of ``pdeds plan``."""

    config: str
    hardware: Hardware
    ds: DeepSpeedView
    optimizer: str
    parameters: int
    largest_layer: int
    variant: Variant
    states: ModelStates
    levels: list[LevelPlan]
    recommendations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    check: StepCheck | None = None
    """A real step against the symbolic figure (``pdeds plan`` measures one)."""

    @property
    def device_fits(self) -> bool:
        return all(lv.fits for lv in self.levels)

    @property
    def host_fits(self) -> bool | None:
        if self.hardware.host_mem_gib is None:
            return None
        return self.states.host_total <= self.hardware.host_mem_gib * GiB

    @property
    def fits(self) -> bool:
        return self.device_fits and self.host_fits is not False


def schedule_levels(resolved: Any, world: int) -> list[Any]:
    """The first visit of every level, coarsest first, with the batch sizes the trainer derives
    for ``world`` ranks (so it refuses what the trainer refuses, with the same message)."""
    from pdeds.config import visits_for

    first: dict[int, Any] = {}
    from pdeds.train.data import batch_problem

    visits = visits_for(resolved, world)
    why = batch_problem(resolved.cfg, resolved.cfg.data.train_samples, [v.batch for v in visits])
    if why is not None:
        raise PdedsError(why)
    for visit in visits:
        first.setdefault(visit.level, visit)
    return [first[level] for level in sorted(first)]


def model_size(cfg: Any) -> tuple[int, int, tuple[float, float]]:
    """(P, L, optimizer bytes) of experiment ``cfg``'s network, built uninitialised."""
    import torch

    from pdeds.models import build_model

    with torch.device("meta"):
        model = build_model(cfg.problem.dim, cfg.model)
    model = model.to_empty(device="cpu")  # distinct storages: DeepSpeed dedupes by data_ptr
    return (*count_params(model), optimizer_bytes(cfg.optim, model))


def make_plan(
    resolved: Any,
    hardware: Hardware,
    *,
    config_name: str = "",
    say: Callable[[str], None] | None = None,
) -> Plan:
    """The memory plan of a resolved experiment (``pdeds.config.resolve``) on ``hardware``.

    Args:
        config_name: what the table calls the experiment.
        say: progress lines (``pdeds plan`` prints them to stderr).
    """
    from pdeds.plan.advice import Search, plan_notes

    hardware.validate()
    cfg, view = resolved.cfg, resolved.view
    visits = schedule_levels(resolved, hardware.world)
    acts = Activations.of(cfg)
    params, largest, opt = model_size(cfg)
    states = model_states(params, largest, view, opt, hardware.gpus_per_node, hardware.nodes)
    variant = Variant(view.dtype, cfg.model.checkpoint)
    if say is not None:
        at = ", ".join(str(v.res) for v in visits)
        say(f"executing a {variant} training step symbolically at n = {at}")
    room, cap = hardware.usable_bytes - states.device_total, cfg.data.train_samples or FRESH_CAP
    levels = []
    for v in visits:
        a = acts.peak(variant, v.res, v.micro_batch)
        largest_mb = acts.largest(variant, v.res, v.micro_batch, room, cap)
        total = states.device_total + a
        fits = total <= hardware.usable_bytes
        levels.append(LevelPlan(v.level, v.res, v.batch, v.micro_batch, a, total, fits, largest_mb))
    plan = Plan(
        config=config_name or "(experiment)",
        hardware=hardware,
        ds=view,
        optimizer=cfg.optim.name,
        parameters=params,
        largest_layer=largest,
        variant=variant,
        states=states,
        levels=levels,
    )
    if not plan.fits:
        plan.recommendations = Search(resolved, hardware, acts, (params, largest, opt)).run()
    plan.notes = plan_notes(plan, cfg)
    return plan
