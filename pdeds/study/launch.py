"""How a run starts: ``launch/local`` here, a SLURM or hostfile script for runs that do not fit.

Runs that fit this machine start as ``launch/local N BASE --run-dir OUT/NAME --set ...``. The
others are written as ``OUT/NAME.sbatch`` (``launch/slurm/cpu_cluster.sh`` or
``gpu_cluster.sh``) or ``OUT/NAME.sh`` (``launch/multinode`` with a hostfile), each with
``--resume auto`` so a requeued or resubmitted job continues from its newest checkpoint.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from pathlib import Path

from pdeds.config import PROJECT_ROOT
from pdeds.study.expansion import Run
from pdeds.study.spec import Study


def show_path(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when it lies below it, else absolute."""
    path = Path(os.path.abspath(path))
    try:
        return str(path.relative_to(os.path.abspath(root)))
    except ValueError:
        return str(path)


def set_flags(overrides: list[str]) -> list[str]:
    """``--set KEY=VALUE`` for each override, in order."""
    return [x for o in overrides for x in ("--set", o)]


def local_command(study: Study, run: Run, out: Path, cwd: Path | None = None) -> list[str]:
    """``launch/local N BASE --run-dir OUT/NAME --set ...`` with paths relative to ``cwd``."""
    cwd = cwd or Path.cwd()
    return [
        show_path(PROJECT_ROOT / "launch" / "local", cwd),
        str(run.ranks),
        show_path(study.base, cwd),
        "--run-dir",
        show_path(out / run.name, cwd),
        *set_flags(run.all_overrides(study)),
    ]


def script_path(study: Study, run: Run, out: Path) -> Path:
    suffix = ".sh" if study.cluster.launcher == "hostfile" else ".sbatch"
    return out / f"{run.name}{suffix}"


def _train_args(study: Study, run: Run, out: Path) -> str:
    """The pdeds train arguments of a script, paths relative to the project root."""
    args = [
        show_path(study.base, PROJECT_ROOT),
        "--run-dir",
        show_path(out / run.name, PROJECT_ROOT),
        "--resume",
        "auto",
        *set_flags(run.all_overrides(study)),
    ]
    return " ".join(shlex.quote(a) for a in args)


def script_text(study: Study, run: Run, out: Path) -> str:
    """A ready-to-submit script for a run that does not fit here (``--resume auto``: a requeued
    or resubmitted job continues from its newest checkpoint)."""
    c = study.cluster
    rpn = run.ranks // run.nodes
    head = (
        f"#!/usr/bin/env bash\n# pdeds study {study.name}, run {run.name}: {run.ranks} ranks on "
        f"{run.nodes} node(s), {rpn} per node ({study.kind}).\n"
        f"# Written by `pdeds study {show_path(study.path, PROJECT_ROOT)}`.\n"
    )
    if run.not_here:
        head += f"# Not run on the machine that wrote it: it {run.not_here} (pdeds plan).\n"
    if run.memory is not None:
        verdict = "fits" if run.memory.fits else "WILL NOT FIT: it"
        head += f"# Memory plan on these nodes: {verdict} {run.memory.reason()}.\n"
    if c.launcher == "hostfile":
        hostfile = shlex.quote(c.hostfile)
        return (
            head + "# Run on the first node, from the project root: "
            f"HOSTFILE=hosts bash {show_path(script_path(study, run, out), PROJECT_ROOT)}\n"
            "set -euo pipefail\n"
            '[ -f launch/multinode ] || { echo "run this from the pdeds project root" >&2; '
            "exit 2; }\n"
            f'hostfile="${{HOSTFILE:-{hostfile}}}"\n'
            "hosts() { awk '!/^[[:space:]]*#/ && NF' \"$hostfile\"; }\n"
            "nodes=$(hosts | wc -l)\n"
            "slots=$(hosts | awk '{for (i = 2; i <= NF; i++) if ($i == \"slots="
            f"{rpn}\") n++}} END {{print n + 0}}')\n"
            f'if [ "$nodes" -ne {run.nodes} ] || [ "$slots" -ne {run.nodes} ]; then\n'
            f'    echo "$hostfile lists $nodes node(s), $slots with slots={rpn}; run {run.name} '
            f'needs {run.nodes} nodes with slots={rpn}" >&2\n    exit 2\nfi\n'
            f'exec launch/multinode "$hostfile" {_train_args(study, run, out)}\n'
        )
    gpu = c.launcher == "slurm_gpu"
    cluster_script = "launch/slurm/gpu_cluster.sh" if gpu else "launch/slurm/cpu_cluster.sh"
    sbatch = [
        f"--job-name=pdeds-{run.name}",
        f"--nodes={run.nodes}",
        "--ntasks-per-node=1",
        "--exclusive",
        f"--time={c.time}",
        f"--output={show_path(out, PROJECT_ROOT)}/{run.name}-%j.out",
    ]
    if gpu:
        sbatch.append(f"--gpus-per-node={rpn}")
    sbatch += [f"--partition={c.partition}"] * (c.partition is not None)
    sbatch += [f"--account={c.account}"] * (c.account is not None)
    env = [] if gpu else [f"export RANKS_PER_NODE={rpn}"]
    if c.threads_per_rank and not gpu:
        env.append(f"export THREADS={c.threads_per_rank}")
    submit = show_path(script_path(study, run, out), PROJECT_ROOT)
    return (
        head
        + f"# Submit from the project root: sbatch {submit}\n"
        + "".join(f"#SBATCH {s}\n" for s in sbatch)
        + "set -euo pipefail\n"
        + 'cd "${SLURM_SUBMIT_DIR:-.}"\n'
        + f'[ -f {cluster_script} ] || {{ echo "submit from the pdeds project root" >&2; '
        "exit 2; }\n"
        + "".join(f"{e}\n" for e in env)
        + f"exec bash {cluster_script} {_train_args(study, run, out)}\n"
    )


def write_scripts(study: Study, runs: list[Run], out: Path, say: Callable[[str], None]) -> None:
    """Write each non-fitting run's script; a differing existing one is left as is."""
    for r in runs:
        if r.fits:
            continue
        path = script_path(study, r, out)
        text = script_text(study, r, out)
        if path.is_file() and path.read_text() != text:
            say(
                f"{r.name}: {path} differs from the study's script; left as is (delete it to "
                "regenerate)"
            )
            continue
        path.write_text(text)
        path.chmod(0o755)
        say(f"{r.name}: written, not run: {path}")
