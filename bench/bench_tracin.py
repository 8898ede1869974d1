#!/usr/bin/env python
"""TracIn and Grad-Dot, exact: datatrace vs captum ``TracInCP`` and dattri ``TracInAttributor``.

    python bench/bench_tracin.py [--quick] [--repeats N] [--workloads small,large]

Every library scores the same model, data and checkpoints exactly (float32, every
parameter); agreement is the Pearson correlation with datatrace's matrix (FAIL below 0.999).
Workloads, timing and peer settings: bench/README.md.
"""

from __future__ import annotations

import copy
import gc
import sys
import tempfile
import time
import warnings
from typing import Any

import harness
import torch
from agreement import max_rel_err, pearson
from peers import captum_peer, dattri_peer
from workloads import Workload, augmented_digits_workload, small_mlp_workload

import datatrace as dt

PEARSON_MIN = 0.999
API = {("datatrace", "TracIn"): "dt.TracIn", ("datatrace", "GradDot"): "dt.GradDot",
       ("captum", "TracIn"): "TracInCP", ("captum", "GradDot"): "TracInCP(last, lr=1)",
       ("dattri", "TracIn"): "TracInAttributor",
       ("dattri", "GradDot"): "TracInAttributor(last, w=1)"}  # fmt: skip
ROW_WORKLOAD = {"small": "digits-mlp", "large": "digits-cnn"}


def tracin_workload(name: str, quick: bool) -> Workload:
    if name == "small":
        return small_mlp_workload()
    if name == "large":
        return augmented_digits_workload(2_000, 200) if quick else augmented_digits_workload()
    raise ValueError(f"unknown workload {name!r} (choose from small, large)")


def selected(wl: Workload, method: str) -> list[tuple[dict, float]]:
    """TracIn: every checkpoint weighted by its learning rate; Grad-Dot: the last, weight 1."""
    return wl.ckpts if method == "TracIn" else [(wl.ckpts[-1][0], 1.0)]


def datatrace_tracin(wl: Workload, method: str, bs: int, files: dict) -> tuple:
    task = dt.ClassificationTask(copy.deepcopy(wl.model))
    ckpts = [dt.Checkpoint.from_state_dict(sd, weight=lr) for sd, lr in wl.ckpts]
    attributor = dt.TracIn() if method == "TracIn" else dt.GradDot()  # GradDot: last, w=1
    S, t, fitted = harness.fit_attribute(attributor, task, ckpts, wl.train, wl.test, batch_size=bs)
    del fitted  # removes the temporary feature store (not timed)
    gc.collect()
    return S, t


def captum_tracin(wl: Workload, method: str, bs: int, files: dict) -> tuple:
    model = copy.deepcopy(wl.model)
    t0 = time.perf_counter()
    S = captum_peer.tracincp(model, wl.train, wl.test, files[wl.name, method], batch_size=bs)
    return S, {"total": time.perf_counter() - t0}


def dattri_tracin(wl: Workload, method: str, bs: int, files: dict) -> tuple:
    cks = selected(wl, method)
    model = copy.deepcopy(wl.model).eval()
    t0 = time.perf_counter()
    S = dattri_peer.tracin(model, [sd for sd, _ in cks], [w for _, w in cks], wl.train, wl.test, bs)
    return S, {"total": time.perf_counter() - t0}


RUNNERS = {"datatrace": datatrace_tracin, "captum": captum_tracin, "dattri": dattri_tracin}


