#!/usr/bin/env python
"""Scale: TracIn with a 1,024-dimensional random projection on 100,000 training examples.

    python bench/bench_scale.py [--n-train 100000] [--dim 1024] [--peer-train 5000] [--json F]
    python bench/bench_scale.py --quick   # 5,000 examples, peers on 1,000, 1 repeat (minutes)

Every measurement is a fresh worker, so its peak memory (``VmHWM``) is its own: ``plain``
forward + backward, ``featurize`` (store + top-10), ``dense`` (``kronecker=False``), and the
peers on a prefix, extrapolated linearly (labelled). Details: bench/README.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from typing import Any

import harness
from peers import captum_peer, dattri_peer, traker_peer
from torch import nn
from workloads import scale_checkpoints, scale_model, synthetic_data

import datatrace as dt

LIBRARIES = ("datatrace", "dattri", "captum", "traker")


def featurization_run(spec: argparse.Namespace) -> tuple[dict, dict]:
    """plain / featurize / dense on the full ``n_train`` (see the docstring)."""
    x, y = synthetic_data(spec.n_train, 0)
    m, cks, bs = scale_model(), scale_checkpoints(), spec.batch_size
    clock = harness.Clock()
    if spec.mode == "plain":
        for sd, _ in cks:
            m.load_state_dict(sd)
            for s in range(0, len(x), bs):
                m.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(m(x[s : s + bs]), y[s : s + bs]).backward()
        return {"seconds": clock.lap()["total"]}, {}
    kron = None if spec.mode != "dense" else False
    fs = dt.FeatureSpec(projection_dim=spec.dim, kronecker=kron, kronecker_block=spec.block)
    weights = dt.CheckpointWeights.LEARNING_RATE
    method = dt.GradientAttributor(fs, normalize=False, checkpoints=weights, name="TracIn")
    ckpts = [dt.Checkpoint.from_state_dict(sd, weight=w) for sd, w in cks]
    with tempfile.TemporaryDirectory() as store:
        fitted = method.fit(dt.ClassificationTask(m), ckpts, (x, y), store=store, batch_size=bs,
                            progress=False)  # fmt: skip
        clock.lap("featurize_seconds")
        vals, _ = fitted.top_k(synthetic_data(spec.n_query, 1), k=10)
        t = clock.lap("top_k_seconds")
        store_mb = fitted.store.nbytes() / 1e6 if fitted.store is not None else 0.0
    return {"seconds": t["featurize_seconds"], **t, "store_mb": store_mb,
            "checksum": float(vals.double().sum())}, {}  # fmt: skip


def _dt_method(spec: argparse.Namespace, projected: bool, params: tuple | None = None) -> Any:
    fs = dt.FeatureSpec(params=params, projection_dim=spec.dim if projected else None,
                        kronecker_block=spec.block)  # fmt: skip
    tracin = spec.peer_method == "tracin"
    weights = dt.CheckpointWeights.LEARNING_RATE if tracin else dt.CheckpointWeights.LAST
    return dt.GradientAttributor(fs, normalize=False, checkpoints=weights,
                                 name="TracIn" if tracin else "GradDot")  # fmt: skip


def peer_run(spec: argparse.Namespace) -> tuple[dict, dict]:
    """One library on the first ``prefix`` of the ``n_train`` set (labels depend on n_train)
    and the first ``peer_query`` queries: (info with seconds, {"S": (queries, prefix)})."""
    x, y = synthetic_data(spec.n_train, 0)
    xq, yq = synthetic_data(spec.n_query, 1)
    train = (x[: spec.prefix].contiguous(), y[: spec.prefix].contiguous())
    queries = (xq[: spec.peer_query].contiguous(), yq[: spec.peer_query].contiguous())
    cks = scale_checkpoints()
    cks = [(cks[-1][0], 1.0)] if spec.peer_method == "graddot" else cks
    m, lib, bs = scale_model().eval(), spec.mode.removeprefix("peer-"), spec.batch_size
    task = dt.ClassificationTask(m)
    ckpts = [dt.Checkpoint.from_state_dict(sd, weight=w) for sd, w in cks]
    if lib == "ref":  # exact scores: every parameter, and the last weight alone (captum's)
        clock = harness.Clock()
        S = _dt_method(spec, False).fit(task, ckpts, train, batch_size=bs).attribute(queries)
        last = _dt_method(spec, False, ("4.weight",)).fit(task, ckpts, train, batch_size=bs)
        return {"seconds": clock.lap()["total"]}, {"S": S, "S_last": last.attribute(queries)}
    if lib == "datatrace":
        S, t, fitted = harness.fit_attribute(_dt_method(spec, True), task, ckpts, train, queries,
                                             batch_size=bs)  # fmt: skip
        in_memory = fitted.store is not None and type(fitted.store).__name__.startswith("Memory")
        return {"seconds": t["total"], "featurize_seconds": t["fit"], "score_seconds": t["attribute"],
                "in_memory": in_memory}, {"S": S}  # fmt: skip
    if lib == "dattri":
        proj = {"proj_dim": spec.dim, "proj_max_batch_size": 32, "proj_seed": 0, "device": "cpu"}
        clock = harness.Clock()
        S = dattri_peer.tracin(m, [sd for sd, _ in cks], [w for _, w in cks], train, queries, bs,
                               projector_kwargs=proj)  # fmt: skip
        return {"seconds": clock.lap()["total"], "projector_kwargs": proj}, {"S": S}
    if lib == "captum":
        with tempfile.TemporaryDirectory() as d:  # checkpoint files: not timed
            paths = captum_peer.save_checkpoints(cks, d, "scale")
            S, info = captum_peer.fast_rand_proj(m, train, queries, paths, spec.dim, bs)
        return info, {"S": S}
    S, info = traker_peer.featurize(m, train, queries, cks, spec.dim, bs)
    return info, {"S": S}


def scale_worker(spec_dict: dict[str, Any]) -> dict[str, Any]:
    spec = argparse.Namespace(**spec_dict)
    info, mats = (peer_run if spec.mode.startswith("peer-") else featurization_run)(spec)
    info = {**info, "total": info["seconds"], "peak_rss_gb": harness.peak_rss_gb()}
    return {"S": mats, "t": info}


def summary(c: harness.Cell) -> dict[str, Any]:
    """A cell's medians (of its undisturbed runs), its first run's other values, the largest
    peak RSS and how many runs (with their seconds) the medians are of."""
    if c.error is not None or not c.runs:
        raise RuntimeError(f"{c.method} ({c.library}) failed: {c.error}")
    out = {k: c.median(k) if isinstance(v[0], float) else v[0] for k, v in c.runs.items()}
    t = [round(x, 3) for x in c.runs["seconds"]]
    notes = ([f"median of {len(t)} runs {t}"] if len(t) > 1 else []) + c.busy()
    return {**out, "peak_rss_gb": max(c.runs["peak_rss_gb"]), "notes": notes}


def workload_name(n: int) -> str:
    return f"scale-{n // 1000}k" if n % 1000 == 0 else f"scale-{n}"


NOTES = {  # what each library's row measures, then its rate
    "datatrace": "fit {featurize_seconds:.2f} s (features in {where}, Kronecker projection m={block}) + "
                 "attribute {score_seconds:.2f} s; {rate:,.0f} train ex/s overall{ext}",
    "dattri": "TracInAttributor, projector_kwargs={projector_kwargs} (CPU BasicProjector, dense Gaussian, "
              "every parameter); featurize and score interleaved; {rate:,.0f} train ex/s{ext}",
    "captum": "TracInCPFastRandProj: last Linear weight only (bias and other layers ignored), "
              "{dims_per_checkpoint} projected dims per checkpoint for projection_dim={dim}; constructor "
              "(featurize + Annoy index) {featurize_seconds:.2f} s + influence(k=None) {score_seconds:.2f} s; "
              "{rate:,.0f} train ex/s{ext}; agreement with exact Grad-Dot of that weight alone: {last_r:.4f}",
    "traker": "TRAKer featurize only (load_checkpoint + featurize: projected margin gradients + out-to-loss), "
              "no finalize/score; {rate:,.0f} train ex/s{ext}; agreement from its features converted to "
              "projected loss-gradient inner products (untimed query featurization)",
}  # fmt: skip


def peer_row(c: harness.Cell, ref: harness.Cell, args: argparse.Namespace) -> dict[str, Any]:
    """A prefix-comparison row: agreement with the exact scores on the same examples."""
    n, n_full = c.spec["prefix"], args.n_train
    exact = "TracIn" if args.peer_method == "tracin" else "Grad-Dot"

    def agreement(key: str = "S") -> float | None:
        if not ref.scores or not c.scores:
            return None
        S = c.scores[0]["S"]
        return harness.per_query_pearson(S, ref.scores[0][key][:, : S.shape[1]])[0]

    res = summary(c) if c.error is None else None
    notes = [c.error] if res is None else res["notes"]
    if res is not None:
        ext = " (measured)" if n == n_full else f"; extrapolated linearly to {n_full:,}"
        where = "memory" if res.get("in_memory") else "a temporary store"
        notes = [NOTES[c.library].format(**res, rate=n / res["seconds"], ext=ext, where=where, block=args.block,
                                         dim=args.dim, last_r=agreement("S_last")), *notes]  # fmt: skip
    return harness.row(
        workload=workload_name(n_full), method=c.method, library=c.library,
        seconds=res["seconds"] if res else None, n_train=n,
        extrapolated_seconds_full=res["seconds"] * n_full / n if res and n < n_full else None,
        peak_mem_gb=res["peak_rss_gb"] if res else None, agreement=agreement(),
        agreement_with=f"exact {exact} (datatrace dt.{exact.replace('-', '')}(), no projection), "
        f"mean per-query Pearson over {args.peer_query} queries x the same {n:,} training examples",
        note="; ".join(notes),
    )  # fmt: skip


def featurization_row(cells: dict[str, harness.Cell], args: argparse.Namespace) -> tuple:
    """Prints the targets; returns datatrace's full TracIn row and the two ratios."""
    plain, feat, dense, small = (
        summary(cells[k]) for k in ("plain", "featurize", "dense", "featurize-small")
    )
    ratio = feat["featurize_seconds"] / plain["seconds"]
    dense_ratio = dense["featurize_seconds"] / small["featurize_seconds"]
    print(f"\n{args.n_train:,} training examples, MLP 64-512-512-10 (301k parameters), 2 checkpoints, k = {args.dim}\n"
          f"plain forward+backward over the data, per checkpoint x 2: {plain['seconds']:.2f} s ({2 * args.n_train / plain['seconds']:,.0f} examples/s)\n"
          f"datatrace featurize (per-example grads, Kronecker projection, on-disk store): {feat['featurize_seconds']:.2f} s = {ratio:.2f}x plain [target <= 2x: {'MET' if ratio <= 2 else 'MISSED'}]\n"
          f"top-10 of {args.n_query:,} queries over the store: {feat['top_k_seconds']:.2f} s; store {feat['store_mb']:.0f} MB\n"
          f"peak RSS: featurize+score {feat['peak_rss_gb']:.2f} GB [target < 4 GB: {'MET' if feat['peak_rss_gb'] < 4 else 'MISSED'}]; plain {plain['peak_rss_gb']:.2f} GB\n"
          f"dense projection (every gradient formed) on {args.dense_n:,}: {dense['featurize_seconds']:.2f} s vs Kronecker {small['featurize_seconds']:.2f} s ({dense_ratio:.1f}x)")  # fmt: skip
    notes = [f"{k}: {t}" for k, r in (("featurize", feat), ("plain", plain)) for t in r["notes"]]
    row = harness.row(
        workload=workload_name(args.n_train), method=f"tracin-proj{args.dim}", library="datatrace",
        seconds=feat["featurize_seconds"] + feat["top_k_seconds"], n_train=args.n_train,
        extrapolated_seconds_full=None, peak_mem_gb=feat["peak_rss_gb"],
        agreement_with="none: no exact TracIn reference at this size "
        f"(agreement is measured on the {args.peer_method} rows)",
        note="; ".join([f"TracIn over 2 checkpoints: fit into the on-disk store {feat['featurize_seconds']:.2f} s "
                        f"({ratio:.2f}x plain forward+backward {plain['seconds']:.2f} s; "
                        f"{args.n_train / feat['featurize_seconds']:,.0f} train ex/s) + top-10 of "
                        f"{args.n_query:,} queries {feat['top_k_seconds']:.2f} s", *notes]))  # fmt: skip
    return row, ratio, dense_ratio


