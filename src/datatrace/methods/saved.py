"""Saved fits and scores: ``fitted.save(folder)``, :func:`load` and :func:`load_scores`.

A saved gradient attributor (GradDot, GradCos, TracIn, every Influence preconditioner,
DataInf, TRAK) is a folder of two files, written atomically, nothing pickled::

    attributor.safetensors   tensors: every checkpoint's parameters and buffers
                             (state/<c>/...), the fitted preconditioners' tensors
                             (preconditioner/<c>/...: a Cholesky factor, eigenpairs,
                             K-FAC/EK-FAC factors unless the feature store caches them:
                             then by reference), TRAK's example weights, and the
                             training features when no feature store holds them
                             (features/<c>/<name>); its header carries the metadata below
                             with a checksum of everything
    attributor.json          the same metadata, for people: the method's settings (each
                             slot as its class and fields), the fingerprints of the
                             model, the task and the training data, the checkpoint
                             weights, λ₀ and the damping used, and where the features are
                             (a feature store's path and manifest, "inline", or
                             "recompute")

:func:`load` rebuilds the fit from it for a model and training data whose fingerprints
match (:class:`~datatrace.StoreMismatchError` otherwise, naming what differs); scores are
bit-identical to the original fit's. Only datatrace's own classes, and classes of the
slot types that are already imported (a contributor's preconditioner), are rebuilt from a
file; nothing else is imported or called.

A Distilled Datamodel's folder (``FittedDistilledDatamodel.save``) loads through
:func:`load` too (pass its final checkpoint as ``checkpoints=[final]``).
"""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..core import persist
from ..core.checkpoint import Checkpoint
from ..core.data import ExampleSource
from ..core.errors import ConfigError, DataError, StoreCorruptError, StoreMismatchError
from ..core.fingerprint import model_fingerprint, task_fingerprint
from ..core.runtime import model_device
from ..core.task import AbstractTask, ClassificationTask
from ..curvature.base import AbstractFittedPreconditioner
from ..features.memory import MemoryFeatureStore
from ..features.store import FeatureStore
from ..grads.per_example import select_parameters
from .codec import FIX, Decoder, encode
from .engine import GradientAttributor
from .fitted import FittedGradientAttributor
from .kronecker import FittedKroneckerInfluence

if TYPE_CHECKING:
    from .ddm_fitted import FittedDistilledDatamodel

FORMAT = persist.StoreFormat(
    tag="datatrace-fitted-attributor",
    version=1,
    files=("attributor.safetensors", "attributor.json"),
    fix=FIX,
)
TENSORS, METADATA = "attributor.safetensors", "attributor.json"


