#!/usr/bin/env python
"""TRAK: datatrace vs traker 0.3.2 (``TRAKer``) and dattri 0.3.0 (``TRAKAttributor``), CPU.

    python bench/bench_trak.py [--quick] [--workloads small,cnn]

Every peer is converted (:mod:`peers`) to datatrace's TRAK at one ridge lam = lam0 and
k = 512 (quick 128); agreement: mean per-query Pearson with the unprojected float64
reference (:mod:`references`), run r with projection seed r in every library; every run a
fresh worker. Details: bench/README.md.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any

import harness
import torch
from harness import lsq_scale, strict_pearson
from peers import TrakSettings, dattri_peer, traker_peer
from references import datatrace_unprojected, kernels
from workloads import (
    Workload,
    augmented_digits_workload,
    load_workload,
    save_workload,
    small_mlp_workload,
)

import datatrace as dt

API = {"datatrace": "dt.TRAK", "traker": "TRAKer", "dattri": "TRAKAttributor"}


def trak_workload(name: str, quick: bool) -> Workload:
    if name == "small":
        return small_mlp_workload().subset(300, 50) if quick else small_mlp_workload()
    if name == "cnn":
        cnn = augmented_digits_workload(2_000, 200) if quick else augmented_digits_workload()
        return dataclasses.replace(
            cnn.subset(600, 100) if quick else cnn.subset(5_000, 500), name="cnn"
        )
    raise ValueError(f"unknown workload {name!r} (choose from small, cnn)")


def datatrace_trak(wl: Workload, st: TrakSettings) -> tuple[torch.Tensor, dict[str, float]]:
    task = dt.ClassificationTask(copy.deepcopy(wl.model))
    ckpts = [dt.Checkpoint.from_state_dict(sd) for sd, _ in wl.ckpts]  # TRAK weighs 1/C
    method = dt.TRAK(projection_dim=st.proj_dim, damping=st.damping, projection_seed=st.seed)
    S, t, _ = harness.fit_attribute(
        method, task, ckpts, wl.train, wl.test, batch_size=st.batch_size
    )
    return S, t


RUNNERS = {"datatrace": datatrace_trak, "traker": traker_peer.trak, "dattri": dattri_peer.trak}


def trak_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One timed run in a fresh process: warm up on a slice, run, return (S, times)."""
    warnings.filterwarnings("ignore")
    wl, st = load_workload(spec["workload"]), TrakSettings(**spec["settings"])
    run = RUNNERS[spec["library"]]
    run(wl.subset(64, 8), dataclasses.replace(st, proj_dim=min(32, st.proj_dim)))
    gc.collect()
    with harness.RssPeak() as mem:
        S, t = run(wl, st)
    return {"S": S, "t": {**t, "mem_gb": mem.gb}}


def prepare(
    wl: Workload, path: str, proj_dim: int, batch_size: int
) -> tuple[TrakSettings, torch.Tensor, dict]:
    """The workload saved for the workers, its settings, its reference and untimed checks:
    the kernel form vs datatrace's own unprojected TRAK on the last layer (cheap there)."""
    save_workload(wl, path)
    kern = kernels(wl)
    lam = kern.lam0
    info: dict[str, Any] = {
        "describe": wl.describe(), "n_params": wl.n_params, "damping": lam, "lam0": kern.lam0,
        "traker_lambda_reg": wl.n_train * proj_dim * lam / wl.n_params,
        "dattri_regularization": wl.n_train * lam / wl.n_params,
        "reference": "float64 TRAK without projection, kernel form, same damping", "reference_s": kern.seconds,
    }  # fmt: skip
    ref = kern.scores(lam)
    t0 = time.perf_counter()
    part = wl.subset(min(wl.n_train, 1_000), min(wl.n_test, 100))
    r_dt = datatrace_unprojected(part, lam, params=("fc2",))
    r_kern = kernels(part, params=("fc2",)).scores(lam)
    chk = info["reference_check"] = {
        "params": ["fc2"], "n_train": part.n_train, "n_test": part.n_test,
        "pearson": strict_pearson(r_kern, r_dt), "scale": lsq_scale(r_kern, r_dt),
        "max_rel_err": harness.max_rel_err(r_kern, r_dt), "seconds": time.perf_counter() - t0,
    }  # fmt: skip
    print(f"workload {wl.describe()}\n  lam = lam0 = {lam:.4g}; reference {info['reference_s']:.1f}s; "
          f"vs datatrace TRAK(projection_dim=None) float64 on fc2 ({chk['n_train']} x {chk['n_test']}): "
          f"Pearson {chk['pearson']:.6f}, scale {chk['scale']:.6f}", flush=True)  # fmt: skip
    return TrakSettings(proj_dim, lam, batch_size), ref, info


