"""Retraining machinery shared by the gold standards (:mod:`datatrace.truth`) and the
Distilled Datamodel: measuring a model on queries, stacked (vmapped) SGD over many models at
once, random training subsets, and the plain SGD trainer with checkpoints."""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from .core.checkpoint import Checkpoint
from .core.data import ExampleSource
from .core.errors import ConfigError
from .core.loop import over_batches
from .core.runtime import model_device
from .core.task import AbstractTask
from .grads.per_example import bound_model


def measure(
    task: AbstractTask, model: nn.Module, queries: ExampleSource, batch_size: int = 1024
) -> torch.Tensor:
    """``task.measurement`` of every query under ``model`` (no gradients), shape (n_query,)."""
    loop = over_batches(queries, batch_size, device=model_device(model), eval_module=model)
    with torch.no_grad(), contextlib.closing(loop):  # closing: flags restored also on errors
        return torch.cat([task.measurement(model, batch) for _, _, batch in loop])


def measure_stacked(
    task: AbstractTask,
    fixed: dict[str, torch.Tensor],
    params: dict[str, torch.Tensor],
    queries: ExampleSource,
    device: torch.device,
) -> torch.Tensor:
    """``task.measurement`` of every query under each of R stacked parameter sets
    (``params[name]`` has a leading dimension R; ``fixed`` holds buffers and the other
    parameters), shape (n_query, R): one vmapped call per query batch, a loop over the R
    models where the measurement cannot be vmapped."""
    r_models = next(iter(params.values())).shape[0]

    def one(p: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        return task.measurement(bound_model(task.model, {**fixed, **p}), batch)

    rows = []
    use_vmap = True
    loop = over_batches(queries, 1024, device=device, eval_module=task.model)
    with torch.no_grad(), contextlib.closing(loop):
        for _, _, batch in loop:
            if use_vmap:
                try:
                    rows.append(vmap(one, in_dims=(0, None))(params, batch).T)
                    continue
                except Exception:  # e.g. data-dependent control flow: loop instead
                    use_vmap = False
            cols = [one({nm: t[r] for nm, t in params.items()}, batch) for r in range(r_models)]
            rows.append(torch.stack(cols, dim=1))
    return torch.cat(rows, dim=0)


def stacked_sgd_step(
    params: dict[str, torch.Tensor],
    grads: Sequence[torch.Tensor],
    velocity: dict[str, torch.Tensor],
    lr: float,
    momentum: float,
    weight_decay: float,
) -> None:
    """One ``torch.optim.SGD`` step (momentum, weight decay, no dampening) on stacked
    parameters, in place of ``params`` and ``velocity`` (same keys, grads in key order)."""
    with torch.no_grad():
        for (nm, p), g in zip(list(params.items()), grads, strict=True):
            velocity[nm] = momentum * velocity[nm] + g + weight_decay * p
            params[nm] = (p - lr * velocity[nm]).detach()


def subset_masks(n_train: int, n_subsets: int, fraction: float, seed: int) -> torch.Tensor:
    """``n_subsets`` random subsets of exactly ``round(fraction · n_train)`` examples,
    bool (n_subsets, n_train), reproducible from ``seed``."""
    if not 0 < fraction < 1:
        raise ConfigError(f"fraction must be in (0, 1), got {fraction!r}")
    if n_subsets < 2:
        raise ConfigError(f"n_subsets must be >= 2, got {n_subsets!r}")
    m = round(fraction * n_train)
    if not 0 < m < n_train:
        raise ConfigError(f"fraction {fraction} of {n_train} examples leaves an empty side")
    g = torch.Generator().manual_seed(int(seed))
    masks = torch.zeros(n_subsets, n_train, dtype=torch.bool)
    for s in range(n_subsets):
        masks[s, torch.randperm(n_train, generator=g)[:m]] = True
    return masks


class LRSchedule(enum.Enum):
    """Learning-rate schedules of :func:`sgd_train`."""

    #: ``lr · (1 + cos(π t / T)) / 2`` per step t of T
    COSINE = "cosine"
    #: ``lr · 0.5^⌊(epoch − 1) / ⌊epochs / 3⌋⌋``: halved twice, per epoch
    STEP_HALVING = "step_halving"

    def rate(self, lr: float, step: int, total: int, epoch: int, epochs: int) -> float:
        if self is LRSchedule.COSINE:
            return lr * 0.5 * (1 + math.cos(math.pi * step / total))
        return lr * (0.5 ** ((epoch - 1) // max(1, epochs // 3)))


def sgd_train(
    make: Callable[[], nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int,
    epochs: int,
    lr: float,
    batch_size: int,
    momentum: float,
    alpha: float = 0.0,
    checkpoints: int = 0,
    keep: torch.Tensor | None = None,
    *,
    weight_decay: float = 0.0,
    schedule: LRSchedule = LRSchedule.COSINE,
    order_seed: int | None = None,
    checkpoint_epochs: Sequence[int] | None = None,
) -> tuple[nn.Module, list[Checkpoint]]:
    """THE trainer of built-in experiments, the demo and the benchmarks: from a seeded
    initialisation (``torch.manual_seed(seed)``), SGD on ``mean CE + α‖θ‖²`` with
    ``torch.optim.SGD``'s momentum and weight decay, batches in a seeded random order
    (``order_seed``, default ``seed``), the learning rate from ``schedule``.

    Keeps ``checkpoints`` evenly spaced snapshots (or one at the end of each epoch in
    ``checkpoint_epochs``), each weighted by its learning rate (TracIn's weights). With
    ``keep`` (bool over the rows of x), the batch order is that of the full data with the
    other rows skipped, so retraining without a few examples differs from the full run by
    those examples only, not by a new shuffle."""
    torch.manual_seed(seed)
    model = make()
    g = torch.Generator().manual_seed(seed if order_seed is None else order_seed)
    n_rows = len(x) if keep is None else int(keep.sum())
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    total = epochs * math.ceil(n_rows / batch_size)
    if checkpoint_epochs is not None:
        marks = set(checkpoint_epochs)
    else:
        marks = {round(epochs * (c + 1) / checkpoints) for c in range(checkpoints)}
    ckpts: list[Checkpoint] = []
    step, rate = 0, lr
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(x), generator=g)
        if keep is not None:
            order = order[keep[order]]
        for idx in order.split(batch_size):
            rate = schedule.rate(lr, step, total, epoch, epochs)
            for group in opt.param_groups:
                group["lr"] = rate
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if alpha:
                loss = loss + alpha * sum((p**2).sum() for p in model.parameters())
            loss.backward()
            opt.step()
            step += 1
        if epoch in marks:
            ckpts.append(Checkpoint.from_module(model, weight=rate, name=f"epoch{epoch}"))
    return model, ckpts