def save_fitted(fitted: FittedGradientAttributor, path: str | Path) -> Path:
    """Write ``fitted`` to the folder ``path`` (see the module docstring); returns it."""
    folder = Path(path)
    persist.make_folder(folder)
    tensors: dict[str, torch.Tensor] = {}
    model = fitted.task.model
    for c, (params, buffers) in enumerate(fitted.states):
        tensors.update({f"state/{c}/param/{k}": v for k, v in params.items()})
        tensors.update({f"state/{c}/buffer/{k}": v for k, v in buffers.items()})
    for c, w in enumerate(fitted.column_weights or []):
        tensors[f"column_weights/{c}"] = w
    meta = {
        "format": FORMAT.tag,
        "version": FORMAT.version,
        "method": encode(fitted.method, "method", tensors, model),
        # which parameters are selected: requires_grad decides them too
        "fingerprint": {
            **_fingerprint(fitted.task, fitted.train),
            "parameters": list(fitted.features.names),
        },
        "n_train": fitted.n_train,
        "weights": list(fitted.weights),
        "scale": fitted.scale,
        "batch_size": fitted.batch_size,
        "block_size": fitted.block_size,
        "lambda0": list(fitted.lambda0),
        "damping": fitted.damping,
        "column_weights": fitted.column_weights is not None,
        "preconditioners": [
            {"in_store": True}
            if _factors_in_store(fitted, c)
            else encode(pc, f"preconditioner/{c}", tensors, model)
            for c, pc in enumerate(fitted.preconditioners)
        ],
        "features": _features(fitted, tensors),
        # scored by the fused K-FAC pass (methods/kronecker.py), not from features
        "fused": isinstance(fitted, FittedKroneckerInfluence),
    }
    persist.save_tensors(folder / TENSORS, _unshared(tensors), meta)
    persist.write_json(folder / METADATA, meta)
    return folder


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied weights, one tensor under two
    names): later ones are copied."""
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.detach().clone() if ptr in seen else v
        if ptr != -1:
            seen.add(ptr)
    return out


def _fingerprint(scored: AbstractTask, train: ExampleSource) -> dict[str, Any]:
    return persist.as_json(
        {
            "model": model_fingerprint(scored.model),
            "task": task_fingerprint(scored),
            "data": train.fingerprint(),
        }
    )


def _features(fitted: FittedGradientAttributor, tensors: dict[str, torch.Tensor]) -> Any:
    store = fitted.store
    if store is None:
        return {"kind": "recompute"}
    if isinstance(store, FeatureStore) and not _temporary(store.path):
        return {"kind": "store", "path": str(store.path.resolve()), "manifest": store.manifest}
    layout = store.manifest["layout"]
    dtype = None
    for c in range(len(fitted.states)):
        for name, t in store.read(c, 0, fitted.n_train).items():
            tensors[f"features/{c}/{name}"] = t
            dtype = str(t.dtype).removeprefix("torch.")
    return {"kind": "inline", "layout": layout, "dtype": dtype, "chunk": store.chunk_size}


def _factors_in_store(fitted: FittedGradientAttributor, c: int) -> bool:
    """K-FAC / EK-FAC factors cached in a (non-temporary) feature store: saved by reference
    (loading reads them from there, checksummed; recomputed, identically, if deleted)."""
    store = fitted.store
    if not isinstance(store, FeatureStore) or _temporary(store.path):
        return False
    spec, prefix = fitted.method.preconditioner, fitted.curvature_cache(c)
    path = spec.cache_file(prefix) if spec is not None and prefix is not None else None
    return path is not None and path.exists()


def _temporary(path: Path) -> bool:
    """A store in a temporary folder of the fit's own (removed with it)."""
    return path.name.startswith("datatrace-features-") and path.parent == Path(
        tempfile.gettempdir()
    )


# -- loading ------------------------------------------------------------------------------------


