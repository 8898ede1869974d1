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
import difflib
import importlib
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed, metrics, truth
from .checkpoint import Checkpoint
from .curvature import (
    EKFAC,
    KFAC,
    Arnoldi,
    ConjugateGradient,
    ExactHessian,
    GaussNewton,
    LiSSA,
)
from .data import ExampleSource
from .errors import ConfigError
from .methods import DataInf, GradCos, GradDot, Influence, TracIn
from .methods.trak import TRAK
from .problems import DATASETS, lbfgs_fit, load_sklearn
from .task import AbstractTask, ClassificationTask

METHODS = (
    "graddot", "gradcos", "tracin", "datainf", "exact", "gauss_newton", "cg", "lissa",
    "arnoldi", "kfac", "ekfac", "trak",
)  # fmt: skip
TRUTHS = ("further_training", "loo", "lds")

# section -> key -> default (the type of the default is the expected type; None = any)
SCHEMA: dict[str, dict[str, Any]] = {
    "": {"name": "experiment", "seed": 0, "out": "evaluate-out", "progress": False},
    "data": {"dataset": "digits", "n_train": 300, "n_query": 30, "entry": ""},
    "model": {"kind": "mlp", "hidden": 32, "activation": "tanh", "alpha": 1e-3},
    "train": {
        "epochs": 30,
        "lr": 0.1,
        "batch_size": 32,
        "momentum": 0.9,
        "checkpoints": 5,
        "retrain": "sgd",  # or "lbfgs": polish to the optimum; retrain warm-started
    },
    "methods": {
        "use": ["graddot", "gradcos", "tracin", "datainf", "cg", "ekfac"],
        "damping": [-1.0],
        "cg_iters": 100,
        "lissa_depth": 500,
        "arnoldi_rank": 50,
        "trak_dim": 512,
    },
    "truth": {"use": ["further_training"], "indices": 100, "cache": True},
    "truth.further_training": {
        "epochs": 10,
        "seeds": 10,
        "lr": 0.05,
        "batch_size": 32,
        "momentum": 0.0,
        "mode": "remove",
        "center": False,
    },
    "truth.loo": {"seeds": 1},
    "truth.lds": {"n_subsets": 32, "fraction": 0.5},
}


@dataclass
class Experiment:
    """What the runner needs: a task (its model holds the final weights), data, the
    training checkpoints (the last = the final model; TracIn uses them all, every other
    method the last), and, for leave-one-out and the LDS, ``train_fn(indices, seed)``."""

    task: AbstractTask
    train: Any
    queries: Any
    checkpoints: list[Checkpoint]
    train_fn: Callable[[torch.Tensor, int], nn.Module] | None = None
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# -- config ---------------------------------------------------------------------------------


def _suggest(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(options)}"


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a TOML config and fill in defaults. Unknown sections/keys, wrong types and
    unknown method or gold-standard names raise :class:`ConfigError`."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError as exc:
            raise ConfigError("reading TOML on Python 3.10 needs: pip install tomli") from exc
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {p}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p} is not valid TOML: {exc}") from exc
    return resolve_config(raw)


def _flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {prefix: {}}
    for key, value in raw.items():
        section = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            if section not in SCHEMA:
                raise ConfigError(f"unknown section [{section}]" + _suggest(section, list(SCHEMA)))
            out.update(_flatten(value, section))
        else:
            out[prefix][key] = value
    return out


