"""Gold standards: what attribution scores are checked against.

* :func:`leave_one_out`: retrain without each chosen example (same seed), and report
  ``f(z_j; θ without i) − f(z_j; θ)``, averaged over seeds: the units and sign of every
  datatrace score (positive = removing i raises the query's loss = proponent).

``train_fn(indices, seed) -> nn.Module`` trains a model on the training examples at
``indices`` (a LongTensor) with the given seed; it may warm-start from anything it likes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .data import ExampleSource, batch_to
from .errors import ConfigError
from .featurize import eval_mode, model_device
from .task import AbstractTask

TrainFn = Callable[[torch.Tensor, int], nn.Module]


def measure(
    task: AbstractTask, model: nn.Module, queries: ExampleSource, batch_size: int = 1024
) -> torch.Tensor:
    """``task.measurement`` of every query under ``model`` (no gradients), shape (n_query,)."""
    device = model_device(model)
    out = []
    with torch.no_grad(), eval_mode(model):
        for s, e in queries.ranges(batch_size):
            out.append(task.measurement(model, batch_to(queries.batch(s, e), device)))
    return torch.cat(out)


def leave_one_out(
    train_fn: TrainFn,
    task: AbstractTask,
    train: Any,
    queries: Any,
    indices: Sequence[int] | torch.Tensor | None = None,
    seeds: Sequence[int] = (0,),
) -> torch.Tensor:
    """Leave-one-out retraining, shape (n_query, len(indices)), mean over ``seeds``.

    Args:
        train_fn: ``train_fn(train_indices, seed) -> model``.
        task: defines the measurement (e.g. the query loss).
        train: the training data (only its length is used here).
        queries: the examples whose measurement is explained.
        indices: training examples to leave out (``None``: all).
        seeds: retraining seeds; the full-data model is retrained with each seed too.
    """
    n = len(ExampleSource(train, "training data"))
    q = ExampleSource(queries, "queries")
    idx = torch.arange(n) if indices is None else torch.as_tensor(indices, dtype=torch.long)
    if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= n:
        raise ConfigError(f"indices must be non-empty and within [0, {n})")
    if not seeds:
        raise ConfigError("seeds is empty; pass e.g. seeds=(0,)")
    total = torch.zeros(len(q), idx.numel(), dtype=torch.float64)
    everything = torch.arange(n)
    for seed in seeds:
        base = measure(task, train_fn(everything, seed), q).double()
        for k, i in enumerate(idx.tolist()):
            keep = everything[everything != i]
            total[:, k] += measure(task, train_fn(keep, seed), q).double() - base
    return total / len(seeds)
