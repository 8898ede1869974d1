"""What the scores depend on, as JSON-able fingerprints, so a cache is never reused after
something that changes the scores changed.

* :func:`model_fingerprint`: the model's class, its module tree (``repr``: layer types,
  sizes, activations) and the code of every ``forward`` not defined by torch itself;
* :func:`task_fingerprint`: the task's class, its settings, and the code of its loss and
  measurement (user functions of ``dt.Task``, methods of user subclasses);
* :func:`code_fingerprint`: a hash of a callable's code (bytecode, constants, names,
  closure values, ``functools.partial`` arguments), stable across processes.

What cannot be hashed (a callable's behaviour that depends on global state, files, or a
random generator) is the user's to name: every cache takes ``fingerprint_extra=`` (any
JSON-able value) and records it. Parameters and data are fingerprinted by their bytes
elsewhere (:meth:`Checkpoint.fingerprint`, :meth:`ExampleSource.fingerprint`).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import types
from typing import Any

import torch
from torch import nn

_TORCH_PREFIXES = ("torch.", "builtins.")


def code_fingerprint(fn: Any) -> str:
    """A hash of what ``fn`` computes, as far as its code shows (16 hex digits)."""
    h = hashlib.blake2b(digest_size=8)
    _hash_callable(fn, h, depth=0)
    return h.hexdigest()


def _hash_callable(fn: Any, h: Any, depth: int) -> None:
    if depth > 8:  # deeply nested partials/closures: the names so far are enough
        return
    if isinstance(fn, functools.partial):
        h.update(b"partial")
        _hash_callable(fn.func, h, depth + 1)
        h.update(repr((fn.args, sorted(fn.keywords.items()))).encode())
        return
    if isinstance(fn, types.MethodType):
        _hash_callable(fn.__func__, h, depth + 1)
        return
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    h.update(name.encode())
    code = getattr(fn, "__code__", None)
    if code is not None:
        _hash_code(code, h)
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if callable(value):
                _hash_callable(value, h, depth + 1)
            else:
                h.update(_simple_repr(value).encode())
        for value in getattr(fn, "__defaults__", None) or ():
            h.update(_simple_repr(value).encode())
    elif not isinstance(fn, type) and callable(fn):
        code = getattr(type(fn).__call__, "__code__", None)
        if code is not None:  # a callable object: its class's code and settings
            _hash_code(code, h)
            h.update(_simple_repr(getattr(fn, "__dict__", {})).encode())


def _hash_code(code: types.CodeType, h: Any) -> None:
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _hash_code(const, h)
        else:
            h.update(repr(const).encode())


def _simple_repr(value: Any) -> str:
    """``repr`` of plain settings; the type name only for anything large or opaque."""
    if isinstance(value, (int, float, str, bool, type(None), torch.dtype)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ",".join(_simple_repr(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{"
            + ",".join(f"{k!r}:{_simple_repr(v)}" for k, v in sorted(value.items(), key=str))
            + "}"
        )
    if isinstance(value, torch.Tensor) and value.numel() <= 64:
        return f"tensor{tuple(value.shape)}{value.detach().cpu().flatten().tolist()}"
    return type(value).__qualname__


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """The model's class, module tree and the code of its non-torch ``forward`` methods."""
    forwards = {}
    for module in model.modules():
        cls = type(module)
        if cls.__module__.startswith(_TORCH_PREFIXES) or cls.__qualname__ in forwards:
            continue
        forwards[cls.__qualname__] = _class_code(cls)
    tree = hashlib.blake2b(repr(model).encode(), digest_size=8).hexdigest()
    return {"class": _qualname(type(model)), "modules": tree, "code": forwards}


def _class_code(cls: type) -> str:
    """A hash of the code of every function defined in ``cls`` and its non-torch bases."""
    h = hashlib.blake2b(digest_size=8)
    for klass in cls.__mro__:
        if klass.__module__.startswith(_TORCH_PREFIXES) or klass is object:
            continue
        for name, member in sorted(vars(klass).items()):
            if inspect.isfunction(member):
                h.update(name.encode())
                _hash_code(member.__code__, h)
    return h.hexdigest()


def task_fingerprint(task: Any) -> dict[str, Any]:
    """The task's class and the code of its class; its settings and user functions."""
    settings: dict[str, Any] = {}
    for key, value in sorted(vars(task).items()):
        # the model has its own fingerprint; runtime state (e.g. inferred sizes) is not a setting
        if key == "model" or key in getattr(task, "runtime_state", ()):
            continue
        if isinstance(value, nn.Module):
            settings[key] = model_fingerprint(value)
        elif callable(value):
            settings[key] = code_fingerprint(value)
        elif hasattr(value, "__dict__") and not isinstance(value, type):  # a wrapped task
            settings[key] = task_fingerprint(value)
        else:
            settings[key] = _simple_repr(value)
    return {"class": _qualname(type(task)), "code": _class_code(type(task)), "settings": settings}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def environment_fingerprint(dtype: torch.dtype, device: torch.device) -> dict[str, str]:
    """What else changes numbers: the compute dtype, the device kind, torch's version."""
    return {"dtype": str(dtype), "device": device.type, "torch": torch.__version__}


def check_extra(extra: Any) -> Any:
    """``fingerprint_extra`` must be JSON-able (it is recorded in a manifest)."""
    from .errors import ConfigError

    try:
        json.dumps(extra, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"fingerprint_extra must be JSON-able (numbers, strings, lists, dicts), got "
            f"{type(extra).__name__}: {exc}"
        ) from None
    return extra
