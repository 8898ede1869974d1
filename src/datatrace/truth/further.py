"""Wei et al. (2024)'s gold standard when only the final model exists: further-train it
with and without each example (same seed and batch order), subtract the full-data run,
average over seeds. :func:`further_training` runs many copies at once with stacked
parameters (vmap); ``vectorize=1`` is its slow, obviously correct twin (``torch.optim.SGD``).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import vmap

from ..core.checkpoint import Checkpoint
from ..core.choice import Choice
from ..core.data import ExampleSource, as_single_batch, batch_to
from ..core.errors import ConfigError
from ..core.runtime import eval_mode, model_device
from ..core.task import AbstractTask
from ..grads.per_example import bound_model
from ..retrain import measure, measure_stacked, stacked_sgd_step
from .gold import _base_settings, _indices, _seeds, _sources
from .jobs import digest, run_jobs, state_digest


class Removal(Choice):
    """How an example is taken out of further training."""

    #: skip it: its batch keeps its other examples and its normaliser
    REMOVE = "remove"
    #: keep it, but reduce every step's loss by ``ℓ(z_i)/n`` (first-order equivalent)
    DOWNWEIGHT = "downweight"


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
        mode: Removal,
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
        #: the buffers every run uses: the checkpoint's, else the model's own (not in it)
        self.buffers = buffers
        self.device = device

    def settings(self) -> dict[str, Any]:
        """What of the model the runs use beyond the checkpoint's bytes and the model's
        fingerprint: which parameters are trained (and their dtypes: the runs compute in
        them) and the buffers (a checkpoint of parameters only takes the model's)."""
        return {
            "trained": {n: str(p.dtype) for n, p in self.start.items()},
            "buffers": state_digest(self.buffers),
        }

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
                if self.mode is Removal.REMOVE:
                    weights = weights * (idx.to(self.device)[None, :] != lo[:, None])
                live = {nm: p.requires_grad_(True) for nm, p in params.items()}
                losses = step_losses(live, batch)  # (K, b)
                loss = (losses * weights.to(losses.dtype)).sum()
                if self.mode is Removal.DOWNWEIGHT:
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
    mode: Removal,
    device: torch.device,
) -> torch.Tensor:
    """The slow twin of :class:`_FurtherTrainer`: one deep-copied module, ``torch.optim.SGD``,
    one example's run at a time. Measurements (n_eval, n_query)."""

    model = copy.deepcopy(task.model).to(device)
    params, buffers = start.parameters_for(model, device)  # buffers it lacks: the model's
    state = {**params, **buffers}  # non-persistent buffers stay the model's own
    model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()})
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
        keep = idx[idx != left_out] if mode is Removal.REMOVE else idx
        opt.zero_grad()
        loss = task.loss(model, batch_to(train.take(keep), device)).sum() / idx.numel()
        if mode is Removal.DOWNWEIGHT and left_out >= 0:
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
    mode: Removal | str = Removal.REMOVE,
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
    per left-out example i: with ``mode=Removal.REMOVE`` (or ``"remove"``) i is skipped
    (its batch keeps its other examples and its normaliser); with ``Removal.DOWNWEIGHT``
    (``"downweight"``) every step's loss is reduced by ``ℓ(z_i)/n`` instead. The result at
    each evaluation step is
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
    removal = Removal.of(mode, "mode")
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
        mode=removal.value,
        vectorize=chunk,
    )
    trainer = _FurtherTrainer(task, start, tr, q, lr, momentum, weight_decay, removal, dev)
    settings.update(trainer.settings())
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
                        removal,
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
