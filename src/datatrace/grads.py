"""Per-example gradients, as pure functions of (task, parameters, batch).

Implementations:

* :func:`per_example_grads`: ``vmap(grad(functional_call))``, the fast default.
* :func:`per_example_grads_loop`: one ``autograd.grad`` per example; the slow, obviously
  correct twin, and the fallback for models vmap cannot trace.
* :func:`linear_factors`: for ``nn.Linear`` layers applied once per example, the factors of
  the per-example weight gradient ``e ⊗ a`` (output gradient, input activation) from one
  batched forward/backward pass, so the full gradient is never formed (TracIn's last-layer
  trick: ``⟨e⊗a, e'⊗a'⟩ = (e·e')(a·a')``).

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

from .errors import ConfigError
from .task import AbstractTask

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


def _value_fn(task: AbstractTask, measurement: bool) -> Callable[[Any, Any], torch.Tensor]:
    return task.measurement if measurement else task.loss


def bound_model(module: nn.Module, state: Mapping[str, torch.Tensor]) -> Callable[..., Any]:
    def model(*args: Any, **kwargs: Any) -> Any:
        return functional_call(module, dict(state), args, kwargs)

    return model


def _unsqueeze(example: Any) -> Any:
    if isinstance(example, torch.Tensor):
        return example.unsqueeze(0)
    if isinstance(example, Mapping):
        return {k: _unsqueeze(v) for k, v in example.items()}
    if isinstance(example, (tuple, list)):
        return type(example)(_unsqueeze(v) for v in example)
    return example


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
    value = _value_fn(task, measurement)

    def single(sel: Params, example: Any) -> torch.Tensor:
        out = value(bound_model(task.model, {**fixed, **sel}), _unsqueeze(example))
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
    value = _value_fn(task, measurement)
    n = _batch_len(batch)
    rows: list[Params] = []
    vals = []
    for i in range(n):
        sel = {k: params[k].detach().requires_grad_(True) for k in names}
        state = {**buffers, **params, **sel}
        out = value(bound_model(task.model, state), _slice(batch, i, i + 1)).reshape(())
        rows.append(
            dict(zip(names, torch.autograd.grad(out, [sel[k] for k in names]), strict=True))
        )
        vals.append(out.detach())
    grads = {k: torch.stack([r[k] for r in rows]) for k in names}
    return grads, torch.stack(vals)


def linear_factors(
    task: AbstractTask,
    params: Params,
    buffers: Params,
    batch: Any,
    layers: Sequence[str],
    measurement: bool = False,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Input activations and output gradients of ``nn.Linear`` layers, per example.

    The per-example weight gradient of layer ``l`` is ``outer(e, a)`` and its bias gradient
    ``e``. Valid when each layer is called once per forward on a (batch, features) input
    and examples do not interact (model in eval mode).

    Returns:
        ({layer: (a, e)}, values): ``a`` (batch, in_features), ``e`` (batch, out_features).

    Raises:
        NotFactorable: a layer is not called exactly once on a 2-D input.
    """
    captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in layers}
    handles = []

    def hook_for(name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
            captured[name].append((inputs[0], output))

        return hook

    try:
        for name in layers:
            handles.append(task.model.get_submodule(name).register_forward_hook(hook_for(name)))
        state = {**buffers, **{k: v.detach().requires_grad_(True) for k, v in params.items()}}
        values = _value_fn(task, measurement)(bound_model(task.model, state), batch)
    finally:
        for h in handles:
            h.remove()
    for name, calls in captured.items():
        if len(calls) != 1 or calls[0][0].dim() != 2:
            raise NotFactorable(f"layer {name!r} is not called once on a 2-D input")
    outputs = [captured[n][0][1] for n in layers]
    # Summing per-example values is exact here: example b's output gradient depends only on b.
    out_grads = torch.autograd.grad(values.sum(), outputs)
    factors = {
        n: (captured[n][0][0].detach(), g.detach()) for n, g in zip(layers, out_grads, strict=True)
    }
    return factors, values.detach()


class NotFactorable(Exception):
    """Internal: the factored Linear path does not apply to this model/selection."""


def _batch_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        return _batch_len(next(iter(batch.values())))
    return _batch_len(batch[0])


def _slice(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return {k: _slice(v, start, stop) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_slice(v, start, stop) for v in batch)
    return batch


def flatten_grads(grads: Params, names: Sequence[str]) -> torch.Tensor:
    """Concatenate per-example gradients into (batch, p) in the order of ``names``."""
    return torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in names], dim=1)
