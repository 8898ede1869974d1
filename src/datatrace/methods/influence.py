"""Influence functions as recipes: ``S[j, i] = (1/n) Σ_c w_c q_jᵀ (H_c + λI)⁻¹ g_i``.

``S[j, i]`` estimates ``f(z_j; θ without i) − f(z_j; θ)`` (leave-one-out units; positive =
proponent). The preconditioner is any of :mod:`datatrace.curvature`.

References:
    Koh and Liang, "Understanding Black-box Predictions via Influence Functions", ICML 2017.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..curvature import DataInfPreconditioner
from ..errors import ConfigError
from ..features import FeatureSpec
from .gradient import GradientAttributor


def _params(params: Sequence[str] | str | None) -> tuple[str, ...] | None:
    if params is None:
        return None
    return (params,) if isinstance(params, str) else tuple(params)


def Influence(preconditioner: Any, params: Sequence[str] | str | None = None) -> GradientAttributor:
    """Influence functions with the given curvature preconditioner (e.g.
    ``dt.ExactHessian(damping=...)``, ``dt.ConjugateGradient(...)``, ``dt.EKFAC(...)``)."""
    if not hasattr(preconditioner, "fit"):
        raise ConfigError(
            f"Influence needs a preconditioner such as dt.ExactHessian(), got "
            f"{type(preconditioner).__name__}"
        )
    return GradientAttributor(
        FeatureSpec(params=_params(params), factored=False),
        preconditioner=preconditioner,
        name=f"Influence[{type(preconditioner).__name__}]",
    )


def DataInf(
    damping: float | None = None, params: Sequence[str] | str | None = None
) -> GradientAttributor:
    """DataInf (Kwon et al. 2024): per-layer closed-form inverse from training gradients."""
    return GradientAttributor(
        FeatureSpec(params=_params(params), factored=False),
        preconditioner=DataInfPreconditioner(damping),
        name="DataInf",
    )
