"""The featurizer slot φ: what every featurizer provides (:class:`AbstractFeaturizer`) and
the feature dicts it computes (:data:`Features`)."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any

import torch

from ..core.task import AbstractTask

Features = dict[str, torch.Tensor]


class AbstractFeaturizer(ABC):
    """The featurizer slot φ of ``S = Σ_c w_c ⟨φ_c(q), P_c φ_c(z)⟩``, bound to a task.

    Features are dicts of tensors with a leading example dimension (:data:`Features`); a
    featurizer says their layout, computes them for a batch, and owns the inner products
    between them (so a factored or projected layout never has to be expanded). Final
    implementations: :class:`GradientFeatures`.
    """

    task: AbstractTask
    #: the parameters differentiated, in model order
    names: list[str]

    @abstractmethod
    def layout(self) -> dict[str, int]:
        """Feature array names and their widths."""

    @abstractmethod
    def compute(
        self,
        params: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor],
        batch: Any,
        measurement: bool,
        offset: int = 0,
        out: Features | None = None,
    ) -> Features:
        """Features of one batch (of the loss, or the measurement for queries); with
        ``out`` (arrays of the layout's widths, one row per example), written into it and
        returned."""

    @abstractmethod
    def pairwise(self, q: Features, g: Features) -> torch.Tensor:
        """Inner products ``⟨φ(q_j), φ(g_i)⟩``, shape (n_q, n_g)."""

    @abstractmethod
    def pairwise_diagonal(self, q: Features, g: Features) -> torch.Tensor:
        """``⟨φ(q_i), φ(g_i)⟩`` row by row, shape (n,)."""

    @abstractmethod
    def sqnorm(self, g: Features) -> torch.Tensor:
        """Squared norms ``‖φ(g_i)‖²``, shape (n_g,)."""

    @property
    @abstractmethod
    def num_params(self) -> int:
        """The number of parameters differentiated (the width of an unprojected feature)."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Everything that changes the features (for store fingerprints and logs)."""

    def scoring(self) -> contextlib.AbstractContextManager[None]:
        """The numerical setting scoring matmuls run under (default: unchanged)."""
        return contextlib.nullcontext()

    def work_entries(self) -> int:
        """Numbers held per example while a batch is featurized, beyond its features
        (default: as many as the features; activations not counted)."""
        return sum(self.layout().values())

    def sized_by_example(self) -> bool:
        """Whether the layout depends on the example it was probed on (sequence lengths):
        then it is probed on the longest example (default: it does not)."""
        return False
