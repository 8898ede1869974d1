"""``datatrace evaluate CONFIG.toml``: methods × gold standards on one model and dataset.

A config names a dataset and model (built-in: scikit-learn's bundled sets with an MLP or a
logistic regression, trained by SGD with checkpoints; custom: ``entry = "module:function"``),
the attribution methods, and the gold standards (further training, leave-one-out, subset
retraining for the LDS). The runner trains (or builds) the model, attributes with every
method, computes every gold standard (cached under ``<out>/cache``, so an interrupted run
resumes), and writes ``results.json``, ``results.csv`` and ``agreement.png``, and prints a
table. See :data:`SCHEMA` for every key and its default; an unknown key is an error.

A custom entry point is called as ``function(config: dict) -> Experiment``.
"""

from __future__ import annotations

import csv
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import metrics, truth
from ..core import distributed
from ..core.data import ExampleSource
from ..core.errors import ConfigError
from ..methods.fitted import FittedGradientAttributor
from .config import load_config
from .experiment import Experiment, build_experiment
from .registry import entry, make_method, method_variants

# -- the run ----------------------------------------------------------------------------------


def run(cfg: dict[str, Any], out: str | Path | None = None) -> dict[str, Any]:
    """Run an experiment from a resolved config (:func:`load_config`); returns the results
    dict that is also written to ``<out>/results.json``."""
    top = cfg[""]
    out_dir = Path(out if out is not None else top["out"])
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    exp = build_experiment(cfg)
    n_train = len(ExampleSource(exp.train, "training data"))
    g = torch.Generator().manual_seed(top["seed"] + 1)
    n_idx = min(cfg["truth"]["indices"], n_train)
    indices = torch.sort(torch.randperm(n_train, generator=g)[:n_idx]).values
    scored = _score(cfg, exp, n_train)
    results, gold_seconds = _grade(cfg, exp, scored.scores, indices, out_dir)
    report = {
        "name": top["name"],
        "experiment": exp.description,
        "config": {k or "top": v for k, v in cfg.items()},
        "n_left_out": n_idx,
        "method_seconds": scored.seconds,
        "truth_seconds": gold_seconds,
        "damping": scored.damping,
        "check": scored.checked,
        "results": results,
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        },
        "seconds": time.perf_counter() - t0,
    }
    if distributed.world()[0] != 0:  # under torchrun every rank has the results; one writes
        report["plot"] = None
        return report
    (out_dir / "results.json").write_text(json.dumps(report, indent=1))
    with open(out_dir / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["truth", "step", "method", "metric", "mean", "se"])
        w.writeheader()
        w.writerows(results)
    report["plot"] = _plot(results, out_dir / "agreement.png", top["name"])
    return report


@dataclass
class _Scored:
    """Every method variant's scores (n_query, n_train) and what its fit reported."""

    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    damping: dict[str, Any] = field(default_factory=dict)
    # each gradient method's self-check: agreement with one epoch of further training
    checked: dict[str, dict[str, Any]] = field(default_factory=dict)


def _score(cfg: dict[str, Any], exp: Experiment, n_train: int) -> _Scored:
    """Fit and score every method variant of the config."""
    top, out = cfg[""], _Scored()
    n_check = min(cfg["methods"]["check"], n_train)
    for label, name, lam in method_variants(cfg["methods"]):
        s = time.perf_counter()
        method = make_method(name, cfg["methods"], lam)
        ckpts = exp.checkpoints if entry(name).trajectory else exp.checkpoints[-1:]
        fitted = method.fit(exp.task, ckpts, exp.train, progress=top["progress"])
        out.scores[label] = fitted.attribute(exp.queries).double().cpu()
        out.seconds[label] = time.perf_counter() - s
        out.damping[label] = fitted.damping or None
        if n_check >= 2 and isinstance(fitted, FittedGradientAttributor):
            ft = cfg["truth.further_training"]
            out.checked[label] = asdict(
                fitted.check(
                    exp.queries, n_examples=n_check, seed=top["seed"], lr=ft["lr"],
                    batch_size=ft["batch_size"], progress=top["progress"],
                )
            )  # fmt: skip
    return out


