"""Studies: one YAML expands into runs; those that fit here run, the others become scripts.

``pdeds study STUDY.yaml`` (``pdeds.cli.study``) does, in order::

    study = load_study(path)            # spec: the YAML, checked once
    runs = expand(study)                # expansion: axes -> runs, batch sizes, overrides
    validate(study, runs)               # expansion: every run checked as its ranks will
    check_memory(study, runs)           # memory: planned where they go; too big here -> script
    print(table(study, runs, out))      # overview: the plan; manifest(): OUT/study.json
    write_scripts(study, runs, out, say)  # launch: sbatch / hostfile scripts for the rest
    failed = execute(study, runs, out, say)  # runner: the runs that fit, via launch/local

Modules, one concept each:

- :mod:`pdeds.study.spec`: the study YAML (keys, axes), ``Machine``, ``Cluster``, ``Study``.
- :mod:`pdeds.study.expansion`: ``Run``; axes -> runs, names, nodes, strong / weak /
  comparison batch arithmetic (G = m a W), ``--set`` overrides, the per-run checks.
- :mod:`pdeds.study.memory`: each run's memory planned where it goes (``pdeds plan``).
- :mod:`pdeds.study.launch`: the ``launch/local`` command and the SLURM / hostfile scripts.
- :mod:`pdeds.study.runner`: run-dir states, running the runs that fit (skip / resume).
- :mod:`pdeds.study.overview`: the ``--dry-run`` table and the study.json manifest.
"""

from __future__ import annotations

from pdeds.config import PROJECT_ROOT
from pdeds.study.expansion import (
    BATCH_KEYS,
    NAME_PREFIX,
    Run,
    check_run,
    expand,
    run_name,
    validate,
)
from pdeds.study.launch import local_command, script_path, script_text, write_scripts
from pdeds.study.memory import MemoryFit, Nodes, check_memory, plan_run
from pdeds.study.overview import MANIFEST, manifest, table
from pdeds.study.runner import RESUME_FLAGS, execute, run_state
from pdeds.study.spec import (
    AXES,
    INT_AXES,
    KINDS,
    LAUNCHERS,
    OFFLOADS,
    STUDY_KEYS,
    Cluster,
    Machine,
    Study,
    load_study,
)

__all__ = [
    "AXES",
    "BATCH_KEYS",
    "INT_AXES",
    "KINDS",
    "LAUNCHERS",
    "MANIFEST",
    "NAME_PREFIX",
    "OFFLOADS",
    "PROJECT_ROOT",
    "RESUME_FLAGS",
    "STUDY_KEYS",
    "Cluster",
    "Machine",
    "MemoryFit",
    "Nodes",
    "Run",
    "Study",
    "check_memory",
    "check_run",
    "execute",
    "expand",
    "load_study",
    "local_command",
    "manifest",
    "plan_run",
    "run_name",
    "run_state",
    "script_path",
    "script_text",
    "table",
    "validate",
    "write_scripts",
]
