"""The inverse of the features' own second-moment matrix, ``(ΦᵀΦ/n + λI)⁻¹`` (TRAK).

Works on projected or exact dense features (whatever the store holds). With ``λ = 0`` it
is the Moore–Penrose pseudo-inverse (eigenvalues below ``rcond × largest`` dropped), so a
projection dimension above the rank of ``Φ`` stays well defined.

Default damping (``damping=None``): ``GRAM_FACTOR ×`` the mean eigenvalue of ``ΦᵀΦ/n``
(= λ₀ of the features), logged. TRAK's Gram matrix is not a curvature of the loss that
needs lifting above zero; damping only regularises a (nearly) singular inverse. Issue 12
measured the undamped inverse far better than ``10 ×`` the mean eigenvalue for TRAK over
10-50 independently trained logistic regressions; on bench/defaults.py's tasks (TRAK over the
checkpoints of one SGD run, more projected dimensions than examples, so a rank-deficient
``ΦᵀΦ``) it is the other way round: the pseudo-inverse (``damping=0``) reaches LDS 0.01-0.24
where a damping near the mean eigenvalue reaches 0.21-0.70. Fraction of each task's best
(37-point grid, mean eigenvalue × 10^(k/4)) at c × the mean eigenvalue, breast cancer /
SGD digits MLP / momentum + weight decay MLP / digits CNN, full size (400 examples): c = 3:
0.98 / 0.98 / 0.99 / 0.95; 4: 0.98 / 0.99 / 0.98 / 0.96; 5: 0.99 / 1.00 / 0.97 / 0.97; 6:
0.99 / 1.00 / 0.95 / 0.97; 10 (the former rule): 1.00 / 1.00 / 0.90 / 1.00. The same
tasks at 200 examples (the check against overfitting five tasks): c = 3: 0.94 / 0.93 / 1.00
/ 0.97; 4: 0.96 / 0.96 / 1.00 / 0.98; 5: 0.97 / 0.98 / 1.00 / 0.99; 6: 0.98 / 0.99 / 0.99 /
1.00. Both sizes are above 0.95 for c in [4, 6]; 5 is the middle. ``damping=0`` gives the
published TRAK's pseudo-inverse.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import (
    AUTO,
    AbstractFittedPreconditioner,
    AbstractPreconditioner,
    check_damping,
    mean_squared_entry,
    symmetric_eigh,
)
from .context import FitContext

log = logging.getLogger("datatrace")

#: Default damping of TRAK's Gram matrix, a multiple of its mean eigenvalue (module docstring).
GRAM_FACTOR = 5.0


@dataclass(frozen=True)
class GramInverse(AbstractPreconditioner):
    """Settings: ``damping`` (``None``: the default multiple of λ₀; 0: pseudo-inverse)."""

    damping: float | str | None = None
    rcond: float = 1e-10
    accepts_projection: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_damping(self.damping)

    def fit(self, ctx: FitContext) -> FittedGram:
        gram = None
        for _, feats in ctx.train_blocks():
            (phi,) = feats.values()
            g = phi.T @ phi
            gram = g if gram is None else gram + g
        assert gram is not None
        gram = gram / ctx.problem.n
        evals, evecs = symmetric_eigh(gram, "the Gram matrix of the training features")
        # λ₀ of the projected features: trace(ΦᵀΦ)/n = Σ_i ‖φ_i‖² / n
        lambda0 = mean_squared_entry(
            float(torch.diagonal(gram).sum()) * ctx.problem.n, ctx.problem.n, gram.shape[0]
        )
        return FittedGram(evals, evecs, gram_damping(self.damping, lambda0), self.rcond)


def gram_damping(damping: float | str | None, mean_eigenvalue: float) -> float:
    """The given number, or (``None``, ``"auto"``) ``GRAM_FACTOR ×`` the Gram matrix's mean
    eigenvalue, logged."""
    if damping is not None and damping != AUTO:
        return float(damping)
    value = GRAM_FACTOR * mean_eigenvalue
    log.info(
        "damping %.3g = %g × the mean eigenvalue %.3g of the Gram matrix ΦᵀΦ/n (TRAK's rule)",
        value, GRAM_FACTOR, mean_eigenvalue,
    )  # fmt: skip
    return value


@dataclass
class FittedGram(AbstractFittedPreconditioner):
    evals: torch.Tensor
    evecs: torch.Tensor
    damping: float
    rcond: float

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        lam = self.evals + self.damping
        keep = lam > self.rcond * float(lam.abs().max())
        inv = torch.where(keep, 1.0 / torch.where(keep, lam, 1.0), 0.0)
        return ((vectors @ self.evecs) * inv) @ self.evecs.T
