"""What a preconditioner is fitted from."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .problem import CurvatureProblem


@dataclass(frozen=True)
class FitContext:
    """Everything a preconditioner may use when fitted at one checkpoint.

    Args:
        problem: the mean training loss and its curvature products.
        lambda0: mean squared per-example gradient entry (the damping scale).
        cache: file prefix for cached factors inside the feature store (or None).
        train_blocks: yields ``(start, features)`` blocks of training gradients.
    """

    problem: CurvatureProblem
    lambda0: float
    cache: Path | None
    train_blocks: Callable[[], Iterator[tuple[int, dict[str, torch.Tensor]]]]
