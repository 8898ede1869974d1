"""THE persistence layer of every datatrace cache: manifests, checksums, atomic writes, locks
(the locks themselves are in :mod:`datatrace.core.locks`).

Used by the feature store (:mod:`datatrace.features.store`), the gold-standard job cache
(:mod:`datatrace.truth.jobs`), the Distilled Datamodel's synsets and saved fits
(:mod:`datatrace.methods.datamodel`) and the K-FAC factor cache
(:mod:`datatrace.curvature.kfac`).

On-disk format of a store folder::

    manifest.json      {"format": tag, "version": int, "fingerprint": ..., ...}; written
                       last when a store is created, so a folder without it is no store
    creating.json      written first when a store is created, deleted after its manifest:
                       with it and no manifest, a killed creation, made again
    .lock, .lock-*     lock files (``fcntl.flock``): opening, and each format's own; never
                       deleted (another process may be waiting on one)
    .tmp-*             a write in progress (or killed): ignored, removed on overwrite
    <data files>       each format's own; safetensors files carry their checksum inside

Commit protocol:

* Every file is written to a temporary file in the same folder, flushed and fsynced, then
  renamed over its name (``os.replace``): a reader sees the old file or the new one, never
  a mix, and a planted symlink is replaced, never written through.
* Data written in place (the feature store's arrays) is recorded as done only after all of
  its bytes were written and fsynced, in a record carrying their checksum (blake2b), so a
  record always describes bytes that are on disk; bytes that differ later raise
  :class:`StoreCorruptError` naming the file.
* A store is checked under a shared lock, and created or replaced under an exclusive one:
  two processes creating one store agree on one manifest, and a store is never replaced
  while another process has it open (the replacing one waits). A folder holding files but
  no readable datatrace manifest is never deleted, unless all its files are ones the
  format writes.
* Nothing is pickled: JSON, safetensors, and ``.npy`` files whose header is parsed and
  checked (an object dtype is refused) before they are mapped as plain arrays.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import StoreCorruptError, StoreMismatchError
from .locks import LOCK, acquire, locked, release

log = logging.getLogger("datatrace")

MANIFEST = "manifest.json"
#: written before a store's data files and deleted after its manifest: a folder holding it,
#: this format's files and no manifest is a creation that was killed, made again
CREATING = "creating.json"
TEMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class StoreFormat:
    """What kind of store a folder holds.

    Args:
        tag: the manifest's ``format`` value.
        version: bumped whenever the files change meaning.
        files: glob patterns of the files this format writes (only those are deleted when
            a store is replaced).
        fix: what to tell the user when the store does not match (must work).
    """

    tag: str
    version: int
    files: tuple[str, ...]
    fix: str

    def __post_init__(self) -> None:
        if not self.tag or self.version < 1:
            raise ValueError("a store format needs a tag and a version >= 1")


def checksum(*buffers: bytes | memoryview) -> str:
    """blake2b (128-bit) of the concatenated buffers, as hex."""
    h = hashlib.blake2b(digest_size=16)
    for b in buffers:
        h.update(b)
    return h.hexdigest()


def diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``key=old in the store, new requested`` for every differing (nested) key."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    if prefix.endswith("parameters.") and isinstance(old, list) and isinstance(new, list):
        gone, added = [x for x in old if x not in new], [x for x in new if x not in old]
        if gone or added:
            return [f"the selected parameters differ ({prefix[:-1]}): {_short(gone)} only in "
                    f"the store, {_short(added)} only requested"]  # fmt: skip
    if old != new:
        return [f"{prefix[:-1]}={_short(old)} in the store, {_short(new)} requested"]
    return []


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def as_json(obj: Any) -> Any:
    """``obj`` as JSON will give it back (tuples become lists), so equal settings compare equal."""
    return json.loads(json.dumps(obj, sort_keys=True))


# -- atomic writes ---------------------------------------------------------------------------


def write_atomic(path: Path, data: bytes | memoryview) -> None:
    """Write ``path`` as a whole: temporary file, fsync, rename (then fsync the folder, so the
    rename itself survives a power cut)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX)  # O_EXCL: no symlink
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would hide a shared store
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_folder(path.parent)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def read_json(path: Path, fix: str) -> Any:
    """The JSON in ``path``; :class:`StoreCorruptError` naming the file and ``fix`` otherwise."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise StoreCorruptError(f"cannot read {path} ({exc}); {fix}") from exc


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory: the rename still happened
        pass
    finally:
        os.close(fd)


# -- safetensors with a checksummed header ----------------------------------------------------


def tensors_checksum(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    """blake2b of every tensor (name, dtype, shape, bytes) and of ``meta`` (canonical JSON,
    without its ``checksum``): an edited header is caught like a flipped byte."""
    h = hashlib.blake2b(digest_size=16)
    h.update(
        json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode()
    )
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``tensors`` and JSON ``meta`` (with the tensors' checksum) atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {**meta, "checksum": tensors_checksum(tensors, meta)}
    write_atomic(path, save(tensors, metadata={"datatrace": json.dumps(header)}))


def load_tensors(
    path: Path, fmt: StoreFormat, fix: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read what :func:`save_tensors` wrote, check its format tag, version and checksum.

    Raises:
        StoreCorruptError: unreadable, another format, or bytes that do not match.
        StoreMismatchError: another version of this format.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        data = path.read_bytes()
        tensors = load(data)
        n = int.from_bytes(data[:8], "little")
        outer = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
        meta = json.loads(outer["datatrace"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as exc:
        raise StoreCorruptError(f"cannot read {path} ({exc}); {fix}") from exc
    if not isinstance(meta, dict) or meta.get("format") != fmt.tag:
        raise StoreCorruptError(f"{path} is not a {fmt.tag} file; {fix}")
    if meta.get("version") != fmt.version:
        raise StoreMismatchError(
            f"{path} has {fmt.tag} format version {meta.get('version')!r}, this datatrace "
            f"reads {fmt.version}; {fix}"
        )
    if meta.get("checksum") != tensors_checksum(tensors, meta):
        raise StoreCorruptError(f"{path} is damaged (its checksum does not match); {fix}")
    return tensors, meta


# -- opening a store ---------------------------------------------------------------------------


def open_store(
    folder: Path,
    fmt: StoreFormat,
    expected: dict[str, Any],
    *,
    overwrite: bool,
    create: Callable[[dict[str, Any]], None],
) -> tuple[dict[str, Any], bool, tuple[int, int] | None]:
    """Check (or create, or replace) the store at ``folder``, taking its lock.

    A matching store is checked under a shared lock (fitters of one store, and the ranks of a
    torchrun job, open it together); creating or replacing one takes the lock exclusively,
    then looks again (another process may have created it meanwhile).

    Args:
        folder: the store folder (created if missing).
        fmt: the store's format.
        expected: the manifest's keys that must match (``fingerprint`` and the like).
        overwrite: replace a store of this format written with other settings or another
            version, or whose manifest cannot be read.
        create: writes the store's data files for a new manifest (the manifest is then
            written by this function, last).

    Returns:
        (the manifest on disk, whether it was created now, the lock held shared: give it
        back with :func:`release` once the store is no longer used).

    Raises:
        StoreMismatchError: a store of this format with other settings (names the keys).
        StoreCorruptError: not a folder, or a folder holding something else.
    """
    make_folder(folder)
    key = acquire(folder, exclusive=False)
    try:
        found = None if overwrite else _reusable(folder, fmt, expected)
        if found is not None:
            return found, False, key
        release(key, exclusive=False)
        key = None
        with locked(folder):
            found = None if overwrite else _reusable(folder, fmt, expected)
            if found is None:
                _read_manifest(folder, fmt)  # raises for a folder that is no store of fmt
                clear(folder, fmt)
                found = {"format": fmt.tag, "version": fmt.version, **expected}
                write_json(folder / CREATING, {"format": fmt.tag})  # a creation is under way
                create(found)
                write_json(folder / MANIFEST, found)  # last: marks a valid store
                (folder / CREATING).unlink(missing_ok=True)
                overwrite = True  # i.e. created now
            key = acquire(folder, exclusive=False)  # kept when the exclusive hold ends
        return found, overwrite, key
    except BaseException:
        release(key, exclusive=False)
        raise


def _reusable(folder: Path, fmt: StoreFormat, expected: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of a matching store; None for an empty folder; raises otherwise."""
    found, problem = _read_manifest(folder, fmt)
    if problem is not None:
        raise StoreCorruptError(f"{problem}; {fmt.fix}")
    if found is None:
        return None
    want = {"version": fmt.version, **expected}
    diffs = diff({k: found.get(k) for k in want}, want)
    if diffs:
        raise StoreMismatchError(
            f"{fmt.tag} at {folder} was written with other settings: "
            + "; ".join(diffs[:6])
            + f". {fmt.fix}"
        )
    return found


