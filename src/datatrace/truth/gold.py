"""Gold standards: what attribution scores are checked against.

* :func:`leave_one_out`: retrain without each chosen example (same seed).
* :func:`group_leave_out`: retrain without each group of examples.
* :func:`subset_retraining`: retrain on random subsets, for the LDS (:func:`metrics.lds`).
* :func:`further_training`: Wei et al. (2024)'s gold standard when only the final model
  exists: further-train it with and without each example (same seed and batch order),
  subtract the full-data run, average over seeds.

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

import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import vmap

from ..core.checkpoint import Checkpoint
from ..core.data import ExampleSource, as_single_batch, batch_to
from ..core.errors import ConfigError, DataError
from ..core.runtime import eval_mode, model_device
from ..core.task import AbstractTask
from ..grads.per_example import bound_model
from ..retrain import measure, measure_stacked, stacked_sgd_step, subset_masks
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
        "task": type(task).__qualname__,
        "task_settings": {
            k: repr(v)
            for k, v in sorted(vars(task).items())
            if k != "model" and isinstance(v, (int, float, str, bool, type(None)))
        },
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


def _schedule(
    n: int, batch_size: int, epochs: int | None, steps: int | None, eval_steps: Any
) -> tuple[int, list[int]]:
    per_epoch = math.ceil(n / batch_size)
    if (epochs is None) == (steps is None):
        raise ConfigError("give exactly one of epochs= or steps=")
    total = int(epochs) * per_epoch if epochs is not None else int(steps)  # type: ignore[arg-type]
    if total < 1:
        raise ConfigError("further training needs at least one step")
    if eval_steps is None:
        evals = [per_epoch * (e + 1) for e in range(int(epochs))] if epochs else [total]
    else:
        evals = sorted({int(s) for s in eval_steps})
        if not evals or evals[0] < 0 or evals[-1] > total:
            raise ConfigError(f"eval_steps must be within [0, {total}] (the number of steps)")
    return total, evals


def batch_order(n: int, batch_size: int, total_steps: int, seed: int) -> list[torch.Tensor]:
    """The minibatches (index tensors) of further training with ``seed``: a fresh random
    permutation each epoch, cut into batches of ``batch_size`` (the last one may be
    smaller). The runs without an example use the same batches with it skipped."""
    g = torch.Generator().manual_seed(int(seed))
    out: list[torch.Tensor] = []
    while len(out) < total_steps:
        perm = torch.randperm(n, generator=g)
        out.extend(perm.split(batch_size))
    return out[:total_steps]


class _FurtherTrainer:
    """Further-trains K copies of one model at once (stacked parameters, vmap), copy k
    without (or down-weighting) training example ``left_out[k]`` (-1: the full-data run)."""

    def __init__(
        self,
        task: AbstractTask,
        start: Checkpoint,
        train: ExampleSource,
        queries: ExampleSource,
        lr: float,
        momentum: float,
        weight_decay: float,
        mode: str,
        device: torch.device,
    ) -> None:
        self.task, self.train, self.queries = task, train, queries
        self.lr, self.momentum, self.weight_decay, self.mode = lr, momentum, weight_decay, mode
        params, buffers = start.parameters_for(task.model, device)
        self.names = [n for n, p in task.model.named_parameters() if p.requires_grad]
        if not self.names:
            raise ConfigError("the model has no trainable parameters to further-train")
        self.start = {n: params[n] for n in self.names}
        self.fixed = {**buffers, **{k: v for k, v in params.items() if k not in self.start}}
        self.device = device

    def _per_example(self, params: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        return self.task.loss(bound_model(self.task.model, {**self.fixed, **params}), batch)

    def run(
        self, left_out: torch.Tensor, batches: list[torch.Tensor], evals: list[int]
    ) -> torch.Tensor:
        """Measurements (n_eval, n_query, K)."""
        k = left_out.numel()
        params = {
            n: p.detach().unsqueeze(0).repeat(k, *[1] * p.dim()) for n, p in self.start.items()
        }
        velocity = {n: torch.zeros_like(p) for n, p in params.items()}
        n = len(self.train)
        lo = left_out.to(self.device)
        has = (lo >= 0).to(torch.get_default_dtype())
        extra = batch_to(self.train.take(left_out.clamp_min(0)), self.device)
        results = []
        step_losses = vmap(self._per_example, in_dims=(0, None))
        single = vmap(lambda p, ex: self._per_example(p, as_single_batch(ex))[0], in_dims=(0, 0))
        with eval_mode(self.task.model):
            for t in range(len(batches) + 1):
                if t in evals:
                    results.append(
                        measure_stacked(self.task, self.fixed, params, self.queries, self.device)
                    )
                if t == len(batches):
                    break
                idx = batches[t]
                batch = batch_to(self.train.take(idx), self.device)
                weights = torch.ones(k, idx.numel(), device=self.device) / idx.numel()
                if self.mode == "remove":
                    weights = weights * (idx.to(self.device)[None, :] != lo[:, None])
                live = {nm: p.requires_grad_(True) for nm, p in params.items()}
                losses = step_losses(live, batch)  # (K, b)
                loss = (losses * weights.to(losses.dtype)).sum()
                if self.mode == "downweight":
                    own = single(live, extra)  # (K,)
                    loss = loss - (own * has.to(own.dtype)).sum() / n
                grads = torch.autograd.grad(loss, list(live.values()))
                stacked_sgd_step(params, grads, velocity, self.lr, self.momentum, self.weight_decay)
        return torch.stack(results)


def _further_train_loop(
    task: AbstractTask,
    start: Checkpoint,
    train: ExampleSource,
    queries: ExampleSource,
    left_out: int,
    batches: list[torch.Tensor],
    evals: list[int],
    lr: float,
    momentum: float,
    weight_decay: float,
    mode: str,
    device: torch.device,
) -> torch.Tensor:
    """The slow twin of :class:`_FurtherTrainer`: one deep-copied module, ``torch.optim.SGD``,
    one example's run at a time. Measurements (n_eval, n_query)."""
    import copy

    model = copy.deepcopy(task.model).to(device)
    model.load_state_dict(start.state)
    model.eval()
    opt = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
    )
    n = len(train)
    out = []
    for t in range(len(batches) + 1):
        if t in evals:
            out.append(measure(task, model, queries))
            model.eval()
        if t == len(batches):
            break
        idx = batches[t]
        keep = idx[idx != left_out] if mode == "remove" else idx
        opt.zero_grad()
        loss = task.loss(model, batch_to(train.take(keep), device)).sum() / idx.numel()
        if mode == "downweight" and left_out >= 0:
            one = batch_to(train.take(torch.tensor([left_out])), device)
            loss = loss - task.loss(model, one).sum() / n
        loss.backward()
        opt.step()
    return torch.stack(out)