def trak_row(
    c: harness.Cell, st: TrakSettings, info: dict, dt_cell: harness.Cell | None
) -> dict[str, Any]:
    """Agreement: the mean over runs (seeds) of the per-query Pearson with the reference;
    with datatrace's scores and between the first two seeds (seed 0): details."""
    agree = c.runs.get("agreement", [])
    note = ([c.error] if c.error else []) + (
        ["non-finite scores"] if any(x != x for x in agree) else []
    )
    vs_dt = (
        strict_pearson(c.scores[0], dt_cell.scores[0])
        if c.scores and dt_cell and dt_cell.scores
        else None
    )
    return harness.row(
        workload=c.workload, method="trak", library=c.library, seconds=c.median(),
        peak_mem_gb=statistics.median(c.runs["mem_gb"]) if c.runs else None,
        agreement=statistics.fmean(agree) if agree else None,
        agreement_with=f"{info['reference']} (lam={st.damping:.4g})",
        note="; ".join(note + c.busy()), api=API[c.library], agreement_per_seed=agree,
        scale_per_seed=c.runs.get("scale", []), agreement_with_datatrace_seed0=vs_dt,
        seed0_vs_seed1=strict_pearson(*c.scores) if len(c.scores) > 1 else None,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = harness.arg_parser(__doc__, ",".join(RUNNERS), repeats=None, max_wait=30.0)
    ap.add_argument("--workloads", default="small,cnn", help="comma-separated: small,cnn")
    args = harness.parse_args(ap, argv)
    if args.worker:
        return harness.worker_main(args.worker, trak_worker)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    repeats = args.repeats or (1 if args.quick else 3)
    proj_dim = 128 if args.quick else 512
    libs = harness.libraries(ap, args.libraries, RUNNERS)
    env = harness.environment(("traker", "dattri"), dtype="float32 (reference float64)", proj_dim=proj_dim,
                              batch_size=args.batch_size, repeats=repeats, quick=args.quick)  # fmt: skip
    t_start = time.perf_counter()
    rows, workloads = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-trak-") as tmp:
        for name in args.workloads.split(","):  # one workload at a time, runs interleaved
            path = os.path.join(tmp, f"{name}.pt")
            st, ref, info = prepare(
                trak_workload(name, args.quick), path, proj_dim, args.batch_size
            )
            worker = harness.in_workers(__file__, args.max_wait, lambda c, rep: {  # run r: seed r
                "workload": path, "library": c.library, "threads": args.threads,
                "settings": dataclasses.replace(st, seed=rep).__dict__})  # fmt: skip

            def run(c: harness.Cell, rep: int) -> tuple:
                S, t, notes = worker(c, rep)
                return (
                    S,
                    {**t, "agreement": strict_pearson(S, ref), "scale": lsq_scale(S, ref)},
                    notes,
                )

            cells = [harness.Cell(name, "trak", lib) for lib in libs]
            harness.time_cells(cells, repeats, run)
            dt_cell = next((c for c in cells if c.library == "datatrace"), None)
            rows += [trak_row(c, st, info, dt_cell) for c in cells]
            done = [c for c in cells if c.scores]
            info["pairwise_seed0"] = {f"{a.library}~{b.library}": strict_pearson(a.scores[0], b.scores[0])
                                      for i, a in enumerate(done) for b in done[i + 1 :]}  # fmt: skip
            print(f"{name}: pairwise (seed 0) {info['pairwise_seed0']}")
            workloads[name] = info
    harness.print_rows(rows)
    total_s = time.perf_counter() - t_start
    print(f"total {total_s:.0f}s")
    harness.write_json(
        args.json,
        {"environment": env, "rows": rows, "total_seconds": total_s, "workloads": workloads},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
