#!/usr/bin/env python
"""Influence functions: datatrace vs dattri 0.3.0 and kronfluence 1.0.1, against float64 truth.

    python bench/bench_influence.py [--workload mlp|cnn] [--quick] [--dampings 0.01,0.1]
                                    [--methods exact,cg,...]

Every peer is converted (:mod:`peers`) to ``S[j, i] = (1/n) q_j^T (H + lam I)^{-1} g_i``,
H the Hessian of the MEAN training loss. Row ``agreement``: mean per-query Pearson with
datatrace ``GaussNewton`` (DataInf, EK-FAC) or ``ExactHessian`` (the rest) in float64
(:mod:`influence_reference`). Every run is a fresh worker. Details: bench/README.md.
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
from dataclasses import dataclass, field
from typing import Any

import harness
import torch
from agreement import lsq_scale, per_query_pearson
from influence_reference import independent, references
from peers import dattri_peer, kronfluence_peer
from settings import InfluenceSettings
from workloads import Workload, digits_workload, load_workload, save_workload

import datatrace as dt

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
    "CG": lambda st: dt.Influence(
        dt.ConjugateGradient(damping=st.damping, max_iter=st.cg_iters, tol=1e-30)),
    "LiSSA": lambda st: dt.Influence(dt.LiSSA(damping=st.damping, scale=st.lissa_scale,
                                              depth=st.lissa_depth, repeat=1,
                                              batch_size=st.lissa_batch)),
    "Arnoldi": lambda st: dt.Influence(
        dt.Arnoldi(rank=st.arnoldi_rank, damping=st.damping, n_iter=st.arnoldi_iter)),
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


def datatrace_influence(wl: Workload, st: InfluenceSettings, method: str) -> tuple:
    model = copy.deepcopy(wl.model)
    task, ckpts = dt.ClassificationTask(model), [dt.Checkpoint.from_module(model)]
    attributor = DATATRACE[method](st)
    S, t, fitted = harness.fit_attribute(attributor, task, ckpts, wl.train, wl.test,
                                         batch_size=st.batch_size)  # fmt: skip
    pc = fitted.preconditioners[0] if fitted.preconditioners else None
    notes = [f"{pc.iterations} CG iterations"] if hasattr(pc, "iterations") else []
    del fitted
    gc.collect()
    return S, t, notes


def run_cell(library: str, method: str, wl: Workload, st: InfluenceSettings) -> tuple:
    """(S, times + mem_gb, notes + the warnings about curvature it raised)."""
    gc.collect()
    harness.malloc_trim()
    with warnings.catch_warnings(record=True) as w, harness.RssPeak(interval=0.02) as mem:
        warnings.simplefilter("always")
        if library == "datatrace":
            S, t, notes = datatrace_influence(wl, st, method)
        elif library == "dattri":
            S, t, notes = dattri_peer.influence(wl, st, method)
        else:
            S, t, notes = kronfluence_peer.ekfac(wl, st)
    t["mem_gb"] = mem.gb
    msgs: list[str] = []
    for x in w:
        if x.category.__name__ == "InfluenceWarning" or "eigenvalue" in str(x.message):
            m = str(x.message).split(":")[0][:90]
            m = m[:67] + "..." if len(m) > 70 else m
            msgs += [m] if m not in msgs else []
    return S, t, notes + [f"warning: {m}" for m in msgs]


@dataclass
class InfluenceCell:
    method: str  # exact, CG, LiSSA, Arnoldi, DataInf, EK-FAC
    variant: str  # settings label
    library: str
    api: str
    settings: InfluenceSettings
    gn_type: bool = False
    times: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    S: torch.Tensor | None = None
    error: str | None = None


def build_cells(methods: list[str], libs: set[str], base: InfluenceSettings,
                cg_iters: list[int]) -> list[InfluenceCell]:  # fmt: skip
    cells = []
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {sorted(METHODS)}")
        method, apis, gn = METHODS[m]
        variants = [("", base)]
        if m == "cg":
            variants = [(f"iters={k}", dataclasses.replace(base, cg_iters=k)) for k in cg_iters]
        elif m == "lissa":
            variants = [
                (f"D={base.lissa_depth},B={base.lissa_batch},s={base.lissa_scale:.3g}", base)
            ]
        elif m == "arnoldi":
            variants = [(f"r={base.arnoldi_rank},it={base.arnoldi_iter}", base)]
        cells += [InfluenceCell(method, variant, lib, api, st, gn)
                  for variant, st in variants for lib, api in apis if lib in libs]  # fmt: skip
    return cells


def tiny_workload(kind: str) -> Workload:
    """60 x 10 examples, 5 epochs: warms imports, torch.func, hooks, convolutions and LAPACK
    in a fresh worker without the full-size factorization."""
    return influence_workload(kind, 60, 10, quick=True, epochs=5, seed=1)


def influence_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One timed run of one cell in a fresh worker process, after a warm-up on tiny data."""
    torch.set_num_threads(spec["threads"])
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    wl, st = load_workload(spec["workload"]), InfluenceSettings(**spec["settings"])
    tiny = tiny_workload(wl.name.removeprefix("digits-"))
    run_cell(spec["library"], spec["method"], tiny, st.warm_up(tiny.n_train))
    gc.collect()
    S, t, notes = run_cell(spec["library"], spec["method"], wl, st)
    return {"S": S, "t": t, "notes": notes}


