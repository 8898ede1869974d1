"""Preconditioner settings, damping, and the interface of a fitted preconditioner.

Damping: every preconditioner takes ``damping=None`` (the default: :func:`curvature_damping`,
the ONE rule, from the curvature itself), ``"auto"`` (calibrated against further training by
the method that fits it; here the rule's value stands in) or a number ``>= 0`` used as is.
The value used is reported as ``fitted.damping``; the fit log (INFO, logger ``datatrace``)
says how the default was chosen.

The rule (:func:`curvature_damping`), per kind of curvature:

* the Hessian (indefinite for networks trained the usual way, which do not stop at a
  minimum): a short Lanczos run (``LANCZOS_STEPS`` Hessian-vector products, ``torch.func``)
  estimates its most negative eigenvalue ``λ_min``; damping
  ``max(NEGATIVE_FACTOR × |λ_min|, HESSIAN_FLOOR × λ₀)`` makes ``H + λI`` positive definite
  with margin while a convex model keeps little damping;
* the Gauss–Newton family (PSD: exact GN, K-FAC, EK-FAC, DataInf's GN view):
  ``GN_FACTOR × λ₀``;
* TRAK's Gram matrix ``ΦᵀΦ/n``: ``GRAM_FACTOR ×`` its mean eigenvalue (see
  :mod:`.gram`).

``λ₀`` is the mean squared per-example gradient entry (Grosse et al. 2023). The constants
were chosen with ``bench/defaults.py`` (see its docstring and bench/RESULTS.md).
"""

from __future__ import annotations

import logging
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from ..core.errors import ConfigError, NonFiniteError

if TYPE_CHECKING:
    from ..core.data import ExampleSource
    from ..core.task import AbstractTask
    from .context import FitContext

log = logging.getLogger("datatrace")


class InfluenceWarning(UserWarning):
    """Scores may be unreliable (e.g. a Hessian that is not positive definite)."""


