"""Per-process-counted store locks (``fcntl.flock`` on a lock file in the store's folder):
shared to read a store, exclusive to create or replace it (:mod:`datatrace.core.persist`'s
commit protocol). A process never waits for itself, only for other processes."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import StoreCorruptError, StoreError

log = logging.getLogger("datatrace")

LOCK = ".lock"
# how long opening waits for another process using the store before giving up; a fit that
# creates a store holds the lock for seconds, one that replaces it waits for its readers
LOCK_TIMEOUT_S = 600.0


class _Held:
    def __init__(self, fd: int) -> None:
        self.fd, self.shared, self.exclusive = fd, 0, 0


_held: dict[tuple[int, int], _Held] = {}
_held_guard = threading.Lock()


@contextmanager
def locked(
    folder: Path, exclusive: bool = True, name: str = LOCK, patient: bool = False
) -> Iterator[None]:
    """Hold the store's lock (``fcntl.flock`` on ``folder/name``) for the block.

    Locks are per process: a process never waits for itself (a notebook replacing a store
    that an earlier fitted object still reads), only for other processes. ``patient``:
    wait as long as the holder lives (a lock dies with its process), not
    :data:`LOCK_TIMEOUT_S`.
    """
    key = acquire(folder, exclusive, name, patient)
    try:
        yield
    finally:
        release(key, exclusive)


def acquire(
    folder: Path, exclusive: bool, name: str = LOCK, patient: bool = False
) -> tuple[int, int] | None:
    """Take the lock ``folder/name`` (waiting up to :data:`LOCK_TIMEOUT_S`); ``None`` where no
    lock file can exist (a read-only folder: nobody can write there either)."""
    fd = _open_lock(folder / name)
    if fd is None:
        return None
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    with _held_guard:
        held = _held.get(key)
        if held is None:
            held = _held[key] = _Held(fd)
        else:
            os.close(fd)
        if exclusive and held.exclusive == 0:
            _flock(held.fd, fcntl.LOCK_EX, folder, patient)
        elif not exclusive and held.shared == 0 and held.exclusive == 0:
            _flock(held.fd, fcntl.LOCK_SH, folder, patient)
        if exclusive:
            held.exclusive += 1
        else:
            held.shared += 1
    return key


def release(key: tuple[int, int] | None, exclusive: bool) -> None:
    """Give back what :func:`acquire` took (an exclusive hold falls back to shared if this
    process still holds it shared)."""
    if key is None:
        return
    with _held_guard:
        held = _held[key]
        if exclusive:
            held.exclusive -= 1
        else:
            held.shared -= 1
        if held.exclusive == 0 and held.shared > 0 and exclusive:
            fcntl.flock(held.fd, fcntl.LOCK_SH)
        elif held.exclusive == 0 and held.shared == 0:
            fcntl.flock(held.fd, fcntl.LOCK_UN)
            os.close(held.fd)
            del _held[key]


def _open_lock(path: Path) -> int | None:
    flags = os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StoreCorruptError(f"{path} is a symlink; remove it") from exc
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
    try:
        return os.open(path, os.O_RDONLY | flags)  # flock works on a read-only descriptor
    except OSError:
        return None


def _flock(fd: int, mode: int, folder: Path, patient: bool = False) -> None:
    deadline = float("inf") if patient else time.monotonic() + LOCK_TIMEOUT_S
    waited = False
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if not waited:
                log.info("waiting for another process using the store at %s", folder)
                waited = True
            if time.monotonic() > deadline:
                raise StoreError(
                    f"the store at {folder} is in use by another process (it holds "
                    f"{folder / LOCK}); wait for it to finish, or use another path"
                ) from None
            time.sleep(0.05)
