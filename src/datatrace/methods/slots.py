"""The engine's typed slots besides the featurizer and the preconditioner: which checkpoints
count (:class:`CheckpointWeights`), per-example column weights
(:class:`AbstractExampleWeights`) and the function differentiated (:class:`AbstractOutput`)."""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod

import torch

from ..core.checkpoint import Checkpoint
from ..core.data import ExampleSource
from ..core.task import AbstractTask
from ..features.loop import State


class CheckpointWeights(enum.Enum):
    """Which checkpoints count, and with what weight ``w_c``."""

    #: the last checkpoint only, weight 1 (Grad-Dot, Grad-Cos: final-model methods)
    LAST = "last"
    #: every checkpoint, with its ``Checkpoint.weight`` (TracIn's learning rate; influence)
    LEARNING_RATE = "learning_rate"
    #: every checkpoint, weight 1/C whatever its own weight (TRAK's ensemble average)
    MEAN = "mean"

    def select(self, ckpts: list[Checkpoint]) -> tuple[list[Checkpoint], list[float]]:
        """The checkpoints used and their weights."""
        if self is CheckpointWeights.LAST:
            return ckpts[-1:], [1.0]
        if self is CheckpointWeights.MEAN:
            return ckpts, [1.0 / len(ckpts)] * len(ckpts)
        return ckpts, [c.weight for c in ckpts]


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
