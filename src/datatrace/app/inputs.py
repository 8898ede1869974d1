"""Your model, checkpoints and data, named on the command line or in a config: what
``datatrace featurize | score | report`` attribute without training anything.

* ``--model pkg.module:build`` (config ``[model] factory``): a function called with no
  arguments that returns the ``nn.Module`` (its weights are the checkpoint when
  ``--checkpoints`` is not given). ``path/to/file.py:build`` works too.
* ``--task pkg.module:make`` (``[model] task``): ``make(model)`` returns the
  ``dt`` task (default: ``dt.ClassificationTask(model)``).
* ``--checkpoints 'ckpts/*.pt'`` (``[model] checkpoints``): :meth:`Checkpoint.glob`, in
  natural order, each weighted by the learning rate in its optimizer state, or by ``--lr``
  (``[model] lr``); ``--strip-prefix model.`` (``[model] strip_prefix``) for Lightning.
* ``--train`` / ``--queries`` (``[data] train`` / ``queries``), each one of

  - ``pkg.module:function``: called with no arguments; returns a Dataset, a DataLoader, a
    tuple ``(inputs, labels)`` or a dict of tensors;
  - a ``.npz``, ``.pt`` (read with ``weights_only=True``) or ``.safetensors`` file of
    tensors: inputs under ``x`` (or ``inputs``, ``input``, ``features``) and labels under
    ``y`` (or ``labels``, ``label``, ``targets``, ``target``); any other set of keys is
    passed as a dict batch (Hugging Face style: ``input_ids``, ``attention_mask``,
    ``labels``). A ``.pt`` file may also hold a tuple ``(inputs, labels)``;
  - a folder of images with ``labels.csv`` (rows ``filename,label``; a header line is
    optional): ``.npy`` arrays, or PNG/JPEG read with Pillow, as (channels, H, W) in
    [0, 1]; labels are integers, or names numbered in sorted order of the training set's.

Floating-point inputs given as tensors are cast to the model's dtype. Every problem is a
:class:`~datatrace.core.errors.DatatraceError` naming the flag (the CLI prints one line).
Relative paths in a config are relative to the config's folder.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.checkpoint import Checkpoint
from ..core.data import ExampleSource
from ..core.errors import CheckpointError, ConfigError, DataError, DatatraceError
from ..core.task import AbstractTask, ClassificationTask
from .datafiles import LABELS_FILE, image_folder, one_line, tensor_file

_MODULE_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_FILE_PATH = re.compile(r"^(?P<file>.+\.py):(?P<attr>[A-Za-z_]\w*)$")


@dataclass
class Inputs:
    """What a command attributes: the task (its model), checkpoints, data, queries."""

    task: AbstractTask
    checkpoints: list[Checkpoint]
    train: Any
    queries: Any
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def is_function_spec(spec: str) -> bool:
    """Whether ``spec`` names a function (``module:function`` or ``file.py:function``)."""
    return bool(_MODULE_PATH.match(spec) or _FILE_PATH.match(spec))


def import_function(spec: str, what: str, base: Path | None = None) -> Callable[..., Any]:
    """The function ``spec`` names: ``pkg.module:function`` (imported with the current
    folder, and ``base``, on the import path) or ``path/to/file.py:function``. Only a plain
    function of your own code is accepted (never of the standard library or datatrace)."""
    file_match = _FILE_PATH.match(spec)
    if file_match:
        path = Path(file_match["file"])
        if base is not None and not path.is_absolute():
            path = base / path
        if not path.is_file():
            raise ConfigError(f"{what} {spec!r}: no such file {str(path)!r}")
        module_name = f"_datatrace_user_{path.stem}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ConfigError(f"{what} {spec!r}: cannot import {str(path)!r}")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        _run_user_code(lambda: loader_spec.loader.exec_module(module), what, spec)  # type: ignore[union-attr]
        attr = file_match["attr"]
    else:
        if not _MODULE_PATH.match(spec):
            raise ConfigError(
                f"{what} must look like 'package.module:function' or 'file.py:function', "
                f"got {spec!r}"
            )
        module_name, _, attr = spec.partition(":")
        top = module_name.split(".")[0]
        if top in sys.stdlib_module_names or top in sys.builtin_module_names or top == "datatrace":
            raise ConfigError(f"{what} {spec!r} names a function of {top!r}, not of your own code")
        for folder in (Path.cwd(), base):
            if folder is not None and str(folder) not in sys.path:
                sys.path.insert(0, str(folder))
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"{what} {spec!r}: cannot import {module_name!r} ({exc})") from None
        except Exception as exc:
            raise ConfigError(
                f"{what} {spec!r}: importing {module_name!r} failed: {one_line(exc)}"
            ) from None
    fn = getattr(module, attr, None)
    if not inspect.isfunction(fn) or fn.__module__ != module.__name__:
        raise ConfigError(
            f"{what} {spec!r} must name a function defined in that module, got "
            f"{type(fn).__name__ if fn is not None else 'nothing'}"
        )
    return fn


def _run_user_code(call: Callable[[], Any], what: str, spec: str) -> Any:
    """Run a user function; its exceptions become one line naming the flag."""
    try:
        return call()
    except DatatraceError:
        raise
    except Exception as exc:
        raise ConfigError(f"{what} {spec!r} failed: {one_line(exc)}") from None


def load_model(spec: str, base: Path | None = None) -> nn.Module:
    """Call the factory ``spec`` names; it must return an ``nn.Module``."""
    fn = import_function(spec, "--model", base)
    model = _run_user_code(fn, "--model", spec)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"--model {spec!r} must return a torch.nn.Module, got {type(model).__name__}"
        )
    return model


def load_task(spec: str | None, model: nn.Module, base: Path | None = None) -> AbstractTask:
    """``dt.ClassificationTask(model)``, or what ``spec``'s function returns for ``model``."""
    if not spec:
        return ClassificationTask(model)
    fn = import_function(spec, "--task", base)
    task = _run_user_code(lambda: fn(model), "--task", spec)
    if not isinstance(task, AbstractTask):
        raise ConfigError(
            f"--task {spec!r} must return a datatrace task (e.g. dt.RegressionTask(model)), "
            f"got {type(task).__name__}"
        )
    if task.model is not model:
        raise ConfigError(f"--task {spec!r} must build its task around the model it is given")
    return task


