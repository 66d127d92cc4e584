"""The memory planner: the symbolic step against hand arithmetic and a measured step, model
states against DeepSpeed's estimators, fits / largest micro-batch, the trainer's batch
arithmetic, bad flags, and the GPU check's CPU smoke path."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pdeds import dsconfig, plan
from pdeds.cli import main
from pdeds.config import resolve, visits_for
from pdeds.models import UNetConfig
from pdeds.plan import measure, states
from pdeds.plan.planner import FRESH_CAP, model_size
from pdeds.plan.symbolic import Variant, build, training_step

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = str(ROOT / "tests/configs/unet32.yaml")
QUICKSTART_PARAMS = 1_779_809
"""Parameters of the quickstart U-Net (depth 3, width 16, growth 2, group norm)."""
SMALL_MODEL = UNetConfig(depth=2, width=16)
"""Channels a multiple of 16: oneDNN pads fewer to its 8- or 16-channel blocks (by CPU), a
CPU-only workspace."""
FP32, FP32_CKPT = Variant("fp32", False), Variant("fp32", True)
TINY = ["model.depth=1", "model.blocks=1", "model.width=4", "model.groups=2"]
"""A network of few ops, for tests of the plan's arithmetic rather than of the step."""


@pytest.fixture(scope="module")
def qs_acts() -> plan.Activations:
    """The quickstart's activations (``make_plan`` shares the same instance)."""
    return plan.Activations.of(resolve(QUICKSTART).cfg)


@pytest.fixture(scope="module")
def small_acts() -> plan.Activations:
    return plan.Activations(3, SMALL_MODEL, weighting="lifting")


def two_linear() -> nn.Module:
    """100 x 200 + 200 and 200 x 50 + 50: 30,250 parameters, largest layer 20,200."""
    return nn.Sequential(nn.Linear(100, 200), nn.ReLU(), nn.Linear(200, 50))


def view(**zero) -> dsconfig.DeepSpeedView:
    """The typed view of a DeepSpeed JSON with these zero_optimization keys (dtype via 'bf16')."""
    bf16 = zero.pop("bf16", False)
    return dsconfig.read(
        {"train_batch_size": 8, "bf16": {"enabled": bf16}, "zero_optimization": zero}
    )


def measured(model_cfg: UNetConfig, variant: Variant, n: int, b: int, weighting="none") -> float:
    """Peak bytes of one real training step on this CPU (torch's allocator records), on one
    thread: kernels' per-thread scratch buffers (2 threads: +1.8 MB of 31 MB for the FMG step,
    checkpointed, Zen 4) are not tensors the planner counts."""
    torch.manual_seed(0)
    model = build(3, model_cfg, variant, "cpu")
    shape = (b, 1) + (n,) * 3
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return plan.measure_peak(lambda: training_step(model, shape, 0.0, weighting), "cpu")
    finally:
        torch.set_num_threads(threads)


# ---- the symbolic step -------------------------------------------------------------------------


def test_live_bytes_counts_new_storages_and_their_release():
    """By hand: 4 kB of x, 4 kB of x * 2 and (x * 2) + 1 alive together at most = 12 kB; views
    and in-place ops on storages that existed before allocate nothing."""
    before = torch.zeros(1000, device="meta")
    with plan.LiveBytes() as live:
        x = torch.empty(1000, device="meta")
        y = (x * 2) + 1  # x * 2 is freed once the addition has its output
        before.add_(1.0)
        before.view(10, 100).t()
        del x, y
    assert live.trace == [4000, 8000, 12000]
    assert max(live.trace) == 12000 and live.live == 0


