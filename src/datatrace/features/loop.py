"""Featurize examples in batches into memory or into a resumable :class:`FeatureStore`,
through the one loop over data (:mod:`datatrace.core.loop`: progress bar, device moves,
eval mode, non-finite checks)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

import torch

from ..core import distributed
from ..core.data import ExampleSource
from ..core.loop import batch_ranges, naming_every_nonfinite, over_batches, over_ranges
from ..core.runtime import model_device
from ..grads.per_example import bound_model
from .featurizer import AbstractFeaturizer, Features
from .memory import MemoryFeatureStore
from .store import FeatureStore

State = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]


def featurize(
    features: AbstractFeaturizer,
    state: State,
    source: ExampleSource,
    measurement: bool,
    batch_size: int,
    start: int = 0,
    stop: int | None = None,
    progress: bool | None = None,
    desc: str = "featurizing",
) -> Features:
    """Features of examples ``start..stop-1`` of ``source``, in memory."""
    stop = len(source) if stop is None else stop
    model = features.task.model
    device = model_device(model)
    whole: Features | None = None  # allocated from the first batch's widths
    # the loop is not kept in a variable: dropping it (also on an error) restores the flags
    for s, e, batch in over_batches(
        source,
        batch_size,
        start,
        stop,
        device=device,
        eval_module=model,
        progress=progress,
        desc=desc,
    ):
        rest = batch_ranges(batch_size, e, len(source))
        with _all_nonfinite(features, state, source, measurement, rest):
            rows = (
                None if whole is None else {k: v[s - start : e - start] for k, v in whole.items()}
            )
            feats = features.compute(state[0], state[1], batch, measurement, offset=s, out=rows)
        if whole is None:
            if e - s == stop - start:
                return feats
            whole = {k: v.new_empty((stop - start, *v.shape[1:])) for k, v in feats.items()}
        for k, v in feats.items():
            if rows is not None and v.data_ptr() == rows[k].data_ptr():
                continue  # formed in place
            if v.shape[1] > whole[k].shape[1]:  # a query longer than any before: more tokens
                wider = whole[k].new_zeros((stop - start, v.shape[1]))
                wider[:, : whole[k].shape[1]] = whole[k]
                whole[k] = wider
            # factored arrays are token-major: zeros after a narrower row are zero tokens
            whole[k][s - start : e - start, : v.shape[1]] = v
            whole[k][s - start : e - start, v.shape[1] :] = 0
    assert whole is not None
    return whole


def featurize_into_store(
    features: AbstractFeaturizer | Sequence[AbstractFeaturizer],
    states: list[State],
    source: ExampleSource,
    store: FeatureStore | MemoryFeatureStore,
    progress: bool | None = None,
    commit_every: float = 1.0,
    shard: bool = False,
) -> int:
    """Fill every unfinished chunk of ``store`` with training features; returns chunks computed.

    Written chunks are committed (flushed, then marked done) every ``commit_every`` seconds
    and at the end, so a crash loses at most that much work; after an error nothing more is
    committed (the failing write may have left a chunk half written).
    With ``shard`` under torchrun, rank r computes every size-th unfinished chunk from r,
    and the call returns when all ranks are done (a shared store directory, or a memory
    store merged across ranks). ``features``: one featurizer, or one per checkpoint.
    """
    per_ckpt = [features] * len(states) if isinstance(features, AbstractFeaturizer) else features
    model = per_ckpt[0].task.model
    if shard:
        distributed.barrier()  # every rank sees the same finished chunks
    done = [store.done(c) for c in range(len(states))]
    todo = [
        (c, k, r)
        for c in range(len(states))
        for k, r in enumerate(store.chunks())
        if k not in done[c]
    ]
    rank, size = distributed.world() if shard else (0, 1)
    todo = todo[rank::size]
    last_commit = time.monotonic()
    loop = over_ranges(
        source,
        [r for _, _, r in todo],
        device=model_device(model),
        eval_module=model,
        progress=progress,
        desc="featurizing training data",
    )
    with _committing(store), contextlib.closing(loop):  # closing: eval-mode flags restored
        for (c, k, _), (s, e, batch) in zip(todo, loop, strict=True):
            params, buffers = states[c]
            rest = batch_ranges(store.chunk_size, e, len(source))
            # into the store's own rows where it has them (no copy per batch)
            rows = store.slot(c, k) if isinstance(store, MemoryFeatureStore) else None
            with _all_nonfinite(per_ckpt[c], states[c], source, False, rest):
                feats = per_ckpt[c].compute(params, buffers, batch, False, offset=s, out=rows)
            store.write(c, k, feats)
            if time.monotonic() - last_commit > commit_every:
                store.commit()
                last_commit = time.monotonic()
    if shard and size > 1:
        if isinstance(store, MemoryFeatureStore):
            store.merge_ranks()
        distributed.barrier()  # all chunks written and committed before anyone reads
    return len(todo)


@contextlib.contextmanager
def _committing(store: FeatureStore | MemoryFeatureStore) -> Iterator[None]:
    yield
    store.commit()  # not in a `finally:`: commit only chunks of a body that did not fail


def _all_nonfinite(
    features: AbstractFeaturizer,
    state: State,
    source: ExampleSource,
    measurement: bool,
    rest: list[tuple[int, int]],
) -> contextlib.AbstractContextManager[None]:
    """Widen a non-finite batch's error to every offending example of ``rest`` (the ranges
    after it), scanning their losses (or measurements) forward only."""
    task = features.task
    value = task.measurement if measurement else task.loss
    model = bound_model(task.model, {**state[1], **state[0]})
    what = "measurement" if measurement else "loss"
    return naming_every_nonfinite(
        lambda batch: value(model, batch), source, rest, model_device(task.model), what
    )
