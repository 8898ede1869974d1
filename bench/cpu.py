#!/usr/bin/env python
"""datatrace vs its peers, one component at a time: TracIn, influence, TRAK, scale, LOO.

    python bench/cpu.py tracin [--quick] [--workloads small,large]
    python bench/cpu.py tracin --workloads resnet9 --device cuda \\
        --libraries datatrace,datatrace-tf32,datatrace-bf16,captum,dattri,vmap   # GPU anchor
    python bench/cpu.py influence [--workloads mlp|cnn] [--dampings 0.01,0.1]
                                  [--methods exact,cg,lissa,arnoldi,datainf,ekfac] [--cg-iters 20,100]
    python bench/cpu.py trak [--workloads small,cnn]
    python bench/cpu.py scale [--block 4]
    python bench/cpu.py loo [--n-left-out 40]

A component (:data:`COMPONENTS`): its workloads, a ``bench`` laying out the cells (method x
library) and their agreement references, a ``call`` running one cell once (datatrace's
``fit`` + ``attribute`` or a ``peers/`` adapter) through :func:`work` (warm-up, then the
call under an RSS sampler). Workloads, references, settings, timing: bench/README.md.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import harness
import torch
from harness import Cell, lsq_scale, per_query_pearson, row
from internals import logistic_regression_problem, mlp_problem
from peers import (
    InfluenceSettings,
    TrakSettings,
    captum_peer,
    dattri_peer,
    kronfluence_peer,
    traker_peer,
)
from references import (
    check_influence_reference,
    datatrace_unprojected,
    independent,
    kernels,
    per_example_grads,
)
from torch import nn
from workloads import (
    Workload,
    augmented_digits_workload,
    batches,
    digits_workload,
    load_workload,
    resnet9_workload,
    save_workload,
    scale_workload,
    small_mlp_workload,
)

import datatrace as dt

Scores = tuple[Any, dict[str, Any], list[str]]  # (S, measurements with "total", notes)


def work(spec: dict[str, Any]) -> dict[str, Any]:
    """One timed run of one cell: the component's warm-up, then ``call`` under
    :class:`harness.RssPeak` (``mem_gb``; ``peak_rss_gb``: ``VmHWM``; ``peak_gpu_gb``)."""
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    comp = COMPONENTS[spec["component"]]
    wl = load_workload(spec["workload"], spec.get("device", "cpu"))
    if comp.warm is not None:
        comp.call(spec["library"], spec["method"], *comp.warm(wl, spec))
    gc.collect()
    harness.malloc_trim()
    cuda = wl.train[0].device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with harness.RssPeak() as mem:
        S, t, notes = comp.call(spec["library"], spec["method"], wl, spec)
    t = {**t, "mem_gb": mem.gb, "peak_rss_gb": harness.peak_rss_gb()}
    if cuda:
        t["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return {"S": S.cpu() if isinstance(S, torch.Tensor) else S, "t": t, "notes": notes}


def runner(args: Any, path: str, per_run: Callable | None = None) -> harness.Runner:
    """Run r of a cell: :func:`work` on its spec (``rep`` = r), in a fresh worker or
    (``comp.fresh`` false) here; ``per_run(S)`` adds measurements of every run's scores."""
    comp = COMPONENTS[args.component]

    def spec(c: Cell, rep: int) -> dict[str, Any]:
        return {**c.spec, "component": args.component, "workload": path, "rep": rep,
                "library": c.library, "method": c.spec.get("method", c.method),
                "device": args.device, "threads": args.threads}  # fmt: skip

    run = harness.in_workers(__file__, args.max_wait, spec, 3600, None if comp.fresh else work)

    def run_more(c: Cell, rep: int) -> Scores:
        S, t, notes = run(c, rep)
        return S, {**t, **(per_run(S) if per_run else {})}, notes

    return run_more


def cell_row(c: Cell, agreement: float | None, against: str, notes: list[str], **extra: Any):
    """A cell's row with its largest memory."""
    mem = max(c.runs["mem_gb"]) if c.runs else None
    mem = mem if mem is None or math.isfinite(mem) else None
    return c.row(notes, peak_mem_gb=mem, agreement=agreement, agreement_with=against, **extra)


def stage(wl: Workload, tmp: str) -> str:
    """The workload saved for the runs (fresh workers load it); its description printed."""
    print("workload", wl.describe(), flush=True)
    save_workload(wl, path := os.path.join(tmp, f"{wl.name}.pt"))
    return path


def ckpts_of(wl: Workload, weighted: bool = True) -> list[dt.Checkpoint]:
    return [dt.Checkpoint.from_state_dict(sd, weight=w if weighted else 1.0) for sd, w in wl.ckpts]


# ---- TracIn and Grad-Dot, exact: captum TracInCP, dattri TracInAttributor, a vmap loop ----

