"""The experiment configuration: one typed tree (``schema``), loaded and validated once (``load``).

res = resolve("launch/configs/quickstart.yaml", ["optim.lr=3e-4", "ds.train_batch_size=8"])
res.cfg.train.steps, res.view.batch_sizes(world=2), visits_for(res, world=2)
"""

from pdeds.config.load import (
    PROJECT_ROOT,
    Resolved,
    batch_sizes,
    build,
    dump_yaml,
    find_file,
    load_yaml,
    resolve,
    visits_for,
)
from pdeds.config.schema import REFERENCE_METHODS, ExperimentConfig, parse_duration

__all__ = [
    "PROJECT_ROOT",
    "REFERENCE_METHODS",
    "ExperimentConfig",
    "Resolved",
    "batch_sizes",
    "build",
    "dump_yaml",
    "find_file",
    "load_yaml",
    "parse_duration",
    "resolve",
    "visits_for",
]
