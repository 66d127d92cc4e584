"""DeepSpeed start-up glue that does not belong to any one feature.

``skip_shm_comm_build``: on the CPU accelerator every ``deepspeed.initialize`` first JIT-builds
the ``deepspeed_shm_comm`` op (~30 s on 2 cores). That op serves only DeepSpeed's *inference*
all-reduce, which pdeds never calls: training collectives go through torch.distributed (gloo).
pdeds therefore replaces DeepSpeed's ``build_shm_op`` by one that returns None (DeepSpeed's own
"op not available" answer) before the first ``initialize``. Set ``PDEDS_DS_SHM_COMM=1`` to keep
DeepSpeed's behaviour (build and use the op).
"""

from __future__ import annotations

import os
import sys

SHM_SWITCH = "PDEDS_DS_SHM_COMM"


def skip_shm_comm_build() -> bool:
    """Make DeepSpeed skip building ``deepspeed_shm_comm``; True if the skip is in effect."""
    if os.environ.get(SHM_SWITCH, "0") == "1":
        return False
    import deepspeed.comm.torch  # noqa: F401  (the module object must exist to be patched)

    sys.modules["deepspeed.comm.torch"].build_shm_op = _no_shm_op
    return True


def _no_shm_op() -> None:
    """Stand-in for DeepSpeed's build_shm_op: the op is 'not available'."""
    return None
