"""Which layers K-FAC/EK-FAC take, decided from the module tree and a forward-only probe
before any gradient pass, and the per-layer views of their inputs and output gradients
(:class:`KLayer`). See :mod:`datatrace.curvature.kfac` for the maths."""

from __future__ import annotations

import enum
import logging
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.data import ExampleSource
from ..core.errors import ConfigError
from ..core.loop import over_batches
from ..core.runtime import model_device
from ..core.task import AbstractTask
from ..grads.layers import conv_patches, hookable, layer_calls
from ..grads.per_example import bound_model
from .problem import CurvatureProblem

log = logging.getLogger("datatrace")


class Kind(enum.Enum):
    LINEAR = "Linear"
    CONV2D = "Conv2d"
    CONV1D = "Conv1D"  # transformers.pytorch_utils.Conv1D: y = x @ W + b, W (in, out)


def layer_kind(module: nn.Module) -> Kind | None:
    if type(module) is nn.Linear:
        return Kind.LINEAR
    if type(module) is nn.Conv2d and hookable(module):
        return Kind.CONV2D
    hf = sys.modules.get("transformers.pytorch_utils")  # only loaded if the model uses it
    if hf is not None and type(module) is getattr(hf, "Conv1D", None):
        return Kind.CONV1D
    return None