def make_folder(folder: Path) -> None:
    """Create ``folder`` (and its parents) unless it exists; a file there is an error."""
    if folder.exists() and not folder.is_dir():
        raise StoreCorruptError(f"store path {folder} is a file, not a directory")
    folder.mkdir(parents=True, exist_ok=True)


def _read_manifest(folder: Path, fmt: StoreFormat) -> tuple[dict[str, Any] | None, str | None]:
    """(a manifest of this format, any version) or (None, why it is unusable); (None, None)
    for an empty folder. A folder that is not this format's raises: it is never replaced."""
    mfile = folder / MANIFEST
    names = [p.name for p in folder.iterdir() if not p.name.startswith(LOCK)]
    if not names or all(n.startswith(TEMP_PREFIX) for n in names):
        return None, None
    foreign = [n for n in names if not _is_store_file(n, fmt)]
    try:
        m = json.loads(mfile.read_bytes())
    except (OSError, ValueError) as exc:
        if not foreign and not mfile.exists() and CREATING in names:
            # a creation killed before its manifest (written last; seen only under the lock,
            # so its creator is gone): only this format's files and the creation's marker
            # are there, nothing valid to keep; the store is made again
            return None, None
        if foreign or not mfile.exists():
            raise StoreCorruptError(
                f"{folder} is not empty and has no readable {MANIFEST}: not a datatrace store; "
                "choose an empty or new directory"
            ) from exc
        return None, f"cannot read {mfile} ({exc})"
    if not isinstance(m, dict) or m.get("format") != fmt.tag:
        raise StoreCorruptError(
            f"{mfile} is not a {fmt.tag} manifest: not a datatrace store of this kind; "
            "choose another directory"
        )
    return m, None


def _is_store_file(name: str, fmt: StoreFormat) -> bool:
    return (
        name in (MANIFEST, CREATING)
        or name.startswith((LOCK, TEMP_PREFIX))
        or any(fnmatch.fnmatchcase(name, pat) for pat in fmt.files)
    )


def clear(folder: Path, fmt: StoreFormat) -> None:
    """Delete the files ``fmt`` writes (symlinks themselves, not their targets); keep the lock
    file (others may be waiting on it) and anything else."""
    for p in folder.iterdir():
        if not p.name.startswith(LOCK) and _is_store_file(p.name, fmt) and not p.is_dir():
            with suppress(FileNotFoundError):
                p.unlink()