class AbstractFittedPreconditioner(ABC):
    """Applies an approximation of ``(H + λI)⁻¹`` to a batch of flat vectors.

    Implementations are final; each records the damping it used as ``damping``."""

    damping: float

    @abstractmethod
    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(H + λI)⁻¹ v`` for each row v of ``vectors`` (m, p); returns (m, p)."""

    def with_damping(self, damping: float) -> AbstractFittedPreconditioner | None:
        """The same curvature at another damping, reusing what the fit computed (the
        matrix, eigenpairs, factors), or ``None`` when only a refit can tell (the default).
        ``damping="auto"`` tries its grid this way."""
        return None


class AbstractPreconditioner(ABC):
    """The preconditioner slot ``P`` of ``S = Σ_c w_c ⟨φ_c(q), P_c φ_c(z)⟩``.

    Implementations are frozen dataclasses of settings validated in ``__post_init__``
    (never subclassed); :meth:`fit` turns them into a fitted preconditioner at one
    checkpoint. A new preconditioner is one such class plus one line in
    :mod:`datatrace.app.registry` (see CONTRIBUTING.md).
    """

    #: whether it works on randomly projected features (TRAK's Gram inverse does; curvature
    #: of the loss needs exact dense gradients)
    accepts_projection: ClassVar[bool] = False
    #: whether influence scores can be computed from the fitted preconditioner in one fused
    #: pass over the training data (per-example gradients formed a batch and a layer at a
    #: time, dotted with the preconditioned queries) instead of from stored features
    #: (:mod:`datatrace.methods.kronecker`: K-FAC and EK-FAC)
    fused_scoring: ClassVar[bool] = False

    @abstractmethod
    def fit(self, ctx: FitContext) -> AbstractFittedPreconditioner:
        """Fit at one checkpoint from ``ctx`` (curvature problem, λ₀, training blocks)."""

    def parameters(
        self,
        task: AbstractTask,
        names: list[str],
        requested: tuple[str, ...] | None,
        train: ExampleSource,
    ) -> list[str]:
        """The parameters this preconditioner works on, out of the selected ``names`` (model
        order), decided before any gradient pass: the features (and so the scores) are
        restricted to them. ``requested``: the user's ``params`` (``None``: every trainable
        parameter); ``train``: the training data (for a forward-only probe). Default: all."""
        return list(names)


def mean_squared_entry(square_sum: float, n: int, width: int) -> float:
    """λ₀, THE damping scale: the mean squared per-example feature entry,
    ``Σ_i ‖φ(z_i)‖² / (n · width)`` (Grosse et al. 2023)."""
    return float(square_sum) / (n * width) if n * width else 0.0


#: ``damping="auto"``: calibrated against further training (``datatrace.methods.autodamp``)
AUTO = "auto"


def check_damping(damping: float | str | None) -> None:
    if damping is None or damping == AUTO:
        return
    if isinstance(damping, bool) or not isinstance(damping, (int, float)):
        raise ConfigError(f"damping must be a number >= 0, None or 'auto', got {damping!r}")
    if not math.isfinite(damping) or damping < 0:
        raise ConfigError(
            f"damping must be >= 0, got {damping!r}; use 0.0 for none or None for the default"
        )


#: The default damping when λ₀ = 0 (every per-example gradient entry is exactly zero): any
#: positive value gives the same scores (all exactly 0), while ``10 × 0`` left singular
#: systems that returned NaN.
DAMPING_FLOOR = 1e-8


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
#: Gauss–Newton-family damping, a multiple of λ₀ (positive semi-definite: no |λ_min| term).
#: bench/defaults.py --quick, LDS at λ₀ × 1 / 3 / 10: diabetes regression MLP, EK-FAC
#: 0.336/0.300/0.269, exact GN 0.323/0.330/0.299; SGD digits MLP, EK-FAC 0.754/0.785/0.801,
#: exact GN 0.604/0.683/0.760; breast cancer (full), EK-FAC 0.738/0.746/0.725, K-FAC
#: 0.652/0.676/0.677. Worst fraction of the best: 0.79 at 1, 0.89 at 3, 0.80 at 10. (Where
#: the Hessian is indefinite the GN family wanted more: the SGD MLP's best was at 10-100 λ₀.)
GN_FACTOR = 3.0
#: Hessian-vector products of the Lanczos estimate of ``λ_min`` (one pass over the training
#: data each).
LANCZOS_STEPS = 20


@dataclass(frozen=True)
class DampingChoice:
    """A damping and why: ``value`` (λ), ``reason`` (one line for the fit log)."""

    value: float
    reason: str


def lanczos_extremes(
    apply: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor, n_iter: int, seed: int = 0
) -> tuple[float, float]:
    """(smallest, largest) eigenvalue estimates of a symmetric operator from ``n_iter``
    Lanczos steps (:func:`.dense.krylov_eigenpairs`): Ritz values, inside the spectrum."""
    from .dense import krylov_eigenpairs  # dense imports this module

    evals, _ = krylov_eigenpairs(apply, like, min(n_iter, like.numel()), seed)
    return float(evals[0]), float(evals[-1])


def curvature_damping(
    ctx: FitContext, gauss_newton: bool, what: str = "the Hessian"
) -> DampingChoice:
    """THE default damping rule (module docstring): from the curvature (a Lanczos estimate
    of the Hessian's most negative eigenvalue) and the gradient scale λ₀."""
    lambda0 = float(ctx.lambda0)
    if lambda0 <= 0:
        return DampingChoice(DAMPING_FLOOR, f"λ₀ = 0 (all gradients zero): floor {DAMPING_FLOOR:g}")
    if gauss_newton:
        value = GN_FACTOR * lambda0
        return DampingChoice(
            value, f"{value:.3g} = {GN_FACTOR:g} × λ₀ (λ₀ {lambda0:.3g}; {what} is PSD)"
        )
    problem = ctx.problem
    smallest, largest = lanczos_extremes(
        lambda v: problem.mean_product(v[None], False)[0], problem.theta, LANCZOS_STEPS
    )
    floor, lift = HESSIAN_FLOOR * lambda0, NEGATIVE_FACTOR * max(0.0, -smallest)
    value = max(floor, lift)
    which = (
        f"{NEGATIVE_FACTOR:g} × |λ_min|" if lift > floor else f"the floor {HESSIAN_FLOOR:g} × λ₀"
    )
    return DampingChoice(
        value,
        f"{value:.3g} = {which} (Lanczos, {LANCZOS_STEPS} products: {what}'s λ_min ≈ "
        f"{smallest:.3g}, λ_max ≈ {largest:.3g}; λ₀ {lambda0:.3g})",
    )


def resolve_damping(
    damping: float | str | None,
    ctx: FitContext,
    gauss_newton: bool = False,
    what: str = "",
) -> float:
    """The damping to use: the given number, or the rule (:func:`curvature_damping`, logged
    with its reason) for ``None`` and ``"auto"`` (whose calibration, by the method, starts
    from it)."""
    if damping is not None and damping != AUTO:
        return float(damping)
    what = what or ("the Gauss-Newton matrix" if gauss_newton else "the Hessian")
    choice = curvature_damping(ctx, gauss_newton, what)
    log.info("damping %s", choice.reason)
    return choice.value


def symmetric_eigh(matrix: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` whose failures (non-finite entries, no convergence) are a
    :class:`NonFiniteError` naming the matrix and a fix, not a torch ``_LinAlgError``."""
    if not bool(torch.isfinite(matrix).all()):
        raise NonFiniteError(
            f"{what} has NaN or inf entries (from non-finite or overflowing gradients); "
            "check the data and the checkpoint, or use a float64 model"
        )
    try:
        return torch.linalg.eigh(matrix)
    except RuntimeError as exc:  # torch.linalg.LinAlgError: ill-conditioned
        if matrix.dtype == torch.float64:
            raise NonFiniteError(
                f"the eigendecomposition of {what} did not converge ({exc}); add damping"
            ) from exc
        try:  # float32 eigh fails on ill-conditioned matrices where float64 succeeds
            evals, evecs = torch.linalg.eigh(matrix.double())
        except RuntimeError as exc64:
            raise NonFiniteError(
                f"the eigendecomposition of {what} did not converge ({exc64}); add damping"
            ) from exc64
        return evals.to(matrix.dtype), evecs.to(matrix.dtype)


def check_positive(name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def warn_not_positive_definite(
    smallest: float, damping: float, what: str, negative: int | None = None, p: int = 0
) -> None:
    """Warn that ``H + λI`` has a non-positive eigenvalue, saying what to do."""
    count = f"{negative:,} of {p:,} eigenvalues of it negative, " if negative else ""
    warnings.warn(
        f"{what} + damping is not positive definite ({count}smallest eigenvalue of {what} "
        f"≈ {smallest:.3g}, damping {damping:.3g}): influence scores are unreliable. Use "
        f"dt.GaussNewton (positive semi-definite) or damping > {-smallest:.3g}.",
        InfluenceWarning,
        stacklevel=3,
    )


def eigen_solve(
    evals: torch.Tensor, evecs: torch.Tensor, damping: float, vectors: torch.Tensor
) -> torch.Tensor:
    """``U diag(1/(Λ + λ)) Uᵀ v`` for each row v."""
    return ((vectors @ evecs) / (evals + damping)) @ evecs.T
