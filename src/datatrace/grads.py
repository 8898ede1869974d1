"""Per-example gradients, as pure functions of (task, parameters, batch).

Implementations:

* :func:`per_example_grads`: ``vmap(grad(functional_call))``, the fast default.
* :func:`per_example_grads_loop`: one ``autograd.grad`` per example; the slow, obviously
  correct twin, and the fallback for models vmap cannot trace.
* :func:`layer_io`: for ``nn.Linear`` and ``nn.Conv2d`` layers called once per forward, the
  layer inputs and output gradients of every example from one batched forward/backward
  pass (scoped hooks). For Linear layers these are the factors of the per-example weight
  gradient ``e ⊗ a``, kept factored so the full gradient is never formed (TracIn's
  last-layer trick: ``⟨e⊗a, e'⊗a'⟩ = (e·e')(a·a')``); :func:`conv_grads` turns a Conv2d's
  into its per-example gradient (unfolded patches times output gradients).

Parameter selection (:func:`select_parameters`) accepts parameter names (``fc.weight``) and
module names (``fc`` selects all of its parameters).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
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


HOOKABLE = (nn.Linear, nn.Conv2d)


def hookable(module: nn.Module) -> bool:
    """Whether per-example gradients of this module's parameters can come from hooks."""
    if type(module) is nn.Linear:
        return True
    return (
        type(module) is nn.Conv2d
        and module.groups == 1
        and (not isinstance(module.padding, str) or module.padding == "valid")
    )


def layer_io(
    task: AbstractTask,
    params: Params,
    buffers: Params,
    batch: Any,
    layers: Sequence[str],
    measurement: bool = False,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Inputs and output gradients of ``nn.Linear``/``nn.Conv2d`` layers, per example, from
    one batched forward/backward pass (scoped forward hooks).

    The per-example weight gradient of a Linear layer is ``outer(e, a)`` and its bias
    gradient ``e``; a Conv2d layer's is ``Σ_positions e_p ⊗ patch_p`` (see
    :func:`conv_grads`). Valid when each layer is called once per forward (Linear on a
    (batch, features) input) and examples do not interact (model in eval mode).

    Returns:
        ({layer: (input, output gradient)}, values): Linear ``a`` (batch, in) and ``e``
        (batch, out); Conv2d input (batch, C, H, W) and ``e`` (batch, out, H', W').

    Raises:
        NotFactorable: a layer is not called exactly once, or a Linear input is not 2-D.
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
        if len(calls) != 1:
            raise NotFactorable(name, f"layer {name!r} is called {len(calls)} times per forward")
        if type(task.model.get_submodule(name)) is nn.Linear and calls[0][0].dim() != 2:
            raise NotFactorable(name, f"Linear layer {name!r} gets a {calls[0][0].dim()}-D input")
    outputs = [captured[n][0][1] for n in layers]
    # Summing per-example values is exact here: example b's output gradient depends only on b.
    out_grads = torch.autograd.grad(values.sum(), outputs, allow_unused=True)
    io = {}
    for n, g in zip(layers, out_grads, strict=True):
        out = captured[n][0][1]
        io[n] = (captured[n][0][0].detach(), torch.zeros_like(out) if g is None else g.detach())
    return io, values.detach()


def conv_grads(
    conv: nn.Conv2d, x: torch.Tensor, e: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example (weight, bias) gradients of a Conv2d from its input ``x`` and output
    gradient ``e``: ``Σ_p e_p patch_pᵀ`` (unfolded patches), shapes (batch, *weight.shape)
    and (batch, out)."""
    pad = 0 if isinstance(conv.padding, str) else conv.padding
    cols = F.unfold(x, conv.kernel_size, conv.dilation, pad, conv.stride)  # (b, in*k*k, P)
    eg = e.flatten(2)  # (b, out, P)
    weight = torch.bmm(eg, cols.transpose(1, 2)).reshape(x.shape[0], *conv.weight.shape)
    return weight, eg.sum(2)


class NotFactorable(Exception):
    """Internal: the hooked layer path does not apply to ``layer`` of this model."""

    def __init__(self, layer: str, message: str) -> None:
        super().__init__(message)
        self.layer = layer


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
