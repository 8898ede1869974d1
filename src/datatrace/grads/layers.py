"""Layer mechanics, written once:

* :func:`hookable`: which layers' per-example gradients can come from hooks;
* :func:`layer_calls`: THE forward-hook capture (every call's input and output, optionally
  a probe added to the output; per example, with (1, T) calls broadcast to the batch and
  the calls that are not per example collected), used by the hook rules
  (:func:`datatrace.grads.rules.capture`), K-FAC and the structured Hessian;
* :func:`conv_patches`: THE Conv2d unfolding (the patch each output position sees), used
  by :func:`conv_grads`, the Kronecker projection and K-FAC;
* :func:`flat_offsets`: where each parameter sits in a flat vector of selected parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError

HOOKABLE = (nn.Linear, nn.Conv2d)


def hookable(module: nn.Module) -> bool:
    """Whether per-example gradients of this module's parameters can come from hooks: a
    Linear, or a Conv2d whose patches ``F.unfold`` forms (one group; zero padding, or none:
    reflect/replicate/circular padding is not what unfold pads with)."""
    if type(module) is nn.Linear:
        return True
    if type(module) is not nn.Conv2d or module.groups != 1:
        return False
    if isinstance(module.padding, str):
        return module.padding == "valid"
    return module.padding_mode == "zeros" or not any(module.padding)


Calls = dict[str, list[tuple[torch.Tensor, torch.Tensor]]]


@contextlib.contextmanager
def layer_calls(
    modules: Mapping[str, nn.Module],
    probes: Mapping[str, torch.Tensor] | None = None,
    batch: int | None = None,
    refusals: list[NotFactorable] | None = None,
) -> Iterator[Calls]:
    """``{name: [(first input, output) of each call]}`` of the named modules, filled while
    the context is open (scoped forward hooks, removed on exit, also on errors).

    With ``probes``, a module's hook returns ``output + probes[name]``: differentiating
    with respect to a zero probe gives the gradient at the layer's output (the output
    recorded is the one before the probe).

    With ``batch`` (the number of examples), every call must have one tensor input and
    output whose first dimension is the example: a call with first dimension 1 both ways
    (Hugging Face position embeddings on ``(1, T)`` ids) is broadcast to the batch (its
    output replaced by the expanded one, which the model then uses as before, so that its
    output gradient is per example; its input expanded alike); any other call is not
    recorded but appended to ``refusals`` as a :class:`NotFactorable`."""
    calls: Calls = {name: [] for name in modules}
    probes = probes or {}
    refused = refusals if refusals is not None else []

    def per_example(name: str, x: Any, out: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        assert batch is not None
        if not isinstance(out, torch.Tensor) or not isinstance(x, torch.Tensor):
            refused.append(NotFactorable(name, f"layer {name!r} is not called on one tensor"))
            return None
        if out.dim() and out.shape[0] == batch and x.dim() and x.shape[0] == batch:
            return x, out
        if batch > 1 and out.dim() and out.shape[0] == 1 and x.dim() and x.shape[0] == 1:
            return x.expand(batch, *x.shape[1:]), out.expand(batch, *out.shape[1:])
        refused.append(
            NotFactorable(
                name,
                f"layer {name!r} gets an input of shape {tuple(x.shape)} for a batch of "
                f"{batch}: its first dimension is not the example",
            )
        )
        return None

    def hook_for(name: str) -> Callable[..., torch.Tensor | None]:
        def hook(mod: nn.Module, inputs: tuple[Any, ...], out: Any) -> Any:
            x = inputs[0] if inputs else None
            if batch is None:
                calls[name].append((x, out))  # type: ignore[arg-type]
                used = out
            else:
                got = per_example(name, x, out)
                if got is None:
                    return None
                calls[name].append(got)
                used = got[1]
            if name in probes:
                return used + probes[name]
            return used if used is not out else None

        return hook

    handles = []
    try:
        for name, mod in modules.items():
            handles.append(mod.register_forward_hook(hook_for(name)))
        yield calls
    finally:
        for h in handles:
            h.remove()


def conv_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The input patch each output position of ``conv`` sees, (batch, in·kh·kw, positions):
    ``conv(x)`` is ``weight.flatten(1) @ patches`` plus the bias, position by position.

    Raises:
        ConfigError: string padding other than ``"valid"`` (its amounts are implicit).
    """
    if isinstance(conv.padding, str) and conv.padding != "valid":
        raise ConfigError(
            f"Conv2d with padding={conv.padding!r} is not supported here; give explicit "
            "padding amounts (e.g. padding=1)"
        )
    pad = 0 if isinstance(conv.padding, str) else conv.padding
    return F.unfold(x, conv.kernel_size, conv.dilation, pad, conv.stride)


def conv_grads(
    conv: nn.Conv2d, x: torch.Tensor, e: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example (weight, bias) gradients of a Conv2d from its input ``x`` and output
    gradient ``e``: ``Σ_p e_p patch_pᵀ`` (:func:`conv_patches`), shapes
    (batch, *weight.shape) and (batch, out)."""
    eg = e.flatten(2)  # (b, out, P)
    cols = conv_patches(conv, x)  # (b, in·kh·kw, P)
    weight = torch.bmm(eg, cols.transpose(1, 2)).reshape(x.shape[0], *conv.weight.shape)
    return weight, eg.sum(2)


def flat_offsets(names: Sequence[str], sizes: Sequence[int]) -> dict[str, tuple[int, int]]:
    """``{name: (start, stop)}``: where each parameter's entries sit in a flat vector that
    concatenates the parameters ``names`` (of ``sizes`` entries) in that order."""
    offsets, start = {}, 0
    for name, size in zip(names, sizes, strict=True):
        offsets[name] = (start, start + size)
        start += size
    return offsets


class NotFactorable(Exception):
    """Internal: the hooked layer path does not apply to ``layer`` of this model."""

    def __init__(self, layer: str, message: str) -> None:
        super().__init__(message)
        self.layer = layer
