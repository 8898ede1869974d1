#!/usr/bin/env python
"""Distilled Datamodel against real group leave-out retraining, and against per-example
methods summed per group; cost, unlearning and noisy-group ranks.

    python bench/bench_ddm.py [--quick] [--seeds 3] [--json bench/results_ddm.json]

Workloads, gold standard, methods and measures: bench/README.md (Distilled Datamodel).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import harness
import torch
from internals import kmeans_groups, load_sklearn, sgd_train
from torch import nn

import datatrace as dt

ALPHA = 1e-3
UNLEARN = ("original", "fast_unlearned", "retrained")


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


def record_time(out: dict, key: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, its seconds into ``out[key]``."""
    t0 = time.perf_counter()
    result = fn()
    out[key] = time.perf_counter() - t0
    return result


def per_group(scores: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(scores.shape[0], int(groups.max()) + 1, dtype=torch.float64)
    return out.index_add_(1, groups, scores.double())


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean()) if len(x) else float("nan")


def run(wl: dict, seeds: int) -> dict:
    n_groups = int(wl["groups"].max()) + 1
    out: dict = {"workload": wl["name"], "n_train": wl["n_train"], "n_groups": n_groups}
    train, queries = (wl["xt"], wl["yt"]), (wl["xq"], wl["yq"])
    model, ckpts = record_time(out, "train_s", lambda: wl["fit"](torch.arange(wl["n_train"]), 0, 5))
    task = dt.ClassificationTask(model, num_classes=wl["k"])
    out.update(train_acc=accuracy(model, *train), query_acc=accuracy(model, *queries))
    # DDM offline + online
    ddm = dt.DistilledDatamodel(groups=wl["groups"], synset_per_group=4, weight_decay=2 * ALPHA)
    fitted = record_time(out, "ddm_offline_s", lambda: ddm.fit(task, ckpts, train, progress=False))
    fitted.attribute((wl["xq"][:1], wl["yq"][:1]))  # warm-up: first-call torch.func costs
    scores = {"DDM": record_time(out, "ddm_online_s", lambda: fitted.attribute(queries))}
    scores["DDM datamodel (64 subsets)"] = record_time(
        out, "ddm_datamodel_s", lambda: fitted.datamodel(queries, n_subsets=64)[0])  # fmt: skip
    out["matching"], out["method_s"] = fitted.history, {}
    # per-example methods, their scores summed over each group
    for label, method, cks in (
        ("Grad-Dot (sum)", dt.GradDot(), ckpts[-1:]), ("TracIn (sum)", dt.TracIn(), ckpts),
        ("DataInf λ=0.01 (sum)", dt.DataInf(damping=0.01), ckpts[-1:]),
        ("EK-FAC λ=0.01 (sum)", dt.Influence(dt.EKFAC(damping=0.01)), ckpts[-1:]),
        ("exact IF λ=0.01 (sum)", dt.Influence(dt.ExactHessian(damping=0.01)), ckpts[-1:]),
    ):  # fmt: skip
        fitted_m = record_time(
            out["method_s"], label, lambda: method.fit(task, cks, train, progress=False)
        )
        scores[label] = per_group(fitted_m.attribute(queries), wl["groups"])

    def train_fn(idx: torch.Tensor, s: int) -> nn.Module:
        return wl["fit"](idx, s)[0]

    gold = record_time(out, "gold_s", lambda: dt.truth.group_leave_out(  # group leave-out retraining
        train_fn, task, train, queries, wl["groups"], seeds=range(seeds), progress=False))  # fmt: skip
    out["retrain_per_group_s"] = out["gold_s"] / (seeds * (n_groups + 1))
    out["online_per_group_s"] = out["ddm_online_s"] / n_groups
    out["online_speedup"] = out["retrain_per_group_s"] / out["online_per_group_s"]
    out["offline_fraction_of_training"] = out["ddm_offline_s"] / out["train_s"]
    out["agreement"] = {label: {k: list(v) for k, v in dt.metrics.agreement(s, gold).items()}
                        for label, s in scores.items()}  # fmt: skip
    x, y = train  # unlearning: accuracy on the removed group and on the rest
    out["unlearning"] = []
    for grp in range(min(3, n_groups)):
        m = wl["groups"] == grp
        nets = (model, fitted.unlearn(grp), train_fn(torch.nonzero(~m).flatten(), 0))
        acc = [[accuracy(net, x[m], y[m]), accuracy(net, x[~m], y[~m])] for net in nets]
        out["unlearning"].append({"group": grp, **dict(zip(UNLEARN, acc, strict=True))})
    if wl["noisy"]:  # ranks of the noisy groups by removal effect on the mean query loss
        out["noisy_groups"] = wl["noisy"]
        out["noisy_group_ranks"] = {label: sorted(torch.argsort(s.mean(0)).tolist().index(g) + 1
                                                  for g in wl["noisy"]) for label, s in scores.items()}  # fmt: skip
    return out


