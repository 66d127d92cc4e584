"""Every optimizer through deepspeed.initialize on 2 ranks with the FEM energy; config errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pdeds.errors import PdedsError
from pdeds.optim import KFACConfig, LBFGSConfig, OptimConfig, prepare_ds_config
from pdeds.testing.distributed import run_ranks

N, BATCH, STEPS = 8, 4, 5

CASES = [
    # (optimizer config, ZeRO stage, gradient accumulation steps)
    (OptimConfig(name="adam", lr=1e-2), 2, 2),
    (OptimConfig(name="adamw", lr=1e-2, weight_decay=1e-4), 1, 1),
    (OptimConfig(name="sgd", lr=1e-1, momentum=0.9), 0, 2),
    (OptimConfig(name="lbfgs", lr=1.0, lbfgs=LBFGSConfig(history_size=5)), 2, 2),
    (OptimConfig(name="lbfgs", lr=1.0, lbfgs=LBFGSConfig(history_size=5)), 0, 1),
    (
        OptimConfig(
            name="kfac",
            lr=1e-1,
            momentum=0.0,
            kfac=KFACConfig(  # the K-FAC of before issue 13: SGD's step scales with 1/gamma
                inner="sgd",
                precondition="step",
                inv_update_steps=2,
                damping_mode="absolute",
                damping=1e-3,
                factor_decay=0.95,
            ),
        ),
        0,
        2,
    ),
    (OptimConfig(name="kfac", lr=1e-2, kfac=KFACConfig(warmup_steps=1, inv_update_steps=2)), 2, 2),
]


def _train_all(cases: list[tuple[OptimConfig, int, int]]) -> list[list[float]]:
    """Rank body: STEPS steps of each case on the same batch; the per-step losses."""
    import deepspeed

    from pdeds import distributed
    from pdeds.dsutil import skip_shm_comm_build
    from pdeds.models.unet import UNet, UNetConfig
    from pdeds.optim import build_optimizer, engine_step
    from pdeds.physics import fem, kl

    skip_shm_comm_build()
    world, rank = distributed.world_size(), distributed.rank()
    nu = kl.diffusivity(kl.sample_coefficients(BATCH, 4, seed=0), N, dim=2).float()
    out = []
    for cfg, stage, gas in cases:
        torch.manual_seed(0)
        net = UNet(2, UNetConfig(depth=1, width=4, groups=2, blocks=1, activation="tanh"))
        ds = {
            "train_batch_size": BATCH,
            "gradient_accumulation_steps": gas,
            "train_micro_batch_size_per_gpu": BATCH // (world * gas),
            "zero_optimization": {"stage": stage},
        }
        ds = prepare_ds_config(cfg, ds)
        engine, *_ = deepspeed.initialize(
            model=net, optimizer=build_optimizer(net, cfg, ds), config=ds
        )
        per = BATCH // world
        micro = list(nu[rank * per : (rank + 1) * per].split(per // gas))

        def loss_fn(mb: torch.Tensor, engine=engine) -> torch.Tensor:
            return fem.energy(engine(mb), mb).mean()

        out.append([engine_step(engine, micro, loss_fn) for _ in range(STEPS)])
        assert engine.global_steps == STEPS
    return out


def test_every_optimizer_lowers_the_energy_on_two_ranks():
    ranks = run_ranks(_train_all, 2, CASES, timeout=150)
    assert ranks[0] == ranks[1]  # the returned loss is the all-reduced global-batch mean
    for (cfg, stage, _), losses in zip(CASES, ranks[0], strict=True):
        assert losses[-1] < losses[0], (cfg.name, stage, losses)
        if cfg.name == "lbfgs":  # same batch, Wolfe line search: every step decreases
            assert all(b < a for a, b in zip(losses, losses[1:])), losses


def _resume(root: str, cases: list[tuple[OptimConfig, int]]) -> dict[str, tuple[list, list]]:
    """Rank body: 2 steps, save, 2 more; a fresh engine loads the save and takes the same 2."""
    import deepspeed

    from pdeds import distributed
    from pdeds.dsutil import skip_shm_comm_build
    from pdeds.models.unet import UNet, UNetConfig
    from pdeds.optim import build_optimizer, engine_step
    from pdeds.physics import fem, kl

    skip_shm_comm_build()
    rank = distributed.rank()
    micro = [kl.diffusivity(kl.sample_coefficients(4, 4, seed=1), N, dim=2).float()[2 * rank :][:2]]
    out = {}
    for cfg, stage in cases:

        def engine(cfg=cfg, stage=stage):
            torch.manual_seed(0)
            net = UNet(2, UNetConfig(depth=1, width=4, groups=2, blocks=1, activation="tanh"))
            ds = prepare_ds_config(
                cfg, {"train_batch_size": 4, "zero_optimization": {"stage": stage}}
            )
            return deepspeed.initialize(
                model=net, optimizer=build_optimizer(net, cfg, ds), config=ds
            )[0]

        def steps(eng, k: int) -> list[float]:
            return [
                engine_step(eng, micro, lambda mb: fem.energy(eng(mb), mb).mean()) for _ in range(k)
            ]

        folder = f"{root}/{cfg.name}{stage}"
        first = engine()
        steps(first, 2)
        first.save_checkpoint(folder, tag="step2")
        straight = steps(first, 2)
        second = engine()
        second.load_checkpoint(folder, tag="step2")
        out[folder] = (straight, steps(second, 2))
    return out


def test_checkpoint_resume_continues_bitwise(tmp_path):
    """Curvature history (L-BFGS under ZeRO 2) and factors + step count (K-FAC under ZeRO 0
    and 2) are saved."""
    kfac = KFACConfig(warmup_steps=1, factor_update_steps=1, inv_update_steps=3)
    cases = [
        (OptimConfig(name="lbfgs", lr=1.0), 2),
        (OptimConfig(name="kfac", lr=0.1, kfac=dataclasses.replace(kfac, inner="sgd")), 0),
        (OptimConfig(name="kfac", lr=0.01, kfac=kfac), 2),
    ]
    for straight, resumed in run_ranks(_resume, 2, str(tmp_path), cases, timeout=120)[0].values():
        assert resumed == straight


def _ds(stage: int = 0, **extra) -> dict:
    return {"train_batch_size": 4, "zero_optimization": {"stage": stage}, **extra}


def test_prepare_ds_config_patches_a_copy():
    ds = _ds(2)
    out = prepare_ds_config(OptimConfig(name="lbfgs"), ds)
    assert out["zero_allow_untested_optimizer"] is True
    assert out["gradient_clipping"] == 0.0  # DeepSpeed's own default would be 1.0
    assert "zero_allow_untested_optimizer" not in ds
    offload = _ds(2)
    offload["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    for name in ("adam", "sgd", "lbfgs"):  # on the CPU accelerator: torch's / our optimizers
        patched = prepare_ds_config(OptimConfig(name=name), offload)
        assert patched["zero_force_ds_cpu_optimizer"] is False


@pytest.mark.parametrize(
    ("cfg", "ds", "match"),
    [
        (OptimConfig(), _ds(optimizer={"type": "Adam"}), "'optimizer' block"),
        (OptimConfig(name="lbfgs"), _ds(3), "does not run under ZeRO stage 3"),
        (OptimConfig(name="kfac"), _ds(3), r"does not run under ZeRO stage 3; use .*\(0, 1, 2\)"),
        (
            OptimConfig(name="kfac", kfac=KFACConfig(precondition="step")),
            _ds(1),
            r"does not run under ZeRO stage 1; use .*\(0\)",
        ),
        (OptimConfig(name="lbfgs"), _ds(2, fp16={"enabled": True}), "fp16.enabled false"),
        (OptimConfig(name="lbfgs"), _ds(0, gradient_clipping=1.0), "gradient_clipping"),
        (OptimConfig(name="kfac"), _ds(0, bf16={"enabled": True}), "bf16.enabled false"),
        (OptimConfig(name="foo"), _ds(), r"optim.name: 'foo' is not one of"),
        (OptimConfig(name="lbfgs", lbfgs=LBFGSConfig(history_size=0)), _ds(), "history_size"),
        (OptimConfig(name="kfac", kfac=KFACConfig(inner="lion")), _ds(), "optim.kfac.inner"),
        (
            OptimConfig(name="kfac", kfac=KFACConfig(curvature="fisher")),
            _ds(),
            r"optim.kfac.curvature: 'fisher' is not one of empirical, ggn",
        ),
    ],
)
def test_prepare_ds_config_refuses(cfg, ds, match):
    with pytest.raises(PdedsError, match=match):
        prepare_ds_config(cfg, ds)
