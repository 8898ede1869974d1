"""The benchmark suite in one command: every method × every peer × every workload.

Runs the components of :data:`COMPONENTS` one after the other (never two at a time: timings
need a quiet machine), reads the ``"rows"`` each wrote to its JSON, prints one table and
checks the target (datatrace at least 2× faster than the fastest peer implementing a
method); writes ``suite.json`` into ``--out``.

    .venv-bench/bin/python bench/suite.py --out bench/suite            # ~1 h on 2 cores
    .venv-bench/bin/python bench/suite.py --quick --out /tmp/suite      # smoke test, minutes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness import print_rows, row_time

HERE = Path(__file__).resolve().parent
TARGET = 2.0  # datatrace at least this many times faster than the fastest peer

# name -> (script, its arguments in the full run, in the quick run, which python runs it:
# "bench" (peers captum, dattri, kronfluence, traker) or "hf" (transformers, the tweets and
# MiniLM; dattri's torchvision breaks transformers' BERT import, so it has its own venv)).
# influence-cnn: dattri's CG-100 and LiSSA exceed 23 GB on this CNN (killed); DataInf and
# Arnoldi are in the MLP component. transformers: the issue-15 workload (200 × 50).
COMPONENTS: dict[str, tuple[str, list[str], list[str], str]] = {
    "tracin": ("cpu.py", ["tracin"], ["tracin", "--quick"], "bench"),
    "influence-mlp": ("cpu.py", ["influence", "--dampings", "0.1"], ["influence", "--quick", "--dampings", "0.1"], "bench"),
    "influence-cnn": ("cpu.py", ["influence", "--workloads", "cnn", "--dampings", "0.1", "--methods", "exact,cg,ekfac",
                      "--cg-iters", "20"], ["influence", "--workloads", "cnn", "--quick", "--dampings", "0.1"], "bench"),
    "trak": ("cpu.py", ["trak"], ["trak", "--quick"], "bench"),
    "scale": ("cpu.py", ["scale"], ["scale", "--quick"], "bench"),
    "loo": ("cpu.py", ["loo"], ["loo", "--n-left-out", "10"], "bench"),
    "ddm": ("bench_ddm.py", [], ["--quick"], "bench"),
    "defaults": ("defaults.py", [], ["--quick"], "bench"),
    "transformers": ("bench_transformers.py", ["--quick"], ["--tiny"], "hf"),
    "lm": ("bench_lm.py", [], ["--quick"], "hf"),
}  # fmt: skip
NO_MAX_WAIT = {"defaults.py"}  # its quality rows do not wait for a quiet machine

# the scripts' workload labels -> one name per distinct model and data size
WORKLOADS = {
    ("tracin", "digits-mlp"): "digits MLP 1k",
    ("tracin", "digits-cnn"): "digits CNN17k 20k",
    ("trak", "small"): "digits MLP 1k",
    ("trak", "cnn"): "digits CNN17k 5k",
    ("influence-mlp", "digits-mlp"): "digits MLP 500",
    ("influence-cnn", "digits-cnn"): "digits CNN1.9k 500",
    ("scale", "scale-100k"): "synthetic 100k",
}


def read_rows(path: Path, component: str) -> list[dict[str, Any]]:
    rows = json.loads(path.read_text()).get("rows", [])
    for r in rows:
        r["component"] = component
        r["workload"] = WORKLOADS.get((component, r["workload"]), r["workload"])
    return rows


def run_component(name: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    script, full, small, venv = COMPONENTS[name]
    path, log = out / f"{name}.json", out / f"{name}.log"
    if args.reuse and path.exists():
        return {"command": "reused", "exit": 0, "note": "", "rows": read_rows(path, name)}
    python = args.hf_python if venv == "hf" else args.python
    cmd = [python, str(HERE / script), *(small if args.quick else full), "--json", str(path)]
    if script == "defaults.py":  # its ground truth computed afresh, kept beside the results
        cmd += ["--cache", str(out / "defaults-cache")]
    if args.max_wait is not None and script not in NO_MAX_WAIT:
        cmd += ["--max-wait", str(args.max_wait)]
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    paths = [str(HERE.parent / "src"), str(HERE), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}  # this datatrace
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    tail = log.read_text(errors="replace").splitlines()[-40:]
    print("\n".join(line for line in tail if "it/s" not in line))
    note = "" if path.exists() else f"no JSON written (exit code {proc.returncode}); see {log}"
    if proc.returncode != 0:
        note = note or f"exit code {proc.returncode} (a FAIL flag or an error); see {log}"
    return {"command": " ".join(cmd), "seconds": time.perf_counter() - t0,
            "exit": proc.returncode, "note": note,
            "rows": read_rows(path, name) if path.exists() else []}  # fmt: skip


def speedup_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (workload, method, damping): datatrace's time vs the fastest peer's."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if row_time(r) is not None:
            groups.setdefault((r["workload"], r["method"], r.get("damping")), []).append(r)
    out = []
    for (workload, method, damping), rs in groups.items():
        mine = [row_time(r) for r in rs if r["library"] == "datatrace"]
        peers = sorted((row_time(r), r["library"]) for r in rs if r["library"] != "datatrace")
        if mine:
            out.append(check := {"workload": workload, "method": method, "damping": damping,
                                 "datatrace_s": min(mine), "fastest_peer": None, "speedup": None, "met": None})  # fmt: skip
        if mine and peers:
            speedup = peers[0][0] / min(mine) if min(mine) > 0 else float("inf")
            check.update(fastest_peer=peers[0][1], peer_s=peers[0][0], speedup=speedup, met=speedup >= TARGET)  # fmt: skip
    return out


def print_summary(rows: list[dict[str, Any]], checks: list[dict[str, Any]]) -> None:
    print_rows(rows)
    print(f"\ntargets (datatrace ≥ {TARGET:g}× faster than the fastest peer implementing it):")
    for c in (c for c in checks if c["fastest_peer"] is not None):
        verdict = (f"{c['speedup']:.2f}× vs {c['fastest_peer']} ({c['peer_s']:.2f} s vs {c['datatrace_s']:.2f} s): "
                   f"{'met' if c['met'] else 'MISSED'}")  # fmt: skip
        damping = f" λ={c['damping']:g}" if c["damping"] is not None else ""
        print(f"  {c['workload']:18s} {c['method'] + damping:18s} {verdict}")
    print(f"  (and {sum(c['fastest_peer'] is None for c in checks)} rows no peer implements)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/suite", help="folder for JSON, logs, suite.json")
    ap.add_argument("--quick", action="store_true", help="every script's smoke-test size")
    ap.add_argument("--only", default=",".join(COMPONENTS), help="components to run")
    ap.add_argument("--python", default=sys.executable, help="the benchmark venv's python")
    ap.add_argument("--hf-python", default=None,
                    help="the transformers venv's python (default: --python)")  # fmt: skip
    ap.add_argument(
        "--reuse", action="store_true", help="do not rerun components whose JSON exists"
    )
    ap.add_argument("--max-wait", type=float, default=None,
                    help="every script's wait for an idle machine before a timed run (s)")  # fmt: skip
    args = ap.parse_args(argv)
    args.hf_python = args.hf_python or args.python
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.only.split(",") if n]
    if unknown := [n for n in names if n not in COMPONENTS]:
        ap.error(f"unknown components {unknown}; choose from {sorted(COMPONENTS)}")
    runs = {name: run_component(name, args, out) for name in names}
    rows = [r for run in runs.values() for r in run["rows"]]
    checks = speedup_targets(rows)
    print_summary(rows, checks)
    for name, run in runs.items():
        if run["note"]:
            print(f"  {name}: {run['note']}")
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    env = {"python": platform.python_version(), "machine": platform.machine(), "commit": commit,
           "quick": args.quick}  # fmt: skip
    components = {k: {kk: v for kk, v in r.items() if kk != "rows"} for k, r in runs.items()}
    (out / "suite.json").write_text(json.dumps(
        {"environment": env, "components": components, "rows": rows, "targets": checks}, indent=1))  # fmt: skip
    print(f"\nwrote {out / 'suite.json'}")
    return 0 if all(r["exit"] == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
