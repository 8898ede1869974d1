"""TRAK's slots (the recipe is :func:`datatrace.methods.recipes.TRAK`), Park et al. 2023:
``S = (1/n) Φ_q (ΦᵀΦ/n + λI)⁻¹ Φᵀ diag(1 − p)``, averaged over checkpoints, where Φ are
(randomly projected) gradients of the margin
``f(z) = log p_y − log(1 − p_y)`` and ``p_i`` the probability of the true label.

With ``λ = 0`` this is TRAK's ``Φ_q (ΦᵀΦ)⁻¹ Φᵀ Q`` (pseudo-inverse when ``ΦᵀΦ`` is singular).

References:
    Park et al., "TRAK: Attributing Model Behavior at Scale", ICML 2023.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..core.data import ExampleSource
from ..core.errors import ConfigError
from ..core.loop import over_batches
from ..core.runtime import model_device
from ..core.task import AbstractTask, ClassificationTask, ModelFn
from ..features.loop import State
from ..grads.per_example import bound_model
from .slots import AbstractExampleWeights, AbstractOutput


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

    def check_data(self, data: Any, name: str) -> None:
        self.inner.check_data(data, name)


class Margin(AbstractOutput):
    """TRAK's output function for classification: the margin ``log p_y − log(1 − p_y)``."""

    def wrap(self, task: AbstractTask) -> AbstractTask:
        if not isinstance(task, ClassificationTask):
            raise ConfigError("TRAK needs a dt.ClassificationTask (it explains the margin)")
        return MarginTask(task)


class MarginResidual(AbstractExampleWeights):
    """TRAK's example weights ``1 − p_i`` (the true label's predicted probability)."""

    def weights(
        self, task: AbstractTask, state: State, train: ExampleSource, batch_size: int
    ) -> torch.Tensor:
        if not isinstance(task, ClassificationTask):
            raise ConfigError("1 − p weights need a dt.ClassificationTask")
        return 1.0 - true_label_probability(task, state, train, batch_size)


def true_label_probability(
    task: ClassificationTask,
    state: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]],
    source: ExampleSource,
    batch_size: int,
) -> torch.Tensor:
    """``p_i = exp(−cross-entropy)`` of every training example at one checkpoint, (n,)."""
    model = bound_model(task.model, {**state[1], **state[0]})
    loop = over_batches(source, batch_size, device=model_device(task.model), eval_module=task.model)
    with torch.no_grad(), contextlib.closing(loop):  # closing: flags restored also on errors
        return torch.cat([torch.exp(-task.loss(model, batch)) for _, _, batch in loop])
