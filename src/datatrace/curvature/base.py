"""Preconditioner settings, damping, and the interface of a fitted preconditioner.

Damping: every preconditioner takes ``damping=None`` (the default: ``DAMPING_FACTOR × λ₀``
with ``λ₀`` the mean squared per-example gradient entry, Grosse et al. 2023) or a number
``>= 0`` used as is. The value used is reported as ``fitted.damping``.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch

from ..core.errors import ConfigError, NonFiniteError

if TYPE_CHECKING:
    from ..core.data import ExampleSource
    from ..core.task import AbstractTask
    from .context import FitContext

#: Multiplier of λ₀ used when ``damping=None``, chosen by Pearson agreement with true
#: leave-one-out retraining (bench/influence_quality.py; L2 logistic regression on breast
#: cancer and a tanh MLP on digits, 300 training examples each). Mean per-query Pearson at
#: 0.1× / 1× / 10× / 100× λ₀: exact Hessian, logreg 0.77/0.95/0.95/0.80, MLP
#: 0.29/0.35/0.65/0.74; Gauss-Newton, MLP 0.50/0.62/0.73/0.68; EK-FAC, logreg
#: 0.83/0.85/0.81/0.75, MLP 0.67/0.69/0.67/0.59. 10× is the best worst case: smaller values
#: let the negative curvature of a non-convex network ruin exact influence, larger ones
#: wash out the curvature (Wei et al. 2024 plot 100×).
DAMPING_FACTOR = 10.0


class InfluenceWarning(UserWarning):
    """Scores may be unreliable (e.g. a Hessian that is not positive definite)."""


class AbstractFittedPreconditioner(ABC):
    """Applies an approximation of ``(H + λI)⁻¹`` to a batch of flat vectors.

    Implementations are final; each records the damping it used as ``damping``."""

    damping: float

    @abstractmethod
    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(H + λI)⁻¹ v`` for each row v of ``vectors`` (m, p); returns (m, p)."""


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


def check_damping(damping: float | None) -> None:
    if damping is None:
        return
    if isinstance(damping, bool) or not isinstance(damping, (int, float)):
        raise ConfigError(f"damping must be a number >= 0 or None, got {damping!r}")
    if not math.isfinite(damping) or damping < 0:
        raise ConfigError(
            f"damping must be >= 0, got {damping!r}; use 0.0 for none or None for the default"
        )


#: The default damping when λ₀ = 0 (every per-example gradient entry is exactly zero): any
#: positive value gives the same scores (all exactly 0), while ``10 × 0`` left singular
#: systems that returned NaN.
DAMPING_FLOOR = 1e-8


def resolve_damping(damping: float | None, lambda0: float) -> float:
    """The damping to use: the given value, or ``DAMPING_FACTOR × λ₀`` (``DAMPING_FLOOR``
    when λ₀ = 0)."""
    if damping is not None:
        return float(damping)
    return DAMPING_FACTOR * float(lambda0) if lambda0 > 0 else DAMPING_FLOOR


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
