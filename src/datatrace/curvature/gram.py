"""The inverse of the features' own second-moment matrix, ``(ΦᵀΦ/n + λI)⁻¹`` (TRAK).

Works on projected or exact dense features (whatever the store holds). With ``λ = 0`` it
is the Moore–Penrose pseudo-inverse (eigenvalues below ``rcond × largest`` dropped), so a
projection dimension above the rank of ``Φ`` stays well defined.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import (
    AbstractFittedPreconditioner,
    AbstractPreconditioner,
    check_damping,
    mean_squared_entry,
    resolve_damping,
    symmetric_eigh,
)
from .context import FitContext


@dataclass(frozen=True)
class GramInverse(AbstractPreconditioner):
    """Settings: ``damping`` (``None``: the default multiple of λ₀; 0: pseudo-inverse)."""

    damping: float | None = None
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
        return FittedGram(evals, evecs, resolve_damping(self.damping, lambda0), self.rcond)


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
