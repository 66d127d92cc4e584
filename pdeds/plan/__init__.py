"""Memory plan of a run: does it fit, what is the largest micro-batch, what to change if not.

Per rank, at a level of resolution n (n^d nodes) and micro-batch b, the device holds

    M(n, b) = S + B + (c b + e) n^d + o

- S, the model states (parameters, gradients, optimizer states) under the configured ZeRO stage
  and offload, counted in bytes per parameter as DeepSpeed's own estimators count them
  (``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``:
  2 B of 16-bit parameters + 18 B of 16-bit and fp32 gradients, fp32 master weights and the two
  Adam moments, partitioned over the W ranks as the stage says); ZeRO 0 and 1, fp32 and other
  optimizers by the same accounting (see ``model_state_bytes``).
- B, DeepSpeed's gradient bucket: ``reduce_bucket_size`` elements (twice with ``overlap_comm``
  at stage 1/2), allocated whatever the model size; the estimators leave it out.
- (c b + e) n^d + o, the forward+backward peak of the U-Net and the energy J_h: c bytes per node
  per sample (saved activations, the energy's field temporaries and gradients), e bytes per node
  per micro-batch whatever its size (per-call workspaces), o a constant. c, e, o are MEASURED:
  the peak of one training step of the configured model at two small resolutions and two
  micro-batches, separately for fp32/bf16 and with/without activation checkpointing (torch's
  CUDA peak statistics on a GPU, the profiler's allocation record on CPU), in a fresh
  subprocess; see ``calibrate``. The energy alone is calibrated the same way to report its share.

The host holds, per node, what DeepSpeed's estimators say (offloaded states, and the fp32 model
each process builds before moving it to its device, times their ``additional_buffer_factor``).

``check`` runs real training steps of a config (``deepspeed.initialize`` + ``engine_step``) at
small resolutions in fresh subprocesses and compares the measured peak with ``M``.

Modules, one concept each:

- ``hardware``: the ranks and their device / host memory (``Hardware``).
- ``states``: S and B, the ZeRO model states and DeepSpeed's bucket (``model_state_bytes``).
- ``fit``: the activation model (c b + e) n^d + o (``Fit``, ``Calibration``).
- ``measure``: allocator peaks and the measuring subprocesses (``python -m pdeds.plan``).
- ``calibration``: measuring c, e, o at small resolutions, and the cache (``calibrate``).
- ``prediction``: M(n, b) per level, fits, largest micro-batch (``predict``, ``Plan``).
- ``advice``: what to change when a run does not fit.
- ``planner``: ``make_plan``, the whole plan of a resolved experiment.
- ``verify``: ``check``, the plan against real training steps.
- ``table``: text and JSON output.
"""

from __future__ import annotations

from pdeds.plan.calibration import (
    CALIBRATION_MICRO_BATCHES,
    CALIBRATION_VOXELS,
    calibrate,
    default_cache_dir,
    default_calibration_resolutions,
    model_section,
    run_calibration,
)
from pdeds.plan.fit import VARIANTS, Calibration, Fit, variant
from pdeds.plan.hardware import GiB, Hardware
from pdeds.plan.measure import measure_peak
from pdeds.plan.planner import make_plan
from pdeds.plan.prediction import (
    LevelPlan,
    Plan,
    largest_micro_batch,
    level_micro_batches,
    predict,
)
from pdeds.plan.states import (
    ADDITIONAL_BUFFER_FACTOR,
    DS_DEFAULT_BUCKET,
    DTYPE_BYTES,
    ModelStates,
    ZeroSetup,
    bucket_bytes,
    count_model_params,
    model_state_bytes,
    optimizer_state_bytes,
    zero_setup,
)
from pdeds.plan.table import check_table, fmt_bytes
from pdeds.plan.verify import check

__all__ = [
    "ADDITIONAL_BUFFER_FACTOR",
    "CALIBRATION_MICRO_BATCHES",
    "CALIBRATION_VOXELS",
    "DS_DEFAULT_BUCKET",
    "DTYPE_BYTES",
    "GiB",
    "VARIANTS",
    "Calibration",
    "Fit",
    "Hardware",
    "LevelPlan",
    "ModelStates",
    "Plan",
    "ZeroSetup",
    "bucket_bytes",
    "calibrate",
    "check",
    "check_table",
    "count_model_params",
    "default_cache_dir",
    "default_calibration_resolutions",
    "fmt_bytes",
    "largest_micro_batch",
    "level_micro_batches",
    "make_plan",
    "measure_peak",
    "model_section",
    "model_state_bytes",
    "optimizer_state_bytes",
    "predict",
    "run_calibration",
    "variant",
    "zero_setup",
]
