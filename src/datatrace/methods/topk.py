"""Blocked scoring: consume a stream of score blocks (n_query, block) without keeping the
full (n_query, n_train) matrix, keeping a running top-k. Pure tensor functions."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def running_top_k(
    blocks: Iterable[tuple[int, torch.Tensor]], k: int, largest: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k scores and their training indices over blocks ``(start, scores)``.

    Args:
        blocks: ``(start index of the block, scores of shape (n_query, block))``.
        k: how many to keep per query.
        largest: keep the largest (proponents) or the smallest (opponents).

    Returns:
        (values, indices), each (n_query, k'), sorted best first, ``k' = min(k, n_train)``.
        Ties keep the lower training index first.
    """
    best_v: torch.Tensor | None = None
    best_i: torch.Tensor | None = None
    for start, scores in blocks:
        idx = torch.arange(start, start + scores.shape[1], device=scores.device)
        idx = idx.expand(scores.shape[0], -1)
        if best_v is not None and best_i is not None:
            scores = torch.cat([best_v, scores], dim=1)
            idx = torch.cat([best_i, idx], dim=1)
        kk = min(k, scores.shape[1])
        # stable sort so that equal scores keep index order (deterministic across block sizes)
        order = torch.sort(scores, dim=1, descending=largest, stable=True).indices[:, :kk]
        best_v, best_i = scores.gather(1, order), idx.gather(1, order)
    assert best_v is not None and best_i is not None
    return best_v, best_i


def merge_top_k(
    parts: list[tuple[torch.Tensor, torch.Tensor]], k: int, largest: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge top-k lists computed over disjoint training blocks (e.g. by different ranks)
    into the top-k over all of them, with :func:`running_top_k`'s tie rule (equal scores:
    lower training index first), so the result equals one pass over every block."""
    values = torch.cat([v for v, _ in parts], dim=1)
    indices = torch.cat([i for _, i in parts], dim=1)
    by_index = torch.sort(indices, dim=1, stable=True).indices
    values, indices = values.gather(1, by_index), indices.gather(1, by_index)
    order = torch.sort(values, dim=1, descending=largest, stable=True).indices[
        :, : min(k, values.shape[1])
    ]
    return values.gather(1, order), indices.gather(1, order)
