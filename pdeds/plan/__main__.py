"""``python -m pdeds.plan calibrate|measure-steps < job.json``: the planner's measuring
subprocesses (started by ``pdeds.plan.measure.run_subprocess``). The JSON job comes on stdin; the
result is the last line of stdout.
"""

from __future__ import annotations

import json
import os
import sys

from pdeds.plan.calibration import run_calibration
from pdeds.plan.fit import VARIANTS
from pdeds.plan.verify import measure_steps


def main(argv: list[str]) -> int:
    """``python -m pdeds.plan calibrate|measure-steps`` with a JSON job on stdin."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    job = json.loads(sys.stdin.read())
    if argv == ["calibrate"]:
        cal = run_calibration(
            job["dim"],
            job["model"],
            tuple(job["resolutions"]),
            tuple(job["micro_batches"]),
            job.get("device"),
            tuple(job.get("variants", VARIANTS)),
        )
        result = cal.to_dict()
    elif argv == ["measure-steps"]:
        result = measure_steps(job)
    else:
        print("usage: python -m pdeds.plan calibrate|measure-steps < job.json", file=sys.stderr)
        return 2
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown of DeepSpeed / process-group state


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
