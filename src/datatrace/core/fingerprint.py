"""What the scores depend on, as JSON-able fingerprints, so a cache is never reused after
something that changes the scores changed.

* :func:`model_fingerprint`: the model's class, its module tree (``repr``: layer types,
  sizes, activations), every module's configuration (its plain attributes, such as
  ``num_heads`` or ``norm_first``, and the code of its hooks), the parameters' dtypes and
  the code of every method not defined by torch itself;
* :func:`task_fingerprint`: the task's class, its settings, and the code of its loss and
  measurement (user functions of ``dt.Task``, methods of user subclasses);
* :func:`code_fingerprint`: a hash of a callable's code (bytecode, constants, names,
  closure values, defaults, ``functools.partial`` arguments, and the user functions and
  plain values it reads as globals), stable across processes.

Tensors and arrays among these values are hashed by their shape, dtype and bytes.
What cannot be hashed (a callable's behaviour that depends on other state, files, or a
random generator) is the user's to name: every cache takes ``fingerprint_extra=`` (any
JSON-able value) and records it. Parameters and data are fingerprinted by their bytes
elsewhere (:meth:`Checkpoint.fingerprint`, :meth:`ExampleSource.fingerprint`).
"""

from __future__ import annotations

import argparse
import contextvars
import dis
import enum
import functools
import hashlib
import json
import sys
import types
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules import module as _torch_module

_TORCH_PREFIXES = ("torch.", "builtins.")
#: what every nn.Module has (parameters, buffers, submodules, hooks, the training flag:
#: scores are always computed in eval mode); the rest of a module's ``__dict__`` is its
#: configuration
_MODULE_INTERNALS = frozenset(vars(nn.Module()))
_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
#: global functions of these packages are not user code: their code is not followed
_LIBRARIES = frozenset(sys.stdlib_module_names) | {"torch", "numpy", "builtins", "triton"}
_MAX_DEPTH = 8  # nested values (partials of partials, objects in objects) hashed this deep
_DATA = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)
_MISSING = object()
_ARRAYS = (torch.Tensor, np.ndarray)
#: while a model's configuration is hashed: id -> name of its own parameters, buffers and
#: submodules (hashed by name, not by value: they are weights, or the tree itself)
_OWN: contextvars.ContextVar[dict[int, str] | None] = contextvars.ContextVar("_OWN", default=None)


def code_fingerprint(fn: Any) -> str:
    """A hash of what ``fn`` computes, as far as its code shows (16 hex digits)."""
    h = hashlib.blake2b(digest_size=8)
    _hash_callable(fn, h, 0, set())
    return h.hexdigest()


def _hash_callable(fn: Any, h: Any, depth: int, seen: set[int]) -> None:
    if depth > _MAX_DEPTH:  # deeply nested partials/closures: the names so far are enough
        return
    if isinstance(fn, functools.partial):
        h.update(b"partial")
        _hash_callable(fn.func, h, depth + 1, seen)
        h.update(_value_repr((fn.args, dict(fn.keywords)), depth + 1).encode())
        return
    if isinstance(fn, types.MethodType):
        _hash_callable(fn.__func__, h, depth + 1, seen)
        return
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    h.update(name.encode())
    if isinstance(fn, types.FunctionType):
        _hash_function(fn, h, depth, seen)
    elif not isinstance(fn, type) and callable(fn):
        call = type(fn).__call__
        if isinstance(call, types.FunctionType):  # a callable object: its class's code, settings
            _hash_function(call, h, depth + 1, seen)
            h.update(_value_repr(getattr(fn, "__dict__", {}), depth + 1).encode())


def _hash_function(fn: types.FunctionType, h: Any, depth: int, seen: set[int]) -> None:
    """A Python function's code, closure values, defaults, and the globals it reads: user
    functions (followed once each: ``seen``) and, outside installed packages, plain values
    (numbers, strings, tensors)."""
    if id(fn) in seen:  # only within one hash: never part of the digest
        h.update(b"seen")
        return
    seen.add(id(fn))
    _hash_code(fn.__code__, h)
    for cell in fn.__closure__ or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if callable(value) and not isinstance(value, (type, nn.Module)):
            _hash_callable(value, h, depth + 1, seen)
        else:
            h.update(_value_repr(value, depth + 1).encode())
    h.update(_value_repr(fn.__defaults__ or (), depth + 1).encode())
    h.update(_value_repr(fn.__kwdefaults__ or {}, depth + 1).encode())
    for name in _global_names(fn.__code__):
        value = fn.__globals__.get(name, _MISSING)
        if isinstance(value, types.FunctionType) and _user_code(value):
            h.update(f"global {name}:".encode())
            _hash_callable(value, h, depth, seen)
        elif _plain(value, 0) and not _installed(fn):
            h.update(f"global {name}={_value_repr(value, depth + 1)}".encode())


