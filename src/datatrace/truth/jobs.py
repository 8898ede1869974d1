"""Resumable, sharded job lists: what every gold standard of :mod:`datatrace.truth` runs on.

:func:`run_jobs` runs jobs ``0..n-1`` that each return a tensor of one shape. With a cache
directory, every finished job is written at once (safetensors, atomic rename) and a
manifest records the settings: a crashed run restarted with the same call recomputes
nothing and returns the same result, and a cache written with other settings is refused.
Under ``torchrun`` the jobs are split round-robin across ranks and merged by one all-reduce
onto zeros (see :mod:`datatrace.distributed`), so every rank returns the single-process
result; a rank that fails makes every rank raise.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..core import distributed
from ..core.errors import ConfigError, DataError, StoreCorruptError, StoreMismatchError
from ..core.runtime import show_progress

_FORMAT = "datatrace-truth"
_VERSION = 1


def digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    h = hashlib.blake2b(f"{tuple(t.shape)}:{t.dtype}".encode(), digest_size=12)
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def callable_name(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


class _JobCache:
    """One directory: ``manifest.json`` (the settings) and ``job-<k>.safetensors`` per
    finished job. Rank 0 writes the manifest; every rank writes only its own jobs."""

    def __init__(
        self, path: str | os.PathLike[str], settings: dict[str, Any], info: dict[str, Any]
    ) -> None:
        self.path = Path(path)
        # as JSON will give them back (tuples become lists), so equal settings compare equal
        try:
            self.settings = json.loads(json.dumps(settings, sort_keys=True))
        except TypeError as exc:
            raise ConfigError(f"cache_key and settings must be JSON-serialisable: {exc}") from exc
        settings = self.settings
        manifest = self.path / "manifest.json"
        rank, _ = distributed.world()
        if rank == 0:
            self.path.mkdir(parents=True, exist_ok=True)
            if not manifest.exists():
                tmp = manifest.with_suffix(".json.tmp")
                body = {
                    "format": _FORMAT,
                    "version": _VERSION,
                    "settings": settings,
                    "info": info,  # recorded, not checked
                }
                tmp.write_text(json.dumps(body, indent=1, sort_keys=True))
                os.replace(tmp, manifest)
        distributed.barrier()  # then every rank checks (none is left waiting on a failure)
        self._check(manifest)

    def _check(self, manifest: Path) -> None:
        try:
            body = json.loads(manifest.read_text())
        except (OSError, ValueError) as exc:
            raise StoreCorruptError(
                f"{manifest} is unreadable ({exc}); delete {self.path} to start over"
            ) from exc
        if not isinstance(body, dict) or body.get("format") != _FORMAT:
            raise StoreCorruptError(f"{self.path} is not a datatrace truth cache")
        if body.get("version") != _VERSION:
            raise StoreMismatchError(
                f"{self.path} was written by truth-cache version {body.get('version')}, "
                f"this datatrace writes {_VERSION}; use another cache directory"
            )
        old = body.get("settings", {})
        for key in sorted(set(old) | set(self.settings)):
            if old.get(key) != self.settings.get(key):
                raise StoreMismatchError(
                    f"the truth cache {self.path} was written with {key}={old.get(key)!r}, "
                    f"this call has {key}={self.settings.get(key)!r}; use another cache "
                    "directory (or delete this one) to recompute"
                )

    def file(self, k: int) -> Path:
        return self.path / f"job-{k:06d}.safetensors"

    def load(self, k: int) -> torch.Tensor | None:
        f = self.file(k)
        if not f.exists():
            return None
        try:
            return load_file(str(f))["result"]
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            raise StoreCorruptError(
                f"cached job {f} is unreadable ({exc}); delete that file to recompute it"
            ) from exc

    def save(self, k: int, result: torch.Tensor) -> None:
        f = self.file(k)
        tmp = f.with_name(f.name + f".tmp{os.getpid()}")
        save_file({"result": result.detach().cpu().contiguous()}, str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, f)


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
