#!/usr/bin/env python
"""Influence functions: datatrace vs dattri 0.3.0 and kronfluence 1.0.1, against float64 truth.

    python bench/bench_influence.py [--workload mlp|cnn] [--quick] [--dampings 0.01,0.1]
                                    [--methods exact,cg,...] [--cg-iters 20,100]

Every peer is converted (:mod:`peers`) to ``S[j, i] = (1/n) q_j^T (H + lam I)^{-1} g_i``,
H the Hessian of the MEAN training loss. Row ``agreement``: mean per-query Pearson with
datatrace ``GaussNewton`` (DataInf, EK-FAC) or ``ExactHessian`` (the rest) in float64
(:mod:`references`). Every run is a fresh worker; a cell whose first run exceeds 60 s runs
once. Settings: LiSSA depth 1000 (quick 200), batch 50, scale 1.5 x the largest
|eig(H + lam)|; Arnoldi rank 50 (quick 20), 2 x rank + 20 iterations. Details:
bench/README.md.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import math
import os
import sys
import tempfile
import warnings
from typing import Any

import harness
import torch
from peers import InfluenceSettings, dattri_peer, kronfluence_peer
from references import independent, influence_references
from workloads import Workload, digits_workload, load_workload, save_workload

import datatrace as dt

SLOW_S = 60.0
# --methods name -> (method, [(library, API)], approximates Gauss-Newton rather than H)
METHODS = {
    "exact": ("exact", [("datatrace", "ExactHessian"), ("dattri", "IFAttributorExplicit")], False),
    "cg": ("CG", [("datatrace", "ConjugateGradient"), ("dattri", "IFAttributorCG")], False),
    "lissa": ("LiSSA", [("datatrace", "LiSSA"), ("dattri", "IFAttributorLiSSA")], False),
    "arnoldi": ("Arnoldi", [("datatrace", "Arnoldi"), ("dattri", "IFAttributorArnoldi")], False),
    "datainf": ("DataInf", [("datatrace", "DataInf"), ("dattri", "IFAttributorDataInf")], True),
    "ekfac": ("EK-FAC", [("datatrace", "EKFAC"), ("dattri", "IFAttributorEKFAC"),
                         ("kronfluence", "Analyzer(ekfac)")], True),
}  # fmt: skip
DATATRACE = {
    "exact": lambda st: dt.Influence(dt.ExactHessian(damping=st.damping)),
    # tol far below float32 precision: exactly cg_iters iterations, like dattri
    "CG": lambda st: dt.Influence(dt.ConjugateGradient(damping=st.damping, max_iter=st.cg_iters, tol=1e-30)),
    "LiSSA": lambda st: dt.Influence(dt.LiSSA(damping=st.damping, scale=st.lissa_scale, depth=st.lissa_depth,
                                              repeat=1, batch_size=st.lissa_batch)),
    "Arnoldi": lambda st: dt.Influence(dt.Arnoldi(rank=st.arnoldi_rank, damping=st.damping, n_iter=st.arnoldi_iter)),
    "DataInf": lambda st: dt.DataInf(damping=st.damping),
    "EK-FAC": lambda st: dt.Influence(dt.EKFAC(damping=st.damping)),
}  # fmt: skip


def influence_workload(kind: str, n_train: int, n_test: int, quick: bool, epochs: int = 100,
                       seed: int = 0) -> Workload:  # fmt: skip
    if kind == "mlp":
        arch = {"model": "MLP", "hidden": 16 if quick else 128}
    else:
        arch = {"model": "PoolCNN", "c1": 4 if quick else 8, "c2": 8 if quick else 16}
    return digits_workload(f"digits-{kind}", arch, n_train, n_test, [0.1], epochs, seed)


def influence_run(library: str, method: str, wl: Workload, st: InfluenceSettings) -> tuple:
    """(S, times + mem_gb, notes + the warnings about curvature it raised)."""
    gc.collect()
    harness.malloc_trim()
    with warnings.catch_warnings(record=True) as w, harness.RssPeak(interval=0.02) as mem:
        warnings.simplefilter("always")
        if library == "datatrace":
            model = copy.deepcopy(wl.model)
            S, t, fitted = harness.fit_attribute(
                DATATRACE[method](st), dt.ClassificationTask(model), [dt.Checkpoint.from_module(model)],
                wl.train, wl.test, batch_size=st.batch_size)  # fmt: skip
            pc = fitted.preconditioners[0] if fitted.preconditioners else None
            notes = [f"{pc.iterations} CG iterations"] if hasattr(pc, "iterations") else []
            del fitted
        elif library == "dattri":
            S, t, notes = dattri_peer.influence(wl, st, method)
        else:
            S, t, notes = kronfluence_peer.ekfac(wl, st)
    msgs: list[str] = []
    for x in w:
        if x.category.__name__ == "InfluenceWarning" or "eigenvalue" in str(x.message):
            m = str(x.message).split(":")[0][:90]
            m = m[:67] + "..." if len(m) > 70 else m
            msgs += [m] if m not in msgs else []
    return S, {**t, "mem_gb": mem.gb}, notes + [f"warning: {m}" for m in msgs]


def influence_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One timed run of one cell in a fresh worker, after a warm-up on 60 x 10 examples (5
    epochs): imports, torch.func, hooks, convolutions and LAPACK, not the full factorization."""
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    wl, st = load_workload(spec["workload"]), InfluenceSettings(**spec["settings"])
    tiny = influence_workload(wl.name.removeprefix("digits-"), 60, 10, True, epochs=5, seed=1)
    influence_run(spec["library"], spec["method"], tiny, st.warm_up(tiny.n_train))
    S, t, notes = influence_run(spec["library"], spec["method"], wl, st)
    return {"S": S, "t": t, "notes": notes}


def finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def influence_row(c: harness.Cell, ref: dict, lam: float) -> dict[str, Any]:
    """A cell as a suite row: agreement r(GN) for the Gauss-Newton-type methods (DataInf,
    EK-FAC), r(H) otherwise (r(H), r(GN) and the scale both kept); None where not finite."""
    S = c.scores[0] if c.scores else None
    r_h, bad = harness.per_query_pearson(S, ref["H"]) if S is not None else (None, 0)
    r_gn = harness.per_query_pearson(S, ref["GN"])[0] if S is not None else None
    gn = c.spec["gn"]
    notes = ([f"error: {c.error}"] if c.error else []) + c.notes
    notes += [f"{bad} queries with NaN/inf scores (excluded from r)"] if bad else []
    notes += ["busy machine during a run"] if c.busy() else []
    return harness.row(
        workload=c.workload, method=c.method, library=c.library, seconds=c.median(),
        peak_mem_gb=finite(max(c.runs["mem_gb"])) if c.runs else None,
        agreement=finite(r_gn if gn else r_h), agreement_with="Gauss-Newton IF float64" if gn else "exact IF float64",
        note="; ".join(notes), damping=float(lam), api=c.spec["api"], pearson_H=r_h,
        pearson_GN=r_gn, fit_s=c.median("fit"), attribute_s=c.median("attribute"),
        scale=harness.lsq_scale(S, ref["GN" if gn else "H"]) if S is not None else None,
    )  # fmt: skip


def check_reference(wl: Workload, lam: float, ind: Any, check: Any) -> tuple[dict, dict]:
    """The float64 references at ``lam`` and what is known of them (spectrum, checks)."""
    ref = influence_references(wl, lam)
    ev, H = ind.evals, ref["H"]
    info = {"hessian_eig_min": float(ev.min()), "hessian_eig_max": float(ev.max()),
            "n_eig_below_minus_lam": int((ev + lam <= 0).sum()), "ref_seconds": ref["seconds"],
            "ref_warnings": ref["H_warnings"], "pearson_GN_vs_H": harness.per_query_pearson(ref["GN"], H)[0],
            "independent_check": {"pearson": harness.per_query_pearson(check, H)[0],
                                  "max_rel_err": harness.max_rel_err(check, H)}}  # fmt: skip
    print(f"reference (float64, untimed): H eigenvalues in [{info['hessian_eig_min']:.4g}, "
          f"{info['hessian_eig_max']:.4g}], {info['n_eig_below_minus_lam']} with eig + lam <= 0; "
          f"warnings: {ref['H_warnings'] or 'none'}; r(GN reference vs exact-H reference) = "
          f"{info['pearson_GN_vs_H']:.4f}; independent check (torch.func.hessian + linalg.solve): "
          f"r = {info['independent_check']['pearson']:.6f}, max rel err "
          f"{info['independent_check']['max_rel_err']:.1e}", flush=True)  # fmt: skip
    return ref, info