def time_cells(cells: list[InfluenceCell], wl_path: str, args: Any) -> None:
    """Interleaved timed runs of every cell, each in a fresh worker."""
    for rep in range(args.repeats):
        for c in cells:
            if c.error is not None or (rep > 0 and c.times["total"][0] > args.slow_threshold):
                continue
            label = f"  {c.method:7s} {c.variant:22s} {c.library:11s}"
            spec = {"workload": wl_path, "settings": c.settings.__dict__, "library": c.library,
                    "method": c.method, "threads": args.threads}  # fmt: skip
            try:
                d, others = harness.measured(__file__, spec, args.max_wait)
            except Exception as exc:
                c.error = harness.error_text(exc)[:400]
                print(f"{label} ERROR {c.error}")
                continue
            t = {**d["t"], "others_cores": others}
            for k, v in t.items():
                c.times.setdefault(k, []).append(v)
            if c.S is None:
                c.S, c.notes = d["S"], d["notes"]
            print(f"{label} run {rep + 1} {t['total']:8.2f}s (fit {t['fit']:.2f}, attribute "
                  f"{t['attribute']:.2f})", flush=True)  # fmt: skip


def result_rows(cells: list[InfluenceCell], ref: dict, lam: float) -> list[dict[str, Any]]:
    def median(c: InfluenceCell, key: str) -> float:
        return harness.clean_median(c.times[key], c.times["others_cores"])

    dt_time = {(c.method, c.variant): median(c, "total")
               for c in cells if c.library == "datatrace" and c.times}  # fmt: skip
    rows = []
    for c in cells:
        r: dict[str, Any] = {"damping": lam, "method": c.method, "variant": c.variant,
                             "library": c.library, "api": c.api, "error": c.error, "notes": c.notes}  # fmt: skip
        if c.times:
            r_h, bad = per_query_pearson(c.S, ref["H"])
            ref_t = dt_time.get((c.method, c.variant))
            r.update(
                n_runs=len(c.times["total"]), median_s=median(c, "total"),
                min_s=min(c.times["total"]), fit_s=median(c, "fit"),
                attribute_s=median(c, "attribute"), mem_gb=max(c.times["mem_gb"]),
                runs_s=c.times["total"], others_cores=c.times["others_cores"],
                ratio=median(c, "total") / ref_t if ref_t else float("nan"), pearson_H=r_h,
                pearson_GN=per_query_pearson(c.S, ref["GN"])[0], nonfinite_rows=bad,
                scale_vs_H=lsq_scale(c.S, ref["GN"] if c.gn_type else ref["H"]),
                scale_ref="GN" if c.gn_type else "H", gn_type=c.gn_type,
            )  # fmt: skip
        rows.append(r)
    return rows


