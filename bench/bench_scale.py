#!/usr/bin/env python
"""Scale: TracIn with a 1,024-dimensional random projection on 100,000 training examples.

    python bench/bench_scale.py [--n-train 100000] [--block 4] [--peer-train 5000] [--json F]
    python bench/bench_scale.py --quick   # 5,000 examples, peers on 1,000, 1 repeat (minutes)

Every measurement is a fresh worker, so its peak memory (``VmHWM``) is its own: ``plain``
forward + backward, ``featurize`` (store + top-10 of 1,000 queries), ``dense``
(``kronecker=False``, on 2,000 examples; quick 200) against ``featurize`` on as many, and
projected Grad-Dot of every library on a prefix (100 queries), extrapolated linearly
(labelled), against exact Grad-Dot. Details: bench/README.md.
"""

from __future__ import annotations

import sys
import tempfile
from typing import Any

import harness
from peers import captum_peer, dattri_peer, traker_peer
from torch import nn
from workloads import scale_checkpoints, scale_model, synthetic_data

import datatrace as dt

LIBRARIES = ("datatrace", "dattri", "captum", "traker")
DIM, N_QUERY, PEER_QUERY, SLOW_S = 1024, 1_000, 100, 30.0


def attributor(block: int, projected: bool = True, last: bool = False, params: Any = None,
               kronecker: bool | None = None) -> dt.GradientAttributor:  # fmt: skip
    fs = dt.FeatureSpec(params=params, projection_dim=DIM if projected else None, kronecker=kronecker,
                        kronecker_block=block)  # fmt: skip
    weights = dt.CheckpointWeights.LAST if last else dt.CheckpointWeights.LEARNING_RATE
    return dt.GradientAttributor(
        fs, normalize=False, checkpoints=weights, name="GradDot" if last else "TracIn"
    )


def featurization_run(spec: dict) -> dict:
    """plain / featurize / dense on ``n_train`` examples (see the docstring)."""
    x, y = synthetic_data(spec["n_train"], 0)
    m, cks, bs = scale_model(), scale_checkpoints(), spec["batch_size"]
    clock = harness.Clock()
    if spec["mode"] == "plain":
        for sd, _ in cks:
            m.load_state_dict(sd)
            for s in range(0, len(x), bs):
                m.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(m(x[s : s + bs]), y[s : s + bs]).backward()
        return {"seconds": clock.lap()["total"]}
    method = attributor(spec["block"], kronecker=False if spec["mode"] == "dense" else None)
    ckpts = [dt.Checkpoint.from_state_dict(sd, weight=w) for sd, w in cks]
    with tempfile.TemporaryDirectory() as store:
        fitted = method.fit(
            dt.ClassificationTask(m), ckpts, (x, y), store=store, batch_size=bs, progress=False
        )
        clock.lap("featurize_seconds")
        vals, _ = fitted.top_k(synthetic_data(N_QUERY, 1), k=10)
        t = clock.lap("top_k_seconds")
        store_mb = fitted.store.nbytes() / 1e6 if fitted.store is not None else 0.0
    return {
        "seconds": t["featurize_seconds"],
        **t,
        "store_mb": store_mb,
        "checksum": float(vals.double().sum()),
    }


def peer_run(spec: dict) -> tuple[dict, dict]:
    """Grad-Dot of one library on the first ``prefix`` of the ``n_train`` set (labels depend
    on n_train) and the first 100 queries: (info with seconds, {"S": (queries, prefix)})."""
    x, y = synthetic_data(spec["n_train"], 0)
    xq, yq = synthetic_data(N_QUERY, 1)
    train = (x[: spec["prefix"]].contiguous(), y[: spec["prefix"]].contiguous())
    queries = (xq[:PEER_QUERY].contiguous(), yq[:PEER_QUERY].contiguous())
    cks = [(scale_checkpoints()[-1][0], 1.0)]
    m, lib, bs, block = (
        scale_model().eval(),
        spec["mode"].removeprefix("peer-"),
        spec["batch_size"],
        spec["block"],
    )
    task, ckpts = (
        dt.ClassificationTask(m),
        [dt.Checkpoint.from_state_dict(sd, weight=w) for sd, w in cks],
    )
    clock = harness.Clock()
    if lib == "ref":  # exact scores: every parameter, and the last weight alone (captum's)
        S = attributor(block, False, True).fit(task, ckpts, train, batch_size=bs).attribute(queries)
        last = attributor(block, False, True, ("4.weight",)).fit(task, ckpts, train, batch_size=bs)
        return {"seconds": clock.lap()["total"]}, {"S": S, "S_last": last.attribute(queries)}
    if lib == "datatrace":
        S, t, fitted = harness.fit_attribute(
            attributor(block, last=True), task, ckpts, train, queries, batch_size=bs
        )
        in_memory = fitted.store is not None and type(fitted.store).__name__.startswith("Memory")
        return {"seconds": t["total"], "featurize_seconds": t["fit"], "score_seconds": t["attribute"],
                "in_memory": in_memory}, {"S": S}  # fmt: skip
    if lib == "dattri":
        proj = {"proj_dim": DIM, "proj_max_batch_size": 32, "proj_seed": 0, "device": "cpu"}
        S = dattri_peer.tracin(m, cks, train, queries, bs, projector_kwargs=proj)
        return {"seconds": clock.lap()["total"], "projector_kwargs": proj}, {"S": S}
    if lib == "captum":
        with tempfile.TemporaryDirectory() as d:  # checkpoint files: not timed
            S, info = captum_peer.fast_rand_proj(
                m, train, queries, captum_peer.save_checkpoints(cks, d, "scale"), DIM, bs
            )
        return info, {"S": S}
    S, info = traker_peer.featurize(m, train, queries, cks, DIM, bs)
    return info, {"S": S}


