"""The training loop: forward_backward (loss of a micro-batch) -> train_step -> train.

Launch (the same module under every launcher):

    pdeds train launch/configs/quickstart.yaml --run-dir runs/qs       # 1 process
    launch/local 2 launch/configs/quickstart.yaml --run-dir runs/qs2   # deepspeed, 2 ranks
    torchrun --nproc_per_node 2 -m pdeds train CONFIG --run-dir DIR

The loss of a step is the mean energy J_h(U_theta(nu_b)) over the global batch (METHOD.md
sec. 3 and 6): each micro-batch returns its mean, and DeepSpeed averages over accumulation steps
and ranks.
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pdeds import __version__, distributed
from pdeds.config import Resolved, batch_sizes, dump_yaml, visits_for
from pdeds.errors import PdedsError
from pdeds.models.unet import build_model, count_parameters
from pdeds.multigrid import Visit, visit_at
from pdeds.optim import client_optimizer, engine_step
from pdeds.train import checkpoint, rundir
from pdeds.train.data import SampleStream, TrainingSet, split_global_batch
from pdeds.train.engine import build_engine, device, init_distributed
from pdeds.train.evaluate import evaluate, held_out_memory_problem, load_held_out
from pdeds.train.hook import LevelHook
from pdeds.train.loss import micro_batch_loss
from pdeds.train.monitor import Monitor, peak_memory_mb


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop finishes the step, checkpoints and exits 0."""

    def __init__(self) -> None:
        self.flag = False
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.flag = True

    def agreed(self) -> bool:
        """True on every rank if any rank was signalled (one scalar all-reduce per step)."""
        t = distributed.all_reduce_max(torch.tensor([1.0 if self.flag else 0.0]))
        return bool(t.item() > 0)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def training_coeffs(res: Resolved) -> np.ndarray:
    """The training coefficient vectors: drawn with data.seed, or read from data.path."""
    cfg = res.cfg
    if cfg.data.path is not None:
        from pdeds.data.hdf5 import read_coefficients

        coeffs, meta = read_coefficients(cfg.data.path)
        if coeffs.shape[1] != cfg.problem.modes:
            raise PdedsError(
                f"data.path {cfg.data.path} holds {coeffs.shape[1]} modes but problem.modes is "
                f"{cfg.problem.modes}; make them agree"
            )
        return coeffs[: cfg.data.train_samples]
    from pdeds.physics.kl import sample_coefficients

    p = cfg.problem
    return sample_coefficients(cfg.data.train_samples, p.modes, cfg.data.seed, sobol=cfg.data.sobol)


def preflight(
    res: Resolved, run_dir: Path, world: int, *, resume: str | None = None, force: bool = False
) -> str:
    """What ``train`` checks before any rank builds an engine, for ``world`` ranks, leaving
    ``run_dir`` untouched: the batch sizes, the training data, the visit plan, the run directory,
    whether rank 0 can solve the held-out references, and the checkpoint to resume. Launchers
    run it once (``pdeds train --check-only --ranks N``) so that a bad input is one error before
    N ranks start, not N errors after. Returns a line describing the run."""
    g, mb, acc = batch_sizes(res.ds, world)
    coeffs = training_coeffs(res)
    visits = visits_for(res, world, len(coeffs))
    why = rundir.verdict(run_dir, dump_yaml(res.cfg), resume, force)
    why = why or held_out_memory_problem(res.cfg, run_dir / "cache")
    if why is not None:
        raise PdedsError(why)
    ckpt = checkpoint.resolve_resume(run_dir, resume)
    start = f"resumes from {ckpt}" if ckpt is not None else "starts at step 0"
    return (
        f"{world} rank(s), global batch {g} = {mb} x {acc} x {world}, {len(coeffs)} training "
        f"samples, {len(visits)} visit(s), {visits[-1].end} steps; {run_dir} {start}"
    )


