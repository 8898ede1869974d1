#!/usr/bin/env python
"""Scale run: TracIn with a 1,024-dimensional random projection on 100,000 training examples.

Usage::

    python bench/bench_scale.py [--n-train 100000] [--n-query 1000] [--dim 1024] [--json F]

Workload: synthetic inputs (64 features, 10 classes, seeded), an MLP 64-512-512-10 (301k
parameters), 2 checkpoints, float32, 2 threads. Each measurement runs in a fresh process
so that its peak resident memory (``ru_maxrss``) is its own:

* ``plain``: one forward + backward pass over the training set in batches (the cost of
  one epoch of training without the optimizer step), per checkpoint: the reference the
  featurization throughput is compared with.
* ``featurize``: ``dt.TracIn(projection_dim=dim).fit(..., store=DIR)`` (per-example
  gradients through the hooked layers, Kronecker-structured projection, written to the
  on-disk store), then ``top_k(queries, k=10)`` streamed over training blocks.
* ``dense``: the same with ``kronecker=False`` (every per-example gradient formed, then
  projected by a dense Gaussian matrix), on a 10,000-example slice (it is slower), to show
  what the factored projection saves.

Targets of the scale issue: featurization within 2x of ``plain``; peak RSS under 4 GB.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 64, generator=g)
    w = torch.randn(64, 10, generator=g)
    y = (x @ w + 0.5 * torch.randn(n, 10, generator=g)).argmax(1)
    return x, y


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )


def worker(args: argparse.Namespace) -> dict:
    import datatrace as dt

    torch.set_num_threads(2)
    x, y = data(args.n_train, 0)
    xq, yq = data(args.n_query, 1)
    m = model()
    ckpts = [dt.Checkpoint.from_module(m, weight=0.1)]
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.01)
    ckpts.append(dt.Checkpoint.from_module(m, weight=0.05))
    out: dict = {"mode": args.worker, "n_train": args.n_train}
    t0 = time.perf_counter()
    if args.worker == "plain":
        loss_fn = nn.CrossEntropyLoss()
        for ck in ckpts:
            m.load_state_dict(ck.state)
            for s in range(0, len(x), args.batch_size):
                m.zero_grad(set_to_none=True)
                loss_fn(m(x[s : s + args.batch_size]), y[s : s + args.batch_size]).backward()
        out["seconds"] = time.perf_counter() - t0
    else:
        kron = args.worker != "dense"
        spec = dt.FeatureSpec(
            projection_dim=args.dim, kronecker=None if kron else False, kronecker_block=args.block
        )
        method = dt.GradientAttributor(spec, normalize=False, all_checkpoints=True, name="TracIn")
        task = dt.ClassificationTask(m)
        with tempfile.TemporaryDirectory() as store:
            fitted = method.fit(
                task, ckpts, (x, y), store=store, batch_size=args.batch_size, progress=False
            )
            out["featurize_seconds"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            vals, _ = fitted.top_k((xq, yq), k=10)
            out["top_k_seconds"] = time.perf_counter() - t1
            out["store_mb"] = fitted.store.nbytes() / 1e6 if fitted.store is not None else 0
            out["checksum"] = float(vals.double().sum())
        out["seconds"] = out["featurize_seconds"]
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-train", type=int, default=100_000)
    ap.add_argument("--n-query", type=int, default=1_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--dense-n", type=int, default=2_000)
    ap.add_argument("--block", type=int, default=4, help="kronecker_block m")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    results = {}
    for mode, n in (("plain", args.n_train), ("featurize", args.n_train), ("dense", args.dense_n),
                    ("featurize-small", args.dense_n)):  # fmt: skip
        cmd = [sys.executable, __file__, "--worker", mode.split("-")[0], "--n-train", str(n),
               "--n-query", str(args.n_query), "--dim", str(args.dim),
               "--batch-size", str(args.batch_size), "--block", str(args.block)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(mode, results[mode], flush=True)
    plain, feat = results["plain"], results["featurize"]
    ratio = feat["featurize_seconds"] / plain["seconds"]
    dense_ratio = (
        results["dense"]["featurize_seconds"] / results["featurize-small"]["featurize_seconds"]
    )
    print()
    print(
        f"{args.n_train:,} training examples, MLP 64-512-512-10 (301k parameters), 2 checkpoints, k = {args.dim}"
    )
    print(
        f"plain forward+backward over the data, per checkpoint x 2: {plain['seconds']:.2f} s ({2 * args.n_train / plain['seconds']:,.0f} examples/s)"
    )
    print(
        f"datatrace featurize (per-example grads, Kronecker projection, on-disk store): {feat['featurize_seconds']:.2f} s = {ratio:.2f}x plain [target <= 2x: {'MET' if ratio <= 2 else 'MISSED'}]"
    )
    print(
        f"top-10 of {args.n_query:,} queries over the store: {feat['top_k_seconds']:.2f} s; store {feat['store_mb']:.0f} MB"
    )
    print(
        f"peak RSS: featurize+score {feat['peak_rss_gb']:.2f} GB [target < 4 GB: {'MET' if feat['peak_rss_gb'] < 4 else 'MISSED'}]; plain {plain['peak_rss_gb']:.2f} GB"
    )
    print(
        f"dense projection (every gradient formed) on {args.dense_n:,}: {results['dense']['featurize_seconds']:.2f} s vs Kronecker {results['featurize-small']['featurize_seconds']:.2f} s ({dense_ratio:.1f}x)"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results, "featurize_vs_plain": ratio,
                       "dense_vs_kronecker": dense_ratio}, fh, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
