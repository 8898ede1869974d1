"""K-FAC and EK-FAC: Kronecker-factored Gauss–Newton, block-diagonal across layers.

Supported layers (:func:`kfac_layers`): ``nn.Linear`` on inputs of any rank (batch, ...,
in) — a transformer's (batch, tokens, in) included —, ``nn.Conv2d`` (groups=1) and
Hugging Face ``transformers``' ``Conv1D`` (GPT-2; weight (in, out)). With ``params=None``
every supported layer is used and every other parameter (embeddings, LayerNorms, ...) is left
out of the scores and listed in the fit log, as is a weight tied between two modules (GPT-2's
``lm_head`` shares the token embedding: its gradient sums both uses, which the Kronecker
factors of the Linear use do not describe) and a layer called other than once per forward.
The check is a forward-only probe on one example, before any gradient pass.

Per layer l, with input activations ``ã`` at each position p (with a 1 appended for the
bias; tokens of a sequence, a Conv2d's unfolded patches, one position for a 2-D input) and
output pseudo-gradients ``e_c = J_lᵀ r_c`` (output-space columns r_c with
``E[Σ_c r_c r_cᵀ] = ∇²_out ℓ``: :mod:`datatrace.curvature.fisher`):

* K-FAC: ``G_l ≈ S_l ⊗ A_l`` with ``A_l = Σ_{i,p} m ã ãᵀ / Σ_{i,p} m`` (the mean over
  counted positions) and ``S_l = (1/n) Σ_i Σ_c Σ_p m e eᵀ``; ``m`` is the task's token mask
  (:meth:`~datatrace.core.task.AbstractTask.token_mask`: padding counts nowhere), 1 without
  one. Exact for a Linear layer on one example with one position.
* EK-FAC: the eigenbasis ``U_S ⊗ U_A`` of K-FAC, eigenvalues refitted to
  ``(1/n) Σ_i Σ_c (U_Sᵀ G_ic U_A)²`` with ``G_ic = Σ_p m e_c ãᵀ`` the per-example weight
  gradient (summed over tokens): the Frobenius-closest matrix diagonal in that basis, so
  never further from G than K-FAC.

``(G_l + λI)⁻¹ V = U_S [(U_Sᵀ V U_A) / (Λ + λ)] U_Aᵀ`` with V the layer's [W | b] block.
Every pass runs with the model in eval mode (dropout off), its flags restored afterwards.

References:
    Martens and Grosse 2015 (K-FAC); Grosse and Martens 2016 (KFC, convolutions); George et
    al. 2018 (EK-FAC); Grosse et al. 2023 (influence functions with EK-FAC); Eschenhagen et
    al. 2023 (K-FAC for weight-sharing layers: the "expand" setting used for tokens).
"""

from __future__ import annotations

import enum
import logging
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..core import persist
from ..core.data import ExampleSource
from ..core.errors import ConfigError, StoreMismatchError
from ..core.loop import over_batches
from ..core.runtime import model_device
from ..core.task import AbstractTask
from ..grads.layers import conv_patches, hookable, layer_calls
from ..grads.per_example import bound_model
from .base import (
    AbstractFittedPreconditioner,
    AbstractPreconditioner,
    check_damping,
    check_positive,
    resolve_damping,
    symmetric_eigh,
)
from .context import FitContext
from .fisher import Fisher, as_fisher, output_columns, resolve_fisher
from .problem import CurvatureProblem

log = logging.getLogger("datatrace")


class _Kind(enum.Enum):
    LINEAR = "Linear"
    CONV2D = "Conv2d"
    CONV1D = "Conv1D"  # transformers.pytorch_utils.Conv1D: y = x @ W + b, W (in, out)


def _kind(module: nn.Module) -> _Kind | None:
    if type(module) is nn.Linear:
        return _Kind.LINEAR
    if type(module) is nn.Conv2d and hookable(module):
        return _Kind.CONV2D
    hf = sys.modules.get("transformers.pytorch_utils")  # only loaded if the model uses it
    if hf is not None and type(module) is getattr(hf, "Conv1D", None):
        return _Kind.CONV1D
    return None