def _global_names(code: types.CodeType) -> list[str]:
    """The global names a code object (and the functions defined in it) reads, in order:
    ``co_names`` also holds attribute names (``self.dropout``), which a global of the same
    name must not stand for."""
    names: list[str] = []
    for ins in dis.get_instructions(code):
        if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME") and ins.argval not in names:
            names.append(str(ins.argval))
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names += [n for n in _global_names(const) if n not in names]
    return names


def _user_code(fn: types.FunctionType) -> bool:
    """Not a function of torch, numpy or the standard library."""
    return (getattr(fn, "__module__", None) or "").partition(".")[0] not in _LIBRARIES


def _installed(fn: types.FunctionType) -> bool:
    """Code of an installed package (a library's globals are its own state: a session id)."""
    path = fn.__code__.co_filename
    return "site-packages" in path or "dist-packages" in path


def _plain(value: Any, depth: int) -> bool:
    """Data rather than an object: numbers, strings, tensors, arrays, containers of them."""
    if isinstance(value, (*_DATA, torch.Tensor, np.ndarray, np.generic)):
        return True
    if isinstance(value, (tuple, list, set, frozenset)) and depth < 2 and len(value) <= 1000:
        return all(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict) and depth < 2 and len(value) <= 1000:
        return all(_plain(v, depth + 1) for v in value.values())
    return False


def _hash_code(code: types.CodeType, h: Any) -> None:
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _hash_code(const, h)
        else:
            h.update(_const_repr(const).encode())


def _const_repr(const: Any) -> str:
    """``repr`` of a code constant, frozensets sorted (their order changes between
    processes with the string hash seed)."""
    if isinstance(const, frozenset):
        return "frozenset(" + ",".join(sorted(_const_repr(c) for c in const)) + ")"
    if isinstance(const, tuple):
        return "(" + ",".join(_const_repr(c) for c in const) + ")"
    return repr(const)


def _value_repr(value: Any, depth: int = 0) -> str:
    """A deterministic text for a setting: ``repr`` of plain values, the shape, dtype and a
    hash of the bytes of tensors and arrays, the code of callables, an object's class and
    public attributes (a few levels deep; not for objects of torch, numpy or the standard
    library, whose attributes are runtime state)."""
    if isinstance(value, (*_DATA, enum.Enum)):
        return repr(value)
    own = (_OWN.get() or {}).get(id(value))
    if own is not None:  # the model's own parameter, buffer or submodule: by name
        return f"own:{own}"
    if depth > _MAX_DEPTH:
        return type(value).__qualname__
    if isinstance(value, torch.Tensor):
        return _tensor_repr(value)
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            return f"ndarray{value.shape}:" + _value_repr(value.tolist(), depth + 1)
        digest = hashlib.blake2b(np.ascontiguousarray(value).tobytes(), digest_size=8)
        return f"ndarray{value.shape}:{value.dtype}:{digest.hexdigest()}"
    if isinstance(value, np.generic):
        return f"{value.dtype}:{value.item()!r}"
    if isinstance(value, (tuple, list)):
        return "[" + ",".join(_value_repr(v, depth + 1) for v in value) + "]"
    if isinstance(value, (set, frozenset)):
        return "{" + ",".join(sorted(_value_repr(v, depth + 1) for v in value)) + "}"
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: str(kv[0]))
        return "{" + ",".join(f"{k!r}:{_value_repr(v, depth + 1)}" for k, v in items) + "}"
    if isinstance(value, type):
        return _qualname(value)
    if isinstance(value, nn.Module):  # its tree and tensors (not its attributes: no cycles)
        state = [(k, _tensor_repr(t)) for k, t in value.state_dict().items()]
        return f"{_qualname(type(value))}:{_digest(repr(value))}:{_digest(repr(state))}"
    if callable(value):
        h = hashlib.blake2b(digest_size=8)
        _hash_callable(value, h, depth + 1, set())
        return f"code:{h.hexdigest()}"
    if isinstance(value, (types.SimpleNamespace, argparse.Namespace)):  # a config object
        return _qualname(type(value)) + _value_repr(vars(value), depth + 1)
    if hasattr(value, "__dict__") and depth < 4 and not _library_object(value):
        public = {k: v for k, v in vars(value).items() if not str(k).startswith("_")}
        return _qualname(type(value)) + _value_repr(public, depth + 1)
    return type(value).__qualname__


def _library_object(value: Any) -> bool:
    """An object of torch, numpy or the standard library (a logger, a lock, a generator):
    its attributes are runtime state, not settings."""
    return type(value).__module__.partition(".")[0] in _LIBRARIES


