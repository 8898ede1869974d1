"""K-FAC and EK-FAC: Kronecker-factored Gauss–Newton, block-diagonal across layers.

Per ``nn.Linear`` / ``nn.Conv2d`` layer l with input activations ``ã`` (with a 1 appended
for the bias; for convolutions the unfolded patches, one per output position p) and
output pseudo-gradients ``e_c`` (back-propagated columns of a square root of the output
Hessian ``∇²_out ℓ = Σ_c u_c u_cᵀ``, so that ``E_c[e_c e_cᵀ]`` is exact, not sampled):

* K-FAC: ``G_l ≈ S_l ⊗ A_l`` with ``A_l = E_i[mean_p ã ãᵀ]``, ``S_l = E_i[Σ_c Σ_p e e ᵀ]``;
  exact for a Linear layer and one example.
* EK-FAC: same eigenbasis ``U_S ⊗ U_A``, eigenvalues refitted to
  ``E_i Σ_c (U_Sᵀ G_ic U_A)²`` (G_ic the per-example, per-column weight gradient): the
  Frobenius-closest matrix diagonal in that basis, so never further from G than K-FAC.

``(G_l + λI)⁻¹ V = U_S [(U_Sᵀ V U_A) / (Λ + λ)] U_Aᵀ`` with V the layer's [W | b] block.

References:
    Martens and Grosse 2015 (K-FAC); Grosse and Martens 2016 (KFC, convolutions); George et
    al. 2018 (EK-FAC); Grosse et al. 2023 (influence functions with EK-FAC).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core import persist
from ..core.errors import ConfigError, StoreMismatchError
from ..grads.layers import conv_patches, layer_calls
from .base import (
    AbstractFittedPreconditioner,
    AbstractPreconditioner,
    check_damping,
    resolve_damping,
)
from .context import FitContext
from .problem import CurvatureProblem


@dataclass
class _Layer:
    name: str
    module: nn.Module
    weight: str | None  # flat-vector parameter names (None if not selected)
    bias: str | None
    A: torch.Tensor | None = None
    S: torch.Tensor | None = None
    ua: torch.Tensor | None = None
    us: torch.Tensor | None = None
    lam: torch.Tensor | None = None  # (out, in') eigenvalues in the U_S ⊗ U_A basis

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """Input activations per position, (batch, positions, in'), with the bias column."""
        mod = self.module
        if isinstance(mod, nn.Conv2d):
            a = conv_patches(mod, x).transpose(1, 2)
        else:
            a = x.reshape(x.shape[0], -1, x.shape[-1])
        parts = ([a] if self.weight else []) + ([torch.ones_like(a[..., :1])] if self.bias else [])
        return torch.cat(parts, dim=-1)

    @staticmethod
    def out_grads(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
        """Output gradients per position, (batch, positions, out)."""
        if isinstance(module, nn.Conv2d):
            return g.flatten(2).transpose(1, 2)
        return g.reshape(g.shape[0], -1, g.shape[-1])


def _layers(problem: CurvatureProblem) -> list[_Layer]:
    model = problem.task.model
    layers: dict[str, _Layer] = {}
    for name in problem.names:
        mod_name, _, leaf = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        supported = type(mod) is nn.Linear or (type(mod) is nn.Conv2d and mod.groups == 1)
        if not supported or leaf not in ("weight", "bias"):
            raise ConfigError(
                f"K-FAC/EK-FAC support nn.Linear and nn.Conv2d (groups=1) layers; parameter "
                f"{name!r} belongs to {type(mod).__name__}. Exclude it with params=[...]"
            )
        lay = layers.setdefault(mod_name, _Layer(mod_name, mod, None, None))
        setattr(lay, leaf, name)
    return list(layers.values())


def _pseudo_grads(
    problem: CurvatureProblem, layers: list[_Layer]
) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]]:
    """Per batch: ({layer: ã (b, P, in')}, {layer: [e_c (b, P, out) for each column c]})."""
    theta = problem.theta.detach().requires_grad_(True)
    for batch in problem.batches():
        with layer_calls({lay.name: lay.module for lay in layers}) as calls:
            out = problem.outputs(theta, batch)
        seen = {}
        for name, called in calls.items():
            if len(called) != 1:
                raise ConfigError(
                    f"K-FAC/EK-FAC: layer {name!r} is called {len(called)} times per forward "
                    "pass; its factors need exactly one call (exclude it with params=[...])"
                )
            seen[name] = (called[0][0].detach(), called[0][1])
        h_out = problem.output_hessians(out.detach(), batch)
        evals, evecs = torch.linalg.eigh(h_out)
        roots = evecs * evals.clamp_min(0).sqrt()[:, None, :]  # H = R Rᵀ, columns c
        acts = {lay.name: lay.patches(seen[lay.name][0]) for lay in layers}
        outs = [seen[lay.name][1] for lay in layers]
        grads: dict[str, list[torch.Tensor]] = {lay.name: [] for lay in layers}
        for lay, g in zip(layers, _pull_back_columns(out, outs, roots), strict=True):
            grads[lay.name] = [_Layer.out_grads(lay.module, gc.detach()) for gc in g]
        yield acts, grads


