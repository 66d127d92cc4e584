"""The training loop, in torchtitan's shape: ``train_step`` -> ``train``.

Launch (the same module under every launcher):

    pdeds train launch/configs/quickstart.yaml --run-dir runs/qs       # 1 process
    launch/local 2 launch/configs/quickstart.yaml --run-dir runs/qs2   # deepspeed, 2 ranks
    torchrun --nproc_per_node 2 -m pdeds train CONFIG --run-dir DIR
    pdeds train CONFIG --run-dir DIR --time-limit 4m                   # then --resume auto

``preflight`` decides what needs no engine (batch sizes, training samples, visits, run
directory, checkpoint to resume) into a ``RunSetup``: the launchers run it once for N ranks
(``--check-only``) and every rank builds its ``Trainer`` from it, so the two cannot disagree.
A step's loss is the mean energy over the global batch (``pdeds.train.step``, METHOD.md sec. 3
and 6); its learning rate comes from the LR scheduler (``pdeds.train.lr``); when to stop from
the clock (``pdeds.train.clock``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pdeds import __version__, distributed
from pdeds.config import Resolved, dump_yaml, visits_for
from pdeds.errors import PdedsError
from pdeds.models.unet import build_model, count_parameters
from pdeds.multigrid import Visit, samples_seen, visit_at
from pdeds.optim import client_optimizer
from pdeds.train import checkpoint, lr, reshard, rundir, runlock
from pdeds.train.clock import StopRequest, TrainClock, fmt_duration
from pdeds.train.data import (
    batch_problem,
    split_global_batch,
    training_coeffs,
    training_memory_problem,
    training_samples,
)
from pdeds.train.engine import build_engine, device, init_distributed
from pdeds.train.evaluate import evaluate, held_out_memory_problem, load_held_out
from pdeds.train.hook import LevelHook
from pdeds.train.monitor import Monitor, peak_memory_mb
from pdeds.train.reshard import Reshard
from pdeds.train.step import Phases, train_step


@dataclass(frozen=True)
class RunSetup:
    """A run as decided before any engine exists (what ``preflight`` returns)."""

    res: Resolved
    run_dir: Path
    world: int
    batch: tuple[int, int, int]
    """(global batch, micro-batch per rank, accumulation steps) for ``world`` ranks."""
    coeffs: np.ndarray | None
    """The fixed training set; None for a fresh stream (data.train_samples: 0)."""
    visits: list[Visit]
    config_text: str
    """The resolved config as config.yaml holds it."""
    checkpoint: Path | None
    """The complete checkpoint to resume from (the newest one that loads)."""
    damaged: list[tuple[Path, str]] = field(default_factory=list)
    """Newer complete checkpoints that do not load, and why (kept, marked by ``train``)."""
    reshard: Reshard | None = None
    """Set when the checkpoint was written by another rank count."""

    @property
    def total_steps(self) -> int:
        return self.visits[-1].end

    @property
    def steps_text(self) -> str:
        """ "N steps", or the visits' shares of the time budget for a time-budgeted schedule."""
        if self.visits[-1].until_s is None:
            return f"{self.total_steps} steps"
        return (
            "steps set by the time budget ("
            + ", ".join(f"{v.res}: {v.until_s:.0f} s" for v in self.visits)
            + ")"
        )

    def describe(self) -> str:
        """One line: ranks, batch, samples, visits, steps, where it starts."""
        g, mb, acc = self.batch
        samples = "fresh" if self.coeffs is None else str(len(self.coeffs))
        start = f"resumes from {self.checkpoint}" if self.checkpoint else "starts at step 0"
        return (
            f"{self.world} rank(s), global batch {g} = {mb} x {acc} x {self.world}, {samples} "
            f"training samples, {len(self.visits)} visit(s), {self.steps_text}; "
            f"{self.run_dir} {start}" + (f" ({self.reshard.describe()})" if self.reshard else "")
        )


