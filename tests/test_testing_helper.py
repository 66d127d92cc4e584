"""The multi-rank helper itself: results come back in rank order, failures surface."""

from __future__ import annotations

import pytest
import torch

from pdeds import distributed
from pdeds.testing.distributed import RankFailure, run_ranks


def _sum_ranks() -> float:
    t = torch.tensor([float(distributed.rank() + 1)])
    return float(distributed.all_reduce_sum(t).item())


def _fail() -> None:
    raise ValueError("boom on purpose")


def test_two_ranks_reduce():
    assert run_ranks(_sum_ranks, 2, timeout=60) == [3.0, 3.0]


def test_failure_is_reported():
    with pytest.raises(RankFailure, match="boom on purpose"):
        run_ranks(_fail, 2, timeout=60)
