"""Where training features live: memory, a (fingerprinted, resumable) disk store, or nowhere
(recomputed block by block at scoring time). One policy, used by every gradient method.

* ``store=None`` and the features fit in ``max_memory_bytes``: a :class:`MemoryFeatureStore`
  on the model's device (no disk I/O).
* above ``max_store_bytes``: not cached; scoring recomputes each training block (same
  features, bit for bit per batch, more compute, no disk).
* otherwise: a :class:`FeatureStore` at ``store`` (or a temporary directory removed with the
  fitted object), reused when its fingerprint matches, resumed after a crash.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core import distributed
from ..core.data import ExampleSource
from .featurizer import AbstractFeaturizer
from .loop import State, featurize_into_store
from .store import FeatureStore, MemoryFeatureStore

log = logging.getLogger("datatrace")


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
    fingerprint: dict[str, Any],
    dtype: torch.dtype,
    *,
    name: str,
    store: str | Path | None,
    overwrite: bool,
    batch_size: int,
    progress: bool | None,
    max_store_bytes: int | None,
    max_memory_bytes: int,
) -> Placement:
    """Featurize ``source`` at every checkpoint into memory or a store, or decide not to.

    ``featurizers[c]`` must already know its layout (probed on one example)."""
    layout = featurizers[0].layout()
    nbytes = len(source) * sum(layout.values()) * dtype.itemsize * len(states)
    if store is None and nbytes <= max_memory_bytes:
        device = next(iter(states[0][0].values())).device
        mem = MemoryFeatureStore(layout, len(source), len(states), dtype, batch_size, device)
        featurize_into_store(featurizers, states, source, mem, progress, shard=True)
        log.info("%s: training features in memory (%.1f MB)", name, nbytes / 1e6)
        return Placement(mem, None)
    if max_store_bytes is not None and nbytes > max_store_bytes:
        log.info(
            "%s: training features would take %.1f MB > max_store_bytes; not cached, "
            "recomputed block by block when scoring (set projection_dim or params, or "
            "raise max_store_bytes, to cache them)",
            name,
            nbytes / 1e6,
        )
        return Placement(None, None)
    tmp = tempfile.mkdtemp(prefix="datatrace-features-") if store is None else None
    try:
        fs = _disk_store(
            featurizers,
            states,
            source,
            fingerprint,
            dtype,
            path=tmp or store,  # type: ignore[arg-type]
            name=name,
            overwrite=overwrite,
            batch_size=batch_size,
            progress=progress,
            shared=tmp is None,  # a temporary directory is per rank: not shared
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
