"""On-disk feature store: memory-mapped arrays plus a manifest, resumable after a crash.

Layout of a store directory::

    manifest.json          format tag, fingerprint (settings, checkpoints, data), layout
    c{c}.{name}.npy        one (n, width) array per checkpoint c and feature name
    c{c}.done.json         ids of the chunks of checkpoint c that are fully written

Chunks are written to the arrays and, at each :meth:`FeatureStore.commit`, flushed to
disk before their ids are added to ``done`` (the file is replaced atomically), so a
process killed at any point leaves a store whose ``done`` chunks are intact; the next fit
computes only the rest, with the same chunk boundaries, and so gives bit-identical
features.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core import distributed
from ..core.errors import StoreCorruptError, StoreMismatchError

FORMAT = "datatrace-feature-store"
VERSION = 1


def _atomic_write_json(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    if old != new:
        return [f"{prefix[:-1]}={old!r} in the store, {new!r} requested"]
    return []


class FeatureStore:
    """A directory of per-checkpoint feature arrays for one fingerprint.

    Args:
        path: the directory (created if missing; must be empty or a store).
        fingerprint: JSON-able description of everything the features depend on.
        layout: feature name -> width.
        n: number of examples.
        n_checkpoints: number of checkpoints.
        dtype: feature dtype.
        chunk_size: examples per resumable chunk (a new store only; an existing one keeps
            its own so that resumed chunks line up).
        overwrite: replace an existing store written with other settings.

    Raises:
        StoreMismatchError: the directory holds a store with another fingerprint.
        StoreCorruptError: the directory is not a datatrace store or is damaged.
    """

    def __init__(
        self,
        path: str | Path,
        fingerprint: dict[str, Any],
        layout: dict[str, int],
        n: int,
        n_checkpoints: int,
        dtype: torch.dtype,
        chunk_size: int,
        overwrite: bool = False,
    ) -> None:
        self._writers: dict[tuple[int, str], tuple[int, int, int]] = {}  # fd, offset, row
        self.path = Path(path)
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "fingerprint": fingerprint,
            "layout": layout,
            "n": n,
            "n_checkpoints": n_checkpoints,
            "dtype": str(dtype).replace("torch.", ""),
        }
        existing = self._read_manifest()
        if existing is not None and overwrite:
            self._clear()
            existing = None
        if existing is None:
            self.path.mkdir(parents=True, exist_ok=True)
            manifest["chunk_size"] = chunk_size
            self._create(manifest)
        else:
            self._check(existing, manifest)
            manifest["chunk_size"] = existing["chunk_size"]
        self.manifest = manifest
        self.chunk_size = int(manifest["chunk_size"])
        self.n = n
        self._arrays: dict[tuple[int, str], np.memmap] = {}

        self._pending: dict[int, set[int]] = {}

    # -- opening -------------------------------------------------------------------------

    def _read_manifest(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        if not self.path.is_dir():
            raise StoreCorruptError(f"store path {self.path} is a file, not a directory")
        mfile = self.path / "manifest.json"
        if not mfile.exists():
            if any(self.path.iterdir()):
                raise StoreCorruptError(
                    f"{self.path} is not empty and has no manifest.json: not a datatrace "
                    "store; choose an empty or new directory"
                )
            return None
        try:
            m = json.loads(mfile.read_text())
        except (OSError, ValueError) as exc:
            raise StoreCorruptError(
                f"cannot read {mfile} ({exc}); delete the directory or pass overwrite=True"
            ) from exc
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise StoreCorruptError(
                f"{mfile} is not a datatrace feature store manifest; choose another directory"
            )
        if m.get("version") != VERSION:
            raise StoreMismatchError(
                f"store {self.path} has format version {m.get('version')}, this datatrace "
                f"writes {VERSION}; pass overwrite=True or another path"
            )
        return m

    def _clear(self) -> None:
        for p in self.path.iterdir():
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()

    def _file(self, c: int, name: str) -> Path:
        return self.path / f"c{c}.{name}.npy"

    def _create(self, manifest: dict[str, Any]) -> None:
        for c in range(manifest["n_checkpoints"]):
            for name, width in manifest["layout"].items():
                mm = np.lib.format.open_memmap(
                    self._file(c, name),
                    mode="w+",
                    dtype=_np_dtype(manifest["dtype"]),
                    shape=(manifest["n"], width),
                )
                del mm
            _atomic_write_json(self.path / f"c{c}.done.json", [])
        _atomic_write_json(self.path / "manifest.json", manifest)  # last: marks a valid store

    def _check(self, existing: dict[str, Any], manifest: dict[str, Any]) -> None:
        keys = ("fingerprint", "layout", "n", "n_checkpoints", "dtype")
        diffs = _diff({k: existing.get(k) for k in keys}, {k: manifest[k] for k in keys})
        if diffs:
            raise StoreMismatchError(
                f"features at {self.path} were written with other settings: "
                + "; ".join(diffs[:6])
                + ". Pass overwrite=True to replace them, or another store path."
            )
        for c in range(manifest["n_checkpoints"]):
            for name, width in manifest["layout"].items():
                f = self._file(c, name)
                try:
                    mm = np.load(f, mmap_mode="r")
                except (OSError, ValueError) as exc:
                    raise StoreCorruptError(
                        f"store array {f} is missing or unreadable ({exc}); pass overwrite=True"
                    ) from exc
                if mm.shape != (manifest["n"], width):
                    raise StoreCorruptError(
                        f"store array {f} has shape {mm.shape}, expected "
                        f"{(manifest['n'], width)}; pass overwrite=True"
                    )

    # -- reading and writing ---------------------------------------------------------------

    def _array(self, c: int, name: str) -> np.memmap:
        """The array as a memory map (mapped read-write so tensors can view it without a
        copy; datatrace only writes through :meth:`write`)."""
        key = (c, name)
        mm = self._arrays.get(key)
        if mm is None:
            mm = np.load(self._file(c, name), mmap_mode="r+")
            self._arrays[key] = mm
        return mm

    def _writer(self, c: int, name: str) -> tuple[int, int, int]:
        """(file descriptor, data offset, bytes per row) for positional writes."""
        key = (c, name)
        if key not in self._writers:
            mm = self._array(c, name)
            fd = os.open(self._file(c, name), os.O_WRONLY)
            self._writers[key] = (fd, int(mm.offset), int(mm.strides[0]))
        return self._writers[key]

    def close(self) -> None:
        """Release file descriptors (maps stay valid for reading)."""
        for fd, _, _ in self._writers.values():
            os.close(fd)
        self._writers = {}

    def __del__(self) -> None:
        self.close()

    def done(self, c: int) -> set[int]:
        """Ids of the finished chunks of checkpoint ``c`` (written by any rank: rank 0 and
        single processes record them in ``c{c}.done.json``, rank r > 0 of a torchrun job in
        ``c{c}.done.r{r}.json``)."""
        out: set[int] = set()
        for f in [self.path / f"c{c}.done.json", *sorted(self.path.glob(f"c{c}.done.r*.json"))]:
            try:
                out |= set(json.loads(f.read_text()))
            except (OSError, ValueError) as exc:
                raise StoreCorruptError(f"cannot read {f} ({exc}); pass overwrite=True") from exc
        return out

    def _done_file(self, c: int) -> Path:
        rank = distributed.world()[0]
        return self.path / (f"c{c}.done.json" if rank == 0 else f"c{c}.done.r{rank}.json")

    def chunks(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of every chunk."""
        return [(s, min(s + self.chunk_size, self.n)) for s in range(0, self.n, self.chunk_size)]

    def complete(self, c: int) -> bool:
        return len(self.done(c)) == len(self.chunks())

    def write(self, c: int, chunk: int, feats: dict[str, torch.Tensor]) -> None:
        """Write chunk ``chunk`` of checkpoint ``c``; it counts as done after :meth:`commit`."""
        start, _ = self.chunks()[chunk]
        for name, t in feats.items():
            fd, offset, row = self._writer(c, name)
            data = _to_numpy(t, self.manifest["dtype"])
            os.pwrite(fd, data.data, offset + start * row)  # plain write: no page faults
        self._pending.setdefault(c, set()).add(chunk)

    def commit(self) -> None:
        """Flush written chunks to disk, then record them as done (in that order)."""
        for c, chunks in self._pending.items():
            for name in self.manifest["layout"]:
                os.fsync(self._writer(c, name)[0])
            f = self._done_file(c)
            mine = set(json.loads(f.read_text())) if f.exists() else set()
            _atomic_write_json(f, sorted(mine | chunks))
        self._pending = {}

    def read(self, c: int, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Features of examples ``start..stop-1`` at checkpoint ``c`` (views of the map)."""
        return {
            name: _from_numpy(self._array(c, name)[start:stop], self.manifest["dtype"])
            for name in self.manifest["layout"]
        }

    def nbytes(self) -> int:
        item = _np_dtype(self.manifest["dtype"]).itemsize
        width = sum(self.manifest["layout"].values())
        return int(self.n * width * item * self.manifest["n_checkpoints"])


def _np_dtype(name: str) -> np.dtype[Any]:
    """The on-disk numpy dtype of a feature dtype (bfloat16: its raw 16 bits)."""
    return np.dtype(np.uint16) if name == "bfloat16" else np.dtype(name)


def _to_numpy(t: torch.Tensor, name: str) -> np.ndarray[Any, Any]:
    t = t.detach().cpu()
    if name == "bfloat16":
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    return np.ascontiguousarray(t.numpy(), dtype=np.dtype(name))


def _from_numpy(a: np.ndarray[Any, Any], name: str) -> torch.Tensor:
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if name == "bfloat16" else t


class MemoryFeatureStore:
    """The :class:`FeatureStore` interface, in RAM: for temporary features (``store=None``)
    that fit in memory, where writing them to disk would only cost time.

    Args:
        layout: feature name -> width.
        n: number of examples.
        n_checkpoints: number of checkpoints.
        dtype: feature dtype.
        chunk_size: examples per chunk.
        device: where the arrays live (the model's device: on a GPU, scoring then reads
            features without host-to-device copies).
    """

    path = None

    def __init__(
        self,
        layout: dict[str, int],
        n: int,
        n_checkpoints: int,
        dtype: torch.dtype,
        chunk_size: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.manifest: dict[str, Any] = {"layout": layout, "n": n, "n_checkpoints": n_checkpoints}
        self.n = n
        self.chunk_size = chunk_size
        self._arrays = {
            (c, name): torch.zeros(n, width, dtype=dtype, device=device)
            for c in range(n_checkpoints)
            for name, width in layout.items()
        }
        self._done: dict[int, set[int]] = {c: set() for c in range(n_checkpoints)}

    def chunks(self) -> list[tuple[int, int]]:
        return [(s, min(s + self.chunk_size, self.n)) for s in range(0, self.n, self.chunk_size)]

    def done(self, c: int) -> set[int]:
        return set(self._done[c])

    def write(self, c: int, chunk: int, feats: dict[str, torch.Tensor]) -> None:
        start, stop = self.chunks()[chunk]
        for name, t in feats.items():
            self._arrays[(c, name)][start:stop] = t.detach()
        self._done[c].add(chunk)

    def commit(self) -> None:
        """Nothing to flush."""

    def merge_ranks(self) -> None:
        """Under torchrun: every rank computed its own chunks into zeros; one all-reduce
        (sum) gives every rank all of them, bit-identical to one process."""
        for t in self._arrays.values():
            if t.dtype == torch.bfloat16:  # reduced as float32: exact (one rank's value + 0s)
                wide = t.float()
                distributed.all_sum(wide)
                t.copy_(wide)
            else:
                distributed.all_sum(t)
        full = set(range(len(self.chunks())))
        self._done = {c: set(full) for c in self._done}

    def read(self, c: int, start: int, stop: int) -> dict[str, torch.Tensor]:
        return {name: self._arrays[(c, name)][start:stop] for name in self.manifest["layout"]}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._arrays.values())
