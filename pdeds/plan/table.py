"""What ``pdeds plan`` prints: a ``Plan`` as a text table or a JSON-ready dict (byte counts as
integers), the ``check_steps`` rows as text, and byte counts in B / KiB / MiB / GiB.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from pdeds.machine import GiB

if TYPE_CHECKING:
    from pdeds.plan.planner import Plan


def fmt_bytes(x: float) -> str:
    """Bytes in B / KiB / MiB / GiB with 3 significant digits."""
    x = float(x)
    for unit, size in (("GiB", GiB), ("MiB", 2.0**20), ("KiB", 2.0**10)):
        if abs(x) >= size:
            return f"{x / size:.3g} {unit}"
    return f"{x:.0f} B"


def plan_dict(plan: Plan) -> dict[str, Any]:
    """``plan`` JSON-ready: every byte count as an integer."""
    s, hw = plan.states, plan.hardware

    def ints(d: dict[str, Any]) -> dict[str, Any]:
        return {k: (int(v) if isinstance(v, float) else v) for k, v in d.items()}

    return {
        "config": plan.config,
        "hardware": {
            **dataclasses.asdict(hw),
            "world": hw.world,
            "usable_bytes": int(hw.usable_bytes),
        },
        "deepspeed": dataclasses.asdict(plan.ds),
        "optimizer": plan.optimizer,
        "parameters": plan.parameters,
        "largest_layer_parameters": plan.largest_layer,
        "variant": str(plan.variant),
        "model_states": {
            **ints(dataclasses.asdict(s)),
            "device_total": int(s.device_total),
        },
        "levels": [ints(dataclasses.asdict(lv)) for lv in plan.levels],
        "fits": plan.fits,
        "device_fits": plan.device_fits,
        "host_fits": plan.host_fits,
        "recommendations": plan.recommendations,
        "notes": plan.notes,
        "check": plan.check.to_dict() if plan.check else None,
    }


def plan_table(plan: Plan) -> str:
    """``plan`` as a text table (what ``pdeds plan`` prints)."""
    hw, ds, s = plan.hardware, plan.ds, plan.states
    out = [
        f"pdeds plan: {plan.config}",
        f"  {hw.nodes} node(s) x {hw.gpus_per_node} device(s) = {hw.world} rank(s); "
        f"{hw.gpu_mem_gib:g} GiB per device, {hw.reserve:.0%} reserved -> "
        f"{fmt_bytes(hw.usable_bytes)} usable",
        f"  ZeRO stage {ds.stage}, {ds.dtype}, optimizer {plan.optimizer}, offload optimizer "
        f"{ds.offload_optimizer} / params {ds.offload_param}, activation checkpointing "
        f"{'on' if plan.variant.checkpoint else 'off'}",
        f"  {plan.parameters:,} parameters (largest layer {plan.largest_layer:,})",
        "",
        f"  {'model states':<26}{'device/rank':>14}{'host/node':>14}",
        f"  {'parameters':<26}{fmt_bytes(s.params_device):>14}{fmt_bytes(s.params_host):>14}",
        f"  {'gradients':<26}{fmt_bytes(s.grads_device):>14}{fmt_bytes(s.grads_host):>14}",
        f"  {'optimizer states':<26}{fmt_bytes(s.optimizer_device):>14}"
        f"{fmt_bytes(s.optimizer_host):>14}",
        f"  {'DeepSpeed grad. bucket':<26}{fmt_bytes(s.bucket):>14}{'-':>14}",
        f"  {'total':<26}{fmt_bytes(s.device_total):>14}{fmt_bytes(s.host_total):>14}"
        "  (host x1.5 as DeepSpeed)",
    ]
    if s.deepspeed_estimate:
        e = s.deepspeed_estimate
        out.append(
            f"  DeepSpeed {e['function']}: {fmt_bytes(e['gpu_bytes'])} per device, "
            f"{fmt_bytes(e['cpu_bytes'])} host"
        )
    out += [
        "",
        f"  per level ({plan.variant}; activations = the step's peak above the model states, "
        "executed symbolically)",
        f"  {'level':>5}{'n':>6}{'batch':>7}{'mb':>4}{'activations':>13}{'total@mb':>12}"
        f"{'fits':>6}{'max mb':>8}",
    ]
    for lv in plan.levels:
        out.append(
            f"  {lv.level:>5}{lv.res:>6}{lv.batch:>7}{lv.micro_batch:>4}"
            f"{fmt_bytes(lv.activations):>13}{fmt_bytes(lv.device_total):>12}"
            f"{'yes' if lv.fits else 'NO':>6}"
            f"{lv.max_micro_batch:>8}"
        )
    host = {None: "not checked (pass --host-mem)", True: "yes", False: "NO"}[plan.host_fits]
    out += [
        "",
        f"  fits: {'yes' if plan.fits else 'NO'} (device: "
        f"{'yes' if plan.device_fits else 'NO'}, host: {host})",
    ]
    out += [f"  change: {r}" for r in plan.recommendations]
    if plan.check is not None:
        out.append(f"  check: {check_line(plan.check)}")
    out += [f"  note: {n}" for n in plan.notes]
    return "\n".join(out)


def check_line(c: Any) -> str:
    """A ``StepCheck`` in one line."""
    where = c.device if c.device != "cpu" else f"cpu ({c.cpu_capability})"
    verdict = "within" if c.within_tolerance else "OUTSIDE"
    line = (
        f"a real {c.variant} step at n = {c.res}, micro-batch {c.micro_batch} on {where} peaked at "
        f"{fmt_bytes(c.measured_bytes)}, symbolic {fmt_bytes(c.symbolic_bytes)} "
        f"({c.rel_error:+.1%}, {verdict} 10 %)"
    )
    return line + (f"; {c.note}" if c.note else "")


def check_table(rows: list[dict[str, Any]]) -> str:
    """Rows of ``check_steps`` as text."""
    out = [f"  {'n':>5}{'mb':>4}{'planned':>12}{'measured':>12}{'error':>9}  overrides"]
    for r in rows:
        out.append(
            f"  {r['res']:>5}{r['micro_batch']:>4}{fmt_bytes(r['predicted_bytes']):>12}"
            f"{fmt_bytes(r['measured_bytes']):>12}{r['rel_error']:>+9.1%}  "
            + (" ".join(r.get("overrides") or []) or "-")
        )
    return "\n".join(out)
