#!/usr/bin/env python
"""Distilled Datamodel against real group leave-out retraining, and against per-example
methods summed per group.

Usage::

    python bench/bench_ddm.py [--quick] [--seeds 3] [--json bench/results_ddm.json]

Workloads (scikit-learn's bundled data, offline, seeded): ``digits`` (1,000 train, 200
queries, MLP 64-32-10 tanh, 20 groups = class-wise k-means, 2 per class) and
``breast_cancer`` (400 train, 150 queries, MLP 30-16-2 tanh, 10 groups, 5 per class). Each
model is trained from a seeded initialisation by SGD with momentum and cosine decay on
``mean CE + α‖θ‖²`` (α = 1e-3), 5 learning-rate-weighted checkpoints.

* Gold standard: ``dt.truth.group_leave_out`` retraining from scratch, same seed and batch
  order with the group skipped, mean over ``--seeds`` seeds (the full model retrained
  with each seed too).
* Methods: DDM (``attribute``, and datamodel mode); Grad-Dot (final model), TracIn (the 5
  checkpoints), DataInf and EK-FAC influence (λ = 0.01): per-example scores summed over
  each group. Agreement: per-query Pearson / Spearman over groups, mean ± se.
* Cost: one training run, DDM offline fit (and its fraction of training), DDM online per
  group vs retraining per group (one seed).
* Unlearning: accuracy on the removed group's examples and on the rest of the training
  data, original / fast-unlearned / retrained (seed 0), for 3 groups.
* Data quality (digits): labels of half the members of 3 groups flipped before training;
  groups ranked by their removal effect on the mean clean query loss (most harmful
  first); where the noisy groups land.
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import Any

import torch
from harness import write_json
from internals import kmeans_groups, load_sklearn, sgd_train
from torch import nn

import datatrace as dt

ALPHA = 1e-3


def workload(name: str, n_train: int, n_query: int, hidden: int, clusters: int, noise: int,
             seed: int = 0, epochs: int = 30) -> dict:  # fmt: skip
    """Seeded split, class-wise k-means groups, labels of half of ``noise`` groups flipped;
    ``fit(indices, seed, checkpoints)`` trains on a subset with the group order kept."""
    x, y = load_sklearn(name)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:n_train], perm[n_train : n_train + n_query]
    xt, yt, xq, yq = x[tr], y[tr].clone(), x[te], y[te]
    k = int(y.max()) + 1
    groups, group_class = kmeans_groups(yt, xt, clusters, seed=seed, min_size=12)
    noisy: list[int] = []
    if noise:
        g = torch.Generator().manual_seed(seed + 7)
        noisy = sorted(torch.randperm(int(groups.max()) + 1, generator=g)[:noise].tolist())
        for grp in noisy:
            members = torch.nonzero(groups == grp).flatten()
            flip = members[torch.randperm(len(members), generator=g)[: len(members) // 2]]
            yt[flip] = (yt[flip] + 1 + torch.randint(0, k - 1, (len(flip),), generator=g)) % k

    def make() -> nn.Module:
        return nn.Sequential(
            nn.Linear(x.shape[1], hidden), nn.Tanh(), nn.Linear(hidden, k)
        ).double()

    def fit(indices: torch.Tensor, s: int, checkpoints: int = 0):
        keep = torch.zeros(n_train, dtype=torch.bool)
        keep[indices] = True
        return sgd_train(make, xt, yt, s, epochs, 0.1, 32, 0.9, ALPHA, checkpoints, keep=keep)

    return dict(name=name, xt=xt, yt=yt, xq=xq, yq=yq, groups=groups, k=k, fit=fit, noisy=noisy,
                group_class=group_class, n_train=n_train)  # fmt: skip


def per_group(scores: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    n_groups = int(groups.max()) + 1
    out = torch.zeros(scores.shape[0], n_groups, dtype=torch.float64)
    out.index_add_(1, groups, scores.double())
    return out


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean()) if len(x) else float("nan")


def summed_scores(task: Any, ckpts: list, train: tuple, queries: tuple, groups: torch.Tensor,
                  out: dict) -> dict[str, torch.Tensor]:  # fmt: skip
    """Per-example methods, their scores summed over each group (times into ``out``)."""
    scores = {}
    for label, method, cks in (
        ("Grad-Dot (sum)", dt.GradDot(), ckpts[-1:]),
        ("TracIn (sum)", dt.TracIn(), ckpts),
        ("DataInf λ=0.01 (sum)", dt.DataInf(damping=0.01), ckpts[-1:]),
        ("EK-FAC λ=0.01 (sum)", dt.Influence(dt.EKFAC(damping=0.01)), ckpts[-1:]),
        ("exact IF λ=0.01 (sum)", dt.Influence(dt.ExactHessian(damping=0.01)), ckpts[-1:]),
    ):
        t0 = time.perf_counter()
        scores[label] = per_group(
            method.fit(task, cks, train, progress=False).attribute(queries), groups
        )
        out.setdefault("method_s", {})[label] = time.perf_counter() - t0
    return scores


def unlearning(groups: torch.Tensor, train: tuple, model: nn.Module, fitted: Any, train_fn: Any,
               n_groups: int) -> list[dict]:  # fmt: skip
    """Accuracy on the removed group and on the rest: original / fast-unlearned / retrained."""
    x, y = train
    out = []
    for grp in range(min(3, n_groups)):
        mask = groups == grp
        models = {"original": model, "fast_unlearned": fitted.unlearn(grp),
                  "retrained": train_fn(torch.nonzero(~mask).flatten(), 0)}  # fmt: skip
        out.append({"group": grp, **{k: [accuracy(m, x[mask], y[mask]), accuracy(m, x[~mask], y[~mask])]
                                     for k, m in models.items()}})  # fmt: skip
    return out


def run(wl: dict, seeds: int, quick: bool) -> dict:
    out: dict = {
        "workload": wl["name"],
        "n_train": wl["n_train"],
        "n_groups": int(wl["groups"].max()) + 1,
    }
    train, queries = (wl["xt"], wl["yt"]), (wl["xq"], wl["yq"])
    t0 = time.perf_counter()
    model, ckpts = wl["fit"](torch.arange(wl["n_train"]), 0, 5)
    t_train = time.perf_counter() - t0
    task = dt.ClassificationTask(model, num_classes=wl["k"])
    out["train_s"] = t_train
    out["train_acc"] = accuracy(model, *train)
    out["query_acc"] = accuracy(model, *queries)

    # DDM offline + online
    ddm = dt.DistilledDatamodel(groups=wl["groups"], synset_per_group=4, weight_decay=2 * ALPHA)
    t0 = time.perf_counter()
    fitted = ddm.fit(task, ckpts, train, progress=False)
    out["ddm_offline_s"] = time.perf_counter() - t0
    fitted.attribute((wl["xq"][:1], wl["yq"][:1]))  # warm-up: first-call torch.func costs
    t0 = time.perf_counter()
    scores = {"DDM": fitted.attribute(queries)}
    out["ddm_online_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores["DDM datamodel (64 subsets)"] = fitted.datamodel(queries, n_subsets=64)[0]
    out["ddm_datamodel_s"] = time.perf_counter() - t0
    out["matching"] = fitted.history

    scores.update(summed_scores(task, ckpts, train, queries, wl["groups"], out))

    # gold: group leave-out retraining
    def train_fn(idx: torch.Tensor, s: int) -> nn.Module:
        return wl["fit"](idx, s)[0]

    t0 = time.perf_counter()
    gold = dt.truth.group_leave_out(
        train_fn, task, train, queries, wl["groups"], seeds=range(seeds), progress=False
    )
    out["gold_s"] = time.perf_counter() - t0
    n_runs = seeds * (out["n_groups"] + 1)
    out["retrain_per_group_s"] = out["gold_s"] / n_runs
    out["online_per_group_s"] = out["ddm_online_s"] / out["n_groups"]
    out["online_speedup"] = out["retrain_per_group_s"] / out["online_per_group_s"]
    out["offline_fraction_of_training"] = out["ddm_offline_s"] / t_train

    out["agreement"] = {}
    for label, s in scores.items():
        a = dt.metrics.agreement(s, gold)
        out["agreement"][label] = {k: list(v) for k, v in a.items()}

    out["unlearning"] = unlearning(wl["groups"], train, model, fitted, train_fn, out["n_groups"])

    if wl["noisy"]:
        quality = {}
        for label, s in scores.items():
            harm = s.mean(0)  # removal effect on the mean query loss; negative = harmful
            order = torch.argsort(harm).tolist()  # most harmful first
            quality[label] = sorted(order.index(g) + 1 for g in wl["noisy"])
        out["noisy_groups"] = wl["noisy"]
        out["noisy_group_ranks"] = quality
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.quick:
        loads = [workload("digits", 300, 50, 16, 1, noise=2, epochs=10)]
    else:
        loads = [workload("digits", 1000, 200, 32, 2, noise=3),
                 workload("breast_cancer", 400, 150, 16, 5, noise=0)]  # fmt: skip
    results = []
    for wl in loads:
        r = run(wl, args.seeds, args.quick)
        results.append(r)
        print(
            f"\n=== {r['workload']}: {r['n_train']} train, {r['n_groups']} groups; "
            f"train acc {r['train_acc']:.3f}, query acc {r['query_acc']:.3f}"
        )
        print(
            f"one training run {r['train_s']:.2f} s; DDM offline {r['ddm_offline_s']:.2f} s "
            f"({r['offline_fraction_of_training']:.2f}x training); online {r['ddm_online_s']:.3f} s "
            f"for all groups; retraining per group {r['retrain_per_group_s']:.2f} s -> online "
            f"{r['online_speedup']:.0f}x faster per group"
        )
        print(f"{'method':30s} {'pearson':>16s} {'spearman':>16s}")
        for label, a in r["agreement"].items():
            p, s = a["pearson"], a["spearman"]
            print(f"{label:30s} {p[0]:+.3f} ± {p[1]:.3f}   {s[0]:+.3f} ± {s[1]:.3f}")
        print("unlearning (accuracy on removed group / on the rest):")
        for u in r["unlearning"]:
            print(
                f"  group {u['group']}: original {u['original'][0]:.3f}/{u['original'][1]:.3f}  "
                f"fast-unlearned {u['fast_unlearned'][0]:.3f}/{u['fast_unlearned'][1]:.3f}  "
                f"retrained {u['retrained'][0]:.3f}/{u['retrained'][1]:.3f}"
            )
        if "noisy_group_ranks" in r:
            print(
                f"noisy groups {r['noisy_groups']}: their ranks (1 = most harmful) of {r['n_groups']}:"
            )
            for label, ranks in r["noisy_group_ranks"].items():
                print(f"  {label:30s} {ranks}")
    env = {"torch": torch.__version__, "python": platform.python_version(), "threads": 2,
           "seeds": args.seeds, "quick": args.quick}  # fmt: skip
    write_json(args.json, {"environment": env, "results": results})


if __name__ == "__main__":
    main()