def _pull_back_columns(
    out: torch.Tensor, outs: list[torch.Tensor], roots: torch.Tensor
) -> list[list[torch.Tensor]]:
    """For each layer output in ``outs``, the pullbacks of every column c of ``roots``
    (b, classes, C) from ``out``: one batched backward pass for all columns (vmap over the
    grad outputs), or, where that cannot run, one backward pass per column (the same
    values)."""
    columns = roots.permute(2, 0, 1).contiguous()  # (C, b, classes)
    try:
        with warnings.catch_warnings():  # an op without a batching rule is looped: still exact
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            gs = torch.autograd.grad(out, outs, columns, retain_graph=True, is_grads_batched=True)
        return [list(g.unbind(0)) for g in gs]
    except RuntimeError:
        per_col = [torch.autograd.grad(out, outs, col, retain_graph=True) for col in columns]
        return [[cols[i] for cols in per_col] for i in range(len(outs))]


def _fit_factors(problem: CurvatureProblem, layers: list[_Layer]) -> None:
    for lay in layers:
        lay.A = lay.S = None
    for acts, grads in _pseudo_grads(problem, layers):
        for lay in layers:
            a = acts[lay.name]
            a_cov = torch.einsum("bpi,bpj->ij", a, a) / a.shape[1]
            es = torch.cat(grads[lay.name], dim=1)  # all columns c as extra positions
            s_cov = torch.einsum("bpi,bpj->ij", es, es)
            lay.A = a_cov if lay.A is None else lay.A + a_cov
            lay.S = s_cov if lay.S is None else lay.S + s_cov
    for lay in layers:
        assert lay.A is not None and lay.S is not None
        lay.A, lay.S = lay.A / problem.n, lay.S / problem.n
        la, lay.ua = torch.linalg.eigh(lay.A)
        ls, lay.us = torch.linalg.eigh(lay.S)
        lay.lam = ls.clamp_min(0)[:, None] * la.clamp_min(0)[None, :]


def _refit_eigenvalues(problem: CurvatureProblem, layers: list[_Layer]) -> None:
    sums: dict[str, torch.Tensor] = {}
    for acts, grads in _pseudo_grads(problem, layers):
        for lay in layers:
            assert lay.ua is not None and lay.us is not None
            a_rot = acts[lay.name] @ lay.ua  # (b, P, in')
            if a_rot.shape[1] == 1:
                # one position (Linear): Σ_c Σ_b (e_cb ⊗ a_b)² = (Σ_c e_c²)ᵀ a², one GEMM
                e2 = sum((e[:, 0] @ lay.us) ** 2 for e in grads[lay.name])
                sq = e2.T @ a_rot[:, 0] ** 2  # type: ignore[union-attr]
            else:
                rotated = (torch.einsum("bpo,bpi->boi", e @ lay.us, a_rot) for e in grads[lay.name])
                sq = sum((g**2).sum(0) for g in rotated)
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
        m = vectors.shape[0]
        for lay in self.layers:
            assert lay.ua is not None and lay.us is not None and lay.lam is not None
            blocks = []
            if lay.weight:
                s, e = self.offsets[lay.weight]
                blocks.append(vectors[:, s:e].reshape(m, lay.us.shape[0], -1))
            if lay.bias:
                s, e = self.offsets[lay.bias]
                blocks.append(vectors[:, s:e].reshape(m, -1, 1))
            v = torch.cat(blocks, dim=2)  # (m, out, in')
            rot = lay.us.T @ v @ lay.ua
            x = lay.us @ (rot / (lay.lam + self.damping)) @ lay.ua.T
            if lay.weight:
                s, e = self.offsets[lay.weight]
                out[:, s:e] = x[:, :, : x.shape[2] - (1 if lay.bias else 0)].reshape(m, -1)
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