def scale_worker(spec: dict[str, Any]) -> dict[str, Any]:
    info, mats = (
        peer_run(spec) if spec["mode"].startswith("peer-") else (featurization_run(spec), {})
    )
    return {
        "S": mats,
        "t": {**info, "total": info["seconds"], "peak_rss_gb": harness.peak_rss_gb()},
    }


def summary(c: harness.Cell) -> dict[str, Any]:
    """A cell's medians (of its undisturbed runs), its first run's other values, the largest
    peak RSS and how many runs (with their seconds) the medians are of."""
    if c.error is not None or not c.runs:
        raise RuntimeError(f"{c.method} ({c.library}) failed: {c.error}")
    out = {k: c.median(k) if isinstance(v[0], float) else v[0] for k, v in c.runs.items()}
    t = [round(x, 3) for x in c.runs["seconds"]]
    notes = ([f"median of {len(t)} runs {t}"] if len(t) > 1 else []) + c.busy()
    return {**out, "peak_rss_gb": max(c.runs["peak_rss_gb"]), "notes": notes}


NOTES = {  # what each library's row measures, then its rate
    "datatrace": "fit {featurize_seconds:.2f} s (features in {where}, Kronecker projection m={block}) + "
                 "attribute {score_seconds:.2f} s",
    "dattri": "TracInAttributor, projector_kwargs={projector_kwargs} (CPU BasicProjector, dense Gaussian, "
              "every parameter); featurize and score interleaved",
    "captum": "TracInCPFastRandProj: last Linear weight only (bias and other layers ignored), "
              "{dims_per_checkpoint} projected dims per checkpoint for projection_dim=1024; constructor "
              "(featurize + Annoy index) {featurize_seconds:.2f} s + influence(k=None) {score_seconds:.2f} s; "
              "agreement with exact Grad-Dot of that weight alone: {last_r:.4f}",
    "traker": "TRAKer featurize only (load_checkpoint + featurize: projected margin gradients + out-to-loss), "
              "no finalize/score; agreement from its features converted to projected loss-gradient inner "
              "products (untimed query featurization)",
}  # fmt: skip


def peer_row(
    c: harness.Cell, ref: harness.Cell, n_full: int, block: int, name: str
) -> dict[str, Any]:
    """A prefix-comparison row: agreement with the exact scores on the same examples."""
    n = c.spec["prefix"]

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
        notes = [NOTES[c.library].format(**res, where=where, block=block, last_r=agreement("S_last"))
                 + f"; {n / res['seconds']:,.0f} train ex/s{ext}", *notes]  # fmt: skip
    return harness.row(
        workload=name, method=c.method, library=c.library, seconds=res["seconds"] if res else None, n_train=n,
        extrapolated_seconds_full=res["seconds"] * n_full / n if res and n < n_full else None,
        peak_mem_gb=res["peak_rss_gb"] if res else None, agreement=agreement(),
        agreement_with="exact Grad-Dot (datatrace dt.GradDot(), no projection), mean per-query Pearson "
        f"over {PEER_QUERY} queries x the same {n:,} training examples", note="; ".join(notes),
    )  # fmt: skip


