"""LiSSA: the stochastic Neumann recursion ``h ← v + h − (H_B + λI) h / scale`` on
minibatches B (:class:`LiSSA`, :class:`LiSSAPreconditioner`), its automatic scale
(:func:`power_iteration`) and depth (:func:`neumann_depth`); by default solved exactly
instead on a small model when the recursion would cost more.

References:
    Agarwal et al. 2017.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from ..core.data import batch_to
from ..core.errors import ConfigError
from .base import (
    AbstractFittedPreconditioner,
    AbstractPreconditioner,
    check_damping,
    check_positive,
)
from .context import FitContext
from .damping import damping_choice
from .matrix_free import EXACT_MAX_PARAMS, ExactSwitch, MatrixFree, exact_is_cheaper, factorize

log = logging.getLogger("datatrace")


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
        op = MatrixFree(problem, self.gauss_newton, choice.value)
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


def power_iteration(op: MatrixFree, p: int, like: torch.Tensor, iters: int = 30) -> float:
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
class LiSSAPreconditioner(ExactSwitch, AbstractFittedPreconditioner):
    spec: LiSSA
    op: MatrixFree
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

    def with_damping(self, damping: float) -> LiSSAPreconditioner:
        """Another damping: the power-iteration estimate shifts by the change (no new
        products); scale and the automatic depth follow; an exact factorization kept for
        ``damping="auto"`` is refactorized."""
        op = MatrixFree(self.op.problem, self.op.gauss_newton, damping)
        largest = self.largest - self.op.damping + damping
        scale = self.spec.scale if self.spec.scale is not None else 1.5 * max(largest, 1e-12)
        depth = self.spec.depth if self.spec.depth is not None else neumann_depth(scale, damping)
        out = LiSSAPreconditioner(self.spec, op, scale, largest, depth)
        out.exact = self.exact_at(damping)
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
            self.exact = factorize(problem, self.op.gauss_newton, self.damping, self.spec.damping)
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
