"""The engine's typed slots besides the featurizer and the preconditioner: which checkpoints
count (:class:`CheckpointWeights`), per-example column weights
(:class:`AbstractExampleWeights`) and the function differentiated (:class:`AbstractOutput`)."""

from __future__ import annotations

import enum
import math
from abc import ABC, abstractmethod

import torch

from ..core.checkpoint import Checkpoint
from ..core.data import ExampleSource
from ..core.errors import CheckpointError
from ..core.task import AbstractTask
from ..features.loop import State


class CheckpointWeights(enum.Enum):
    """Which checkpoints count, and with what weight ``w_c``."""

    #: the last checkpoint only, weight 1 (Grad-Dot, Grad-Cos: final-model methods)
    LAST = "last"
    #: every checkpoint, with its ``Checkpoint.weight`` as is (TracIn's learning rate: the
    #: only method whose scores scale with the checkpoint weights)
    LEARNING_RATE = "learning_rate"
    #: every checkpoint, weight 1/C whatever its own weight (TRAK's ensemble average)
    MEAN = "mean"
    #: every checkpoint, its ``Checkpoint.weight`` normalised to sum 1 (influence functions:
    #: an ensemble average, so scores stay in leave-one-out units whatever the weights,
    #: e.g. learning rates saved for TracIn)
    ENSEMBLE = "ensemble"

    def select(self, ckpts: list[Checkpoint]) -> tuple[list[Checkpoint], list[float]]:
        """The checkpoints used and their weights."""
        if self is CheckpointWeights.LAST:
            return ckpts[-1:], [1.0]
        if self is CheckpointWeights.MEAN:
            return ckpts, [1.0 / len(ckpts)] * len(ckpts)
        if self is CheckpointWeights.ENSEMBLE:
            return ckpts, _normalised([c.weight for c in ckpts])
        return ckpts, [c.weight for c in ckpts]


def _normalised(weights: list[float]) -> list[float]:
    """Ensemble weights ``w_c / Σ w``: each ``>= 0``, not all 0."""
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise CheckpointError(
            f"checkpoint weights {weights} cannot be ensemble weights (influence functions "
            "average their checkpoints with weights normalised to sum 1): give weights >= 0, "
            "not all 0 (e.g. the default weight=1 for an equal average)"
        )
    total = math.fsum(weights)
    return [w / total for w in weights]


class AbstractExampleWeights(ABC):
    """The example-weight slot ``v_c(i)``: a weight per training example and checkpoint that
    multiplies its column of scores (and its self-influence)."""

    @abstractmethod
    def weights(
        self, task: AbstractTask, state: State, train: ExampleSource, batch_size: int
    ) -> torch.Tensor:
        """Weights of every training example at one checkpoint, shape (n_train,)."""


class AbstractOutput(ABC):
    """The output slot: which function of the model is differentiated, as a task wrapping
    the user's (loss and measurement replaced). ``None`` in the engine: the task itself."""

    @abstractmethod
    def wrap(self, task: AbstractTask) -> AbstractTask:
        """The task whose loss/measurement gradients are the features."""
