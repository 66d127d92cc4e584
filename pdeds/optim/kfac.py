"""K-FAC preconditioned optimizer for Linear and (transposed) convolution layers (issue 5)."""

from __future__ import annotations

from dataclasses import dataclass

INNER_OPTIMIZERS = ("sgd", "adam")


@dataclass
class KFACConfig:
    """The ``optim.kfac`` section (``optim.lr`` is the learning rate of the inner update)."""

    damping: float = 1e-3
    """Tikhonov damping gamma added to the eigenvalues of A (x) G: (A (x) G + gamma I)^-1."""
    factor_decay: float = 0.95
    """Running-average weight xi: A <- xi A + (1 - xi) A_batch (the same for G)."""
    factor_update_steps: int = 1
    """Recompute the factors A, G every this many optimizer steps."""
    inv_update_steps: int = 10
    """Recompute the eigendecompositions of A, G every this many optimizer steps."""
    kl_clip: float = 1e-3
    """KL-clip: scale the preconditioned gradient by min(1, sqrt(kl_clip / (lr^2 sum v.g)));
    0 disables it."""
    inner: str = "sgd"
    """Update applied to the preconditioned gradient: "sgd" (with optim.momentum) or "adam"."""