def measure(wl: Workload, method: str, libs: list[str], args: Any, files: dict) -> list[dict]:
    """Warm up, then ``--repeats`` interleaved runs of every library; one result per library."""
    warm = wl.subset(min(256, wl.n_train), min(32, wl.n_test))
    for lib in libs:  # lazy init, imports, vmap/hook set-up, allocator
        RUNNERS[lib](warm, method, args.batch_size, files)
    phases: dict[str, dict[str, list[float]]] = {lib: {} for lib in libs}
    agree: dict[str, tuple[float, float]] = {}
    ref = None
    for rep in range(args.repeats):  # interleaved: slow drifts hit every library alike
        for lib in libs:
            before = harness.quiet(args.max_wait)
            watch = harness.CpuWatch()
            with harness.RssPeak() as peak:
                S, t = RUNNERS[lib](wl, method, args.batch_size, files)
            t.update(peak_mem_gb=peak.gb, others_cores=max(before, watch.others()))
            for k, v in t.items():
                phases[lib].setdefault(k, []).append(v)
            if rep == 0:  # deterministic scores: agreement once
                ref = S if lib == "datatrace" else ref
                same = ref is not None and S.shape == ref.shape
                agree[lib] = (pearson(S, ref), max_rel_err(S, ref)) if same else (float("nan"),) * 2
            busy = t["others_cores"] > harness.BUSY_LIMIT
            print(f"  {wl.name:5s} {method:7s} run {rep + 1}/{args.repeats} {lib:9s} "
                  f"{t['total']:8.2f}s" + ("  CONTENDED" if busy else ""), flush=True)  # fmt: skip
    dt_median = harness.clean_median(
        phases["datatrace"]["total"], phases["datatrace"]["others_cores"]
    )
    results = []
    for lib in libs:
        ph = phases[lib]
        med = {k: harness.clean_median(v, ph["others_cores"]) for k, v in ph.items()}
        r, err = (1.0, 0.0) if lib == "datatrace" else agree[lib]
        results.append({
            "workload": wl.name, "method": method, "library": lib, "api": API[lib, method],
            "median_s": med["total"], "min_s": min(ph["total"]), "runs_s": ph["total"],
            "others_cores": ph["others_cores"],
            "contended_runs": sum(x > harness.BUSY_LIMIT for x in ph["others_cores"]),
            "ratio": med["total"] / dt_median, "peak_mem_gb": max(ph["peak_mem_gb"]),
            "pearson": r, "rel_err": err, "ok": r > PEARSON_MIN,
            **({"fit_s": med["fit"], "attribute_s": med["attribute"], "fit_runs_s": ph["fit"],
                "attribute_runs_s": ph["attribute"]} if lib == "datatrace" else {}),
        })  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> int:
    ap = harness.arg_parser(__doc__, "datatrace,captum,dattri")
    ap.add_argument("--workloads", default="small,large", help="comma-separated subset")
    args = harness.parse_args(ap, argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    libs = ["datatrace"] + [x for x in args.libraries.split(",") if x and x != "datatrace"]
    if unknown := set(libs) - set(RUNNERS):
        ap.error(f"unknown libraries {sorted(unknown)}; choose from {sorted(RUNNERS)}")
    env = harness.environment(("captum", "dattri"), dtype="float32", batch_size=args.batch_size,
                              repeats=args.repeats, quick=args.quick)  # fmt: skip
    workloads = [tracin_workload(name, args.quick) for name in args.workloads.split(",")]
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-tracin-") as tmp:
        files = {(wl.name, m): captum_peer.save_checkpoints(selected(wl, m), tmp, f"{wl.name}-{m}")
                 for wl in workloads for m in ("TracIn", "GradDot")}  # fmt: skip
        for wl in workloads:
            print("workload", wl.describe(), flush=True)
            for method in ("TracIn", "GradDot"):
                results += measure(wl, method, libs, args, files)
    failed = [r for r in results if not r["ok"]]
    if failed:
        print(f"\nFAIL: {len(failed)} cell(s) below Pearson {PEARSON_MIN} vs datatrace")
    rows = [harness.row(workload=ROW_WORKLOAD[r["workload"]], method=r["method"].lower(),
                        library=r["library"], seconds=r["median_s"], peak_mem_gb=r["peak_mem_gb"],
                        agreement=r["pearson"], note="" if r["ok"] else "FAIL",
                        agreement_with="datatrace float32 (same definition, Pearson of S)")
            for r in results]  # fmt: skip
    harness.print_rows(rows)
    harness.write_json(args.json, {"environment": env, "pearson_min": PEARSON_MIN,
                                   "workloads": [wl.describe() for wl in workloads],
                                   "results": results, "rows": rows})  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
