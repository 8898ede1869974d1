"""Hook rules: per-example gradients of standard layers from ONE batched backward pass.

A rule turns a layer call's input ``x`` and output gradient ``e`` (per example; examples do
not interact in eval mode) into the per-example gradients of the layer's parameters. The
leading dimension of every input and output is the example; all dimensions between it and
the feature dimension (tokens, positions) are flattened into ``N``, and a per-example
gradient is a sum over them:

* ``nn.Linear`` on ``(B, ..., in)``: weight ``Σ_n e_n a_nᵀ`` (out, in), bias ``Σ_n e_n``;
* transformers' ``Conv1D`` (``y = x W + b``, weight (in, out)): the same sum, transposed;
* ``nn.Conv2d``: ``Σ_p e_p patch_pᵀ`` over output positions (:func:`conv_patches`);
* ``nn.Embedding``: the output gradients scattered into the rows of the ids,
  ``Σ_n onehot(id_n) e_nᵀ`` (nothing for ``padding_idx``);
* ``nn.LayerNorm``: weight ``Σ_n e_n ∘ x̂_n``, bias ``Σ_n e_n`` (``x̂``: the normalised input).

Weight gradients are kept as :class:`Term` factors (never formed unless asked:
:func:`form`); a parameter shared by several layers (tied input/output embeddings) gets the
sum of every call's contribution. A layer whose output has batch dimension 1 while the
batch has B examples (Hugging Face position embeddings, ``(1, T)`` ids) is broadcast to B
rows so that its output gradient is per example. Padded tokens need no special case:
their output gradients are exactly zero when the mask removes them from the loss.

:func:`capture` runs the pass (scoped forward hooks); :func:`hook_plan` decides which
layers and parameters the rules cover for a model and a parameter selection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.data import batch_len
from ..core.task import AbstractTask
from .layers import NotFactorable, conv_patches, hookable, layer_calls
from .per_example import Params, bound_model, value_fn

LINEAR, CONV1D, CONV2D, EMBEDDING, LAYERNORM = "linear", "conv1d", "conv2d", "embedding", "norm"


def rule_kind(module: nn.Module) -> str | None:
    """The hook rule of a module (``None``: its parameters need vmap or the loop)."""
    kind = type(module)
    if kind is nn.Linear:
        return LINEAR
    if kind.__name__ == "Conv1D" and kind.__module__.startswith("transformers"):
        return CONV1D
    if kind is nn.Conv2d:
        return CONV2D if hookable(module) else None
    if kind is nn.Embedding:
        # max_norm renormalises the weight inside forward, scale_grad_by_freq rescales by
        # the batch's counts: neither gradient is a per-example scatter
        ok = module.max_norm is None and not module.scale_grad_by_freq
        return EMBEDDING if ok else None
    if kind is nn.LayerNorm:
        return LAYERNORM
    return None


@dataclass(frozen=True)
class Term:
    """One call's contribution ``Σ_n left_n right_nᵀ`` (rows × cols) to a weight gradient,
    per example. ``left``: (B, N, rows), or (B, N) integer row indices (an Embedding:
    ``left_n = onehot(id_n)``); ``right``: (B, N, cols). ``transposed``: the parameter is
    stored (cols, rows) (transformers' Conv1D)."""

    left: torch.Tensor
    right: torch.Tensor
    rows: int
    transposed: bool = False

    @property
    def indexed(self) -> bool:
        return not self.left.is_floating_point()


Grad = Term | torch.Tensor  # a factored weight contribution, or a formed (B, *shape) gradient


def call_grads(kind: str, module: nn.Module, x: torch.Tensor, e: torch.Tensor) -> dict[str, Grad]:
    """``{"weight": ..., "bias": ...}`` of one call of ``module`` (rule ``kind``) from its
    input ``x`` and output gradient ``e`` (batch first); only the parameters it has."""
    b = e.shape[0]
    out: dict[str, Grad] = {}
    if kind in (LINEAR, CONV1D):
        a = x.reshape(b, -1, x.shape[-1])
        eg = e.reshape(b, -1, e.shape[-1])
        out["weight"] = Term(eg, a, eg.shape[-1], transposed=kind == CONV1D)
        bias_grad = eg.sum(1)
    elif kind == CONV2D:
        assert isinstance(module, nn.Conv2d)
        eg = e.flatten(2).transpose(1, 2)  # (B, P, out)
        out["weight"] = Term(eg, conv_patches(module, x).transpose(1, 2), eg.shape[-1])
        bias_grad = eg.sum(1)
    elif kind == EMBEDDING:
        assert isinstance(module, nn.Embedding)
        ids = x.reshape(b, -1)
        eg = e.reshape(b, -1, e.shape[-1])
        if module.padding_idx is not None:  # torch leaves the padding row's gradient at 0
            eg = eg * (ids != module.padding_idx)[..., None].to(eg.dtype)
        out["weight"] = Term(ids, eg, module.num_embeddings)
        return out
    elif kind == LAYERNORM:
        assert isinstance(module, nn.LayerNorm)
        shape = module.normalized_shape
        width = math.prod(shape)
        xs = x.reshape(b, -1, width)
        eg = e.reshape(b, -1, width)
        if module.weight is not None:
            mean = xs.mean(-1, keepdim=True)
            var = xs.var(-1, unbiased=False, keepdim=True)
            xhat = (xs - mean) * torch.rsqrt(var + module.eps)
            out["weight"] = (eg * xhat).sum(1).reshape(b, *shape)
        bias_grad = eg.sum(1).reshape(b, *shape)
    else:
        raise ValueError(f"no hook rule {kind!r}")
    if getattr(module, "bias", None) is not None:
        out["bias"] = bias_grad
    return out


def form(grad: Grad, shape: Sequence[int]) -> torch.Tensor:
    """The per-example gradient (B, *shape) of a contribution: ``Σ_n left_n right_nᵀ`` by
    einsum, or a scatter-add of the rows for indexed (Embedding) terms."""
    if isinstance(grad, torch.Tensor):
        return grad.reshape(grad.shape[0], *shape)
    b, cols = grad.right.shape[0], grad.right.shape[-1]
    if grad.indexed:
        flat = torch.zeros(b * grad.rows, cols, dtype=grad.right.dtype, device=grad.right.device)
        rows = (torch.arange(b, device=grad.left.device)[:, None] * grad.rows + grad.left).flatten()
        flat.index_add_(0, rows, grad.right.reshape(-1, cols))
        g = flat.view(b, grad.rows, cols)
    else:
        g = torch.einsum("bnr,bnc->brc", grad.left, grad.right)
    if grad.transposed:
        g = g.transpose(1, 2)
    return g.reshape(b, *shape)


def form_into(dest: torch.Tensor, parts: Sequence[Grad]) -> None:
    """``dest`` (B, *shape) := the sum of the contributions ``parts`` (at least one), each
    formed straight into ``dest``: factored terms by a batched matmul written into it (its
    rows may be strided, e.g. columns of a wider feature array), Embedding terms by a
    per-example row scatter onto it. Same values as summing :func:`form` of each part."""
    b = dest.shape[0]
    # written terms first (no zeroing pass), scattered ones added onto them
    ordered = sorted(parts, key=lambda g: isinstance(g, Term) and g.indexed)
    for i, grad in enumerate(ordered):
        if isinstance(grad, torch.Tensor):
            src = grad.reshape(dest.shape)
            dest.copy_(src) if i == 0 else dest.add_(src)
        elif grad.indexed:
            rows = dest.view(b, grad.rows, -1)
            if i == 0:
                rows.zero_()
            for k in range(b):
                rows[k].index_add_(0, grad.left[k], grad.right[k])
        else:
            _form_term_into(dest.view(b, -1), grad, first=i == 0)


def _form_term_into(flat: torch.Tensor, grad: Term, first: bool) -> None:
    """``flat`` (B, rows·cols, rows strided) := (or +=, unless ``first``) a factored term.

    Rows ``n`` where the output gradient ``left_n`` is exactly zero (padded tokens: the
    mask removes them from the loss) add exactly nothing to ``Σ_n left_n right_nᵀ``
    (``right`` is finite: checked before forming), so when a batch has such rows each
    example's sum runs over its own nonzero rows only -- for short sequences padded to a
    common length this skips most of the dominant cost. Otherwise one batched matmul."""
    b, n = grad.left.shape[0], grad.left.shape[1]
    rows, cols = grad.rows, grad.right.shape[-1]
    live = grad.left.ne(0).any(-1)  # (B, N)
    counts = live.sum(1).tolist()
    if min(counts) < n and sum(counts) <= 0.9 * b * n:
        for k in range(b):
            mat = flat[k].view(rows, cols) if not grad.transposed else flat[k].view(cols, rows)
            if counts[k] == 0:
                if first:
                    mat.zero_()
                continue
            keep = live[k].nonzero().squeeze(1) if counts[k] < n else None
            e = grad.left[k] if keep is None else grad.left[k].index_select(0, keep)
            a = grad.right[k] if keep is None else grad.right[k].index_select(0, keep)
            left, right = (a.t(), e) if grad.transposed else (e.t(), a)
            if first:
                torch.mm(left, right, out=mat)
            else:
                mat.addmm_(left, right)
        return
    left, right = grad.left.transpose(1, 2), grad.right
    if grad.transposed:  # stored (cols, rows): Σ right leftᵀ
        left, right = right.transpose(1, 2), grad.left
    mat = flat.view(b, left.shape[1], right.shape[2])
    if first:
        torch.bmm(left, right, out=mat)
    else:
        mat.baddbmm_(left, right)


def capture(
    task: AbstractTask,
    params: Params,
    buffers: Params,
    batch: Any,
    modules: dict[str, nn.Module],
    measurement: bool = False,
) -> tuple[dict[str, list[tuple[torch.Tensor, torch.Tensor]]], torch.Tensor]:
    """Every call's (input, output gradient) of ``modules``, batch first, from one batched
    forward/backward pass of the per-example loss (or measurement), and the values (B,).

    A call whose output has batch dimension 1 is broadcast to the B examples (its output
    is replaced by the expanded one, which the model then uses as before), so that its
    output gradient is per example; its input is expanded alike.

    Raises:
        NotFactorable: a call's output does not have the batch as its first dimension.
    """
    n = batch_len(batch)
    bad: list[NotFactorable] = []
    with layer_calls(modules, batch=n, refusals=bad) as calls:
        state = {**buffers, **{k: v.detach().requires_grad_(True) for k, v in params.items()}}
        values = value_fn(task, measurement)(bound_model(task.model, state), batch)
    if bad:
        raise bad[0]
    flat = [(name, i) for name, cs in calls.items() for i in range(len(cs))]
    outputs = [calls[name][i][1] for name, i in flat]
    # summing per-example values is exact: example b's output gradient depends only on b
    grads = torch.autograd.grad(values.sum(), outputs, allow_unused=True) if outputs else []
    result: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in modules}
    for (name, i), g in zip(flat, grads, strict=True):
        x, out = calls[name][i]
        result[name].append((x.detach(), torch.zeros_like(out) if g is None else g.detach()))
    return result, values.detach()


