"""The default damping: THE rule, per kind of curvature, and the measurements that chose it.

Damping: every preconditioner takes ``damping=None`` (the default: :func:`curvature_damping`,
the ONE rule, from the curvature itself), ``"auto"`` (calibrated against further training by
the method that fits it; here the rule's value stands in) or a number ``>= 0`` used as is.
The value used is reported as ``fitted.damping``; the fit log (INFO, logger ``datatrace``)
says how the default was chosen.

The rule (:func:`curvature_damping`), per kind of curvature:

* the Hessian (indefinite for networks trained the usual way, which do not stop at a
  minimum): a short Lanczos run (``LANCZOS_STEPS`` Hessian-vector products, ``torch.func``)
  estimates its most negative eigenvalue ``λ_min`` and a Hutchinson estimate
  (``TRACE_VECTORS`` Rademacher vectors, one vmapped pass) its mean eigenvalue
  ``trace(H)/p``; damping ``max(HESSIAN_FLOOR × λ₀, NEGATIVE_FACTOR × |λ_min|,
  TRACE_FACTOR × trace(H)/p)``: ``H + λI`` positive definite with margin, and never small
  next to the curvature's own scale (a CNN whose negative eigenvalues are many and small
  wanted several times ``2 |λ_min|``), while a convex model keeps little damping;
* the exact Gauss–Newton matrix (``GaussNewton``; CG, LiSSA, Arnoldi with
  ``gauss_newton=True``): ``GN_HESSIAN_FRACTION ×`` the Hessian rule's value, i.e.
  ``max(1.5 λ₀, |λ_min|, 1.5 trace(H)/p)`` of the Hessian: the GN drops the Hessian's
  residual term, whose size ``|λ_min|`` measures, and wants to be damped by about as much;
* K-FAC and EK-FAC: ``KRONECKER_FACTOR ×`` the mean of their own fitted eigenvalues
  (:func:`kronecker_damping`; EK-FAC's is ``trace(G)/p`` of the Gauss–Newton matrix it
  approximates, estimated from the same passes): free, no gradient pass for λ₀;
* DataInf (a factored approximation without eigenvalues of its own): ``GN_FACTOR × λ₀``;
* TRAK's Gram matrix ``ΦᵀΦ/n``: ``GRAM_FACTOR ×`` its mean eigenvalue (see
  :mod:`.gram`).

``λ₀`` is the mean squared per-example gradient entry (Grosse et al. 2023), the mean
eigenvalue of the empirical Fisher. The constants were chosen with ``bench/defaults.py``
(see each constant and bench/RESULTS.md): a 29-point damping grid (λ₀ × 10^(k/4)) per task
and preconditioner, each spectrum quantity measured exactly (full eigendecomposition) beside
its cheap estimate, and each candidate rule checked on the five tasks at 400 training
examples and again at 200 (other models, other subsets):

================  =========  =======  ==========  ======  ========
exact Hessian     logreg_bc  mlp_sgd  mlp_mom_wd  CNN     diabetes
================  =========  =======  ==========  ======  ========
best (× λ₀)       1.8        32       18          56      3.2
|λ_min| (× λ₀)    0          15.6     10.5        8.0     2.8
mean eig. (× λ₀)  1.8        2.5      6.0         13.1    1.6
former rule       0.99       1.00     1.00        0.83 ✗  0.96
this rule         0.97       1.00     1.00        0.98    0.96
this rule, n=200  1.00       1.00     1.00        0.93    0.98
================  =========  =======  ==========  ======  ========

(fractions of each task's best LDS; the CNN at 200 examples is within 0.02 of its best, the
target's other arm). Not met on an ad-hoc sixth task (a breast-cancer MLP, momentum and
weight decay, not in the suite): it wants 31-178 λ₀ (4-24 × ``|λ_min|``, 13-73 × the mean
eigenvalue) and both rules give 14.5 λ₀ (0.80 of its best); the momentum + weight decay
digits MLP caps at 5.3 × ``|λ_min|`` and 9.4 × the mean, so neither quantity fixes it.

Lanczos with 20 products found 68% of the CNN's ``|λ_min|`` (its 380
negative eigenvalues of 994 are spread out); 40 products find it, but the CNN wants 4-100 ×
``|λ_min|`` anyway, while diabetes wants 1.2-2 × (its best band is 3.2-5.6 λ₀): no multiple
of ``|λ_min|`` alone serves both; the mean eigenvalue separates them.

The Gauss–Newton family's λ₀ multiple is a compromise the suite cannot settle: K-FAC/EK-FAC
on the diabetes regression want ≤ 0.6 λ₀ (0.85-0.87 of their best at 3 λ₀), on breast
cancer ≥ 1 λ₀ (its softmax leaves half the Kronecker eigenvalues near zero); a multiple of
the Kronecker factors' mean eigenvalue has the same conflict (a window of 0.29-0.35 of it at
400 examples, gone at 200). It was ``3 × λ₀`` (worst 0.85, diabetes) until the fifth session.

A fourth session measured the family on a 37-point grid (λ₀ × 10^(k/4), k = -20..16), both
sizes (bench/RESULTS.md, "Gauss–Newton family damping"). For K-FAC and EK-FAC no rule in
``c × Q`` works, Q any of λ₀, the exact GN's mean eigenvalue or its quantiles, the K-FAC
eigenvalues' mean, quantiles or maximum, or the Hessian rule's value, nor per-layer
``c ×`` each layer's mean eigenvalue, nor π-damping (factored Tikhonov): the digits CNN at
200 examples wants ≤ 0.1 λ₀ (its LDS falls steadily with damping), breast cancer at 200
≥ 1.8 λ₀, and every such Q is larger (relative to λ₀) on the CNN than on breast cancer (the
closest, the GN's 90% quantile, 0.41 × as large), so no monotone combination of them
separates the two. For the exact GN, ``c ×`` the Hessian rule meets the target on all ten
(task, size) points for c in [0.42, 0.75] (``3 × λ₀``: six below target, e.g. the SGD
MLP 0.80, the CNN 0.83): ``GN_HESSIAN_FRACTION = 0.5``.

The fifth session read the same grids against each fit's own mean eigenvalue (the quantity
K-FAC and EK-FAC have for free once fitted; EK-FAC's is ``trace(G)/p``, sampled labels
included): ``1 ×`` it fails 2 of the ten suite points for either (K-FAC: the CNN at 200,
diabetes at 400; EK-FAC the same two) where ``3 × λ₀`` failed 3 (those two and diabetes
at 200), and 3 of 12 with the sixth task for EK-FAC (3 × λ₀: 3), 4 for K-FAC (3 × λ₀: 5):
see :data:`KRONECKER_FACTOR`. It also spares K-FAC/EK-FAC the loss-gradient column the
factor pass pulled back to measure λ₀ (1.4 of 6.0 s of the GPT-2 benchmark's factor pass).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .base import AUTO, DAMPING_FLOOR

if TYPE_CHECKING:
    from .context import FitContext

log = logging.getLogger("datatrace")


#: The Hessian rule's margin: ``damping >= NEGATIVE_FACTOR × |λ_min|`` leaves ``H + λI``'s
#: smallest eigenvalue at least ``(NEGATIVE_FACTOR − 1) × |λ_min|`` above zero. A few Lanczos
#: steps underestimate ``|λ_min|`` (the smallest Ritz value converges from above), hence
#: the factor 2 and not 1.
NEGATIVE_FACTOR = 2.0
#: The Hessian rule's floor, a multiple of λ₀ (a convex model's damping). bench/defaults.py
#: (LDS), L2 logistic regression on breast cancer, exact Hessian at λ₀ × 1/2/3/5/10: quick
#: (200 examples) 0.690/0.707/0.716/0.720/0.701, full (400) 0.857/0.862/0.855/0.841/0.812;
#: 3 is within 0.007 of the best on both (10, chosen from the quick run alone, lost 0.045 in
#: the full one). On the networks the |λ_min| term decides (digits MLP: 2 × |λ_min| ≈ 68 λ₀,
#: the best point).
HESSIAN_FLOOR = 3.0
#: DataInf's damping, a multiple of λ₀ (K-FAC's and EK-FAC's until the fifth session:
#: :data:`KRONECKER_FACTOR`; positive semi-definite: no |λ_min| term).
#: bench/defaults.py --quick, LDS at λ₀ × 1 / 3 / 10: diabetes regression MLP, EK-FAC
#: 0.336/0.300/0.269, exact GN 0.323/0.330/0.299; SGD digits MLP, EK-FAC 0.754/0.785/0.801,
#: exact GN 0.604/0.683/0.760; breast cancer (full), EK-FAC 0.738/0.746/0.725, K-FAC
#: 0.652/0.676/0.677. Worst fraction of the best: 0.79 at 1, 0.89 at 3, 0.80 at 10. (Where
#: the Hessian is indefinite the GN family wanted more: the SGD MLP's best was at 10-100 λ₀.)
GN_FACTOR = 3.0
#: K-FAC's and EK-FAC's damping, a multiple of the mean of their own fitted eigenvalues
#: (K-FAC: of ``S ⊗ A``, i.e. ``Σ_l tr S_l tr A_l / p``; EK-FAC: of the refitted ``Λ``,
#: i.e. ``trace(G)/p``). bench/gn_damping.py (37-point grids, bench/RESULTS.md
#: "Gauss–Newton family damping"), fraction of each task's best LDS at 1 × the mean / at
#: 3 λ₀, 400 examples then 200: EK-FAC breast cancer 1.00/1.00, 0.98/1.00; SGD digits MLP
#: 1.00/1.00, 0.95/0.97; momentum + weight decay MLP 0.99/1.00, 0.98/0.98; CNN 0.94/0.98
#: (within 0.02 of its best), 0.79/0.82 ✗; diabetes 0.90/0.85 ✗, 0.94/0.89 (✗ at 3 λ₀);
#: K-FAC 1.00/1.00, 0.99/0.98; 0.99/1.00, 0.95/0.98; 1.00/1.00, 0.98/0.99; 0.94/0.99,
#: 0.78/0.81 ✗; 0.91/0.86 ✗, 0.96/0.92 (✗ at 3 λ₀). c = 1 fails the fewest points of any
#: c for both (the mean is 1.5-16 λ₀ across the tasks).
KRONECKER_FACTOR = 1.0
#: The exact Gauss–Newton matrix's damping, a fraction of the Hessian rule's value (the GN
#: drops the residual term ``Σ_k ∂ℓ/∂f_k ∇²f_k``, indefinite and as large as ``|λ_min|``
#: where the Hessian is indefinite). bench/RESULTS.md ("Gauss–Newton family damping"): LDS of
#: ``dt.GaussNewton`` over λ₀ × 10^(k/4), k = -20..16, fraction of each task's best at
#: 3 λ₀ / 0.5 × the Hessian rule (the default fitted): 400 examples: breast cancer
#: 0.99/0.99, SGD digits MLP 0.80/0.96, momentum + weight decay MLP 0.93/0.99, CNN
#: 0.83/0.94 (within 0.02 of its best), diabetes 0.98/0.99; 200 examples: 1.00/0.99,
#: 0.85/0.99, 0.94/1.00, 0.86/0.95, 1.00/0.99. Every fraction in [0.42, 0.75] meets the
#: target on all ten (interpolated on the grid); 0.5 is inside. The ad-hoc breast-cancer
#: MLP (momentum + weight decay) stays below (0.81 and 0.74; 3 λ₀: 0.61 and 0.21): it
#: wants 56-178 λ₀.
GN_HESSIAN_FRACTION = 0.5
#: Hessian-vector products of the Lanczos estimate of ``λ_min`` (one pass over the training
#: data each).
LANCZOS_STEPS = 20
#: The Hessian rule's scale term, a multiple of the Hessian's mean eigenvalue
#: ``trace(H)/p``. bench/defaults.py (exact Hessian, LDS over a 29-point grid λ₀ × 10^(k/4)):
#: the digits CNN's best (0.201) lies at 32-1000 λ₀ while ``2 × |λ_min|`` (Lanczos) gave
#: 11 λ₀ (0.166, on the cliff below); its mean eigenvalue is 13 λ₀ (the momentum + weight
#: decay MLP's 6.0 λ₀, breast cancer's 1.8, diabetes' 1.6, the SGD MLP's 2.5). With
#: ``max(3 λ₀, 2 |λ_min|, c × mean)``, full size (400 examples): every task ≥ 0.95 of its
#: best (or within 0.02) for c in [2, 3.5] (c = 1.5: CNN 0.93; c = 4: diabetes 0.94); the
#: same five tasks at 200 examples (a check against fitting five tasks): the CNN needs
#: c >= 2.5 (0.92 at 2.5, 0.93 at 3, both within 0.02 of its best; c = 2: 0.90). 3 is
#: inside both windows: breast cancer 0.97, CNN 0.98, the others decided by their λ_min
#: term (unchanged).
TRACE_FACTOR = 3.0
#: Rademacher vectors of the Hutchinson estimate of ``trace(H)/p`` (one vmapped pass): a
#: spectrum dominated by a few large eigenvalues (breast cancer: p = 62, λ_max = 24 × the
#: mean) leaves it ≈ 10% noise, inside the [2, 3] window around TRACE_FACTOR.
TRACE_VECTORS = 32
#: the most vector entries one Hutchinson pass holds (128 MiB of float32)
HUTCHINSON_ENTRIES = 1 << 25


@dataclass(frozen=True)
class DampingChoice:
    """A damping and why: ``value`` (λ), ``reason`` (one line for the fit log)."""

    value: float
    reason: str
    #: the Lanczos (smallest, largest) eigenvalue estimates of the Hessian the rule used, or
    #: ``None`` (Gauss–Newton family, λ₀ = 0, a given number): LiSSA's scale reuses them
    extremes: tuple[float, float] | None = None


def lanczos_extremes(
    apply: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor, n_iter: int, seed: int = 0
) -> tuple[float, float]:
    """(smallest, largest) eigenvalue estimates of a symmetric operator from ``n_iter``
    Lanczos steps (:func:`.dense.krylov_eigenpairs`): Ritz values, inside the spectrum."""
    from .dense import krylov_eigenpairs  # dense imports this module at its top

    evals, _ = krylov_eigenpairs(apply, like, min(n_iter, like.numel()), seed)
    return float(evals[0]), float(evals[-1])


def hutchinson_mean_eigenvalue(
    apply: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor, n_vectors: int, seed: int = 0
) -> float:
    """``trace(M)/p``, the mean eigenvalue of a symmetric operator, by Hutchinson's estimator:
    the mean of ``vᵀ M v / p`` over ``n_vectors`` seeded Rademacher vectors (exact for a
    diagonal ``M``; unbiased, standard error ``≈ √(2 Σ_{i≠j} M_ij² / n_vectors) / p``).
    ``apply`` maps (m, p) rows to their products (m, p): one vmapped pass for all of them
    while ``n_vectors × p`` stays under :data:`HUTCHINSON_ENTRIES` (a large model's vectors
    go in groups, one pass each, so the estimate never holds ``n_vectors`` copies of θ)."""
    p = like.numel()
    g = torch.Generator().manual_seed(seed)
    group = max(1, min(n_vectors, HUTCHINSON_ENTRIES // p))
    total = 0.0
    for s in range(0, n_vectors, group):
        m = min(group, n_vectors - s)
        v = (torch.randint(0, 2, (m, p), generator=g) * 2 - 1).to(like)
        total += float((v * apply(v)).sum())
    return total / (n_vectors * p)


def curvature_damping(
    ctx: FitContext, gauss_newton: bool, what: str = "the Hessian", factored: bool = False
) -> DampingChoice:
    """THE default damping rule (module docstring): from the curvature (a Lanczos estimate
    of the Hessian's most negative eigenvalue, a Hutchinson estimate of its mean
    eigenvalue) and the gradient scale λ₀. ``gauss_newton``: for the exact Gauss–Newton
    matrix (``GN_HESSIAN_FRACTION ×`` the Hessian's rule) or, with ``factored``, for a
    factored approximation of it without eigenvalues of its own (DataInf:
    ``GN_FACTOR × λ₀``; K-FAC/EK-FAC use :func:`kronecker_damping`)."""
    lambda0 = float(ctx.lambda0)
    if lambda0 <= 0:
        return DampingChoice(DAMPING_FLOOR, f"λ₀ = 0 (all gradients zero): floor {DAMPING_FLOOR:g}")
    if gauss_newton and factored:
        value = GN_FACTOR * lambda0
        return DampingChoice(
            value, f"{value:.3g} = {GN_FACTOR:g} × λ₀ (λ₀ {lambda0:.3g}; {what} is PSD)"
        )
    if gauss_newton:
        hessian = curvature_damping(ctx, False)
        value = GN_HESSIAN_FRACTION * hessian.value
        # no extremes: they are the Hessian's, not the Gauss-Newton matrix's (LiSSA's scale)
        return DampingChoice(
            value,
            f"{value:.3g} = {GN_HESSIAN_FRACTION:g} × the Hessian's rule for {what} (which "
            f"drops the Hessian's residual term): the Hessian's {hessian.reason}",
        )
    problem = ctx.problem
    smallest, largest = lanczos_extremes(
        lambda v: problem.mean_product(v[None], False)[0], problem.theta, LANCZOS_STEPS
    )
    mean = hutchinson_mean_eigenvalue(
        lambda v: problem.mean_product(v, False), problem.theta, TRACE_VECTORS
    )
    terms = {
        f"the floor {HESSIAN_FLOOR:g} × λ₀": HESSIAN_FLOOR * lambda0,
        f"{NEGATIVE_FACTOR:g} × |λ_min|": NEGATIVE_FACTOR * max(0.0, -smallest),
        f"{TRACE_FACTOR:g} × the mean eigenvalue": TRACE_FACTOR * max(0.0, mean),
    }
    which = max(terms, key=lambda k: terms[k])
    value = terms[which]
    return DampingChoice(
        value,
        f"{value:.3g} = {which} (Lanczos, {LANCZOS_STEPS} products: {what}'s λ_min ≈ "
        f"{smallest:.3g}, λ_max ≈ {largest:.3g}; mean eigenvalue ≈ {mean:.3g} (Hutchinson, "
        f"{TRACE_VECTORS} vectors); λ₀ {lambda0:.3g})",
        (smallest, largest),
    )


def kronecker_damping(damping: float | str | None, mean_eigenvalue: float, what: str) -> float:
    """K-FAC's/EK-FAC's damping: the given number, or (``None``, and ``"auto"`` whose
    calibration starts from it) :data:`KRONECKER_FACTOR` × the mean of the fitted
    eigenvalues ``mean_eigenvalue`` (logged with its reason; the floor where it is 0)."""
    if damping is not None and damping != AUTO:
        return float(damping)
    if mean_eigenvalue <= 0:
        reason = f"{what}'s eigenvalues are all 0: floor {DAMPING_FLOOR:g}"
        choice = DampingChoice(DAMPING_FLOOR, reason)
    else:
        value = KRONECKER_FACTOR * mean_eigenvalue
        choice = DampingChoice(
            value, f"{value:.3g} = {KRONECKER_FACTOR:g} × the mean eigenvalue of {what}"
        )
    log.info("damping %s", choice.reason)
    return choice.value


def resolve_damping(
    damping: float | str | None,
    ctx: FitContext,
    gauss_newton: bool = False,
    what: str = "",
    factored: bool = False,
) -> float:
    """The damping to use: the given number, or the rule (:func:`curvature_damping`, logged
    with its reason) for ``None`` and ``"auto"`` (whose calibration, by the method, starts
    from it)."""
    return damping_choice(damping, ctx, gauss_newton, what, factored).value


def damping_choice(
    damping: float | str | None,
    ctx: FitContext,
    gauss_newton: bool = False,
    what: str = "",
    factored: bool = False,
) -> DampingChoice:
    """:func:`resolve_damping` with the rule's by-products (its Lanczos extremes)."""
    if damping is not None and damping != AUTO:
        return DampingChoice(float(damping), "given")
    what = what or ("the Gauss-Newton matrix" if gauss_newton else "the Hessian")
    choice = curvature_damping(ctx, gauss_newton, what, factored)
    log.info("damping %s", choice.reason)
    return choice
