"""``make_plan``: the memory plan of a resolved experiment on given hardware. Counts the model's
parameters, its ZeRO model states and DeepSpeed's bucket, predicts M(n, b) for every level of the
schedule from the calibration, and adds what to change if the run does not fit.
"""

from __future__ import annotations

from typing import Any

from pdeds.errors import PdedsError
from pdeds.plan.advice import Setup, plan_notes, recommend, setup_states
from pdeds.plan.fit import Calibration, variant
from pdeds.plan.hardware import Hardware
from pdeds.plan.prediction import Plan, level_micro_batches, level_plans
from pdeds.plan.states import count_model_params, optimizer_state_bytes, zero_setup


def make_plan(
    resolved: Any,
    hardware: Hardware,
    calibration: Calibration,
    *,
    config_name: str = "",
) -> Plan:
    """The memory plan of a resolved experiment (``pdeds.config.resolve``) on ``hardware``."""
    from pdeds.models.unet import build_model

    hardware.validate()
    cfg, ds = resolved.cfg, resolved.ds
    dim = cfg.problem.dim
    if calibration.dim != dim:
        raise PdedsError(
            f"the calibration is for {calibration.dim}-D, the config for {dim}-D; recalibrate"
        )
    zero = zero_setup(ds)
    model = build_model(dim, cfg.model)  # on CPU: DeepSpeed's counter dedupes by data_ptr
    params, largest = count_model_params(model)
    opt = optimizer_state_bytes(cfg.optim, model)
    levels = level_micro_batches(cfg, ds, hardware.world)
    setup = Setup(zero, cfg.model.checkpoint, hardware)
    states = setup_states(setup, params, largest, opt)
    key = variant(zero.dtype, cfg.model.checkpoint)
    plans = level_plans(states, calibration, key, levels, dim, hardware)
    plan = Plan(
        config=config_name or "(experiment)",
        hardware=hardware,
        zero=zero,
        optimizer=cfg.optim.name,
        parameters=params,
        largest_layer=largest,
        checkpoint=cfg.model.checkpoint,
        variant=key,
        states=states,
        levels=plans,
        calibration=calibration,
    )
    plan.recommendations = recommend(plan, setup, params, largest, opt, levels, cfg)
    plan.notes = plan_notes(plan, calibration)
    if cfg.data.val_path is None:
        from pdeds.physics.reference import solve_memory
        from pdeds.plan.table import fmt_bytes

        n, method = cfg.train.eval_res or cfg.problem.res, cfg.train.reference
        where = "host" if method == "amg" else "device"
        need = fmt_bytes(solve_memory((n,) * dim, method))
        plan.notes.append(
            f"held-out references: rank 0 solves them once before training ({method} at {n}^{dim}:"
            f" ~{need} per sample on its {where}; train.reference, train.eval_res, data.val_path)"
        )
    return plan
