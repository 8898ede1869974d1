"""Iterative solvers' defaults against the exact solve on the issue-12 case: a 7,850-
parameter model on digits (``--model logreg``: Linear(784, 10) on the 8x8 images upsampled
to 28x28; ``--model mlp``: 64-104-10 ReLU MLP, 7,810 parameters), SGD with momentum,
1,000 training examples, 500 queries. Prints fit+attribute time and the agreement of each
solver's scores with the exact solve's (per-query Spearman / cosine, mean).

    PYTHONPATH=src python bench/solver_defaults.py --model mlp --damping 0.1

Timings are single-threaded (``torch.set_num_threads(1)``) and noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import datatrace as dt
from datatrace.metrics import agreement


def task_data(model_kind: str, n_train: int, n_query: int, seed: int = 0, hidden: int = 104):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.int64)
    if model_kind == "logreg":
        img = F.interpolate(x.reshape(-1, 1, 8, 8), size=(28, 28), mode="bilinear")
        x = img.reshape(len(x), -1).contiguous()
        model: nn.Module = nn.Linear(784, 10)
    else:
        model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    tr, q = perm[:n_train], perm[n_train : n_train + n_query]
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(30):
        for idx in torch.randperm(n_train, generator=g).split(32):
            opt.zero_grad()
            F.cross_entropy(model(x[tr][idx]), y[tr][idx]).backward()
            opt.step()
    return model, (x[tr], y[tr]), (x[q], y[q])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", choices=["logreg", "mlp"], default="mlp")
    ap.add_argument("--damping", type=float, default=0.1)
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-query", type=int, default=500)
    ap.add_argument("--solvers", default="exact,cg,lissa,arnoldi")
    ap.add_argument(
        "--sizes",
        default="",
        help="MLP hidden widths (e.g. 104,160,213): time exact vs EK-FAC at each "
        "(what chose curvature.auto.EXACT_MAX_PARAMS)",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.sizes:
        for hidden in [int(h) for h in args.sizes.split(",")]:
            sizes(args, hidden)
        return
    model, train, queries = task_data(args.model, args.n_train, args.n_query)
    p = sum(t.numel() for t in model.parameters())
    task = dt.ClassificationTask(model)
    ckpts = [dt.Checkpoint.from_module(model)]
    lam = args.damping
    solvers = {
        "exact": dt.ExactHessian(damping=lam),
        "cg": dt.ConjugateGradient(damping=lam),
        "lissa": dt.LiSSA(damping=lam),
        "arnoldi": dt.Arnoldi(damping=lam),
    }
    print(f"{args.model}: {p:,} parameters, n={args.n_train}, {args.n_query} queries, λ={lam}")
    ref = None
    for name in args.solvers.split(","):
        t0 = time.perf_counter()
        fitted = dt.Influence(solvers[name]).fit(task, ckpts, train, progress=False)
        scores = fitted.attribute(queries)
        seconds = time.perf_counter() - t0
        extra = ""
        pre = fitted.preconditioners[0]
        if hasattr(pre, "iterations"):
            extra = f" iterations {pre.iterations} residual {pre.residual:.1e}"
        if hasattr(pre, "depth"):
            extra = f" depth {pre.depth} scale {pre.scale:.3g}"
        if name == "exact":
            ref = scores
        agree = ""
        if ref is not None and name != "exact":
            a = agreement(scores, ref)
            agree = f" vs exact: spearman {a['spearman'][0]:.4f} cosine {a['cosine'][0]:.4f}"
        print(f"{name:8s} {seconds:7.1f} s{agree}{extra}", flush=True)


def sizes(args: argparse.Namespace, hidden: int) -> None:
    model, train, queries = task_data("mlp", args.n_train, args.n_query, hidden=hidden)
    p = sum(t.numel() for t in model.parameters())
    task = dt.ClassificationTask(model)
    ckpts = [dt.Checkpoint.from_module(model)]
    times = {}
    for name, pre in (
        ("exact", dt.ExactHessian(damping=args.damping, max_params=10**6)),
        ("ekfac", dt.EKFAC(damping=args.damping)),
        ("cg", dt.ConjugateGradient(damping=args.damping)),
    ):
        t0 = time.perf_counter()
        dt.Influence(pre).fit(task, ckpts, train, progress=False).attribute(queries)
        times[name] = time.perf_counter() - t0
    print(
        f"{p:7,} parameters: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()), flush=True
    )


if __name__ == "__main__":
    main()