def _check_range(where: str, key: str, value: Any) -> None:
    """Counts are >= 1, the seed >= 0, rates > 0, momentum/alpha >= 0, fractions in (0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    bad = (
        (key == "seed" and value < 0)
        or (key in ("momentum", "alpha") and value < 0)
        or (key == "lr" and not value > 0)
        or (key == "fraction" and not 0 < value < 1)
        or (isinstance(value, int) and key != "seed" and value < 1)
    )
    if bad:
        raise ConfigError(f"{where} = {value!r} is out of range")


def resolve_config(raw: dict[str, Any]) -> dict[str, Any]:
    """Validate a parsed config and return ``{section: {key: value}}`` with defaults."""
    given = _flatten(raw)
    cfg: dict[str, dict[str, Any]] = {}
    for section, defaults in SCHEMA.items():
        values = dict(defaults)
        for key, value in given.get(section, {}).items():
            where = f"[{section}] {key}" if section else key
            if key not in defaults:
                raise ConfigError(f"unknown key {where}" + _suggest(key, list(defaults)))
            want = type(defaults[key])
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if key == "damping" and section == "methods":
                value = value if isinstance(value, list) else [value]
                if not value or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
                ):
                    raise ConfigError(
                        "[methods] damping must be a number or a list of numbers "
                        "(-1 = datatrace's default)"
                    )
                value = [float(v) for v in value]
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise ConfigError(
                    f"{where} must be {want.__name__}, got {type(value).__name__} {value!r}"
                )
            _check_range(where, key, value)
            values[key] = value
        cfg[section] = values
    for name in cfg["methods"]["use"]:
        if name not in METHODS:
            raise ConfigError(f"unknown method {name!r}" + _suggest(name, METHODS))
    for name in cfg["truth"]["use"]:
        if name not in TRUTHS:
            raise ConfigError(f"unknown gold standard {name!r}" + _suggest(name, TRUTHS))
    if not cfg["methods"]["use"] or not cfg["truth"]["use"]:
        raise ConfigError("methods.use and truth.use must name at least one entry each")
    if cfg["data"]["entry"] == "" and cfg["data"]["dataset"] not in DATASETS:
        raise ConfigError(
            f"unknown dataset {cfg['data']['dataset']!r}"
            + _suggest(cfg["data"]["dataset"], DATASETS)
        )
    if cfg["train"]["retrain"] not in ("sgd", "lbfgs"):
        raise ConfigError(
            "train.retrain must be 'sgd' (from scratch, same seed and batch order) or "
            f"'lbfgs' (warm start from the final model, to convergence), got "
            f"{cfg['train']['retrain']!r}"
        )
    if cfg["model"]["kind"] not in ("mlp", "logreg"):
        raise ConfigError(f"model.kind must be 'mlp' or 'logreg', got {cfg['model']['kind']!r}")
    if cfg["model"]["activation"] not in ("tanh", "relu"):
        raise ConfigError("model.activation must be 'tanh' or 'relu'")
    return cfg


# -- the built-in experiment ------------------------------------------------------------------


def _make_model(cfg: dict[str, Any], d: int, k: int) -> nn.Module:
    m = cfg["model"]
    if m["kind"] == "logreg":
        return nn.Linear(d, k).double()
    act = nn.Tanh() if m["activation"] == "tanh" else nn.ReLU()
    return nn.Sequential(nn.Linear(d, m["hidden"]), act, nn.Linear(m["hidden"], k)).double()


def sgd_train(
    make: Callable[[], nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int,
    epochs: int,
    lr: float,
    batch_size: int,
    momentum: float,
    alpha: float,
    checkpoints: int = 0,
    keep: torch.Tensor | None = None,
) -> tuple[nn.Module, list[Checkpoint]]:
    """Train from a seeded initialisation with SGD on ``mean CE + α‖θ‖²`` (cosine learning
    rate decay); keep ``checkpoints`` evenly spaced snapshots weighted by their learning
    rate (TracIn's weights). With ``keep`` (bool over the rows of x), the batch order is
    that of the full data with the other rows skipped, so retraining without a few
    examples differs from the full run by those examples only, not by a new shuffle."""
    torch.manual_seed(seed)
    model = make()
    g = torch.Generator().manual_seed(seed)
    n_rows = len(x) if keep is None else int(keep.sum())
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    per_epoch = math.ceil(n_rows / batch_size)
    total = epochs * per_epoch
    marks = (
        {round(epochs * (c + 1) / checkpoints) for c in range(checkpoints)}
        if checkpoints
        else set()
    )
    ckpts: list[Checkpoint] = []
    step = 0
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(x), generator=g)
        if keep is not None:
            order = order[keep[order]]
        for idx in order.split(batch_size):
            rate = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            for group in opt.param_groups:
                group["lr"] = rate
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss = loss + alpha * sum((p**2).sum() for p in model.parameters())
            loss.backward()
            opt.step()
            step += 1
        if epoch in marks:
            ckpts.append(Checkpoint.from_module(model, weight=rate, name=f"epoch{epoch}"))
    return model, ckpts


def builtin_experiment(cfg: dict[str, Any]) -> Experiment:
    d_cfg, t = cfg["data"], cfg["train"]
    x, y = load_sklearn(d_cfg["dataset"])
    n_train, n_query = d_cfg["n_train"], d_cfg["n_query"]
    if n_train < 2 or n_query < 1 or n_train + n_query > len(x):
        raise ConfigError(
            f"{d_cfg['dataset']} has {len(x)} examples; n_train={n_train} + n_query={n_query} "
            "must fit (n_train >= 2, n_query >= 1)"
        )
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg[""]["seed"]))
    tr, te = perm[:n_train], perm[n_train : n_train + n_query]
    xt, yt, xq, yq = x[tr], y[tr], x[te], y[te]
    k = int(y.max()) + 1

    def make() -> nn.Module:
        return _make_model(cfg, x.shape[1], k)

    def fit(
        indices: torch.Tensor, seed: int, checkpoints: int = 0
    ) -> tuple[nn.Module, list[Checkpoint]]:
        keep = torch.zeros(n_train, dtype=torch.bool)
        keep[indices] = True
        return sgd_train(
            make, xt, yt, seed, t["epochs"], t["lr"], t["batch_size"],
            t["momentum"], cfg["model"]["alpha"], checkpoints, keep=keep,
        )  # fmt: skip

    model, ckpts = fit(torch.arange(n_train), cfg[""]["seed"], max(1, t["checkpoints"]))
    alpha = cfg["model"]["alpha"]
    if t["retrain"] == "lbfgs":
        # the model explained is the optimum that leave-one-out retraining starts from and
        # compares with: polish the SGD result to convergence (the last checkpoint too)
        lbfgs_fit(model, xt, yt, alpha, max_iter=3000)
        last = ckpts[-1]
        ckpts[-1] = Checkpoint.from_module(model, weight=last.weight, name=last.name + "+lbfgs")

    def train_fn(indices: torch.Tensor, seed: int) -> nn.Module:
        if t["retrain"] == "sgd":
            return fit(indices, seed)[0]
        warm = make()
        warm.load_state_dict(model.state_dict())
        return lbfgs_fit(warm, xt[indices], yt[indices], alpha, n_total=n_train)

    task = ClassificationTask(model, num_classes=k)
    with torch.no_grad():
        acc_tr = float((model(xt).argmax(1) == yt).double().mean())
        acc_q = float((model(xq).argmax(1) == yq).double().mean())
    desc = (
        f"{cfg['model']['kind']} on {d_cfg['dataset']} ({n_train} train, {n_query} queries; "
        f"train acc {acc_tr:.3f}, query acc {acc_q:.3f})"
    )
    return Experiment(task, (xt, yt), (xq, yq), ckpts, train_fn, desc)


def _load_entry(entry: str) -> Callable[[dict[str, Any]], Experiment]:
    module, _, attr = entry.partition(":")
    if not module or not attr:
        raise ConfigError(f"data.entry must look like 'package.module:function', got {entry!r}")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load data.entry {entry!r}: {exc}") from exc
    return fn


def build_experiment(cfg: dict[str, Any]) -> Experiment:
    """The config's experiment: its ``data.entry`` function's, or the built-in one."""
    entry = cfg["data"]["entry"]
    exp = _load_entry(entry)(cfg) if entry else builtin_experiment(cfg)
    if not isinstance(exp, Experiment) or not exp.checkpoints:
        raise ConfigError("the experiment must be an Experiment with at least one checkpoint")
    return exp


# -- methods ----------------------------------------------------------------------------------


DAMPED = ("datainf", "exact", "gauss_newton", "cg", "lissa", "arnoldi", "kfac", "ekfac", "trak")


def method_variants(m: dict[str, Any]) -> list[tuple[str, str, float | None]]:
    """(label, method, damping) for every method and, for damped ones, every damping in
    ``m["damping"]`` (-1 = the default); labels carry the damping when several are given."""
    out = []
    for name in m["use"]:
        lams = m["damping"] if name in DAMPED else [-1.0]
        for lam in lams:
            value = None if lam < 0 else lam
            label = (
                name
                if len(lams) == 1
                else f"{name} λ={'default' if value is None else f'{value:g}'}"
            )
            out.append((label, name, value))
    return out


def make_method(name: str, m: dict[str, Any], lam: float | None = None) -> Any:
    table: dict[str, Callable[[], Any]] = {
        "graddot": GradDot,
        "gradcos": GradCos,
        "tracin": TracIn,
        "datainf": lambda: DataInf(damping=lam),
        "exact": lambda: Influence(ExactHessian(damping=lam)),
        "gauss_newton": lambda: Influence(GaussNewton(damping=lam)),
        "cg": lambda: Influence(ConjugateGradient(damping=lam, max_iter=m["cg_iters"])),
        "lissa": lambda: Influence(LiSSA(damping=lam, depth=m["lissa_depth"])),
        "arnoldi": lambda: Influence(Arnoldi(rank=m["arnoldi_rank"], damping=lam)),
        "kfac": lambda: Influence(KFAC(damping=lam)),
        "ekfac": lambda: Influence(EKFAC(damping=lam)),
        "trak": lambda: TRAK(projection_dim=m["trak_dim"], damping=lam),
    }
    return table[name]()


# -- the run ----------------------------------------------------------------------------------


def run(cfg: dict[str, Any], out: str | Path | None = None) -> dict[str, Any]:
    """Run an experiment from a resolved config (:func:`load_config`); returns the results
    dict that is also written to ``<out>/results.json``."""
    top = cfg[""]
    out_dir = Path(out if out is not None else top["out"])
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = top["progress"]
    t0 = time.perf_counter()
    exp = build_experiment(cfg)
    final = exp.checkpoints[-1]
    n_train = len(ExampleSource(exp.train, "training data"))
    g = torch.Generator().manual_seed(top["seed"] + 1)
    n_idx = min(cfg["truth"]["indices"], n_train)
    indices = torch.sort(torch.randperm(n_train, generator=g)[:n_idx]).values
    cache = out_dir / "cache" if cfg["truth"]["cache"] else None
    key = {
        "config": {s: v for s, v in cfg.items() if s in ("data", "model", "train")},
        "seed": top["seed"],
    }

    # scores
    scores: dict[str, torch.Tensor] = {}
    timing: dict[str, float] = {}
    used: dict[str, Any] = {}
    for label, name, lam in method_variants(cfg["methods"]):
        s = time.perf_counter()
        method = make_method(name, cfg["methods"], lam)
        ckpts = exp.checkpoints if name == "tracin" else [final]
        fitted = method.fit(exp.task, ckpts, exp.train, progress=progress)
        scores[label] = fitted.attribute(exp.queries).double().cpu()
        timing[label] = time.perf_counter() - s
        used[label] = getattr(fitted, "damping", None)

    # gold standards and metrics
    results: list[dict[str, Any]] = []
    gold_seconds: dict[str, float] = {}

    def record(
        truth_name: str, step: Any, name: str, metric: str, val: tuple[float, float]
    ) -> None:
        results.append(
            {"truth": truth_name, "step": step, "method": name, "metric": metric,
             "mean": val[0], "se": val[1]}
        )  # fmt: skip

    for truth_name in cfg["truth"]["use"]:
        s = time.perf_counter()
        if truth_name == "further_training":
            ft = cfg["truth.further_training"]
            gold = truth.further_training(
                exp.task, final, exp.train, exp.queries, indices,
                epochs=ft["epochs"], seeds=range(ft["seeds"]), lr=ft["lr"],
                batch_size=ft["batch_size"], momentum=ft["momentum"], mode=ft["mode"],
                center=ft["center"], cache=None if cache is None else cache / "further_training",
                cache_key=key, progress=progress,
            )  # fmt: skip
            for e in range(gold.shape[0]):
                for name, sc in scores.items():
                    for metric, val in metrics.agreement(sc[:, indices], gold[e]).items():
                        record(truth_name, e + 1, name, metric, val)
        elif truth_name == "loo":
            if exp.train_fn is None:
                raise ConfigError("leave-one-out needs the experiment's train_fn")
            gold = truth.leave_one_out(
                exp.train_fn, exp.task, exp.train, exp.queries, indices,
                seeds=range(cfg["truth.loo"]["seeds"]),
                cache=None if cache is None else cache / "loo", cache_key=key, progress=progress,
            )  # fmt: skip
            for name, sc in scores.items():
                for metric, val in metrics.agreement(sc[:, indices], gold).items():
                    record(truth_name, "", name, metric, val)
        else:
            if exp.train_fn is None:
                raise ConfigError("subset retraining (LDS) needs the experiment's train_fn")
            lds_cfg = cfg["truth.lds"]
            masks, outputs = truth.subset_retraining(
                exp.train_fn, exp.task, exp.train, exp.queries, lds_cfg["n_subsets"],
                lds_cfg["fraction"], seed=top["seed"],
                cache=None if cache is None else cache / "lds", cache_key=key, progress=progress,
            )  # fmt: skip
            for name, sc in scores.items():
                res = metrics.lds(sc, masks, outputs)
                record(truth_name, "", name, "lds", (res.mean, res.se))
        gold_seconds[truth_name] = time.perf_counter() - s

    report = {
        "name": top["name"],
        "experiment": exp.description,
        "config": {k or "top": v for k, v in cfg.items()},
        "n_left_out": n_idx,
        "method_seconds": timing,
        "truth_seconds": gold_seconds,
        "damping": used,
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
    """A plain-text table: one row per method, one column per gold standard (and per
    evaluated epoch of further training: at most ``max_steps`` of them, evenly spaced;
    the CSV has all), Spearman/cosine/LDS means."""
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
    head = ["method", "s"] + [
        f"{names.get(t, t)}{'@' + str(s) if s != '' else ''} {m[:4]}" for t, s, m in cols
    ]
    lines = [head]
    for name in methods:
        line = [name, f"{report['method_seconds'][name]:.2f}"]
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
