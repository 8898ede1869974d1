"""Where training features live: memory, a (fingerprinted, resumable) disk store, or nowhere
(recomputed block by block at scoring time). One policy, used by every gradient method.

The memory budget (``max_memory_bytes``, default :data:`MEMORY_BUDGET` = 4 GiB) also sizes
the work before any is done (:func:`plan_sizes`): unless given, a featurization batch holds
at most a quarter of it (formed per-example gradients and the hooked layers' activations
included) and a scoring block of training features another quarter (of at least 256 MiB);
features that exceed it are streamed, with a WARNING that names the projection that would
make them small.

* ``store=None`` and the features fit in ``max_memory_bytes``: a :class:`MemoryFeatureStore`
  on the model's device (no disk I/O).
* above ``max_store_bytes``, or over the budget for a first-order method (``single_pass``:
  scoring reads them once per call): not cached; scoring recomputes each training block
  (same features, bit for bit per batch, more compute, no disk).
* otherwise: a :class:`FeatureStore` at ``store`` (or a temporary directory removed with the
  fitted object), reused when its fingerprint matches, resumed after a crash.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core import distributed
from ..core.data import ExampleSource
from .featurizer import AbstractFeaturizer
from .loop import State, featurize_into_store
from .memory import MemoryFeatureStore
from .store import FeatureStore, Verify

log = logging.getLogger("datatrace")

#: default memory budget of training features, batches and blocks (bytes): 4 GiB, a sixth
#: of a 24 GiB workstation, settable per fit (``max_memory_bytes=``)
MEMORY_BUDGET = 4 << 30
#: the largest default featurization batch and scoring block (the defaults before sizing)
MAX_BATCH, MAX_BLOCK = 256, 8192
#: batches and blocks are sized within at least this budget: a smaller max_memory_bytes
#: (0 is used to send features to disk) moves features, it does not shrink batches
#: (features are bit-identical wherever they are placed)
MIN_SIZING_BUDGET = 256 << 20
#: the projection suggested when features are too big
SUGGESTED_PROJECTION = 1024


def plan_sizes(
    featurizer: AbstractFeaturizer,
    dtype: torch.dtype,
    budget: int,
    batch_size: int | None,
    block_size: int | None,
    name: str,
) -> tuple[int, int]:
    """(batch size, block size): the given ones, else the largest (≤ 256 and ≤ 8,192) whose
    featurization work and block features each take at most a quarter of ``budget`` (at
    least :data:`MIN_SIZING_BUDGET`)."""
    budget = max(budget, MIN_SIZING_BUDGET)
    item = dtype.itemsize
    row = max(1, sum(featurizer.layout().values()) * item)
    work = max(1, featurizer.work_entries() * item)
    batch = batch_size or max(1, min(MAX_BATCH, budget // 4 // work))
    block = block_size or max(1, min(MAX_BLOCK, budget // 4 // row))
    if (batch_size is None and batch < MAX_BATCH) or (block_size is None and block < MAX_BLOCK):
        log.info(
            "%s: %.1f MB of features (%.1f MB of work) per example: batches of %d, "
            "scoring blocks of %d (memory budget %.2f GB)",
            name, row / 1e6, work / 1e6, batch, block, budget / 1e9,
        )  # fmt: skip
    return batch, block


@dataclass(frozen=True)
class Placement:
    """Where the training features were put: ``store`` (``None``: recomputed when needed)
    and ``temporary`` (a directory to remove with the fitted object, or ``None``)."""

    store: FeatureStore | MemoryFeatureStore | None
    temporary: str | None


def place_training_features(
    featurizers: Sequence[AbstractFeaturizer],
    states: list[State],
    source: ExampleSource,
    fingerprint: Callable[[], dict[str, Any]],
    dtype: torch.dtype,
    *,
    name: str,
    store: str | Path | None,
    overwrite: bool,
    batch_size: int,
    progress: bool | None,
    max_store_bytes: int | None,
    max_memory_bytes: int,
    verify: Verify | str = Verify.SAMPLE,
    single_pass: bool = False,
) -> Placement:
    """Featurize ``source`` at every checkpoint into memory or a store, or decide not to.

    ``single_pass``: scoring reads the training features once per call (first-order
    methods, no preconditioner fitted from them): with ``store=None`` and features over
    ``max_memory_bytes`` they are then recomputed block by block when scored (one
    featurization per scoring call) rather than written to and read back from a temporary
    disk store (a write and a read of every feature on top of the same featurization).

    ``featurizers[c]`` must already know its layout (probed on one example);
    ``fingerprint()`` is called only when a disk store is opened."""
    layout = featurizers[0].layout()
    nbytes = len(source) * sum(layout.values()) * dtype.itemsize * len(states)
    if store is None and nbytes <= max_memory_bytes:
        device = next(iter(states[0][0].values())).device
        mem = MemoryFeatureStore(layout, len(source), len(states), dtype, batch_size, device)
        featurize_into_store(featurizers, states, source, mem, progress, shard=True)
        log.info("%s: training features in memory (%.1f MB)", name, nbytes / 1e6)
        return Placement(mem, None)
    per_example = sum(layout.values()) * dtype.itemsize
    fix = (
        "a smaller projection_dim, fewer checkpoints or a store= directory would keep them"
        if set(layout) == {"proj"}
        else f"projection_dim={SUGGESTED_PROJECTION} (e.g. dt.TracIn(projection_dim="
        f"{SUGGESTED_PROJECTION})) would make them {SUGGESTED_PROJECTION * dtype.itemsize} "
        "bytes per example, projected from the layers' gradient factors"
    )
    if store is None and single_pass:
        log.warning(
            "%s: training features would take %.2f GB (%.2f MB per example) > the memory "
            "budget (max_memory_bytes=%d): not cached, recomputed block by block at every "
            "scoring call (store=DIR caches them on disk for repeated scoring); %s",
            name, nbytes / 1e9, per_example / 1e6, max_memory_bytes, fix,
        )  # fmt: skip
        return Placement(None, None)
    if max_store_bytes is not None and nbytes > max_store_bytes:
        log.warning(
            "%s: training features would take %.2f GB (%.2f MB per example) > "
            "max_store_bytes and the memory budget (max_memory_bytes=%d): not cached, "
            "recomputed block by block at every scoring pass; %s",
            name, nbytes / 1e9, per_example / 1e6, max_memory_bytes, fix,
        )  # fmt: skip
        return Placement(None, None)
    if store is None:
        log.warning(
            "%s: training features would take %.2f GB (%.2f MB per example) > the memory "
            "budget (max_memory_bytes=%d): streamed through a temporary disk store; %s",
            name, nbytes / 1e9, per_example / 1e6, max_memory_bytes, fix,
        )  # fmt: skip
    tmp = tempfile.mkdtemp(prefix="datatrace-features-") if store is None else None
    try:
        fs = _disk_store(
            featurizers,
            states,
            source,
            fingerprint(),
            dtype,
            path=tmp or store,  # type: ignore[arg-type]
            name=name,
            overwrite=overwrite,
            batch_size=batch_size,
            progress=progress,
            shared=tmp is None,  # a temporary directory is per rank: not shared
            verify=verify,
        )
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Placement(fs, tmp)


def _disk_store(
    featurizers: Sequence[AbstractFeaturizer],
    states: list[State],
    source: ExampleSource,
    fingerprint: dict[str, Any],
    dtype: torch.dtype,
    *,
    path: str | Path,
    name: str,
    overwrite: bool,
    batch_size: int,
    progress: bool | None,
    shared: bool,
    verify: Verify | str = Verify.SAMPLE,
) -> FeatureStore:
    """Open (or create) the fingerprinted store at ``path`` and fill what is missing.
    Under torchrun with a ``shared`` directory, rank 0 creates (or checks, or overwrites)
    the store, then every rank fills its share of the missing chunks."""
    rank, size = distributed.world() if shared else (0, 1)

    def open_store(overwrite: bool) -> FeatureStore:
        return FeatureStore(
            path,
            fingerprint,
            featurizers[0].layout(),
            len(source),
            len(states),
            dtype,
            chunk_size=batch_size,
            overwrite=overwrite,
            verify=verify,
        )

    if size > 1:
        fs = open_store(overwrite) if rank == 0 else None
        distributed.barrier()
        fs = fs or open_store(False)
    else:
        fs = open_store(overwrite)
    computed = featurize_into_store(featurizers, states, source, fs, progress, shard=shared)
    log.info(
        "%s: %s training features of %d examples x %d checkpoint(s) at %s (%.1f MB)",
        name,
        "computed" if computed else "reused",
        len(source),
        len(states),
        fs.path,
        fs.nbytes() / 1e6,
    )
    return fs
