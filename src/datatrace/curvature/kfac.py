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

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..core import persist
from ..core.data import ExampleSource
from ..core.errors import ConfigError, StoreMismatchError
from ..core.task import AbstractTask
from .base import (
    AbstractFittedPreconditioner,
    AbstractPreconditioner,
    check_damping,
    check_positive,
)
from .context import FitContext
from .damping import kronecker_damping
from .fisher import Draw, Fisher, as_fisher
from .kfac_layers import KLayer, kfac_layers, problem_layers, select_kfac_parameters
from .kfac_passes import PassSettings, fit_factors, refit_eigenvalues
from .problem import CurvatureProblem

__all__ = ["EKFAC", "KFAC", "KroneckerPreconditioner", "kfac_layers"]

log = logging.getLogger("datatrace")


@dataclass
class KroneckerPreconditioner(AbstractFittedPreconditioner):
    """``(G + λI)⁻¹`` block by block in each layer's Kronecker eigenbasis."""

    problem: CurvatureProblem
    layers: list[KLayer]
    damping: float

    @property
    def offsets(self) -> dict[str, tuple[int, int]]:
        return self.problem.offsets

    def with_damping(self, damping: float) -> KroneckerPreconditioner:
        """The damping is applied at solve time only: the factors serve every damping."""
        return replace(self, damping=damping)

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(vectors)
        for lay in self.layers:
            x = self.solve_block(lay, self.block(lay, vectors))
            if lay.weight:
                s, e = self.offsets[lay.weight]
                out[:, s:e] = lay.weight_flat(x[:, :, : x.shape[2] - (1 if lay.bias else 0)])
            if lay.bias:
                s, e = self.offsets[lay.bias]
                out[:, s:e] = x[:, :, -1]
        return out

    def block(self, lay: KLayer, vectors: torch.Tensor) -> torch.Tensor:
        """A layer's [W | b] block (m, out, in') of flat vectors (m, p)."""
        assert lay.us is not None
        d_out = lay.us.shape[0]
        blocks = []
        if lay.weight:
            s, e = self.offsets[lay.weight]
            blocks.append(lay.weight_block(vectors[:, s:e], d_out))
        if lay.bias:
            s, e = self.offsets[lay.bias]
            blocks.append(vectors[:, s:e].reshape(-1, d_out, 1))
        return torch.cat(blocks, dim=2) if len(blocks) > 1 else blocks[0]

    def rotate_factors(
        self, lay: KLayer, e: torch.Tensor, a: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``U_Sᵀ (Σ_p e_p ãᵀ_p) U_A`` per example from the factors e (m, P, out) and a
        (m, P, in'): the factors rotated before they are multiplied (``P (out² + in'²)``
        instead of ``out·in' (out + in')`` per example) when that is cheaper. ``out``: a
        contiguous (m, out, in') tensor to write the result to."""
        assert lay.ua is not None and lay.us is not None
        positions, n_in, n_out = a.shape[1], a.shape[2], e.shape[2]
        if positions * (n_out**2 + n_in**2) >= n_out * n_in * (n_out + n_in):
            formed = lay.us.T @ torch.bmm(e.transpose(1, 2), a)
            return formed @ lay.ua if out is None else torch.matmul(formed, lay.ua, out=out)
        e_rot, a_rot = (e @ lay.us).transpose(1, 2), a @ lay.ua
        return torch.bmm(e_rot, a_rot) if out is None else torch.bmm(e_rot, a_rot, out=out)

    def solve_factors(
        self, lay: KLayer, e: torch.Tensor, a: torch.Tensor, rotated: bool = False
    ) -> torch.Tensor:
        """``(G_l + λI)⁻¹ Σ_p e_p ãᵀ_p`` per example (m, out, in') from its factors, or, with
        ``rotated``, the same in the layer's eigenbasis (``U_Sᵀ (...) U_A``: the rotation
        back is left to the caller, who may rotate the other side of a product instead)."""
        assert lay.ua is not None and lay.us is not None and lay.lam is not None
        x = self.rotate_factors(lay, e, a) / (lay.lam + self.damping)
        return x if rotated else lay.us @ x @ lay.ua.T

    def solve_block(self, lay: KLayer, v: torch.Tensor) -> torch.Tensor:
        """``(G_l + λI)⁻¹`` applied to layer blocks ``v`` (m, out, in')."""
        assert lay.ua is not None and lay.us is not None and lay.lam is not None
        rot = lay.us.T @ v @ lay.ua
        return lay.us @ (rot / (lay.lam + self.damping)) @ lay.ua.T

    def matrix(self) -> torch.Tensor:
        """The approximate G (p × p, block-diagonal): for tests on small models."""
        p = self.problem.p
        eye = torch.eye(p, dtype=self.problem.theta.dtype, device=self.problem.theta.device)
        inv = self.solve(eye) if self.damping > 0 else None
        if inv is not None:
            return torch.linalg.inv(inv) - self.damping * eye
        raise ConfigError("matrix() needs damping > 0")


# the factors' cache inside the feature store; version 3 drew sampled labels with
# torch.multinomial (other labels for the same seed), 2 had no Fisher settings, 1 no metadata
_FACTORS = persist.StoreFormat(
    tag="datatrace-kronecker-factors",
    version=4,
    files=("curvature-*.safetensors",),
    fix="delete the file to recompute the factors, or pass overwrite=True",
)
_FACTOR_KEYS = ("A", "S", "ua", "us", "lam")


def _save(path: Path, layers: list[KLayer], settings: dict[str, Any]) -> None:
    tensors = {f"{lay.name}/{key}": getattr(lay, key) for lay in layers for key in _FACTOR_KEYS}
    meta = {
        "format": _FACTORS.tag,
        "version": _FACTORS.version,
        "layers": _layer_names(layers),
        "settings": settings,
    }
    persist.save_tensors(path, tensors, meta)


def _load(path: Path, layers: list[KLayer], device: torch.device, settings: dict[str, Any]) -> bool:
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


def _layer_names(layers: list[KLayer]) -> list[str]:
    return [lay.name for lay in layers]


def _describe(settings: PassSettings) -> dict[str, Any]:
    return {
        "fisher": settings.fisher.value if settings.fisher else "auto",
        "samples": settings.samples,
        "seed": settings.seed,
    }


# the passes, by the names _fit_kronecker calls (tests replace them to prove a cache hit)
_fit_factors = fit_factors
_refit_eigenvalues = refit_eigenvalues


def _fit_kronecker(
    ctx: FitContext,
    damping: float | None,
    refit: bool,
    settings: PassSettings,
    path: Path | None,
) -> KroneckerPreconditioner:
    """Fit (or load from the store's cache file ``path``) every layer's factors and choose
    the damping (the default from the fitted eigenvalues: no λ₀ needed)."""
    problem = ctx.problem
    layers = problem_layers(problem)
    kind = "ekfac" if refit else "kfac"  # (in messages)
    described = _describe(settings)
    if path is None or not _load(path, layers, problem.theta.device, described):
        draws: list[Draw] = []  # the sampled labels, drawn once for both passes
        _fit_factors(problem, layers, settings, draws)
        if refit:
            _refit_eigenvalues(problem, layers, settings, draws)
        if path is not None:
            _save(path, layers, described)
    used = kronecker_damping(damping, mean_eigenvalue(layers), f"the {kind.upper()} curvature")
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


def mean_eigenvalue(layers: list[KLayer]) -> float:
    """The mean of every layer's fitted eigenvalues ``lam`` (weighted by their number):
    ``trace(G)/p`` of the block-diagonal approximation."""
    total = sum(float(lay.lam.double().sum()) for lay in layers if lay.lam is not None)
    return total / max(1, sum(lay.lam.numel() for lay in layers if lay.lam is not None))


def _numerical_floor(lay: KLayer, damping: float = 0.0) -> float:
    """The size below which an eigenvalue of the layer's ``G + λI`` is round-off."""
    assert lay.lam is not None
    shifted = lay.lam + damping
    return torch.finfo(shifted.dtype).eps * float(shifted.abs().max()) * max(shifted.shape)


def _check_not_singular(layers: list[KLayer], damping: float, kind: str) -> None:
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
    #: influence scores come from a fused pass over the training data (no stored features)
    fused_scoring: ClassVar[bool] = True

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
        return select_kfac_parameters(type(self).__name__, task, names, requested, train)

    def cache_file(self, prefix: Path) -> Path:
        """``<prefix>-kfac.safetensors`` (``-ekfac`` for EK-FAC): the fitted factors."""
        return prefix.with_name(f"{prefix.name}-{'ekfac' if self.refit else 'kfac'}.safetensors")

    def fit(self, ctx: FitContext) -> KroneckerPreconditioner:
        settings = PassSettings(as_fisher(self.fisher), self.samples, self.seed)
        path = self.cache_file(ctx.cache) if ctx.cache is not None else None
        return _fit_kronecker(ctx, self.damping, self.refit, settings, path)


@dataclass(frozen=True)
class KFAC(_KroneckerFactored):
    """Kronecker-factored Gauss–Newton (block-diagonal over Linear/Conv2d/Conv1D layers);
    factors are cached in the feature store.

    ``dt.Influence(dt.KFAC())`` (or ``EKFAC``) fitted without a ``store`` keeps no training
    features: the fit is two passes over the training data (factors; EK-FAC's eigenvalues)
    and each scoring call one more, forming a batch's per-example
    gradients one layer at a time against the preconditioned queries
    (:mod:`datatrace.methods.kronecker`). With ``store=...`` the features are stored as for
    every other method (the same scores, to round-off).

    Args:
        damping: λ (``None``: the default rule,
            :func:`~datatrace.curvature.damping.kronecker_damping`: the mean of the fitted
            eigenvalues, never below a layer's round-off level).
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
