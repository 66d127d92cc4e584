"""What to change when a run does not fit: cumulative config changes, each kept only if it lowers
the worst level's M(n, b), until the plan fits; and notes on settings DeepSpeed ignores or that
cost more than they should.

Order: what shrinks a sample's memory (activation checkpointing, bf16) or a gradient bucket
larger than the model; then a smaller micro-batch if one sample fits; then what spreads or moves
model states (ZeRO 3, offload, more ranks).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from pdeds.plan.fit import Calibration, Fit, variant
from pdeds.plan.hardware import GiB, Hardware
from pdeds.plan.prediction import Plan, largest_micro_batch, predict
from pdeds.plan.states import ModelStates, ZeroSetup, bucket_bytes, model_state_bytes
from pdeds.plan.table import fmt_bytes


@dataclass(frozen=True)
class Setup:
    """What the plan varies when it searches for a change that fits."""

    zero: ZeroSetup
    checkpoint: bool
    hardware: Hardware


def setup_states(setup: Setup, params: int, largest: int, opt: tuple[float, float]) -> ModelStates:
    """The model states of ``setup`` for P = ``params`` parameters, L = ``largest`` in the largest
    layer, and ``opt`` = (optimizer bytes per parameter, extra optimizer bytes)."""
    return model_state_bytes(
        params,
        largest,
        setup.zero,
        optimizer_bytes=opt[0],
        optimizer_extra=opt[1],
        gpus_per_node=setup.hardware.gpus_per_node,
        nodes=setup.hardware.nodes,
    )


class _Search:
    """Candidate changes of a setup and their predicted totals (for ``recommend``)."""

    def __init__(
        self,
        plan: Plan,
        params: int,
        largest: int,
        opt: tuple[float, float],
        levels: list[tuple[int, int, int]],
        cfg: Any,
    ) -> None:
        self.cal, self.params, self.largest, self.opt = plan.calibration, params, largest, opt
        self.levels, self.cfg, self.dim = levels, cfg, cfg.problem.dim

    def state(self, s: Setup) -> tuple[ModelStates, Fit]:
        st = setup_states(s, self.params, self.largest, self.opt)
        return st, self.cal.step[variant(s.zero.dtype, s.checkpoint)]

    def worst(self, s: Setup, micro_batch_one: bool = False) -> float:
        st, fit = self.state(s)
        return max(
            predict(st, fit, n, 1 if micro_batch_one else mb, self.dim) for _, n, mb in self.levels
        )

    def fits(self, s: Setup, micro_batch_one: bool = False) -> bool:
        st, _ = self.state(s)
        hw = s.hardware
        host_ok = hw.host_mem_gib is None or st.host_total <= hw.host_mem_gib * GiB
        return host_ok and self.worst(s, micro_batch_one) <= hw.usable_bytes

    def apply(self, s: Setup, change: tuple[str, Setup] | None, recs: list[str]) -> Setup:
        """``change`` if it lowers the worst level's total (recorded in ``recs``), else ``s``
        (also when its dtype / checkpointing variant was not calibrated)."""
        if (
            change is None
            or variant(change[1].zero.dtype, change[1].checkpoint) not in self.cal.step
        ):
            return s
        if self.worst(change[1]) >= self.worst(s):
            return s
        recs.append(f"{change[0]} -> {fmt_bytes(self.worst(change[1]))} per rank")
        return change[1]

    def _zero(self, s: Setup, **kw: Any) -> Setup:
        return dataclasses.replace(s, zero=dataclasses.replace(s.zero, **kw))

    def _bucket_fix(self, s: Setup) -> tuple[str, Setup] | None:
        """Size DeepSpeed's bucket to the model when it is more than 2x the model's fp32 size."""
        if bucket_bytes(s.zero) <= 2 * 4 * self.params:
            return None
        size = _round_up(self.params)
        fixed = self._zero(s, reduce_bucket_size=size, overlap_comm=False)
        return f"zero_optimization.reduce_bucket_size: {size}", fixed

    def checkpoint(self, s: Setup) -> tuple[str, Setup] | None:
        if s.checkpoint:
            return None
        return "set model.checkpoint: true", dataclasses.replace(s, checkpoint=True)

    def bf16(self, s: Setup) -> tuple[str, Setup] | None:
        from pdeds.optim import SECOND_ORDER

        if s.zero.half or self.cfg.optim.name in SECOND_ORDER:
            return None
        text = "set bf16.enabled: true in the DeepSpeed JSON (e.g. ds_configs/zero2_bf16.json)"
        return text, self._zero(s, dtype="bf16", grad_accum_dtype="bf16")

    def bucket(self, s: Setup) -> tuple[str, Setup] | None:
        fix = self._bucket_fix(s)
        return (f"set {fix[0]}", fix[1]) if fix else None

    def spread_states(self, s: Setup) -> list[tuple[str, Setup]]:
        """Cumulative steps that spread / move model states, each a config change and the setup
        after it: ZeRO 3, + offload_optimizer, + offload_param (ZeRO 2 + offload_optimizer for
        optimizers that do not run under ZeRO 3)."""
        from pdeds.optim import OFFLOAD_OK, ZERO_STAGES

        stages = ZERO_STAGES[self.cfg.optim.name]
        steps: list[tuple[str, dict[str, Any]]] = []
        if 3 in stages:
            if s.zero.stage != 3:
                steps.append(("set zero_optimization.stage: 3", {"stage": 3}))
        elif 2 in stages and s.zero.stage < 2:
            steps.append(("set zero_optimization.stage: 2", {"stage": 2}))
        elif max(stages) == 0:
            return []
        if self.cfg.optim.name in OFFLOAD_OK:
            if not s.zero.offload_optimizer:
                text = 'set zero_optimization.offload_optimizer: {"device": "cpu"}'
                steps.append((text, {"offload_optimizer": True}))
            if 3 in stages and not s.zero.offload_param:
                text = 'set zero_optimization.offload_param: {"device": "cpu"}'
                steps.append((text, {"offload_param": True}))
        out, cur = [], s
        for text, change in steps:
            cur = self._zero(cur, **change)
            fix = self._bucket_fix(cur)
            if fix:
                cur = fix[1]
                text = f"{text} and {fix[0]}"
            out.append((text, cur))
        return out

    def micro_batches(self, s: Setup) -> list[str]:
        st, fit = self.state(s)
        recs = []
        for lvl, n, mb in self.levels:
            best = largest_micro_batch(st, fit, n, self.dim, s.hardware.usable_bytes)
            if best < mb:
                key = (
                    f"schedule.level[{lvl}].micro_batch"
                    if self.cfg.schedule.level
                    else "ds.train_micro_batch_size_per_gpu"
                )
                recs.append(
                    f"set {key}: {best} at n = {n} (raise gradient_accumulation_steps to keep "
                    f"train_batch_size = micro-batch x accumulation x {s.hardware.world} ranks)"
                )
        return recs

    def more_ranks(self, s: Setup) -> str | None:
        """The fewest nodes (x2 steps, up to 64x) at which the states shrink enough to fit."""
        hw = s.hardware
        for k in (2, 4, 8, 16, 32, 64):
            t = dataclasses.replace(s, hardware=dataclasses.replace(hw, nodes=hw.nodes * k))
            if self.fits(t):
                return (
                    f"run on {t.hardware.world} ranks (--nodes {t.hardware.nodes}): ZeRO spreads "
                    f"the model states -> {fmt_bytes(self.worst(t))} per rank"
                )
        return None

    def too_big(self, s: Setup) -> list[str]:
        st, fit = self.state(s)
        hw, recs = s.hardware, []
        if hw.host_mem_gib is not None and st.host_total > hw.host_mem_gib * GiB:
            recs.append(
                f"host memory: the offloaded states need {fmt_bytes(st.host_total)} per node; "
                "add nodes (--nodes) or drop offload_param / offload_optimizer"
            )
        need = self.worst(s, micro_batch_one=True)
        n = max(n for _, n, _ in self.levels)
        recs.append(
            f"micro-batch 1 at n = {n} still needs {fmt_bytes(need)} per rank: a device of >= "
            f"{fmt_bytes(need / (1.0 - hw.reserve))}, or a coarser problem.res / smaller "
            "model.width (more GPUs spread model states, not a sample's activations)"
        )
        return recs


def recommend(
    plan: Plan,
    setup: Setup,
    params: int,
    largest: int,
    opt: tuple[float, float],
    levels: list[tuple[int, int, int]],
    cfg: Any,
) -> list[str]:
    """Concrete config changes, cumulative, until the run fits (each with its new total).

    Order: what shrinks a sample's memory (checkpointing, bf16) or a bucket larger than the
    model; then a smaller micro-batch if one sample fits; then what spreads or moves model
    states (ZeRO 3, offload, more ranks). A change is kept only if it lowers the worst level.
    """
    if plan.fits:
        return []
    search = _Search(plan, params, largest, opt, levels, cfg)
    cur, recs = setup, []
    for change in (search.checkpoint, search.bf16, search.bucket):
        cur = search.apply(cur, change(cur), recs)
        if search.fits(cur):
            return recs
    if search.fits(cur, micro_batch_one=True):
        return recs + search.micro_batches(cur)
    steps = search.spread_states(cur)
    lines = [f"{text} -> {fmt_bytes(search.worst(t))} per rank" for text, t in steps]
    for i, (_, option) in enumerate(steps):
        if search.fits(option):
            return recs + lines[: i + 1]
        if search.fits(option, micro_batch_one=True):
            return recs + lines[: i + 1] + search.micro_batches(option)
    if steps and search.worst(steps[-1][1]) < search.worst(cur):
        recs, cur = recs + lines, steps[-1][1]
    more = search.more_ranks(cur)
    return recs + ([more] if more else search.too_big(cur))


def _round_up(x: int) -> int:
    """x rounded up to 2 significant digits (a tidy bucket size)."""
    if x <= 0:
        return 1
    mag = 10 ** max(0, int(math.log10(x)) - 1)
    return int(math.ceil(x / mag) * mag)


def plan_notes(plan: Plan, cal: Calibration) -> list[str]:
    """Settings DeepSpeed ignores, the fp16 stand-in, a bucket outweighing the model states, and
    a CPU calibration's caveat."""
    notes = []
    z = plan.zero
    if z.offload_optimizer and z.stage == 0:
        notes.append("offload_optimizer needs ZeRO stage >= 1; DeepSpeed ignores it at stage 0")
    if z.offload_param and z.stage != 3:
        notes.append("offload_param needs ZeRO stage 3; DeepSpeed ignores it below")
    if z.dtype == "fp16":
        notes.append("fp16 activations are sized with the bf16 calibration (same bytes)")
    s = plan.states
    if s.buffers_device > 4 * (s.device_total + 1):
        notes.append(
            f"DeepSpeed's gradient bucket ({fmt_bytes(s.buffers_device)}, reduce_bucket_size "
            f"{z.reduce_bucket_size:,}) outweighs the model states; "
            f"zero_optimization.reduce_bucket_size: {_round_up(plan.parameters)} frees it"
        )
    if not cal.device.startswith("cuda"):
        notes.append(
            "activations were calibrated on CPU: CUDA kernels (cuDNN workspaces) may differ; "
            "`launch/gpu_check` measures them on a GPU"
        )
    return notes