def report(r: dict) -> None:
    print(f"\n=== {r['workload']}: {r['n_train']} train, {r['n_groups']} groups; train acc "
          f"{r['train_acc']:.3f}, query acc {r['query_acc']:.3f}\none training run {r['train_s']:.2f} s; "
          f"DDM offline {r['ddm_offline_s']:.2f} s ({r['offline_fraction_of_training']:.2f}x training); "
          f"online {r['ddm_online_s']:.3f} s for all groups; retraining per group "
          f"{r['retrain_per_group_s']:.2f} s -> online {r['online_speedup']:.0f}x faster per group")  # fmt: skip
    for label, a in r["agreement"].items():
        (p, pe), (s, se) = a["pearson"], a["spearman"]
        print(f"{label:30s} pearson {p:+.3f} ± {pe:.3f}   spearman {s:+.3f} ± {se:.3f}")
    for u in r["unlearning"]:  # accuracy on the removed group / on the rest
        accs = "  ".join(f"{k} {u[k][0]:.3f}/{u[k][1]:.3f}" for k in UNLEARN)
        print(f"  unlearn group {u['group']}: {accs}")
    if "noisy_group_ranks" in r:
        print(
            f"noisy groups {r['noisy_groups']}: their ranks (1 = most harmful) of {r['n_groups']}:"
        )
        for label, ranks in r["noisy_group_ranks"].items():
            print(f"  {label:30s} {ranks}")


def main(argv: list[str] | None = None) -> None:
    own = lambda ap: ap.add_argument("--seeds", type=int, default=3)  # noqa: E731
    args = harness.parse_args(__doc__, "datatrace", argv, own, repeats=None)
    torch.set_num_threads(args.threads)
    if args.quick:
        loads = [workload("digits", 300, 50, 16, 1, noise=2, epochs=10)]
    else:
        loads = [workload("digits", 1000, 200, 32, 2, noise=3),
                 workload("breast_cancer", 400, 150, 16, 5, noise=0)]  # fmt: skip
    results = [run(wl, args.seeds) for wl in loads]
    for r in results:
        report(r)
    env = harness.environment(seeds=args.seeds, quick=args.quick)
    harness.write_json(args.json, {"environment": env, "rows": rows(results), "results": results})


def rows(results: list[dict]) -> list[dict]:
    """The rows ``suite.py`` reads: each method's Pearson with group leave-out retraining,
    its seconds (the DDM's: offline + online)."""

    def seconds(r: dict, label: str) -> float:
        online = r["ddm_datamodel_s" if "datamodel" in label else "ddm_online_s"]
        return r["method_s"].get(label, r["ddm_offline_s"] + online)

    return [harness.row(workload=f"{r['workload']} groups", method=label, library="datatrace",
                        seconds=seconds(r, label), agreement=a["pearson"][0],
                        agreement_with="group leave-out retraining (Pearson)")
            for r in results for label, a in r["agreement"].items()]  # fmt: skip


if __name__ == "__main__":
    main()
