"""The numerical core: diffusivity family, FEM energy, reference solver, error metrics."""