def preflight(
    res: Resolved,
    run_dir: Path,
    world: int,
    *,
    resume: str | None = None,
    force: bool = False,
    memory: bool = True,
    check_lock: bool = True,
) -> RunSetup:
    """Everything ``train`` checks before an engine exists, for ``world`` ranks, leaving
    ``run_dir`` untouched: batch sizes, training data, the visit plan, the LR scheduler's name,
    the run directory, (with ``memory``) whether rank 0 can solve the held-out references, and
    the checkpoint to resume (the newest that loads); with ``check_lock`` also that no other
    process holds the run directory's lock and that it can be written. Launchers run it once
    (``pdeds train --check-only --ranks N``) so that a bad input is one error before N ranks
    start, not N errors after."""
    batch = res.view.batch_sizes(world)
    why = training_memory_problem(res.cfg)
    if why is not None:
        raise PdedsError(why)
    coeffs = training_coeffs(res.cfg)
    samples = 0 if coeffs is None else len(coeffs)
    visits = visits_for(res, world, samples)
    why = batch_problem(res.cfg, samples, [v.batch for v in visits])
    if why is not None:
        raise PdedsError(why)
    if res.view.scheduler is not None:
        lr.scheduler_class(res.view.scheduler)
    config_text = dump_yaml(res.cfg)
    why = rundir.verdict(run_dir, config_text, resume, force, check_lock=check_lock)
    if why is None and memory:
        why = held_out_memory_problem(res.cfg, run_dir / "cache")
    if why is not None:
        raise PdedsError(why)
    ckpt, damaged = checkpoint.resolve_resume(run_dir, resume)
    moved = reshard.plan(ckpt, world, res.view.stage, res.cfg.optim.name)
    return RunSetup(res, run_dir, world, batch, coeffs, visits, config_text, ckpt, damaged, moved)


def train(
    res: Resolved,
    run_dir: Path,
    *,
    resume: str | None = None,
    force: bool = False,
    now: Callable[[], float] = time.perf_counter,
) -> dict:
    """Train, evaluate and checkpoint one experiment on this rank; returns the summary (also
    summary.json). ``now`` is the training clock's time source."""
    _, world = init_distributed()
    lock = runlock.acquire(run_dir)  # rank 0 holds it until the run ends, however it ends
    try:
        # Memory readings differ between ranks that are already running: the launchers' check
        # says it.
        setup = preflight(
            res, run_dir, world, resume=resume, force=force, memory=world == 1, check_lock=False
        )
        rundir.prepare(run_dir, setup.config_text, resume, force)
        checkpoint.mark_damaged(setup.damaged, run_dir / "checkpoints", setup.checkpoint)
        return Trainer(setup, now=now).train()
    finally:
        lock.release()


@dataclass
class StepStats:
    """What one optimizer step did."""

    step: int
    """Steps done after it."""
    loss: float
    lr: float
    seconds: float
    evaluations: int
    """Global-batch evaluations (L-BFGS line search: several; else 1)."""
    visit: Visit
    phases: dict[str, float] = field(default_factory=dict)
    """Wall seconds of data / forward / energy (summed over micro-batches and evaluations)."""

    def row(self) -> dict[str, Any]:
        """Its part of a metrics.jsonl row."""
        v, p = self.visit, self.phases
        return {
            "step": self.step,
            "loss": self.loss,
            "lr": self.lr,
            "samples_per_s": v.batch / self.seconds,
            "level": v.level,
            "res": v.res,
            "batch": v.batch,
            "micro_batch": v.micro_batch,
            "visit": v.index,
            "evaluations": self.evaluations,
            "time_step_s": self.seconds,
            **{f"time_{k}_s": p.get(k, 0.0) for k in ("data", "forward", "energy")},
            "time_backward_optimizer_s": self.seconds - sum(p.values()),
        }


