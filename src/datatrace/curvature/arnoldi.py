"""Arnoldi: the top-r eigenpairs of H by Arnoldi iteration (:class:`Arnoldi`), inverted in
that subspace and by ``1/λ`` on its complement (:class:`EigenPreconditioner`).

References:
    Schioppa et al. 2022.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..core.errors import ConfigError
from .base import (
    AbstractFittedPreconditioner,
    AbstractPreconditioner,
    check_damping,
    check_positive,
    eigen_solve,
    warn_not_positive_definite,
)
from .context import FitContext
from .damping import resolve_damping
from .dense import CholeskyPreconditioner, LDLPreconditioner, krylov_eigenpairs
from .matrix_free import EXACT_MAX_PARAMS, MatrixFree, exact_is_cheaper, factorize

log = logging.getLogger("datatrace")


@dataclass
class EigenPreconditioner(AbstractFittedPreconditioner):
    """``(H + λI)⁻¹`` from r eigenpairs ``(Λ, U)`` of H, with H taken as 0 on the rest:
    ``U (Λ + λ)⁻¹ Uᵀ v + (v − U Uᵀ v) / λ``. Exact at full rank; below it the complement
    term keeps every direction H has not been probed in (scaled by 1/λ, what ``H + λI``
    does there when H is small), so damping still matters and scores degrade gracefully
    as the rank drops. With ``damping == 0`` the complement is dropped (the pseudo-inverse
    in the subspace)."""

    evals: torch.Tensor
    evecs: torch.Tensor
    damping: float

    def with_damping(self, damping: float) -> EigenPreconditioner:
        return EigenPreconditioner(self.evals, self.evecs, damping)

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        inside = eigen_solve(self.evals, self.evecs, self.damping, vectors)
        if self.damping == 0:
            return inside
        return inside + (vectors - (vectors @ self.evecs) @ self.evecs.T) / self.damping


#: Arnoldi's default rank (at most p).
ARNOLDI_RANK = 50


@dataclass(frozen=True)
class Arnoldi(AbstractPreconditioner):
    """Top-``rank`` eigenpairs of H (by magnitude) from ``n_iter`` Arnoldi steps with full
    reorthogonalisation; ``(H + λI)⁻¹ ≈ U (Λ + λ)⁻¹ Uᵀ + (I − U Uᵀ) / λ``: exact in that
    subspace, ``1/λ`` on its complement (Schioppa et al. drop the complement, which made
    damping have no effect and cost LDS 0.80 → 0.34 at rank 50 on digits, issue 12).

    Args:
        rank: eigenpairs kept (<= number of parameters; ``None``: ``min(50, p)``).
        damping: λ (``None``: default).
        n_iter: Krylov dimension (``None``: ``min(p, 2 × rank + 20)``).
        seed: start vector seed.
        gauss_newton: use Gauss–Newton-vector products.
        max_exact_params: with the default ``rank`` and ``n_iter`` (both ``None``), when the
            ``n_iter`` single-vector products would cost at least as much as forming the
            matrix (:func:`exact_is_cheaper`; a single-vector pass costs about a vmapped
            group's) and ``p <= max_exact_params``, the fit forms and factorizes
            ``H + λI`` instead: Arnoldi at full rank (with the complement term) is that
            exact solve; logged. On bench/defaults.py the 120 Arnoldi products took
            1.4-6.4× the exact solve's time on all five tasks (62-2,410 parameters).
            ``0``: always Arnoldi.
    """

    rank: int | None = None
    damping: float | None = None
    n_iter: int | None = None
    seed: int = 0
    gauss_newton: bool = False
    max_exact_params: int = EXACT_MAX_PARAMS

    def __post_init__(self) -> None:
        check_damping(self.damping)
        if self.rank is not None:
            check_positive("rank", self.rank)
        if self.n_iter is not None:
            check_positive("n_iter", self.n_iter)
        check_positive("max_exact_params", self.max_exact_params, minimum=0)

    def fit(
        self, ctx: FitContext
    ) -> EigenPreconditioner | CholeskyPreconditioner | LDLPreconditioner:
        problem = ctx.problem
        p = problem.p
        if self.rank is not None and self.rank > p:
            raise ConfigError(
                f"Arnoldi rank {self.rank} is larger than the number of parameters ({p}); "
                f"use rank <= {p}"
            )
        rank = self.rank if self.rank is not None else min(ARNOLDI_RANK, p)
        damping = resolve_damping(self.damping, ctx, gauss_newton=self.gauss_newton)
        n_iter = min(p, self.n_iter if self.n_iter is not None else 2 * rank + 20)
        n_iter = max(n_iter, rank)
        if (
            self.rank is None
            and self.n_iter is None
            and exact_is_cheaper(problem, n_iter, 1, problem.n, self.max_exact_params)
        ):
            log.info(
                "Arnoldi: %d products (rank %d) would cost more than forming the %s matrix "
                "of %d parameters: solved exactly (Arnoldi at full rank) by factorizing it; "
                "give rank=..., n_iter=... or max_exact_params=0 for the iteration",
                n_iter, rank, "Gauss-Newton" if self.gauss_newton else "Hessian", p,
            )  # fmt: skip
            return factorize(problem, self.gauss_newton, damping, self.damping)
        op = MatrixFree(problem, self.gauss_newton, 0.0)
        evals, vecs = krylov_eigenpairs(
            lambda v: op.apply(v[None])[0], problem.theta, n_iter, self.seed
        )
        keep = evals.abs().argsort(descending=True)[:rank]
        evals, vecs = evals[keep], vecs[:, keep]
        if float(evals.min()) + damping <= 0:
            warn_not_positive_definite(float(evals.min()), damping, "the Hessian")
        return EigenPreconditioner(evals, vecs, damping)
