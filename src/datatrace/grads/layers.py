"""Layer mechanics, written once: which layers per-example gradients can come from hooks,
their inputs and output gradients from one batched pass (:func:`layer_io`), and Conv2d
unfolding (:func:`conv_grads`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.task import AbstractTask
from .per_example import Params, bound_model, value_fn

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
        values = value_fn(task, measurement)(bound_model(task.model, state), batch)
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
