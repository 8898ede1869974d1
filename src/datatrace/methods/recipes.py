"""Every gradient method as a recipe over the one engine, :class:`GradientAttributor`.

* :func:`GradDot`: ``q_jᵀ g_i`` at the final checkpoint.
* :func:`GradCos`: the cosine of the same gradients (robust to gradient-norm outliers).
* :func:`TracIn`: ``Σ_c η_c q_j(θ_c)ᵀ g_i(θ_c)`` over saved checkpoints, weighted by the
  learning rate (``Checkpoint.weight``); self-influence ranks suspected mislabels.
* :func:`Influence`: ``(1/n) Σ_c w_c q_jᵀ (H_c + λI)⁻¹ g_i`` with any curvature
  preconditioner (``dt.ExactHessian``, ``dt.ConjugateGradient``, ``dt.EKFAC``, ...), or
  one chosen by problem size; ``Σ_c w_c = 1``.
* :func:`DataInf`: influence with DataInf's per-layer closed-form inverse.
* :func:`TRAK`: projected gradients of the output function (classification: the margin,
  with ``1 − p`` example weights; other tasks: their loss and measurement, weights 1),
  Gram-inverse preconditioner, averaged over checkpoints.

First-order recipes take ``params`` (``None``: every trainable parameter; or parameter/module
names, e.g. the last layer), ``projection_dim`` (``None``: exact; or k for a seeded random
projection with ``E[PᵀP] = I``), and ``feature_dtype``/``tf32`` (reduced precision with the
error bound stated in :class:`datatrace.FeatureSpec`). Influence scores estimate
``f(z_j; θ without i) − f(z_j; θ)`` (leave-one-out units; positive = proponent).

Units and checkpoint weights: only TracIn multiplies by ``Checkpoint.weight`` (its learning
rates). Influence functions and DataInf treat several checkpoints as an ensemble, averaged
with their weights normalised to sum 1 (:attr:`CheckpointWeights.ENSEMBLE`); TRAK averages
its checkpoints equally (:attr:`CheckpointWeights.MEAN`). Either way their scores are in
leave-one-out units whatever the weights (a learning rate of 7.9e-7 saved for TracIn does
not scale them).

A new method that is a new combination of slots is one more function here and one line in
:mod:`datatrace.app.registry` (see CONTRIBUTING.md).

References:
    Pruthi et al., "Estimating Training Data Influence by Tracing Gradient Descent",
    NeurIPS 2020. Koh and Liang, "Understanding Black-box Predictions via Influence
    Functions", ICML 2017. Kwon et al., "DataInf", ICLR 2024. Park et al., "TRAK", ICML 2023.
    Wei et al., "Final-Model-Only Data Attribution with a Unifying View of Gradient-Based
    Methods", 2024.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.errors import ConfigError
from ..curvature import AbstractPreconditioner, DataInfPreconditioner, GramInverse
from ..curvature.auto import AutoPreconditioner
from ..features.spec import FeatureSpec
from .engine import GradientAttributor
from .slots import CheckpointWeights
from .trak import Margin, MarginResidual

Params = Sequence[str] | str | None


def _first_order(
    name: str,
    params: Params,
    projection_dim: int | None,
    projection_seed: int,
    feature_dtype: torch.dtype | None,
    tf32: bool,
    normalize: bool,
    checkpoints: CheckpointWeights,
) -> GradientAttributor:
    spec = FeatureSpec(
        params=_params(params),
        projection_dim=projection_dim,
        projection_seed=projection_seed,
        feature_dtype=feature_dtype,
        tf32=tf32,
    )
    return GradientAttributor(spec, normalize=normalize, checkpoints=checkpoints, name=name)


def _params(params: Params) -> tuple[str, ...] | None:
    if params is None:
        return None
    return (params,) if isinstance(params, str) else tuple(params)


def GradDot(
    params: Params = None,
    projection_dim: int | None = None,
    projection_seed: int = 0,
    feature_dtype: torch.dtype | None = None,
    tf32: bool = False,
) -> GradientAttributor:
    """Grad-Dot: gradient inner products at the final checkpoint."""
    last = CheckpointWeights.LAST
    args = (params, projection_dim, projection_seed, feature_dtype, tf32)
    return _first_order("GradDot", *args, normalize=False, checkpoints=last)


def GradCos(
    params: Params = None,
    projection_dim: int | None = None,
    projection_seed: int = 0,
    feature_dtype: torch.dtype | None = None,
    tf32: bool = False,
) -> GradientAttributor:
    """Grad-Cos: gradient cosine similarity at the final checkpoint."""
    last = CheckpointWeights.LAST
    args = (params, projection_dim, projection_seed, feature_dtype, tf32)
    return _first_order("GradCos", *args, normalize=True, checkpoints=last)


def TracIn(
    params: Params = None,
    projection_dim: int | None = None,
    projection_seed: int = 0,
    feature_dtype: torch.dtype | None = None,
    tf32: bool = False,
) -> GradientAttributor:
    """TracInCP: learning-rate-weighted gradient inner products summed over checkpoints."""
    every = CheckpointWeights.LEARNING_RATE
    args = (params, projection_dim, projection_seed, feature_dtype, tf32)
    return _first_order("TracIn", *args, normalize=False, checkpoints=every)


def Influence(
    preconditioner: AbstractPreconditioner | None = None, params: Params = None
) -> GradientAttributor:
    """Influence functions with the given curvature preconditioner (e.g.
    ``dt.ExactHessian(damping=...)``, ``dt.ConjugateGradient(...)``, ``dt.EKFAC(...)``;
    ``None``: chosen by problem size at fit time, exact up to
    :data:`~datatrace.curvature.auto.EXACT_MAX_PARAMS` parameters, EK-FAC above on the
    layers it supports when they hold most of the parameters (a transformer's embeddings and
    LayerNorms are left out), CG where EK-FAC cannot take the parameters asked for, and the
    fit log says which and why), in leave-one-out units:
    several checkpoints are an ensemble, averaged with their weights normalised to sum 1
    (a single checkpoint's weight does not scale the scores)."""
    if preconditioner is None:
        preconditioner = AutoPreconditioner()
    if not isinstance(preconditioner, AbstractPreconditioner):
        raise ConfigError(
            f"Influence needs a preconditioner such as dt.ExactHessian(), got "
            f"{type(preconditioner).__name__}"
        )
    name = (
        "Influence"
        if isinstance(preconditioner, AutoPreconditioner)
        else f"Influence[{type(preconditioner).__name__}]"
    )
    return GradientAttributor(
        FeatureSpec(params=_params(params), factored=False),
        checkpoints=CheckpointWeights.ENSEMBLE,
        preconditioner=preconditioner,
        name=name,
    )


def DataInf(damping: float | None = None, params: Params = None) -> GradientAttributor:
    """DataInf (Kwon et al. 2024): per-layer closed-form inverse from training gradients."""
    return GradientAttributor(
        FeatureSpec(params=_params(params), factored=False),
        checkpoints=CheckpointWeights.ENSEMBLE,
        preconditioner=DataInfPreconditioner(damping),
        name="DataInf",
    )


def TRAK(
    projection_dim: int | None = 512,
    damping: float | None = None,
    params: Params = None,
    projection_seed: int = 0,
    feature_dtype: torch.dtype | None = None,
) -> GradientAttributor:
    """TRAK: gradients of the output function projected to ``projection_dim`` (``None``:
    exact), ``(ΦᵀΦ/n + λI)⁻¹`` with ``damping`` λ (``None``: the default multiple of the
    mean squared feature; 0: TRAK's undamped pseudo-inverse), averaged over checkpoints.

    The output function: for a ``dt.ClassificationTask`` the margin
    ``log p_y − log(1 − p_y)`` with ``1 − p_i`` example weights (the paper's); for any other
    task its loss (training examples) and measurement (queries) with weights 1
    (:mod:`datatrace.methods.trak`)."""
    spec = FeatureSpec(
        params=_params(params),
        projection_dim=projection_dim,
        projection_seed=projection_seed,
        factored=False,
        feature_dtype=feature_dtype,
    )
    return GradientAttributor(
        spec,
        checkpoints=CheckpointWeights.MEAN,
        name="TRAK",
        preconditioner=GramInverse(damping),
        example_weights=MarginResidual(),
        output=Margin(),
    )
