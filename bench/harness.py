"""The benchmark harness: how every script in bench/ times, watches, records and prints
(fresh-process workers, the contention watch, memory, interleaved repeats, agreement
measures, the row format, the JSON writer, the shared options; see bench/README.md)."""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before any peer imports tqdm: inner progress bars

import argparse
import contextlib
import ctypes
import gc
import hashlib
import importlib.metadata
import json
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

BUSY_LIMIT = 0.25  # CPU cores used by other processes above which a run counts as contended


def _busy_s() -> float:
    """CPU seconds the whole machine has been busy (every process), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return float("nan")
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def _own_s() -> float:
    """CPU seconds of this process and its finished children (the fresh-process workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuWatch:
    """CPU cores that *other* processes used since construction (machine busy - ours)."""

    def __init__(self) -> None:
        self.t, self.busy, self.own = time.perf_counter(), _busy_s(), _own_s()

    def others(self) -> float:
        wall = time.perf_counter() - self.t
        other = (_busy_s() - self.busy) - (_own_s() - self.own)
        return max(0.0, other) / wall if wall > 0 else 0.0


def malloc_trim() -> None:
    """Give freed heap back to the OS (glibc): dattri's CG and LiSSA leave ~20 GB behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def quiet(max_wait: float) -> float:
    """Before each timed run (untimed): gc, malloc_trim, os.sync (a deleted feature store must
    not be written back during the next run), then wait up to ``max_wait`` s until other
    processes use < BUSY_LIMIT cores. Returns that load."""
    gc.collect()
    malloc_trim()
    os.sync()
    waited, watch = 0.0, CpuWatch()
    time.sleep(0.5)
    while (load := watch.others()) > BUSY_LIMIT and waited < max_wait:
        if waited == 0.0:
            print(f"    (other processes use {load:.2f} cores: waiting up to {max_wait:.0f}s)")
        watch = CpuWatch()
        time.sleep(2.0)
        waited += 2.0
    return load


class Clock:
    """Phase times: ``lap("fit")`` records the time since the last lap and ``total``, and
    returns every phase so far; ``sync`` (e.g. CUDA's) runs before every reading."""

    def __init__(self, sync: Callable[[], Any] = lambda: None) -> None:
        self.sync = sync
        sync()
        self.start = self.last = time.perf_counter()
        self.times: dict[str, float] = {}

    def lap(self, phase: str | None = None) -> dict[str, float]:
        self.sync()
        now = time.perf_counter()
        if phase:
            self.times[phase] = now - self.last
        self.last, self.times["total"] = now, now - self.start
        return self.times


def _status_kb(name: str) -> int:
    with open("/proc/self/status") as f:
        return next((int(line.split()[1]) for line in f if line.startswith(name + ":")), 0)


def peak_rss_gb() -> float:
    """This process's ``VmHWM``, GB (not ``ru_maxrss``: a spawned child inherits the parent's)."""
    return _status_kb("VmHWM") / 1e6


class RssPeak:
    """Peak resident memory above the level at entry, sampled every ``interval`` s in a
    thread: ``with RssPeak() as peak: run(); peak.gb``."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval, self._stop = interval, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        stopped = False
        while not stopped:  # every interval, and once more when stopped
            stopped = self._stop.wait(self.interval)
            self.peak = max(self.peak, _status_kb("VmRSS") * 1024)

    def __enter__(self) -> RssPeak:
        self.base = self.peak = _status_kb("VmRSS") * 1024
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def gb(self) -> float:
        return (self.peak - self.base) / 1e9


class WorkerError(RuntimeError):
    """An exception raised inside a worker process; its message is 'Type: message'."""


def run_worker(script: str, spec: dict[str, Any], timeout: float | None = None) -> Any:
    """Run ``python script --worker SPEC`` in a fresh process and return what its
    :func:`worker_main` saved. ``spec`` must be JSON; it gains ``out``, the result file."""
    fd, out = tempfile.mkstemp(prefix="bench-worker-", suffix=".pt")
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(script), "--worker", json.dumps({**spec, "out": out})]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 3 and os.path.getsize(out):  # the worker caught an exception
            raise WorkerError(torch.load(out, weights_only=False)["error"])
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            how = f"exit {proc.returncode}"
            if proc.returncode == -9:  # SIGKILL, as the kernel's OOM killer sends
                ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
                how = f"killed by SIGKILL (out of memory? the machine has {ram:.0f} GB)"
            elif proc.returncode < 0:
                how = f"killed by signal {-proc.returncode}"
            raise WorkerError(f"worker {how}" + (f": {' | '.join(tail)}" if tail else ""))
        return torch.load(out, weights_only=False)
    finally:
        os.unlink(out)


def worker_main(spec_json: str, work: Callable[[dict[str, Any]], Any]) -> int:
    """The worker side of :func:`run_worker`: ``work(spec)`` (with ``spec["threads"]``
    threads) saved to ``spec["out"]``; an exception is saved as a clean message (exit 3): a
    library that cannot run a workload is a result, not a crash."""
    spec = json.loads(spec_json)
    if "threads" in spec:
        torch.set_num_threads(spec["threads"])
    try:
        result = work(spec)
    except Exception as exc:
        traceback.print_exc()
        torch.save({"error": f"{type(exc).__name__}: {exc}"}, spec["out"])
        return 3
    torch.save(result, spec["out"])
    return 0


ROW_KEYS = ("workload", "method", "library", "seconds", "peak_mem_gb", "agreement",
            "agreement_with", "note")  # fmt: skip


def row(**kw: Any) -> dict[str, Any]:
    """One result row of the JSON ``"rows"`` that ``suite.py`` reads: the keys of
    :data:`ROW_KEYS` (missing ones None, ``note`` ""), extras kept after them."""
    out: dict[str, Any] = {k: kw.pop(k, None) for k in ROW_KEYS}
    out["note"] = out["note"] or ""
    return {**out, **kw}


@dataclass
class Cell:
    """One (workload, method, library) timed over interleaved runs: every run's measurements
    (``total`` seconds, ``others_cores``, ...), the first two runs' scores, the first run's
    notes; ``error`` once a run failed (the cell then stops)."""

    workload: str
    method: str
    library: str
    spec: dict[str, Any] = field(default_factory=dict)  # what the script's runner needs
    runs: dict[str, list[Any]] = field(default_factory=dict)
    scores: list[Any] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def median(self, key: str = "total") -> float | None:
        """Median of ``key`` over the undisturbed runs (over all if none); None if no run."""
        if key not in self.runs:
            return None
        clean = [v for v, o in zip(self.runs[key], self.runs["others_cores"], strict=True)
                 if o <= BUSY_LIMIT]  # fmt: skip
        return statistics.median(clean or self.runs[key])

    def first(self, key: str) -> Any:
        return self.runs[key][0] if self.runs.get(key) else None

    def busy(self) -> list[str]:
        runs = self.runs.get("others_cores", [])
        n = sum(x > BUSY_LIMIT for x in runs)
        return [f"{n}/{len(runs)} runs disturbed by other processes"] if n else []

    def record(self) -> dict[str, Any]:
        """The cell for the JSON: every run's measurements, notes and error, not scores."""
        return {"workload": self.workload, "method": self.method, "library": self.library,
                "runs": self.runs, "notes": self.notes, "error": self.error}  # fmt: skip

    def row(self, notes: list[str] | tuple = (), **kw: Any) -> dict[str, Any]:
        """The cell's row: median seconds, its error before ``notes``, ``kw`` on top."""
        note = "; ".join(([self.error] if self.error else []) + list(notes))
        return row(**{"workload": self.workload, "method": self.method, "library": self.library,
                      "seconds": self.median(), "note": note, **kw})  # fmt: skip


Runner = Callable[[Cell, int], tuple[Any, dict[str, Any], list[str]]]


def in_workers(script: str, max_wait: float, spec: Callable[[Cell, int], dict],
               timeout: float | None = None, here: Callable | None = None) -> Runner:  # fmt: skip
    """A runner for :func:`time_cells`: run r of a cell is, after :func:`quiet`, a fresh
    worker given ``spec(cell, r)`` (or ``here(spec)`` in this process), whose work returns
    ``{"S", "t"[, "notes"]}``; ``others_cores``: the most other processes used."""

    def run(c: Cell, rep: int) -> tuple[Any, dict[str, Any], list[str]]:
        before, watch = quiet(max_wait), CpuWatch()
        s = spec(c, rep)
        d = here(s) if here else run_worker(script, s, timeout)
        return d["S"], {**d["t"], "others_cores": max(before, watch.others())}, d.get("notes", [])

    return run


def time_cells(cells: list[Cell], repeats: int, run: Runner, slow_s: float = math.inf,
               retry_busy: bool = False) -> None:  # fmt: skip
    """Interleaved runs, run r of every cell before r + 1 (slow drifts hit every library
    alike). A failing run is the cell's error, not fatal; a cell whose first run took over
    ``slow_s`` s runs once; ``retry_busy``: up to 2 x ``repeats`` runs while every run of a
    cell was disturbed (``repeats`` > 1)."""
    for rep in range(2 * repeats if retry_busy and repeats > 1 else repeats):
        for c in cells:
            done = c.runs.get("total", [])
            if c.error is not None or (done and done[0] > slow_s):
                continue
            if rep >= repeats and any(o <= BUSY_LIMIT for o in c.runs["others_cores"]):
                continue
            label = f"  {c.workload:12s} {c.method:18s} {c.library:11s} run {rep + 1}"
            try:
                S, t, notes = run(c, rep)
            except Exception as exc:  # a library that cannot run is a result
                c.error = (f"timed out after {exc.timeout:.0f} s" if isinstance(exc, subprocess.TimeoutExpired)
                           else str(exc) if isinstance(exc, WorkerError) else f"{type(exc).__name__}: {exc}")[:400]  # fmt: skip
                print(f"{label} ERROR {c.error}", flush=True)
                continue
            for k, v in t.items():
                c.runs.setdefault(k, []).append(v)
            c.scores += [S] if len(c.scores) < 2 else []
            c.notes = c.notes or notes
            extra = "".join(f" {k} {v:.3g}" for k, v in t.items()
                            if k not in ("total", "others_cores") and isinstance(v, float))  # fmt: skip
            busy = "  CONTENDED" if t["others_cores"] > BUSY_LIMIT else ""
            print(f"{label} {t['total']:8.2f}s{extra}{busy}", flush=True)


def fit_attribute(
    method: Any, task: Any, ckpts: list, train: tuple, test: tuple, **fit_kw: Any
) -> tuple[torch.Tensor, dict[str, float], Any]:
    """Time datatrace's ``method.fit`` + ``attribute``: (S, {fit, attribute, total}, fitted).
    The caller drops ``fitted`` (which removes a temporary feature store) outside the timing."""
    clock = Clock(fit_kw.pop("sync", lambda: None))
    fitted = method.fit(task, ckpts, train, progress=False, **fit_kw)
    clock.lap("fit")
    S = fitted.attribute(test)
    return S.detach(), dict(clock.lap("attribute")), fitted


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of the flattened matrices."""
    x, y = a.detach().double().flatten().cpu(), b.detach().double().flatten().cpu()
    x, y = x - x.mean(), y - y.mean()
    return float((x @ y) / (x.norm() * y.norm()))


def max_rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref|."""
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    return float((a - ref).abs().max() / ref.abs().max())


def per_query_pearson(S: torch.Tensor, R: torch.Tensor, strict: bool = False) -> tuple[float, int]:
    """(mean over queries of the Pearson correlation over training examples, number of
    queries left out because their row of S has a non-finite entry; ``strict``: NaN then)."""
    a, b = S.double(), R.double()
    ok = torch.isfinite(a).all(1)
    a, b = a[ok], b[ok]
    if a.shape[0] == 0 or (strict and not ok.all()):
        return float("nan"), int((~ok).sum())
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    r = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)
    return float(r.mean()), int((~ok).sum())


def lsq_scale(S: torch.Tensor, R: torch.Tensor) -> float:
    """Least-squares slope of S on R over the finite entries (1 = same sign and scale)."""
    a, b = S.double().flatten(), R.double().flatten()
    ok = torch.isfinite(a)
    a, b = a[ok], b[ok]
    return float((a @ b) / (b @ b)) if a.numel() else float("nan")


def src_state() -> str:
    """git commit of the datatrace checkout, '+dirty' if its sources differ from it, and a
    hash of the imported sources: the code really timed (src/ may change between runs)."""
    import datatrace

    root = Path(datatrace.__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.read_bytes())

    def git(*a: str) -> str:
        cmd = ["git", "-C", str(root), *a]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        commit, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", ".")
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "?", ""
    return f"{commit or '?'}{'+dirty' if dirty else ''} src-sha256:{h.hexdigest()[:12]}"


def environment(peers: tuple[str, ...] | list[str] = (), **extra: Any) -> dict[str, Any]:
    """Versions (a missing peer is reported, not fatal), machine, thread count, ``extra``."""
    import datatrace

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "datatrace": datatrace.__version__, "datatrace_src": src_state()}  # fmt: skip
    for name in peers:
        try:
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError as e:
            env[name] = f"unavailable: {e}"
    env.update(threads=torch.get_num_threads(), cpu=platform.processor() or platform.machine(),
               cpu_count=os.cpu_count(), **extra)  # fmt: skip
    print("environment:", json.dumps(env), flush=True)
    return env


