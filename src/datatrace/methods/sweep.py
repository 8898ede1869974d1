"""Damping sweeps: fit one influence method at several multiples of λ₀ and compare."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..core.checkpoint import Checkpoint
from ..core.task import AbstractTask
from ..curvature.base import mean_squared_entry
from ..features.spec import FeatureSpec
from ..metrics import agreement
from .engine import GradientAttributor
from .slots import CheckpointWeights


@dataclass(frozen=True)
class SweepPoint:
    """One damping value: its multiplier of λ₀, the damping, the scores, and (if a truth was
    given) the per-query agreement with it."""

    multiplier: float
    damping: float
    scores: torch.Tensor
    agreement: dict[str, tuple[float, float]] | None


def mean_squared_gradient(
    task: AbstractTask,
    checkpoint: Checkpoint,
    train: Any,
    params: Sequence[str] | None = None,
    batch_size: int = 256,
) -> float:
    """λ₀: the mean over training examples and parameters of the squared per-example
    gradient entry, at one checkpoint."""
    method = GradientAttributor(
        FeatureSpec(params=tuple(params) if params else None),
        checkpoints=CheckpointWeights.LAST,
    )
    fitted = method.fit(task, [checkpoint], train, batch_size=batch_size, progress=False)
    square_sum = float(fitted.self_influence().sum())  # Σ_i ‖g_i‖²
    return mean_squared_entry(square_sum, fitted.n_train, fitted.features.num_params)


def damping_sweep(
    make: Callable[[float], GradientAttributor],
    task: AbstractTask,
    checkpoints: Sequence[Checkpoint],
    train: Any,
    queries: Any,
    multipliers: Sequence[float] = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0),
    truth: torch.Tensor | None = None,
    params: Sequence[str] | None = None,
    **fit_kwargs: Any,
) -> list[SweepPoint]:
    """Scores of ``make(damping)`` for ``damping = multiplier × λ₀`` (λ₀ at the last checkpoint).

    Example::

        points = dt.damping_sweep(lambda d: dt.Influence(dt.EKFAC(damping=d)),
                                  task, ckpts, train, queries, truth=loo)
        best = max(points, key=lambda p: p.agreement["spearman"][0])

    Pass ``store=...`` in ``fit_kwargs`` to featurize the training set once for all points.
    """
    lambda0 = mean_squared_gradient(task, checkpoints[-1], train, params)
    out = []
    for m in multipliers:
        damping = float(m) * lambda0
        scores = make(damping).fit(task, checkpoints, train, **fit_kwargs).attribute(queries)
        agree = agreement(scores, truth) if truth is not None else None
        out.append(SweepPoint(float(m), damping, scores, agree))
    return out