@pytest.mark.parametrize("arch", ["unet", "fmg"])
def test_symbolic_step_is_within_10_percent_of_a_measured_step(arch):
    """fp32, with and without checkpointing, for either network: the symbolic peak against
    torch's allocator on a real step at the same n and micro-batch (what remains are oneDNN
    workspaces, no tensors)."""
    model = dataclasses.replace(SMALL_MODEL, arch=arch)
    acts = plan.Activations(3, model, weighting="lifting")
    for variant in (FP32, FP32_CKPT):
        real = measured(model, variant, 24, 2, "lifting")
        assert acts.peak(variant, 24, 2) == pytest.approx(real, rel=0.10), (arch, variant)


def test_checkpointing_always_cuts_activations(qs_acts):
    for n, b in ((32, 2), (512, 1)):
        assert qs_acts.peak(FP32_CKPT, n, b) < 0.7 * qs_acts.peak(FP32, n, b), n
    assert measured(SMALL_MODEL, FP32_CKPT, 32, 2) < measured(SMALL_MODEL, FP32, 32, 2)


def test_activations_scale_with_the_micro_batch_and_the_volume(qs_acts):
    """A fully convolutional step at 512^3 is 8x that at 256^3 and 2 samples twice one, to the
    parameter-sized transients (the 512^3 step allocates nothing: it runs on meta tensors)."""
    a = {(n, b): qs_acts.peak(FP32_CKPT, n, b) for n, b in ((256, 1), (512, 1), (512, 2))}
    assert a[512, 1] == pytest.approx(8 * a[256, 1], rel=1e-3)
    assert a[512, 2] == pytest.approx(2 * a[512, 1], rel=1e-3)


def test_largest_micro_batch_agrees_with_executed_steps(small_acts):
    acts = small_acts
    room = acts.peak(FP32, 32, 5) + 1000.0  # 5 fits, 6 does not
    assert acts.largest(FP32, 32, 2, room, cap=100) == 5
    assert acts.peak(FP32, 32, 6) > room
    assert acts.largest(FP32, 32, 2, room, cap=3) == 3
    assert acts.largest(FP32, 32, 2, acts.peak(FP32, 32, 1) - 1.0, cap=100) == 0


def test_bf16_halves_parameter_bytes():
    model32 = build(3, UNetConfig(), FP32, "meta")
    model16 = build(3, UNetConfig(), Variant("bf16", False), "meta")
    nbytes = [sum(p.numel() * p.element_size() for p in m.parameters()) for m in (model32, model16)]
    assert nbytes == [4 * QUICKSTART_PARAMS, 2 * QUICKSTART_PARAMS]
    s32, s16 = (
        states.model_states(QUICKSTART_PARAMS, 442_496, view(stage=2, bf16=b), (8.0, 0.0), 1, 1)
        for b in (False, True)
    )
    assert s16.params_device == s32.params_device / 2


# ---- model states ------------------------------------------------------------------------------


def test_parameter_count_is_deepspeeds():
    from deepspeed.runtime.zero.stage3 import model_to_params

    from pdeds.models import UNet

    assert states.count_params(two_linear()) == (30_250, 20_200)
    unet = UNet(3, UNetConfig())
    assert states.count_params(unet) == model_to_params(unet)
    assert model_size(resolve(QUICKSTART).cfg)[:2] == model_to_params(unet)
    assert model_to_params(unet)[0] == QUICKSTART_PARAMS


@pytest.mark.parametrize("gpus,nodes", [(1, 1), (8, 1), (4, 2)])
@pytest.mark.parametrize("offload", [False, True])
def test_zero2_states_equal_deepspeeds_estimator(gpus, nodes, offload):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    p, big = states.count_params(two_linear())
    ds = view(stage=2, bf16=True, offload_optimizer={"device": "cpu" if offload else "none"})
    s = states.model_states(p, big, ds, (8.0, 0.0), gpus, nodes)
    cpu, gpu = estimate_zero2_model_states_mem_needs(
        p, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=offload
    )
    assert s.device_total - s.bucket == pytest.approx(gpu, abs=1)
    assert s.host_total == pytest.approx(cpu, abs=1)
    assert s.deepspeed_estimate == {
        "function": "estimate_zero2_model_states_mem_needs",
        "gpu_bytes": gpu,
        "cpu_bytes": cpu,
    }


