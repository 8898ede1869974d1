"""Resumable, sharded job lists: what every gold standard of :mod:`datatrace.truth` runs on.

:func:`run_jobs` runs jobs ``0..n-1`` that each return a tensor of one shape. With a cache
directory, every finished job is written at once (safetensors with a checksum, atomic
rename: :mod:`datatrace.core.persist`) and a manifest records the settings: a crashed run
restarted with the same call recomputes nothing and returns the same result, and a cache
written with other settings is refused.
Under ``torchrun`` the jobs are split round-robin across ranks and merged by one all-reduce
onto zeros (see :mod:`datatrace.distributed`), so every rank returns the single-process
result; a rank that fails makes every rank raise.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from ..core import distributed, persist
from ..core.errors import ConfigError, DataError, StoreCorruptError
from ..core.runtime import show_progress

# version 2: one checksummed safetensors per job, written by core.persist
FORMAT = persist.StoreFormat(
    tag="datatrace-truth",
    version=2,
    files=("job-*.safetensors",),
    fix="use another cache directory, or delete this one to recompute",
)


def digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    h = hashlib.blake2b(f"{tuple(t.shape)}:{t.dtype}".encode(), digest_size=12)
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """One digest of named tensors (names, shapes, dtypes and bytes), in name order."""
    h = hashlib.blake2b(digest_size=12)
    for name in sorted(state):
        h.update(f"{name}={digest(state[name])};".encode())
    return h.hexdigest()


def callable_name(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


class _JobCache:
    """One directory: ``manifest.json`` (the settings) and ``job-<k>.safetensors`` per
    finished job (its checksum inside). Rank 0 creates the store; every rank then checks the
    manifest and writes only its own jobs."""

    def __init__(
        self, path: str | os.PathLike[str], settings: dict[str, Any], info: dict[str, Any]
    ) -> None:
        self.path = Path(path)
        try:
            self.settings = persist.as_json(settings)
        except TypeError as exc:
            raise ConfigError(f"cache_key and settings must be JSON-serialisable: {exc}") from exc
        expected = {"settings": self.settings}
        rank, _ = distributed.world()
        failure: BaseException | None = None
        if rank == 0:
            try:
                self._open(expected, info)
            except BaseException as exc:  # raised below, after every rank reached the barrier
                failure = exc
        distributed.barrier()  # then every rank checks (none is left waiting on a failure)
        if failure is not None:
            raise failure
        self._open(expected, info)

    def _open(self, expected: dict[str, Any], info: dict[str, Any]) -> None:
        def create(manifest: dict[str, Any]) -> None:
            manifest["info"] = info  # recorded, not checked

        *_, lock = persist.open_store(self.path, FORMAT, expected, overwrite=False, create=create)
        persist.release(lock, exclusive=False)  # job files are each written atomically

    def file(self, k: int) -> Path:
        return self.path / f"job-{k:06d}.safetensors"

    def load(self, k: int) -> torch.Tensor | None:
        f = self.file(k)
        if not f.exists():
            return None
        fix = "delete that file to recompute it"
        tensors, meta = persist.load_tensors(f, FORMAT, fix)
        if meta.get("job") != k or "result" not in tensors:
            raise StoreCorruptError(f"{f} does not hold job {k}'s result; {fix}")
        return tensors["result"]

    def save(self, k: int, result: torch.Tensor) -> None:
        meta = {"format": FORMAT.tag, "version": FORMAT.version, "job": k}
        persist.save_tensors(self.file(k), {"result": result}, meta)


def run_jobs(
    n_jobs: int,
    shape: tuple[int, ...],
    job: Callable[[int], torch.Tensor],
    settings: dict[str, Any],
    cache: str | os.PathLike[str] | None,
    progress: bool | None,
    what: str,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Run jobs ``0..n_jobs-1`` (this rank's share, skipping cached ones) and merge: every
    rank gets the (n_jobs, *shape) float64 result."""
    distributed.ensure_initialized(device)
    info = {"train_fn": settings.pop("train_fn", None)}
    store = _JobCache(cache, settings, info) if cache is not None else None
    out = torch.zeros(n_jobs, *shape, dtype=torch.float64)
    mine = distributed.my_jobs(n_jobs)
    bar = show_progress(progress)
    it: Iterable[int] = mine
    if bar:
        from tqdm.auto import tqdm

        it = tqdm(mine, desc=what, unit="job")
    failure: BaseException | None = None
    try:
        for k in it:
            result = store.load(k) if store is not None else None
            if result is None:
                result = job(k).detach().to("cpu", torch.float64)
                if tuple(result.shape) != shape:
                    raise DataError(f"{what} job {k} gave shape {tuple(result.shape)}, not {shape}")
                if store is not None:
                    store.save(k, result)
            elif tuple(result.shape) != shape:
                raise StoreCorruptError(
                    f"cached job {store.file(k) if store else k} has shape "
                    f"{tuple(result.shape)}, expected {shape}; delete it to recompute"
                )
            out[k] = result
    except BaseException as exc:
        failure = exc
    # every rank learns whether any failed, instead of waiting forever in the all-reduce
    failed = distributed.all_sum(torch.tensor([1.0 if failure is not None else 0.0]))
    if failure is not None:
        raise failure
    if float(failed[0]) > 0:
        raise DataError(f"{what}: another rank failed (see its error); finished jobs are cached")
    return distributed.all_sum(out)
