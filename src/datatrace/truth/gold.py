"""Gold standards by retraining: what attribution scores are checked against.

* :func:`leave_one_out`: retrain without each chosen example (same seed).
* :func:`group_leave_out`: retrain without each group of examples.
* :func:`subset_retraining`: retrain on random subsets, for the LDS (:func:`metrics.lds`).
* further training (Wei et al. 2024, for a final model only) is in :mod:`.further`.

Every result is in the units and sign of datatrace's scores:
``truth[j, i] = f(z_j; θ without i) − f(z_j; θ)`` (positive = removing i raises the query's
loss = i is a proponent), so :mod:`datatrace.metrics` compares them directly.

``train_fn(indices, seed) -> nn.Module`` trains a model on the training examples at
``indices`` (a LongTensor) with the given seed; it may warm-start from anything it likes.

**Jobs, caching and sharding.** Each retraining (or, for further training, each seed × chunk
of left-out examples) is a job. With ``cache=DIR`` every finished job is written to DIR at
once (safetensors, atomic rename): a crashed run restarted with the same call recomputes
nothing already finished, and gives the same result as an uninterrupted run. The cache's
manifest records the settings; another call's settings raise
:class:`~datatrace.errors.StoreMismatchError`. Under ``torchrun --nproc_per_node=N`` the same
call splits the jobs round-robin across the ranks and every rank returns exactly the
single-process result (see :mod:`datatrace.distributed`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..core.data import ExampleSource
from ..core.errors import ConfigError, DataError
from ..core.fingerprint import model_fingerprint, task_fingerprint
from ..core.task import AbstractTask
from ..retrain import measure, subset_masks
from .jobs import callable_name, digest, run_jobs

TrainFn = Callable[[torch.Tensor, int], nn.Module]


def _sources(train: Any, queries: Any) -> tuple[ExampleSource, ExampleSource]:
    tr = ExampleSource(train, "training data")
    q = ExampleSource(queries, "queries")
    if len(tr) == 0:
        raise DataError("the training data is empty")
    if len(q) == 0:
        raise DataError("the queries are empty")
    return tr, q


def _indices(indices: Any, n: int) -> torch.Tensor:
    idx = torch.arange(n) if indices is None else torch.as_tensor(indices, dtype=torch.long)
    if idx.dim() != 1 or idx.numel() == 0:
        raise ConfigError("indices must be a non-empty 1-D list of training indices")
    if int(idx.min()) < 0 or int(idx.max()) >= n:
        raise ConfigError(
            f"indices must be within [0, {n}); got {int(idx.min())}..{int(idx.max())}"
        )
    if torch.unique(idx).numel() != idx.numel():
        raise ConfigError("indices contain duplicates")
    return idx


def _seeds(seeds: Iterable[int]) -> list[int]:
    out = [int(s) for s in seeds]
    if not out:
        raise ConfigError("seeds is empty; pass e.g. seeds=(0,)")
    return out


def _base_settings(
    kind: str, train_fn: Any, task: AbstractTask, tr: ExampleSource, q: ExampleSource, key: Any
) -> dict[str, Any]:
    return {
        "kind": kind,
        "train_fn": callable_name(train_fn),
        "model": model_fingerprint(task.model),
        "task": task_fingerprint(task),
        "n_train": len(tr),
        "train": tr.fingerprint(),
        "n_query": len(q),
        "queries": q.fingerprint(),
        "cache_key": key,
    }


# -- retraining gold standards ----------------------------------------------------------------


def _removal_runs(
    kind: str,
    train_fn: TrainFn,
    task: AbstractTask,
    train: Any,
    queries: Any,
    removed: list[torch.Tensor],
    seeds: Iterable[int],
    cache: str | os.PathLike[str] | None,
    cache_key: Any,
    progress: bool | None,
) -> torch.Tensor:
    """``mean_seed [f(θ without removed[g]) − f(θ)]``, (n_query, n_groups)."""
    tr, q = _sources(train, queries)
    seed_list = _seeds(seeds)
    n, n_groups = len(tr), len(removed)
    everything = torch.arange(n)
    keep_masks = []
    for g in removed:
        mask = torch.ones(n, dtype=torch.bool)
        mask[g] = False
        keep_masks.append(mask)
    settings = _base_settings(kind, train_fn, task, tr, q, cache_key)
    settings["seeds"] = seed_list
    settings["removed"] = digest(torch.cat([torch.tensor([len(g)]) for g in removed] + removed))
    per_seed = n_groups + 1

    def job(k: int) -> torch.Tensor:
        seed, g = seed_list[k // per_seed], k % per_seed - 1
        keep = everything if g < 0 else everything[keep_masks[g]]
        return measure(task, train_fn(keep, seed), q)

    runs = run_jobs(
        len(seed_list) * per_seed, (len(q),), job, settings, cache, progress, kind
    ).view(len(seed_list), per_seed, len(q))
    delta = runs[:, 1:, :] - runs[:, :1, :]  # (seeds, groups, query)
    return delta.mean(0).T.contiguous()


def leave_one_out(
    train_fn: TrainFn,
    task: AbstractTask,
    train: Any,
    queries: Any,
    indices: Sequence[int] | torch.Tensor | None = None,
    seeds: Iterable[int] = (0,),
    *,
    cache: str | os.PathLike[str] | None = None,
    cache_key: Any = None,
    progress: bool | None = None,
) -> torch.Tensor:
    """Leave-one-out retraining, (n_query, len(indices)), mean over ``seeds``.

    Args:
        train_fn: ``train_fn(train_indices, seed) -> model``.
        task: defines the measurement (e.g. the query loss).
        train: the training data (its length and fingerprint are used here).
        queries: the examples whose measurement is explained.
        indices: training examples to leave out (``None``: all).
        seeds: retraining seeds; the full-data model is retrained with each seed too.
        cache: directory keeping every finished retraining (resumable). The cache checks
            the data, queries, task type and every argument here; it cannot see inside
            ``train_fn`` (its name is recorded, not checked): after changing how you
            train, use a new directory or a new ``cache_key``.
        cache_key: anything JSON-able naming your training code's version: the cache
            records it and refuses to mix results of different versions.
        progress: a progress bar (default: when stderr is a terminal).
    """
    tr = ExampleSource(train, "training data")
    idx = _indices(indices, len(tr))
    return _removal_runs(
        "leave_one_out",
        train_fn,
        task,
        train,
        queries,
        [idx[k : k + 1] for k in range(len(idx))],
        seeds,
        cache,
        cache_key,
        progress,
    )


def _group_list(groups: Any, n: int) -> list[torch.Tensor]:
    if (
        not isinstance(groups, torch.Tensor)
        and len(groups) == n
        and all(isinstance(g, (int,)) or (hasattr(g, "ndim") and g.ndim == 0) for g in groups)
    ):
        groups = torch.as_tensor([int(g) for g in groups])  # a plain list/array of group ids
    if isinstance(groups, torch.Tensor) and groups.dim() == 1 and groups.numel() == n:
        ids = groups.long()
        if int(ids.min()) < 0:
            raise ConfigError("group ids must be >= 0 (use a list of index lists to skip some)")
        out = [torch.nonzero(ids == g).flatten() for g in range(int(ids.max()) + 1)]
        empty = [g for g, members in enumerate(out) if members.numel() == 0]
        if empty:
            raise ConfigError(f"groups {empty[:10]} have no members; number groups 0..G-1")
        return out
    if isinstance(groups, torch.Tensor):
        raise ConfigError(
            f"groups as a tensor must be group ids of shape ({n},), got {tuple(groups.shape)}"
        )
    if not len(groups):
        raise ConfigError("groups is empty")
    out = []
    for k, g in enumerate(groups):
        try:
            out.append(_indices(g, n))
        except ConfigError as exc:
            raise ConfigError(f"group {k}: {exc}") from exc
    return out


def group_leave_out(
    train_fn: TrainFn,
    task: AbstractTask,
    train: Any,
    queries: Any,
    groups: torch.Tensor | Sequence[Sequence[int]],
    seeds: Iterable[int] = (0,),
    *,
    cache: str | os.PathLike[str] | None = None,
    cache_key: Any = None,
    progress: bool | None = None,
) -> torch.Tensor:
    """Leave-group-out retraining, (n_query, n_groups), mean over ``seeds``.

    ``groups``: a LongTensor of group ids (n_train,) numbered 0..G-1 (every example in one
    group), or a list of index lists (groups may overlap or leave examples out).
    """
    tr = ExampleSource(train, "training data")
    return _removal_runs(
        "group_leave_out",
        train_fn,
        task,
        train,
        queries,
        _group_list(groups, len(tr)),
        seeds,
        cache,
        cache_key,
        progress,
    )


def subset_retraining(
    train_fn: TrainFn,
    task: AbstractTask,
    train: Any,
    queries: Any,
    n_subsets: int = 64,
    fraction: float = 0.5,
    seed: int = 0,
    *,
    cache: str | os.PathLike[str] | None = None,
    cache_key: Any = None,
    progress: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Retrain on random subsets (Park et al. 2023's LDS protocol).

    Returns:
        ``(masks, outputs)``: bool (n_subsets, n_train), which examples each model saw
        (:func:`subset_masks`), and float64 (n_subsets, n_query), each model's
        measurement of each query. Model ``m`` is trained with seed ``seed + m``.
    """
    tr, q = _sources(train, queries)
    masks = subset_masks(len(tr), n_subsets, fraction, seed)
    settings = _base_settings("subset_retraining", train_fn, task, tr, q, cache_key)
    settings.update(n_subsets=n_subsets, fraction=fraction, seed=seed)

    def job(k: int) -> torch.Tensor:
        return measure(task, train_fn(torch.nonzero(masks[k]).flatten(), seed + k), q)

    outputs = run_jobs(n_subsets, (len(q),), job, settings, cache, progress, "subsets")
    return masks, outputs


# -- further training (Wei et al. 2024) -------------------------------------------------------
