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
import subprocess
import sys
import tempfile
import time
from typing import Any

import harness
import torch
from agreement import per_query_pearson
from peers import captum_peer, dattri_peer, traker_peer
from torch import nn
from workloads import scale_checkpoints, scale_model, synthetic_data

import datatrace as dt

PEERS = ("dattri", "captum", "traker")


def featurization_run(spec: argparse.Namespace) -> tuple[dict, dict]:
    """plain / featurize / dense on the full ``n_train`` (see the docstring)."""
    x, y = synthetic_data(spec.n_train, 0)
    m, cks = scale_model(), scale_checkpoints()
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    if spec.mode == "plain":
        for sd, _ in cks:
            m.load_state_dict(sd)
            for s in range(0, len(x), spec.batch_size):
                m.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(
                    m(x[s : s + spec.batch_size]), y[s : s + spec.batch_size]
                ).backward()
        return {"seconds": time.perf_counter() - t0}, {}
    fs = dt.FeatureSpec(projection_dim=spec.dim, kronecker=None if spec.mode != "dense" else False,
                        kronecker_block=spec.block)  # fmt: skip
    weights = dt.CheckpointWeights.LEARNING_RATE
    method = dt.GradientAttributor(fs, normalize=False, checkpoints=weights, name="TracIn")
    ckpts = [dt.Checkpoint.from_state_dict(sd, weight=w) for sd, w in cks]
    with tempfile.TemporaryDirectory() as store:
        fitted = method.fit(dt.ClassificationTask(m), ckpts, (x, y), store=store,
                            batch_size=spec.batch_size, progress=False)  # fmt: skip
        out["featurize_seconds"] = out["seconds"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        vals, _ = fitted.top_k(synthetic_data(spec.n_query, 1), k=10)
        out["top_k_seconds"] = time.perf_counter() - t1
        out["store_mb"] = fitted.store.nbytes() / 1e6 if fitted.store is not None else 0
        out["checksum"] = float(vals.double().sum())
    return out, {}


def _prefix(spec: argparse.Namespace) -> tuple:
    """The first ``prefix`` of the ``n_train`` set (labels depend on n_train), the first
    ``peer_query`` queries, and the method's checkpoints."""
    x, y = synthetic_data(spec.n_train, 0)
    xq, yq = synthetic_data(spec.n_query, 1)
    cks = scale_checkpoints()
    cks = [(cks[-1][0], 1.0)] if spec.peer_method == "graddot" else cks
    train = (x[: spec.prefix].contiguous(), y[: spec.prefix].contiguous())
    return train, (xq[: spec.peer_query].contiguous(), yq[: spec.peer_query].contiguous()), cks


def _dt_method(spec: argparse.Namespace, projected: bool, params: tuple | None = None) -> Any:
    fs = dt.FeatureSpec(params=params, projection_dim=spec.dim if projected else None,
                        kronecker_block=spec.block)  # fmt: skip
    tracin = spec.peer_method == "tracin"
    weights = dt.CheckpointWeights.LEARNING_RATE if tracin else dt.CheckpointWeights.LAST
    return dt.GradientAttributor(fs, normalize=False, checkpoints=weights,
                                 name="TracIn" if tracin else "GradDot")  # fmt: skip


def peer_run(spec: argparse.Namespace) -> tuple[dict, dict]:
    """One library on the prefix: (info with seconds, {"S": (queries, prefix)})."""
    train, queries, cks = _prefix(spec)
    m = scale_model().eval()
    lib = spec.mode.removeprefix("peer-")
    if lib in ("ref", "datatrace"):
        task, ckpts = (
            dt.ClassificationTask(m),
            [dt.Checkpoint.from_state_dict(sd, weight=w) for sd, w in cks],
        )
    if lib == "ref":  # exact scores: every parameter, and the last weight alone (captum's)
        t0 = time.perf_counter()
        S = (
            _dt_method(spec, False)
            .fit(task, ckpts, train, batch_size=spec.batch_size)
            .attribute(queries)
        )
        last = _dt_method(spec, False, ("4.weight",)).fit(
            task, ckpts, train, batch_size=spec.batch_size
        )
        return {"seconds": time.perf_counter() - t0}, {"S": S, "S_last": last.attribute(queries)}
    if lib == "datatrace":
        S, t, fitted = harness.fit_attribute(_dt_method(spec, True), task, ckpts, train, queries,
                                             batch_size=spec.batch_size)  # fmt: skip
        in_memory = fitted.store is not None and type(fitted.store).__name__.startswith("Memory")
        return {"seconds": t["total"], "featurize_seconds": t["fit"], "score_seconds": t["attribute"],
                "in_memory": in_memory}, {"S": S}  # fmt: skip
    if lib == "dattri":
        proj = {"proj_dim": spec.dim, "proj_max_batch_size": 32, "proj_seed": 0, "device": "cpu"}
        t0 = time.perf_counter()
        S = dattri_peer.tracin(m, [sd for sd, _ in cks], [w for _, w in cks], train, queries,
                               spec.batch_size, projector_kwargs=proj)  # fmt: skip
        return {"seconds": time.perf_counter() - t0, "projector_kwargs": proj}, {"S": S}
    if lib == "captum":
        with tempfile.TemporaryDirectory() as d:  # checkpoint files: not timed
            paths = captum_peer.save_checkpoints(cks, d, "scale")
            S, info = captum_peer.fast_rand_proj(
                m, train, queries, paths, spec.dim, spec.batch_size
            )
        return info, {"S": S}
    S, info = traker_peer.featurize(m, train, queries, cks, spec.dim, spec.batch_size)
    return info, {"S": S}


def scale_worker(spec_dict: dict[str, Any]) -> dict[str, Any]:
    spec = argparse.Namespace(**spec_dict)
    torch.set_num_threads(spec.threads)
    info, mats = (peer_run if spec.mode.startswith("peer-") else featurization_run)(spec)
    return {"info": {"mode": spec.mode, "n_train": spec.prefix or spec.n_train, **info,
                     "peak_rss_gb": harness.peak_rss_gb()}, "mats": mats}  # fmt: skip


def run_once(
    args: argparse.Namespace, mode: str, n: int, extra: dict, timeout: float | None
) -> tuple:
    spec = {"mode": mode, "n_train": n, "n_query": args.n_query, "dim": args.dim, "prefix": None,
            "batch_size": args.batch_size, "block": args.block, "threads": args.threads,
            "peer_method": args.peer_method, "peer_query": args.peer_query, **extra}  # fmt: skip
    d, others = harness.measured(__file__, spec, args.max_wait, timeout)
    d["info"].update(other_cores_during=round(others, 2))
    return d["info"], d["mats"]


def run_repeated(args: argparse.Namespace, mode: str, n: int, extra: dict | None = None,
                 timeout: float | None = None, repeats: int = 1) -> tuple[dict, dict]:  # fmt: skip
    """``repeats`` runs (once if the first takes >= --slow-threshold s; up to 2 x repeats
    while every run was contended): the median run of the undisturbed ones if any, else of
    all, with every run's seconds and the largest peak RSS."""
    runs = [run_once(args, mode, n, extra or {}, timeout)]

    def clean() -> list[dict]:
        return [r for r, _ in runs if r["other_cores_during"] <= harness.BUSY_LIMIT]

    while runs[0][0]["seconds"] < args.slow_threshold and (
        len(runs) < repeats or (repeats > 1 and not clean() and len(runs) < 2 * repeats)
    ):
        runs.append(run_once(args, mode, n, extra or {}, timeout))
    pool = clean() or [r for r, _ in runs]
    out = dict(sorted(pool, key=lambda r: r["seconds"])[(len(pool) - 1) // 2])
    out.update(all_seconds=[round(r["seconds"], 3) for r, _ in runs], quiet_runs=len(clean()),
               peak_rss_gb=max(r["peak_rss_gb"] for r, _ in runs))  # fmt: skip
    return out, runs[-1][1]


def run_notes(res: dict) -> list[str]:
    """How many runs the median is of, and whether other processes disturbed it."""
    notes, t = [], res.get("all_seconds", [])
    if len(t) >= 2:
        q = res.get("quiet_runs", len(t))
        notes.append(
            f"median of {'the ' + str(q) + ' uncontended of ' if 0 < q < len(t) else ''}{len(t)} runs {t}"
        )
    if (c := res.get("other_cores_during", 0.0)) > harness.BUSY_LIMIT:
        notes.append(f"CONTENDED: {c:.1f} cores busy outside this run on average (other processes, "
                     "or kernel memory management such as DAMON/balloon, which memory-heavy runs trigger)")  # fmt: skip
    return notes


def workload_name(n: int) -> str:
    return f"scale-{n // 1000}k" if n % 1000 == 0 else f"scale-{n}"


def peer_note(
    lib: str, res: dict, args: argparse.Namespace, n: int, last_agreement: float | None
) -> str:
    rate, n_full = n / res["seconds"], args.n_train
    ext = " (measured)" if n == n_full else f"; extrapolated linearly to {n_full:,}"
    if lib == "datatrace":
        where = "memory" if res["in_memory"] else "a temporary store"
        return (
            f"fit {res['featurize_seconds']:.2f} s (features in {where}, Kronecker projection "
            f"m={args.block}) + attribute {res['score_seconds']:.2f} s; {rate:,.0f} train ex/s overall{ext}"
        )
    if lib == "dattri":
        return (
            f"TracInAttributor, projector_kwargs={res['projector_kwargs']} (CPU BasicProjector, "
            f"dense Gaussian, every parameter); featurize and score interleaved; {rate:,.0f} train ex/s{ext}"
        )
    if lib == "captum":
        return (
            f"TracInCPFastRandProj: last Linear weight only (bias and other layers ignored), "
            f"{res['dims_per_checkpoint']} projected dims per checkpoint for projection_dim={args.dim}; "
            f"constructor (featurize + Annoy index) {res['featurize_seconds']:.2f} s + influence(k=None) "
            f"{res['score_seconds']:.2f} s; {rate:,.0f} train ex/s{ext}; agreement with exact "
            f"Grad-Dot of that weight alone: {last_agreement:.4f}"
        )
    return ("TRAKer featurize only (load_checkpoint + featurize: projected margin gradients + "
            f"out-to-loss), no finalize/score; {rate:,.0f} train ex/s{ext}; agreement from its "
            "features converted to projected loss-gradient inner products (untimed query featurization)")  # fmt: skip


def peers(args: argparse.Namespace, libraries: list[str], results: dict) -> list[dict]:
    """The prefix comparison's rows (datatrace's full TracIn row is the caller's)."""
    n_full, prefix = args.n_train, min(args.peer_train, args.n_train)
    exact = "TracIn" if args.peer_method == "tracin" else "Grad-Dot"

    def run(lib: str, n: int) -> tuple[dict | None, dict | None, str]:
        try:
            res, mats = run_repeated(args, f"peer-{lib}", n_full, {"prefix": n}, args.peer_timeout,
                                     1 if lib == "ref" else args.repeats)  # fmt: skip
        except subprocess.TimeoutExpired:
            return None, None, f"timed out after {args.peer_timeout:.0f} s"
        except Exception as exc:  # a peer failing is a result, not a crash of the suite
            return None, None, f"failed: {exc}"
        return res, mats, ""

    full_peers = [lib for lib in args.peer_full.split(",") if lib in PEERS and lib in libraries]
    ref, ref_m, err = run("ref", n_full if "datatrace" in libraries or full_peers else prefix)
    results["peer-ref"] = ref if ref is not None else {"error": err}
    print("peer-ref", results["peer-ref"], flush=True)

    def agreement_of(S: torch.Tensor | None, key: str = "S") -> float | None:
        return (
            None
            if ref_m is None or S is None
            else per_query_pearson(S, ref_m[key][:, : S.shape[1]])[0]
        )

    runs = [("datatrace", n_full), ("datatrace", prefix)] if "datatrace" in libraries else []
    for lib in (lib for lib in PEERS if lib in libraries):
        runs += [(lib, prefix)] + ([(lib, n_full)] if lib in full_peers else [])
    rows = []
    for lib, n in dict.fromkeys(runs):  # (datatrace, prefix) once when prefix == n_full
        res, mats, err = run(lib, n)
        key = f"peer-{lib}" + ("-full" if n == n_full else "")
        results[key] = res if res is not None else {"error": err}
        print(key, results[key], flush=True)
        S = mats["S"] if mats is not None else None
        notes = (
            [err]
            if err
            else [peer_note(lib, res, args, n, agreement_of(S, "S_last")), *run_notes(res)]
        )
        rows.append(harness.row(
            workload=workload_name(n_full), method=f"{args.peer_method}-proj{args.dim}", library=lib,
            seconds=res["seconds"] if res else None, n_train=n,
            extrapolated_seconds_full=res["seconds"] * n_full / n if res and n < n_full else None,
            peak_mem_gb=res["peak_rss_gb"] if res else None, agreement=agreement_of(S),
            agreement_with=f"exact {exact} (datatrace dt.{exact.replace('-', '')}(), no projection), "
            f"mean per-query Pearson over {args.peer_query} queries x the same {n:,} training examples",
            note="; ".join(notes)))  # fmt: skip
    return rows


def featurization(args: argparse.Namespace, results: dict) -> tuple[dict, float, float]:
    """plain, featurize, dense runs; prints the targets; returns datatrace's full row."""
    for mode, n in (("plain", args.n_train), ("featurize", args.n_train), ("dense", args.dense_n),
                    ("featurize-small", args.dense_n)):  # fmt: skip
        results[mode] = run_repeated(args, mode.split("-")[0], n, repeats=args.repeats)[0]
        print(mode, results[mode], flush=True)
    plain, feat = results["plain"], results["featurize"]
    ratio = feat["featurize_seconds"] / plain["seconds"]
    dense = results["dense"]["featurize_seconds"]
    dense_ratio = dense / results["featurize-small"]["featurize_seconds"]
    print(f"\n{args.n_train:,} training examples, MLP 64-512-512-10 (301k parameters), 2 checkpoints, k = {args.dim}\n"
          f"plain forward+backward over the data, per checkpoint x 2: {plain['seconds']:.2f} s ({2 * args.n_train / plain['seconds']:,.0f} examples/s)\n"
          f"datatrace featurize (per-example grads, Kronecker projection, on-disk store): {feat['featurize_seconds']:.2f} s = {ratio:.2f}x plain [target <= 2x: {'MET' if ratio <= 2 else 'MISSED'}]\n"
          f"top-10 of {args.n_query:,} queries over the store: {feat['top_k_seconds']:.2f} s; store {feat['store_mb']:.0f} MB\n"
          f"peak RSS: featurize+score {feat['peak_rss_gb']:.2f} GB [target < 4 GB: {'MET' if feat['peak_rss_gb'] < 4 else 'MISSED'}]; plain {plain['peak_rss_gb']:.2f} GB\n"
          f"dense projection (every gradient formed) on {args.dense_n:,}: {dense:.2f} s vs Kronecker {results['featurize-small']['featurize_seconds']:.2f} s ({dense_ratio:.1f}x)")  # fmt: skip
    notes = [f"{k}: {t}" for k, r in (("featurize", feat), ("plain", plain)) for t in run_notes(r)]
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
    ap = harness.arg_parser(
        __doc__, "datatrace,dattri,captum,traker", batch_size=512, max_wait=120.0
    )
    ap.add_argument("--n-train", "--n", type=int, default=100_000)
    ap.add_argument("--n-query", type=int, default=1_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--dense-n", type=int, default=2_000)
    ap.add_argument("--block", type=int, default=4, help="kronecker_block m")
    ap.add_argument("--peer-train", type=int, default=5_000, help="prefix each peer runs on")
    ap.add_argument("--peer-full", default="", help="peers to also run on the full set (measured)")
    ap.add_argument("--peer-query", type=int, default=100, help="queries scored by each peer")
    ap.add_argument("--peer-method", choices=("graddot", "tracin"), default="graddot")
    ap.add_argument("--slow-threshold", type=float, default=30.0)
    ap.add_argument("--peer-timeout", type=float, default=1800, help="seconds per peer run")
    args = ap.parse_args(argv)
    if args.worker:
        return harness.worker_main(args.worker, scale_worker)
    if args.quick:  # smaller defaults; values given explicitly win
        for name, value in (("n_train", 5_000), ("peer_train", 1_000), ("dense_n", 200),
                            ("repeats", 1), ("max_wait", 10.0)):  # fmt: skip
            if getattr(args, name) == ap.get_default(name):
                setattr(args, name, value)
    libraries = [s.strip() for s in args.libraries.split(",") if s.strip()]
    if unknown := set(libraries) - {"datatrace", *PEERS}:
        ap.error(f"unknown libraries {sorted(unknown)}")
    results: dict = {}
    rows: list[dict] = []
    ratio = dense_ratio = None
    if "datatrace" in libraries:
        row, ratio, dense_ratio = featurization(args, results)
        rows.append(row)
    print(f"\npeers: {args.peer_method}, k = {args.dim}, {args.peer_query} queries, prefix "
          f"{min(args.peer_train, args.n_train):,} of {args.n_train:,} training examples", flush=True)  # fmt: skip
    rows += peers(args, libraries, results)
    harness.print_rows(rows)
    harness.write_json(args.json, {"args": vars(args), "results": results, "featurize_vs_plain": ratio,
                                   "dense_vs_kronecker": dense_ratio, "rows": rows})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
