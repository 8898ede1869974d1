#!/usr/bin/env python
"""How close is each attribution method to true leave-one-out retraining?

    python bench/influence_quality.py [--n-left-out 40] [--out bench/out]

Problems, truth and measures: bench/README.md (Agreement with leave-one-out retraining).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from internals import logistic_regression_problem, mlp_problem

import datatrace as dt

SWEPT = {"Exact Hessian": dt.ExactHessian, "Gauss-Newton": dt.GaussNewton, "EK-FAC": dt.EKFAC}


def methods(lam: float, p: int) -> dict[str, dt.GradientAttributor]:
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


def evaluate(problem: Any, n_left_out: int, out: Path) -> None:
    """Every method against the (cached) leave-one-out truth, then the damping sweep."""
    task, ckpts = dt.ClassificationTask(problem.model), [dt.Checkpoint.from_module(problem.model)]
    n, p = len(problem.train[0]), sum(t.numel() for t in problem.model.parameters())
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:n_left_out]
    cache = out / f"loo-{problem.name}-{n_left_out}.pt"
    if cache.exists():
        truth = torch.load(cache, weights_only=True)
    else:
        t0 = time.perf_counter()
        truth = dt.truth.leave_one_out(
            problem.train_fn, task, problem.train, problem.queries, indices=idx
        )
        torch.save(truth, cache)
        print(f"{problem.name}: leave-one-out truth in {time.perf_counter() - t0:.1f} s")
    lam = 2 * problem.alpha
    print(f"\n{problem.name}: {n} train, {len(problem.queries[0])} queries, {p} params, damping 2α = "
          f"{lam:g}; agreement with leave-one-out over {len(idx)} examples\n"
          f"  {'method':<16}{'Pearson':>16}{'Spearman':>16}{'cosine':>16}{'time s':>9}")  # fmt: skip
    for label, method in methods(lam, p).items():
        t0 = time.perf_counter()
        scores = method.fit(task, ckpts, problem.train, progress=False).attribute(problem.queries)
        dt_s = time.perf_counter() - t0
        a = dt.metrics.agreement(scores[:, idx], truth)
        print(f"  {label:<16}{''.join(f'{a[k][0]:>10.3f} ±{a[k][1]:.3f}' for k in a)}{dt_s:>9.2f}")
    print("  damping sweep (multiples of λ₀; Pearson):")
    lam0 = dt.mean_squared_gradient(task, ckpts[0], problem.train)
    for label, solver in SWEPT.items():
        pts = dt.damping_sweep(lambda d, s=solver: dt.Influence(s(damping=d)), task, ckpts, problem.train,
                               problem.queries, multipliers=(0.01, 0.1, 1.0, 10.0, 100.0), progress=False)  # fmt: skip
        r = [dt.metrics.agreement(pt.scores[:, idx], truth)["pearson"][0] for pt in pts]
        sweep = "  ".join(f"{pt.multiplier:g}x: {x:.3f}" for pt, x in zip(pts, r, strict=True))
        print(f"    {label:<14} λ₀={lam0:.3g}  {sweep}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-left-out", type=int, default=40)
    ap.add_argument("--out", type=Path, default=Path("bench/out"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    for problem in (logistic_regression_problem(), mlp_problem()):
        evaluate(problem, args.n_left_out, args.out)


if __name__ == "__main__":
    main()
