"""What ``pdeds plan`` prints: a ``Plan`` as a text table or JSON-ready dict (byte counts as
integers), the ``check`` rows as text, and byte counts in B / KiB / MiB / GiB.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from pdeds.plan.hardware import GiB
from pdeds.plan.states import ADDITIONAL_BUFFER_FACTOR

if TYPE_CHECKING:
    from pdeds.plan.prediction import Plan


def plan_dict(plan: Plan) -> dict[str, Any]:
    """``plan`` JSON-ready: every byte count as an integer."""
    s = plan.states
    return {
        "config": plan.config,
        "hardware": {
            **dataclasses.asdict(plan.hardware),
            "world": plan.hardware.world,
            "usable_bytes": int(plan.hardware.usable_bytes),
        },
        "zero": dataclasses.asdict(plan.zero),
        "optimizer": plan.optimizer,
        "parameters": plan.parameters,
        "largest_layer_parameters": plan.largest_layer,
        "checkpoint": plan.checkpoint,
        "variant": plan.variant,
        "model_states": {
            "device": {
                "params": int(s.params_device),
                "grads": int(s.grads_device),
                "optimizer": int(s.optimizer_device),
                "buffers": int(s.buffers_device),
                "total": int(s.device_total + s.buffers_device),
            },
            "host_per_node": {
                "params": int(s.params_host),
                "grads": int(s.grads_host),
                "optimizer": int(s.optimizer_host),
                "total": int(s.host_total),
            },
            "deepspeed_estimate": s.deepspeed_estimate,
        },
        "levels": [
            {k: (int(v) if isinstance(v, float) else v) for k, v in dataclasses.asdict(lv).items()}
            for lv in plan.levels
        ],
        "fits": plan.fits,
        "device_fits": plan.device_fits,
        "host_fits": plan.host_fits,
        "recommendations": plan.recommendations,
        "notes": plan.notes,
        "calibration": plan.calibration.to_dict(),
    }


def plan_table(plan: Plan) -> str:
    """``plan`` as a text table (what ``pdeds plan`` prints)."""
    hw, z, s = plan.hardware, plan.zero, plan.states
    ck = "on" if plan.checkpoint else "off"
    out = [
        f"pdeds plan: {plan.config}",
        f"  {hw.nodes} node(s) x {hw.gpus_per_node} device(s) = {hw.world} rank(s); "
        f"{hw.gpu_mem_gib:g} GiB per device, {hw.reserve:.0%} reserved -> "
        f"{fmt_bytes(hw.usable_bytes)} usable",
        f"  ZeRO stage {z.stage}, {z.dtype}, optimizer {plan.optimizer}, offload optimizer "
        f"{'cpu' if z.offload_optimizer else 'none'} / params "
        f"{'cpu' if z.offload_param else 'none'}, activation checkpointing {ck}",
        f"  {plan.parameters:,} parameters (largest layer {plan.largest_layer:,})",
        f"  calibration: {plan.calibration.device}, peaks measured at n = "
        f"{plan.calibration.resolutions[0]}, {plan.calibration.resolutions[1]} "
        f"({plan.calibration.method})",
        "",
        f"  {'model states':<26}{'device/rank':>14}{'host/node':>14}",
        f"  {'parameters':<26}{fmt_bytes(s.params_device):>14}{fmt_bytes(s.params_host):>14}",
        f"  {'gradients':<26}{fmt_bytes(s.grads_device):>14}{fmt_bytes(s.grads_host):>14}",
        f"  {'optimizer states':<26}{fmt_bytes(s.optimizer_device):>14}"
        f"{fmt_bytes(s.optimizer_host):>14}",
        f"  {'DeepSpeed grad. bucket':<26}{fmt_bytes(s.buffers_device):>14}{'-':>14}",
        f"  {'total':<26}{fmt_bytes(s.device_total + s.buffers_device):>14}"
        f"{fmt_bytes(s.host_total):>14}  (host x{ADDITIONAL_BUFFER_FACTOR} as DeepSpeed)",
    ]
    if s.deepspeed_estimate:
        e = s.deepspeed_estimate
        out.append(
            f"  DeepSpeed {e['function']}: {fmt_bytes(e['gpu_bytes'])} per device, "
            f"{fmt_bytes(e['cpu_bytes'])} host"
        )
    out += [
        "",
        f"  per level ({plan.variant}; activations incl. saved fields, energy = J_h "
        "temporaries, per micro-batch = size-independent part)",
        f"  {'level':>5}{'n':>6}{'mb':>4}{'activ./sample':>15}{'energy/sample':>15}"
        f"{'per mb':>11}{'total@mb':>12}{'ckpt ' + ('off' if plan.checkpoint else 'on'):>12}"
        f"{'fits':>6}{'max mb':>8}",
    ]
    for lv in plan.levels:
        out.append(
            f"  {lv.level:>5}{lv.res:>6}{lv.micro_batch:>4}"
            f"{fmt_bytes(lv.activations_per_sample):>15}{fmt_bytes(lv.energy_per_sample):>15}"
            f"{fmt_bytes(lv.per_micro_batch):>11}{fmt_bytes(lv.device_total):>12}"
            f"{_opt_bytes(lv.other_checkpointing):>12}{'yes' if lv.fits else 'NO':>6}"
            f"{lv.max_micro_batch:>8}"
        )
    host = {None: "not checked (pass --host-mem)", True: "yes", False: "NO"}[plan.host_fits]
    out += [
        "",
        f"  fits: {'yes' if plan.fits else 'NO'} (device: "
        f"{'yes' if plan.device_fits else 'NO'}, host: {host})",
    ]
    out += [f"  change: {r}" for r in plan.recommendations]
    out += [f"  note: {n}" for n in plan.notes]
    return "\n".join(out)


def _opt_bytes(x: float | None) -> str:
    return "-" if x is None else fmt_bytes(x)


def fmt_bytes(x: float) -> str:
    """Bytes in B / KiB / MiB / GiB with 3 significant digits."""
    x = float(x)
    for unit, size in (("GiB", GiB), ("MiB", 2.0**20), ("KiB", 2.0**10)):
        if abs(x) >= size:
            return f"{x / size:.3g} {unit}"
    return f"{x:.0f} B"


def check_table(rows: list[dict[str, Any]]) -> str:
    """Rows of ``check`` as text."""
    out = [f"  {'n':>5}{'mb':>4}{'planned':>12}{'measured':>12}{'error':>9}  overrides"]
    for r in rows:
        out.append(
            f"  {r['res']:>5}{r['micro_batch']:>4}{fmt_bytes(r['predicted_bytes']):>12}"
            f"{fmt_bytes(r['measured_bytes']):>12}{r['rel_error']:>+9.1%}  "
            + (" ".join(r.get("overrides") or []) or "-")
        )
    return "\n".join(out)