def main(argv: list[str] | None = None) -> int:
    ap = harness.arg_parser(__doc__, "datatrace,dattri,kronfluence", batch_size=None)
    ap.add_argument("--workload", choices=("mlp", "cnn"), default="mlp")
    ap.add_argument("--dampings", default="0.01", help="comma-separated lam (mean-loss convention)")
    ap.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {','.join(METHODS)}",
    )
    ap.add_argument(
        "--cg-iters", default=None, help="matched CG iteration counts (default 20,100; quick 5,30)"
    )
    args = harness.parse_args(ap, argv)
    if args.worker:
        return harness.worker_main(args.worker, influence_worker)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    q = args.quick
    wl = influence_workload(args.workload, 100 if q else 500, 20 if q else 100, quick=q)
    methods = [x.strip().lower() for x in args.methods.split(",") if x.strip()]
    if unknown := set(methods) - set(METHODS):
        ap.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    libs = set(harness.libraries(ap, args.libraries, ("datatrace", "dattri", "kronfluence"))) | {
        "datatrace"
    }
    rank = 20 if q else 50
    base = dict(batch_size=args.batch_size or wl.n_train, lissa_depth=200 if q else 1000,
                lissa_batch=min(50, wl.n_train), arnoldi_rank=rank, arnoldi_iter=min(wl.n_params, 2 * rank + 20))  # fmt: skip
    cg_iters = [int(x) for x in (args.cg_iters or ("5,30" if q else "20,100")).split(",")]
    env = harness.environment(("dattri", "kronfluence"), dtype="float32", repeats=args.repeats,
                              slow_threshold_s=SLOW_S, quick=q, workload=wl.describe(),
                              workload_name=wl.name, batch_size=base["batch_size"])  # fmt: skip
    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    dampings = [float(x) for x in args.dampings.split(",")]
    ind = independent(wl)
    checks = {lam: ind.scores(lam) for lam in dampings}
    ind.H = None  # 740 MB in float64 for the MLP: only the spectrum and the scores are kept
    print(f"independent float64 Hessian + spectrum (untimed): {ind.seconds:.1f}s", flush=True)
    out: dict[str, Any] = {
        "environment": env,
        "references": {},
        "settings": {},
        "cells": [],
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-influence-") as tmp:
        wl_path = os.path.join(tmp, "workload.pt")
        save_workload(wl, wl_path)
        for lam in dampings:
            print(f"\n=== damping lam = {lam:g} (mean-loss convention) ===", flush=True)
            ref, out["references"][str(lam)] = check_reference(wl, lam, ind, checks[lam])
            st = InfluenceSettings(
                lam, lissa_scale=1.5 * float((ind.evals + lam).abs().max()), **base
            )
            cells = []  # one per (method, matched CG iteration count, library)
            for m in methods:
                method, apis, gn = METHODS[m]
                variants = (
                    [(f"cg{k}", dataclasses.replace(st, cg_iters=k)) for k in cg_iters]
                    if m == "cg"
                    else [(m, st)]
                )
                cells += [harness.Cell(wl.name, key, lib, {"method": method, "api": api, "settings": s, "gn": gn})
                          for key, s in variants for lib, api in apis if lib in libs]  # fmt: skip
            run = harness.in_workers(__file__, args.max_wait, lambda c, _: {
                "workload": wl_path, "settings": c.spec["settings"].__dict__, "library": c.library,
                "method": c.spec["method"], "threads": args.threads})  # fmt: skip
            harness.time_cells(cells, args.repeats, run, SLOW_S)
            out["settings"][str(lam)] = st.__dict__
            out["cells"] += [c.record() for c in cells]
            out["rows"] += [influence_row(c, ref, lam) for c in cells]
    harness.print_rows(out["rows"])
    if (end := harness.src_state()) != env["datatrace_src"]:
        print(
            f"\nWARNING: datatrace sources changed during the run (-> {end}); workers may have run different code"
        )
        env["datatrace_src_end"] = end
    harness.write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
