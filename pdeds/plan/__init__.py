"""Memory plan of a run: does it fit, what is the largest micro-batch, what to change if not.

Per rank, at a level of resolution n (n^d nodes) and micro-batch b, the device holds

    M(n, b) = S + B + A(n, b)

S the model states (parameters, gradients, optimizer states) under the ZeRO stage and offload
as DeepSpeed's estimators count them, and B DeepSpeed's gradient bucket (``states``); A the peak
of one training step above them (forward, the loss J_h with its weighting, backward), found by
executing the configured network's step symbolically on the meta device at that very n and b:
no computation, no allocation, any network (``symbolic``). ``planner`` holds the ranks and
``make_plan``, ``advice`` what to change, ``measure`` one real step against A (``pdeds plan``
runs it), ``verify`` real DeepSpeed training steps against M (``--check``), ``table`` the output.
"""

from __future__ import annotations

from pdeds.machine import GiB
from pdeds.plan.measure import StepCheck, measure_peak, step_check
from pdeds.plan.planner import Hardware, LevelPlan, Plan, make_plan
from pdeds.plan.symbolic import Activations, LiveBytes, Variant
from pdeds.plan.table import check_table, fmt_bytes, plan_dict, plan_table
from pdeds.plan.verify import check_steps

__all__ = [
    "GiB",
    "Activations",
    "Hardware",
    "LevelPlan",
    "LiveBytes",
    "Plan",
    "StepCheck",
    "Variant",
    "check_steps",
    "check_table",
    "fmt_bytes",
    "make_plan",
    "measure_peak",
    "plan_dict",
    "plan_table",
    "step_check",
]