@dataclass
class _Layer:
    name: str
    module: nn.Module
    kind: _Kind
    weight: str | None = None  # flat-vector parameter names (None if not selected)
    bias: str | None = None
    A: torch.Tensor | None = None
    S: torch.Tensor | None = None
    ua: torch.Tensor | None = None
    us: torch.Tensor | None = None
    lam: torch.Tensor | None = None  # (out, in') eigenvalues in the U_S ⊗ U_A basis
    positions: float = field(default=0.0)  # counted positions seen (the mean of A)
    unmasked: bool = False  # warned that its input does not carry the token axis

    def patches(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Input activations per position, (batch, positions, in'), with the bias column,
        zero at padded positions."""
        if self.kind is _Kind.CONV2D:
            assert isinstance(self.module, nn.Conv2d)
            a = conv_patches(self.module, x).transpose(1, 2)
        else:
            a = x.reshape(x.shape[0], -1, x.shape[-1])
        parts = ([a] if self.weight else []) + ([torch.ones_like(a[..., :1])] if self.bias else [])
        a = torch.cat(parts, dim=-1)
        return a if mask is None else a * mask[..., None]

    def out_grads(self, g: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Output gradients per position, (batch, positions, out), zero at padding."""
        e = g.flatten(2).transpose(1, 2) if self.kind is _Kind.CONV2D else g
        e = e.reshape(e.shape[0], -1, e.shape[-1])
        return e if mask is None else e * mask[..., None]

    def position_mask(self, x: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor | None:
        """The token mask (batch, T) spread over this layer's positions (batch, positions),
        or None (no mask, a Conv2d, or an input without the token axis: logged)."""
        if tokens is None or self.kind is _Kind.CONV2D or x.dim() < 3:
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

    def weight_block(self, flat: torch.Tensor, out: int) -> torch.Tensor:
        """A weight's flat entries (m, out·in) as (m, out, in)."""
        if self.kind is _Kind.CONV1D:
            return flat.reshape(flat.shape[0], -1, out).transpose(1, 2)
        return flat.reshape(flat.shape[0], out, -1)

    def weight_flat(self, block: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`weight_block`."""
        if self.kind is _Kind.CONV1D:
            block = block.transpose(1, 2)
        return block.reshape(block.shape[0], -1)


# -- which layers: decided before any gradient pass -----------------------------------------


def kfac_layers(model: nn.Module, names: list[str]) -> tuple[dict[str, _Layer], dict[str, str]]:
    """Split the selected parameters ``names`` into K-FAC layers ({module: layer}) and the
    parameters left out ({name: why}), from the module tree alone."""
    owners: dict[int, list[tuple[str, str, nn.Module]]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for leaf, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((mname, leaf, mod))
    params = dict(model.named_parameters())
    layers: dict[str, _Layer] = {}
    left_out: dict[str, str] = {}
    for name in names:
        uses = owners[id(params[name])]
        if len(uses) > 1:
            who = ", ".join(f"{m}.{leaf} ({type(mod).__name__})" for m, leaf, mod in uses)
            left_out[name] = f"tied: shared by {who}; its gradient sums every use"
            continue
        mname, leaf, mod = uses[0]
        kind = _kind(mod)
        if kind is None or leaf not in ("weight", "bias"):
            left_out[name] = f"{type(mod).__name__} is not a K-FAC layer"
            continue
        lay = layers.setdefault(mname, _Layer(mname, mod, kind))
        setattr(lay, leaf, name)
    return layers, left_out


def _called_once(
    task: AbstractTask, layers: dict[str, _Layer], train: ExampleSource
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


def _select(
    kind: str,
    task: AbstractTask,
    names: list[str],
    requested: tuple[str, ...] | None,
    train: ExampleSource,
) -> list[str]:
    layers, left_out = kfac_layers(task.model, names)
    if layers:
        left_out.update(_called_once(task, layers, train))
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


def _layers(problem: CurvatureProblem) -> list[_Layer]:
    layers, left_out = kfac_layers(problem.task.model, problem.names)
    if left_out:
        name, why = next(iter(left_out.items()))
        raise ConfigError(
            f"K-FAC/EK-FAC support nn.Linear, nn.Conv2d (groups=1) and transformers' Conv1D "
            f"layers; parameter {name!r}: {why}. Exclude it with params=[...]"
        )
    return list(layers.values())


# -- the passes over the training data -------------------------------------------------------


@dataclass
class _Pass:
    """One batch of a pass: each layer's activations (b, P, in'), its pseudo-gradients
    [(b, P, out) per column] and its number of counted positions."""

    acts: dict[str, torch.Tensor]
    grads: dict[str, list[torch.Tensor]]
    counts: dict[str, float]


def _pseudo_grads(
    problem: CurvatureProblem,
    layers: list[_Layer],
    desc: str,
    fisher: Fisher | None,
    samples: int,
    seed: int,
) -> Iterator[_Pass]:
    theta = problem.theta.detach().requires_grad_(True)
    generator = torch.Generator(device=theta.device).manual_seed(seed)
    used: Fisher | None = None
    for batch in problem.batches(desc=desc):
        tokens = problem.task.token_mask(batch)
        with layer_calls({lay.name: lay.module for lay in layers}) as calls:
            out = problem.outputs(theta, batch)
        for name, called in calls.items():
            if len(called) != 1:
                raise ConfigError(
                    f"K-FAC/EK-FAC: layer {name!r} is called {len(called)} times per forward "
                    "pass; its factors need exactly one call (exclude it with params=[...])"
                )
        if used is None:
            used = resolve_fisher(fisher, out[0].numel())
            log.info("%s: output-side factor from the %s Fisher", desc, used.value)
        columns = output_columns(problem.task, out, batch, used, samples, generator)
        pulled = _pull_back_columns(out, [calls[lay.name][0][1] for lay in layers], columns)
        step = _Pass({}, {}, {})
        for lay, g in zip(layers, pulled, strict=True):
            x = calls[lay.name][0][0].detach()
            mask = lay.position_mask(x, tokens)
            step.acts[lay.name] = a = lay.patches(x, mask)
            step.grads[lay.name] = [lay.out_grads(gc.detach(), mask) for gc in g]
            full = float(a.shape[0] * a.shape[1])
            step.counts[lay.name] = float(mask.sum()) if mask is not None else full
        yield step


def _pull_back_columns(
    out: torch.Tensor, outs: list[torch.Tensor], columns: torch.Tensor
) -> list[list[torch.Tensor]]:
    """For each layer output in ``outs``, the pullbacks of every output-space column
    (C, *out.shape) from ``out``: one batched backward pass for all columns (vmap over the
    grad outputs), or, where that cannot run, one backward pass per column (the same
    values)."""
    if columns.shape[0] == 1:
        gs = torch.autograd.grad(out, outs, columns[0], retain_graph=True, allow_unused=True)
        return [[_or_zeros(g, o)] for g, o in zip(gs, outs, strict=True)]
    try:
        with warnings.catch_warnings():  # an op without a batching rule is looped: still exact
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            gs = torch.autograd.grad(out, outs, columns, retain_graph=True, is_grads_batched=True)
        return [list(g.unbind(0)) for g in gs]
    except RuntimeError:
        per_col = [torch.autograd.grad(out, outs, col, retain_graph=True) for col in columns]
        return [[cols[i] for cols in per_col] for i in range(len(outs))]


def _or_zeros(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if g is None else g


def _fit_factors(problem: CurvatureProblem, layers: list[_Layer], settings: _Settings) -> None:
    for lay in layers:
        lay.A = lay.S = None
        lay.positions = 0.0
    for step in _pseudo_grads(problem, layers, "K-FAC factors", *settings.fisher_args()):
        for lay in layers:
            a = step.acts[lay.name]
            a_cov = torch.einsum("bpi,bpj->ij", a, a)
            es = torch.cat(step.grads[lay.name], dim=1)  # all columns c as extra positions
            s_cov = torch.einsum("bpi,bpj->ij", es, es)
            lay.A = a_cov if lay.A is None else lay.A + a_cov
            lay.S = s_cov if lay.S is None else lay.S + s_cov
            lay.positions += step.counts[lay.name]
    for lay in layers:
        assert lay.A is not None and lay.S is not None
        if lay.positions == 0:
            raise ConfigError(f"K-FAC layer {lay.name!r} saw no token (every position masked)")
        lay.A, lay.S = lay.A / lay.positions, lay.S / problem.n
        la, lay.ua = symmetric_eigh(lay.A, f"the input factor A of layer {lay.name!r}")
        ls, lay.us = symmetric_eigh(lay.S, f"the output-gradient factor S of layer {lay.name!r}")
        lay.lam = ls.clamp_min(0)[:, None] * la.clamp_min(0)[None, :]


#: entries of the rotated per-example gradients (examples × out × in') formed at once
_REFIT_ENTRIES = 1 << 24


def _refit_eigenvalues(
    problem: CurvatureProblem, layers: list[_Layer], settings: _Settings
) -> None:
    sums: dict[str, torch.Tensor] = {}
    for step in _pseudo_grads(problem, layers, "EK-FAC eigenvalues", *settings.fisher_args()):
        for lay in layers:
            assert lay.ua is not None and lay.us is not None
            a_rot = step.acts[lay.name] @ lay.ua  # (b, P, in')
            if a_rot.shape[1] == 1:
                # one position (Linear): Σ_c Σ_b (e_cb ⊗ a_b)² = (Σ_c e_c²)ᵀ a², one GEMM
                e2 = sum((e[:, 0] @ lay.us) ** 2 for e in step.grads[lay.name])
                sq = e2.T @ a_rot[:, 0] ** 2  # type: ignore[union-attr]
            else:  # G_ic = Σ_p e ãᵀ per example, rotated, in chunks of examples
                chunk = max(1, _REFIT_ENTRIES // (lay.us.shape[0] * a_rot.shape[2]))
                sq = torch.zeros(lay.us.shape[0], a_rot.shape[2], dtype=a_rot.dtype)
                sq = sq.to(a_rot.device)
                for e in step.grads[lay.name]:
                    e_rot = e @ lay.us
                    for s in range(0, a_rot.shape[0], chunk):
                        g = torch.einsum("bpo,bpi->boi", e_rot[s : s + chunk], a_rot[s : s + chunk])
                        sq += (g**2).sum(0)
            sums[lay.name] = sq if lay.name not in sums else sums[lay.name] + sq
    for lay in layers:
        lay.lam = sums[lay.name] / problem.n


@dataclass
class KroneckerPreconditioner(AbstractFittedPreconditioner):
    """``(G + λI)⁻¹`` block by block in each layer's Kronecker eigenbasis."""

    problem: CurvatureProblem
    layers: list[_Layer]
    damping: float

    @property
    def offsets(self) -> dict[str, tuple[int, int]]:
        return self.problem.offsets

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(vectors)
        for lay in self.layers:
            assert lay.ua is not None and lay.us is not None and lay.lam is not None
            d_out = lay.us.shape[0]
            blocks = []
            if lay.weight:
                s, e = self.offsets[lay.weight]
                blocks.append(lay.weight_block(vectors[:, s:e], d_out))
            if lay.bias:
                s, e = self.offsets[lay.bias]
                blocks.append(vectors[:, s:e].reshape(-1, d_out, 1))
            v = torch.cat(blocks, dim=2)  # (m, out, in')
            rot = lay.us.T @ v @ lay.ua
            x = lay.us @ (rot / (lay.lam + self.damping)) @ lay.ua.T
            if lay.weight:
                s, e = self.offsets[lay.weight]
                out[:, s:e] = lay.weight_flat(x[:, :, : x.shape[2] - (1 if lay.bias else 0)])
            if lay.bias:
                s, e = self.offsets[lay.bias]
                out[:, s:e] = x[:, :, -1]
        return out

    def matrix(self) -> torch.Tensor:
        """The approximate G (p × p, block-diagonal): for tests on small models."""
        p = self.problem.p
        eye = torch.eye(p, dtype=self.problem.theta.dtype, device=self.problem.theta.device)
        inv = self.solve(eye) if self.damping > 0 else None
        if inv is not None:
            return torch.linalg.inv(inv) - self.damping * eye
        raise ConfigError("matrix() needs damping > 0")


# the factors' cache inside the feature store; version 2 had no Fisher settings, 1 no metadata
_FACTORS = persist.StoreFormat(
    tag="datatrace-kronecker-factors",
    version=3,
    files=("curvature-*.safetensors",),
    fix="delete the file to recompute the factors, or pass overwrite=True",
)
_FACTOR_KEYS = ("A", "S", "ua", "us", "lam")


def _save(path: Path, layers: list[_Layer], settings: dict[str, Any]) -> None:
    tensors = {f"{lay.name}/{key}": getattr(lay, key) for lay in layers for key in _FACTOR_KEYS}
    meta = {
        "format": _FACTORS.tag,
        "version": _FACTORS.version,
        "layers": _layer_names(layers),
        "settings": settings,
    }
    persist.save_tensors(path, tensors, meta)


def _load(path: Path, layers: list[_Layer], device: torch.device, settings: dict[str, Any]) -> bool:
    """Fill ``layers`` from the cache; False (recompute) when there is none, or one of an
    older version, for other layers or other Fisher settings. A damaged file raises: its
    bytes changed after the checksum was written."""
    if not path.exists():
        return False
    try:
        tensors, meta = persist.load_tensors(path, _FACTORS, _FACTORS.fix)
    except StoreMismatchError:  # an older version: recompute and replace
        return False
    if meta.get("layers") != _layer_names(layers) or meta.get("settings") != settings:
        return False
    for lay in layers:
        for key in _FACTOR_KEYS:
            setattr(lay, key, tensors[f"{lay.name}/{key}"].to(device))
    return True


def _layer_names(layers: list[_Layer]) -> list[str]:
    return [lay.name for lay in layers]


@dataclass(frozen=True)
class _Settings:
    fisher: Fisher | None
    samples: int
    seed: int

    def fisher_args(self) -> tuple[Fisher | None, int, int]:
        return self.fisher, self.samples, self.seed

    def describe(self) -> dict[str, Any]:
        return {
            "fisher": self.fisher.value if self.fisher else "auto",
            "samples": self.samples,
            "seed": self.seed,
        }


def _fit_kronecker(
    ctx: FitContext, damping: float | None, refit: bool, settings: _Settings
) -> KroneckerPreconditioner:
    problem = ctx.problem
    layers = _layers(problem)
    kind = "ekfac" if refit else "kfac"
    path = ctx.cache.with_name(f"{ctx.cache.name}-{kind}.safetensors") if ctx.cache else None
    described = settings.describe()
    if path is None or not _load(path, layers, problem.theta.device, described):
        _fit_factors(problem, layers, settings)
        if refit:
            _refit_eigenvalues(problem, layers, settings)
        if path is not None:
            _save(path, layers, described)
    used = resolve_damping(damping, ctx, gauss_newton=True)
    if damping is None:  # the rule's λ (from the mean curvature) may be round-off for a layer
        needed = max(_numerical_floor(lay) for lay in layers) * NUMERICAL_MARGIN
        if needed > used:
            log.info(
                "%s damping raised from the rule's %.3g to %.3g: %g × the round-off level "
                "of the stiffest layer's eigenvalues (float %s)",
                kind.upper(), used, needed, NUMERICAL_MARGIN, problem.theta.dtype,
            )  # fmt: skip
            used = needed
    _check_not_singular(layers, used, kind)
    return KroneckerPreconditioner(problem, layers, used)


#: The default damping is at least this many times a layer's round-off level
#: (:func:`_numerical_floor`), so ``G + λI`` is never numerically singular by default.
NUMERICAL_MARGIN = 10.0


def _numerical_floor(lay: _Layer, damping: float = 0.0) -> float:
    """The size below which an eigenvalue of the layer's ``G + λI`` is round-off."""
    assert lay.lam is not None
    shifted = lay.lam + damping
    return torch.finfo(shifted.dtype).eps * float(shifted.abs().max()) * max(shifted.shape)


def _check_not_singular(layers: list[_Layer], damping: float, kind: str) -> None:
    """Refuse a damping that leaves ``G + λI`` (numerically) singular: dividing by its
    round-off-sized eigenvalues returned huge or NaN scores, silently."""
    for lay in layers:
        assert lay.lam is not None
        shifted = lay.lam + damping
        floor = _numerical_floor(lay, damping)
        smallest = float(shifted.min())
        if smallest <= floor:
            raise ConfigError(
                f"{kind.upper()} curvature + damping is singular in layer {lay.name!r} "
                f"(smallest eigenvalue {smallest:.3g} with damping {damping:.3g}); use "
                "damping > 0 (e.g. the default, damping=None)"
            )


def _check_settings(damping: float | None, fisher: Any, samples: Any, seed: Any) -> Fisher | None:
    check_damping(damping)
    check_positive("samples", samples)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    return as_fisher(fisher)


@dataclass(frozen=True)
class _KroneckerFactored(AbstractPreconditioner):
    """The settings, layer choice and fit K-FAC and EK-FAC share (see :class:`KFAC`)."""

    damping: float | None = None
    fisher: Fisher | str | None = None
    samples: int = 1
    seed: int = 0
    #: refit the eigenvalues in the Kronecker eigenbasis (EK-FAC)
    refit: ClassVar[bool] = False

    def __post_init__(self) -> None:
        fisher = _check_settings(self.damping, self.fisher, self.samples, self.seed)
        object.__setattr__(self, "fisher", fisher)

    def parameters(
        self,
        task: AbstractTask,
        names: list[str],
        requested: tuple[str, ...] | None,
        train: ExampleSource,
    ) -> list[str]:
        return _select(type(self).__name__, task, names, requested, train)

    def fit(self, ctx: FitContext) -> KroneckerPreconditioner:
        settings = _Settings(as_fisher(self.fisher), self.samples, self.seed)
        return _fit_kronecker(ctx, self.damping, self.refit, settings)


@dataclass(frozen=True)
class KFAC(_KroneckerFactored):
    """Kronecker-factored Gauss–Newton (block-diagonal over Linear/Conv2d/Conv1D layers);
    factors are cached in the feature store.

    Args:
        damping: λ (``None``: the default rule, :func:`~datatrace.curvature.base.resolve_damping`,
            never below a layer's round-off level).
        fisher: the output-side factor: ``"exact"`` (per-example output Hessians),
            ``"sampled"`` (labels sampled from the model: the true Fisher, for large outputs
            such as a language model's logits), ``"empirical"`` (training labels), or
            ``None``: exact up to 100 outputs per example, sampled above
            (:mod:`datatrace.curvature.fisher`).
        samples: sampled labels per example (``fisher="sampled"``).
        seed: seed of the sampled labels.
    """


@dataclass(frozen=True)
class EKFAC(_KroneckerFactored):
    """Eigenvalue-corrected K-FAC (George et al. 2018), as used by Grosse et al. 2023.

    Args: as :class:`KFAC` (``damping``, ``fisher``, ``samples``, ``seed``).
    """

    refit: ClassVar[bool] = True
