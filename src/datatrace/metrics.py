"""Evaluation metrics: pure functions of tensors.

* :func:`detection_curve`: mislabel detection (Pruthi et al. 2020): rank training examples
  by a suspicion score (e.g. self-influence), report the fraction of truly corrupted
  examples found against the fraction inspected.
* :func:`found_at`: that curve read at given inspection fractions.
* :func:`detection_auc`: the area under it (1 = perfect, ≈ 0.5 = random ranking).
* :func:`agreement`: per-query Pearson, Spearman and cosine between score rows and truth
  rows (e.g. leave-one-out retraining), mean and standard error over queries.
* :func:`lds`: the linear datamodeling score (Park et al. 2023) against subset retraining.
* :func:`top_k_overlap`: per query, the share of the truth's k most positive examples that
  the scores also rank in their top k.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .core.errors import DataError


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


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks along the last dimension (ties share their mean rank), as float64."""
    x = x.double()
    order = x.argsort(dim=-1, stable=True)
    sorted_x = x.gather(-1, order)
    pos = torch.arange(x.shape[-1], dtype=torch.float64).expand_as(x)
    ranks = torch.empty_like(x)
    out = []
    for row_x, row_pos, row_order in zip(sorted_x, pos, order, strict=True):
        _, inverse, counts = torch.unique_consecutive(
            row_x, return_inverse=True, return_counts=True
        )
        ends = counts.cumsum(0).double() - 1
        mean_rank = ends - (counts.double() - 1) / 2
        r = torch.empty_like(row_pos)
        r[row_order] = mean_rank[inverse]
        out.append(r)
    ranks = torch.stack(out) if out else ranks
    return ranks


def _rowwise_pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    denom = a.norm(dim=1) * b.norm(dim=1)
    return (a * b).sum(1) / torch.where(denom == 0, torch.ones_like(denom), denom)


def agreement(scores: torch.Tensor, truth: torch.Tensor) -> dict[str, tuple[float, float]]:
    """Per-query agreement of score rows with truth rows, as (mean, standard error).

    Args:
        scores: (n_query, n) attribution scores.
        truth: (n_query, n) ground truth in the same units and sign.

    Returns:
        ``{"pearson": (mean, se), "spearman": (mean, se), "cosine": (mean, se)}``; the
        standard error is ``std / sqrt(n_query)`` (0 for one query).
    """
    if scores.shape != truth.shape or scores.dim() != 2 or scores.shape[1] < 2:
        raise DataError(
            f"scores {tuple(scores.shape)} and truth {tuple(truth.shape)} must both be "
            "(n_query, n) with n >= 2"
        )
    a, b = scores.double(), truth.double()
    cos_den = a.norm(dim=1) * b.norm(dim=1)
    per = {
        "pearson": _rowwise_pearson(a, b),
        "spearman": _rowwise_pearson(_ranks(a), _ranks(b)),
        "cosine": (a * b).sum(1) / torch.where(cos_den == 0, torch.ones_like(cos_den), cos_den),
    }
    out = {}
    for k, v in per.items():
        se = float(v.std() / v.numel() ** 0.5) if v.numel() > 1 else 0.0
        out[k] = (float(v.mean()), se)
    return out


def _mean_se(v: torch.Tensor) -> tuple[float, float]:
    se = float(v.std() / v.numel() ** 0.5) if v.numel() > 1 else 0.0
    return float(v.mean()), se


class LDSResult(NamedTuple):
    """``mean`` and standard error ``se`` over the queries with a defined score, and the
    score of every query (``per_query``; NaN where the outputs or predictions are constant
    over subsets)."""

    mean: float
    se: float
    per_query: torch.Tensor


def lds(scores: torch.Tensor, masks: torch.Tensor, outputs: torch.Tensor) -> LDSResult:
    """Linear datamodeling score of attribution scores against subset retraining.

    The scores predict the measurement of query j under the model trained on subset
    ``S_m`` as ``f(z_j; θ) + Σ_{i ∉ S_m} scores[j, i]`` (datatrace's sign: a score is the
    effect of removing i); the LDS of query j is the Spearman correlation over subsets of
    that prediction with the actual ``outputs[m, j]``.

    Args:
        scores: (n_query, n_train).
        masks: bool (n_subsets, n_train), True = in the subset.
        outputs: (n_subsets, n_query), e.g. from :func:`datatrace.truth.subset_retraining`.
    """
    if scores.dim() != 2 or masks.dim() != 2 or outputs.dim() != 2:
        raise DataError("scores, masks and outputs must all be 2-D")
    n_query, n_train = scores.shape
    if masks.shape[1] != n_train or outputs.shape != (masks.shape[0], n_query):
        raise DataError(
            f"shapes do not fit: scores {tuple(scores.shape)} (n_query, n_train), masks "
            f"{tuple(masks.shape)} (n_subsets, n_train), outputs {tuple(outputs.shape)} "
            "(n_subsets, n_query)"
        )
    if masks.shape[0] < 3:
        raise DataError("the LDS needs at least 3 subsets")
    for name, t in (("scores", scores), ("outputs", outputs)):
        if not bool(torch.isfinite(t).all()):
            raise DataError(f"{name} contain NaN or inf")
    removed = (~masks.bool()).double()
    predicted = removed @ scores.double().T  # (n_subsets, n_query)
    a, b = _ranks(predicted.T), _ranks(outputs.double().T)
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    denom = a.norm(dim=1) * b.norm(dim=1)
    per = torch.where(denom > 0, (a * b).sum(1) / denom.clamp_min(1e-300), torch.nan)
    ok = torch.isfinite(per)
    if not bool(ok.any()):
        raise DataError("every query's predictions or outputs are constant over subsets")
    if not bool(ok.all()):
        warnings.warn(
            f"{int((~ok).sum())} queries have constant predictions or outputs over subsets; "
            "their LDS is NaN and left out of the mean",
            RuntimeWarning,
            stacklevel=2,
        )
    mean, se = _mean_se(per[ok])
    return LDSResult(mean, se, per)


def top_k_overlap(
    scores: torch.Tensor, truth: torch.Tensor, k: int, largest: bool = True
) -> tuple[float, float]:
    """Mean (and standard error over queries) of ``|top_k(scores_j) ∩ top_k(truth_j)| / k``.

    ``largest=False`` compares the k most negative instead (the opponents).
    """
    if scores.shape != truth.shape or scores.dim() != 2:
        raise DataError(
            f"scores {tuple(scores.shape)} and truth {tuple(truth.shape)} must both be (n_query, n)"
        )
    if not 0 < k <= scores.shape[1]:
        raise DataError(f"k must be in [1, {scores.shape[1]}], got {k}")
    a = scores.double().topk(k, dim=1, largest=largest).indices
    b = truth.double().topk(k, dim=1, largest=largest).indices
    hit = torch.zeros_like(scores, dtype=torch.bool)
    hit.scatter_(1, a, True)
    per = hit.gather(1, b).double().sum(1) / k
    return _mean_se(per)
