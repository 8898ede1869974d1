"""Retraining machinery shared by the gold standards (:mod:`datatrace.truth`) and the
Distilled Datamodel: measuring a model on queries, stacked (vmapped) SGD over many models at
once, random training subsets, and the plain SGD trainer with checkpoints."""

from __future__ import annotations

import contextlib
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


def sgd_train(
    make: Callable[[], nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int,
    epochs: int,
    lr: float,
    batch_size: int,
    momentum: float,
    alpha: float,
    checkpoints: int = 0,
    keep: torch.Tensor | None = None,
) -> tuple[nn.Module, list[Checkpoint]]:
    """Train from a seeded initialisation with SGD on ``mean CE + α‖θ‖²`` (cosine learning
    rate decay); keep ``checkpoints`` evenly spaced snapshots weighted by their learning
    rate (TracIn's weights). With ``keep`` (bool over the rows of x), the batch order is
    that of the full data with the other rows skipped, so retraining without a few
    examples differs from the full run by those examples only, not by a new shuffle."""
    torch.manual_seed(seed)
    model = make()
    g = torch.Generator().manual_seed(seed)
    n_rows = len(x) if keep is None else int(keep.sum())
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    per_epoch = math.ceil(n_rows / batch_size)
    total = epochs * per_epoch
    marks = (
        {round(epochs * (c + 1) / checkpoints) for c in range(checkpoints)}
        if checkpoints
        else set()
    )
    ckpts: list[Checkpoint] = []
    step = 0
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(x), generator=g)
        if keep is not None:
            order = order[keep[order]]
        for idx in order.split(batch_size):
            rate = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            for group in opt.param_groups:
                group["lr"] = rate
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss = loss + alpha * sum((p**2).sum() for p in model.parameters())
            loss.backward()
            opt.step()
            step += 1
        if epoch in marks:
            ckpts.append(Checkpoint.from_module(model, weight=rate, name=f"epoch{epoch}"))
    return model, ckpts