def load(
    path: str | Path,
    task: AbstractTask | nn.Module | None = None,
    train: Any = None,
    *,
    model: nn.Module | None = None,
    checkpoints: list[Checkpoint] | None = None,
    store: str | Path | None = None,
    progress: bool | None = None,
) -> FittedGradientAttributor | FittedDistilledDatamodel:
    """A fit saved with ``fitted.save(path)``, for ``task`` (or a model: then
    ``dt.ClassificationTask(model)``) and the training data it was fitted on.

    Args:
        path: the folder given to ``save``.
        task: the task (or model) it was fitted for; its architecture, code and settings
            must be the same (fingerprints).
        train: the training data (same bytes; needed by gradient attributors, checked for
            a Distilled Datamodel when given).
        model: instead of ``task``: the model (``dt.ClassificationTask(model)``).
        checkpoints: a Distilled Datamodel's final checkpoint (``[final]``).
        store: where the feature store it refers to is now, if it moved.
        progress: progress bars when scoring.

    Raises:
        StoreMismatchError: another model, task or training data than the fit's (names
            what differs), or a feature store that changed.
        StoreCorruptError: damaged or incomplete files, or a feature store that is gone.
    """
    folder = Path(path)
    if (task is None) == (model is None):
        raise ConfigError("load needs exactly one of task (the task it was fitted for) or model=")
    task = task if task is not None else model
    the_task = ClassificationTask(task) if isinstance(task, nn.Module) else task
    if not isinstance(the_task, AbstractTask):
        raise ConfigError(f"load needs a datatrace task or a model, got {type(task).__name__}")
    if (folder / "fitted.safetensors").exists() and not (folder / TENSORS).exists():
        from .ddm_fitted import FittedDistilledDatamodel

        if not checkpoints:
            raise ConfigError(
                f"{folder} holds a Distilled Datamodel: pass checkpoints=[final], the "
                "checkpoint it was fitted at"
            )
        return FittedDistilledDatamodel.load(folder, the_task, checkpoints[-1], train=train)
    if not (folder / TENSORS).exists():
        raise StoreCorruptError(
            f"no saved fit in {folder} (no {TENSORS}); pass the folder given to fitted.save()"
        )
    if train is None:
        raise ConfigError("load needs train=, the training data the fit was made on")
    tensors, meta = persist.load_tensors(folder / TENSORS, FORMAT, FORMAT.fix)
    net = the_task.model
    method = Decoder(tensors, net, None)(meta["method"])
    if not isinstance(method, GradientAttributor):
        raise StoreCorruptError(f"{folder / TENSORS} holds no method; {FORMAT.fix}")
    scored = method.output.wrap(the_task) if method.output is not None else the_task
    source = ExampleSource(train, "training data")
    saved, given = meta["fingerprint"], _fingerprint(scored, source)
    _check_same(folder, {k: v for k, v in saved.items() if k != "parameters"}, given)
    spec = method._features_for(scored, source)  # the preconditioner's parameter choice
    chosen = select_parameters(scored.model, spec.params)  # as the featurizer chooses them
    _check_same(folder, saved, {**given, "parameters": chosen})
    ckpts = [Checkpoint(state=_state(tensors, c), weight=w) for c, w in enumerate(meta["weights"])]
    per_ckpt, states = method._bind(scored, ckpts, source, spec)
    device = model_device(net)
    column_weights = (
        [tensors[f"column_weights/{c}"].to(device) for c in range(len(ckpts))]
        if meta["column_weights"]
        else None
    )
    feature_store = _open_features(
        folder, meta["features"], tensors, store, len(ckpts), device, per_ckpt[0].layout()
    )
    cls = FittedKroneckerInfluence if meta.get("fused") else FittedGradientAttributor
    fitted = cls(
        method, scored, per_ckpt, states, list(meta["weights"]), source, feature_store,
        meta["batch_size"], meta["block_size"], progress, column_weights,
        fit_preconditioners=False,
    )  # fmt: skip
    for c, encoded in enumerate(meta["preconditioners"]):
        ctx = fitted.fit_context(c, meta["lambda0"][c])
        if encoded == {"in_store": True}:
            assert method.preconditioner is not None
            pc = method.preconditioner.fit(ctx)  # reads the factors cached in the store
        else:
            pc = Decoder(tensors, net, ctx)(encoded)
        if not isinstance(pc, AbstractFittedPreconditioner):
            raise StoreCorruptError(f"{folder / TENSORS}: preconditioner {c} is unreadable")
        fitted.preconditioners.append(pc)
    fitted.lambda0 = list(meta["lambda0"])
    fitted.scale = float(meta["scale"])
    return fitted