PEARSON_MIN = 0.999  # every library computes the same matrix: FAIL below this
DATATRACE = {"datatrace": {}, "datatrace-tf32": {"tf32": True},
             "datatrace-bf16": {"feature_dtype": torch.bfloat16}}  # fmt: skip
TRACIN_API = {("datatrace", "TracIn"): "dt.TracIn", ("datatrace", "GradDot"): "dt.GradDot",
              ("captum", "TracIn"): "TracInCP", ("captum", "GradDot"): "TracInCP(last, lr=1)",
              ("dattri", "TracIn"): "TracInAttributor", ("dattri", "GradDot"): "TracInAttributor(last, w=1)",
              ("vmap", "GradDot"): "vmap(grad) + matmul per block"}  # fmt: skip


def tracin_workload(name: str, quick: bool, device: str) -> Workload:
    if name == "small":
        return dataclasses.replace(small_mlp_workload(), name="digits-mlp")
    if name == "large":
        wl = augmented_digits_workload(2_000, 200) if quick else augmented_digits_workload()
        return dataclasses.replace(wl, name="digits-cnn")
    if name == "resnet9":  # 1.65M parameters, 5,000 x 500 (quick: width 4, 64 x 8)
        return resnet9_workload(*((64, 8, 4) if quick else (5_000, 500, 32)), torch.device(device))
    raise ValueError(f"unknown workload {name!r} (choose from small, large, resnet9)")


def selected(wl: Workload, method: str) -> list[tuple[dict, float]]:
    """TracIn: every checkpoint weighted by its learning rate; Grad-Dot: the last, weight 1."""
    return wl.ckpts if method == "TracIn" else [(wl.ckpts[-1][0], 1.0)]