def further_training(
    task: AbstractTask,
    checkpoint: Checkpoint | nn.Module,
    train: Any,
    queries: Any,
    indices: Sequence[int] | torch.Tensor | None = None,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    eval_steps: Sequence[int] | None = None,
    seeds: Iterable[int] = range(20),
    lr: float = 0.01,
    batch_size: int = 32,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    mode: str = "remove",
    center: bool = False,
    vectorize: int = 32,
    cache: str | os.PathLike[str] | None = None,
    cache_key: Any = None,
    progress: bool | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Wei et al. (2024)'s gold standard for a final model: further training, adjusted and
    averaged. Shape (n_evaluations, n_query, len(indices)).

    For each seed ξ, the final model is further-trained with SGD on all the data in
    :func:`batch_order` (``seed=ξ``), and, from the same start with the same batches, once
    per left-out example i: with ``mode="remove"`` i is skipped (its batch keeps its other
    examples and its normaliser); with ``mode="downweight"`` every step's loss is reduced by
    ``ℓ(z_i)/n`` instead. The result at each evaluation step is
    ``mean_ξ [f(z_j; run without i) − f(z_j; full run)]`` (the subtraction is the
    "adjustment", the mean the "averaging"); ``center=True`` also subtracts, per query, the
    mean over the left-out examples.

    Args:
        checkpoint: the final model's state (``Checkpoint``) or a module holding it.
        indices: training examples to leave out (``None``: all).
        epochs / steps: the amount of further training (exactly one of them).
        eval_steps: step counts at which to measure (default: the end of every epoch with
            ``epochs``, else the last step); ``0`` is the start (all differences 0).
        seeds: batch-order seeds (the paper used 100; 10-20 capture most of it).
        lr, batch_size, momentum, weight_decay: SGD settings (``torch.optim.SGD``'s
            meaning); the batch loss is the mean over the full batch.
        vectorize: runs trained at once with stacked parameters (vmap); 0 or 1: one at a
            time with ``torch.optim.SGD`` (the slow reference; same numbers).
        cache, cache_key, progress: as for :func:`leave_one_out`; one job is one seed × one
            chunk of ``vectorize`` left-out examples.

    The model is run in eval mode (dropout off, batch-norm statistics frozen), so runs
    differ only by the left-out example.
    """
    if mode not in ("remove", "downweight"):
        raise ConfigError(f"mode must be 'remove' or 'downweight', got {mode!r}")
    for name, value in (("lr", lr), ("batch_size", batch_size)):
        if not value > 0:
            raise ConfigError(f"{name} must be > 0, got {value!r}")
    if momentum < 0 or weight_decay < 0:
        raise ConfigError("momentum and weight_decay must be >= 0")
    start = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.from_module(checkpoint)
    tr, q = _sources(train, queries)
    idx = _indices(indices, len(tr))
    seed_list = _seeds(seeds)
    total, evals = _schedule(len(tr), batch_size, epochs, steps, eval_steps)
    dev = torch.device(device) if device is not None else model_device(task.model)
    chunk = max(1, int(vectorize))
    chunks = list(idx.split(chunk))
    settings = _base_settings("further_training", "-", task, tr, q, cache_key)
    settings.update(
        checkpoint=start.fingerprint(),
        indices=digest(idx),
        seeds=seed_list,
        total_steps=total,
        eval_steps=evals,
        lr=lr,
        batch_size=batch_size,
        momentum=momentum,
        weight_decay=weight_decay,
        mode=mode,
        vectorize=chunk,
    )
    trainer = _FurtherTrainer(task, start, tr, q, lr, momentum, weight_decay, mode, dev)
    orders: dict[int, list[torch.Tensor]] = {}

    def job(k: int) -> torch.Tensor:
        seed, c = seed_list[k // len(chunks)], chunks[k % len(chunks)]
        if seed not in orders:
            orders.clear()
            orders[seed] = batch_order(len(tr), batch_size, total, seed)
        batches = orders[seed]
        left = torch.cat([torch.tensor([-1]), c])
        if chunk > 1:
            runs = trainer.run(left, batches, evals)  # (E, Q, 1 + |c|)
        else:
            runs = torch.stack(
                [
                    _further_train_loop(
                        task,
                        start,
                        tr,
                        q,
                        int(i),
                        batches,
                        evals,
                        lr,
                        momentum,
                        weight_decay,
                        mode,
                        dev,
                    )
                    for i in left
                ],
                -1,
            )
        runs = runs.double()
        delta = runs[..., 1:] - runs[..., :1]
        pad = torch.zeros(len(evals), len(q), chunk, dtype=torch.float64)
        pad[..., : delta.shape[-1]] = delta
        return pad

    res = run_jobs(
        len(seed_list) * len(chunks),
        (len(evals), len(q), chunk),
        job,
        settings,
        cache,
        progress,
        "further training",
        dev,
    ).view(len(seed_list), len(chunks), len(evals), len(q), chunk)
    parts = [res[:, c, :, :, : chunks[c].numel()] for c in range(len(chunks))]
    gold = torch.cat(parts, dim=-1).mean(0)  # (E, Q, n_idx)
    if center:
        gold = gold - gold.mean(dim=-1, keepdim=True)
    return gold
