"""Preconditioner settings, the interface of a fitted preconditioner, and the helpers the
curvature modules share (``damping`` validation, λ₀, eigendecompositions, warnings).

The default damping rule and the measurements that chose it: :mod:`.damping`.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch

from ..core.errors import ConfigError, NonFiniteError

if TYPE_CHECKING:
    from pathlib import Path

    from ..core.data import ExampleSource
    from ..core.task import AbstractTask
    from .context import FitContext


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

    def indefinite_below(self) -> float:
        """A damping below which ``M + λI`` is known to have a negative eigenvalue (minus an
        upper bound on ``M``'s smallest eigenvalue, where the fit found one), else 0:
        ``damping="auto"`` does not try grid points below it (their scores are unreliable).
        Default: 0 (nothing known)."""
        return 0.0

    def release(self) -> None:  # noqa: B027 (a hook: no-op unless something is kept)
        """Drop what was kept only so that :meth:`with_damping` is cheap (an undamped
        matrix, the last solutions), once ``damping="auto"`` has chosen: :meth:`solve` is
        unchanged, :meth:`with_damping` may then need a refit. Default: nothing is kept."""


class AbstractPreconditioner(ABC):
    """The preconditioner slot ``P`` of ``S = Σ_c w_c ⟨φ_c(q), P_c φ_c(z)⟩``.

    Implementations are frozen dataclasses of settings validated in ``__post_init__``
    (never subclassed); :meth:`fit` turns them into a fitted preconditioner at one
    checkpoint. A new preconditioner is one such class plus one line in
    :mod:`datatrace.app.registry` (see CONTRIBUTING.md).
    """

    #: λ: ``None`` (the default rule), ``"auto"`` (calibrated by the method that fits it)
    #: or a number (:mod:`.damping`); each implementation declares it as a setting, and
    #: one that takes no damping leaves it ``None``
    damping: float | str | None = None

    #: whether it works on randomly projected features (TRAK's Gram inverse does; curvature
    #: of the loss needs exact dense gradients)
    accepts_projection: ClassVar[bool] = False
    #: whether influence scores can be computed from the fitted preconditioner in one fused
    #: pass over the training data (per-example gradients formed a batch and a layer at a
    #: time, dotted with the preconditioned queries) instead of from stored features
    #: (:mod:`datatrace.methods.kronecker`: K-FAC and EK-FAC)
    fused_scoring: ClassVar[bool] = False

    def calibrates_damping(self) -> bool:
        """Whether the method fitting it calibrates the damping (``damping="auto"``)."""
        return self.damping == AUTO

    @abstractmethod
    def fit(self, ctx: FitContext) -> AbstractFittedPreconditioner:
        """Fit at one checkpoint from ``ctx`` (curvature problem, λ₀, training blocks)."""

    def cache_file(self, prefix: Path) -> Path | None:
        """The file its fit caches in a feature store under ``prefix``
        (:attr:`FitContext.cache <datatrace.curvature.context.FitContext>`), or ``None``:
        nothing cached (the default)."""
        return None

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
