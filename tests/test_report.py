"""pdeds report on synthetic run dirs: CSV equals the inputs, efficiency, plots, broken dirs."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import yaml

from pdeds import report as rp
from pdeds.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def make_run(
    path: Path,
    *,
    ranks: int = 1,
    res: int = 16,
    batch: int = 8,
    micro: int = 2,
    optimizer: str = "adam",
    cycle: str = "single",
    zero: int = 0,
    offload: str = "none",
    step_times: tuple[float, ...] = (2.0, 1.0, 1.2, 0.8),
    evals: tuple[tuple[int, float], ...] = ((2, 0.2), (4, 0.08)),
    peak: float = 500.0,
    metrics: bool = True,
    tb_loss_shift: float = 0.0,
) -> Path:
    """A run dir as the trainer writes it: metrics.jsonl, summary.json, config, ds config, tb/."""
    from torch.utils.tensorboard import SummaryWriter

    path.mkdir(parents=True)
    rows, clock = [], 0.0
    for i, t in enumerate(step_times, 1):
        clock += t
        rows.append(
            {
                "step": i,
                "loss": 1.0 / i,
                "lr": 1e-3,
                "samples_per_s": batch / t,
                "level": 0,
                "res": res,
                "batch": batch,
                "micro_batch": micro,
                "train_s": clock,
                "samples": i * batch,
                "samples_evaluated": 3 * i * batch,
                "time_step_s": t,
                "peak_memory_mb": peak - 10 + i,
            }
        )
        for step, val in evals:
            if step == i:
                rows.append(
                    {
                        "step": i,
                        "res": res,
                        "train_s": clock,
                        "samples": i * batch,
                        "val_rel_l2_mean": val,
                        "val_rel_l2_max": 2 * val,
                    }
                )
    if metrics:
        (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tb = SummaryWriter(str(path / "tb"))
    for r in rows:
        for k, v in r.items():
            if k != "step":
                v = v + tb_loss_shift if k == "loss" else v
                tb.add_scalar(k.replace("time_", "time/"), v, r["step"])
    tb.close()
    summary = {
        "steps": len(step_times),
        "total_steps": len(step_times),
        "completed": True,
        "world_size": ranks,
        "train_time_s": clock,
        "samples_seen": len(step_times) * batch,
        "peak_memory_mb": peak,
        "val_rel_l2_mean": evals[-1][1],
    }
    (path / "summary.json").write_text(json.dumps(summary))
    config = {"problem": {"res": res}, "optim": {"name": optimizer}, "schedule": {"cycle": cycle}}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    zero_cfg: dict = {"stage": zero}
    if offload != "none":
        zero_cfg["offload_optimizer"] = {"device": "cpu"}
    if offload == "param":
        zero_cfg["offload_param"] = {"device": "cpu"}
    ds = {
        "train_batch_size": batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": batch // (micro * ranks),
        "zero_optimization": zero_cfg,
    }
    (path / "ds_config.json").write_text(json.dumps(ds))
    return path


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as fh:
        return {r["run"]: r for r in csv.DictReader(fh)}


def test_csv_numbers_equal_the_inputs(tmp_path):
    times = (3.0, 1.0, 1.5, 0.5, 2.0)
    make_run(
        tmp_path / "a",
        ranks=2,
        res=32,
        batch=8,
        micro=2,
        zero=3,
        offload="param",
        optimizer="sgd",
        cycle="v",
        step_times=times,
        evals=((3, 0.3), (5, 0.04)),
        peak=812.5,
    )
    out = tmp_path / "rep"
    assert main(["report", str(tmp_path / "a"), "--out", str(out), "--target", "0.05"]) == 0
    row = read_csv(out / "runs.csv")["a"]
    assert (row["ranks"], row["zero"], row["offload"], row["res"]) == ("2", "3", "param", "32")
    assert (row["global_batch"], row["micro_batch"], row["accumulation"]) == ("8", "2", "2")
    assert (row["optimizer"], row["cycle"]) == ("sgd", "v")
    steady = times[1:]  # the first logged step carries start-up costs
    assert float(row["step_time_s"]) == pytest.approx(statistics.median(steady))
    assert float(row["samples_per_s"]) == pytest.approx(statistics.median(8 / t for t in steady))
    assert float(row["peak_memory_mb"]) == 812.5
    assert float(row["final_val_rel_l2"]) == 0.04
    assert float(row["time_to_target_s"]) == pytest.approx(sum(times))  # reached at step 5
    assert row["samples_to_target"] == "40" and row["evaluated_to_target"] == "120"
    assert row["samples_evaluated"] == "120"
    assert row["tb_agrees"] == "True" and int(row["tb_scalars"]) >= 10
    assert row["missing"] == "" and row["completed"] == "True"
    md = (out / "report.md").read_text()
    assert "| a | 2 | 3 | param | 32 | 8 | sgd | v |" in md


def test_time_to_target_not_reached_and_no_target(tmp_path):
    make_run(tmp_path / "a", evals=((2, 0.2), (4, 0.08)))
    runs, _ = rp.collect([tmp_path / "a"], target=0.01)
    assert runs[0].row["time_to_target_s"] is None and runs[0].row["final_val_rel_l2"] == 0.08
    runs, _ = rp.collect([tmp_path / "a"], target=0.2)
    assert runs[0].row["time_to_target_s"] == pytest.approx(2.0 + 1.0)
    assert runs[0].row["samples_to_target"] == 16
    runs, _ = rp.collect([tmp_path / "a"])
    assert runs[0].row["target"] is None and runs[0].row["time_to_target_s"] is None


def test_parallel_efficiency_strong_inferred_and_weak_from_the_manifest(tmp_path):
    # Strong: the same global batch 8 on 1, 2, 4 ranks; no manifest, no "strong" in the path.
    for ranks, t in ((1, 4.0), (2, 2.5), (4, 1.6)):
        make_run(
            tmp_path / "sweep" / f"r{ranks}",
            ranks=ranks,
            batch=8,
            micro=1,
            step_times=(9.0, t, t, t),
        )
    # Weak: micro-batch 2 per rank, global 2 W; the kind comes from study.json.
    weak = tmp_path / "w"
    for ranks, t in ((1, 1.0), (2, 1.25)):
        make_run(weak / f"r{ranks}", ranks=ranks, batch=2 * ranks, micro=2, step_times=(5.0, t, t))
    manifest = {
        "study": "wk",
        "kind": "weak",
        "target": None,
        "runs": [{"name": f"r{n}", "ranks": n, "nodes": 1, "run_dir": f"r{n}"} for n in (1, 2)],
    }
    (weak / "study.json").write_text(json.dumps(manifest))
    dirs = [tmp_path / "sweep" / f"r{n}" for n in (1, 2, 4)] + [weak]
    runs, notes = rp.collect(dirs)
    eff = {(Path(r.row["path"]).parent.name, r.name): r.row for r in runs}
    assert notes == []
    # strong E(N) = N0 T0 / (N T_N); weak E(N) = T0 / T_N
    assert eff["sweep", "r1"]["efficiency"] == pytest.approx(1.0)
    assert eff["sweep", "r2"]["efficiency"] == pytest.approx(4.0 / (2 * 2.5))
    assert eff["sweep", "r4"]["efficiency"] == pytest.approx(4.0 / (4 * 1.6))
    assert {eff["sweep", f"r{n}"]["kind"] for n in (1, 2, 4)} == {"strong"}
    assert eff["w", "r2"]["efficiency"] == pytest.approx(1.0 / 1.25)
    assert eff["w", "r2"]["kind"] == "weak" and eff["w", "r2"]["study"] == "wk"
    out = tmp_path / "rep"
    result = rp.report(dirs, out)
    assert {"scaling_strong.png", "scaling_weak.png"} <= set(result["plots"])
    assert "## Parallel efficiency" in (out / "report.md").read_text()


def test_tensorboard_replaces_a_missing_metrics_file_and_is_checked(tmp_path):
    times = (2.0, 0.5, 0.25, 0.5)
    make_run(tmp_path / "tbonly", step_times=times, metrics=False)
    make_run(tmp_path / "differ", tb_loss_shift=0.5)
    runs, _ = rp.collect([tmp_path / "tbonly", tmp_path / "differ"], target=0.1)
    tbonly, differ = (r.row for r in runs)
    assert tbonly["missing"] == "metrics.jsonl"
    # TensorBoard keeps float32: the rebuilt numbers equal the inputs to that precision.
    assert tbonly["step_time_s"] == pytest.approx(0.5, rel=1e-6)
    assert tbonly["samples_per_s"] == pytest.approx(16.0, rel=1e-6)
    assert tbonly["time_to_target_s"] == pytest.approx(sum(times), rel=1e-6)
    assert tbonly["final_val_rel_l2"] == pytest.approx(0.08, rel=1e-6)
    assert differ["tb_agrees"] is False and tbonly["tb_agrees"] is None


def test_broken_run_dirs_are_reported_not_fatal(tmp_path, capsys):
    good = make_run(tmp_path / "good")
    (tmp_path / "empty").mkdir()
    corrupt = make_run(tmp_path / "corrupt")
    (corrupt / "summary.json").write_text("{not json")
    (corrupt / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n[oops\n')
    out = tmp_path / "rep"
    args = [str(good), str(tmp_path / "empty"), str(corrupt), str(tmp_path / "ghost")]
    assert main(["report", *args, "--out", str(out)]) == 0
    rows = read_csv(out / "runs.csv")
    assert rows["good"]["missing"] == ""
    assert set(rows["empty"]["missing"].split("; ")) == set(rp.RUN_FILES)
    assert "summary.json (unreadable" in rows["corrupt"]["missing"]
    assert "metrics.jsonl (1 unreadable line)" in rows["corrupt"]["missing"]  # one row kept
    assert rows["corrupt"]["res"] == "16" and rows["corrupt"]["ranks"] == "1"  # from ds_config
    assert rows["ghost"]["missing"] == "the run directory"
    md = (out / "report.md").read_text()
    assert "| empty |" in md and "missing: summary.json" in md
    assert "runs with missing files" in capsys.readouterr().out
    assert main(["report", str(good), "--out", str(out)]) == 2
    assert "already holds a report" in capsys.readouterr().err
    assert main(["report", str(good), "--out", str(out), "--force"]) == 0
    # Paths that hold no run at all (a typo, the wrong folder) are one error; nothing written.
    nothing = tmp_path / "rep2"
    for paths in ([tmp_path / "ghost"], [tmp_path / "empty", tmp_path / "ghost"]):
        assert main(["report", *map(str, paths), "--out", str(nothing)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("pdeds: error: no run found in") and err.count("\n") == 1
        assert not nothing.exists()


def test_every_plot_is_drawn_when_the_data_allows(tmp_path):
    dirs = [
        make_run(tmp_path / "s1", ranks=1, cycle="single", evals=((2, 0.2), (4, 0.12))),
        make_run(tmp_path / "s2", ranks=2, cycle="single", step_times=(2.0, 0.6, 0.6, 0.6)),
        make_run(tmp_path / "s3", ranks=1, cycle="v", step_times=(1.0, 0.5, 0.5, 0.5)),
        make_run(tmp_path / "s4", ranks=1, optimizer="sgd", res=32, peak=2000.0),
    ]
    out = tmp_path / "rep"
    result = rp.report(dirs, out, target=0.1)
    want = {
        "scaling_strong.png",
        "time_to_target_cycle.png",
        "time_to_target_optimizer.png",
        "val_vs_time.png",
        "memory_vs_res.png",
    }
    assert want <= set(result["plots"])
    for name in want:
        assert (out / name).read_bytes()[:8] == PNG
    assert any("weak scaling" in s for s in result["skipped"])
    md = (out / "report.md").read_text()
    assert "![time and samples to the target per cycle](time_to_target_cycle.png)" in md
    assert "target not reached" in md  # s1 ends at 0.12 > 0.1


def test_a_study_folder_stands_for_its_runs(tmp_path, capsys):
    study = tmp_path / "st"
    make_run(study / "r1")
    manifest = {
        "study": "st",
        "kind": "strong",
        "target": 0.1,
        "runs": [
            {
                "name": "r1",
                "ranks": 1,
                "nodes": 1,
                "run_dir": "r1",
                "memory": {"need_bytes": 3 * 2**29, "rank0_bytes": 3 * 2**28, "fits": True},
            },
            {"name": "r8", "ranks": 8, "nodes": 4, "run_dir": "r8", "script": "r8.sbatch"},
        ],
    }
    (study / "study.json").write_text(json.dumps(manifest))
    out = tmp_path / "rep"
    assert main(["report", str(study), "--out", str(out)]) == 0
    rows = read_csv(out / "runs.csv")
    assert list(rows) == ["r1"] and rows["r1"]["target"] == "0.1"
    assert rows["r1"]["nodes"] == "1" and rows["r1"]["kind"] == "strong"
    assert float(rows["r1"]["time_to_target_s"]) == pytest.approx(5.0)
    assert float(rows["r1"]["planned_memory_mb"]) == 768.0  # the manifest's rank-0 plan
    assert "| planned (MiB) |" in (out / "report.md").read_text()
    assert "r8: not run yet (r8.sbatch)" in capsys.readouterr().out
