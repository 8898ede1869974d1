"""TRAK (Park et al. 2023): ``S = (1/n) Φ_q (ΦᵀΦ/n + λI)⁻¹ Φᵀ diag(1 − p)``, averaged over
checkpoints, where Φ are (randomly projected) gradients of the margin
``f(z) = log p_y − log(1 − p_y)`` and ``p_i`` the probability of the true label.

With ``λ = 0`` this is TRAK's ``Φ_q (ΦᵀΦ)⁻¹ Φᵀ Q`` (pseudo-inverse when ``ΦᵀΦ`` is singular).

References:
    Park et al., "TRAK: Attributing Model Behavior at Scale", ICML 2023.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import Checkpoint
from ..curvature.gram import GramInverse
from ..data import ExampleSource, batch_to
from ..errors import ConfigError
from ..features import FeatureSpec
from ..featurize import eval_mode, model_device
from ..grads import bound_model
from ..task import AbstractTask, ClassificationTask, ModelFn
from .gradient import FittedGradientAttributor, GradientAttributor


class MarginTask(AbstractTask):
    """TRAK's model output for classification: ``log p_y − log(1 − p_y)`` as loss and
    measurement (it wraps a :class:`ClassificationTask`)."""

    def __init__(self, task: ClassificationTask) -> None:
        super().__init__(task.model)
        self.inner = task

    def loss(self, model: ModelFn, batch: Any) -> torch.Tensor:
        logits, y = self.inner.logits(model, batch)
        correct = logits.gather(1, y[:, None])[:, 0]
        others = logits.scatter(1, y[:, None], float("-inf"))
        return correct - torch.logsumexp(others, dim=1)

    def check_batch(self, model: ModelFn, batch: Any, offset: int) -> None:
        self.inner.check_batch(model, batch, offset)


@dataclass(frozen=True)
class TRAK:
    """TRAK attribution.

    Args:
        projection_dim: random projection dimension k (``None``: exact gradients).
        damping: λ (``None``: the default multiple of the mean squared feature; 0: TRAK's
            undamped pseudo-inverse).
        params: parameter/module names (``None``: all).
        projection_seed: seed of the projection.
        feature_dtype: keep features in this dtype (``torch.bfloat16``: half the store;
            see :class:`datatrace.FeatureSpec` for the error).
    """

    projection_dim: int | None = 512
    damping: float | None = None
    params: tuple[str, ...] | None = None
    projection_seed: int = 0
    feature_dtype: torch.dtype | None = None

    def fit(
        self,
        task: AbstractTask,
        checkpoints: Sequence[Checkpoint],
        train: Any,
        *,
        store: str | Path | None = None,
        **kwargs: Any,
    ) -> FittedGradientAttributor:
        """Featurize margins at every checkpoint; returns the fitted scorer (same calls as
        every method: attribute, top_k, self_influence)."""
        if not isinstance(task, ClassificationTask):
            raise ConfigError("TRAK needs a dt.ClassificationTask (it explains the margin)")
        params = (self.params,) if isinstance(self.params, str) else self.params
        spec = FeatureSpec(
            params=params,
            projection_dim=self.projection_dim,
            projection_seed=self.projection_seed,
            factored=False,
            feature_dtype=self.feature_dtype,
        )
        method = GradientAttributor(spec, preconditioner=GramInverse(self.damping), name="TRAK")
        fitted = method.fit(MarginTask(task), checkpoints, train, store=store, **kwargs)
        # TRAK averages its models: each checkpoint gets weight 1/C, whatever its own weight
        fitted.weights = [1.0 / len(fitted.states)] * len(fitted.states)
        fitted.column_weights = [
            1.0 - true_label_probability(task, st, fitted.train, fitted.batch_size)
            for st in fitted.states
        ]
        return fitted


def true_label_probability(
    task: ClassificationTask,
    state: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]],
    source: ExampleSource,
    batch_size: int,
) -> torch.Tensor:
    """``p_i = exp(−cross-entropy)`` of every training example at one checkpoint, (n,)."""
    device = model_device(task.model)
    model = bound_model(task.model, {**state[1], **state[0]})
    out = []
    with torch.no_grad(), eval_mode(task.model):
        for s, e in source.ranges(batch_size):
            out.append(torch.exp(-task.loss(model, batch_to(source.batch(s, e), device))))
    return torch.cat(out)