@dataclass(frozen=True)
class HookPlan:
    """Which layers the rules cover for a parameter selection.

    ``layers``: {layer: rule kind} of the layers to hook; ``params``: {selected parameter:
    [(layer, role)]}, every call site of each hooked parameter (a tied weight has several);
    a selected parameter used anywhere a rule does not cover is not in ``params``."""

    layers: dict[str, str]
    params: dict[str, list[tuple[str, str]]]


def hook_plan(model: nn.Module, names: Sequence[str], skip: Sequence[str] = ()) -> HookPlan:
    """The rules' cover of the selected parameters ``names`` (canonical names, as
    ``named_parameters()`` gives them), without the layers in ``skip``."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    selected = set(names)
    users: dict[str, list[tuple[str, str, str | None]]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        kind = None if mod_name in skip else rule_kind(mod)
        for local, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            name = canonical.get(id(p))
            if name in selected:
                role_ok = kind is not None and local in ("weight", "bias")
                users.setdefault(name, []).append((mod_name, local, kind if role_ok else None))
    params: dict[str, list[tuple[str, str]]] = {}
    layers: dict[str, str] = {}
    for name in names:
        sites = users.get(name, [])
        if not sites or any(k is None for _, _, k in sites):
            continue
        params[name] = sorted({(m, r) for m, r, _ in sites})
        for m, _, k in sites:
            assert k is not None
            layers[m] = k
    return HookPlan(layers, params)


def hooked_grads(
    plan: HookPlan,
    model: nn.Module,
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
) -> dict[str, list[Grad]]:
    """``{parameter: [contribution of each call]}`` of the plan's parameters (their sum is
    the per-example gradient)."""
    per_layer = {
        lay: [call_grads(kind, model.get_submodule(lay), x, e) for x, e in calls[lay]]
        for lay, kind in plan.layers.items()
    }
    return {
        name: [g[role] for lay, role in sites for g in per_layer[lay]]
        for name, sites in plan.params.items()
    }
