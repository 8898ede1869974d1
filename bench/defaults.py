#!/usr/bin/env python
"""The defaults suite (issue 12): is each method's default close to the best it can do?

Usage::

    python bench/defaults.py [--quick] [--tasks a,b] [--json out.json] [--cache bench/out/defaults]

Five real tasks of different kinds, built and retrained with ``dt.truth`` (float32, SGD as
people train):

* ``logreg_bc``: L2 logistic regression (α = 1e-3) on breast cancer (standardised);
* ``mlp_sgd``: a 64-32-10 ReLU MLP on digits, plain SGD, no weight decay;
* ``mlp_mom_wd``: a 64-32-10 tanh MLP on digits, SGD momentum 0.9, weight decay 5e-4;
* ``cnn_digits``: a two-conv CNN on the 8×8 digits images, SGD momentum 0.9;
* ``mlp_diabetes``: a 10-32-1 tanh regression MLP on diabetes (squared error; no TRAK).

Ground truth per task: the LDS (``dt.truth.subset_retraining``: half-size subsets, a new
seed each) and leave-one-out (``dt.truth.leave_one_out``, a few left-out examples, mean over
seeds, same seed with and without); both cached under ``--cache`` and resumed.

For every method (Grad-Dot, Grad-Cos, TracIn, Influence with the exact Hessian / CG / LiSSA /
Arnoldi / K-FAC / EK-FAC, DataInf, TRAK) the suite scores the default, then every point of
a grid of its settings (damping ``λ₀ × 10^k``, k = -3..2; TRAK also 0 and multiples of its
Gram matrix's mean eigenvalue; LiSSA at depth 300 × batch 100 only; in the full run also
Arnoldi at rank 200) and reports
the default's LDS, the grid's best, their ratio (target ≥ 0.95 or within 0.02), the
leave-one-out Spearman of both, and the default's seconds (fit + attribute) over the exact
solve's. The exact Hessian also runs with ``damping="auto"``. Rows go through
``bench/harness.py`` (``print_rows``, ``write_json``).

The Distilled Datamodel runs against group leave-out retraining (class-wise k-means groups
as they come, tiny clusters included) on three tasks (two with ``--quick``), beside the
summed exact influence of each group.

``--quick``: two tasks (logreg_bc, mlp_sgd), 200 training examples, 20 queries, 24 subsets,
16 left out × 2 seeds; a few minutes. The full run: 5 tasks, 400 training examples, 40
queries, 50 subsets, 20 left out × 3 seeds; designed for ≤ 30 min on a quiet 2-core machine.
Timings on a busy machine are noisy (the harness's contention watch is printed).
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TQDM_DISABLE", "1")

import torch
import torch.nn.functional as F
from harness import CpuWatch, environment, print_rows, row, write_json
from internals import kmeans_groups, sgd_train
from torch import nn

import datatrace as dt

MULTIPLIERS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


# ----------------------------------------------------------------------------- tasks


@dataclass
class Sizes:
    n_train: int
    n_query: int
    n_subsets: int
    n_loo: int
    loo_seeds: tuple[int, ...]


QUICK = Sizes(200, 20, 24, 16, (0, 1))
FULL = Sizes(400, 40, 50, 20, (0, 1, 2))


@dataclass
class Task:
    name: str
    kind: str
    task: Any
    train: tuple[torch.Tensor, torch.Tensor]
    queries: tuple[torch.Tensor, torch.Tensor]
    ckpts: list[Any]
    train_fn: Callable[[torch.Tensor, int], nn.Module]
    classification: bool
    #: the L2 coefficient of training in torch.optim.SGD's sense (the DDM's weight_decay)
    weight_decay: float = 0.0


def _split(x: torch.Tensor, y: torch.Tensor, s: Sizes, seed: int = 0) -> tuple:
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    tr, q = perm[: s.n_train], perm[s.n_train : s.n_train + s.n_query]
    return (x[tr], y[tr]), (x[q], y[q])


def _classifier(
    name: str, kind: str, dataset: str, make: Callable[[], nn.Module], s: Sizes, *,
    epochs: int, lr: float, momentum: float, weight_decay: float = 0.0, alpha: float = 0.0,
    image: bool = False,
) -> Task:  # fmt: skip
    x, y = _load(dataset)
    if image:
        x = x.reshape(-1, 1, 8, 8)
    train, queries = _split(x, y, s)

    def fit(keep_idx: torch.Tensor | None, seed: int) -> tuple[nn.Module, list]:
        keep = None
        if keep_idx is not None:
            keep = torch.zeros(len(train[0]), dtype=torch.bool)
            keep[keep_idx] = True
        return sgd_train(
            make, train[0], train[1], seed, epochs, lr, 32, momentum, alpha, checkpoints=4,
            keep=keep, weight_decay=weight_decay,
        )  # fmt: skip

    model, ckpts = fit(None, 0)
    return Task(
        name, kind, dt.ClassificationTask(model), train, queries, ckpts,
        lambda keep, seed: fit(keep, seed)[0], True, weight_decay + 2 * alpha,
    )  # fmt: skip


def _load(dataset: str) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn import datasets

    data = getattr(datasets, f"load_{dataset}")()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target)
    x = x / 16.0 if dataset == "digits" else (x - x.mean(0)) / x.std(0).clamp_min(1e-8)
    if dataset == "diabetes":
        y = ((y - y.float().mean()) / y.float().std()).float()
    return x, y


def _regression(s: Sizes) -> Task:
    x, y = _load("diabetes")
    train, queries = _split(x, y[:, None], s)

    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1))

    def fit(keep_idx: torch.Tensor | None, seed: int) -> tuple[nn.Module, list]:
        torch.manual_seed(seed)
        model = make()
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
        keep = torch.ones(len(train[0]), dtype=torch.bool)
        if keep_idx is not None:
            keep[:] = False
            keep[keep_idx] = True
        ckpts, epochs = [], 40
        for epoch in range(1, epochs + 1):
            order = torch.randperm(len(keep), generator=g)
            for idx in order[keep[order]].split(32):
                opt.zero_grad()
                F.mse_loss(model(train[0][idx]), train[1][idx]).backward()
                opt.step()
            if epoch % 10 == 0:
                ckpts.append(dt.Checkpoint.from_module(model, weight=0.02, name=f"epoch{epoch}"))
        return model, ckpts

    model, ckpts = fit(None, 0)
    return Task(
        "mlp_diabetes", "regression MLP, SGD momentum", dt.RegressionTask(model), train,
        queries, ckpts, lambda keep, seed: fit(keep, seed)[0], False,
    )  # fmt: skip


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.c1(x)), 2)
        h = F.max_pool2d(F.relu(self.c2(h)), 2)
        return self.fc(h.flatten(1))


def build(name: str, s: Sizes) -> Task:
    if name == "logreg_bc":
        return _classifier(
            name, "L2 logistic regression", "breast_cancer", lambda: nn.Linear(30, 2), s,
            epochs=40, lr=0.1, momentum=0.9, alpha=1e-3,
        )  # fmt: skip
    if name == "mlp_sgd":
        make = lambda: nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))  # noqa: E731
        return _classifier(name, "MLP, plain SGD, no weight decay", "digits", make, s,
                           epochs=30, lr=0.1, momentum=0.0)  # fmt: skip
    if name == "mlp_mom_wd":
        make = lambda: nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))  # noqa: E731
        return _classifier(name, "MLP, momentum + weight decay", "digits", make, s,
                           epochs=30, lr=0.05, momentum=0.9, weight_decay=5e-4)  # fmt: skip
    if name == "cnn_digits":
        return _classifier(name, "CNN, momentum", "digits", _CNN, s, epochs=30, lr=0.05,
                           momentum=0.9, image=True)  # fmt: skip
    if name == "mlp_diabetes":
        return _regression(s)
    raise SystemExit(f"unknown task {name!r}")


# ----------------------------------------------------------------------------- ground truth


def ground_truth(t: Task, s: Sizes, cache: Path) -> dict[str, torch.Tensor]:
    key = f"{t.name}-{s.n_train}-{s.n_query}"
    masks, outputs = dt.truth.subset_retraining(
        t.train_fn, t.task, t.train, t.queries, n_subsets=s.n_subsets, cache=cache / f"lds-{key}",
        cache_key="defaults-v1", progress=False,
    )  # fmt: skip
    idx = torch.randperm(s.n_train, generator=torch.Generator().manual_seed(1))[: s.n_loo]
    loo = dt.truth.leave_one_out(
        t.train_fn, t.task, t.train, t.queries, indices=idx, seeds=s.loo_seeds,
        cache=cache / f"loo-{key}", cache_key="defaults-v1", progress=False,
    )  # fmt: skip
    return {"masks": masks, "outputs": outputs, "loo_idx": idx, "loo": loo}


def evaluate(S: torch.Tensor, gt: dict[str, torch.Tensor]) -> tuple[float, float]:
    S = S.double()
    if not bool(torch.isfinite(S).all()):
        return float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lds = dt.metrics.lds(S, gt["masks"], gt["outputs"]).mean
    loo = dt.metrics.agreement(S[:, gt["loo_idx"]], gt["loo"])["spearman"][0]
    return lds, loo


# ----------------------------------------------------------------------------- methods


def variants(t: Task, lambda0: float, gram_mean: float, full: bool, p: int) -> dict[str, Any]:
    """{method: (default factory, [(label, factory) over the grid])}."""
    grid = [(f"λ₀×{m:g}", m * lambda0) for m in MULTIPLIERS]

    def influence(
        make: Callable[..., Any], strong: dict[str, Any] | None = None, only: bool = False
    ) -> Any:
        """The damping grid at the default solver settings, and (full run) at ``strong``
        ones; ``only``: at ``strong`` only, in both modes (LiSSA: its full-batch default
        costs 10-40 s a fit)."""
        pts = [] if only else [(lab, lambda d=d: dt.Influence(make(damping=d))) for lab, d in grid]
        if (full or only) and strong:
            pts += [
                (f"{lab} {','.join(f'{k}={v}' for k, v in strong.items())}",
                 lambda d=d: dt.Influence(make(damping=d, **strong)))
                for lab, d in grid
            ]  # fmt: skip
        return (lambda: dt.Influence(make())), pts

    out: dict[str, Any] = {
        "GradDot": (dt.GradDot, []),
        "GradCos": (dt.GradCos, []),
        "TracIn": (dt.TracIn, []),
        "IF exact": influence(dt.ExactHessian),
        "IF CG": influence(dt.ConjugateGradient),  # its default runs to tol (no max_iter)
        "IF LiSSA": influence(dt.LiSSA, {"depth": 300, "batch_size": 100}, only=True),
        "IF Arnoldi": influence(dt.Arnoldi, {"rank": min(p, 200)}),
        "IF K-FAC": influence(dt.KFAC),
        "IF EK-FAC": influence(dt.EKFAC),
        "DataInf": (dt.DataInf, [(lab, lambda d=d: dt.DataInf(damping=d)) for lab, d in grid]),
    }
    if t.classification:
        trak = [("0", lambda: dt.TRAK(damping=0.0))]
        trak += [
            (f"mean-eig×{m:g}", lambda m=m: dt.TRAK(damping=m * gram_mean))
            for m in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
        ]
        out["TRAK"] = (dt.TRAK, trak)
    return out


def run_one(factory: Callable[[], Any], t: Task) -> tuple[torch.Tensor, float, Any]:
    method = factory()
    ckpts = t.ckpts if method.name == "TracIn" or method.name == "TRAK" else t.ckpts[-1:]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # grid points that leave H + λI indefinite
        fitted = method.fit(t.task, ckpts, t.train, progress=False)
        S = fitted.attribute(t.queries)
    return S.detach(), time.perf_counter() - t0, fitted


def suite_task(t: Task, s: Sizes, cache: Path, full: bool) -> list[dict[str, Any]]:
    t0 = time.perf_counter()
    gt = ground_truth(t, s, cache)
    print(f"[{t.name}] ground truth {time.perf_counter() - t0:.1f} s", flush=True)
    last = t.ckpts[-1]
    lambda0 = dt.mean_squared_gradient(t.task, last, t.train)
    p = sum(v.numel() for v in t.task.model.parameters())
    gram_mean = 0.0
    if t.classification:
        _, _, ft = run_one(lambda: dt.TRAK(damping=0.0), t)
        gram_mean = float(torch.stack([pc.evals.mean() for pc in ft.preconditioners]).mean())
    rows: list[dict[str, Any]] = []
    exact_s = None
    for name, (default, grid) in variants(t, lambda0, gram_mean, full, p).items():
        watch = CpuWatch()
        try:
            S, secs, fitted = run_one(default, t)
        except Exception as exc:  # a method that cannot run this task is a row, not a crash
            rows.append(row(workload=t.name, method=name, library="datatrace",
                            note=f"default failed: {type(exc).__name__}: {exc}"))  # fmt: skip
            continue
        lds, loo = evaluate(S, gt)
        damping = list(getattr(fitted, "damping", []) or [])
        if name == "IF exact":
            exact_s = secs
        best = (lds, loo, "default")
        points = []
        for label, make in grid:
            try:
                Sg, _, _ = run_one(make, t)
                glds, gloo = evaluate(Sg, gt)
            except Exception as exc:
                glds, gloo = float("nan"), float("nan")
                label = f"{label} failed: {type(exc).__name__}"
            points.append({"setting": label, "lds": glds, "loo": gloo})
            if glds == glds and not glds <= best[0]:
                best = (glds, gloo, label)
        ratio = lds / best[0] if best[0] and best[0] > 0 else float("nan")
        ok = lds >= 0.95 * best[0] or lds >= best[0] - 0.02
        rows.append(row(
            workload=t.name, method=name, library="datatrace", seconds=secs, agreement=lds,
            agreement_with="LDS", note=f"best {best[0]:.3f} ({best[2]}) ratio {ratio:.2f}"
            f"{'' if ok else ' BELOW TARGET'}; LOO ρ {loo:.3f} (best-LDS point {best[1]:.3f})",
            lds_default=lds, lds_best=best[0], best_setting=best[2], ratio=ratio,
            loo_default=loo, loo_best=best[1], damping_default=damping, lambda0=lambda0,
            grid=points, meets_target=ok, contention=watch.others(),
        ))  # fmt: skip
        print(f"[{t.name}] {name}: LDS {lds:.3f} (best {best[0]:.3f} at {best[2]}), "
              f"LOO {loo:.3f}, {secs:.2f} s, damping {damping}", flush=True)  # fmt: skip
    for r in rows:
        if exact_s and r.get("seconds"):
            r["time_vs_exact"] = r["seconds"] / exact_s
    rows.append(auto_row(t, gt, exact_s))
    return rows


def auto_row(t: Task, gt: dict[str, torch.Tensor], exact_s: float | None) -> dict[str, Any]:
    S, secs, fitted = run_one(lambda: dt.Influence(dt.ExactHessian(damping="auto")), t)
    res = fitted.auto_damping
    lds, loo = evaluate(S, gt)
    print(f"[{t.name}] IF exact auto: LDS {lds:.3f}, LOO {loo:.3f}, damping {res.damping:.3g}, "
          f"{secs:.2f} s (further training {res.gold_seconds:.2f} s, refits "
          f"{res.refit_seconds:.2f} s)", flush=True)  # fmt: skip
    return row(
        workload=t.name, method="IF exact auto", library="datatrace", seconds=secs,
        agreement=lds, agreement_with="LDS",
        note=f"damping {res.damping:.3g}; LOO ρ {loo:.3f}; cost {secs / (exact_s or math.nan):.1f}× "
        "the default exact fit",
        lds_default=lds, loo_default=loo, damping_default=[res.damping],
        auto_grid=res.grid, auto_spearman=res.spearman, auto_gold_s=res.gold_seconds,
        auto_refit_s=res.refit_seconds,
        time_vs_exact=secs / exact_s if exact_s else None,
    )  # fmt: skip


# ----------------------------------------------------------------------------- DDM


def ddm_rows(t: Task, cache: Path, s: Sizes) -> list[dict[str, Any]]:
    x, y = t.train
    groups, _ = kmeans_groups(y, x, 3, seed=0, min_size=1)  # as they come: tiny ones kept
    sizes = torch.bincount(groups)
    gold = dt.truth.group_leave_out(
        t.train_fn, t.task, t.train, t.queries, groups, seeds=(0,),
        cache=cache / f"glo-{t.name}-{s.n_train}", cache_key="defaults-v1", progress=False,
    )  # fmt: skip
    onehot = F.one_hot(groups, int(groups.max()) + 1).double()
    out = []
    S, secs, _ = run_one(lambda: dt.Influence(dt.ExactHessian()), t)
    summed = S.double() @ onehot
    for label, scores, sec in (("summed IF exact", summed, secs),):
        a = dt.metrics.agreement(scores, gold)
        out.append(row(workload=t.name, method=label, library="datatrace", seconds=sec,
                       agreement=a["pearson"][0], agreement_with="group leave-out (Pearson)",
                       note=f"Spearman {a['spearman'][0]:.3f}", spearman=a["spearman"][0]))  # fmt: skip
    for steps in (20, 200):  # the default, and enough steps for an ill-conditioned model
        note, m = "", 4
        t0 = time.perf_counter()
        kw = {"weight_decay": t.weight_decay, "unlearn_steps": steps}
        try:
            fitted = dt.DistilledDatamodel(groups=groups, **kw).fit(
                t.task, t.ckpts, t.train, progress=False
            )
        except (dt.ConfigError, dt.DataError) as exc:
            m = int(sizes.min())
            note = f"default refused ({str(exc)[:60]}...); ran with synset_per_group={m}. "
            fitted = dt.DistilledDatamodel(groups=groups, synset_per_group=m, **kw).fit(
                t.task, t.ckpts, t.train, progress=False
            )
        A = fitted.attribute(t.queries).double()
        secs = time.perf_counter() - t0
        a = dt.metrics.agreement(A, gold)
        out.append(row(
            workload=t.name, method=f"DDM unlearn_steps={steps}", library="datatrace",
            seconds=secs, agreement=a["pearson"][0],
            agreement_with="group leave-out (Pearson)",
            note=f"{note}Spearman {a['spearman'][0]:.3f}; {len(sizes)} groups, sizes "
            f"{int(sizes.min())}-{int(sizes.max())}; weight_decay {t.weight_decay:g}",
            spearman=a["spearman"][0], group_sizes=sizes.tolist(),
        ))  # fmt: skip
    print(f"[{t.name}] DDM Pearson {out[1]['agreement']:.3f} (20 steps), "
          f"{out[2]['agreement']:.3f} (200) vs summed IF {out[0]['agreement']:.3f} "
          f"({len(sizes)} groups, min size {int(sizes.min())})", flush=True)  # fmt: skip
    return out


# ----------------------------------------------------------------------------- markdown


def markdown(rows: list[dict[str, Any]]) -> str:
    """The results as the Markdown table of bench/RESULTS.md and the README."""
    out = ["| task | method | default LDS | best LDS (setting) | ratio | LOO ρ | seconds | × exact |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r["method"].startswith(("DDM", "summed")):
            continue
        if r.get("agreement") is None:
            out.append(f"| {r['workload']} | {r['method']} | failed | | | | | |")
            continue
        best = r.get("lds_best")
        b = f"{best:.3f} ({r.get('best_setting')})" if best is not None else "-"
        ratio = f"{r['ratio']:.2f}" if r.get("ratio") is not None else "-"
        tve = f"{r['time_vs_exact']:.2f}" if r.get("time_vs_exact") is not None else "-"
        out.append(
            f"| {r['workload']} | {r['method']} | {r['agreement']:.3f} | {b} | {ratio}"
            f"{'' if r.get('meets_target', True) else ' ✗'} | {r['loo_default']:.3f} | "
            f"{r['seconds']:.2f} | {tve} |"
        )
    out += ["", "| task | method | Pearson with group leave-out | Spearman | seconds | note |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r["method"].startswith(("DDM", "summed")):
            out.append(
                f"| {r['workload']} | {r['method']} | {r['agreement']:.3f} | "
                f"{r['spearman']:.3f} | {r['seconds']:.2f} | {r['note'][:90]} |"
            )
    return "\n".join(out)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tasks", default=None, help="comma-separated subset")
    ap.add_argument("--no-ddm", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default="bench/out/defaults")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None, help="print a --json file's rows as Markdown")
    args = ap.parse_args(argv)
    if args.markdown:
        import json

        with open(args.markdown) as f:
            print(markdown(json.load(f)["rows"]))
        return
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else FULL
    names = ["logreg_bc", "mlp_sgd"] if args.quick else [
        "logreg_bc", "mlp_sgd", "mlp_mom_wd", "cnn_digits", "mlp_diabetes"]  # fmt: skip
    if args.tasks:
        names = args.tasks.split(",")
    ddm_tasks = [n for n in names if n in ("logreg_bc", "mlp_sgd", "cnn_digits")]
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    env = environment(quick=args.quick, sizes=s.__dict__)
    rows: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    for name in names:
        t = build(name, s)
        rows += suite_task(t, s, cache, full=not args.quick)
        if not args.no_ddm and name in ddm_tasks:
            rows += ddm_rows(t, cache, s)
    print_rows(rows)
    print("\n" + markdown(rows))
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")
    write_json(args.json, {"environment": env, "rows": rows})


if __name__ == "__main__":
    main()
