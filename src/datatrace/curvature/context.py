"""What a preconditioner is fitted from."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .problem import CurvatureProblem


class FitContext:
    """Everything a preconditioner may use when fitted at one checkpoint.

    Args:
        problem: the mean training loss and its curvature products.
        lambda0: mean squared per-example gradient entry (the damping scale), or a function
            computing it when first needed (a pass over the training features; K-FAC and
            EK-FAC never read it, so their fused fits make no such pass).
        cache: file prefix for cached factors inside the feature store (or None).
        train_blocks: yields ``(start, features)`` blocks of training gradients.
    """

    def __init__(
        self,
        problem: CurvatureProblem,
        lambda0: float | Callable[[], float],
        cache: Path | None,
        train_blocks: Callable[[], Iterator[tuple[int, dict[str, torch.Tensor]]]],
    ) -> None:
        self.problem = problem
        self._lambda0 = lambda0
        self.cache = cache
        self.train_blocks = train_blocks

    @property
    def lambda0(self) -> float:
        """λ₀ (computed on first use when it was given as a function)."""
        if callable(self._lambda0):
            self._lambda0 = float(self._lambda0())
        return float(self._lambda0)

    @property
    def lambda0_known(self) -> bool:
        """Whether λ₀ is already a number (else it costs a pass when read)."""
        return not callable(self._lambda0)