def write_json(path: str | None, obj: dict[str, Any]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=1, default=float)
        print(f"wrote {path}")


def fmt(x: Any, spec: str) -> str:
    """``format(x, spec)``, or '-' right-aligned to the spec's width for None and NaN."""
    if x is None or (isinstance(x, float) and x != x):
        return "-".rjust(int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0))
    return format(x, spec)


def row_time(r: dict[str, Any]) -> float | None:
    """Comparable seconds: the full-size extrapolation where a peer ran on a prefix."""
    t = r.get("extrapolated_seconds_full") or r.get("seconds")
    return None if t is None or (isinstance(t, float) and math.isnan(t)) else float(t)


def print_rows(rows: list[dict[str, Any]]) -> None:
    """The rows as one table; ratio = time / datatrace's on the same (workload, method,
    damping), > 1: datatrace faster."""
    print(f"\n{'workload':18s} {'method':16s} {'library':11s} {'seconds':>9s} {'ratio':>7s} "
          f"{'mem GB':>7s} {'agree':>7s}  agreement with / note")  # fmt: skip
    key = lambda r: (r["workload"], r["method"], r.get("damping"))  # noqa: E731
    base = {key(r): row_time(r) for r in rows if r["library"] == "datatrace"}
    for r in sorted(rows, key=lambda r: (r["workload"], r["method"], r["library"] != "datatrace")):
        t, ref = row_time(r), base.get(key(r))
        ratio = t / ref if t is not None and ref else None
        method = r["method"] + (f" λ={r['damping']:g}" if r.get("damping") is not None else "")
        extra = " (extrapolated)" if r.get("extrapolated_seconds_full") else ""
        print(f"{r['workload']:18s} {method:16s} {r['library']:11s} {fmt(t, '9.2f')} "
              f"{fmt(ratio, '7.2f')} {fmt(r.get('peak_mem_gb'), '7.2f')} "
              f"{fmt(r.get('agreement'), '7.3f')}  {r.get('agreement_with') or ''}"
              f"{extra}{' ' + r['note'] if r.get('note') else ''}")  # fmt: skip