def _tensor_repr(t: torch.Tensor) -> str:
    """A tensor's shape, dtype and a hash of its values."""
    t = t.detach()
    head = f"tensor{tuple(t.shape)}:{t.dtype}"
    if t.is_meta:
        return head + ":meta"
    try:
        if t.layout != torch.strided:
            t = t.to_dense()
        raw: Any = t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
    except (RuntimeError, TypeError):  # e.g. quantized: its values as Python numbers
        return head + ":" + _digest(repr(t.tolist()))
    return head + ":" + hashlib.blake2b(raw, digest_size=8).hexdigest()


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """The model's class, module tree, modules' configuration and hooks, dtypes and the code
    of its non-torch classes."""
    forwards = {}
    for module in model.modules():
        cls = type(module)
        if cls.__module__.startswith(_TORCH_PREFIXES) or cls.__qualname__ in forwards:
            continue
        forwards[cls.__qualname__] = _class_code(cls)
    tree = _digest(repr(model))
    dtypes = sorted({str(t.dtype) for t in (*model.parameters(), *model.buffers())})
    return {
        "class": _qualname(type(model)),
        "modules": tree,
        "config": _module_config(model),
        "dtypes": dtypes,
        "code": forwards,
    }


def _module_config(model: nn.Module) -> str:
    """A hash of every module's plain attributes (``num_heads``, ``norm_first``, a
    ``temperature`` read in ``forward``: what neither ``repr`` nor the parameters show) and
    of the code of the hooks registered on it, or on every module."""
    h = hashlib.blake2b(digest_size=8)
    own = {id(v): n for n, v in model.named_parameters(remove_duplicate=False)}
    own |= {id(v): n for n, v in model.named_buffers(remove_duplicate=False)}
    own |= {id(m): f"module {n}" for n, m in model.named_modules(remove_duplicate=False)}
    token = _OWN.set(own)  # an attribute pointing at the model's own weights names them
    try:
        for name, module in model.named_modules():
            h.update(f"module {name}".encode())
            library = type(module).__module__.startswith(_TORCH_PREFIXES)
            for key, value in sorted(vars(module).items()):
                # torch's private attributes are its runtime state (an LSTM's _flat_weights
                # point at whichever weights it last ran with); its settings are public
                if key not in _MODULE_INTERNALS and not (library and key.startswith("_")):
                    h.update(f"{key}={_value_repr(value, 1)}".encode())
            for kind in _HOOKS:
                for hook in getattr(module, kind, {}).values():
                    h.update(f"{kind}:{code_fingerprint(hook)}".encode())
    finally:
        _OWN.reset(token)
    for kind in _HOOKS:
        for hook in getattr(_torch_module, "_global" + kind, {}).values():
            h.update(f"global{kind}:{code_fingerprint(hook)}".encode())
    return h.hexdigest()


def _class_code(cls: type) -> str:
    """A hash of the code of every function defined in ``cls`` and its non-torch bases
    (methods, static and class methods, properties) and of the user functions they call."""
    h = hashlib.blake2b(digest_size=8)
    seen: set[int] = set()
    for klass in cls.__mro__:
        if klass.__module__.startswith(_TORCH_PREFIXES) or klass is object:
            continue
        for name, member in sorted(vars(klass).items()):
            fns: list[Any]
            if isinstance(member, (staticmethod, classmethod)):
                fns = [member.__func__]
            elif isinstance(member, property):
                fns = [member.fget, member.fset, member.fdel]
            else:
                fns = [member]
            for fn in fns:
                if isinstance(fn, types.FunctionType):
                    h.update(name.encode())
                    _hash_function(fn, h, 0, seen)
    return h.hexdigest()


def task_fingerprint(task: Any, _seen: frozenset[int] = frozenset()) -> dict[str, Any]:
    """The task's class and the code of its class; its settings and user functions."""
    _seen = _seen | {id(task)}
    settings: dict[str, Any] = {}
    for key, value in sorted(vars(task).items()):
        # the model has its own fingerprint; runtime state (e.g. inferred sizes) is not a setting
        if key == "model" or key in getattr(task, "runtime_state", ()):
            continue
        if isinstance(value, nn.Module):
            settings[key] = model_fingerprint(value)
            if value is not getattr(task, "model", None):  # a loss module's class weights
                settings[key]["state"] = _digest(_value_repr(dict(value.state_dict())))
        elif callable(value):
            settings[key] = code_fingerprint(value)
        elif (
            isinstance(value, (*_ARRAYS, type, types.SimpleNamespace, argparse.Namespace))
            or not hasattr(value, "__dict__")
            or _library_object(value)
        ):
            settings[key] = _value_repr(value)  # plain settings, a namespace by its values
        elif id(value) not in _seen:  # a wrapped task or a config object: its class's code
            settings[key] = task_fingerprint(value, _seen)  # and all its attributes
        else:
            settings[key] = "(itself)"  # an object that refers back to one hashed above
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
