"""Matrix-free inverse-curvature solvers on the full parameter vector, for models too large
to form ``H``:

* :class:`ConjugateGradient`: CG on ``(H + λI) x = v`` with Hessian-vector products
  (one pass over the training data per iteration, all query vectors at once).
* :class:`LiSSA`: the stochastic Neumann recursion ``h ← v + h − (H_B + λI) h / scale``.
* :class:`Arnoldi`: top-r eigenpairs by Arnoldi iteration; invert in that subspace.

References:
    Agarwal et al. 2017 (LiSSA); Schioppa et al. 2022 (Arnoldi); Martens 2010 (CG with
    Hessian-vector products).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from ..core.data import batch_to
from ..core.errors import ConfigError
from .base import (
    AbstractFittedPreconditioner,
    AbstractPreconditioner,
    InfluenceWarning,
    check_damping,
    check_positive,
    eigen_solve,
    resolve_damping,
    warn_not_positive_definite,
)
from .context import FitContext
from .dense import krylov_eigenpairs
from .problem import CurvatureProblem


@dataclass
class EigenPreconditioner(AbstractFittedPreconditioner):
    """``(H + λI)⁻¹`` from (some of) the eigenpairs of H."""

    evals: torch.Tensor
    evecs: torch.Tensor
    damping: float

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        return eigen_solve(self.evals, self.evecs, self.damping, vectors)


@dataclass
class _MatrixFree:
    problem: CurvatureProblem
    gauss_newton: bool
    damping: float

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(H + λI) v`` (or G) for each row."""
        return self.problem.mean_product(vectors, self.gauss_newton) + self.damping * vectors


@dataclass(frozen=True)
class ConjugateGradient(AbstractPreconditioner):
    """Conjugate gradients on ``(H + λI) x = v``, all right-hand sides at once.

    Args:
        damping: λ (``None``: default).
        max_iter: iterations at most (one pass over the training data each).
        tol: stop when every residual norm is below ``tol × ‖v‖``.
        gauss_newton: use Gauss–Newton-vector products (PSD) instead of the Hessian.
    """

    damping: float | None = None
    max_iter: int = 100
    tol: float = 1e-8
    gauss_newton: bool = False

    def __post_init__(self) -> None:
        check_damping(self.damping)
        check_positive("max_iter", self.max_iter)
        if not self.tol > 0:
            raise ConfigError(f"tol must be > 0, got {self.tol!r}")

    def fit(self, ctx: FitContext) -> CGPreconditioner:
        op = _MatrixFree(ctx.problem, self.gauss_newton, resolve_damping(self.damping, ctx.lambda0))
        return CGPreconditioner(op, self.max_iter, self.tol)


@dataclass
class CGPreconditioner(AbstractFittedPreconditioner):
    op: _MatrixFree
    max_iter: int
    tol: float
    iterations: int = 0

    damping: float = field(init=False)

    def __post_init__(self) -> None:
        self.damping = self.op.damping

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        x = torch.zeros_like(vectors)
        r = vectors.clone()
        d = r.clone()
        rr = (r * r).sum(1)
        stop = (self.tol * vectors.norm(dim=1)) ** 2
        warned = False
        for it in range(1, self.max_iter + 1):
            active = rr > stop
            if not bool(active.any()):
                break
            ad = self.op.apply(d)
            curv = (d * ad).sum(1)
            # converged rows (residual at round-off level) can show d·Ad <= 0 from round-off
            eps = torch.finfo(vectors.dtype).eps
            live = active & (rr > (1e3 * eps) ** 2 * (vectors * vectors).sum(1))
            if bool((curv[live] <= 0).any()) and not warned:
                warned = True
                warnings.warn(
                    "conjugate gradients met negative curvature: H + damping is not positive "
                    "definite, so the solution is unreliable. Use gauss_newton=True or more "
                    "damping.",
                    InfluenceWarning,
                    stacklevel=2,
                )
            alpha = torch.where(active, rr / torch.where(curv == 0, 1.0, curv), 0.0)
            x += alpha[:, None] * d
            r -= alpha[:, None] * ad
            rr_new = (r * r).sum(1)
            beta = torch.where(active, rr_new / torch.where(rr == 0, 1.0, rr), 0.0)
            d = r + beta[:, None] * d
            rr = rr_new
            self.iterations = it
        return x


