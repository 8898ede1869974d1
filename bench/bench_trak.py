#!/usr/bin/env python
"""TRAK: datatrace vs traker 0.3.2 (``TRAKer``) and dattri 0.3.0 (``TRAKAttributor``), CPU.

    python bench/bench_trak.py [--quick] [--workloads small,cnn] [--proj-dim K] [--damping LAM]

Every peer is converted (:mod:`peers`) to datatrace's TRAK at one ridge lam (default lam0);
agreement: mean per-query Pearson with the unprojected float64 reference
(:mod:`trak_reference`), run r with projection seed r in every library; every run a fresh
worker. Details: bench/README.md.
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
from dataclasses import dataclass, field
from typing import Any

import harness
import torch
from agreement import lsq_scale, per_query_pearson
from peers import dattri_peer, traker_peer
from settings import TrakSettings
from trak_reference import datatrace_unprojected, kernels
from workloads import (
    Workload,
    augmented_digits_workload,
    load_workload,
    save_workload,
    small_mlp_workload,  # fmt: skip
)

import datatrace as dt

API = {"datatrace": "dt.TRAK", "traker": "TRAKer", "dattri": "TRAKAttributor"}


def strict_pearson(S: torch.Tensor, R: torch.Tensor) -> float:
    """Mean per-query Pearson; NaN if any score is not finite."""
    r, bad = per_query_pearson(S, R)
    return float("nan") if bad else r


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
    torch.set_num_threads(spec["threads"])
    warnings.filterwarnings("ignore")
    wl, st = load_workload(spec["workload"]), TrakSettings(**spec["settings"])
    run = RUNNERS[spec["library"]]
    run(wl.subset(64, 8), dataclasses.replace(st, proj_dim=min(32, st.proj_dim)))
    gc.collect()
    with harness.RssPeak() as mem:
        S, t = run(wl, st)
    return {"S": S, "t": {**t, "mem_gb": mem.gb}}


@dataclass
class Prepared:
    """A workload saved for the workers, its settings, its reference and untimed checks."""

    wl: Workload
    path: str
    settings: TrakSettings
    reference: torch.Tensor
    info: dict[str, Any]


def prepare(wl: Workload, tmpdir: str, args: Any, proj_dim: int) -> Prepared:
    path = os.path.join(tmpdir, f"{wl.name}.pt")
    save_workload(wl, path)
    kern = kernels(wl)
    lam = args.damping if args.damping is not None else kern.lam0
    info: dict[str, Any] = {
        "describe": wl.describe(), "n_params": wl.n_params, "damping": lam, "lam0": kern.lam0,
        "traker_lambda_reg": wl.n_train * proj_dim * lam / wl.n_params,
        "dattri_regularization": wl.n_train * lam / wl.n_params,
        "reference": "float64 TRAK without projection, kernel form, same damping",
        "reference_s": kern.seconds,
    }  # fmt: skip
    ref = kern.scores(lam)
    del kern
    # the kernel form vs datatrace's own unprojected TRAK on the last layer (cheap there)
    t0 = time.perf_counter()
    part = wl.subset(min(wl.n_train, 1_000), min(wl.n_test, 100))
    r_dt = datatrace_unprojected(part, lam, params=("fc2",))
    r_kern = kernels(part, params=("fc2",)).scores(lam)
    info["reference_check"] = {
        "params": ["fc2"], "n_train": part.n_train, "n_test": part.n_test,
        "pearson": strict_pearson(r_kern, r_dt), "scale": lsq_scale(r_kern, r_dt),
        "max_rel_err": float((r_kern - r_dt).abs().max() / r_dt.abs().max()),
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip
    chk = info["reference_check"]
    print(f"workload {wl.describe()}\n  lam = {lam:.4g} (lam0 {info['lam0']:.4g}); traker "
          f"lambda_reg {info['traker_lambda_reg']:.4g}, dattri regularization "
          f"{info['dattri_regularization']:.4g}; reference {info['reference_s']:.1f}s\n"
          f"  reference vs datatrace TRAK(projection_dim=None) float64 on fc2 ({chk['n_train']} x "
          f"{chk['n_test']}): Pearson {chk['pearson']:.6f}, scale {chk['scale']:.6f}", flush=True)  # fmt: skip
    return Prepared(wl, path, TrakSettings(proj_dim, lam, args.batch_size), ref, info)


@dataclass
class TrakCell:
    library: str
    runs_s: list[float] = field(default_factory=list)
    mem_gb: list[float] = field(default_factory=list)
    others: list[float] = field(default_factory=list)  # cores used by other processes
    phases: dict[str, list[float]] = field(default_factory=dict)
    agreement: list[float] = field(default_factory=list)  # with the reference, one per seed
    scale: list[float] = field(default_factory=list)
    scores: list[torch.Tensor] = field(default_factory=list)  # seeds 0 and 1
    error: str | None = None

    def median(self) -> float | None:
        return harness.clean_median(self.runs_s, self.others) if self.runs_s else None


def run_cells(prep: Prepared, libs: list[str], args: Any, repeats: int) -> dict[str, TrakCell]:
    cells = {lib: TrakCell(lib) for lib in libs}
    for rep in range(repeats):  # interleaved: repeat r of every library, then r + 1
        st = dataclasses.replace(prep.settings, seed=rep)
        for lib, cell in ((lib, c) for lib, c in cells.items() if not c.error):
            label = f"  {prep.wl.name:5s} run {rep + 1}/{repeats} {lib:9s}"
            spec = {"workload": prep.path, "library": lib, "settings": st.__dict__,
                    "threads": args.threads}  # fmt: skip
            try:
                d, others = harness.measured(__file__, spec, args.max_wait)
            except Exception as e:  # a failing peer is recorded, not fatal
                cell.error = f"{type(e).__name__}: {e}"[:300]
                print(f"{label} FAILED: {cell.error}", flush=True)
                continue
            S, t = d["S"], d["t"]
            cell.others.append(others)
            cell.runs_s.append(t["total"])
            cell.mem_gb.append(t["mem_gb"])
            for k, v in t.items():
                cell.phases.setdefault(k, []).append(v)
            cell.agreement.append(strict_pearson(S, prep.reference))
            cell.scale.append(lsq_scale(S, prep.reference))
            cell.scores += [S] if rep < 2 else []
            busy = (
                f"  (busy: others used {cell.others[-1]:.2f} cores)"
                if cell.others[-1] > harness.BUSY_LIMIT
                else ""
            )
            print(f"{label} {t['total']:8.2f}s  mem {t['mem_gb']:5.2f} GB  r(ref) "
                  f"{cell.agreement[-1]:.4f}{busy}", flush=True)  # fmt: skip
    return cells


def summarize(prep: Prepared, cells: dict[str, TrakCell]) -> tuple[list[dict], list[dict]]:
    """The JSON rows and per-cell details; adds the pairwise agreement (seed 0) to info."""
    dt_cell = cells.get("datatrace")
    dt_med = dt_cell.median() if dt_cell else None
    dt_S = dt_cell.scores[0] if dt_cell and dt_cell.scores else None
    done = [c for c in cells.values() if c.scores]
    prep.info["pairwise_seed0"] = {f"{a.library}~{b.library}": strict_pearson(a.scores[0], b.scores[0])
                                   for i, a in enumerate(done) for b in done[i + 1 :]}  # fmt: skip
    rows, details = [], []
    for lib, c in cells.items():
        med = c.median()
        vs_dt = None
        if c.scores and dt_S is not None:
            vs_dt = 1.0 if lib == "datatrace" else strict_pearson(c.scores[0], dt_S)
        busy = sum(o > harness.BUSY_LIMIT for o in c.others)
        note = ([c.error] if c.error else []) + (
            ["non-finite scores"] if any(x != x for x in c.agreement) else []
        )
        note += [f"{busy}/{len(c.others)} runs disturbed by other processes"] if busy else []
        rows.append(harness.row(
            workload=prep.wl.name, method="trak", library=lib, seconds=med,
            peak_mem_gb=statistics.median(c.mem_gb) if c.mem_gb else None,
            agreement=statistics.fmean(c.agreement) if c.agreement else None,
            agreement_with=f"{prep.info['reference']} (lam={prep.settings.damping:.4g})",
            note="; ".join(note)))  # fmt: skip
        details.append({
            "workload": prep.wl.name, "library": lib, "api": API[lib],
            "ratio": med / dt_med if med is not None and dt_med else None, "runs_s": c.runs_s,
            "phases_s": c.phases, "mem_gb": c.mem_gb, "others_cores": c.others,
            "agreement_per_seed": c.agreement, "scale_per_seed": c.scale,
            "agreement_with_datatrace_seed0": vs_dt,
            "seed0_vs_seed1": strict_pearson(c.scores[0], c.scores[1]) if len(c.scores) > 1 else None,
        })  # fmt: skip
    return rows, details


def main(argv: list[str] | None = None) -> int:
    ap = harness.arg_parser(__doc__, ",".join(RUNNERS), repeats=None, max_wait=30.0)
    ap.add_argument("--workloads", default="small,cnn", help="comma-separated: small,cnn")
    ap.add_argument("--proj-dim", type=int, default=None, help="k (default 512; quick 128)")
    ap.add_argument("--damping", type=float, default=None, help="lam (default lam0)")
    args = harness.parse_args(ap, argv)
    if args.worker:
        return harness.worker_main(args.worker, trak_worker)
    torch.set_num_threads(args.threads)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    proj_dim = args.proj_dim or (128 if args.quick else 512)
    libs = [x for x in args.libraries.split(",") if x]
    if unknown := set(libs) - set(RUNNERS):
        ap.error(f"unknown libraries {sorted(unknown)}; choose from {', '.join(RUNNERS)}")
    if args.damping is not None and args.damping <= 0:
        ap.error("--damping must be > 0 (the unprojected reference needs a ridge)")
    warnings.filterwarnings("ignore", category=UserWarning)
    env = harness.environment(("traker", "dattri"), dtype="float32 (reference float64)",
                              proj_dim=proj_dim, batch_size=args.batch_size, repeats=repeats,
                              quick=args.quick)  # fmt: skip
    t_start = time.perf_counter()
    rows, details, preps = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-trak-") as tmp:
        for name in args.workloads.split(","):
            wl = trak_workload(name, args.quick)
            if proj_dim >= wl.n_train:
                ap.error(f"--proj-dim {proj_dim} must be < n_train = {wl.n_train}")
            preps.append(prepare(wl, tmp, args, proj_dim))
        print(f"prepared in {time.perf_counter() - t_start:.0f}s (untimed)", flush=True)
        for prep in preps:
            r, d = summarize(prep, run_cells(prep, libs, args, repeats))
            rows, details = rows + r, details + d
    harness.print_rows(rows)
    for p in preps:
        pairs = ", ".join(f"{k} {v:.4f}" for k, v in p.info["pairwise_seed0"].items())
        print(f"{p.wl.name}: pairwise (seed 0) {pairs}")
    total_s = time.perf_counter() - t_start
    print(f"total {total_s:.0f}s")
    harness.write_json(args.json, {"environment": env, "rows": rows, "details": details,
                                   "workloads": {p.wl.name: p.info for p in preps},
                                   "total_seconds": total_s})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
