"""The worked example of CONTRIBUTING.md: a new preconditioner and a new recipe, each added
with one registry line. tests/test_contributing.py imports this file and checks that the
registry, `datatrace evaluate` and `datatrace score` pick both up unchanged."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import datatrace as dt
from datatrace.app.registry import MethodEntry, register
from datatrace.curvature import AbstractFittedPreconditioner, FitContext, GramInverse
from datatrace.curvature.base import check_damping
from datatrace.curvature.damping import resolve_damping


# 1. A preconditioner: one frozen settings class with fit(ctx), one fitted class with solve.
@dataclass(frozen=True)
class DiagonalFisher(dt.AbstractPreconditioner):
    """``(diag(F) + λI)⁻¹`` with F the empirical Fisher, ``F_kk = (1/n) Σ_i g_ik²``.

    Args:
        damping: λ (``None``: datatrace's default multiple of λ₀).
    """

    damping: float | None = None

    def __post_init__(self) -> None:
        check_damping(self.damping)

    def fit(self, ctx: FitContext) -> FittedDiagonal:
        diagonal = None
        for _, feats in ctx.train_blocks():  # dense per-example gradients, (block, p)
            sq = (feats["dense"] ** 2).sum(0)
            diagonal = sq if diagonal is None else diagonal + sq
        assert diagonal is not None
        return FittedDiagonal(
            diagonal / ctx.problem.n, resolve_damping(self.damping, ctx, True, factored=True)
        )


@dataclass
class FittedDiagonal(AbstractFittedPreconditioner):
    diagonal: torch.Tensor
    damping: float

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors / (self.diagonal + self.damping)


# 2. A recipe: a new combination of existing slots (LoGra-style: Kronecker-projected
#    gradients of every Linear layer, preconditioned by the inverse of their Gram matrix).
def LoGra(
    projection_dim: int = 1024, damping: float | None = None, seed: int = 0
) -> dt.GradientAttributor:
    """LoGra-style influence (Choe et al. 2024): ``φ = P_out G P_inᵀ``, ``(ΦᵀΦ/n + λI)⁻¹``."""
    spec = dt.FeatureSpec(
        projection_dim=projection_dim, projection_seed=seed, kronecker=True, factored=False
    )
    return dt.GradientAttributor(spec, preconditioner=GramInverse(damping), name="LoGra")


# 3. One registry line each (in a contribution: added to REGISTRY in datatrace/app/registry.py).
def register_examples() -> None:
    register(
        "diag_fisher",
        MethodEntry(
            lambda o: dt.Influence(DiagonalFisher(damping=o.damping)),
            "diagonal empirical-Fisher influence",
            damped=True,
        ),
    )
    register(
        "logra",
        MethodEntry(lambda o: LoGra(o.trak_dim, o.damping), "LoGra-style influence", damped=True),
    )