# the factors' cache inside the feature store; version 1 had no metadata or checksum
_FACTORS = persist.StoreFormat(
    tag="datatrace-kronecker-factors",
    version=2,
    files=("curvature-*.safetensors",),
    fix="delete the file to recompute the factors, or pass overwrite=True",
)
_FACTOR_KEYS = ("A", "S", "ua", "us", "lam")


def _save(path: Path, layers: list[_Layer]) -> None:
    tensors = {f"{lay.name}/{key}": getattr(lay, key) for lay in layers for key in _FACTOR_KEYS}
    meta = {"format": _FACTORS.tag, "version": _FACTORS.version, "layers": _layer_names(layers)}
    persist.save_tensors(path, tensors, meta)


def _load(path: Path, layers: list[_Layer], device: torch.device) -> bool:
    """Fill ``layers`` from the cache; False (recompute) when there is none, or one of an
    older version or for other layers. A damaged file raises: its bytes changed after the
    checksum was written."""
    if not path.exists():
        return False
    try:
        tensors, meta = persist.load_tensors(path, _FACTORS, _FACTORS.fix)
    except StoreMismatchError:  # an older version: recompute and replace
        return False
    if meta.get("layers") != _layer_names(layers):
        return False
    for lay in layers:
        for key in _FACTOR_KEYS:
            setattr(lay, key, tensors[f"{lay.name}/{key}"].to(device))
    return True


def _layer_names(layers: list[_Layer]) -> list[str]:
    return [lay.name for lay in layers]


def _fit_kronecker(ctx: FitContext, damping: float | None, refit: bool) -> KroneckerPreconditioner:
    problem = ctx.problem
    layers = _layers(problem)
    kind = "ekfac" if refit else "kfac"
    path = ctx.cache.with_name(f"{ctx.cache.name}-{kind}.safetensors") if ctx.cache else None
    if path is None or not _load(path, layers, problem.theta.device):
        _fit_factors(problem, layers)
        if refit:
            _refit_eigenvalues(problem, layers)
        if path is not None:
            _save(path, layers)
    used = resolve_damping(damping, ctx.lambda0)
    _check_not_singular(layers, used, kind)
    return KroneckerPreconditioner(problem, layers, used)


def _check_not_singular(layers: list[_Layer], damping: float, kind: str) -> None:
    """Refuse a damping that leaves ``G + λI`` (numerically) singular: dividing by its
    round-off-sized eigenvalues returned huge or NaN scores, silently."""
    for lay in layers:
        assert lay.lam is not None
        shifted = lay.lam + damping
        floor = torch.finfo(shifted.dtype).eps * float(shifted.abs().max()) * max(shifted.shape)
        smallest = float(shifted.min())
        if smallest <= floor:
            raise ConfigError(
                f"{kind.upper()} curvature + damping is singular in layer {lay.name!r} "
                f"(smallest eigenvalue {smallest:.3g} with damping {damping:.3g}); use "
                "damping > 0 (e.g. the default, damping=None)"
            )


@dataclass(frozen=True)
class KFAC(AbstractPreconditioner):
    """Kronecker-factored Gauss–Newton (block-diagonal over Linear/Conv2d layers); factors
    are cached in the feature store.

    Args:
        damping: λ (``None``: the default multiple of λ₀).
    """

    damping: float | None = None

    def __post_init__(self) -> None:
        check_damping(self.damping)

    def fit(self, ctx: FitContext) -> KroneckerPreconditioner:
        return _fit_kronecker(ctx, self.damping, refit=False)


@dataclass(frozen=True)
class EKFAC(AbstractPreconditioner):
    """Eigenvalue-corrected K-FAC (George et al. 2018), as used by Grosse et al. 2023.

    Args:
        damping: λ (``None``: the default multiple of λ₀).
    """

    damping: float | None = None

    def __post_init__(self) -> None:
        check_damping(self.damping)

    def fit(self, ctx: FitContext) -> KroneckerPreconditioner:
        return _fit_kronecker(ctx, self.damping, refit=True)