@dataclass(frozen=True)
class LiSSA(AbstractPreconditioner):
    """LiSSA: ``h ← v + h − (H_B + λI) h / scale`` for ``depth`` steps on minibatches B;
    the estimate is ``h / scale``, averaged over ``repeat`` runs.

    Args:
        damping: λ (``None``: default).
        scale: must exceed the largest eigenvalue of ``H + λI`` (``None``: 1.5 × a power-
            iteration estimate of it).
        depth: recursion steps per run.
        repeat: independent runs averaged.
        batch_size: examples per minibatch Hessian-vector product (``None``: full batch).
        seed: minibatch sampling seed.
        gauss_newton: use Gauss–Newton-vector products.
    """

    damping: float | None = None
    scale: float | None = None
    depth: int = 1000
    repeat: int = 1
    batch_size: int | None = None
    seed: int = 0
    gauss_newton: bool = False

    def __post_init__(self) -> None:
        check_damping(self.damping)
        check_positive("depth", self.depth)
        check_positive("repeat", self.repeat)
        if self.batch_size is not None:
            check_positive("batch_size", self.batch_size)
        if self.scale is not None and not self.scale > 0:
            raise ConfigError(f"scale must be > 0, got {self.scale!r}")

    def fit(self, ctx: FitContext) -> LiSSAPreconditioner:
        problem = ctx.problem
        op = _MatrixFree(problem, self.gauss_newton, resolve_damping(self.damping, ctx.lambda0))
        top = power_iteration(op, problem.p, problem.theta)
        scale = self.scale if self.scale is not None else 1.5 * max(top, 1e-12)
        return LiSSAPreconditioner(self, op, scale, top)


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

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(vectors)
        vnorm = vectors.norm()
        for r in range(self.spec.repeat):
            gen = torch.Generator().manual_seed(self.spec.seed * 10_007 + r)
            h = vectors.clone()
            for step in range(self.spec.depth):
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


@dataclass(frozen=True)
class Arnoldi(AbstractPreconditioner):
    """Top-``rank`` eigenpairs of H (by magnitude) from ``n_iter`` Arnoldi steps with full
    reorthogonalisation; ``(H + λI)⁻¹`` is applied in that subspace only (Schioppa et al.).

    Args:
        rank: eigenpairs kept (<= number of parameters).
        damping: λ (``None``: default).
        n_iter: Krylov dimension (``None``: ``min(p, 2 × rank + 20)``).
        seed: start vector seed.
        gauss_newton: use Gauss–Newton-vector products.
    """

    rank: int = 50
    damping: float | None = None
    n_iter: int | None = None
    seed: int = 0
    gauss_newton: bool = False

    def __post_init__(self) -> None:
        check_damping(self.damping)
        check_positive("rank", self.rank)
        if self.n_iter is not None:
            check_positive("n_iter", self.n_iter)

    def fit(self, ctx: FitContext) -> EigenPreconditioner:
        problem = ctx.problem
        p = problem.p
        if self.rank > p:
            raise ConfigError(
                f"Arnoldi rank {self.rank} is larger than the number of parameters ({p}); "
                f"use rank <= {p}"
            )
        damping = resolve_damping(self.damping, ctx.lambda0)
        op = _MatrixFree(problem, self.gauss_newton, 0.0)
        n_iter = min(p, self.n_iter if self.n_iter is not None else 2 * self.rank + 20)
        n_iter = max(n_iter, self.rank)
        evals, vecs = krylov_eigenpairs(
            lambda v: op.apply(v[None])[0], problem.theta, n_iter, self.seed
        )
        keep = evals.abs().argsort(descending=True)[: self.rank]
        evals, vecs = evals[keep], vecs[:, keep]
        if float(evals.min()) + damping <= 0:
            warn_not_positive_definite(float(evals.min()), damping, "the Hessian")
        return EigenPreconditioner(evals, vecs, damping)