def notes_of(r: dict[str, Any]) -> list[str]:
    notes = ([f"error: {r['error']}"] if r["error"] else []) + list(r["notes"])
    if r.get("nonfinite_rows"):
        notes.append(f"{r['nonfinite_rows']} queries with NaN/inf scores (excluded from r)")
    if any(x > harness.BUSY_LIMIT for x in r.get("others_cores", [])):
        notes.append("busy machine during a run")
    return notes


def json_row(workload: str, r: dict[str, Any], cg_iters: int) -> dict[str, Any]:
    """A ``results`` row as a suite row: r(GN) for the Gauss-Newton-type methods (DataInf,
    EK-FAC), r(H) otherwise; None where the cell failed or the value is not finite."""
    key = {"exact": "exact", "LiSSA": "lissa", "Arnoldi": "arnoldi", "DataInf": "datainf",
           "EK-FAC": "ekfac"}.get(r["method"], f"cg{cg_iters}")  # fmt: skip
    gn = r["method"] in ("DataInf", "EK-FAC")
    agreement = r.get("pearson_GN" if gn else "pearson_H")
    mem = r.get("mem_gb")
    return harness.row(
        workload=workload, method=key, library=r["library"], seconds=r.get("median_s"),
        peak_mem_gb=mem if mem is not None and math.isfinite(mem) else None,
        agreement=agreement if agreement is not None and math.isfinite(agreement) else None,
        agreement_with="Gauss-Newton IF float64" if gn else "exact IF float64",
        note="; ".join(notes_of(r)), damping=float(r["damping"]),
    )  # fmt: skip


def check_reference(wl: Workload, lam: float, ind: Any, check: torch.Tensor) -> tuple[dict, dict]:
    """The float64 references at ``lam`` and what is known of them (spectrum, checks)."""
    ref = references(wl, lam)
    ev = ind.evals
    info = {"hessian_eig_min": float(ev.min()), "hessian_eig_max": float(ev.max()),
            "n_eig_below_minus_lam": int((ev + lam <= 0).sum()), "ref_seconds": ref["seconds"],
            "ref_warnings": ref["H_warnings"],
            "pearson_GN_vs_H": per_query_pearson(ref["GN"], ref["H"])[0],
            "independent_check": {"pearson": per_query_pearson(check, ref["H"])[0],
                                  "max_rel_err": float((check.double() - ref["H"].double()).abs().max()
                                                       / ref["H"].abs().max())}}  # fmt: skip
    print(f"reference (float64, untimed): H eigenvalues in [{info['hessian_eig_min']:.4g}, "
          f"{info['hessian_eig_max']:.4g}], {info['n_eig_below_minus_lam']} with eig + lam <= 0; "
          f"datatrace exact {ref['seconds']['exact_f64']:.1f}s, GN {ref['seconds']['gn_f64']:.1f}s;"
          f" warnings: {ref['H_warnings'] or 'none'}\n  r(GN reference vs exact-H reference) = "
          f"{info['pearson_GN_vs_H']:.4f}\n  independent float64 check of the exact reference "
          f"(torch.func.hessian + linalg.solve): r = {info['independent_check']['pearson']:.6f}, "
          f"max rel err {info['independent_check']['max_rel_err']:.1e}", flush=True)  # fmt: skip
    return ref, info


