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
import warnings
from typing import Any

import harness
import torch
from peers import captum_peer, dattri_peer
from workloads import Workload, augmented_digits_workload, small_mlp_workload

import datatrace as dt

PEARSON_MIN = 0.999
LIBRARIES = ("datatrace", "captum", "dattri")
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


def tracin_run(lib: str, wl: Workload, method: str, bs: int, files: dict) -> tuple:
    """(S, times): datatrace's fit + attribute (also apart); a peer's whole API call."""
    model = copy.deepcopy(wl.model)
    if lib == "datatrace":
        ckpts = [dt.Checkpoint.from_state_dict(sd, weight=lr) for sd, lr in wl.ckpts]
        attributor = dt.TracIn() if method == "TracIn" else dt.GradDot()  # GradDot: last, w=1
        S, t, fitted = harness.fit_attribute(attributor, dt.ClassificationTask(model), ckpts,
                                             wl.train, wl.test, batch_size=bs)  # fmt: skip
        del fitted  # removes the temporary feature store (not timed)
        gc.collect()
        return S, t
    clock = harness.Clock()
    if lib == "captum":
        S = captum_peer.tracincp(model, wl.train, wl.test, files[wl.name, method], batch_size=bs)
    else:
        cks = selected(wl, method)
        S = dattri_peer.tracin(model, [sd for sd, _ in cks], [w for _, w in cks], wl.train,
                               wl.test, bs)  # fmt: skip
    return S, clock.lap()


def tracin_row(c: harness.Cell, ref: harness.Cell) -> dict[str, Any]:
    """Pearson of the first run's scores with datatrace's (the scores are deterministic)."""
    same = bool(c.scores and ref.scores) and c.scores[0].shape == ref.scores[0].shape
    r = harness.pearson(c.scores[0], ref.scores[0]) if same else float("nan")
    r = 1.0 if c is ref and same else r
    return harness.row(
        workload=ROW_WORKLOAD[c.workload], method=c.method.lower(), library=c.library,
        seconds=c.median(), peak_mem_gb=max(c.runs["peak_mem_gb"]) if c.runs else None,
        agreement=r, agreement_with="datatrace float32 (same definition, Pearson of S)",
        note="; ".join(([c.error] if c.error else []) + ([] if r > PEARSON_MIN else ["FAIL"])),
        api=API[c.library, c.method],
        rel_err=harness.max_rel_err(c.scores[0], ref.scores[0]) if same else None,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = harness.arg_parser(__doc__, ",".join(LIBRARIES))
    ap.add_argument("--workloads", default="small,large", help="comma-separated subset")
    args = harness.parse_args(ap, argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    libs = ["datatrace"] + [x for x in args.libraries.split(",") if x and x != "datatrace"]
    if unknown := set(libs) - set(LIBRARIES):
        ap.error(f"unknown libraries {sorted(unknown)}; choose from {LIBRARIES}")
    env = harness.environment(("captum", "dattri"), dtype="float32", batch_size=args.batch_size,
                              repeats=args.repeats, quick=args.quick)  # fmt: skip
    workloads = {n: tracin_workload(n, args.quick) for n in args.workloads.split(",")}
    rows, records = [], []
    with tempfile.TemporaryDirectory(prefix="bench-tracin-") as tmp:
        files = {(wl.name, m): captum_peer.save_checkpoints(selected(wl, m), tmp, f"{wl.name}-{m}")
                 for wl in workloads.values() for m in ("TracIn", "GradDot")}  # fmt: skip
        for wl in workloads.values():  # one workload, one method at a time, as ever
            print("workload", wl.describe(), flush=True)
            for method in ("TracIn", "GradDot"):
                cells = [harness.Cell(wl.name, method, lib) for lib in libs]
                warm = wl.subset(min(256, wl.n_train), min(32, wl.n_test))
                for lib in libs:  # lazy init, imports, vmap/hook set-up, allocator
                    tracin_run(lib, warm, method, args.batch_size, files)
                run = harness.in_process(args.max_wait, lambda c, _: tracin_run(
                    c.library, wl, c.method, args.batch_size, files))  # fmt: skip
                harness.time_cells(cells, args.repeats, run)
                rows += [tracin_row(c, cells[0]) for c in cells]
                records += [c.record() for c in cells]
    if failed := [r for r in rows if "FAIL" in r["note"]]:
        print(f"\nFAIL: {len(failed)} cell(s) below Pearson {PEARSON_MIN} vs datatrace")
    harness.print_rows(rows)
    harness.write_json(args.json, {"environment": env, "pearson_min": PEARSON_MIN,
                                   "workloads": [wl.describe() for wl in workloads.values()],
                                   "cells": records, "rows": rows})  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
