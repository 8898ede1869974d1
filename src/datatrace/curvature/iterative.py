"""Matrix-free inverse-curvature solvers on the full parameter vector, for models too large
to form ``H``:

* :class:`ConjugateGradient`: CG on ``(H + λI) x = v`` with Hessian-vector products
  (one pass over the training data per iteration, all query vectors at once).
* :class:`LiSSA`: the stochastic Neumann recursion ``h ← v + h − (H_B + λI) h / scale``
  (by default solved exactly instead on a small model when the recursion would cost more).
* :class:`Arnoldi`: top-r eigenpairs by Arnoldi iteration; invert in that subspace, and
  by ``1/λ`` on its complement.

References:
    Agarwal et al. 2017 (LiSSA); Schioppa et al. 2022 (Arnoldi); Martens 2010 (CG with
    Hessian-vector products).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field

import torch

from ..core.data import batch_to
from ..core.errors import ConfigError
from .base import (
    AUTO,
    AbstractFittedPreconditioner,
    AbstractPreconditioner,
    InfluenceWarning,
    check_damping,
    check_positive,
    damping_choice,
    eigen_solve,
    resolve_damping,
    warn_not_positive_definite,
)
from .context import FitContext
from .dense import CholeskyPreconditioner, LDLPreconditioner, _fit_dense, krylov_eigenpairs
from .problem import CurvatureProblem

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


@dataclass
class _MatrixFree:
    problem: CurvatureProblem
    gauss_newton: bool
    damping: float

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(H + λI) v`` (or G) for each row."""
        return self.problem.mean_product(vectors, self.gauss_newton) + self.damping * vectors


#: The default ``max_exact_params`` of the iterative solvers (:class:`ConjugateGradient`,
#: :class:`LiSSA`, :class:`Arnoldi`): the exact solve's memory limit of ``dt.Influence()``
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


def _factorize(
    problem: CurvatureProblem, gauss_newton: bool, damping: float, given: float | str | None
) -> CholeskyPreconditioner | LDLPreconditioner:
    """The exact solve an iterative solver's default switches to: ``H + λI`` (or ``G``)
    formed and factorized (Cholesky, or ``LDLᵀ`` with a warning if indefinite)."""
    matrix = problem.gauss_newton() if gauss_newton else problem.hessian(symmetrize=False)
    return _fit_dense(matrix, damping, not gauss_newton, given)


@dataclass(frozen=True)
class ConjugateGradient(AbstractPreconditioner):
    """Block conjugate gradients on ``(H + λI) X = V``: all right-hand sides (queries) share
    one growing Krylov space, so m right-hand sides need at most about ``⌈p/m⌉``
    iterations in exact arithmetic (each iteration: one pass over the training data with
    m Hessian-vector products), never more products than forming ``H`` would take.

    Args:
        damping: λ (``None``: default).
        max_iter: iterations at most (``None``: ``2⌈p/m⌉ + 10`` for m right-hand sides,
            about twice the products of forming ``H``; block CG is exact after ``⌈p/m⌉``
            in exact arithmetic).
        tol: stop when every residual norm is below ``tol × ‖v‖`` (``None``: 1e-6). With 1e-6,
            500 queries on a 7,810-parameter digits MLP (λ = 0.1) took 9 iterations and
            gave per-query Spearman 1.0000 with the exact solve's scores
            (the former bench/solver_defaults.py, commit a55edca).
        gauss_newton: use Gauss–Newton-vector products (PSD) instead of the Hessian.
        max_exact_params: with the default ``max_iter`` and ``tol`` (both ``None``), a solve
            whose iteration budget would take at least as many curvature products as
            forming the matrix (:func:`exact_is_cheaper`) is done exactly instead, by
            factorizing ``H + λI`` (what CG converges to), when ``p <= max_exact_params``;
            logged. The default budget, ``2⌈p/m⌉ + 10`` iterations of m products, always
            exceeds the p products of forming ``H``, so the default solves exactly below
            the limit: on bench/defaults.py CG took 1.2-2.9× the exact solve's time on
            three of five tasks (0.2× on the fifth, where it converged in a few
            iterations). The factorization is kept for later solves. ``0``: always CG.

    References:
        O'Leary 1980 (block CG); Ji and Li 2017 (breakdown-free block CG: the search block
        is re-orthonormalised and rank-reduced every iteration).
    """

    damping: float | None = None
    max_iter: int | None = None
    tol: float | None = None
    gauss_newton: bool = False
    max_exact_params: int = EXACT_MAX_PARAMS

    def __post_init__(self) -> None:
        check_damping(self.damping)
        if self.max_iter is not None:
            check_positive("max_iter", self.max_iter)
        if self.tol is not None and not self.tol > 0:
            raise ConfigError(f"tol must be > 0, got {self.tol!r}")
        check_positive("max_exact_params", self.max_exact_params, minimum=0)

    def fit(self, ctx: FitContext) -> CGPreconditioner:
        op = _MatrixFree(
            ctx.problem,
            self.gauss_newton,
            resolve_damping(self.damping, ctx, gauss_newton=self.gauss_newton),
        )
        out = CGPreconditioner(op, self.max_iter, CG_TOL if self.tol is None else self.tol)
        out.keep_last = self.damping == AUTO
        if self.max_iter is None and self.tol is None:
            out.max_exact_params, out.given = self.max_exact_params, self.damping
        return out


