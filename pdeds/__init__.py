"""pdeds: data-free neural solvers for -div(nu grad u) = f, trained with DeepSpeed."""

__version__ = "0.1.0"
