"""What the matrix-free solvers (:mod:`.cg`, :mod:`.lissa`, :mod:`.arnoldi`) share: the
damped curvature operator ``v ↦ (H + λI) v`` (or ``G``) applied without forming ``H``, and
THE "exact when cheaper" rule by which their defaults form and factorize the matrix instead
(:func:`exact_is_cheaper`, :func:`factorize`, :class:`ExactSwitch`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .dense import CholeskyPreconditioner, LDLPreconditioner, _fit_dense
from .problem import CurvatureProblem


@dataclass
class MatrixFree:
    """``(H + λI) v`` (or ``(G + λI) v``) by curvature-vector products."""

    problem: CurvatureProblem
    gauss_newton: bool
    damping: float

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(H + λI) v`` (or G) for each row."""
        return self.problem.mean_product(vectors, self.gauss_newton) + self.damping * vectors


#: The default ``max_exact_params`` of the iterative solvers
#: (:class:`~.cg.ConjugateGradient`, :class:`~.lissa.LiSSA`, :class:`~.arnoldi.Arnoldi`):
#: the exact solve's memory limit of ``dt.Influence()``
#: (:data:`datatrace.curvature.auto.EXACT_MAX_PARAMS`, a 400 MB float32 matrix).
EXACT_MAX_PARAMS = 10_000


def exact_is_cheaper(
    problem: CurvatureProblem, passes: int, vectors: int, examples: int, max_exact_params: int
) -> bool:
    """THE "exact when cheaper" rule of the iterative solvers' defaults (issue 12): whether
    an iteration of ``passes`` curvature products, each with ``vectors`` vectors on
    ``examples`` examples, would take at least as many per-example products as forming
    the ``p × p`` matrix (``p`` vectors on all ``n`` examples), for ``p <=
    max_exact_params``; the solver then factorizes the matrix instead.

    Vectors are counted in whole groups of the size one vmapped product takes at once
    (the group that forming the matrix uses, :meth:`CurvatureProblem._vector_group`): a
    pass with one vector costs about what a pass with a group costs. Measured
    (bench/defaults.py, 5 tasks): Arnoldi's 120 single-vector passes took 1.4-6.4× the
    time of forming and factorizing H on models of 62-2,410 parameters; block CG's
    default budget took 1.2-2.9× it on three of them."""
    p, n = problem.p, problem.n
    if p > max_exact_params:
        return False
    group = problem._vector_group(8)
    iterate = passes * -(-vectors // group) * group * examples
    return iterate >= -(-p // group) * group * n


def factorize(
    problem: CurvatureProblem, gauss_newton: bool, damping: float, given: float | str | None
) -> CholeskyPreconditioner | LDLPreconditioner:
    """The exact solve an iterative solver's default switches to: ``H + λI`` (or ``G``)
    formed and factorized (Cholesky, or ``LDLᵀ`` with a warning if indefinite)."""
    matrix = problem.gauss_newton() if gauss_newton else problem.hessian(symmetrize=False)
    return _fit_dense(matrix, damping, not gauss_newton, given)


@dataclass
class ExactSwitch:
    """The exact factorization a matrix-free solver's default switched to
    (:func:`factorize`), or ``None``: re-damped with the solver (:meth:`exact_at`), its
    bound on the smallest eigenvalue reported (:meth:`indefinite_below`) and its kept
    matrix released (:meth:`release`) on the solver's behalf."""

    exact: CholeskyPreconditioner | LDLPreconditioner | None = field(default=None, init=False)

    def exact_at(self, damping: float) -> CholeskyPreconditioner | LDLPreconditioner | None:
        """The kept factorization at another damping (one refactorization), if any."""
        if self.exact is None:
            return None
        return self.exact.with_damping(damping)  # type: ignore[return-value]

    def indefinite_below(self) -> float:
        """The exact factorization's bound, once the solver has switched to one."""
        return self.exact.indefinite_below() if self.exact is not None else 0.0

    def release(self) -> None:
        """An exact factorization drops its undamped matrix."""
        if self.exact is not None:
            self.exact.release()