def main(argv: list[str] | None = None) -> int:
    ap = harness.arg_parser(__doc__, ",".join(LIBRARIES), batch_size=512, max_wait=120.0)
    ap.add_argument("--n-train", "--n", type=int, default=100_000)
    ap.add_argument("--n-query", type=int, default=1_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--dense-n", type=int, default=2_000)
    ap.add_argument("--block", type=int, default=4, help="kronecker_block m")
    ap.add_argument("--peer-train", type=int, default=5_000, help="prefix each peer runs on")
    ap.add_argument("--peer-query", type=int, default=100, help="queries scored by each peer")
    ap.add_argument("--peer-method", choices=("graddot", "tracin"), default="graddot")
    ap.add_argument("--slow-threshold", type=float, default=30.0)
    ap.add_argument("--peer-timeout", type=float, default=1800, help="seconds per worker run")
    args = harness.parse_args(ap, argv)
    if args.worker:
        return harness.worker_main(args.worker, scale_worker)
    if args.quick:  # smaller defaults; values given explicitly win
        for name, value in (("n_train", 5_000), ("peer_train", 1_000), ("dense_n", 200),
                            ("repeats", 1), ("max_wait", 10.0)):  # fmt: skip
            if getattr(args, name) == ap.get_default(name):
                setattr(args, name, value)
    libraries = [s.strip() for s in args.libraries.split(",") if s.strip()]
    if unknown := set(libraries) - set(LIBRARIES):
        ap.error(f"unknown libraries {sorted(unknown)}")
    n_full, prefix, dt_on = (
        args.n_train,
        min(args.peer_train, args.n_train),
        "datatrace" in libraries,
    )
    common = {k: getattr(args, k) for k in ("n_query", "dim", "batch_size", "block", "threads",
                                            "peer_method", "peer_query")}  # fmt: skip
    run = harness.in_workers(__file__, args.max_wait, lambda c, _: {**common, **c.spec},
                             args.peer_timeout)  # fmt: skip
    name, method = workload_name(n_full), f"{args.peer_method}-proj{args.dim}"
    sizes = {"plain": ("plain", n_full), "featurize": ("featurize", n_full),
             "dense": ("dense", args.dense_n), "featurize-small": ("featurize", args.dense_n)}  # fmt: skip
    feat = {label: harness.Cell(name, label, "datatrace", {"mode": mode, "n_train": n})
            for label, (mode, n) in sizes.items() if dt_on}  # fmt: skip
    ref = harness.Cell(name, "exact reference", "datatrace", {"mode": "peer-ref", "n_train": n_full,
                       "prefix": n_full if dt_on else prefix})  # fmt: skip
    runs = [("datatrace", n_full)] if dt_on else []  # then every library on the prefix
    runs += [(lib, prefix) for lib in LIBRARIES if lib in libraries]  # dict.fromkeys: once
    peers = [harness.Cell(name, method, lib, {"mode": f"peer-{lib}", "n_train": n_full, "prefix": n})
             for lib, n in dict.fromkeys(runs)]  # fmt: skip
    print(f"peers: {args.peer_method}, k = {args.dim}, {args.peer_query} queries, prefix "
          f"{prefix:,} of {n_full:,} training examples", flush=True)  # fmt: skip
    harness.time_cells([ref], 1, run)
    harness.time_cells(
        [*feat.values(), *peers], args.repeats, run, args.slow_threshold, retry_busy=True
    )
    rows, ratio, dense_ratio = [], None, None
    if dt_on:
        row, ratio, dense_ratio = featurization_row(feat, args)
        rows.append(row)
    rows += [peer_row(c, ref, args) for c in peers]
    harness.print_rows(rows)
    harness.write_json(args.json, {"args": vars(args), "featurize_vs_plain": ratio,
                                   "dense_vs_kronecker": dense_ratio, "rows": rows,
                                   "cells": [c.record() for c in [ref, *feat.values(), *peers]]})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
