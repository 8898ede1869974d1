"""Per-example gradients, as pure functions of (task, parameters, batch).

Implementations:

* :func:`per_example_grads`: ``vmap(grad(functional_call))``, the fast default.
* :func:`per_example_grads_loop`: one ``autograd.grad`` per example; the slow, obviously
  correct twin, and the fallback for models vmap cannot trace.
* :mod:`.rules`: hook rules (Linear on any (B, ..., d) input, Conv1D, Embedding,
  LayerNorm, Conv2d): every example's layer inputs and output gradients from one batched
  forward/backward pass, kept factored where that is cheaper (TracIn's last-layer trick:
  ``⟨e⊗a, e'⊗a'⟩ = (e·e')(a·a')``, summed over tokens).

Parameter selection (:func:`select_parameters`) accepts parameter names (``fc.weight``) and
module names (``fc`` selects all of its parameters).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from ..core.data import as_single_batch, batch_len, leaves, slice_batch
from ..core.errors import ConfigError, DataError
from ..core.task import AbstractTask

Params = dict[str, torch.Tensor]


def select_parameters(module: nn.Module, names: Sequence[str] | None) -> list[str]:
    """Names of the trainable parameters chosen by parameter or module names.

    Args:
        module: the model.
        names: ``None`` for every trainable parameter; else parameter names or module
            names (a module name selects every trainable parameter under it).

    Raises:
        ConfigError: a name matches no parameter or module (with close matches).
    """
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    if names is None:
        return trainable
    if isinstance(names, str):
        names = [names]
    chosen: list[str] = []
    modules = {n for n, _ in module.named_modules() if n}
    for name in names:
        hits = [p for p in trainable if p == name or p.startswith(name + ".")]
        if not hits:
            close = difflib.get_close_matches(name, trainable + sorted(modules), n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise ConfigError(
                f"parameter selection {name!r} matches no trainable parameter or module{hint} "
                f"(modules: {sorted(modules)[:12]})"
            )
        chosen.extend(h for h in hits if h not in chosen)
    return [p for p in trainable if p in chosen]  # model order, no duplicates


def value_fn(task: AbstractTask, measurement: bool) -> Callable[[Any, Any], torch.Tensor]:
    """The per-example function differentiated: the measurement or the training loss."""
    return task.measurement if measurement else task.loss


def bound_model(module: nn.Module, state: Mapping[str, torch.Tensor]) -> Callable[..., Any]:
    """``module`` run with ``state``'s tensors (the user's module is never modified).

    Floating-point inputs are cast to the parameters' dtype where data meets the model
    (float64 data into a float32 model works, as users expect); integer inputs are passed
    as they are (token ids for embeddings), and one that reaches a floating-point layer is
    a :class:`DataError` naming the dtypes instead of torch's ``mat1 and mat2`` error."""
    dtype = next((t.dtype for t in state.values() if t.is_floating_point()), None)

    def model(*args: Any, **kwargs: Any) -> Any:
        if dtype is not None:
            args, kwargs = _cast_floating((args, kwargs), dtype)
        try:
            return functional_call(module, dict(state), args, kwargs)
        except RuntimeError as exc:
            text = str(exc).lower()
            if "dtype" not in text and "scalar type" not in text:
                raise
            given = sorted({str(t.dtype) for t in leaves((args, kwargs))})
            raise DataError(
                f"the model's parameters are {dtype} but its inputs have dtypes {given} "
                f"({exc}); convert integer features with x.float() (integer inputs are "
                "passed unchanged, for embeddings)"
            ) from exc

    return model


def _cast_floating(tree: Any, dtype: torch.dtype) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.to(dtype) if tree.is_floating_point() and tree.dtype != dtype else tree
    if isinstance(tree, Mapping):
        return {k: _cast_floating(v, dtype) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(_cast_floating(v, dtype) for v in tree)
    return tree


def per_example_grads(
    task: AbstractTask,
    params: Params,
    buffers: Params,
    batch: Any,
    names: Sequence[str],
    measurement: bool = False,
) -> tuple[Params, torch.Tensor]:
    """Gradients of each example's loss (or measurement) w.r.t. the named parameters.

    Returns:
        (grads, values): ``grads[name]`` has shape (batch, *param.shape); ``values`` the
        per-example loss or measurement, shape (batch,).
    """
    selected = {n: params[n] for n in names}
    fixed = {**buffers, **{n: p for n, p in params.items() if n not in selected}}
    value = value_fn(task, measurement)

    def single(sel: Params, example: Any) -> torch.Tensor:
        out = value(bound_model(task.model, {**fixed, **sel}), as_single_batch(example))
        return out.reshape(())

    grads, values = vmap(grad_and_value(single), in_dims=(None, 0))(selected, batch)
    return grads, values


def per_example_grads_loop(
    task: AbstractTask,
    params: Params,
    buffers: Params,
    batch: Any,
    names: Sequence[str],
    measurement: bool = False,
) -> tuple[Params, torch.Tensor]:
    """The slow twin of :func:`per_example_grads`: one backward pass per example."""
    value = value_fn(task, measurement)
    n = batch_len(batch)
    rows: list[Params] = []
    vals = []
    for i in range(n):
        sel = {k: params[k].detach().requires_grad_(True) for k in names}
        state = {**buffers, **params, **sel}
        out = value(bound_model(task.model, state), slice_batch(batch, i, i + 1)).reshape(())
        rows.append(
            dict(zip(names, torch.autograd.grad(out, [sel[k] for k in names]), strict=True))
        )
        vals.append(out.detach())
    grads = {k: torch.stack([r[k] for r in rows]) for k in names}
    return grads, torch.stack(vals)


def flatten_grads(grads: Params, names: Sequence[str]) -> torch.Tensor:
    """Concatenate per-example gradients into (batch, p) in the order of ``names``."""
    return torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in names], dim=1)
