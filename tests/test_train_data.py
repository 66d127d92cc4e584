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


@pytest.mark.parametrize("sobol", [False, True])
def test_fresh_vectors_depend_only_on_seed_and_index(sobol):
    from pdeds.train.data import BLOCK, FreshSamples

    def fresh(seed: int = 5) -> FreshSamples:
        return FreshSamples(6, seed, sobol, 2, 0.5, "diagonal", torch.device("cpu"))

    whole = fresh().coeffs(np.arange(3 * BLOCK))
    assert whole.shape == (3 * BLOCK, 6) and np.abs(whole).max() <= kl.COEFF_RANGE
    assert len(np.unique(whole[:, 0])) == 3 * BLOCK  # every vector is new
    # chunked differently, in another order, by another object: the same vectors
    other = fresh()
    idx = np.random.default_rng(0).permutation(3 * BLOCK)
    for part in np.array_split(idx, 7):
        np.testing.assert_array_equal(other.coeffs(part), whole[part])
    np.testing.assert_array_equal(fresh().indices(1000, 50), np.arange(1000, 1050))
    assert not np.array_equal(fresh(6).coeffs(np.arange(10)), whole[:10])
    if sobol:  # one scrambled Sobol sequence across blocks
        seq = torch.quasirandom.SobolEngine(6, scramble=True, seed=5).draw(
            3 * BLOCK, dtype=torch.float64
        )
        np.testing.assert_allclose(whole, (2 * seq.numpy() - 1) * kl.COEFF_RANGE)
    nu = fresh().nu(np.array([7, BLOCK + 1]), 8)
    want = kl.diffusivity(torch.from_numpy(whole[[7, BLOCK + 1]]), 8, dim=2).float()
    torch.testing.assert_close(nu, want, rtol=0, atol=0)


def test_training_samples_picks_the_stream():
    from pdeds.config import resolve
    from pdeds.train.data import FreshSamples, training_coeffs, training_samples

    cfg = resolve(None, ["data.train_samples=0"]).cfg
    assert training_coeffs(cfg) is None
    stream, data = training_samples(cfg, None, torch.device("cpu"))
    assert isinstance(stream, FreshSamples) and stream is data
    cfg = resolve(None, ["data.train_samples=7"]).cfg
    stream, data = training_samples(cfg, training_coeffs(cfg), torch.device("cpu"))
    assert isinstance(stream, SampleStream) and len(data) == 7
