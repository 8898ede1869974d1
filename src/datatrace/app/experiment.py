"""An experiment: a model, its checkpoints, training data, queries and a retraining function.
Built in (scikit-learn data with an MLP or logistic regression trained by SGD) or from a
user's ``entry = "module:function"`` (called as ``function(config) -> Experiment``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core import persist
from ..core.checkpoint import Checkpoint
from ..core.errors import ConfigError, StoreMismatchError
from ..core.task import AbstractTask, ClassificationTask
from ..retrain import sgd_train
from .inputs import import_function
from .problems import lbfgs_fit, load_sklearn

log = logging.getLogger("datatrace")


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


def builtin_experiment(cfg: dict[str, Any], cache: Path | None = None) -> Experiment:
    """The built-in experiment; with ``cache`` (a folder), its trained model is read from
    there when an earlier call trained it with the same settings, and saved otherwise."""
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

    alpha = cfg["model"]["alpha"]
    folder = cache / f"trained-{trained_fingerprint(cfg)}" if cache is not None else None
    cached = read_trained(folder) if folder is not None else None
    if cached is not None:
        model, ckpts = make(), cached
        model.load_state_dict(dict(ckpts[-1].state))
        log.info("reusing the model trained by an earlier call (%s)", folder)
    else:
        model, ckpts = fit(torch.arange(n_train), cfg[""]["seed"], max(1, t["checkpoints"]))
        if t["retrain"] == "lbfgs":
            # the model explained is the optimum that leave-one-out retraining starts from
            # and compares with: polish the SGD result to convergence (the last checkpoint too)
            lbfgs_fit(model, xt, yt, alpha, max_iter=3000)
            last = ckpts[-1]
            ckpts[-1] = Checkpoint.from_module(model, weight=last.weight, name=last.name + "+lbfgs")
        if folder is not None:
            write_trained(folder, ckpts, cfg)
            log.info("trained the built-in model; cached in %s", folder)

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
    extra = {"trained_cache": folder, "reused": cached is not None}
    return Experiment(task, (xt, yt), (xq, yq), ckpts, train_fn, desc, extra)


# -- the built-in experiment's trained model, cached -------------------------------------------

_TRAINED = persist.StoreFormat(
    tag="datatrace-trained-model",
    version=1,
    files=("model.safetensors", "experiment.json"),
    fix="delete the folder to train again",
)


def trained_fingerprint(cfg: dict[str, Any]) -> str:
    """A hash of everything the built-in training depends on: the data, model and training
    settings, the seed, and the torch and datatrace versions."""
    import datatrace

    what = {
        "data": {k: cfg["data"][k] for k in ("dataset", "n_train", "n_query")},
        "model": {k: cfg["model"][k] for k in ("kind", "hidden", "activation", "alpha")},
        "train": cfg["train"],
        "seed": cfg[""]["seed"],
        "torch": torch.__version__,
        "datatrace": datatrace.__version__,
    }
    return persist.checksum(json.dumps(what, sort_keys=True).encode())[:16]


def write_trained(folder: Path, ckpts: list[Checkpoint], cfg: dict[str, Any]) -> None:
    """``model.safetensors`` (every checkpoint's state, checksummed) and ``experiment.json``
    (the settings it was trained with, for people)."""
    persist.make_folder(folder)
    tensors = {f"c{i}/{k}": v for i, c in enumerate(ckpts) for k, v in c.state.items()}
    meta = {
        "format": _TRAINED.tag,
        "version": _TRAINED.version,
        "checkpoints": [{"name": c.name, "weight": c.weight} for c in ckpts],
    }
    persist.save_tensors(folder / "model.safetensors", tensors, meta)
    persist.write_json(
        folder / "experiment.json",
        {"fingerprint": trained_fingerprint(cfg), "config": {k: cfg[k] for k in cfg if k}},
    )


def read_trained(folder: Path) -> list[Checkpoint] | None:
    """The checkpoints :func:`write_trained` saved in ``folder``, or None when there are
    none (or they are of another format version: trained again)."""
    path = folder / "model.safetensors"
    if not path.exists():
        return None
    try:
        tensors, meta = persist.load_tensors(path, _TRAINED, _TRAINED.fix)
    except StoreMismatchError:
        return None
    out = []
    for i, c in enumerate(meta["checkpoints"]):
        prefix = f"c{i}/"
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        out.append(Checkpoint(state=state, weight=c["weight"], name=c["name"]))
    return out


def build_experiment(cfg: dict[str, Any], cache: Path | None = None) -> Experiment:
    """The config's experiment: its ``data.entry`` function's, or the built-in one (its
    trained model cached in the folder ``cache`` when given)."""
    if cfg["model"]["factory"]:
        raise ConfigError(
            "[model] factory names your own trained model: use it with datatrace featurize, "
            "score or report (evaluate retrains, so it needs [data] entry or a built-in dataset)"
        )
    entry = cfg["data"]["entry"]  # a config is a program: only a plain function of your code
    exp = import_function(entry, "data.entry")(cfg) if entry else builtin_experiment(cfg, cache)
    if not isinstance(exp, Experiment) or not exp.checkpoints:
        raise ConfigError("the experiment must be an Experiment with at least one checkpoint")
    return exp