@pytest.mark.parametrize("gpus,nodes", [(1, 1), (8, 1), (4, 2)])
@pytest.mark.parametrize("offload_opt,offload_par", [(False, False), (True, False), (True, True)])
def test_zero3_states_equal_deepspeeds_estimator(gpus, nodes, offload_opt, offload_par):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    p, big = states.count_params(two_linear())
    devices = (
        {"device": "cpu" if offload_opt else "none"},
        {"device": "cpu" if offload_par else "none"},
    )
    ds = view(stage=3, bf16=True, offload_optimizer=devices[0], offload_param=devices[1])
    s = states.model_states(p, big, ds, (8.0, 0.0), gpus, nodes)
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        p,
        big,
        num_gpus_per_node=gpus,
        num_nodes=nodes,
        cpu_offload=offload_opt,
        cpu_offload_params=offload_par,
        zero_init=False,  # pdeds builds the whole model in every process
    )
    assert s.device_total - s.bucket == pytest.approx(gpu, abs=1)
    assert s.host_total == pytest.approx(cpu, abs=1)


@pytest.mark.parametrize(
    "stage,bf16,per_param",
    [
        (0, False, 4 + 4 + 8),  # params, grads, Adam moments: all replicated
        (0, True, 2 + 2 + 4 + 4 + 8),  # + fp32 gradients and fp32 master weights
        (1, False, 4 + 4 + (4 + 8) / 4),  # fp32 master + moments partitioned over 4 ranks
        (1, True, 2 + 2 + (4 + 4 + 8) / 4),
    ],
)
def test_zero0_zero1_states_hand_formula(stage, bf16, per_param):
    p = 30_250
    s = states.model_states(p, 20_200, view(stage=stage, bf16=bf16), (8.0, 0.0), 4, 1)
    assert s.device_total - s.bucket == pytest.approx(per_param * p)
    assert s.host_total == pytest.approx(4 * p * 4 * 1.5)  # fp32 model per process x 1.5
    assert s.deepspeed_estimate is None


def test_optimizer_state_bytes_per_optimizer():
    assert states.optimizer_bytes(resolve(None).cfg.optim) == (8.0, 0.0)
    for over, expect in (
        (["optim.name=sgd"], 4.0),
        (["optim.name=sgd", "optim.momentum=0"], 0.0),
        (["optim.name=lbfgs", "optim.lbfgs.history_size=5"], 4.0 * 13),
        (["optim.name=gauss_newton"], 8.0 * 8 + 12),
        (["optim.name=gauss_newton", "optim.gauss_newton.warm_start=0.9"], 8.0 * 9 + 12),
    ):
        assert states.optimizer_bytes(resolve(None, over).cfg.optim)[0] == expect
    # K-FAC on one Linear(3, 2) with bias: A is 4 x 4, G is 2 x 2 (factors + eigenbases + values)
    # and, with the default KL-clip, the 2 x 4 preconditioned gradient it keeps for the clip
    kfac = resolve(None, ["optim.name=kfac", "optim.kfac.inner=sgd"]).cfg.optim
    factors = 4.0 * (2 * (16 + 4) + 4 + 2)
    assert states.optimizer_bytes(kfac, nn.Linear(3, 2)) == (4.0, factors + 4.0 * 8)
    kfac.kfac.kl_clip = 0.0
    assert states.optimizer_bytes(kfac, nn.Linear(3, 2)) == (4.0, factors)


def test_bucket_follows_the_deepspeed_json_and_deepspeeds_defaults():
    ds = view(stage=2, bf16=True, overlap_comm=True, reduce_bucket_size=1_000_000)
    assert states.bucket_bytes(ds) == 2 * 1_000_000 * 2  # double buffer of bf16
    default = view(stage=1)
    assert states.bucket_bytes(default) == default.reduce_bucket_size * 4 == 5e8 * 4  # fp32
    assert states.bucket_bytes(view(stage=0)) == 0.0