def vmap_loop(model: nn.Module, train: tuple, test: tuple, batch: int) -> torch.Tensor:
    """The plain baseline (Grad-Dot): ``vmap(grad)`` per-example gradients, query gradients
    held, training gradients block by block, one matmul per block."""
    state = {k: v.detach() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    flat = per_example_grads(model, state, nn.functional.cross_entropy)
    q = torch.cat([flat(x, y) for x, y in batches(test, batch)])
    return torch.cat([q @ flat(x, y).T for x, y in batches(train, batch)], dim=1)


def tracin_call(lib: str, method: str, wl: Workload, spec: dict) -> Scores:
    """datatrace's fit + attribute (also apart); a peer's whole API call."""
    device, bs = wl.train[0].device, spec["batch_size"]
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    model = copy.deepcopy(wl.model)
    if lib in DATATRACE:
        attributor = (dt.TracIn if method == "TracIn" else dt.GradDot)(**DATATRACE[lib])
        big = (
            {"block_size": wl.n_train, "max_memory_bytes": 80 << 30}
            if device.type == "cuda"
            else {}
        )
        S, t, fitted = harness.fit_attribute(attributor, dt.ClassificationTask(model), ckpts_of(wl),
                                             wl.train, wl.test, batch_size=bs, sync=sync, **big)  # fmt: skip
        del fitted  # removes the temporary feature store (not timed)
        return S, t, []
    clock = harness.Clock(sync)
    if lib == "captum":
        S = captum_peer.tracincp(model, wl.train, wl.test, spec["files"], batch_size=bs)
    elif lib == "dattri":
        S = dattri_peer.tracin(model, selected(wl, method), wl.train, wl.test, bs)
    else:
        S = vmap_loop(model, wl.train, wl.test, bs)
    return S, clock.lap(), []


def tracin_warm(wl: Workload, spec: dict) -> tuple[Workload, dict]:
    return wl.subset(min(256, wl.n_train), min(32, wl.n_test)), spec


def tracin_bench(name: str, args: Any, libs: list[str], tmp: str) -> tuple[list, dict]:
    """Pearson of the first run's scores with datatrace's (the scores are deterministic)."""
    wl = tracin_workload(name, args.quick, args.device)
    path, rows, records = stage(wl, tmp), [], []
    for method in ("TracIn", "GradDot") if len(wl.ckpts) > 1 else ("GradDot",):
        files = captum_peer.save_checkpoints(selected(wl, method), tmp, f"{wl.name}-{method}")
        spec = {"batch_size": args.batch_size or 500, "files": files}
        cells = [
            Cell(wl.name, method, lib, spec) for lib in libs if lib != "vmap" or method == "GradDot"
        ]
        harness.time_cells(cells, args.repeats, runner(args, path))
        records += [c.record() for c in cells]
        ref = cells[0].scores[0] if cells[0].scores else None
        for c in cells:
            same = bool(c.scores) and ref is not None and c.scores[0].shape == ref.shape
            r = (1.0 if c is cells[0] else harness.pearson(c.scores[0], ref)) if same else math.nan
            gpu = {"peak_gpu_gb": max(c.runs["peak_gpu_gb"])} if "peak_gpu_gb" in c.runs else {}
            rows.append(cell_row(c, r, "datatrace float32 (same definition, Pearson of S)",
                                 [] if r > PEARSON_MIN else ["FAIL"], **gpu,
                                 rel_err=harness.max_rel_err(c.scores[0], ref) if same else None,
                                 method=method.lower(), api=TRACIN_API.get((c.library, method), c.library)))  # fmt: skip
    return rows, {"describe": wl.describe(), "cells": records}


# ---- influence functions: dattri's IF attributors, kronfluence's EK-FAC, float64 truth ----

# --methods name -> (method, {library: API}, approximates Gauss-Newton rather than H,
#                    datatrace's attributor of the settings)
INFLUENCE: dict[str, tuple[str, dict[str, str], bool, Callable[[InfluenceSettings], Any]]] = {
    "exact": ("exact", {"datatrace": "ExactHessian", "dattri": "IFAttributorExplicit"}, False,
              lambda st: dt.Influence(dt.ExactHessian(damping=st.damping))),
    # tol far below float32 precision: exactly cg_iters iterations, like dattri
    "cg": ("CG", {"datatrace": "ConjugateGradient", "dattri": "IFAttributorCG"}, False,
           lambda st: dt.Influence(dt.ConjugateGradient(damping=st.damping, max_iter=st.cg_iters, tol=1e-30))),
    "lissa": ("LiSSA", {"datatrace": "LiSSA", "dattri": "IFAttributorLiSSA"}, False,
              lambda st: dt.Influence(dt.LiSSA(damping=st.damping, scale=st.lissa_scale, depth=st.lissa_depth,
                                               repeat=1, batch_size=st.lissa_batch))),
    "arnoldi": ("Arnoldi", {"datatrace": "Arnoldi", "dattri": "IFAttributorArnoldi"}, False,
                lambda st: dt.Influence(dt.Arnoldi(rank=st.arnoldi_rank, damping=st.damping, n_iter=st.arnoldi_iter))),
    "datainf": ("DataInf", {"datatrace": "DataInf", "dattri": "IFAttributorDataInf"}, True,
                lambda st: dt.DataInf(damping=st.damping)),
    "ekfac": ("EK-FAC", {"datatrace": "EKFAC", "dattri": "IFAttributorEKFAC", "kronfluence": "Analyzer(ekfac)"},
              True, lambda st: dt.Influence(dt.EKFAC(damping=st.damping))),
}  # fmt: skip
DATATRACE_IF = {method: make for method, _, _, make in INFLUENCE.values()}


def influence_workload(kind: str, quick: bool, n: tuple[int, int] | None = None, epochs: int = 100,
                       seed: int = 0) -> Workload:  # fmt: skip
    """The digits MLP 64-128-10 (quick 64-16-10) or pool CNN 8/16 channels (quick 4/8),
    500 x 100 (quick 100 x 20), one checkpoint after ``epochs`` of SGD at lr 0.1."""
    if kind not in ("mlp", "cnn"):
        raise ValueError(f"unknown workload {kind!r} (choose from mlp, cnn)")
    arch = ({"model": "MLP", "hidden": 16 if quick else 128} if kind == "mlp" else
            {"model": "PoolCNN", "c1": 4 if quick else 8, "c2": 8 if quick else 16})  # fmt: skip
    n_train, n_test = n or ((100, 20) if quick else (500, 100))
    return digits_workload(f"digits-{kind}", arch, n_train, n_test, [0.1], epochs, seed)


def influence_call(lib: str, method: str, wl: Workload, spec: dict) -> Scores:
    """(S, times, notes + the curvature warnings it raised)."""
    st = InfluenceSettings(**spec["settings"])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        if lib == "datatrace":
            model = copy.deepcopy(wl.model)
            S, t, fitted = harness.fit_attribute(
                DATATRACE_IF[method](st), dt.ClassificationTask(model), [dt.Checkpoint.from_module(model)],
                wl.train, wl.test, batch_size=st.batch_size)  # fmt: skip
            pc = fitted.preconditioners[0] if fitted.preconditioners else None
            notes = [f"{pc.iterations} CG iterations"] if hasattr(pc, "iterations") else []
            del fitted
        elif lib == "dattri":
            S, t, notes = dattri_peer.influence(wl, st, method)
        else:
            S, t, notes = kronfluence_peer.ekfac(wl, st)
    msgs: list[str] = []
    for x in w:
        if x.category.__name__ == "InfluenceWarning" or "eigenvalue" in str(x.message):
            m = str(x.message).split(":")[0][:90]
            m = m[:67] + "..." if len(m) > 70 else m
            msgs += [m] if m not in msgs else []
    return S, t, notes + [f"warning: {m}" for m in msgs]


def influence_warm(wl: Workload, spec: dict) -> tuple[Workload, dict]:
    """A tiny model of the same kind, 60 x 10 examples (5 epochs), cheap settings."""
    tiny = influence_workload(wl.name.removeprefix("digits-"), True, (60, 10), epochs=5, seed=1)
    st = InfluenceSettings(**spec["settings"]).warm_up(tiny.n_train)
    return tiny, {**spec, "settings": dataclasses.asdict(st)}


def influence_bench(name: str, args: Any, libs: list[str], tmp: str) -> tuple[list, dict]:
    """Per damping: the float64 references, then every (method, CG iterations, library);
    agreement r(GN) for the Gauss-Newton-type methods (DataInf, EK-FAC), r(H) otherwise."""
    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    wl = influence_workload(name, args.quick)
    path = stage(wl, tmp)
    q, rank = args.quick, 20 if args.quick else 50
    methods = [x.strip().lower() for x in (args.methods or ",".join(INFLUENCE)).split(",")]
    if unknown := set(methods) - set(INFLUENCE):
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {', '.join(INFLUENCE)}")
    cg_iters = [int(x) for x in (args.cg_iters or ("5,30" if q else "20,100")).split(",")]
    base = dict(batch_size=args.batch_size or wl.n_train, lissa_depth=200 if q else 1000,
                lissa_batch=min(50, wl.n_train), arnoldi_rank=rank, arnoldi_iter=min(wl.n_params, 2 * rank + 20))  # fmt: skip
    dampings = [float(x) for x in args.dampings.split(",")]
    ind = independent(wl)
    checks = {lam: ind.scores(lam) for lam in dampings}
    ind.H = None  # 740 MB in float64 for the MLP: only the spectrum and the scores are kept
    refs, info, cells = {}, {}, []
    for lam in dampings:
        refs[lam], info[str(lam)] = check_influence_reference(wl, lam, ind.evals, checks[lam])
        st = InfluenceSettings(lam, lissa_scale=1.5 * float((ind.evals + lam).abs().max()), **base)
        info[str(lam)]["settings"] = dataclasses.asdict(st)
        for m in methods:
            method, apis, gn, _ = INFLUENCE[m]
            variants = (
                [(f"cg{k}", dataclasses.replace(st, cg_iters=k)) for k in cg_iters]
                if m == "cg"
                else [(m, st)]
            )
            cells += [Cell(wl.name, key, lib, {"method": method, "api": api, "settings": dataclasses.asdict(s),
                                               "gn": gn, "damping": lam})
                      for key, s in variants for lib, api in apis.items() if lib in libs]  # fmt: skip
    harness.time_cells(cells, args.repeats, runner(args, path), slow_s=60.0)
    rows = []
    for c in cells:
        ref, S, gn = refs[c.spec["damping"]], (c.scores or [None])[0], c.spec["gn"]
        r_h, bad = per_query_pearson(S, ref["H"]) if S is not None else (None, 0)
        r_gn = per_query_pearson(S, ref["GN"])[0] if S is not None else None
        notes = c.notes + ([f"{bad} queries with NaN/inf scores (excluded from r)"] if bad else [])
        r = r_gn if gn else r_h
        rows.append(cell_row(
            c, r if r is not None and math.isfinite(r) else None, "Gauss-Newton IF float64" if gn else "exact IF float64",
            notes + (["busy machine during a run"] if c.busy() else []), damping=c.spec["damping"],
            api=c.spec["api"], pearson_H=r_h, pearson_GN=r_gn, fit_s=c.median("fit"),
            attribute_s=c.median("attribute"),
            scale=lsq_scale(S, ref["GN" if gn else "H"]) if S is not None else None))  # fmt: skip
    return rows, {
        "describe": wl.describe(),
        "references": info,
        "cells": [c.record() for c in cells],
    }


# ---- TRAK: traker TRAKer, dattri TRAKAttributor, unprojected float64 kernel reference ----

TRAK_RUNNERS = {"traker": traker_peer.trak, "dattri": dattri_peer.trak}
TRAK_API = {"datatrace": "dt.TRAK", "traker": "TRAKer", "dattri": "TRAKAttributor"}


def trak_workload(name: str, quick: bool) -> Workload:
    """The TracIn workloads' MLP (quick: 300 x 50 of it) and the CNN's 5,000 x 500 (quick:
    600 x 100 of the quick CNN's)."""
    if name == "small":
        return small_mlp_workload().subset(300, 50) if quick else small_mlp_workload()
    if name == "cnn":
        cnn = augmented_digits_workload(2_000, 200) if quick else augmented_digits_workload()
        return dataclasses.replace(cnn.subset(*((600, 100) if quick else (5_000, 500))), name="cnn")
    raise ValueError(f"unknown workload {name!r} (choose from small, cnn)")


def trak_call(lib: str, method: str, wl: Workload, spec: dict) -> Scores:
    """Run r projects with seed r in every library."""
    st = TrakSettings(**{**spec["settings"], "seed": spec["rep"]})
    if lib in TRAK_RUNNERS:
        return (*TRAK_RUNNERS[lib](wl, st), [])
    task = dt.ClassificationTask(copy.deepcopy(wl.model))
    attributor = dt.TRAK(projection_dim=st.proj_dim, damping=st.damping, projection_seed=st.seed)
    S, t, _ = harness.fit_attribute(attributor, task, ckpts_of(wl, weighted=False), wl.train, wl.test,
                                    batch_size=st.batch_size)  # fmt: skip
    return S, t, []


def trak_warm(wl: Workload, spec: dict) -> tuple[Workload, dict]:
    settings = {**spec["settings"], "proj_dim": min(32, spec["settings"]["proj_dim"])}
    return wl.subset(64, 8), {**spec, "settings": settings}


def trak_bench(name: str, args: Any, libs: list[str], tmp: str) -> tuple[list, dict]:
    """lam = lam0 (the mean squared margin-gradient entry), k = 512 (quick 128); agreement:
    the mean over runs (seeds) of the per-query Pearson with the float64 kernel reference,
    checked (untimed) against datatrace's unprojected TRAK on the last layer."""
    wl = trak_workload(name, args.quick)
    path, kern = stage(wl, tmp), kernels(wl)
    lam, k = kern.lam0, 128 if args.quick else 512
    ref = kern.scores(lam)
    info: dict[str, Any] = {"describe": wl.describe(), "n_params": wl.n_params, "damping": lam,
                            "traker_lambda_reg": wl.n_train * k * lam / wl.n_params,
                            "dattri_regularization": wl.n_train * lam / wl.n_params, "reference_s": kern.seconds}  # fmt: skip
    part = wl.subset(min(wl.n_train, 1_000), min(wl.n_test, 100))
    r_dt = datatrace_unprojected(part, lam, params=("fc2",))
    r_kern = kernels(part, params=("fc2",)).scores(lam)
    chk = info["reference_check"] = {"params": ["fc2"], "n_train": part.n_train, "n_test": part.n_test,
                                     "pearson": per_query_pearson(r_kern, r_dt, strict=True)[0],
                                     "scale": lsq_scale(r_kern, r_dt)}  # fmt: skip
    print(f"  lam = lam0 = {lam:.4g}; reference {kern.seconds:.1f}s; "
          f"vs datatrace TRAK(projection_dim=None) float64 on fc2 ({part.n_train} x {part.n_test}): "
          f"Pearson {chk['pearson']:.6f}, scale {chk['scale']:.6f}", flush=True)  # fmt: skip
    st = TrakSettings(k, lam, args.batch_size or 500)

    def per_run(S):
        return {
            "agreement": per_query_pearson(S, ref, strict=True)[0],
            "scale": lsq_scale(S, ref),
        }

    cells = [Cell(wl.name, "trak", lib, {"settings": dataclasses.asdict(st)}) for lib in libs]
    harness.time_cells(cells, args.repeats, runner(args, path, per_run))
    rows = []
    for c in cells:
        agree = c.runs.get("agreement", [])
        rows.append(cell_row(
            c, statistics.fmean(agree) if agree else None,
            f"float64 TRAK without projection, kernel form, same damping (lam={lam:.4g})",
            (["non-finite scores"] if any(x != x for x in agree) else []) + c.busy(),
            api=TRAK_API[c.library], agreement_per_seed=agree, scale_per_seed=c.runs.get("scale", [])))  # fmt: skip
    done = [c for c in cells if c.scores]
    info["pairwise_seed0"] = {f"{a.library}~{b.library}": per_query_pearson(a.scores[0], b.scores[0], strict=True)[0]
                              for i, a in enumerate(done) for b in done[i + 1 :]}  # fmt: skip
    return rows, {**info, "cells": [c.record() for c in cells]}


# ---- scale: projected TracIn on 100,000 examples; peers' projected Grad-Dot on a prefix ----

DIM, PEER_QUERY = 1024, 100
SCALE_API = {"datatrace": "dt.GradientAttributor(FeatureSpec(projection_dim=1024))",
             "dattri": "TracInAttributor(projector_kwargs: proj_dim 1024, seed 0, CPU BasicProjector)",
             "captum": "TracInCPFastRandProj (the last Linear weight only: not the same quantity)",
             "traker": "TRAKer featurize only (no finalize/score; scores from its features, untimed)"}  # fmt: skip


def scale_attributor(block: int, projected: bool = True, last: bool = False, params: Any = None,
                     kronecker: bool | None = None) -> dt.GradientAttributor:  # fmt: skip
    fs = dt.FeatureSpec(params=params, projection_dim=DIM if projected else None, kronecker=kronecker,
                        kronecker_block=block)  # fmt: skip
    weights = dt.CheckpointWeights.LAST if last else dt.CheckpointWeights.LEARNING_RATE
    return dt.GradientAttributor(
        fs, normalize=False, checkpoints=weights, name="GradDot" if last else "TracIn"
    )


def scale_call(lib: str, method: str, wl: Workload, spec: dict) -> Scores:
    """``plain`` forward + backward, ``featurize`` / ``dense`` (store + top-10 of every
    query) on the first ``n`` examples; Grad-Dot of one library on the first ``n`` and the
    first 100 queries (``exact reference``: unprojected, and the last weight alone)."""
    m, bs, block = copy.deepcopy(wl.model), spec["batch_size"], spec["block"]
    train = (wl.train[0][: spec["n"]].contiguous(), wl.train[1][: spec["n"]].contiguous())
    task, clock = dt.ClassificationTask(m), harness.Clock()
    if method == "plain":
        for sd, _ in wl.ckpts:
            m.load_state_dict(sd)
            for xb, yb in batches(train, bs):
                m.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(m(xb), yb).backward()
        return {}, clock.lap(), []
    if method in ("featurize", "dense"):
        attributor = scale_attributor(block, kronecker=False if method == "dense" else None)
        with tempfile.TemporaryDirectory() as store:
            fitted = attributor.fit(
                task, ckpts_of(wl), train, store=store, batch_size=bs, progress=False
            )
            clock.lap("featurize_seconds")
            fitted.top_k(wl.test, k=10)
            t = clock.lap("top_k_seconds")
            store_mb = fitted.store.nbytes() / 1e6 if fitted.store is not None else 0.0
        return {}, {**t, "total": t["featurize_seconds"], "store_mb": store_mb}, []
    cks = [(wl.ckpts[-1][0], 1.0)]
    ckpts = [dt.Checkpoint.from_state_dict(sd, weight=w) for sd, w in cks]
    queries = (wl.test[0][:PEER_QUERY].contiguous(), wl.test[1][:PEER_QUERY].contiguous())
    if method == "exact reference":
        S, last = (scale_attributor(block, False, True, p).fit(task, ckpts, train, batch_size=bs, progress=False)
                   for p in (None, ("4.weight",)))  # fmt: skip
        return {"S": S.attribute(queries), "S_last": last.attribute(queries)}, clock.lap(), []
    if lib == "datatrace":
        S, t, _ = harness.fit_attribute(
            scale_attributor(block, last=True), task, ckpts, train, queries, batch_size=bs
        )
        return {"S": S}, t, []
    if lib == "dattri":
        proj = {"proj_dim": DIM, "proj_max_batch_size": 32, "proj_seed": 0, "device": "cpu"}
        S = dattri_peer.tracin(m, cks, train, queries, bs, projector_kwargs=proj)
        return {"S": S}, clock.lap(), []
    if lib == "captum":
        with tempfile.TemporaryDirectory() as d:  # checkpoint files: not timed
            S, info = captum_peer.fast_rand_proj(m, train, queries, captum_peer.save_checkpoints(cks, d, "scale"),
                                                 DIM, bs)  # fmt: skip
    else:
        S, info = traker_peer.featurize(m, train, queries, cks, DIM, bs)
    return {"S": S}, {**info, "total": info["seconds"]}, []


def summary(c: Cell) -> dict[str, Any]:
    """A cell's medians (of its undisturbed runs), its first run's other values, its largest
    peak RSS (the worker's ``VmHWM``) and how many runs, disturbed runs."""
    if c.error is not None or not c.runs:
        raise RuntimeError(f"{c.method} ({c.library}) failed: {c.error}")
    out = {k: c.median(k) if isinstance(v[0], float) else v[0] for k, v in c.runs.items()}
    notes = [f"median of {len(c.runs['total'])} runs", *c.busy()]
    return {**out, "peak_rss_gb": max(c.runs["peak_rss_gb"]), "notes": notes}


def scale_bench(name: str, args: Any, libs: list[str], tmp: str) -> tuple[list, dict]:
    """datatrace's TracIn featurization on every example (against ``plain`` forward + backward;
    the dense projection against Kronecker on 2,000, quick 200) and top-10 of 1,000 queries;
    every library's projected Grad-Dot on a prefix (5,000, quick 1,000; datatrace: every
    example), extrapolated linearly, against exact Grad-Dot on the same examples."""
    wl = scale_workload(5_000 if args.quick else 100_000)
    path, n_full = stage(wl, tmp), wl.n_train
    base = {"batch_size": args.batch_size or 512, "block": args.block}
    prefix, dense_n = min(1_000 if args.quick else 5_000, n_full), 200 if args.quick else 2_000
    cell = lambda label, lib, n, **kw: Cell(wl.name, label, lib, {**base, "n": n, **kw})  # noqa: E731
    ref = cell("exact reference", "datatrace", n_full)
    feat = [cell("plain", "datatrace", n_full), cell("featurize", "datatrace", n_full),
            cell("dense", "datatrace", dense_n), cell("featurize-small", "datatrace", dense_n, method="featurize")]  # fmt: skip
    peers = [
        cell(f"graddot-proj{DIM}", lib, n_full if lib == "datatrace" else prefix) for lib in libs
    ]
    run = runner(args, path)
    harness.time_cells([ref], 1, run)
    harness.time_cells([*feat, *peers], args.repeats, run, slow_s=30.0, retry_busy=True)
    rows = []
    for c in peers:
        n, res = c.spec["n"], summary(c) if c.error is None else None
        S, R = (c.scores or [None])[0], (ref.scores or [None])[0]
        agree = (
            per_query_pearson(S["S"], R["S"][:, :n])[0] if S is not None and R is not None else None
        )
        last = ({"last_weight_agreement": per_query_pearson(S["S"], R["S_last"][:, :n])[0]}
                if c.library == "captum" and agree is not None else {})  # fmt: skip
        rows.append(row(workload=wl.name, method=c.method, library=c.library, n_train=n, api=SCALE_API[c.library],
                        seconds=res["total"] if res else None, peak_mem_gb=res["peak_rss_gb"] if res else None,
                        extrapolated_seconds_full=res["total"] * n_full / n if res and n < n_full else None,
                        agreement=agree, note="; ".join(res["notes"] if res else [c.error or ""]), **last,
                        agreement_with=f"exact Grad-Dot (no projection), mean per-query Pearson, {PEER_QUERY} "
                        f"queries x the same {n:,} training examples"))  # fmt: skip
    plain, fe, dense, small = (summary(c) for c in feat)
    ratio, dense_ratio = fe["featurize_seconds"] / plain["total"], dense["total"] / small["total"]
    rows.append(row(workload=wl.name, method=f"tracin-proj{DIM}", library="datatrace", n_train=n_full,
                    seconds=fe["featurize_seconds"] + fe["top_k_seconds"], peak_mem_gb=fe["peak_rss_gb"],
                    agreement_with="none: no exact TracIn reference at this size (see the graddot rows)",
                    note=f"2 checkpoints into the on-disk store ({fe['store_mb']:.0f} MB) {fe['featurize_seconds']:.2f} s "
                    f"= {ratio:.2f}x plain forward+backward ({plain['total']:.2f} s; target <= 2x) + top-10 of "
                    f"{wl.n_test:,} queries {fe['top_k_seconds']:.2f} s; dense projection {dense_ratio:.1f}x "
                    f"Kronecker on {dense_n:,}; " + "; ".join(fe["notes"])))  # fmt: skip
    return rows, {"describe": wl.describe(), "featurize_vs_plain": ratio, "dense_vs_kronecker": dense_ratio,
                  "cells": [c.record() for c in [ref, *feat, *peers]]}  # fmt: skip


# ---- agreement with leave-one-out retraining (float64 problems trained to convergence) ----

LOO_SWEPT = {"Exact Hessian": dt.ExactHessian, "Gauss-Newton": dt.GaussNewton, "EK-FAC": dt.EKFAC}


def loo_methods(lam: float, p: int) -> dict[str, dt.GradientAttributor]:
    return {
        "Exact Hessian": dt.Influence(dt.ExactHessian(damping=lam)),
        "Gauss-Newton": dt.Influence(dt.GaussNewton(damping=lam)),
        "CG": dt.Influence(dt.ConjugateGradient(damping=lam, max_iter=300, tol=1e-10)),
        "LiSSA": dt.Influence(dt.LiSSA(damping=lam, depth=2000, batch_size=100)),
        "Arnoldi r=50": dt.Influence(dt.Arnoldi(rank=min(50, p), damping=lam)),
        "K-FAC": dt.Influence(dt.KFAC(damping=lam)),
        "EK-FAC": dt.Influence(dt.EKFAC(damping=lam)),
        "DataInf": dt.DataInf(),
        "TRAK (k=512)": dt.TRAK(projection_dim=512),
        "Grad-Dot": dt.GradDot(),
        "Grad-Cos": dt.GradCos(),
    }


def loo_bench(name: str, args: Any, *_: Any) -> tuple[list, dict]:
    """Every method (damping 2α, the Hessian of the L2 penalty) against the cached
    leave-one-out truth of ``--n-left-out`` training examples, then the damping sweep
    (multiples of λ₀) of the exact Hessian, Gauss-Newton and EK-FAC: one row each."""
    problem = {"logreg": logistic_regression_problem, "mlp": mlp_problem}[name]()
    task, ckpts = dt.ClassificationTask(problem.model), [dt.Checkpoint.from_module(problem.model)]
    n, p = len(problem.train[0]), sum(t.numel() for t in problem.model.parameters())
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(1))[: args.n_left_out]
    cache = Path(args.cache) / f"loo-{problem.name}-{args.n_left_out}.pt"
    if cache.exists():
        truth = torch.load(cache, weights_only=True)
    else:
        truth = dt.truth.leave_one_out(
            problem.train_fn, task, problem.train, problem.queries, indices=idx
        )
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(truth, cache)
    against = f"leave-one-out retraining of {len(idx)} examples (float64, mean per-query Pearson)"

    def loo_row(method: str, scores: torch.Tensor, **extra: Any) -> dict[str, Any]:
        a = dt.metrics.agreement(scores[:, idx], truth)
        return row(workload=problem.name, method=method, library="datatrace", agreement=a["pearson"][0],
                   agreement_with=against, spearman=a["spearman"][0], cosine=a["cosine"][0],
                   pearson_se=a["pearson"][1], **extra)  # fmt: skip

    rows = []
    for label, method in loo_methods(2 * problem.alpha, p).items():
        t0 = time.perf_counter()
        scores = method.fit(task, ckpts, problem.train, progress=False).attribute(problem.queries)
        rows.append(loo_row(label, scores, seconds=time.perf_counter() - t0))
    for label, solver in LOO_SWEPT.items():
        pts = dt.damping_sweep(lambda d, s=solver: dt.Influence(s(damping=d)), task, ckpts, problem.train,
                               problem.queries, multipliers=(0.01, 0.1, 1.0, 10.0, 100.0), progress=False)  # fmt: skip
        rows += [
            loo_row(f"{label} {pt.multiplier:g}λ₀", pt.scores, damping=pt.damping) for pt in pts
        ]
    return rows, {"problem": problem.name, "n_train": n, "n_params": p, "alpha": problem.alpha}