def train(res: Resolved, run_dir: Path, *, resume: str | None = None, force: bool = False) -> dict:
    """Train, evaluate and checkpoint one experiment; returns the summary (also summary.json)."""
    t_start = time.perf_counter()
    cfg = res.cfg
    rank, world = init_distributed()
    dev = device()
    g, mb, _ = batch_sizes(res.ds, world)
    coeffs = training_coeffs(res)
    visits = visits_for(res, world, len(coeffs))
    if world == 1 and (why := held_out_memory_problem(cfg, run_dir / "cache")):
        raise PdedsError(why)  # with more ranks the launchers' check (preflight) says it
    config_text = dump_yaml(cfg)
    rundir.prepare(run_dir, config_text, resume, force)
    ckpt_path = checkpoint.resolve_resume(run_dir, resume)

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.problem.dim, cfg.model).to(dev)
    n_params = count_parameters(model)  # before ZeRO-3 partitions the parameters away
    engine, ds_used = build_engine(model, cfg, res.ds)
    if rank == 0:
        (run_dir / "config.yaml").write_text(config_text)
        (run_dir / "ds_config.json").write_text(json.dumps(ds_used, indent=2))

    start, clock = 0, {"train_s": 0.0, "evaluated": 0}
    if ckpt_path is not None:
        state = checkpoint.load(engine, ckpt_path)
        start = state["step"]
        clock.update(train_s=state.get("train_s", 0.0), evaluated=state.get("evaluated", 0))
    total = visits[-1].end
    mon = Monitor(run_dir, enabled=rank == 0, total_steps=total, start_step=start)
    mon.say(
        f"pdeds {__version__}: {world} rank(s), {n_params:,} parameters, "
        f"{len(coeffs)} training samples, {len(visits)} visit(s), {total} steps"
        + (f", resumed at step {start} from {ckpt_path}" if ckpt_path else "")
    )
    data = TrainingSet(coeffs, cfg.problem.dim, cfg.problem.eta, cfg.problem.family, dev)
    stream = SampleStream(len(coeffs), cfg.data.seed)
    held_out = load_held_out(cfg, cfg.train.eval_res or cfg.problem.res, run_dir / "cache")

    def on_switch(v: Visit) -> None:
        mon.say(
            f"visit {v.index}: level {v.level} res {v.res} for {v.steps} steps "
            f"(batch {v.batch}, micro-batch {v.micro_batch}, lr x{v.lr_scale:g})"
        )

    hook = LevelHook(
        visits,
        engine,
        optimizer_state=cfg.schedule.optimizer_state,
        on_switch=on_switch,
        base_lr=cfg.optim.lr,
        lr_factor=lambda s: cfg.train.lr_factor(s, total),
    )
    timers: dict[str, float] = {}

    def forward_backward_loss(idx: np.ndarray) -> torch.Tensor:
        """Mean energy of one micro-batch through the engine (the loss_fn of the protocol)."""
        t0 = time.perf_counter()
        nu = data.nu(idx, hook.current.res)
        t1 = time.perf_counter()
        u = engine(nu)
        t2 = time.perf_counter()
        loss = micro_batch_loss(u, nu, cfg.problem.f, cfg.train.loss_weighting)
        t3 = time.perf_counter()
        for k, dt in (("data", t1 - t0), ("forward", t2 - t1), ("energy", t3 - t2)):
            timers[k] = timers.get(k, 0.0) + dt
        return loss

    def run_eval(step: int) -> dict:
        engine.eval()
        scores = evaluate(engine, held_out, cfg.problem.f, max(1, mb), dev)
        if rank == 0:
            with torch.no_grad():
                pred = engine(held_out.nu[:1].float().to(dev)).cpu()
            mon.images(step, held_out.nu[0], pred[0], held_out.u_ref[0])
        engine.train()
        row = {
            "step": step,
            "level": hook.current.level,
            "res": hook.current.res,
            "train_s": clock["train_s"],
            "samples": samples_seen(step),
            "samples_evaluated": clock["evaluated"],
            **scores,
        }
        mon.log(row)
        mon.say(
            f"eval step {step}: val rel-L2 mean {scores['val_rel_l2_mean']:.4g} "
            f"max {scores['val_rel_l2_max']:.4g}, energy gap {scores['val_energy_gap']:.3g} "
            f"(lifting baseline rel-L2 {scores['baseline_rel_l2_mean']:.4g})"
        )
        return scores

    def save(step: int) -> None:
        checkpoint.save(
            engine,
            run_dir / "checkpoints",
            step,
            {
                "schedule": hook.state_dict(step),
                "samples_seen": samples_seen(step),
                "train_s": clock["train_s"],
                "evaluated": clock["evaluated"],
            },
            cfg.train.keep_checkpoints,
        )

    def samples_seen(step: int) -> int:
        """Training samples consumed by the first ``step`` steps."""
        v = visit_at(visits, step)
        return v.sample_offset + (min(step, v.end) - v.start) * v.batch

    # L-BFGS is not stochastic: it keeps one global batch for hold_steps steps (0 = forever).
    hold = cfg.optim.lbfgs.hold_steps if cfg.optim.name == "lbfgs" else 1
    if hold == 0 and g < len(coeffs):
        mon.say(
            f"note: L-BFGS holds one global batch of {g} of the {len(coeffs)} training samples "
            "for the whole run (optim.lbfgs.hold_steps: 0); set ds.train_batch_size to "
            f"{len(coeffs)} for full-batch L-BFGS or lbfgs.hold_steps > 0 to move on"
        )

    def stream_position(v: Visit, step: int) -> int:
        """First stream entry of ``step``'s global batch (held batches repeat a position)."""
        k = step - v.start
        return v.sample_offset + ((k // hold) if hold > 0 else 0) * v.batch

    stop = StopRequest()
    scores: dict = {}
    step = start
    t_loop = time.perf_counter()
    try:
        engine.train()
        while step < total:
            v = hook.before_step(step)
            timers.clear()
            t0 = time.perf_counter()
            idx = stream.indices(stream_position(v, step), v.batch)
            micro = split_global_batch(idx, v.micro_batch, world, rank)
            loss = engine_step(engine, micro, forward_backward_loss)
            dt = time.perf_counter() - t0
            evals = getattr(client_optimizer(engine), "evaluations_last_step", 1)
            clock["train_s"] += dt
            clock["evaluated"] += evals * v.batch
            if not math.isfinite(loss):
                last = checkpoint.latest(run_dir / "checkpoints")
                raise PdedsError(
                    f"non-finite loss ({loss}) at step {step + 1}; stopped without saving. "
                    f"The last "
                    f"good checkpoint is {last or 'none'}; lower optim.lr and --resume from it"
                )
            step += 1
            if step % cfg.train.log_every == 0 or step == total:
                lr = engine.optimizer.param_groups[0]["lr"]
                row = {
                    "step": step,
                    "loss": loss,
                    "lr": lr,
                    "samples_per_s": v.batch / dt,
                    "level": v.level,
                    "res": v.res,
                    "batch": v.batch,
                    "micro_batch": v.micro_batch,
                    "visit": v.index,
                    "train_s": clock["train_s"],
                    "samples": samples_seen(step),
                    "evaluations": evals,
                    "samples_evaluated": clock["evaluated"],
                    "time_step_s": dt,
                    "time_data_s": timers.get("data", 0.0),
                    "time_forward_s": timers.get("forward", 0.0),
                    "time_energy_s": timers.get("energy", 0.0),
                    "time_backward_optimizer_s": dt - sum(timers.values()),
                    "peak_memory_mb": peak_memory_mb(dev),
                }
                mon.log(row)
                mon.progress(step, loss, v.batch / dt, v.level, v.res)
            at_visit_end = hook.visit_ends_after(step - 1) and len(hook.visits) > 1
            if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or at_visit_end:
                if step != total:
                    scores = run_eval(step)
            stopping = stop.agreed()
            if (
                stopping
                or step == total
                or (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0)
            ):
                save(step)
            if stopping:
                mon.say(
                    f"stop requested: checkpoint saved at step {step}; resume with --resume auto"
                )
                break
        if step == total:
            scores = run_eval(step)
    finally:
        stop.restore()
        mon.close()
    summary = {
        "steps": step,
        "total_steps": total,
        "completed": step == total,
        "world_size": world,
        "wall_s": time.perf_counter() - t_start,
        "train_s": time.perf_counter() - t_loop,
        "samples_seen": samples_seen(step),
        "train_time_s": clock["train_s"],
        "parameters": n_params,
        "peak_memory_mb": peak_memory_mb(dev),
        **scores,
    }
    if rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