# ---- the plan: fits, largest micro-batch, the trainer's batches, what to change ------------------


def test_fits_and_largest_micro_batch_against_executed_steps(qs_acts):
    res, acts = resolve(QUICKSTART), qs_acts
    held = 16.0 * QUICKSTART_PARAMS  # fp32 Adam, ZeRO 0
    room = (held + acts.peak(FP32, 32, 3) + 1000.0) / 2**30  # 3 samples fit, 4 do not
    hw = plan.Hardware(gpu_mem_gib=room, reserve=0.0)
    p = plan.make_plan(res, hw)
    (lv,) = p.levels
    assert (lv.res, lv.micro_batch, lv.max_micro_batch, lv.fits) == (32, 2, 3, True)
    assert lv.device_total == pytest.approx(held + acts.peak(FP32, 32, 2))
    assert p.fits and p.recommendations == []
    data = json.loads(json.dumps(plan.plan_dict(p)))
    assert data["levels"][0]["max_micro_batch"] == 3 and data["model_states"]["device_total"]

    mb4 = ["ds.train_micro_batch_size_per_gpu=4", "ds.train_batch_size=4"]
    p4 = plan.make_plan(resolve(QUICKSTART, mb4), hw)
    assert not p4.fits and p4.levels[0].max_micro_batch == 3
    assert p4.recommendations[0].startswith("--set model.checkpoint=true -> ")
    assert len(p4.recommendations) == 1  # checkpointing alone makes 4 samples fit

    tiny = plan.Hardware(gpu_mem_gib=room / 50, reserve=0.0)
    pt = plan.make_plan(resolve(QUICKSTART, mb4), tiny)
    assert "--set model.checkpoint=true" in pt.recommendations[0]
    assert "--set ds.bf16.enabled=true" in pt.recommendations[1]
    assert "micro-batch 1 at n = 32 still needs" in pt.recommendations[-1]


def test_smaller_micro_batch_is_recommended_when_one_sample_fits(qs_acts):
    over = ["ds.train_micro_batch_size_per_gpu=4", "ds.train_batch_size=4"]
    res = resolve(QUICKSTART, ["model.checkpoint=true", "ds.bf16.enabled=true", *over])
    acts = qs_acts
    bf16_ckpt = Variant("bf16", True)
    held = plan.make_plan(res, plan.Hardware()).states.device_total
    gib = (held + acts.peak(bf16_ckpt, 32, 2) + 1000.0) / 2**30
    p = plan.make_plan(res, plan.Hardware(gpu_mem_gib=gib, reserve=0.0))
    assert not p.fits and p.levels[0].max_micro_batch == 2
    assert p.recommendations == [
        "--set ds.train_micro_batch_size_per_gpu=2 at n = 32 (and raise "
        "gradient_accumulation_steps to keep train_batch_size = micro-batch x accumulation x 1 "
        "ranks)"
    ]


def test_levels_get_the_trainers_batch_sizes():
    over = [
        *TINY,
        "problem.res=64",
        "schedule.cycle=half-v",
        "schedule.levels=3",
        "schedule.level=[{micro_batch: 8, batch: 8}, {micro_batch: 4, batch: 8}, {}]",
    ]
    res = resolve(QUICKSTART, over)
    p = plan.make_plan(res, plan.Hardware())
    assert [(lv.res, lv.batch, lv.micro_batch) for lv in p.levels] == [
        (16, 8, 8),
        (32, 8, 4),
        (64, 4, 2),
    ]
    trainer = {v.level: (v.res, v.batch, v.micro_batch) for v in visits_for(res, 1)}
    assert [trainer[lv.level] for lv in p.levels] == [(16, 8, 8), (32, 8, 4), (64, 4, 2)]
    assert p.levels[-1].device_total == max(lv.device_total for lv in p.levels)