# ---- the components and the one main ----


class Component(NamedTuple):
    bench: Callable[[str, Any, list[str], str], tuple[list, dict]]  # (workload, args, libs, tmp)
    workloads: str  # the default --workloads
    libraries: str  # the default --libraries (datatrace always runs)
    call: Callable[[str, str, Workload, dict], Scores] | None = None  # one run of one cell
    warm: Callable[[Workload, dict], tuple[Workload, dict]] | None = None  # its warm-up
    fresh: bool = True  # every run in a fresh worker (else in this process: the GPU anchor)
    more: tuple[str, ...] = ()  # libraries run only when asked


COMPONENTS = {
    "tracin": Component(tracin_bench, "small,large", "datatrace,captum,dattri", tracin_call, tracin_warm,
                        fresh=False, more=("datatrace-tf32", "datatrace-bf16", "vmap")),
    "influence": Component(influence_bench, "mlp", "datatrace,dattri,kronfluence", influence_call, influence_warm),
    "trak": Component(trak_bench, "small,cnn", "datatrace,traker,dattri", trak_call, trak_warm),
    "scale": Component(scale_bench, "scale", "datatrace,dattri,captum,traker", scale_call),
    "loo": Component(loo_bench, "logreg,mlp", "datatrace"),
}  # fmt: skip


