"""An experiment: a model, its checkpoints, training data, queries and a retraining function.
Built in (scikit-learn data with an MLP or logistic regression trained by SGD) or from a
user's ``entry = "module:function"`` (called as ``function(config) -> Experiment``)."""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.checkpoint import Checkpoint
from ..core.errors import ConfigError
from ..core.task import AbstractTask, ClassificationTask
from ..retrain import sgd_train
from .problems import lbfgs_fit, load_sklearn


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


def _make_model(cfg: dict[str, Any], d: int, k: int) -> nn.Module:
    m = cfg["model"]
    if m["kind"] == "logreg":
        return nn.Linear(d, k).double()
    act = nn.Tanh() if m["activation"] == "tanh" else nn.ReLU()
    return nn.Sequential(nn.Linear(d, m["hidden"]), act, nn.Linear(m["hidden"], k)).double()


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


_ENTRY = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_]\w*$")


def _load_entry(entry: str) -> Callable[[dict[str, Any]], Experiment]:
    """Import ``module:function``. A config is a program: this runs the user's code, so only
    a plain function defined in an importable, non-standard-library module is accepted
    (never ``os:system``, ``builtins:exec`` or a class/object path)."""
    if not _ENTRY.match(entry):
        raise ConfigError(f"data.entry must look like 'package.module:function', got {entry!r}")
    module_name, _, attr = entry.partition(":")
    top = module_name.split(".")[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names or top == "datatrace":
        raise ConfigError(
            f"data.entry {entry!r} names a function of {top!r}, not of your own code; it must "
            "be 'your_module:build' returning a datatrace Experiment"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot load data.entry {entry!r}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not inspect.isfunction(fn) or fn.__module__ != module.__name__:
        raise ConfigError(
            f"data.entry {entry!r} must name a function defined in {module_name!r}, got "
            f"{type(fn).__name__ if fn is not None else 'nothing'}"
        )
    return fn


def build_experiment(cfg: dict[str, Any]) -> Experiment:
    """The config's experiment: its ``data.entry`` function's, or the built-in one."""
    entry = cfg["data"]["entry"]
    exp = _load_entry(entry)(cfg) if entry else builtin_experiment(cfg)
    if not isinstance(exp, Experiment) or not exp.checkpoints:
        raise ConfigError("the experiment must be an Experiment with at least one checkpoint")
    return exp