def load_checkpoints(
    pattern: str | None,
    model: nn.Module,
    lr: float | None = None,
    strip_prefix: str | None = None,
    base: Path | None = None,
) -> list[Checkpoint]:
    """The files matching ``pattern`` (natural order), or the model's own weights."""
    if not pattern:
        return [Checkpoint.from_module(model, weight=1.0 if lr is None else lr, name="model")]
    path = Path(pattern)
    if base is not None and not path.is_absolute():
        path = base / path
    if lr is not None and not lr > 0:
        raise ConfigError(f"--lr must be > 0, got {lr!r}")
    try:
        return Checkpoint.glob(path, weight=lr, strip_prefix=strip_prefix or None)
    except CheckpointError as exc:
        raise CheckpointError(f"--checkpoints: {exc}") from None
    except ValueError as exc:  # e.g. an empty or absolute pattern's name
        raise CheckpointError(f"--checkpoints {pattern!r} is not a usable glob: {exc}") from None


def load_data(
    spec: str, what: str, base: Path | None = None, classes: list[str] | None = None
) -> tuple[Any, list[str] | None]:
    """The data ``spec`` names (see the module docstring) and, for an image folder with
    named labels, its class names (pass the training set's as ``classes`` for queries)."""
    path = Path(spec)
    if base is not None and not path.is_absolute():
        path = base / path
    if path.is_dir():
        return image_folder(path, what, classes)
    if path.suffix in (".npz", ".pt", ".pth", ".safetensors"):
        if not path.is_file():
            raise DataError(f"{what}: no such file {str(path)!r}")
        return tensor_file(path, what), None
    if is_function_spec(spec):
        fn = import_function(spec, what, base)
        data = _run_user_code(fn, what, spec)
        if isinstance(data, (tuple, list)):
            data = tuple(torch.as_tensor(v) if isinstance(v, np.ndarray) else v for v in data)
        return data, None
    if path.exists():
        raise DataError(
            f"{what} {spec!r}: a data file must be .npz, .pt or .safetensors (or a folder of "
            f"images with {LABELS_FILE}, or module:function)"
        )
    raise DataError(
        f"{what} {spec!r}: no such file or folder (or 'module:function' returning the data)"
    )