def _grade(
    cfg: dict[str, Any],
    exp: Experiment,
    scores: dict[str, torch.Tensor],
    indices: torch.Tensor,
    out_dir: Path,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Every gold standard of the config and every method's agreement with it: (result rows,
    seconds per gold standard)."""
    top, final = cfg[""], exp.checkpoints[-1]
    progress, cache = top["progress"], (out_dir / "cache" if cfg["truth"]["cache"] else None)
    key = {
        "config": {s: v for s, v in cfg.items() if s in ("data", "model", "train")},
        "seed": top["seed"],
    }
    results: list[dict[str, Any]] = []
    gold_seconds: dict[str, float] = {}

    def record(
        truth_name: str, step: Any, name: str, metric: str, val: tuple[float, float]
    ) -> None:
        results.append(
            {"truth": truth_name, "step": step, "method": name, "metric": metric,
             "mean": val[0], "se": val[1]}
        )  # fmt: skip

    def cached(name: str) -> Path | None:
        return None if cache is None else cache / name

    for truth_name in cfg["truth"]["use"]:
        s = time.perf_counter()
        if truth_name == "further_training":
            ft = cfg["truth.further_training"]
            gold = truth.further_training(
                exp.task, final, exp.train, exp.queries, indices,
                epochs=ft["epochs"], seeds=range(ft["seeds"]), lr=ft["lr"],
                batch_size=ft["batch_size"], momentum=ft["momentum"], mode=ft["mode"],
                center=ft["center"], cache=cached("further_training"), cache_key=key,
                progress=progress,
            )  # fmt: skip
            for e in range(gold.shape[0]):
                for name, sc in scores.items():
                    for metric, val in metrics.agreement(sc[:, indices], gold[e]).items():
                        record(truth_name, e + 1, name, metric, val)
        elif exp.train_fn is None:
            what = "leave-one-out" if truth_name == "loo" else "subset retraining (LDS)"
            raise ConfigError(f"{what} needs the experiment's train_fn")
        elif truth_name == "loo":
            gold = truth.leave_one_out(
                exp.train_fn, exp.task, exp.train, exp.queries, indices,
                seeds=range(cfg["truth.loo"]["seeds"]), cache=cached("loo"), cache_key=key,
                progress=progress,
            )  # fmt: skip
            for name, sc in scores.items():
                for metric, val in metrics.agreement(sc[:, indices], gold).items():
                    record(truth_name, "", name, metric, val)
        else:
            lds_cfg = cfg["truth.lds"]
            masks, outputs = truth.subset_retraining(
                exp.train_fn, exp.task, exp.train, exp.queries, lds_cfg["n_subsets"],
                lds_cfg["fraction"], seed=top["seed"], cache=cached("lds"), cache_key=key,
                progress=progress,
            )  # fmt: skip
            for name, sc in scores.items():
                res = metrics.lds(sc, masks, outputs)
                record(truth_name, "", name, "lds", (res.mean, res.se))
        gold_seconds[truth_name] = time.perf_counter() - s
    return results, gold_seconds


def _plot(results: list[dict[str, Any]], path: Path, title: str) -> str | None:
    steps = [r for r in results if r["truth"] == "further_training"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if steps:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharex=True)
        labels = list(dict.fromkeys(r["method"] for r in steps))
        bases = list(dict.fromkeys(lab.split(" λ=")[0] for lab in labels))
        variants = list(dict.fromkeys(lab.partition(" λ=")[2] for lab in labels))
        styles = ["-", "--", ":", "-."]
        for ax, metric in zip(axes, ("cosine", "spearman"), strict=True):
            for label in labels:
                base, _, variant = label.partition(" λ=")
                rows = [r for r in steps if r["method"] == label and r["metric"] == metric]
                ax.errorbar(
                    [r["step"] for r in rows],
                    [r["mean"] for r in rows],
                    yerr=[r["se"] for r in rows],
                    color=plt.get_cmap("tab10")(bases.index(base) % 10),
                    linestyle=styles[variants.index(variant) % len(styles)],
                    marker="o",
                    ms=2,
                    capsize=1.5,
                    label=label,
                )
            ax.set_xlabel("epochs of further training")
            ax.set_ylabel(f"{metric} with further training (mean ± se over queries)")
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.suptitle(title)
    else:
        others = [r for r in results if r["metric"] in ("pearson", "lds")]
        fig, ax = plt.subplots(figsize=(7, 4))
        labels = [f"{r['method']}\n{r['truth']}" for r in others]
        ax.bar(range(len(others)), [r["mean"] for r in others], yerr=[r["se"] for r in others])
        ax.set_xticks(range(len(others)), labels, fontsize=7, rotation=60)
        ax.set_ylabel("Pearson (loo) / LDS")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def table(report: dict[str, Any], max_steps: int = 5) -> str:
    """A plain-text table: one row per method, its ``fitted.check()`` cosine (mean ± SE;
    ``-`` where it has none), one column per gold standard (and per evaluated epoch of
    further training: at most ``max_steps`` of them, evenly spaced; the CSV has all),
    Spearman/cosine/LDS means."""
    rows = report["results"]
    cols: list[tuple[str, Any, str]] = []
    for r in rows:
        metric = r["metric"]
        if metric in ("cosine", "spearman", "lds") or (r["truth"] == "loo" and metric == "pearson"):
            key = (r["truth"], r["step"], metric)
            if key not in cols:
                cols.append(key)
    steps = sorted({r["step"] for r in rows if r["truth"] == "further_training"})
    if len(steps) > max_steps:
        pick = {steps[round(k * (len(steps) - 1) / (max_steps - 1))] for k in range(max_steps)}
        cols = [c for c in cols if c[0] != "further_training" or c[1] in pick]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    value = {(r["truth"], r["step"], r["metric"], r["method"]): r["mean"] for r in rows}
    names = {"further_training": "FT"}
    head = ["method", "s", "check cos"] + [
        f"{names.get(t, t)}{'@' + str(s) if s != '' else ''} {m[:4]}" for t, s, m in cols
    ]
    lines = [head]
    checked = report.get("check", {})
    for name in methods:
        line = [name, f"{report['method_seconds'][name]:.2f}"]
        own = checked.get(name)
        line.append(f"{own['cosine'][0]:+.3f}±{own['cosine'][1]:.3f}" if own else "-")
        line += [f"{value.get((t, s, m, name), float('nan')):+.3f}" for t, s, m in cols]
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines
    )


def main(path: str, out: str | None = None) -> int:
    cfg = load_config(path)
    report = run(cfg, out)
    if distributed.world()[0] != 0:
        return 0
    print(f"{report['name']}: {report['experiment']}", file=sys.stderr)
    print(table(report))
    out_dir = Path(out if out is not None else cfg[""]["out"])
    print(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.csv'}"
          + (f", {report['plot']}" if report.get("plot") else ""), file=sys.stderr)  # fmt: skip
    return 0
