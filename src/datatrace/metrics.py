"""Evaluation metrics: pure functions of tensors.

* :func:`detection_curve`: mislabel detection (Pruthi et al. 2020): rank training examples
  by a suspicion score (e.g. self-influence), report the fraction of truly corrupted
  examples found against the fraction inspected.
* :func:`found_at`: that curve read at given inspection fractions.
* :func:`detection_auc`: the area under it (1 = perfect, ≈ 0.5 = random ranking).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import DataError


def detection_curve(
    scores: torch.Tensor, corrupted: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fraction of corrupted examples found after inspecting the top-m by score, every m.

    Args:
        scores: suspicion per training example, shape (n,); higher = inspect first.
        corrupted: bool, shape (n,): which examples are truly corrupted.

    Returns:
        (inspected, found), each shape (n + 1,), from (0, 0) to (1, 1). Ties in ``scores``
        are broken by index, lowest first.
    """
    scores, corrupted = scores.flatten(), corrupted.flatten().bool()
    if scores.shape != corrupted.shape or scores.numel() == 0:
        raise DataError(
            f"scores {tuple(scores.shape)} and corrupted {tuple(corrupted.shape)} must be "
            "non-empty and of the same length"
        )
    if not bool(torch.isfinite(scores).all()):
        bad = (~torch.isfinite(scores)).nonzero().flatten()[:10].tolist()
        raise DataError(f"non-finite scores at examples {bad}")
    total = int(corrupted.sum())
    if total == 0:
        raise DataError("no example is marked corrupted: the detection curve is undefined")
    order = torch.sort(scores, descending=True, stable=True).indices
    hits = torch.cat([torch.zeros(1), corrupted[order].double().cumsum(0)])
    n = scores.numel()
    inspected = torch.arange(n + 1, dtype=torch.float64) / n
    return inspected, hits.double() / total


def found_at(
    scores: torch.Tensor, corrupted: torch.Tensor, fractions: Sequence[float]
) -> list[float]:
    """Fraction of corrupted examples found after inspecting each given fraction of data."""
    _, found = detection_curve(scores, corrupted)
    n = scores.numel()
    return [float(found[min(n, round(f * n))]) for f in fractions]


def detection_auc(scores: torch.Tensor, corrupted: torch.Tensor) -> float:
    """Area under the found-vs-inspected curve (trapezoid rule)."""
    inspected, found = detection_curve(scores, corrupted)
    return float(torch.trapezoid(found, inspected))
