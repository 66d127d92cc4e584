"""Run a test body on N real gloo ranks (spawned processes) with a timeout.

    results = run_ranks(body, 2, arg1, arg2, timeout=120)

``body(*args)`` runs in every rank after ``init_process_group("gloo")`` with RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, OMP_NUM_THREADS=1 and DS_ACCELERATOR=cpu
set; it must be a module-level function (spawn pickles it by name). Its return values,
one per rank, come back as a list. An exception in any rank, a rank that dies, or the timeout
raises ``RankFailure`` with the rank's traceback; the other ranks are killed.
"""

from __future__ import annotations

import os
import pickle
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from pdeds.machine import free_port


class RankFailure(RuntimeError):
    """A spawned rank raised, died or timed out."""


def _worker(body: Callable[..., Any], rank: int, world: int, port: int, args: tuple, queue) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = body(*args)
        # Plain pickle copies tensor data; a torch-shared tensor would point into this
        # exiting process.
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:  # noqa: BLE001  (report anything, the parent decides)
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
        # os._exit kills the queue's feeder thread: flush what was put first.
        queue.close()
        queue.join_thread()
        # Skipping interpreter teardown saves ~1.4 s and avoids a rare SIGABRT at exit.
        os._exit(0)


def run_ranks(body: Callable[..., Any], world: int, *args: Any, timeout: float = 180.0) -> list:
    """Run ``body(*args)`` on ``world`` gloo ranks; return the per-rank results in rank order."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(body, r, world, port, args, queue), daemon=False)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        import queue as queue_mod
        import time

        deadline = time.monotonic() + timeout
        while len(results) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RankFailure(
                    f"ranks timed out after {timeout:.0f} s; finished: {sorted(results)}"
                )
            try:
                rank, ok, value = queue.get(timeout=min(left, 1.0))
            except queue_mod.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    raise RankFailure(
                        f"rank(s) {dead} died with exit codes {[procs[i].exitcode for i in dead]}"
                    ) from None
                continue
            if not ok:
                raise RankFailure(f"rank {rank} failed:\n{value}")
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world)]
