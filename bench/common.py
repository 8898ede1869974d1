"""Shared by the benchmark scripts: peak resident memory of a timed run, and the row
format every script writes under ``"rows"`` in its JSON (read by ``suite.py``)."""

from __future__ import annotations

import threading
import time
from typing import Any


def rss_bytes() -> int:
    """Resident memory of this process (Linux ``/proc``; 0 where unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class RssPeak:
    """Peak resident memory above the level at entry, sampled every ``interval`` seconds
    in a thread: ``with RssPeak() as peak: run(); peak.gb``."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> RssPeak:
        self.base = self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def gb(self) -> float:
        return (self.peak - self.base) / 1e9


ROW_KEYS = (
    "workload",
    "method",
    "library",
    "seconds",
    "peak_mem_gb",
    "agreement",
    "agreement_with",
    "note",
)


def row(**kw: Any) -> dict[str, Any]:
    """One result row (the keys of :data:`ROW_KEYS`, missing ones None/empty, extras kept)."""
    out: dict[str, Any] = {k: kw.pop(k, None) for k in ROW_KEYS}
    out["note"] = out["note"] or ""
    out.update(kw)
    return out