def as_model_dtype(data: Any, model: nn.Module) -> Any:
    """Floating-point tensors of a tuple or dict cast to the model's parameter dtype."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if dtype is None:
        return data

    def cast(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype:
            return t.to(dtype)
        return t

    if isinstance(data, tuple):
        return tuple(cast(t) for t in data)
    if isinstance(data, dict):
        return {k: cast(t) for k, t in data.items()}
    return data


def check_fits(task: AbstractTask, data: Any, what: str) -> None:
    """Run the task's loss on the first example: a model that cannot take the data (a
    shape mismatch, wrong keys) is a :class:`DataError` now, naming the flag."""
    source = ExampleSource(data, what)
    try:
        batch = source.batch(0, 1)
        with torch.no_grad():
            task.check_batch(task.model, batch, 0)
            task.loss(task.model, batch)
    except DatatraceError as exc:
        raise DataError(f"{what}: {exc}") from None
    except Exception as exc:
        raise DataError(f"the model cannot take the examples of {what}: {one_line(exc)}") from None


def own_inputs(
    *,
    model: str,
    train: str,
    queries: str | None,
    task: str | None = None,
    checkpoints: str | None = None,
    lr: float | None = None,
    strip_prefix: str | None = None,
    base: Path | None = None,
) -> Inputs:
    """The user's model (its factory), checkpoints and data, checked against each other."""
    module = load_model(model, base)
    the_task = load_task(task, module, base)
    ckpts = load_checkpoints(checkpoints, module, lr, strip_prefix, base)
    # the model runs with the last checkpoint's weights in the probes (and the report)
    try:
        params, buffers = ckpts[-1].parameters_for(module)
    except CheckpointError as exc:
        raise CheckpointError(f"--checkpoints: {exc}{_prefix_hint(ckpts[-1], module)}") from None
    with torch.no_grad():
        for name, value in {**params, **buffers}.items():
            _lookup(module, name).copy_(value)
    train_data, classes = load_data(train, "--train", base)
    train_data = as_model_dtype(train_data, module)
    check_fits(the_task, train_data, "--train")
    query_data = None
    if queries:
        query_data, _ = load_data(queries, "--queries", base, classes)
        query_data = as_model_dtype(query_data, module)
        check_fits(the_task, query_data, "--queries")
        ExampleSource(query_data, "--queries").check_like(ExampleSource(train_data, "--train"))
    desc = f"{type(module).__name__} from {model}, {len(ckpts)} checkpoint(s)"
    return Inputs(the_task, ckpts, train_data, query_data, desc, {"classes": classes})


def _prefix_hint(ckpt: Checkpoint, module: nn.Module) -> str:
    """A hint when every name in the checkpoint carries a prefix the model's lack
    (Lightning's ``model.``)."""
    keys = list(ckpt.state)
    prefix = keys[0].split(".")[0] + "." if keys and "." in keys[0] else ""
    if not prefix or not all(k.startswith(prefix) for k in keys):
        return ""
    if any(k.startswith(prefix) for k in module.state_dict()):
        return ""
    return f"; its names all start with {prefix!r}: pass --strip-prefix {prefix}"


def _lookup(module: nn.Module, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    sub = module.get_submodule(owner) if owner else module
    value = getattr(sub, leaf)
    assert isinstance(value, torch.Tensor)
    return value
