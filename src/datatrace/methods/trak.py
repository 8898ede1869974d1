"""TRAK's slots (the recipe is :func:`datatrace.methods.recipes.TRAK`), Park et al. 2023:
``S = (1/n) Φ_q (ΦᵀΦ/n + λI)⁻¹ Φᵀ diag(q)``, averaged over checkpoints, where Φ are
(randomly projected) gradients of the model output function f and ``q_i = ∂ℓ_i/∂f_i``
(up to sign) its example weights. With ``λ = 0`` this is TRAK's ``Φ_q (ΦᵀΦ)⁻¹ Φᵀ Q``
(pseudo-inverse when ``ΦᵀΦ`` is singular).

The output function, by task:

* :class:`~datatrace.ClassificationTask`: the margin ``f(z) = log p_y − log(1 − p_y)`` for
  training examples and queries alike, with ``q_i = 1 − p_i`` (``p_i`` the probability of
  the true label), as in the paper.
* any other task (regression, :class:`~datatrace.LanguageModelingTask`, ``dt.Task``): the
  task's own loss is the output of a training example and its measurement the output of a
  query, with ``q_i = 1`` (``∂ℓ/∂f = 1`` when the output *is* the loss). For another output
  function, write a ``dt.Task`` whose ``loss_fn``/``measurement_fn`` are that function.

References:
    Park et al., "TRAK: Attributing Model Behavior at Scale", ICML 2023.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..core.data import ExampleSource
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
    """TRAK's output function: the margin ``log p_y − log(1 − p_y)`` for a
    :class:`ClassificationTask`; for any other task its own loss (training examples) and
    measurement (queries)."""

    def wrap(self, task: AbstractTask) -> AbstractTask:
        return MarginTask(task) if isinstance(task, ClassificationTask) else task


class MarginResidual(AbstractExampleWeights):
    """TRAK's example weights: ``1 − p_i`` (the true label's predicted probability) for a
    :class:`ClassificationTask`; 1 for any other task (its output is its loss)."""

    def weights(
        self, task: AbstractTask, state: State, train: ExampleSource, batch_size: int
    ) -> torch.Tensor:
        if isinstance(task, ClassificationTask):
            return 1.0 - true_label_probability(task, state, train, batch_size)
        dtype = next(iter(state[0].values())).dtype
        return torch.ones(len(train), dtype=dtype, device=model_device(task.model))


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