def test_plan_refuses_what_the_trainer_refuses_with_the_same_line(tmp_path, capsys):
    """quickstart's train_batch_size 4 and micro-batch 2 do not split over 3 ranks; 6 does."""

    def check_only(*overrides: str) -> int:
        run_dir = str(tmp_path / f"run{len(overrides)}")
        return main(
            ["train", QUICKSTART, *overrides, "--check-only", "--ranks", "3", "--run-dir", run_dir]
        )

    assert check_only() == 2
    trainer = capsys.readouterr().err.strip()
    assert main(["plan", QUICKSTART, "--gpus", "3", "--json"]) == 2
    out = capsys.readouterr()
    assert out.err.strip() == trainer and out.out == ""
    assert trainer.startswith("pdeds: error: train_batch_size 4 is not divisible")
    assert check_only("--set", "ds.train_batch_size=6") == 0
    six = resolve(QUICKSTART, [*TINY, "ds.train_batch_size=6"])
    p = plan.make_plan(six, plan.Hardware(gpus_per_node=3))
    assert [(lv.batch, lv.micro_batch) for lv in p.levels] == [(6, 2)]


def test_absurd_hardware_is_refused_and_the_largest_micro_batch_is_capped(capsys):
    for flags, fragment in (
        (["--gpu-mem", "1e30"], "--gpu-mem: must be a positive number of GiB up to 1,048,576"),
        (["--nodes", str(10**9)], "--nodes: must be an integer from 1 to 100,000"),
        (["--gpus", "100000"], "--gpus: must be an integer from 1 to 1,024"),
    ):
        assert main(["plan", QUICKSTART, *flags]) == 2
        assert fragment in capsys.readouterr().err
    huge = plan.Hardware(gpu_mem_gib=2.0**20)  # 1 PiB: memory allows ~10^7 samples
    (lv,) = plan.make_plan(resolve(QUICKSTART), huge).levels
    assert lv.max_micro_batch == resolve(QUICKSTART).cfg.data.train_samples == 64
    fresh = resolve(QUICKSTART, ["data.train_samples=0"])  # no training-set size to cap it
    assert plan.make_plan(fresh, huge).levels[0].max_micro_batch == FRESH_CAP


def test_the_plan_names_the_held_out_reference_solve():
    for over, want in (
        ([], "amg at 32^3: ~60 MiB per sample on its host"),  # 2 KiB x 30 x 32^2
        (
            ["train.reference=gmg", "train.eval_res=64"],
            "gmg at 64^3: ~93 MiB per sample on its device",
        ),
    ):
        notes = plan.make_plan(resolve(QUICKSTART, over), plan.Hardware()).notes
        assert any(want in n for n in notes), notes
    with_file = resolve(QUICKSTART, ["data.val_path=launch/configs/quickstart.yaml"])
    notes = plan.make_plan(with_file, plan.Hardware()).notes
    assert not any("held-out" in n for n in notes)