#: ConjugateGradient's default ``tol``.
CG_TOL = 1e-6


def _orthonormal_rows(block: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (rows) of the row space of ``block`` (k, p), dropping directions
    that are numerically dependent (rank-revealing: eigenvalues of the Gram matrix of the
    row-normalised block below ``100 k eps`` of the largest), computed twice (CholeskyQR2)."""
    norms = block.norm(dim=1, keepdim=True)
    rows = block[norms[:, 0] > 0] / norms[norms[:, 0] > 0]
    eps = torch.finfo(block.dtype).eps
    for _ in range(2):
        if rows.shape[0] == 0:
            return rows
        evals, evecs = torch.linalg.eigh(rows @ rows.T)
        keep = evals > 100 * rows.shape[0] * eps * evals[-1].clamp_min(0)
        rows = (evecs[:, keep] / evals[keep].sqrt()).T @ rows
    return rows


@dataclass
class CGPreconditioner(AbstractFittedPreconditioner):
    op: _MatrixFree
    max_iter: int | None
    tol: float
    #: iterations and largest relative residual of the last solve
    iterations: int = 0
    residual: float = 0.0

    damping: float = field(init=False)
    #: keep the last (right-hand sides, solutions) to warm-start the same right-hand sides
    #: at another damping (``damping="auto"``'s grid; off otherwise: it holds m × p twice)
    keep_last: bool = field(default=False, init=False, repr=False)
    last: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False)
    #: solve exactly when cheaper (:func:`exact_is_cheaper`) for ``p`` up to this (0: never;
    #: set by :class:`ConjugateGradient` for its default settings), with the damping as
    #: given (``"auto"`` keeps the undamped matrix), and the factorization once made
    max_exact_params: int = field(default=0, init=False)
    given: float | str | None = field(default=None, init=False, repr=False)
    exact: CholeskyPreconditioner | LDLPreconditioner | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.damping = self.op.damping

    def with_damping(self, damping: float) -> CGPreconditioner:
        """The same products at another damping; solves of the right-hand sides solved last
        start from the last solutions (warm start)."""
        out = CGPreconditioner(
            _MatrixFree(self.op.problem, self.op.gauss_newton, damping), self.max_iter, self.tol
        )
        out.keep_last, out.last = self.keep_last, self.last
        out.max_exact_params, out.given = self.max_exact_params, self.given
        if self.exact is not None:
            out.exact = self.exact.with_damping(damping)  # type: ignore[assignment]
        return out

    def _iterations(self, m: int, p: int) -> int:
        """The iteration budget: ``max_iter``, or ``2⌈p/m⌉ + 10``."""
        return self.max_iter or 2 * -(-p // max(m, 1)) + 10

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        """Breakdown-free block CG (Ji and Li 2017, Algorithm 3) on the right-hand sides
        scaled to unit norm (the tolerance is relative to each); warm-started from the last
        solutions when they were kept for these right-hand sides."""
        m, p = vectors.shape
        max_iter = self._iterations(m, p)
        problem = self.op.problem
        if (
            self.exact is None
            and self.max_exact_params
            and exact_is_cheaper(problem, max_iter, m, problem.n, self.max_exact_params)
        ):
            log.info(
                "conjugate gradients: %d right-hand sides × up to %d iterations would take "
                "more curvature products than forming the %s matrix of %d parameters: "
                "solved exactly (what CG converges to) by factorizing it; give max_iter=..., "
                "tol=... or max_exact_params=0 for the iteration",
                m, max_iter, "Gauss-Newton" if self.op.gauss_newton else "Hessian", p,
            )  # fmt: skip
            self.exact = _factorize(problem, self.op.gauss_newton, self.damping, self.given)
        if self.exact is not None:
            return self.exact.solve(vectors)
        norms = vectors.norm(dim=1)
        scale = torch.where(norms == 0, torch.ones_like(norms), norms)
        r = vectors / scale[:, None]
        x = torch.zeros_like(r)
        last = self.last
        if last is not None and last[0].shape == vectors.shape and torch.equal(last[0], vectors):
            x = last[1] / scale[:, None]
            r = r - self.op.apply(x)
        search = _orthonormal_rows(r)
        warned = False
        self.iterations = 0
        for it in range(1, max_iter + 1):
            if search.shape[0] == 0:
                break
            self.iterations = it
            a_search = self.op.apply(search)  # (s, p)
            gram = search @ a_search.T
            evals, evecs = torch.linalg.eigh((gram + gram.T) / 2)
            if not warned and float(evals[0]) <= -1e3 * torch.finfo(r.dtype).eps * float(
                evals.abs().max()
            ):
                warned = True
                warnings.warn(
                    "conjugate gradients met negative curvature: H + damping is not positive "
                    "definite, so the solution is unreliable. Use gauss_newton=True or more "
                    "damping.",
                    InfluenceWarning,
                    stacklevel=2,
                )
            inv = (evecs / torch.where(evals == 0, torch.ones_like(evals), evals)) @ evecs.T
            alpha = inv @ (search @ r.T)  # (s, m)
            x += alpha.T @ search
            r -= alpha.T @ a_search
            active = r.norm(dim=1) > self.tol
            if not bool(active.any()):
                break
            z = r[active]
            beta = inv @ (a_search @ z.T)  # A-conjugacy to the previous block
            search = _orthonormal_rows(z - beta.T @ search)
        self.residual = float(r.norm(dim=1).max()) if m else 0.0
        if self.residual > self.tol and not warned:  # (negative curvature already warned)
            warnings.warn(
                f"conjugate gradients stopped after {self.iterations} iterations with a "
                f"relative residual of {self.residual:.2g} (tol {self.tol:.2g}): the "
                "solution is approximate. Raise max_iter, add damping, or use "
                "gauss_newton=True if the Hessian + damping is not positive definite.",
                InfluenceWarning,
                stacklevel=2,
            )
        log.info(
            "conjugate gradients: %d right-hand sides, %d iterations, largest relative "
            "residual %.2g (tol %.2g)",
            m,
            self.iterations,
            self.residual,
            self.tol,
        )
        out = x * scale[:, None]
        if self.keep_last:
            self.last = (vectors.clone(), out.clone())
        return out


@dataclass(frozen=True)
class LiSSA(AbstractPreconditioner):
    """LiSSA: ``h ← v + h − (H_B + λI) h / scale`` for ``depth`` steps on minibatches B;
    the estimate is ``h / scale``, averaged over ``repeat`` runs.

    Args:
        damping: λ (``None``: default).
        scale: must exceed the largest eigenvalue of ``H + λI`` (``None``: 1.5 × an estimate
            of its largest magnitude: from the default damping rule's Lanczos run when it
            ran (the Hessian, ``damping=None``), else 30 power-iteration products).
        depth: recursion steps per run (``None``: enough for the series to converge,
            ``⌈ln(100) · scale / λ⌉`` so that its remainder in the flattest directions,
            ``(1 − λ/scale)^depth``, is below 1%, within [20, 1000]; logged).
        repeat: independent runs averaged.
        batch_size: examples per minibatch Hessian-vector product (``None``: full batch;
            default 64).
        seed: minibatch sampling seed.
        gauss_newton: use Gauss–Newton-vector products.
        max_exact_params: with the automatic depth (``depth=None``), a solve whose recursion
            would take more per-example curvature products (``repeat × depth × batch ×
            right-hand sides``, each counted as :data:`LISSA_STEP_COST` of forming the
            matrix's) than forming the matrix (``p × n``) is done exactly instead,
            by Cholesky of ``H + λI`` (the series' limit, which the recursion only
            approximates), when ``p <= max_exact_params``; logged. Issue 12: 500 queries on
            a 7,850-parameter model took 424 s of recursion against 42 s exact. The
            factorization is then kept for later solves. ``0``: always the recursion.
    """

    damping: float | None = None
    scale: float | None = None
    depth: int | None = None
    repeat: int = 1
    batch_size: int | None = 64
    seed: int = 0
    gauss_newton: bool = False
    max_exact_params: int = EXACT_MAX_PARAMS

    def __post_init__(self) -> None:
        check_damping(self.damping)
        if self.depth is not None:
            check_positive("depth", self.depth)
        check_positive("repeat", self.repeat)
        if self.batch_size is not None:
            check_positive("batch_size", self.batch_size)
        if self.scale is not None and not self.scale > 0:
            raise ConfigError(f"scale must be > 0, got {self.scale!r}")
        check_positive("max_exact_params", self.max_exact_params, minimum=0)

    def fit(self, ctx: FitContext) -> LiSSAPreconditioner:
        problem = ctx.problem
        choice = damping_choice(self.damping, ctx, gauss_newton=self.gauss_newton)
        op = _MatrixFree(problem, self.gauss_newton, choice.value)
        if choice.extremes is not None:  # the rule's Lanczos run: no power iteration
            smallest, largest = choice.extremes
            top = max(abs(largest + op.damping), abs(smallest + op.damping))
        else:
            top = power_iteration(op, problem.p, problem.theta)
        scale = self.scale if self.scale is not None else 1.5 * max(top, 1e-12)
        depth = self.depth if self.depth is not None else neumann_depth(scale, op.damping)
        log.info(
            "LiSSA: scale %.3g, depth %d (series remainder in flat directions %.2g), batch size %s",
            scale,
            depth,
            (1 - min(op.damping / scale, 1.0)) ** depth,
            self.batch_size,
        )
        return LiSSAPreconditioner(self, op, scale, top, depth)


#: A LiSSA step's curvature products counted as this many of forming the matrix in
#: :func:`exact_is_cheaper`: the recursion is sequential, one small minibatch at a time,
#: while the matrix is formed in large vmapped chunks over all examples. Measured
#: (bench/defaults.py's SGD digits MLP, 2,410 parameters, 40 queries, one thread on a
#: loaded machine): depth 178 × 64 examples × a 48-vector group (0.55M products) took
#: 5.2-5.5 s against the exact solve's 2.5-3.8 s forming 0.97M, i.e. ≈ 3-5× per product;
#: counted as 1, the default iterated there (LDS 0.664 vs the exact solve's 0.669).
LISSA_STEP_COST = 4

#: Bounds of LiSSA's automatic depth: at least a few passes' worth of steps, at most the
#: old fixed default (its cost grows as scale / λ, so tiny damping is capped).
LISSA_DEPTH_RANGE = (20, 1000)


def neumann_depth(scale: float, damping: float) -> int:
    """Steps after which ``(1 − λ/scale)^depth ≤ 1%``, clipped to :data:`LISSA_DEPTH_RANGE`."""
    low, high = LISSA_DEPTH_RANGE
    if damping <= 0 or damping >= scale:
        return high if damping <= 0 else low
    steps = math.ceil(math.log(100.0) / -math.log1p(-damping / scale))
    return max(low, min(high, steps))


def power_iteration(op: _MatrixFree, p: int, like: torch.Tensor, iters: int = 30) -> float:
    """Estimate of the largest-magnitude eigenvalue of ``H + λI``."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1, p, generator=g, dtype=torch.float64).to(like)
    est = 0.0
    for _ in range(iters):
        w = op.apply(v / v.norm())
        est = float(w.norm())
        v = w
    return est


@dataclass
class LiSSAPreconditioner(AbstractFittedPreconditioner):
    spec: LiSSA
    op: _MatrixFree
    scale: float
    largest: float
    depth: int

    damping: float = field(init=False)

    def __post_init__(self) -> None:
        self.damping = self.op.damping

    def _product(self, h: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        problem = self.op.problem
        if self.spec.batch_size is None or self.spec.batch_size >= problem.n:
            return self.op.apply(h)
        idx = torch.randint(0, problem.n, (self.spec.batch_size,), generator=gen).tolist()
        batch = batch_to(problem.train.take(idx), problem.theta.device)
        prod = problem.gnvp_batch if self.op.gauss_newton else problem.hvp_batch
        return prod(h, batch) / len(idx) + self.op.damping * h

    exact: CholeskyPreconditioner | LDLPreconditioner | None = field(default=None, init=False)

    def with_damping(self, damping: float) -> LiSSAPreconditioner:
        """Another damping: the power-iteration estimate shifts by the change (no new
        products); scale and the automatic depth follow; an exact factorization kept for
        ``damping="auto"`` is refactorized."""
        op = _MatrixFree(self.op.problem, self.op.gauss_newton, damping)
        largest = self.largest - self.op.damping + damping
        scale = self.spec.scale if self.spec.scale is not None else 1.5 * max(largest, 1e-12)
        depth = self.spec.depth if self.spec.depth is not None else neumann_depth(scale, damping)
        out = LiSSAPreconditioner(self.spec, op, scale, largest, depth)
        if self.exact is not None:
            out.exact = self.exact.with_damping(damping)  # type: ignore[assignment]
        return out

    def _exact_is_cheaper(self, m: int) -> bool:
        """The automatic depth, a small enough model, and more products by recursion than
        by forming the matrix (see :class:`LiSSA`'s ``max_exact_params``)."""
        problem, spec = self.op.problem, self.spec
        if spec.depth is not None:
            return False
        batch = problem.n if spec.batch_size is None else min(spec.batch_size, problem.n)
        passes = LISSA_STEP_COST * spec.repeat * self.depth
        return exact_is_cheaper(problem, passes, m, batch, spec.max_exact_params)

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        if self.exact is None and self._exact_is_cheaper(vectors.shape[0]):
            problem = self.op.problem
            log.info(
                "LiSSA: %d right-hand sides × depth %d would take more curvature products "
                "than forming the %s matrix of %d parameters: solved exactly (the series' "
                "limit) by factorizing it; give depth=... or max_exact_params=0 for the "
                "recursion",
                vectors.shape[0], self.depth, "Gauss-Newton" if self.op.gauss_newton else "Hessian",
                problem.p,
            )  # fmt: skip
            self.exact = _factorize(problem, self.op.gauss_newton, self.damping, self.spec.damping)
        if self.exact is not None:
            return self.exact.solve(vectors)
        total = torch.zeros_like(vectors)
        vnorm = vectors.norm()
        for r in range(self.spec.repeat):
            gen = torch.Generator().manual_seed(self.spec.seed * 10_007 + r)
            h = vectors.clone()
            for step in range(self.depth):
                h = vectors + h - self._product(h, gen) / self.scale
                hn = h.norm()
                if not torch.isfinite(hn) or hn > 1e8 * max(float(vnorm), 1e-30):
                    raise ConfigError(
                        f"LiSSA diverged at step {step + 1} (|h| = {float(hn):.3g}): increase "
                        f"scale (now {self.scale:.3g}; it must exceed the largest eigenvalue "
                        f"of H + damping, estimated {self.largest:.3g}) or add damping"
                    )
            total += h / self.scale
        return total / self.spec.repeat


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
            return _factorize(problem, self.gauss_newton, damping, self.damping)
        op = _MatrixFree(problem, self.gauss_newton, 0.0)
        evals, vecs = krylov_eigenpairs(
            lambda v: op.apply(v[None])[0], problem.theta, n_iter, self.seed
        )
        keep = evals.abs().argsort(descending=True)[:rank]
        evals, vecs = evals[keep], vecs[:, keep]
        if float(evals.min()) + damping <= 0:
            warn_not_positive_definite(float(evals.min()), damping, "the Hessian")
        return EigenPreconditioner(evals, vecs, damping)