def options(ap: Any) -> None:
    ap.add_argument("component", nargs="?", choices=COMPONENTS)
    ap.add_argument("--workloads", default=None, help="comma-separated (default: the component's)")
    ap.add_argument("--device", default="cpu", help="tracin: cpu, cuda or cuda:N")
    ap.add_argument(
        "--dampings", default="0.01", help="influence: comma-separated lam (mean-loss convention)"
    )
    ap.add_argument(
        "--methods",
        default=None,
        help=f"influence: comma-separated subset of {','.join(INFLUENCE)}",
    )
    ap.add_argument(
        "--cg-iters", default=None, help="influence: matched CG iterations (20,100; quick 5,30)"
    )
    ap.add_argument("--block", type=int, default=4, help="scale: kronecker_block m")
    ap.add_argument("--n-left-out", type=int, default=40, help="loo: examples retrained without")
    ap.add_argument("--cache", default="bench/out", help="loo: folder of the cached leave-one-out truth")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = harness.parse_args(__doc__, "", argv, options, repeats=None, batch_size=None)
    if args.worker:
        return harness.worker_main(args.worker, work)
    if args.component is None:
        args.error(f"name a component: {', '.join(COMPONENTS)}")
    comp = COMPONENTS[args.component]
    libs = [x.strip() for x in (args.libraries or comp.libraries).split(",")]
    if unknown := set(libs) - {*comp.libraries.split(","), *comp.more}:
        args.error(f"unknown libraries {sorted(unknown)} for {args.component}")
    libs = ["datatrace", *(x for x in libs if x != "datatrace")]
    args.repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    env = harness.environment([x for x in libs[1:] if x not in comp.more], dtype="float32", component=args.component, quick=args.quick,
                              repeats=args.repeats, batch_size=args.batch_size, device=args.device)  # fmt: skip
    out: dict[str, Any] = {"environment": env, "rows": [], "workloads": {}}
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as tmp:
        for name in (args.workloads or comp.workloads).split(","):  # one at a time
            rows, out["workloads"][name] = comp.bench(name, args, libs, tmp)
            out["rows"] += rows
    harness.print_rows(out["rows"])
    harness.write_json(args.json, out)
    return 1 if any("FAIL" in r["note"] for r in out["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
