"""What to change when a run does not fit, and notes on what the plan leaves out.

Changes are ``--set`` overrides, tried in order and kept (cumulatively) when the optimizer and
DeepSpeed accept them and they lower the worst level's M(n, b) by MIN_GAIN: first what shrinks a
sample (activation checkpointing, bf16) or a gradient bucket larger than the model; then a
smaller micro-batch if one sample fits; then what spreads or moves model states (ZeRO 3,
offload), each followed by the micro-batch check; then more ranks, or what it would take.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from pdeds.errors import PdedsError
from pdeds.machine import GiB
from pdeds.plan.planner import Hardware, Plan, schedule_levels
from pdeds.plan.states import model_states
from pdeds.plan.symbolic import Activations, Variant
from pdeds.plan.table import fmt_bytes

CHANGES = (
    "model.checkpoint=true",
    "ds.bf16.enabled=true",
    "bucket",
    "ds.zero_optimization.stage=3",
    "ds.zero_optimization.stage=2",
    "ds.zero_optimization.offload_optimizer.device=cpu",
    "ds.zero_optimization.offload_param.device=cpu",
)
SAMPLE_CHANGES = 3
"""The first three shrink a sample (or the bucket); the micro-batch check follows them."""
MIN_GAIN = 0.01
"""A change must lower the worst level's M by 1 % to be worth its cost (ZeRO 3's all-gathers
for a model whose states are a rounding error of its activations are not)."""


@dataclass(frozen=True)
class Setup:
    """What the search varies: the DeepSpeed JSON (and its view), checkpointing, the ranks."""

    ds: dict[str, Any]
    view: Any
    checkpoint: bool
    hardware: Hardware


class Search:
    """Candidate changes of a run and their predicted totals; ``run`` gives the advice."""

    def __init__(self, resolved: Any, hw: Hardware, acts: Activations, sizes: tuple) -> None:
        self.cfg, self.acts, self.sizes = resolved.cfg, acts, sizes
        self.levels = schedule_levels(resolved, hw.world)
        self.start = Setup(resolved.ds, resolved.view, resolved.cfg.model.checkpoint, hw)

    def states(self, s: Setup) -> Any:
        hw = s.hardware
        return model_states(*self.sizes[:2], s.view, self.sizes[2], hw.gpus_per_node, hw.nodes)

    def worst(self, s: Setup, one: bool = False) -> float:
        """The largest M(n, b) over the levels (at micro-batch 1 with ``one``)."""
        var = Variant(s.view.dtype, s.checkpoint)
        acts = max(self.acts.peak(var, v.res, 1 if one else v.micro_batch) for v in self.levels)
        return self.states(s).device_total + acts

    def fits(self, s: Setup, one: bool = False) -> bool:
        hw = s.hardware
        host_ok = hw.host_mem_gib is None or self.states(s).host_total <= hw.host_mem_gib * GiB
        return host_ok and self.worst(s, one) <= hw.usable_bytes

    def apply(self, s: Setup, override: str, recs: list[str]) -> Setup:
        """``s`` with ``override`` if it is accepted and lowers the worst level by MIN_GAIN (then
        recorded in ``recs``), else ``s``."""
        from pdeds import dsconfig
        from pdeds.config.load import parse_override
        from pdeds.optim import prepare_ds_config

        if override == "bucket":
            if s.view.stage == 0 or s.view.reduce_bucket_size <= 2 * self.sizes[0]:
                return s
            override = f"ds.zero_optimization.reduce_bucket_size={_round_up(self.sizes[0])}"
        parts, value = parse_override(override)
        if parts[0] == "model":
            new = dataclasses.replace(s, checkpoint=True)
        else:
            ds = copy.deepcopy(s.ds)
            node = ds
            for key in parts[1:-1]:
                node = node.setdefault(key, {})
            node[parts[-1]] = value
            try:
                prepare_ds_config(self.cfg.optim, ds)
                new = dataclasses.replace(s, ds=ds, view=dsconfig.read(ds))
            except PdedsError:  # the optimizer or DeepSpeed refuses it
                return s
        if self.worst(new) > (1.0 - MIN_GAIN) * self.worst(s):
            return s
        recs.append(f"--set {override} -> {fmt_bytes(self.worst(new))} per rank")
        return new

    def micro_batches(self, s: Setup) -> list[str]:
        """The micro-batch per level that fits, where it is below the configured one."""
        var = Variant(s.view.dtype, s.checkpoint)
        room = s.hardware.usable_bytes - self.states(s).device_total
        key = "ds.train_micro_batch_size_per_gpu"
        recs = []
        for v in self.levels:
            best = self.acts.largest(var, v.res, v.micro_batch, room, v.micro_batch)
            if best < v.micro_batch:
                at = f"schedule.level[{v.level}].micro_batch" if self.cfg.schedule.level else key
                recs.append(
                    f"--set {at}={best} at n = {v.res} (and raise gradient_accumulation_steps "
                    f"to keep train_batch_size = micro-batch x accumulation x "
                    f"{s.hardware.world} ranks)"
                )
        return recs

    def run(self) -> list[str]:
        """Concrete changes, cumulative, until the run fits (each with its new total)."""
        cur, recs = self.start, []
        for i, override in enumerate(CHANGES):
            cur = self.apply(cur, override, recs)
            if self.fits(cur):
                return recs
            if i >= SAMPLE_CHANGES - 1 and self.fits(cur, one=True):
                return recs + self.micro_batches(cur)
        hw = cur.hardware
        for k in (2, 4, 8, 16, 32, 64):  # ZeRO spreads the states over more ranks
            more = dataclasses.replace(cur, hardware=dataclasses.replace(hw, nodes=hw.nodes * k))
            if self.fits(more):
                return recs + [
                    f"run on {more.hardware.world} ranks (--nodes {hw.nodes * k}): ZeRO spreads "
                    f"the model states -> {fmt_bytes(self.worst(more))} per rank"
                ]
        if hw.host_mem_gib is not None and self.states(cur).host_total > hw.host_mem_gib * GiB:
            return recs + [
                f"host memory: the offloaded states need {fmt_bytes(self.states(cur).host_total)}"
                " per node; add nodes (--nodes) or drop offload_param / offload_optimizer"
            ]
        need = self.worst(cur, one=True)
        return recs + [
            f"micro-batch 1 at n = {max(v.res for v in self.levels)} still needs "
            f"{fmt_bytes(need)} per rank: a device of >= {fmt_bytes(need / (1.0 - hw.reserve))},"
            " or a coarser problem.res / smaller model (more GPUs spread model states, not a "
            "sample's activations)"
        ]


def _round_up(x: int) -> int:
    """x rounded up to 2 significant digits (a tidy bucket size)."""
    mag = 10 ** max(0, int(math.log10(max(x, 1))) - 1)
    return int(math.ceil(x / mag) * mag)


def plan_notes(plan: Plan, cfg: Any) -> list[str]:
    """Settings DeepSpeed ignores, a bucket outweighing the model states, what the symbolic
    figure leaves out, and the held-out reference solve."""
    from pdeds.physics.reference import solve_memory

    ds, s, notes = plan.ds, plan.states, []
    if ds.offload_optimizer != "none" and ds.stage == 0:
        notes.append("offload_optimizer needs ZeRO stage >= 1; DeepSpeed ignores it at stage 0")
    if ds.offload_param != "none" and ds.stage != 3:
        notes.append("offload_param needs ZeRO stage 3; DeepSpeed ignores it below")
    if s.bucket > 4 * (s.device_total - s.bucket + 1):
        notes.append(
            f"DeepSpeed's gradient bucket ({fmt_bytes(s.bucket)}, reduce_bucket_size "
            f"{ds.reduce_bucket_size:,}) outweighs the model states; "
            f"--set ds.zero_optimization.reduce_bucket_size={_round_up(plan.parameters)} frees it"
        )
    notes.append(
        "activations are executed symbolically (meta tensors): kernel workspaces (cuDNN, oneDNN) "
        f"are not in them but in the {plan.hardware.reserve:.0%} reserve; `launch/gpu_check` "
        "measures a GPU"
    )
    if cfg.data.val_path is None:
        n, method = cfg.train.eval_res or cfg.problem.res, cfg.train.reference
        need = fmt_bytes(solve_memory((n,) * cfg.problem.dim, method))
        notes.append(
            f"held-out references: rank 0 solves them once before training ({method} at "
            f"{n}^{cfg.problem.dim}: ~{need} per sample on its "
            f"{'host' if method == 'amg' else 'device'}; train.reference, train.eval_res, "
            "data.val_path)"
        )
    return notes
