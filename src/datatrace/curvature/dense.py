"""Dense curvature: form the matrix, factorize, solve. The references for small models.

* :class:`ExactHessian`: the Hessian ``H`` of the mean training loss; Cholesky when
  ``H + λI`` is positive definite, else ``LDLᵀ`` with a warning.
* :class:`GaussNewton`: the same on the positive semi-definite Gauss–Newton matrix ``G``.

Iterative, matrix-free solvers are in :mod:`.cg`, :mod:`.lissa` and :mod:`.arnoldi`.

References:
    Koh and Liang 2017 (influence functions).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..core.errors import ConfigError
from .base import (
    AUTO,
    AbstractFittedPreconditioner,
    AbstractPreconditioner,
    check_damping,
    check_positive,
    symmetric_eigh,
    warn_not_positive_definite,
)
from .context import FitContext
from .damping import resolve_damping


@dataclass
class _Redampable:
    """The undamped matrix, kept (only) when fitted with ``damping="auto"``: another
    damping is then one factorization, not a new matrix (issue 12: re-forming the Hessian
    for each grid point cost up to 6× the fit)."""

    #: (M, whether it is a Hessian, the smallest Lanczos Ritz value of M found so far: an
    #: upper bound on its smallest eigenvalue), or None; not saved with the fit
    undamped: tuple[torch.Tensor, bool, float] | None = field(default=None, init=False, repr=False)

    def indefinite_below(self) -> float:
        """``−`` the Lanczos bound on the Hessian's smallest eigenvalue, when negative."""
        if self.undamped is None or not self.undamped[1]:
            return 0.0
        return max(0.0, -self.undamped[2])

    def with_damping(self, damping: float) -> AbstractFittedPreconditioner | None:
        if self.undamped is None:
            return None
        matrix, hessian, lowest = self.undamped
        out, lowest = _dense_inverse(matrix.clone(), damping, hessian, lowest)
        out.undamped = (matrix, hessian, lowest)
        return out

    def release(self) -> None:
        self.undamped = None


@dataclass
class CholeskyPreconditioner(_Redampable, AbstractFittedPreconditioner):
    """``(M + λI)⁻¹`` from the Cholesky factor of a positive definite ``M + λI``."""

    factor: torch.Tensor
    damping: float

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        return torch.cholesky_solve(vectors.T, self.factor).T


@dataclass
class LDLPreconditioner(_Redampable, AbstractFittedPreconditioner):
    """``(M + λI)⁻¹`` from the symmetric-indefinite (Bunch–Kaufman) ``LDLᵀ`` factors of an
    indefinite but invertible ``M + λI``; ``negative`` counts its negative eigenvalues
    (Sylvester's law of inertia, read off D)."""

    factors: torch.Tensor
    pivots: torch.Tensor
    damping: float
    negative: int = 0

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        return torch.linalg.ldl_solve(self.factors, self.pivots, vectors.T).T


def ldl_inertia(factors: torch.Tensor, pivots: torch.Tensor) -> int:
    """Negative eigenvalues of ``L D Lᵀ`` = negative eigenvalues of the block-diagonal D
    (1×1 blocks where the pivot is positive, 2×2 where two consecutive pivots are negative,
    LAPACK's convention)."""
    d = factors.diagonal().double().cpu()
    off = factors.diagonal(-1).double().cpu()
    piv = pivots.cpu()
    negative, k, p = 0, 0, d.numel()
    while k < p:
        if int(piv[k]) > 0 or k == p - 1:
            negative += int(d[k] < 0)
            k += 1
        else:  # 2×2 block [[d_k, o_k], [o_k, d_{k+1}]]
            det = d[k] * d[k + 1] - off[k] ** 2
            negative += 1 if det < 0 else (2 if d[k] < 0 else 0)
            k += 2
    return negative