def _state(tensors: dict[str, torch.Tensor], c: int) -> dict[str, torch.Tensor]:
    out = {}
    for kind in ("param", "buffer"):
        prefix = f"state/{c}/{kind}/"
        out.update({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    return out


def _check_same(folder: Path, saved: dict[str, Any], given: dict[str, Any]) -> None:
    what = {
        "model": "model",
        "task": "task",
        "data": "training data",
        "parameters": "selection of parameters",
    }
    differs = [what[k] for k in what if saved.get(k) != given.get(k)]
    if differs:
        details = persist.diff(saved, given)
        raise StoreMismatchError(
            f"the fit saved in {folder} was made for another {' and '.join(differs)} "
            f"({'; '.join(details[:3]).replace('in the store', 'saved')}); load it with the "
            "model, task and training data it was fitted on, or fit again"
        )


def _open_features(
    folder: Path,
    saved: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    moved: str | Path | None,
    n_checkpoints: int,
    device: torch.device,
    layout: dict[str, int],
) -> FeatureStore | MemoryFeatureStore | None:
    """The saved fit's training features, in memory or in the store it refers to; refused
    when their layout is not the one the featurizer computes today (a fit saved by another
    datatrace version, whose arrays would be read as other parameters' features)."""
    kind = saved["kind"]
    if kind == "recompute":
        return None
    had = saved["layout"] if kind == "inline" else saved["manifest"]["layout"]
    if had != layout:
        differs = sorted(k for k in set(had) | set(layout) if had.get(k) != layout.get(k))
        raise StoreMismatchError(
            f"the fit saved in {folder} holds training features in another layout than this "
            f"datatrace computes for the same model and settings (it was saved by another "
            f"version): arrays {differs[:4]} differ (saved widths "
            f"{[had.get(k) for k in differs[:4]]}, now {[layout.get(k) for k in differs[:4]]}); "
            "fit again"
        )
    if kind == "inline":
        layout = saved["layout"]
        first = tensors[f"features/0/{next(iter(layout))}"]
        n = first.shape[0]
        mem = MemoryFeatureStore(layout, n, n_checkpoints, first.dtype, saved["chunk"], device)
        for c in range(n_checkpoints):
            for chunk, (start, stop) in enumerate(mem.chunks()):
                feats = {name: tensors[f"features/{c}/{name}"][start:stop] for name in layout}
                mem.write(c, chunk, feats)
        return mem
    m = saved["manifest"]
    path = Path(moved) if moved is not None else Path(saved["path"])
    if not (path / persist.MANIFEST).exists():
        raise StoreCorruptError(
            f"the feature store this fit refers to ({path}) is gone; pass store= where it is "
            "now, or fit again"
        )
    fs = FeatureStore(
        path,
        m["fingerprint"],
        m["layout"],
        m["n"],
        m["n_checkpoints"],
        getattr(torch, m["dtype"]),
        chunk_size=m["chunk_size"],
    )
    if fs.manifest != m or not all(fs.complete(c) for c in range(n_checkpoints)):
        raise StoreMismatchError(
            f"the feature store at {path} is not the one this fit was saved with; fit again"
        )
    return fs


# -- scores -------------------------------------------------------------------------------------


def load_scores(path: str | Path) -> Any:
    """Scores written by ``fitted.attribute_to_file`` / ``datatrace score --matrix`` (an
    ``.npy``: the (n_query, n_train) tensor) or ``datatrace score --out`` (a top-k CSV:
    ``(values, indices)``, each (n_query, k), best first)."""
    p = Path(path)
    if p.suffix == ".npy":
        try:
            return torch.from_numpy(np.load(p, allow_pickle=False))
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read scores from {p} ({exc})") from None
    if p.suffix == ".csv":
        try:
            with open(p, newline="") as fh:
                rows = list(csv.DictReader(fh))
            cells = [
                (int(r["query"]), int(r["rank"]), int(r["train_index"]), float(r["score"]))
                for r in rows
            ]
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise DataError(f"cannot read top-k scores from {p} ({exc})") from None
        if not cells:
            raise DataError(f"{p} holds no scores")
        n_query = 1 + max(c[0] for c in cells)
        k = max(c[1] for c in cells)
        values = torch.full((n_query, k), float("nan"), dtype=torch.float64)
        indices = torch.full((n_query, k), -1, dtype=torch.long)
        for q, r, i, s in cells:
            values[q, r - 1], indices[q, r - 1] = s, i
        return values, indices
    raise DataError(f"{p}: scores are read from .npy (the matrix) or .csv (top-k) files")