# ---- the CLI -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags,fragment",
    [
        (["--gpus", "0"], "--gpus: must be an integer from 1"),
        (["--nodes", "-2"], "--nodes: must be an integer from 1"),
        (["--gpu-mem", "-5"], "--gpu-mem: must be a positive number"),
        (["--gpu-mem", "nan"], "--gpu-mem: must be a positive number"),
        (["--host-mem", "0"], "--host-mem: must be a positive number"),
        (["--reserve", "1.0"], "--reserve: must lie in [0, 1)"),
        (["--check", "abc"], "--check: expected comma-separated node counts"),
        (["--check", "100000"], "--check: expected comma-separated node counts in 2..4096"),
        (["--gpus", "two"], "invalid int value"),
        (["--set", "model.depth=0"], "model.depth"),
    ],
)
def test_bad_flags_are_one_line_errors(flags, fragment, capsys):
    assert main(["plan", QUICKSTART, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pdeds: error: ") and "\n" not in err
    assert fragment in err


def test_cli_json_states_the_check_against_a_real_step(capsys, qs_acts):
    from pdeds.machine import cpu_capability, native_bf16

    assert (
        main(["plan", QUICKSTART, "--json", "--gpus", "2", "--set", "ds.train_batch_size=4"]) == 0
    )
    cap = capsys.readouterr()
    out = json.loads(cap.out)
    assert out["parameters"] == QUICKSTART_PARAMS and out["hardware"]["world"] == 2
    assert out["fits"] is True and out["levels"][0]["micro_batch"] == 2
    assert out["model_states"]["device_total"] == 16 * QUICKSTART_PARAMS
    check = out["check"]
    assert check["variant"] == "fp32" and check["device"] == "cpu" and check["note"] == ""
    assert (check["cpu_capability"], check["native_bf16"]) == (cpu_capability(), native_bf16())
    assert abs(check["rel_error"]) <= 0.10 and check["within_tolerance"] is True
    assert check["symbolic_bytes"] == qs_acts.peak(FP32, check["res"], check["micro_batch"])
    assert "pdeds plan: executing a fp32 training step symbolically" in cap.err
    assert "pdeds plan: measuring one real fp32 step" in cap.err


def test_a_failing_step_is_one_error_line(monkeypatch, capsys):
    def out_of_memory(fn, device):
        raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 8 GB")

    monkeypatch.setattr(measure, "measure_peak", out_of_memory)
    assert main(["plan", QUICKSTART, "--json", *(f"--set={o}" for o in TINY)]) == 2
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert out.out == "" and err[-1].startswith("pdeds: error: measuring one real fp32 step")
    assert "RuntimeError: DefaultCPUAllocator: not enough memory" in err[-1]


def test_a_16_bit_check_on_cpu_measures_fp32_and_says_why(monkeypatch):
    """Whether or not the CPU has bf16 kernels, its bf16 memory is the CPU's, not the plan's."""
    import pdeds.machine

    cpu = torch.device("cpu")
    for native, why in ((False, "no native bf16 kernels"), (True, "oneDNN reorders")):
        monkeypatch.setattr(pdeds.machine, "native_bf16", lambda native=native: native)
        var, note = measure.measured_variant(Variant("bf16", True), cpu)
        assert var == FP32_CKPT and why in note and "measured fp32+ckpt instead" in note
    assert measure.measured_variant(FP32, cpu) == (FP32, "")
    assert measure.measured_variant(Variant("bf16", True), torch.device("cuda")) == (
        Variant("bf16", True),
        "",
    )


# ---- against real DeepSpeed training steps ------------------------------------------------------


@pytest.mark.slow
def test_plan_within_10_percent_of_measured_deepspeed_steps():
    """Real DeepSpeed training steps, each in a fresh process: fp32 ZeRO 0 at n = 32, and
    bf16 + checkpointing + ZeRO 2 at n = 48 where the CPU has bf16 kernels (else fp32 +
    checkpointing). The plan includes model states and DeepSpeed's bucket."""
    from pdeds.machine import native_bf16

    small = {
        "problem": {"dim": 3, "res": 32, "modes": 6},
        "data": {"train_samples": 8, "val_samples": 2},
        "model": {"depth": 2, "width": 16},
        "optim": {"name": "adam", "lr": 1.0e-3},
        "train": {"loss_weighting": "lifting"},
        "deepspeed": {"config": "ds_configs/zero0.json"},
    }
    ckpt = ["model.checkpoint=true", "ds.zero_optimization.stage=2"]
    ckpt += ["ds.zero_optimization.reduce_bucket_size=500000"]
    ckpt += ["ds.bf16.enabled=true"] if native_bf16() else []
    rows = plan.check_steps(small, ["ds.train_batch_size=2"], [32, (48, ckpt)])
    print(plan.check_table(rows))
    for row in rows:
        assert abs(row["rel_error"]) < 0.10, row


# ---- launch/gpu_check --------------------------------------------------------------------------


def test_gpu_check_cpu_smoke_writes_json_and_markdown(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHON=sys.executable)
    done = subprocess.run(
        [str(ROOT / "launch/gpu_check"), "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] is True and report["env"]["device"] == "cpu"
    assert [r["status"] for r in report["rows"]] == ["ok"] * 4
    for r in report["rows"]:
        assert r["peak_bytes"] > 0 and r["samples_per_s"] > 0 and r["conv_gflop"] > 0
        # The dry run only exercises the code path: tiny sizes and micro-batch 1 on CPU hit
        # oneDNN workspaces of the weights that are no tensor. The planner's accuracy is
        # asserted by test_symbolic_step_is_within_10_percent_of_a_measured_step.
        assert math.isfinite(r["plan_error"])
    md = (tmp_path / "gpu_check.md").read_text()
    assert md.count("| ok |") == 4 and "conv TFLOP/s" in md


@pytest.fixture
def gpu_check():
    """launch/gpu_check.py as a module."""
    sys.path.insert(0, str(ROOT / "launch"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    return gpu_check


def test_gpu_check_records_oom_errors_and_budget_skips(gpu_check, monkeypatch):
    row = gpu_check.Row("case", 16, 1)
    ctx = {"device": torch.device("cpu"), "deepspeed": True}

    def oom(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64 GiB")

    monkeypatch.setattr(gpu_check, "_measure", oom)
    assert gpu_check.run_row(row, ctx, gpu_check.Clock(100.0))["status"] == "OOM"

    def broken(*args):
        raise ValueError("bad")

    monkeypatch.setattr(gpu_check, "_measure", broken)
    out = gpu_check.run_row(row, ctx, gpu_check.Clock(100.0))
    assert out["status"] == "error: ValueError: bad" and "traceback" in out
    assert gpu_check.run_row(row, ctx, gpu_check.Clock(1.0))["status"].startswith("skipped")
    no_ds = gpu_check.run_row(
        gpu_check.Row("z3", 16, 1, zero=3), {**ctx, "deepspeed": False}, gpu_check.Clock(100.0)
    )
    assert no_ds["status"] == "skipped: deepspeed not importable"
    md = gpu_check.markdown(
        {
            "env": {"device": "cpu", "torch": "x", "deepspeed": None},
            "wall_s": 1.0,
            "budget_s": 2.0,
            "dry_run": True,
            "rows": [out, no_ds],
        }
    )
    assert md.count("\n| ") == 3  # header + two rows


def test_gpu_check_conv_flops_match_the_layer_shapes(gpu_check):
    """FlopCounterMode on meta tensors vs 2 cin cout k^d per output node, summed by hand for a
    depth-1 U-Net (forward; backward = 2 x forward except the first conv's input gradient)."""
    cfg = UNetConfig(depth=1, width=4, blocks=1, norm="none")
    n, b = 8, 2
    fine, coarse = n**3, (n // 2) ** 3
    fwd = {
        "enc0": 2 * 4 * 4 * 27 * fine,  # features (1 + 3 channels) -> 4
        "down": 2 * 4 * 8 * 8 * coarse,  # stride-2 2^3 conv 4 -> 8
        "enc1": 2 * 8 * 8 * 27 * coarse,
        "up": 2 * 8 * 4 * 8 * coarse,  # transposed 2^3 conv 8 -> 4
        "dec0": 2 * 8 * 4 * 27 * fine,  # concat (4 + 4) -> 4
        "head": 2 * 4 * 1 * fine,
    }
    forward = b * sum(fwd.values())
    backward = 2 * forward - b * fwd["enc0"]  # no gradient w.r.t. the network's input
    assert gpu_check.conv_flops(3, cfg, n, b) == forward + backward
