"""The TOML config of ``datatrace evaluate`` / ``featurize`` / ``score`` / ``report``:
:data:`SCHEMA` (every key, its type and default), loading, checking and resolving. An unknown
key is an error with a suggestion. A config is a program: ``entry = "module:function"`` and
``[model] factory`` run code.

Your own model (nothing trained)::

    [model]
    factory = "mypkg.models:build"     # returns the nn.Module
    checkpoints = "ckpts/epoch*.pt"    # optional; learning rates from the optimizer state
    [data]
    train = "train.npz"                # x, y (see datatrace.app.inputs)
    queries = "test.npz"
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..truth import Removal
from .problems import DATASETS
from .registry import entry, suggest

TRUTHS = ("further_training", "loo", "lds")
#: ``[methods]`` keys where 0 means "the solver's default rule" (no override)
SOLVER_DEFAULT_ZERO = ("cg_iters", "lissa_depth", "arnoldi_rank")


# section -> key -> default (the type of the default is the expected type; None = any)
SCHEMA: dict[str, dict[str, Any]] = {
    "": {"name": "experiment", "seed": 0, "out": "evaluate-out", "progress": False},
    # your own data (featurize/score/report; see datatrace.app.inputs): a file, an image
    # folder or "module:function" each; relative paths are relative to the config's folder
    "data": {
        "dataset": "digits",
        "n_train": 300,
        "n_query": 30,
        "entry": "",
        "train": "",
        "queries": "",
    },
    # factory = "module:function" returning your nn.Module: nothing is trained; task,
    # checkpoints (a glob), lr (0: from the files' optimizer state) and strip_prefix go with it
    "model": {
        "kind": "mlp",
        "hidden": 32,
        "activation": "tanh",
        "alpha": 1e-3,
        "factory": "",
        "task": "",
        "checkpoints": "",
        "lr": 0.0,
        "strip_prefix": "",
    },
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
        # 0: the solver's own rule (CG: 2⌈p/m⌉ + 10 iterations at most, stopping at its
        # tolerance; LiSSA: depth from scale / damping; Arnoldi: rank min(50, p); each solves
        # exactly when that is cheaper), which the suite measured
        "cg_iters": 0,
        "lissa_depth": 0,
        "arnoldi_rank": 0,
        "trak_dim": 512,
        # fitted.check(): examples left out of one epoch of further training (0: off)
        "check": 32,
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


def _suggest(word: str, options: Sequence[str]) -> str:
    return suggest(word, list(options))


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
        or (isinstance(value, int) and key not in ("seed", *SOLVER_DEFAULT_ZERO) and value < 1)
        or (key in SOLVER_DEFAULT_ZERO and value < 0)
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
        entry(name)  # an unknown name raises, with a suggestion
    Removal.of(
        cfg["truth.further_training"]["mode"], "[truth.further_training] mode"
    )  # an unknown mode raises
    for name in cfg["truth"]["use"]:
        if name not in TRUTHS:
            raise ConfigError(f"unknown gold standard {name!r}" + _suggest(name, TRUTHS))
    if not cfg["methods"]["use"] or not cfg["truth"]["use"]:
        raise ConfigError("methods.use and truth.use must name at least one entry each")
    own = cfg["model"]["factory"] != ""
    if own and cfg["data"]["train"] == "":
        raise ConfigError("[model] factory needs [data] train (your training data)")
    if not own and (cfg["data"]["train"] or cfg["data"]["queries"] or cfg["model"]["checkpoints"]):
        raise ConfigError(
            "[data] train/queries and [model] checkpoints go with [model] factory "
            "('module:function' returning your model)"
        )
    if own and cfg["data"]["entry"]:
        raise ConfigError("give [model] factory or [data] entry, not both")
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
