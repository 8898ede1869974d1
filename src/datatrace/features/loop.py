"""The one place that loops over data: featurize examples in batches, with progress bars,
device moves and eval mode, into memory or into a resumable :class:`FeatureStore`."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from ..core import distributed
from ..core.data import ExampleSource, batch_to
from ..core.errors import NonFiniteError
from ..core.runtime import eval_mode, model_device, show_progress
from ..grads.per_example import bound_model
from .featurizer import AbstractFeaturizer, Features
from .store import FeatureStore, MemoryFeatureStore

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
    device = model_device(features.task.model)
    parts: list[Features] = []
    ranges = [(s, min(s + batch_size, stop)) for s in range(start, stop, batch_size)]
    with eval_mode(features.task.model):
        for s, e in tqdm(ranges, desc=desc, disable=not show_progress(progress), leave=False):
            batch = batch_to(source.batch(s, e), device)
            with _all_nonfinite(features, state, source, measurement, e, batch_size):
                parts.append(features.compute(state[0], state[1], batch, measurement, offset=s))
    return {k: torch.cat([p[k] for p in parts], dim=0) for k in parts[0]}


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
    device = model_device(per_ckpt[0].task.model)
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
    with eval_mode(per_ckpt[0].task.model), _committing(store):
        for c, k, (s, e) in tqdm(
            todo, desc="featurizing training data", disable=not show_progress(progress)
        ):
            batch = batch_to(source.batch(s, e), device)
            params, buffers = states[c]
            with _all_nonfinite(per_ckpt[c], states[c], source, False, e, store.chunk_size):
                feats = per_ckpt[c].compute(params, buffers, batch, False, offset=s)
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


@contextlib.contextmanager
def _all_nonfinite(
    features: AbstractFeaturizer,
    state: State,
    source: ExampleSource,
    measurement: bool,
    rest: int,
    batch_size: int,
) -> Iterator[None]:
    """On a non-finite batch, scan the remaining examples' values (forward only) so the
    error names every offending example, not just those of the first bad batch."""
    try:
        yield
    except NonFiniteError as exc:
        task = features.task
        value = task.measurement if measurement else task.loss
        device = model_device(task.model)
        bad = list(exc.indices)
        with torch.no_grad():
            for s in range(rest, len(source), batch_size):
                batch = batch_to(source.batch(s, min(s + batch_size, len(source))), device)
                vals = value(bound_model(task.model, {**state[1], **state[0]}), batch)
                bad += (torch.isfinite(vals).logical_not().nonzero().flatten() + s).tolist()
        if len(bad) == len(exc.indices):
            raise
        what = "measurement" if measurement else "loss"
        raise NonFiniteError(
            f"non-finite (NaN or inf) {what} or gradient at examples {bad[:20]}"
            f"{f' and {len(bad) - 20} more' if len(bad) > 20 else ''}; check these "
            "inputs/labels or the checkpoint (a diverged model)",
            indices=bad,
        ) from None
