"""Sample stream and batch split: every sample of an epoch exactly once, any rank count."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from pdeds.dsutil import SHM_SWITCH, skip_shm_comm_build
from pdeds.physics import kl
from pdeds.train.data import SampleStream, TrainingSet, split_global_batch


@pytest.mark.parametrize("samples, batch", [(10, 4), (7, 6), (12, 4), (5, 8)])
def test_every_sample_once_per_epoch(samples, batch):
    stream = SampleStream(samples, seed=3)
    steps = 3 * samples  # whole batches covering exactly `batch` epochs of the stream
    flat = np.concatenate([stream.indices(s * batch, batch) for s in range(steps)])
    epochs = flat.reshape(-1, samples)
    for e in epochs:
        assert sorted(e) == list(range(samples))
    assert not all((e == epochs[0]).all() for e in epochs[1:])  # reshuffled each epoch


@pytest.mark.parametrize("world, micro", [(1, 2), (2, 1), (2, 2), (3, 2), (4, 1)])
def test_split_covers_the_global_batch_once(world, micro):
    idx = SampleStream(9, seed=0).indices(5, 12)
    parts = [split_global_batch(idx, micro, world, r) for r in range(world)]
    flat = np.concatenate([mb for rank in parts for mb in rank])
    assert sorted(flat) == sorted(idx)
    assert all(len(mb) == micro for rank in parts for mb in rank)
    assert len({len(rank) for rank in parts}) == 1  # same accumulation steps on every rank


def test_split_rejects_a_batch_that_does_not_divide():
    with pytest.raises(ValueError, match="not a multiple"):
        split_global_batch(np.arange(6), 4, 1, 0)


def test_training_set_nu_matches_diffusivity():
    coeffs = kl.sample_coefficients(5, 6, seed=1)
    ts = TrainingSet(coeffs, 3, 0.5, "diagonal", torch.device("cpu"))
    idx = np.array([4, 0, 2])
    want = kl.diffusivity(torch.from_numpy(coeffs[idx]), 8, dim=3).float()
    torch.testing.assert_close(ts.nu(idx, 8), want, rtol=0, atol=0)
    torch.testing.assert_close(ts.nu(idx, 16)[1], kl.diffusivity(coeffs[:1], 16).float()[0])


def test_shm_op_build_skipped_unless_asked(monkeypatch):
    import deepspeed.comm.torch  # noqa: F401

    module = sys.modules["deepspeed.comm.torch"]
    original = module.build_shm_op
    try:
        monkeypatch.setenv(SHM_SWITCH, "1")
        assert skip_shm_comm_build() is False and module.build_shm_op is original
        monkeypatch.delenv(SHM_SWITCH)
        assert skip_shm_comm_build() is True
        assert module.build_shm_op() is None  # returns at once: nothing is compiled
    finally:
        module.build_shm_op = original