def krylov_eigenpairs(
    apply: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor, n_iter: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ritz pairs of a symmetric operator from ``n_iter`` Arnoldi (here: Lanczos) steps with
    full reorthogonalisation: eigenvalues (m,) ascending and vectors (p, m), m <= n_iter.
    Extreme eigenvalues converge first; exact when the Krylov space becomes invariant."""
    p = like.numel()
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(p, generator=g, dtype=torch.float64).to(like)
    basis = [v / v.norm()]
    hess = torch.zeros(n_iter + 1, n_iter, dtype=v.dtype, device=v.device)
    for k in range(n_iter):
        w = apply(basis[k])
        q = torch.stack(basis)
        for _ in range(2):  # classical Gram-Schmidt, twice: keeps the basis orthogonal
            coef = q @ w
            w = w - coef @ q
            hess[: k + 1, k] += coef
        hess[k + 1, k] = w.norm()
        if float(hess[k + 1, k]) <= 1e-10 * float(hess[: k + 1, k].abs().max()):
            break  # the Krylov space is invariant: its eigenpairs are exact
        basis.append(w / hess[k + 1, k])
    m = min(len(basis), n_iter)
    small = hess[:m, :m]
    evals, evecs = symmetric_eigh((small + small.T) / 2, "the Krylov (Lanczos) tridiagonal matrix")
    return evals, torch.stack(basis[:m]).T @ evecs


def smallest_eigenvalue(matrix: torch.Tensor, n_iter: int = 80) -> float:
    """The smallest eigenvalue of a symmetric matrix from a short Lanczos run (cheap next to
    an eigendecomposition; the smallest Ritz value converges from above)."""
    evals, _ = krylov_eigenpairs(lambda v: matrix @ v, matrix[0], min(n_iter, matrix.shape[0]))
    return float(evals[0])


def _dense_inverse(
    matrix: torch.Tensor, damping: float, hessian: bool, lowest: float | None = None
) -> tuple[CholeskyPreconditioner | LDLPreconditioner, float]:
    """Cholesky when ``M + λI`` is positive definite (fast); otherwise warn with (an
    estimate of) the smallest eigenvalue and the number of negative ones, and invert by
    ``LDLᵀ`` anyway (what exact influence does); refuse for the Gauss–Newton matrix, which
    is singular then.

    For the Hessian a short Lanczos run first (≈ 0.4 s at p = 10k): its smallest Ritz value
    is an upper bound on the smallest eigenvalue, so when it is already below −λ the
    Cholesky attempt (which would fail late, after most of its work) is skipped. ``lowest``:
    that bound from an earlier call on the same matrix (another damping of a
    ``damping="auto"`` grid: the seeded run would give the same value); returned with the
    preconditioner (the longer run's, where one was made).

    ``matrix`` is consumed (λ is added to its diagonal in place: a 10k-parameter model's
    Hessian is 370 MB in float32); only its lower triangle is used by the factorizations.
    """
    what = "the Hessian" if hessian else "the Gauss-Newton matrix"
    if lowest is not None:
        estimate = lowest
    else:
        estimate = smallest_eigenvalue(matrix, n_iter=30) if hessian else math.inf
    if estimate + damping > 0:
        matrix.diagonal().add_(damping)
        factor, info = torch.linalg.cholesky_ex(matrix)
        if int(info) == 0:
            return CholeskyPreconditioner(factor, damping), estimate
        del factor
        matrix.diagonal().sub_(damping)
        lower = matrix.tril()
        matrix = lower + lower.tril(-1).T  # symmetric from the lower triangle
        del lower
        estimate = smallest_eigenvalue(matrix)  # the short run had not converged
    if not hessian:
        raise ConfigError(
            f"the Gauss-Newton matrix is singular (smallest eigenvalue ≈ {estimate:.3g})"
            f" and damping is {damping:.3g}; use damping > 0"
        )
    matrix.diagonal().add_(damping)
    factors, pivots, _ = torch.linalg.ldl_factor_ex(matrix)
    negative = ldl_inertia(factors, pivots)
    warn_not_positive_definite(min(estimate, -damping), damping, what, negative, matrix.shape[0])
    return LDLPreconditioner(factors, pivots, damping, negative), estimate


def _check_size(p: int, max_params: int, what: str) -> None:
    if p > max_params:
        gb = p * p * 8 / 1e9
        raise ConfigError(
            f"the exact {what} of {p:,} parameters is a {p:,} x {p:,} matrix ({gb:.1f} GB in "
            f"float64), above max_params={max_params:,}; select fewer parameters "
            "(params=[...]), use ConjugateGradient/LiSSA/Arnoldi/EKFAC, or raise max_params"
        )


@dataclass(frozen=True)
class ExactHessian(AbstractPreconditioner):
    """The exact Hessian of the mean training loss, eigendecomposed.

    Args:
        damping: λ (``None``: the default multiple of λ₀).
        max_params: refuse to form matrices for more parameters than this.
    """

    damping: float | str | None = None
    max_params: int = 20_000

    def __post_init__(self) -> None:
        check_damping(self.damping)
        check_positive("max_params", self.max_params)

    def fit(self, ctx: FitContext) -> CholeskyPreconditioner | LDLPreconditioner:
        _check_size(ctx.problem.p, self.max_params, "Hessian")
        damping = resolve_damping(self.damping, ctx)
        return _fit_dense(ctx.problem.hessian(symmetrize=False), damping, True, self.damping)


@dataclass(frozen=True)
class GaussNewton(AbstractPreconditioner):
    """The exact Gauss–Newton matrix ``(1/n) Σ Jᵀ ∇²_out ℓ J`` (PSD), eigendecomposed."""

    damping: float | str | None = None
    max_params: int = 20_000

    def __post_init__(self) -> None:
        check_damping(self.damping)
        check_positive("max_params", self.max_params)

    def fit(self, ctx: FitContext) -> CholeskyPreconditioner | LDLPreconditioner:
        _check_size(ctx.problem.p, self.max_params, "Gauss-Newton matrix")
        damping = resolve_damping(self.damping, ctx, gauss_newton=True)
        return _fit_dense(ctx.problem.gauss_newton(), damping, False, self.damping)


def _fit_dense(
    matrix: torch.Tensor, damping: float, hessian: bool, given: float | str | None
) -> CholeskyPreconditioner | LDLPreconditioner:
    """Factorize ``matrix + λI``; with ``damping="auto"`` keep the undamped matrix (a copy:
    the factorization consumes it) for the calibration's other grid points."""
    if given != AUTO:
        return _dense_inverse(matrix, damping, hessian)[0]
    if hessian:  # the factorizations read one triangle; the copy is used whole
        lower = matrix.tril()
        matrix = lower + lower.tril(-1).T
        del lower
    kept = matrix.clone()
    out, lowest = _dense_inverse(matrix, damping, hessian)
    out.undamped = (kept, hessian, lowest)
    return out
