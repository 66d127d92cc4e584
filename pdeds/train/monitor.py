"""What a run reports: metrics.jsonl, TensorBoard, and a progress bar or plain log lines.

Only rank 0 writes. ``metrics.jsonl`` holds one JSON object per logged step (``step``,
``loss``, ``lr``, ``samples_per_s``, ``level``, ``res``, ``batch``, ``micro_batch``, ``visit``,
``train_s`` = training wall time so far with evaluation excluded, ``samples`` = training samples
drawn, ``samples_evaluated`` = sample forward/backward passes including every L-BFGS line-search
evaluation, time breakdown, peak memory) and one per evaluation (``val_rel_l2_mean``,
``val_rel_l2_max``, ``val_energy_gap``, the lifting baseline's, ``train_s``, ``samples``).
On resume, rows past the resumed step are dropped so the file is the uninterrupted curve.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pdeds.train.clock import fmt_duration


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak, or max RSS on CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the rows of metrics.jsonl with row['step'] <= step."""
    if not path.is_file():
        return
    keep = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def _slice(field: torch.Tensor) -> np.ndarray:
    """Mid-plane slice (x3 = 1/2 in 3-D) of a (1, n..) field as a 2-D array."""
    a = field[0].float().cpu().numpy()
    return a[..., a.shape[-1] // 2] if a.ndim == 3 else a


def _normalise(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


class Monitor:
    """Rank-0 sink for rows, images and progress; a no-op on other ranks."""

    def __init__(
        self, run_dir: Path, *, enabled: bool, total_steps: int | None, start_step: int
    ) -> None:
        """``total_steps`` None: the time budget, not a step count, ends the run."""
        self.enabled = enabled
        self.total = total_steps
        self.bar = None
        self.tb = None
        self.file = None
        if not enabled:
            return
        path = run_dir / "metrics.jsonl"
        truncate_metrics(path, start_step)
        self.file = path.open("a")
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step or None)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.t0 = time.perf_counter()

    def log(self, row: dict[str, Any]) -> None:
        """Append a row to metrics.jsonl and its numbers to TensorBoard."""
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        step = row["step"]
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.tb.add_scalar(k.replace("time_", "time/"), v, step)

    def progress(
        self, step: int, loss: float, sps: float, level: int, res: int, eta: float | None
    ) -> None:
        """Advance the bar (terminal) or print a plain line (log files); ``eta`` in seconds."""
        if not self.enabled:
            return
        left = fmt_duration(eta) if eta is not None else "?"
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(
                loss=f"{loss:.4g}", sps=f"{sps:.1f}", res=res, eta=left, refresh=False
            )
            self.bar.refresh()
        else:
            el = time.perf_counter() - self.t0
            of = f"/{self.total}" if self.total is not None else ""
            print(
                f"step {step}{of} loss {loss:.6g} samples/s {sps:.2f} "
                f"level {level} res {res} elapsed {el:.0f}s eta {left}",
                flush=True,
            )

    def say(self, text: str) -> None:
        """A message that does not break the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def images(self, step: int, nu: torch.Tensor, pred: torch.Tensor, ref: torch.Tensor) -> None:
        """Mid-plane slices of nu (log scale), prediction, reference and |error| to TensorBoard."""
        if not self.enabled:
            return
        panels = {
            "log_nu": np.log(_slice(nu)),
            "prediction": _slice(pred),
            "reference": _slice(ref),
            "abs_error": np.abs(_slice(pred) - _slice(ref)),
        }
        for name, a in panels.items():
            self.tb.add_image(f"slice/{name}", _normalise(a)[None], step)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.tb.close()
        self.file.close()