def parse_args(doc: str, libraries: str, argv: list[str] | None, own: Callable[[Any], Any],
               repeats: int | None = 3, **defaults: Any) -> argparse.Namespace:  # fmt: skip
    """The options every benchmark shares (``defaults`` override threads, batch_size,
    max_wait), ``own(parser)`` adds the script's; ``--libraries`` becomes a list, each one
    of ``libraries`` when that is given (else a usage error)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke-test sizes (see the docstring)")
    ap.add_argument("--repeats", type=int, default=repeats, help="timed runs per cell (median)")
    ap.add_argument("--threads", type=int, default=defaults.get("threads", 2))
    ap.add_argument("--batch-size", type=int, default=defaults.get("batch_size", 500),
                    help="examples per batch, the same for every library")  # fmt: skip
    ap.add_argument("--libraries", default=libraries, help="comma-separated subset")
    ap.add_argument("--max-wait", type=float, default=defaults.get("max_wait", 300.0),
                    help="seconds to wait before each timed run for other processes to idle")  # fmt: skip
    ap.add_argument("--json", default=None, help="write results to this JSON file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    own(ap)
    args = ap.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        ap.error("--repeats must be >= 1")
    args.error = ap.error
    if libraries and args.libraries is not None:
        known, args.libraries = libraries.split(","), [x.strip() for x in args.libraries.split(",") if x.strip()]  # fmt: skip
        if unknown := set(args.libraries) - set(known):
            ap.error(f"unknown libraries {sorted(unknown)}; choose from {', '.join(known)}")
    return args
