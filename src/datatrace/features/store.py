"""On-disk feature store: memory-mapped arrays plus a manifest, resumable after a crash.

Layout of a store directory (format ``datatrace-feature-store``, version 2; the manifest,
lock, atomic writes and checksums are :mod:`datatrace.core.persist`'s)::

    manifest.json          format tag, version, fingerprint (settings, checkpoints, data),
                           layout, n, n_checkpoints, dtype, chunk_size
    c{c}.{name}.npy        one (n, width) C-order array per checkpoint c and feature name
    c{c}.done.json         [ids of the chunks of checkpoint c that are fully written]
    c{c}.sums.json         {chunk id: blake2b of its bytes (names in sorted order)}, written
                           before the done list, so every done chunk has its checksum; rank
                           r > 0 of a torchrun job writes ``c{c}.done.r{r}.json`` and
                           ``c{c}.sums.r{r}.json``
    curvature-c{c}-*.safetensors   factors cached by preconditioners (K-FAC, EK-FAC)
    .lock, .lock-done      held while opening (exclusive) / reading and filling (shared),
                           and while a done record is rewritten

Commit protocol: :meth:`FeatureStore.write` writes a chunk's rows in place (``pwrite``,
every byte or an error); :meth:`FeatureStore.commit` fsyncs the arrays, then adds the
written chunks' checksums to ``sums`` and their ids to ``done`` (each file replaced
atomically). A
chunk whose write failed is never recorded, so a process killed (or failing) at any point
leaves a store whose ``done`` chunks are intact; the next fit computes only the rest, with
the same chunk boundaries, and so gives bit-identical features. Reopening checks every
array's header and size and the done records, and the checksums of a sample of chunks
(``verify="full"``: of all); anything else raises :class:`StoreCorruptError` naming the
file. Arrays are mapped copy-on-write over read-only descriptors, so a store on read-only
files can be scored from. Version 1 stores (done records without checksums) are refused
with a mismatch that ``overwrite=True`` fixes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core import distributed, persist
from ..core.choice import Choice
from ..core.data import batch_ranges
from ..core.errors import StoreCorruptError

FORMAT = persist.StoreFormat(
    tag="datatrace-feature-store",
    version=2,
    files=("c*.npy", "c*.done*.json", "c*.sums*.json", "curvature-*.safetensors"),
    fix="pass overwrite=True to replace it, or another store path",
)


class Verify(Choice):
    """How much of a reused store is re-hashed against its checksums."""

    #: a sample of the finished chunks (at most ``SAMPLE_BYTES`` per checkpoint)
    SAMPLE = "sample"
    #: every finished chunk
    FULL = "full"


# reopening re-hashes about this many bytes per checkpoint (all of a small store): on a
# disk at ~1 GB/s that is tens of milliseconds, however large the store
SAMPLE_BYTES = 32 << 20
_DONE_LOCK = persist.LOCK + "-done"


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
        overwrite: replace an existing store written with other settings, another format
            version, or an unreadable manifest (a folder that is not a store is never
            replaced).
        verify: on reuse, ``"sample"`` re-hashes a sample of the finished chunks (all, in a
            store of a few tens of MB per checkpoint); ``"full"`` all of them.

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
        verify: Verify | str = Verify.SAMPLE,
    ) -> None:
        how = Verify.of(verify, "verify")
        self._writers: dict[tuple[int, str], tuple[int, int, int]] = {}  # fd, offset, row
        self._lock: tuple[int, int] | None = None
        self.path = Path(path)
        expected = {
            "fingerprint": persist.as_json(fingerprint),
            "layout": dict(layout),
            "n": n,
            "n_checkpoints": n_checkpoints,
            "dtype": str(dtype).replace("torch.", ""),
        }
        # the lock stays held (shared) while this object lives: nobody may replace the store
        manifest, created, self._lock = persist.open_store(
            self.path,
            FORMAT,
            expected,
            overwrite=overwrite,
            create=lambda m: self._create(m, chunk_size),
        )
        self.manifest = manifest
        self.chunk_size = int(manifest["chunk_size"])
        self.n = n
        self._pending: dict[int, dict[int, str]] = {}
        self._arrays = {
            (c, name): self._open_array(c, name, width)
            for c in range(n_checkpoints)
            for name, width in layout.items()
        }
        if not created:
            self._verify(full=how is Verify.FULL)

    # -- opening -------------------------------------------------------------------------

    def _file(self, c: int, name: str) -> Path:
        return self.path / f"c{c}.{name}.npy"

    def _create(self, manifest: dict[str, Any], chunk_size: int) -> None:
        manifest["chunk_size"] = chunk_size
        dtype = _np_dtype(manifest["dtype"])
        for c in range(manifest["n_checkpoints"]):
            for name, width in manifest["layout"].items():
                header = _npy_header(dtype, (manifest["n"], width))
                f = self._file(c, name)
                # a new file under a temporary name, renamed: never through a planted symlink
                persist.write_atomic(f, header)
                os.truncate(f, len(header) + manifest["n"] * width * dtype.itemsize)
            persist.write_json(self.path / f"c{c}.sums.json", {})
            persist.write_json(self.path / f"c{c}.done.json", [])

    def _open_array(self, c: int, name: str, width: int) -> np.memmap:
        """The array mapped copy-on-write ("c"): the file is opened read-only, so read-only
        stores work, and tensors may view the map without a copy; datatrace only writes
        through :meth:`write`."""
        f = self._file(c, name)
        shape = (self.n, width)
        dtype = _np_dtype(self.manifest["dtype"])
        try:
            with open(f, "rb") as fh:
                major = np.lib.format.read_magic(fh)[0]
                read_header = (
                    np.lib.format.read_array_header_1_0
                    if major == 1
                    else np.lib.format.read_array_header_2_0
                )
                hshape, fortran, hdtype = read_header(fh)  # a header only: nothing unpickled
                offset = fh.tell()
            size = f.stat().st_size
        except (OSError, ValueError, SyntaxError, TypeError) as exc:
            raise StoreCorruptError(
                f"store array {f} is missing or unreadable ({exc}); {FORMAT.fix}"
            ) from exc
        if tuple(hshape) != shape or fortran or np.dtype(hdtype) != dtype:
            raise StoreCorruptError(
                f"store array {f} has shape {tuple(hshape)}, dtype {hdtype}, fortran_order "
                f"{fortran}; expected shape {shape}, dtype {dtype}, C order; {FORMAT.fix}"
            )
        if size != offset + self.n * width * dtype.itemsize:
            raise StoreCorruptError(
                f"store array {f} is {size} bytes, expected "
                f"{offset + self.n * width * dtype.itemsize}; {FORMAT.fix}"
            )
        return np.memmap(f, dtype=dtype, mode="c", offset=offset, shape=shape)

    def _verify(self, full: bool) -> None:
        """Re-hash finished chunks (a sample unless ``full``) against their done records."""
        bounds = self.chunks()
        row_bytes = (
            sum(self.manifest["layout"].values()) * _np_dtype(self.manifest["dtype"]).itemsize
        )
        per_chunk = max(1, self.chunk_size * row_bytes)
        for c in range(self.manifest["n_checkpoints"]):
            records = self._records(c)
            ids = sorted(records)
            if not full and len(ids) * per_chunk > SAMPLE_BYTES:
                picks = np.linspace(0, len(ids) - 1, max(1, SAMPLE_BYTES // per_chunk))
                ids = sorted({ids[round(float(i))] for i in picks})
            for k in ids:
                if self._chunk_checksum(c, *bounds[k]) != records[k][0]:
                    files = ", ".join(str(self._file(c, nm)) for nm in self.manifest["layout"])
                    raise StoreCorruptError(
                        f"chunk {k} (examples {bounds[k][0]}..{bounds[k][1] - 1}) of {files} "
                        f"does not match its checksum in {records[k][1]}: the file was changed "
                        f"or damaged; {FORMAT.fix}"
                    )

    def _chunk_checksum(self, c: int, start: int, stop: int) -> str:
        return persist.checksum(
            *(
                np.ascontiguousarray(self._arrays[(c, name)][start:stop]).data
                for name in sorted(self.manifest["layout"])
            )
        )

    # -- done records ----------------------------------------------------------------------

    def _records(self, c: int) -> dict[int, tuple[str, Path]]:
        """chunk id -> (checksum, its file) of every finished chunk, over every rank's files."""
        out: dict[int, tuple[str, Path]] = {}
        others = self.path.glob(f"c{c}.done.r*.json")
        for rank in ["", *sorted(f.name[len(f"c{c}.done") : -len(".json")] for f in others)]:
            done_file = self.path / f"c{c}.done{rank}.json"
            sums_file = self.path / f"c{c}.sums{rank}.json"
            sums = self._checksums(sums_file)
            for k in self._done_list(done_file):
                if str(k) not in sums:
                    raise StoreCorruptError(
                        f"{done_file} lists chunk {k}, but {sums_file} has no checksum for it; "
                        f"{FORMAT.fix}"
                    )
                out[k] = (sums[str(k)], sums_file)
        return out

    def _done_list(self, f: Path) -> list[int]:
        body = persist.read_json(f, FORMAT.fix)
        n = len(self.chunks())
        if not isinstance(body, list) or not all(type(k) is int and 0 <= k < n for k in body):
            raise StoreCorruptError(
                f"{f} is not a done list of this store (expected [chunk ids < {n}]); {FORMAT.fix}"
            )
        return body

    def _checksums(self, f: Path) -> dict[str, str]:
        body = persist.read_json(f, FORMAT.fix)
        if not isinstance(body, dict) or not all(isinstance(v, str) for v in body.values()):
            raise StoreCorruptError(
                f"{f} is not a checksum table of this store (expected {{chunk id: hex}}); "
                f"{FORMAT.fix}"
            )
        return body

    def done(self, c: int) -> set[int]:
        """Ids of the finished chunks of checkpoint ``c`` (written by any rank: rank 0 and
        single processes record them in ``c{c}.done.json``, rank r > 0 of a torchrun job in
        ``c{c}.done.r{r}.json``)."""
        return set(self._records(c))

    def _rank_file(self, c: int, kind: str) -> Path:
        rank = distributed.world()[0]
        return self.path / (f"c{c}.{kind}.json" if rank == 0 else f"c{c}.{kind}.r{rank}.json")

    def chunks(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of every chunk."""
        return batch_ranges(self.chunk_size, 0, self.n)

    def complete(self, c: int) -> bool:
        return len(self.done(c)) == len(self.chunks())

    # -- reading and writing ---------------------------------------------------------------

    def _writer(self, c: int, name: str) -> tuple[int, int, int]:
        """(file descriptor, data offset, bytes per row) for positional writes."""
        key = (c, name)
        if key not in self._writers:
            mm = self._arrays[key]
            f = self._file(c, name)
            try:  # O_NOFOLLOW: a symlink planted in the store is never written through
                fd = os.open(f, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as exc:
                raise StoreCorruptError(f"cannot write {f} ({exc}); {FORMAT.fix}") from exc
            self._writers[key] = (fd, int(mm.offset), int(mm.strides[0]))
        return self._writers[key]

    def close(self) -> None:
        """Release file descriptors and the store's lock (maps stay valid for reading)."""
        for fd, _, _ in getattr(self, "_writers", {}).values():
            os.close(fd)
        self._writers = {}
        persist.release(getattr(self, "_lock", None), exclusive=False)
        self._lock = None

    def __del__(self) -> None:
        self.close()

    def write(self, c: int, chunk: int, feats: dict[str, torch.Tensor]) -> None:
        """Write chunk ``chunk`` of checkpoint ``c``; it counts as done after :meth:`commit`.

        Raises:
            OSError: not every byte could be written (disk full, a file size limit); the
                chunk is then not committed.
        """
        start, stop = self.chunks()[chunk]
        parts = []
        for name in sorted(self.manifest["layout"]):
            data = _to_numpy(feats[name], self.manifest["dtype"])
            if len(data) != stop - start:
                raise ValueError(f"chunk {chunk} has {stop - start} rows, got {len(data)}")
            fd, offset, row = self._writer(c, name)
            raw = data.reshape(-1).view(np.uint8).data
            _pwrite_all(fd, raw, offset + start * row)
            parts.append(raw)
        self._pending.setdefault(c, {})[chunk] = persist.checksum(*parts)

    def commit(self) -> None:
        """Flush written chunks to disk, then record them (with checksums) as done."""
        for c, chunks in self._pending.items():
            for name in self.manifest["layout"]:
                os.fsync(self._writer(c, name)[0])
            done, sums = self._rank_file(c, "done"), self._rank_file(c, "sums")
            with persist.locked(self.path, name=_DONE_LOCK):  # no lost update between fitters
                old = persist.read_json(sums, FORMAT.fix) if sums.exists() else {}
                persist.write_json(sums, {**old, **{str(k): v for k, v in chunks.items()}})
                old = persist.read_json(done, FORMAT.fix) if done.exists() else []
                persist.write_json(done, sorted(set(old) | set(chunks)))
        self._pending = {}

    def read(self, c: int, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Features of examples ``start..stop-1`` at checkpoint ``c`` (views of the map)."""
        return {
            name: _from_numpy(self._arrays[(c, name)][start:stop], self.manifest["dtype"])
            for name in self.manifest["layout"]
        }

    def nbytes(self) -> int:
        item = _np_dtype(self.manifest["dtype"]).itemsize
        width = sum(self.manifest["layout"].values())
        return int(self.n * width * item * self.manifest["n_checkpoints"])


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """``os.pwrite`` until every byte is written: a short write (a file size limit, a full
    disk) is continued, and the error it then meets is raised, never ignored."""
    while len(data):
        written = os.pwrite(fd, data, offset)  # plain write: no page faults
        if written <= 0:
            raise OSError(f"wrote 0 of {len(data)} bytes at offset {offset}")
        data, offset = data[written:], offset + written


def _npy_header(dtype: np.dtype[Any], shape: tuple[int, int]) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


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
