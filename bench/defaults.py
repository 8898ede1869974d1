#!/usr/bin/env python
"""The defaults suite (issue 12): is each method's default close to the best it can do?

    python bench/defaults.py [--quick] [--tasks a,b] [--methods a,b] [--ddm-only] [--no-ddm]
        [--json out.json] [--cache bench/out/defaults] [--markdown out.json]

Tasks, ground truth, grids, targets and sizes: bench/README.md (the defaults suite).
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from harness import CpuWatch, environment, fit_attribute, print_rows, row, write_json
from internals import kmeans_groups, sgd_train
from torch import nn
from workloads import pool_cnn

import datatrace as dt

MULTIPLIERS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
#: the rows ``--methods`` picks from ("DDM": the Distilled Datamodel rows; TRAK: classifiers)
METHODS = ("GradDot", "GradCos", "TracIn", "IF exact", "IF CG", "IF LiSSA", "IF Arnoldi",
           "IF K-FAC", "IF EK-FAC", "DataInf", "TRAK", "IF exact auto", "DDM")  # fmt: skip


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
    task: Any
    train: tuple[torch.Tensor, torch.Tensor]
    queries: tuple[torch.Tensor, torch.Tensor]
    ckpts: list[Any]
    train_fn: Callable[[torch.Tensor, int], nn.Module]
    classification: bool
    #: the L2 coefficient of training in torch.optim.SGD's sense (the DDM's weight_decay)
    weight_decay: float = 0.0


#: name -> (dataset, model, sgd_train settings); mlp_diabetes (regression) is built apart
CLASSIFIERS: dict[str, tuple[str, Callable[[], nn.Module], dict[str, float]]] = {
    "logreg_bc": ("breast_cancer", lambda: nn.Linear(30, 2),
                  {"epochs": 40, "lr": 0.1, "momentum": 0.9, "alpha": 1e-3}),
    "mlp_sgd": ("digits", lambda: nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)),
                {"epochs": 30, "lr": 0.1, "momentum": 0.0}),
    "mlp_mom_wd": ("digits", lambda: nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)),
                   {"epochs": 30, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}),
    "cnn_digits": ("digits", lambda: pool_cnn(8, 8), {"epochs": 30, "lr": 0.05, "momentum": 0.9}),
}  # fmt: skip


def _data(dataset: str, s: Sizes, image: bool = False) -> tuple[tuple, tuple]:
    """(train, queries): a seeded split; digits / 16 (as 8×8 images), else standardised."""
    from sklearn import datasets

    data = getattr(datasets, f"load_{dataset}")()
    x, y = torch.tensor(data.data, dtype=torch.float32), torch.tensor(data.target)
    x = x / 16.0 if dataset == "digits" else (x - x.mean(0)) / x.std(0).clamp_min(1e-8)
    x = x.reshape(-1, 1, 8, 8) if image else x
    if dataset == "diabetes":
        y = ((y - y.float().mean()) / y.float().std()).float()[:, None]
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, q = perm[: s.n_train], perm[s.n_train : s.n_train + s.n_query]
    return (x[tr], y[tr]), (x[q], y[q])


def _mask(n: int, keep_idx: torch.Tensor | None) -> torch.Tensor | None:
    keep = None if keep_idx is None else torch.zeros(n, dtype=torch.bool)
    if keep is not None:
        keep[keep_idx] = True
    return keep


def build(name: str, s: Sizes) -> Task:
    if name in CLASSIFIERS:
        dataset, make, kw = CLASSIFIERS[name]
        train, queries = _data(dataset, s, image=name == "cnn_digits")
        kw = {"weight_decay": 0.0, "alpha": 0.0, **kw}

        def fit(keep_idx: torch.Tensor | None, seed: int) -> tuple[nn.Module, list]:
            return sgd_train(make, *train, seed, kw["epochs"], kw["lr"], 32, kw["momentum"],
                             kw["alpha"], checkpoints=4, keep=_mask(len(train[0]), keep_idx),
                             weight_decay=kw["weight_decay"])  # fmt: skip

        model, ckpts = fit(None, 0)
        return Task(name, dt.ClassificationTask(model), train, queries, ckpts,
                    lambda keep, seed: fit(keep, seed)[0], True, kw["weight_decay"] + 2 * kw["alpha"])  # fmt: skip
    if name != "mlp_diabetes":
        raise SystemExit(f"unknown task {name!r}")
    train, queries = _data("diabetes", s)

    def fit_reg(keep_idx: torch.Tensor | None, seed: int) -> tuple[nn.Module, list]:
        """Plain SGD with momentum on the squared error, a checkpoint every 10 of 40 epochs."""
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1))
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
        keep = _mask(len(train[0]), keep_idx)
        keep = torch.ones(len(train[0]), dtype=torch.bool) if keep is None else keep
        ckpts = []
        for epoch in range(1, 41):
            order = torch.randperm(len(keep), generator=g)
            for idx in order[keep[order]].split(32):
                opt.zero_grad()
                F.mse_loss(model(train[0][idx]), train[1][idx]).backward()
                opt.step()
            if epoch % 10 == 0:
                ckpts.append(dt.Checkpoint.from_module(model, weight=0.02, name=f"epoch{epoch}"))
        return model, ckpts

    model, ckpts = fit_reg(None, 0)
    return Task(name, dt.RegressionTask(model), train, queries, ckpts,
                lambda keep, seed: fit_reg(keep, seed)[0], False)  # fmt: skip


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
    """(mean LDS, leave-one-out Spearman) of the scores; NaN for non-finite scores."""
    S = S.double()
    if not bool(torch.isfinite(S).all()):
        return float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lds = dt.metrics.lds(S, gt["masks"], gt["outputs"]).mean
    return lds, dt.metrics.agreement(S[:, gt["loo_idx"]], gt["loo"])["spearman"][0]


def variants(lambda0: float, gram_mean: float | None, full: bool, p: int) -> dict[str, Any]:
    """{method: (default factory, [(label, factory) over its grid])}; TRAK where
    ``gram_mean`` is given (classifiers)."""
    grid = [(f"λ₀×{m:g}", m * lambda0) for m in MULTIPLIERS]

    def influence(make: Callable[..., Any], strong: dict | None = None, only: bool = False) -> Any:
        """The damping grid at the default solver settings, and (full run) at ``strong``
        ones; ``only``: at ``strong`` only, in both modes (LiSSA: its full-batch default
        costs 10-40 s a fit)."""
        kws = [] if only else [("", {})]
        if (full or only) and strong:
            kws.append((" " + ",".join(f"{k}={v}" for k, v in strong.items()), strong))
        pts = [(f"{lab}{suffix}", lambda d=d, kw=kw: dt.Influence(make(damping=d, **kw)))
               for suffix, kw in kws for lab, d in grid]  # fmt: skip
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
    if gram_mean is not None:
        out["TRAK"] = (dt.TRAK, [("0", lambda: dt.TRAK(damping=0.0))] + [
            (f"mean-eig×{m:g}", lambda m=m: dt.TRAK(damping=m * gram_mean))
            for m in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)])  # fmt: skip
    return out


def run_one(factory: Callable[[], Any], t: Task) -> tuple[torch.Tensor, float, Any]:
    """(scores, seconds of fit + attribute, fitted); TracIn and TRAK on every checkpoint."""
    method = factory()
    ckpts = t.ckpts if method.name in ("TracIn", "TRAK") else t.ckpts[-1:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # grid points that leave H + λI indefinite
        S, times, fitted = fit_attribute(method, t.task, ckpts, t.train, t.queries)
    return S, times["total"], fitted


def suite_task(t: Task, s: Sizes, cache: Path, full: bool, methods: set[str]) -> list[dict]:
    t0 = time.perf_counter()
    gt = ground_truth(t, s, cache)
    print(f"[{t.name}] ground truth {time.perf_counter() - t0:.1f} s", flush=True)
    lambda0 = dt.mean_squared_gradient(t.task, t.ckpts[-1], t.train)
    p = sum(v.numel() for v in t.task.model.parameters())
    gram_mean = None
    if t.classification and "TRAK" in methods:
        _, _, ft = run_one(lambda: dt.TRAK(damping=0.0), t)
        gram_mean = float(torch.stack([pc.evals.mean() for pc in ft.preconditioners]).mean())
    rows: list[dict[str, Any]] = []
    exact_s = None
    for name, (default, grid) in variants(lambda0, gram_mean, full, p).items():
        if name not in methods:
            continue
        watch = CpuWatch()
        try:
            S, secs, fitted = run_one(default, t)
        except Exception as exc:  # a method that cannot run this task is a row, not a crash
            rows.append(row(workload=t.name, method=name, library="datatrace",
                            note=f"default failed: {type(exc).__name__}: {exc}"))  # fmt: skip
            continue
        lds, loo = evaluate(S, gt)
        damping = list(getattr(fitted, "damping", []) or [])
        exact_s = secs if name == "IF exact" else exact_s
        points = []
        for label, make in grid:
            try:
                glds, gloo = evaluate(run_one(make, t)[0], gt)
            except Exception as exc:
                glds = gloo = float("nan")
                label = f"{label} failed: {type(exc).__name__}"
            points.append({"setting": label, "lds": glds, "loo": gloo})
        cands = [(lds, loo, "default")] + [(q["lds"], q["loo"], q["setting"]) for q in points]
        # the highest LDS, the first of equals (the default before the grid); NaN never best
        best = max((c for c in cands if c[0] == c[0]), key=lambda c: c[0], default=cands[0])
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
    return rows + ([auto_row(t, gt, exact_s)] if "IF exact auto" in methods else [])


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
        auto_refit_s=res.refit_seconds, time_vs_exact=secs / exact_s if exact_s else None,
    )  # fmt: skip


def ddm_rows(t: Task, cache: Path, s: Sizes) -> list[dict[str, Any]]:
    """The DDM (20 unlearning steps, its default, and 200) and the summed exact influence
    against group leave-out retraining of class-wise k-means groups (tiny ones kept)."""
    groups, _ = kmeans_groups(t.train[1], t.train[0], 3, seed=0, min_size=1)
    sizes = torch.bincount(groups)
    gold = dt.truth.group_leave_out(
        t.train_fn, t.task, t.train, t.queries, groups, seeds=(0,),
        cache=cache / f"glo-{t.name}-{s.n_train}", cache_key="defaults-v1", progress=False,
    )  # fmt: skip
    S, secs, _ = run_one(lambda: dt.Influence(dt.ExactHessian()), t)
    a = dt.metrics.agreement(S.double() @ F.one_hot(groups, int(groups.max()) + 1).double(), gold)
    out = [row(workload=t.name, method="summed IF exact", library="datatrace", seconds=secs,
               agreement=a["pearson"][0], agreement_with="group leave-out (Pearson)",
               note=f"Spearman {a['spearman'][0]:.3f}", spearman=a["spearman"][0])]  # fmt: skip
    for steps in (20, 200):  # the default, and enough steps for an ill-conditioned model
        note, t0 = "", time.perf_counter()
        kw = {"groups": groups, "weight_decay": t.weight_decay, "unlearn_steps": steps}
        try:
            fitted = dt.DistilledDatamodel(**kw).fit(t.task, t.ckpts, t.train, progress=False)
        except (dt.ConfigError, dt.DataError) as exc:
            m = int(sizes.min())
            note = f"default refused ({str(exc)[:60]}...); ran with synset_per_group={m}. "
            fitted = dt.DistilledDatamodel(synset_per_group=m, **kw).fit(
                t.task, t.ckpts, t.train, progress=False
            )
        A = fitted.attribute(t.queries).double()
        secs = time.perf_counter() - t0
        a = dt.metrics.agreement(A, gold)
        out.append(row(
            workload=t.name, method=f"DDM unlearn_steps={steps}", library="datatrace",
            seconds=secs, agreement=a["pearson"][0], agreement_with="group leave-out (Pearson)",
            note=f"{note}Spearman {a['spearman'][0]:.3f}; {len(sizes)} groups, sizes "
            f"{int(sizes.min())}-{int(sizes.max())}; weight_decay {t.weight_decay:g}",
            spearman=a["spearman"][0], group_sizes=sizes.tolist(),
        ))  # fmt: skip
    print(f"[{t.name}] DDM Pearson {out[1]['agreement']:.3f} (20 steps), "
          f"{out[2]['agreement']:.3f} (200) vs summed IF {out[0]['agreement']:.3f} "
          f"({len(sizes)} groups, min size {int(sizes.min())})", flush=True)  # fmt: skip
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    """The results as the Markdown tables of bench/RESULTS.md and the README."""
    out = ["| task | method | default LDS | best LDS (setting) | ratio | LOO ρ | seconds | × exact |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    ddm = [r for r in rows if r["method"].startswith(("DDM", "summed"))]
    for r in (r for r in rows if r not in ddm):
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
    out += [f"| {r['workload']} | {r['method']} | {r['agreement']:.3f} | {r['spearman']:.3f} | "
            f"{r['seconds']:.2f} | {r['note'][:90]} |" for r in ddm]  # fmt: skip
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tasks", default=None, help="comma-separated subset")
    ap.add_argument("--methods", default=None, help=f"comma-separated subset of {METHODS}")
    ap.add_argument("--no-ddm", action="store_true", help="leave out the DDM rows")
    ap.add_argument("--ddm-only", action="store_true", help="only the DDM rows (--methods DDM)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default="bench/out/defaults")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None, help="print a --json file's rows as Markdown")
    args = ap.parse_args(argv)
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown(json.load(f)["rows"]))
        return
    methods = set(args.methods.split(",") if args.methods else METHODS)
    if unknown := methods - set(METHODS):
        ap.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    methods = {"DDM"} if args.ddm_only else methods - ({"DDM"} if args.no_ddm else set())
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else FULL
    names = ["logreg_bc", "mlp_sgd"] if args.quick else [*CLASSIFIERS, "mlp_diabetes"]
    names = args.tasks.split(",") if args.tasks else names
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    env = environment(quick=args.quick, sizes=s.__dict__)
    rows: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    for name in names:
        t = build(name, s)
        rows += suite_task(t, s, cache, not args.quick, methods) if methods - {"DDM"} else []
        if "DDM" in methods and name in ("logreg_bc", "mlp_sgd", "cnn_digits"):
            rows += ddm_rows(t, cache, s)
    print_rows(rows)
    print("\n" + markdown(rows))
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")
    write_json(args.json, {"environment": env, "rows": rows})


if __name__ == "__main__":  # as the module ``defaults``: the truth cache keys the task code
    import defaults  # by module name, and gn_damping.py (which imports it) shares the cache

    defaults.main()