class Trainer:
    """One rank's run: engine, samples, level hook, LR schedule, clock and monitor.

    Args:
        setup: what ``preflight`` decided.
        engine: an engine to train instead of building one (a test passes a fake).
        now: the clock's time source in seconds (a test passes a fake).
    """

    def __init__(self, setup: RunSetup, *, engine: Any = None, now=time.perf_counter) -> None:
        cfg = self.cfg = setup.res.cfg
        self.setup, self.total = setup, setup.total_steps
        self.t_start = time.perf_counter()
        self.rank, self.device = distributed.rank(), device()
        self.clock = TrainClock(cfg.train.time_limit_s, now=now)
        if engine is None:
            engine, self.parameters = self._build_engine()
        else:
            self.parameters = count_parameters(engine.module)
        self.engine = engine
        self.stream, self.data = training_samples(cfg, setup.coeffs, self.device)
        keep = cfg.schedule.optimizer_state
        self.hook = LevelHook(setup.visits, engine, optimizer_state=keep, on_switch=self._announce)
        # L-BFGS is not stochastic: it keeps one global batch for hold_steps steps (0 = forever).
        self.hold = cfg.optim.lbfgs.hold_steps if cfg.optim.name == "lbfgs" else 1
        self.start = 0
        if setup.checkpoint is not None:
            self.load_state_dict(checkpoint.load(self.engine, self._checkpoint_to_load()))
        self.monitor = Monitor(
            setup.run_dir,
            enabled=self.rank == 0,
            total_steps=self.total if setup.visits[-1].until_s is None else None,
            start_step=self.start,
        )
        eval_res = cfg.train.eval_res or cfg.problem.res
        self.held_out = load_held_out(cfg, eval_res, setup.run_dir / "cache")
        self.scores: dict[str, float] = {}
        self.evaluated_at: int | None = None

    def _checkpoint_to_load(self) -> Path:
        """The checkpoint folder, or its universal form when the rank count changed."""
        ckpt, moved = self.setup.checkpoint, self.setup.reshard
        assert ckpt is not None
        return reshard.universal(ckpt) if moved is not None and moved.universal else ckpt

    def _build_engine(self) -> tuple[Any, int]:
        """The model (seeded by train.seed) in a DeepSpeed engine with the run's LR scheduler,
        and its parameter count; rank 0 writes config.yaml and the DeepSpeed JSON as used."""
        cfg, setup = self.cfg, self.setup
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.problem.dim, cfg.model).to(self.device)
        n_params = count_parameters(model)  # before ZeRO-3 partitions them away
        sched = partial(lr.build_scheduler, cfg.train, setup.visits, setup.res.ds, clock=self.clock)
        ds = setup.res.ds
        if setup.reshard is not None and setup.reshard.universal:
            ds = {**ds, "checkpoint": {**ds.get("checkpoint", {}), "load_universal": True}}
        engine, ds_used = build_engine(model, cfg, ds, lr_scheduler=sched)
        if self.rank == 0:
            (setup.run_dir / "config.yaml").write_text(setup.config_text)
            (setup.run_dir / "ds_config.json").write_text(json.dumps(ds_used, indent=2))
        return engine, n_params

    def state_dict(self, step: int) -> dict[str, Any]:
        """What a checkpoint keeps besides the engine: schedule position and clock."""
        return {
            "schedule": self.hook.state_dict(step),
            "samples_seen": samples_seen(self.setup.visits, step),
            **self.clock.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after ``state`` (a checkpoint's): its step and clock, this run's LR."""
        self.start = int(state["step"])
        self.clock.load_state_dict(state)
        self.hook.load_state_dict(state.get("schedule", {}))
        self.engine.lr_scheduler.seek(self.start)  # over the lr of the checkpoint's optimizer

    def train_step(self, step: int) -> StepStats:
        """Optimizer step ``step`` (0-based) on its global batch of the sample stream."""
        v = self.hook.before_step(step)
        position = v.stream_position(step, self.hold)
        ids = self.stream.indices(position, v.batch)
        micro = split_global_batch(ids, v.micro_batch, self.setup.world, self.rank)
        rate, phases = self.engine.optimizer.param_groups[0]["lr"], Phases()
        f, weighting = self.cfg.problem.f, self.cfg.train.loss_weighting
        t0 = self.clock.now()
        key = (v.index, v.res, position)
        loss = train_step(
            self.engine,
            self.data,
            micro,
            res=v.res,
            f=f,
            weighting=weighting,
            phases=phases,
            batch_key=key,
        )
        seconds = self.clock.now() - t0
        evals = getattr(client_optimizer(self.engine), "evaluations_last_step", 1)
        self.clock.step_done(evals * v.batch)
        if not math.isfinite(loss):
            last = checkpoint.latest(self.setup.run_dir / "checkpoints")
            raise PdedsError(
                f"non-finite loss ({loss}) at step {step + 1}; stopped without saving. The last "
                f"good checkpoint is {last or 'none'}; lower optim.lr and --resume from it"
            )
        return StepStats(step + 1, loss, rate, seconds, evals, v, phases.wall)

    def log(self, stats: StepStats) -> None:
        """A metrics row every train.log_every steps and at the end, and the progress line."""
        step, v = stats.step, stats.visit
        if step % self.cfg.train.log_every and step != self.total:
            return
        memory = {"peak_memory_mb": peak_memory_mb(self.device)}
        self.monitor.log({**stats.row(), **self._counters(step), **memory})
        eta = self.clock.eta(self.total - step)
        self.monitor.progress(step, stats.loss, v.batch / stats.seconds, v.level, v.res, eta)

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out scores after ``step`` steps, logged with TensorBoard slices on rank 0; the
        time it takes is not training time."""
        ho, batch = self.held_out, max(1, self.setup.batch[1])
        with self.clock.paused():
            self.engine.eval()
            scores = evaluate(self.engine, ho, self.cfg.problem.f, batch, self.device)
            if self.rank == 0:
                with torch.no_grad():
                    pred = self.engine(ho.nu[:1].float().to(self.device)).cpu()
                self.monitor.images(step, ho.nu[0], pred[0], ho.u_ref[0])
            self.engine.train()
        v = visit_at(self.setup.visits, max(step - 1, 0))
        self.monitor.log(
            {"step": step, "level": v.level, "res": v.res, **self._counters(step), **scores}
        )
        self.monitor.say(
            f"eval step {step}: val rel-L2 mean {scores['val_rel_l2_mean']:.4g} "
            f"max {scores['val_rel_l2_max']:.4g}, energy gap {scores['val_energy_gap']:.3g} "
            f"(lifting baseline rel-L2 {scores['baseline_rel_l2_mean']:.4g})"
        )
        self.scores, self.evaluated_at = scores, step
        return scores

    def _counters(self, step: int) -> dict[str, float]:
        """Training time, samples drawn and sample evaluations after ``step`` steps."""
        return {
            "train_s": self.clock.train_s,
            "samples": samples_seen(self.setup.visits, step),
            "samples_evaluated": self.clock.evaluated,
        }

    def eval_due(self, step: int) -> bool:
        """Every train.eval_every steps and at the end of every visit of a multigrid schedule,
        short of the end (the final evaluation follows the loop)."""
        every = self.cfg.train.eval_every
        visit_end = len(self.setup.visits) > 1 and self.hook.visit_ends_after(step - 1)
        return bool((every and step % every == 0) or visit_end) and step != self.total

    def maybe_save(self, step: int, stopping: bool) -> None:
        """Checkpoint on a stop, at the end, and every train.checkpoint_every steps."""
        every = self.cfg.train.checkpoint_every
        if stopping or step == self.total or (every and step % every == 0):
            root = self.setup.run_dir / "checkpoints"
            keep = self.cfg.train.keep_checkpoints
            checkpoint.save(self.engine, root, step, self.state_dict(step), keep)

    def train(self) -> dict[str, Any]:
        """Steps until the schedule ends, the time budget is spent or a signal arrives; then a
        checkpoint, the final evaluation (not after a signal) and summary.json."""
        self._announce_run()
        step, stop, t_loop = self.start, StopRequest(), time.perf_counter()
        try:
            stopped = stop.agreed(self.clock)  # a resumed run may have spent its budget
            self.engine.train()
            self.clock.start()
            while step < self.total and stopped is None:
                stats = self.train_step(step)
                step = stats.step
                self.log(stats)
                if self.eval_due(step):
                    self.evaluate(step)
                stopped = stop.agreed(self.clock)
                closed = self.hook.maybe_close(step, self.clock.agreed_s)
                if closed and stopped is None and self.evaluated_at != step:
                    self.evaluate(step)  # a time-budgeted visit ended: as at any visit's end
                self.maybe_save(step, stopping=stopped is not None)
            self._announce_stop(step, stopped)
            if (step == self.total or stopped == "time_limit") and self.evaluated_at != step:
                self.evaluate(step)
        finally:
            stop.restore()
            self.monitor.close()
        return self._summary(step, stopped, time.perf_counter() - t_loop)

    def _summary(self, step: int, stopped: str | None, loop_s: float) -> dict[str, Any]:
        """summary.json (rank 0 writes it); ``loop_s``: wall time of this session's loop."""
        summary = {
            "steps": step,
            "total_steps": self.total,
            "completed": step == self.total,
            "stopped": stopped,
            "world_size": self.setup.world,
            "wall_s": time.perf_counter() - self.t_start,
            "train_s": loop_s,
            "samples_seen": samples_seen(self.setup.visits, step),
            "train_time_s": self.clock.train_s,
            "parameters": self.parameters,
            "peak_memory_mb": peak_memory_mb(self.device),
            **self.scores,
        }
        if self.rank == 0:
            (self.setup.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _announce_run(self) -> None:
        setup, cfg = self.setup, self.cfg
        samples = "fresh" if setup.coeffs is None else f"{len(setup.coeffs)}"
        limit, ckpt = cfg.train.time_limit_s, setup.checkpoint
        self.monitor.say(
            f"pdeds {__version__}: {setup.world} rank(s), {self.parameters:,} parameters, "
            f"{samples} training samples, {len(setup.visits)} visit(s), {setup.steps_text}"
            + (f", time limit {fmt_duration(limit)}" if limit else "")
            + (f", resumed at step {self.start} from {ckpt}" if ckpt else "")
        )
        if setup.reshard is not None:
            self.monitor.say(setup.reshard.describe())
        g = setup.batch[0]
        if self.hold == 0 and setup.coeffs is not None and g < len(setup.coeffs):
            self.monitor.say(
                f"note: L-BFGS holds one global batch of {g} of the {len(setup.coeffs)} training "
                "samples for the whole run (optim.lbfgs.hold_steps: 0); set ds.train_batch_size "
                f"to {len(setup.coeffs)} for full-batch L-BFGS or lbfgs.hold_steps > 0 to move on"
            )

    def _announce(self, v: Visit) -> None:
        span = f"{v.steps} steps" if v.until_s is None else f"until {v.until_s:.0f} s of training"
        self.monitor.say(
            f"visit {v.index}: level {v.level} res {v.res} for {span} "
            f"(batch {v.batch}, micro-batch {v.micro_batch}, lr x{v.lr_scale:g})"
        )

    def _announce_stop(self, step: int, stopped: str | None) -> None:
        if stopped == "signal":
            self.monitor.say(
                f"stop requested: checkpoint saved at step {step}; resume with --resume auto"
            )
        elif stopped == "time_limit":
            spent, limit = fmt_duration(self.clock.train_s), fmt_duration(self.clock.limit_s)
            of = f"/{self.total}" if self.setup.visits[-1].until_s is None else ""
            self.monitor.say(
                f"stopped on time: time limit {limit} reached after {spent} of training at step "
                f"{step}{of}; checkpoint at step {step}; continue with --resume auto "
                "and a larger --time-limit"
            )