def options(argv: list[str] | None) -> Any:
    ap = harness.arg_parser(__doc__, "datatrace,dattri,kronfluence", batch_size=None)
    ap.add_argument("--workload", choices=("mlp", "cnn"), default="mlp")
    ap.add_argument("--slow-threshold", type=float, default=60.0,
                    help="a cell whose first run exceeds this many seconds runs only once")  # fmt: skip
    ap.add_argument("--dampings", default="0.01", help="comma-separated lam (mean-loss convention)")
    ap.add_argument("--methods", default="exact,cg,lissa,arnoldi,datainf,ekfac")
    ap.add_argument("--cg-iters", default=None, help="matched CG iteration counts (default 20,100)")
    ap.add_argument("--lissa-depth", type=int, default=None, help="default 1000 (quick 200)")
    ap.add_argument("--lissa-batch", type=int, default=50)
    ap.add_argument("--lissa-scale", type=float, default=None,
                    help="default 1.5 x largest |eig(H + lam)|")  # fmt: skip
    ap.add_argument("--arnoldi-rank", type=int, default=None, help="default 50 (quick 20)")
    ap.add_argument("--arnoldi-iter", type=int, default=None, help="default 2 x rank + 20")
    return harness.parse_args(ap, argv)


def solver_settings(args: Any, wl: Workload) -> tuple[list[int], dict[str, Any]]:
    """Matched CG iteration counts, and the settings every damping shares."""
    q = args.quick
    rank = args.arnoldi_rank or (20 if q else 50)
    base = dict(batch_size=args.batch_size or wl.n_train, lissa_depth=args.lissa_depth or (200 if q else 1000),
                lissa_batch=min(args.lissa_batch, wl.n_train), arnoldi_rank=rank,
                arnoldi_iter=args.arnoldi_iter or min(wl.n_params, 2 * rank + 20))  # fmt: skip
    return [int(x) for x in (args.cg_iters or ("5,30" if q else "20,100")).split(",")], base


def main(argv: list[str] | None = None) -> int:
    args = options(argv)
    if args.worker:
        return harness.worker_main(args.worker, influence_worker)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    q = args.quick
    wl = influence_workload(args.workload, 100 if q else 500, 20 if q else 100, quick=q)
    cg_iters, base = solver_settings(args, wl)
    env = harness.environment(("dattri", "kronfluence"), dtype="float32", repeats=args.repeats,
                              slow_threshold_s=args.slow_threshold, quick=q, workload=wl.describe(),
                              workload_name=wl.name, batch_size=base["batch_size"])  # fmt: skip
    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    dampings = [float(x) for x in args.dampings.split(",")]
    ind = independent(wl)
    checks = {lam: ind.scores(lam) for lam in dampings}
    ind.H = None  # 740 MB in float64 for the MLP: only the spectrum and the scores are kept
    print(f"independent float64 Hessian + spectrum (untimed): {ind.seconds:.1f}s", flush=True)
    libs = {x for x in args.libraries.split(",") if x} | {"datatrace"}
    methods = [x.strip().lower() for x in args.methods.split(",") if x.strip()]
    out: dict[str, Any] = {"environment": env, "references": {}, "results": [], "rows": []}
    with tempfile.TemporaryDirectory(prefix="bench-influence-") as tmp:
        wl_path = os.path.join(tmp, "workload.pt")
        save_workload(wl, wl_path)
        for lam in dampings:
            print(f"\n=== damping lam = {lam:g} (mean-loss convention) ===", flush=True)
            ref, out["references"][str(lam)] = check_reference(wl, lam, ind, checks[lam])
            top = float((ind.evals + lam).abs().max())
            st = InfluenceSettings(
                lam, lissa_scale=args.lissa_scale or 1.5 * top, top_eig=top, **base
            )
            cells = build_cells(methods, libs, st, cg_iters)
            time_cells(cells, wl_path, args)
            rows = result_rows(cells, ref, lam)
            out["results"] += rows
            out["rows"] += [
                json_row(wl.name, r, c.settings.cg_iters) for r, c in zip(rows, cells, strict=True)
            ]
    harness.print_rows(out["rows"])
    if (end := harness.src_state()) != env["datatrace_src"]:
        print(f"\nWARNING: datatrace sources changed during the run (-> {end}); workers may "
              "have run different code")  # fmt: skip
        env["datatrace_src_end"] = end
    harness.write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