@dataclass
class KLayer:
    name: str
    module: nn.Module
    kind: Kind
    weight: str | None = None  # flat-vector parameter names (None if not selected)
    bias: str | None = None
    A: torch.Tensor | None = None
    S: torch.Tensor | None = None
    ua: torch.Tensor | None = None
    us: torch.Tensor | None = None
    lam: torch.Tensor | None = None  # (out, in') eigenvalues in the U_S ⊗ U_A basis
    positions: float = field(default=0.0)  # counted positions seen (the mean of A)
    unmasked: bool = False  # warned that its input does not carry the token axis
    #: said that padded positions reach the loss through this layer (runtime state)
    reads_padding: bool = field(default=False, metadata={"saved": False})

    def patches(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Input activations per position, (batch, positions, in'), with the bias column,
        zero at padded positions."""
        if self.kind is Kind.CONV2D:
            assert isinstance(self.module, nn.Conv2d)
            a = conv_patches(self.module, x).transpose(1, 2)
        else:
            a = x.reshape(x.shape[0], -1, x.shape[-1])
        parts = ([a] if self.weight else []) + ([torch.ones_like(a[..., :1])] if self.bias else [])
        a = torch.cat(parts, dim=-1)
        return a if mask is None else a * mask[..., None]

    def out_grads(self, g: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Output gradients per position, (batch, positions, out), zero at padding."""
        e = g.flatten(2).transpose(1, 2) if self.kind is Kind.CONV2D else g
        e = e.reshape(e.shape[0], -1, e.shape[-1])
        return e if mask is None else e * mask[..., None]

    def position_mask(self, x: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor | None:
        """The token mask (batch, T) spread over this layer's positions (batch, positions),
        or None (no mask, a Conv2d, or an input without the token axis: logged)."""
        if tokens is None or self.kind is Kind.CONV2D or x.dim() < 3:
            return None
        if tuple(x.shape[:2]) != tuple(tokens.shape):
            if self.unmasked:
                return None
            self.unmasked = True
            log.warning(
                "K-FAC: layer %r gets an input of shape %s that does not start with the token "
                "mask's (batch, tokens) %s: its padded positions (if any) are counted",
                self.name, tuple(x.shape), tuple(tokens.shape),
            )  # fmt: skip
            return None
        view = tokens.reshape(*tokens.shape, *([1] * (x.dim() - 3)))
        return view.expand(*x.shape[:-1]).reshape(x.shape[0], -1).to(x.dtype)

    def reached(self, mask: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
        """The position mask, with every padded position counted where an output gradient
        of ``grads`` (the pulled-back columns) is not zero there: the token mask says which
        positions are padding, but only a model that masks its padding out keeps them out
        of its gradient; one that reads it (pooling over every position, no attention
        mask) makes them part of the curvature like any other position."""
        padded = mask.eq(0)
        if not bool(padded.any()):
            return mask
        at = padded.nonzero(as_tuple=True)
        hit = torch.zeros(len(at[0]), dtype=torch.bool, device=mask.device)
        for g in grads:  # the output gradients at the padded positions only
            hit |= self.out_grads(g, None)[at].ne(0).any(-1)
        if not bool(hit.any()):
            return mask
        extra = torch.zeros_like(padded)
        extra[at] = hit
        if not self.reads_padding:
            self.reads_padding = True
            log.info(
                "K-FAC: padded positions reach the loss through layer %r (the model reads its "
                "padding): they count in its factors",
                self.name,
            )
        return torch.where(extra, torch.ones_like(mask), mask)

    def weight_block(self, flat: torch.Tensor, out: int) -> torch.Tensor:
        """A weight's flat entries (m, out·in) as (m, out, in)."""
        if self.kind is Kind.CONV1D:
            return flat.reshape(flat.shape[0], -1, out).transpose(1, 2)
        return flat.reshape(flat.shape[0], out, -1)

    def weight_flat(self, block: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`weight_block`."""
        if self.kind is Kind.CONV1D:
            block = block.transpose(1, 2)
        return block.reshape(block.shape[0], -1)


def live_positions(live: torch.Tensor, *factors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The factors (b, P, ·) restricted to the positions where ``live`` (b, P) is true for
    some example of the batch (with ``live`` restricted to them, last). A position dead in
    every example (padding: zero input patches and output gradients) adds nothing to any
    ``Σ_p e_p ãᵀ_p`` nor to the factors, so dropping it changes no sum, only its cost (a
    right-padded batch is cut at its longest example)."""
    keep = live.any(0)
    if bool(keep.all()):
        return (*factors, live)
    index = keep.nonzero().squeeze(1)
    return (*(f.index_select(1, index) for f in factors), live.index_select(1, index))


def nonzero_rows(e: torch.Tensor) -> torch.Tensor:
    """(b, P): positions whose output gradient row is not all zero (the others contribute
    nothing to ``Σ_p e_p ãᵀ_p``: padding, whose gradient is exactly 0 when the model masks
    it out)."""
    return e.ne(0).any(-1)


# -- which layers: decided before any gradient pass -----------------------------------------


def kfac_layers(model: nn.Module, names: list[str]) -> tuple[dict[str, KLayer], dict[str, str]]:
    """Split the selected parameters ``names`` into K-FAC layers ({module: layer}) and the
    parameters left out ({name: why}), from the module tree alone."""
    owners: dict[int, list[tuple[str, str, nn.Module]]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for leaf, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((mname, leaf, mod))
    params = dict(model.named_parameters())
    layers: dict[str, KLayer] = {}
    left_out: dict[str, str] = {}
    for name in names:
        uses = owners[id(params[name])]
        if len(uses) > 1:
            who = ", ".join(f"{m}.{leaf} ({type(mod).__name__})" for m, leaf, mod in uses)
            left_out[name] = f"tied: shared by {who}; its gradient sums every use"
            continue
        mname, leaf, mod = uses[0]
        kind = layer_kind(mod)
        if kind is None or leaf not in ("weight", "bias"):
            left_out[name] = f"{type(mod).__name__} is not a K-FAC layer"
            continue
        lay = layers.setdefault(mname, KLayer(mname, mod, kind))
        setattr(lay, leaf, name)
    return layers, left_out


def called_once(
    task: AbstractTask, layers: dict[str, KLayer], train: ExampleSource
) -> dict[str, str]:
    """{parameter: why} for the layers not called exactly once when computing the loss of
    one training example (forward only, eval mode)."""
    model = task.model
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    loop = over_batches(train, 1, 0, 1, device=model_device(model), eval_module=model)
    with torch.no_grad(), layer_calls({n: lay.module for n, lay in layers.items()}) as calls:
        for _, _, batch in loop:
            task.loss(bound_model(model, state), batch)
    left_out = {}
    for name, lay in layers.items():
        count = len(calls[name])
        if count != 1:
            why = "not called by the loss" if count == 0 else f"called {count} times per forward"
            for pname in (lay.weight, lay.bias):
                if pname:
                    left_out[pname] = why
    return left_out


def select_kfac_parameters(
    kind: str,
    task: AbstractTask,
    names: list[str],
    requested: tuple[str, ...] | None,
    train: ExampleSource,
) -> list[str]:
    layers, left_out = kfac_layers(task.model, names)
    if layers:
        left_out.update(called_once(task, layers, train))
    explicit = sorted(set(left_out) & set(requested or ()))
    if explicit:
        raise ConfigError(
            f"{kind} cannot precondition the requested parameters "
            f"{'; '.join(f'{n!r} ({left_out[n]})' for n in explicit)}: K-FAC layers are nn.Linear, "
            "nn.Conv2d (groups=1) and transformers' Conv1D, each called once per forward. "
            "Leave them out of params=[...] (or pass params=None: every supported layer)"
        )
    kept = [n for n in names if n not in left_out]
    if not kept:
        raise ConfigError(
            f"{kind}: none of the selected parameters is in a K-FAC layer ({left_out}); "
            "K-FAC layers are nn.Linear, nn.Conv2d (groups=1) and transformers' Conv1D"
        )
    if left_out:
        log.info(
            "%s: Kronecker factors for %d layers; left out of the scores (not featurized, "
            "not preconditioned): %s",
            kind,
            len({n.rpartition(".")[0] for n in kept}),
            "; ".join(f"{n} ({why})" for n, why in left_out.items()),
        )
    return kept


def problem_layers(problem: CurvatureProblem) -> list[KLayer]:
    layers, left_out = kfac_layers(problem.task.model, problem.names)
    if left_out:
        name, why = next(iter(left_out.items()))
        raise ConfigError(
            f"K-FAC/EK-FAC support nn.Linear, nn.Conv2d (groups=1) and transformers' Conv1D "
            f"layers; parameter {name!r}: {why}. Exclude it with params=[...]"
        )
    return list(layers.values())
