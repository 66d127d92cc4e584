"""Studies: axis expansion, batch sizes per kind, scripts for runs that do not fit, execution."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from trainer_util import write_tiny

from pdeds import study as st
from pdeds.cli import main
from pdeds.config import batch_sizes, resolve
from pdeds.errors import PdedsError
from pdeds.study import runner

MACHINE = {"cores": 2, "gpus": 0, "memory_gib": 8.0}


def write_study(tmp_path: Path, name: str = "s", **spec) -> Path:
    """A study over the tiny experiment (tests/trainer_util.TINY), on a pinned 2-core machine."""
    base = tmp_path / "tiny.yaml"
    if not base.exists():
        write_tiny(base, train={"steps": 2})
    data = {"base": "tiny.yaml", "machine": MACHINE, **spec}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def expanded(path: Path) -> tuple[st.Study, list[st.Run]]:
    study = st.load_study(path)
    runs = st.expand(study)
    st.validate(study, runs)
    return study, runs


def test_strong_scaling_keeps_the_global_batch_and_derives_micro_and_accumulation(tmp_path):
    path = write_study(
        tmp_path,
        kind="strong",
        axes={"ranks": [1, 2, 4, 8]},
        set=["ds.train_batch_size=8"],
        cluster={"ranks_per_node": 2},
    )
    study, runs = expanded(path)
    # G = 8 fixed; the base micro-batch 2 is kept while it divides 8 / W, else it shrinks.
    want = {
        "r1": (1, 1, (8, 2, 4), True),
        "r2": (2, 1, (8, 2, 2), True),
        "r4": (4, 2, (8, 2, 1), False),
        "r8": (8, 4, (8, 1, 1), False),
    }
    assert [r.name for r in runs] == list(want)
    for r in runs:
        ranks, nodes, batch, fits = want[r.name]
        assert (r.ranks, r.nodes, r.batch, r.fits) == (ranks, nodes, batch, fits)
        res = resolve(study.base, r.all_overrides(study))
        assert batch_sizes(res.ds, r.ranks) == batch
        assert res.ds["train_batch_size"] == 8
    assert runs[0].all_overrides(study).count("ds.train_batch_size=8") == 1


def test_strong_scaling_with_a_batch_axis_and_a_non_dividing_rank_count(tmp_path):
    path = write_study(tmp_path, kind="strong", axes={"ranks": [1, 2], "batch": [4, 6]})
    _, runs = expanded(path)
    assert [(r.name, r.batch) for r in runs] == [
        ("r1_gb4", (4, 2, 2)),
        ("r1_gb6", (6, 2, 3)),
        ("r2_gb4", (4, 2, 1)),
        ("r2_gb6", (6, 1, 3)),
    ]
    bad = write_study(tmp_path, "bad", kind="strong", axes={"ranks": [1, 3]}, machine={"cores": 4})
    with pytest.raises(PdedsError, match=r"study run r3: .*global batch 4.*3 ranks"):
        st.expand(st.load_study(bad))
    micro = write_study(tmp_path, "mb", kind="strong", axes={"ranks": [2], "micro_batch": [3]})
    with pytest.raises(PdedsError, match=r"study run r2_mb3: 2 samples per rank"):
        st.expand(st.load_study(micro))


def test_weak_scaling_fixes_the_per_rank_micro_batch(tmp_path):
    path = write_study(
        tmp_path,
        kind="weak",
        axes={"ranks": [1, 2, 4], "micro_batch": [1, 2]},
        cluster={"ranks_per_node": 2},
    )
    study, runs = expanded(path)
    assert len(runs) == 6
    for r in runs:
        m = r.values["micro_batch"]
        assert r.name == f"r{r.ranks}_mb{m}"
        assert r.batch == (m * r.ranks, m, 1)
        assert f"ds.train_batch_size={m * r.ranks}" in r.overrides
    with pytest.raises(PdedsError, match="weak scaling .* remove axes.batch"):
        st.load_study(write_study(tmp_path, "w2", kind="weak", axes={"batch": [4]}))


def test_comparison_is_the_plain_product_and_maps_axes_to_keys(tmp_path):
    path = write_study(
        tmp_path,
        kind="comparison",
        axes={"optimizer": ["adam", "sgd"], "zero": [0, 2], "res": [16, 32]},
    )
    study, runs = expanded(path)
    assert len(runs) == 8
    assert runs[0].name == "z0_res16_adam" and runs[-1].name == "z2_res32_sgd"
    for r in runs:
        cfg = resolve(study.base, r.all_overrides(study))
        assert cfg.cfg.optim.name == r.values["optimizer"]
        assert cfg.cfg.problem.res == r.values["res"]
        assert cfg.ds["zero_optimization"]["stage"] == r.values["zero"]
        assert r.batch == (4, 2, 2) and r.fits


def test_offload_and_cycle_axes(tmp_path):
    path = write_study(
        tmp_path,
        kind="comparison",
        axes={"zero": [3], "offload": ["none", "optimizer", "param"], "cycle": ["single", "v"]},
        set=["optim.name=adam", "train.steps=4"],
    )
    study, runs = expanded(path)
    devices = {}
    for r in runs:
        res = resolve(study.base, r.all_overrides(study))
        zero = res.ds["zero_optimization"]
        devices[r.values["offload"]] = tuple(
            (zero.get(k) or {}).get("device", "none")
            for k in ("offload_optimizer", "offload_param")
        )
        levels = 2 if r.values["cycle"] == "v" else 1
        assert res.cfg.schedule.cycle == r.values["cycle"] and res.cfg.schedule.levels == levels
    assert devices == {
        "none": ("none", "none"),
        "optimizer": ("cpu", "none"),
        "param": ("cpu", "cpu"),
    }
    bad = write_study(tmp_path, "b", axes={"zero": [2], "offload": ["param"]})
    with pytest.raises(PdedsError, match=r"study run z2_offparam: parameter offload needs ZeRO"):
        expanded(bad)
    kfac = write_study(tmp_path, "k", axes={"zero": [3], "optimizer": ["kfac"]})
    with pytest.raises(PdedsError, match=r"study run z3_kfac: optim.name 'kfac'.*ZeRO stage 3"):
        expanded(kfac)


@pytest.mark.parametrize(
    "spec, needle",
    [
        ({"axes": {"gpus": [1]}}, "unknown axis 'gpus'"),
        ({"axes": {"ranks": [1, 1]}}, "lists a value twice"),
        ({"axes": {"zero": [4]}}, "ZeRO stage 4"),
        ({"axes": {"offload": ["nvme"]}}, "'nvme' is not one of"),
        ({"kind": "diagonal"}, "kind 'diagonal'"),
        ({"axes": {"res": [6]}}, "study run res6: .*n=6 is coarser"),
        ({"set": ["optim.lrate=1"]}, "unknown key"),
        ({"axes": {"ranks": [4]}}, "study run r4: 4 ranks do not fit .*cluster.ranks_per_node"),
        ({"cluster": {"launcher": "pbs"}}, "cluster.launcher: 'pbs'"),
        ({"cluster": {"memory_gib": 0}}, r"cluster.memory_gib: must be > 0 GiB, got 0"),
        ({"machine": {**MACHINE, "cores": 0}}, r"machine.cores must be an integer >= 1"),
        (
            {"machine": {**MACHINE, "gpus": 1, "gpu_mem_gib": 0}},
            r"machine.gpu_mem_gib must be > 0 with gpus 1; give it, or set machine.check_memory",
        ),
    ],
)
def test_bad_studies_are_one_clear_error(tmp_path, capsys, spec, needle):
    path = write_study(tmp_path, **spec)
    assert main(["study", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pdeds: error:") and err.count("\n") == 1
    assert re.search(needle, err), err


def _exec_line(script: str) -> list[str]:
    line = next(x for x in script.splitlines() if x.startswith("exec "))
    return shlex.split(line)


def test_runs_that_do_not_fit_become_scripts(tmp_path, capsys):
    out = tmp_path / "out"
    path = write_study(
        tmp_path,
        kind="strong",
        axes={"ranks": [4, 8]},
        set=["ds.train_batch_size=8"],
        cluster={"ranks_per_node": 2, "threads_per_rank": 3, "partition": "RM"},
    )
    assert main(["study", str(path), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "r4: written, not run" in text and "r8: written, not run" in text
    study = st.load_study(path)
    for r in st.expand(study):
        script = (out / f"{r.name}.sbatch").read_text()
        assert f"#SBATCH --nodes={r.ranks // 2}\n" in script
        assert "#SBATCH --partition=RM\n" in script and "export RANKS_PER_NODE=2\n" in script
        assert "export THREADS=3\n" in script
        argv = _exec_line(script)
        assert argv[:3] == ["exec", "bash", "launch/slurm/cpu_cluster.sh"]
        assert argv[argv.index("--run-dir") + 1] == str(out / r.name)
        assert argv[argv.index("--resume") + 1] == "auto"
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        assert sets == r.all_overrides(study)
        micro = 2 if r.ranks == 4 else 1  # 8 / W samples per rank, one micro-batch
        assert f"ds.train_micro_batch_size_per_gpu={micro}" in sets
        assert "ds.gradient_accumulation_steps=1" in sets
        assert subprocess.run(["bash", "-n", str(out / f"{r.name}.sbatch")]).returncode == 0
    manifest = json.loads((out / "study.json").read_text())
    assert manifest["kind"] == "strong"
    assert [(x["name"], x["nodes"], x["script"]) for x in manifest["runs"]] == [
        ("r4", 2, "r4.sbatch"),
        ("r8", 4, "r8.sbatch"),
    ]
    assert not (out / "r4").exists()


@pytest.mark.parametrize("launcher", ["hostfile", "slurm_gpu"])
def test_hostfile_and_gpu_scripts(tmp_path, launcher):
    path = write_study(
        tmp_path,
        kind="weak",
        axes={"ranks": [4]},
        cluster={"launcher": launcher, "ranks_per_node": 2},
    )
    out = tmp_path / "o"
    out.mkdir()
    study, runs = expanded(path)
    st.write_scripts(study, runs, out, lambda s: None)
    if launcher == "hostfile":
        script = (out / "r4.sh").read_text()
        assert _exec_line(script)[:3] == ["exec", "launch/multinode", "$hostfile"]
        dry = tmp_path / "dry.sh"
        dry.write_text(script.replace("exec launch/multinode", "echo would run"))
        for hosts, ok in (
            ("a slots=2\nb slots=2 \n# c\n\n", True),
            ("a slots=2\nb slots=4\n", False),
            ("a slots=2\n", False),
        ):
            (tmp_path / "hosts").write_text(hosts)
            env = {"HOSTFILE": str(tmp_path / "hosts"), "PATH": "/usr/bin:/bin"}
            done = subprocess.run(
                ["bash", str(dry)], cwd=st.PROJECT_ROOT, env=env, capture_output=True, text=True
            )
            assert (done.returncode == 0) == ok, done.stderr
            assert ("would run" in done.stdout) == ok
    else:
        script = (out / "r4.sbatch").read_text()
        assert "#SBATCH --gpus-per-node=2\n" in script and "#SBATCH --nodes=2\n" in script
        assert "launch/slurm/gpu_cluster.sh" in script and "RANKS_PER_NODE" not in script
    assert "ds.train_batch_size=8" in _exec_line(script)


def test_dry_run_prints_the_table_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    path = write_study(
        tmp_path, kind="strong", axes={"ranks": [1, 2, 4]}, cluster={"ranks_per_node": 2}
    )
    assert main(["study", str(path), "--dry-run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    row = {ln.split()[0]: ln.split() for ln in lines if ln.startswith("r")}
    assert row["r1"][1:7] == ["1", "1", "4", "=", "2", "x"]
    assert row["r2"][-3:] == ["here", "new", "-"] and row["r4"][-3:-1] == ["slurm_cpu", "script"]
    assert "r1: " in text and "launch/local 1 " in text and "--set ds.train_batch_size=4" in text
    assert "r4: sbatch " in text
    assert not out.exists()
    assert main(["study", str(path), "--dry-run", "--only", "r5"]) == 2
    assert "no run named r5" in capsys.readouterr().err


def _fake_launcher(tmp_path: Path, monkeypatch, outcome: dict[str, str]) -> Path:
    """Replace launch/local by a script that records its argv and completes or fails a run."""
    calls = tmp_path / "calls.jsonl"
    code = (
        "import json, sys, pathlib\n"
        "argv = sys.argv[1:]\n"
        f"open({str(calls)!r}, 'a').write(json.dumps(argv) + '\\n')\n"
        "d = pathlib.Path(argv[argv.index('--run-dir') + 1])\n"
        f"outcome = {outcome!r}[d.name]\n"
        "print('fake run', d.name)\n"
        "if outcome == 'fail': sys.exit(3)\n"
        "d.mkdir(parents=True, exist_ok=True)\n"
        "(d / 'summary.json').write_text(json.dumps({'completed': True}))\n"
    )
    real = st.local_command

    def fake(study, run, out, cwd=None):
        return [sys.executable, "-c", code, *real(study, run, out, cwd)[1:]]

    monkeypatch.setattr(runner, "local_command", fake)  # the name execute() calls
    return calls


def test_failures_do_not_stop_the_others_and_partial_runs_resume(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    path = write_study(tmp_path, axes={"optimizer": ["adam", "sgd", "adamw", "lbfgs"]})
    (out / "sgd").mkdir(parents=True)
    (out / "sgd" / "config.yaml").write_text("problem: {}\n")  # a run stopped half-way
    (out / "adamw").mkdir()
    (out / "adamw" / "stray.txt").write_text("x")  # a start that died before config.yaml
    (out / "lbfgs").mkdir()
    (out / "lbfgs" / "summary.json").write_text(json.dumps({"completed": True}))
    calls = _fake_launcher(tmp_path, monkeypatch, {"adam": "fail", "sgd": "ok", "adamw": "ok"})
    assert main(["study", str(path), "--out", str(out)]) == 1
    text = capsys.readouterr().out
    argvs = {Path(a[a.index("--run-dir") + 1]).name: a for a in map(json.loads, calls.open())}
    assert set(argvs) == {"adam", "sgd", "adamw"}  # lbfgs was complete: skipped
    assert "--resume" not in argvs["adam"] and "--force" not in argvs["adam"]
    assert argvs["sgd"][-2:] == ["--resume", "auto"]
    assert argvs["adamw"][-1] == "--force"
    assert "adam: FAILED (exit 3)" in text and "fake run adam" in text
    assert "lbfgs: done already, skipped" in text and "failed: adam" in text
    assert "fake run adam" in (out / "adam.log").read_text()


def test_a_tiny_study_runs_here_and_a_rerun_skips_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the launcher's default oversubscribes a busy box
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    out = tmp_path / "out"
    path = write_study(tmp_path, kind="strong", axes={"ranks": [1]}, target=0.5)
    assert main(["study", str(path), "--out", str(out)]) == 0, (out / "r1.log").read_text()
    summary = json.loads((out / "r1" / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == 2 and summary["world_size"] == 1
    ds = json.loads((out / "r1" / "ds_config.json").read_text())
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"]) == (4, 2)
    manifest = json.loads((out / "study.json").read_text())
    assert manifest["target"] == 0.5
    # The planned need bounds the run's measured peak (max RSS), not by more than 2x.
    rows = [json.loads(x) for x in (out / "r1" / "metrics.jsonl").read_text().splitlines()]
    rss = max(r.get("peak_memory_mb", 0.0) for r in rows) * 2**20
    need = manifest["runs"][0]["memory"]["need_bytes"]
    assert rss < need < 2 * rss, (rss, need)
    log = (out / "r1.log").read_text()
    assert "launch/local 1" in log and "step 2/2" in log
    capsys.readouterr()
    t0 = time.perf_counter()
    assert main(["study", str(path), "--out", str(out)]) == 0
    assert "r1: done already, skipped" in capsys.readouterr().out
    assert time.perf_counter() - t0 < 10
    assert (out / "r1.log").read_text() == log


def test_runs_that_do_not_fit_memory_become_scripts(tmp_path, capsys):
    """On a pinned 1 GiB machine (0.9 GiB usable): one rank at 16^3 fits; two ranks do not (two
    resident processes); one rank at 64^3 does not (its reference AMG solve, 2 KiB per unknown).
    They go to the cluster, planned there when the study says its nodes' memory."""
    from pdeds.plan import GiB
    from pdeds.study import memory

    out = tmp_path / "out"
    tight = {**MACHINE, "memory_gib": 1.0}
    spec = dict(kind="comparison", axes={"ranks": [1, 2], "res": [16, 64]}, machine=tight)
    first = path = write_study(tmp_path, cluster={"ranks_per_node": 2}, **spec)
    assert main(["study", str(path), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    row = {ln.split()[0]: ln.split() for ln in text.splitlines() if ln.startswith("r")}
    # columns ... memory where state overrides (one --set each: problem.res=N)
    assert row["r1_res16"][-3:-1] == ["here", "new"] and not row["r1_res16"][-4].endswith("!")
    for name in ("r2_res16", "r1_res64", "r2_res64"):
        assert row[name][-4:-1] == ["-", "slurm_cpu", "script"]  # the cluster's memory unknown
        assert re.search(rf"  {name}: not run here: it needs [0-9.]+ GiB of host memory", text)
    study, runs = expanded(path)
    st.check_memory(study, runs)
    assert [r.name for r in runs if r.fits] == ["r1_res16"]
    assert [r.name for r in runs if r.memory is not None] == ["r1_res16"]
    # The same numbers from plan_run on this machine's one node.
    here = {}
    for r in runs:
        res = resolve(study.base, r.all_overrides(study))
        here[r.name] = st.plan_run(res, st.Nodes(1, r.ranks, 1.0))
        assert here[r.name].usable == pytest.approx(0.9 * GiB)
        assert here[r.name].need >= r.ranks * memory.RANK_RESIDENT
        assert here[r.name].fits == (r.name == "r1_res16")
    cfg64 = resolve(study.base, runs[1].all_overrides(study)).cfg
    e64 = memory.reference_bytes(cfg64)
    assert e64 == 2048.0 * 62 * 64**2  # reference.BYTES_PER_UNKNOWN["amg"] x free nodes
    assert here["r1_res64"].need >= e64 + memory.RANK_RESIDENT
    # Cluster nodes of 4 GiB take them all; nodes of 0.8 GiB are flagged before submission.
    for node_gib, fits in ((4.0, True), (0.8, False)):
        cluster = {"ranks_per_node": 2, "memory_gib": node_gib}
        path = write_study(tmp_path, f"c{node_gib}", cluster=cluster, **spec)
        out = tmp_path / f"out{node_gib}"
        assert main(["study", str(path), "--out", str(out), "--dry-run"]) == 0
        text = capsys.readouterr().out
        row = {ln.split()[0]: ln.split() for ln in text.splitlines() if ln.startswith("r")}
        for name in ("r2_res16", "r1_res64", "r2_res64"):
            assert row[name][-4].endswith(f"/{0.9 * node_gib:.1f}GiB" + ("" if fits else "!"))
            assert (f"{name}: WILL NOT FIT on the slurm_cpu nodes" in text) != fits
        study, runs = expanded(path)
        st.check_memory(study, runs)
        (out.parent / f"o{node_gib}").mkdir()
        st.write_scripts(study, runs, out.parent / f"o{node_gib}", lambda s: None)
        head = (out.parent / f"o{node_gib}" / "r1_res64.sbatch").read_text()
        assert "# Not run on the machine that wrote it: it needs" in head
        assert ("# Memory plan on these nodes: fits needs" in head) == fits
        assert ("WILL NOT FIT: it needs" in head) != fits
    # GPU nodes: planned per GPU.
    gpu = {"launcher": "slurm_gpu", "ranks_per_node": 2, "memory_gib": 64, "gpu_mem_gib": 0.5}
    study, runs = expanded(write_study(tmp_path, "g", cluster=gpu, **spec))
    st.check_memory(study, runs)
    for r in runs[1:]:
        assert r.memory.what == "device" and r.memory.usable == pytest.approx(0.45 * GiB)
        assert r.memory.where == "slurm_gpu"
    # Without the memory check, ranks alone decide.
    assert main(["study", str(first), "--dry-run", "--no-memory-check"]) == 0
    text = capsys.readouterr().out
    row = {ln.split()[0]: ln.split() for ln in text.splitlines() if ln.startswith("r")}
    names = ("r1_res16", "r2_res16", "r1_res64", "r2_res64")
    assert all(row[n][-3] == "here" and row[n][-4] == "-" for n in names)
    off = write_study(tmp_path, "off", axes={"res": [64]}, machine={**tight, "check_memory": False})
    assert main(["study", str(off), "--dry-run"]) == 0
    assert re.search(r"res64 +1 +1 +4 = 2 x 2 x 1 +- +here", capsys.readouterr().out)


def test_detected_memory_is_what_is_available(tmp_path):
    from pdeds.machine import available_memory_gib

    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   2097152 kB\n")
    assert available_memory_gib(str(info)) == 2.0
    info.write_text("garbage\n")
    assert available_memory_gib(str(info)) > 0  # falls back to physical memory