def featurization_row(
    cells: dict[str, harness.Cell], n_train: int, dense_n: int, name: str
) -> tuple:
    """Prints the targets; returns datatrace's full TracIn row and the two ratios."""
    plain, feat, dense, small = (
        summary(cells[k]) for k in ("plain", "featurize", "dense", "featurize-small")
    )
    ratio = feat["featurize_seconds"] / plain["seconds"]
    dense_ratio = dense["featurize_seconds"] / small["featurize_seconds"]
    verdict = lambda ok: "MET" if ok else "MISSED"  # noqa: E731
    print(f"\n{n_train:,} training examples, MLP 64-512-512-10 (301k parameters), 2 checkpoints, k = {DIM}\n"
          f"plain forward+backward over the data, per checkpoint x 2: {plain['seconds']:.2f} s\n"
          f"datatrace featurize (per-example grads, Kronecker projection, on-disk store): {feat['featurize_seconds']:.2f} s"
          f" = {ratio:.2f}x plain [target <= 2x: {verdict(ratio <= 2)}]\n"
          f"top-10 of {N_QUERY:,} queries over the store: {feat['top_k_seconds']:.2f} s; store {feat['store_mb']:.0f} MB\n"
          f"peak RSS: featurize+score {feat['peak_rss_gb']:.2f} GB [target < 4 GB: {verdict(feat['peak_rss_gb'] < 4)}]\n"
          f"dense projection on {dense_n:,}: {dense['featurize_seconds']:.2f} s vs Kronecker "
          f"{small['featurize_seconds']:.2f} s ({dense_ratio:.1f}x)")  # fmt: skip
    notes = [f"{k}: {t}" for k, r in (("featurize", feat), ("plain", plain)) for t in r["notes"]]
    row = harness.row(
        workload=name, method=f"tracin-proj{DIM}", library="datatrace", n_train=n_train,
        seconds=feat["featurize_seconds"] + feat["top_k_seconds"], extrapolated_seconds_full=None,
        peak_mem_gb=feat["peak_rss_gb"],
        agreement_with="none: no exact TracIn reference at this size (agreement is measured on the graddot rows)",
        note="; ".join([f"TracIn over 2 checkpoints: fit into the on-disk store {feat['featurize_seconds']:.2f} s "
                        f"({ratio:.2f}x plain forward+backward {plain['seconds']:.2f} s) + top-10 of "
                        f"{N_QUERY:,} queries {feat['top_k_seconds']:.2f} s", *notes]))  # fmt: skip
    return row, ratio, dense_ratio


def main(argv: list[str] | None = None) -> int:
    ap = harness.arg_parser(
        __doc__, ",".join(LIBRARIES), repeats=None, batch_size=512, max_wait=None
    )
    ap.add_argument("--n-train", type=int, default=None, help="default 100,000 (quick 5,000)")
    ap.add_argument("--block", type=int, default=4, help="kronecker_block m")
    ap.add_argument(
        "--peer-train", type=int, default=None, help="prefix each peer runs on (5,000; quick 1,000)"
    )
    args = harness.parse_args(ap, argv)
    if args.worker:
        return harness.worker_main(args.worker, scale_worker)
    q = args.quick
    n_full, dense_n = args.n_train or (5_000 if q else 100_000), 200 if q else 2_000
    prefix, repeats = (
        min(args.peer_train or (1_000 if q else 5_000), n_full),
        args.repeats or (1 if q else 3),
    )
    libraries = harness.libraries(ap, args.libraries, LIBRARIES)
    dt_on = "datatrace" in libraries
    common = {
        "batch_size": args.batch_size,
        "block": args.block,
        "threads": args.threads,
        "n_train": n_full,
    }
    max_wait = args.max_wait if args.max_wait is not None else (10.0 if q else 120.0)
    run = harness.in_workers(__file__, max_wait, lambda c, _: {**common, **c.spec}, 1800)
    name = f"scale-{n_full // 1000}k" if n_full % 1000 == 0 else f"scale-{n_full}"
    sizes = {"plain": ("plain", n_full), "featurize": ("featurize", n_full), "dense": ("dense", dense_n),
             "featurize-small": ("featurize", dense_n)}  # fmt: skip
    feat = {label: harness.Cell(name, label, "datatrace", {"mode": mode, "n_train": n})
            for label, (mode, n) in sizes.items() if dt_on}  # fmt: skip
    ref = harness.Cell(
        name,
        "exact reference",
        "datatrace",
        {"mode": "peer-ref", "prefix": n_full if dt_on else prefix},
    )
    runs = ([("datatrace", n_full)] if dt_on else []) + [
        (lib, prefix) for lib in LIBRARIES if lib in libraries
    ]
    peers = [harness.Cell(name, f"graddot-proj{DIM}", lib, {"mode": f"peer-{lib}", "prefix": n})
             for lib, n in dict.fromkeys(runs)]  # fmt: skip
    print(
        f"peers: graddot, k = {DIM}, {PEER_QUERY} queries, prefix {prefix:,} of {n_full:,} training examples"
    )
    harness.time_cells([ref], 1, run)
    harness.time_cells([*feat.values(), *peers], repeats, run, SLOW_S, retry_busy=True)
    rows, ratio, dense_ratio = [], None, None
    if dt_on:
        row, ratio, dense_ratio = featurization_row(feat, n_full, dense_n, name)
        rows.append(row)
    rows += [peer_row(c, ref, n_full, args.block, name) for c in peers]
    harness.print_rows(rows)
    harness.write_json(args.json, {"args": vars(args), "featurize_vs_plain": ratio, "dense_vs_kronecker": dense_ratio,
                                   "rows": rows, "cells": [c.record() for c in [ref, *feat.values(), *peers]]})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
