"""First-order methods as recipes over :class:`GradientAttributor` (each a few lines).

* :func:`GradDot`: ``q_jᵀ g_i`` at the final checkpoint.
* :func:`GradCos`: the cosine of the same gradients (robust to gradient-norm outliers).
* :func:`TracIn`: ``Σ_c η_c q_j(θ_c)ᵀ g_i(θ_c)`` over saved checkpoints, weighted by the
  learning rate (Checkpoint.weight); self-influence ranks suspected mislabels.

All take ``params`` (``None``: every trainable parameter; or parameter/module names, e.g.
the last layer), ``projection_dim`` (``None``: exact; or k for a seeded random
projection with ``E[PᵀP] = I``), and ``feature_dtype``/``tf32`` (reduced precision with
the error bound stated in :class:`datatrace.FeatureSpec`).

References:
    Pruthi et al., "Estimating Training Data Influence by Tracing Gradient Descent",
    NeurIPS 2020. Wei et al., "Final-Model-Only Data Attribution with a Unifying View of
    Gradient-Based Methods", 2024.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..features import FeatureSpec
from .gradient import GradientAttributor


def _spec(
    params: Sequence[str] | str | None,
    projection_dim: int | None,
    seed: int,
    feature_dtype: torch.dtype | None,
    tf32: bool,
) -> FeatureSpec:
    p = (params,) if isinstance(params, str) else (tuple(params) if params is not None else None)
    return FeatureSpec(
        params=p,
        projection_dim=projection_dim,
        projection_seed=seed,
        feature_dtype=feature_dtype,
        tf32=tf32,
    )


def GradDot(
    params: Sequence[str] | str | None = None,
    projection_dim: int | None = None,
    projection_seed: int = 0,
    feature_dtype: torch.dtype | None = None,
    tf32: bool = False,
) -> GradientAttributor:
    """Grad-Dot: gradient inner products at the final checkpoint."""
    return GradientAttributor(
        _spec(params, projection_dim, projection_seed, feature_dtype, tf32),
        normalize=False,
        all_checkpoints=False,
        name="GradDot",
    )


def GradCos(
    params: Sequence[str] | str | None = None,
    projection_dim: int | None = None,
    projection_seed: int = 0,
    feature_dtype: torch.dtype | None = None,
    tf32: bool = False,
) -> GradientAttributor:
    """Grad-Cos: gradient cosine similarity at the final checkpoint."""
    return GradientAttributor(
        _spec(params, projection_dim, projection_seed, feature_dtype, tf32),
        normalize=True,
        all_checkpoints=False,
        name="GradCos",
    )


def TracIn(
    params: Sequence[str] | str | None = None,
    projection_dim: int | None = None,
    projection_seed: int = 0,
    feature_dtype: torch.dtype | None = None,
    tf32: bool = False,
) -> GradientAttributor:
    """TracInCP: learning-rate-weighted gradient inner products summed over checkpoints."""
    return GradientAttributor(
        _spec(params, projection_dim, projection_seed, feature_dtype, tf32),
        normalize=False,
        all_checkpoints=True,
        name="TracIn",
    )
