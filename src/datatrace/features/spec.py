"""FeatureSpec: the frozen, validated settings of a gradient feature φ."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..core.errors import ConfigError
from .projector import ProjectionSpec, derive_seed


@dataclass(frozen=True)
class FeatureSpec:
    """What a gradient feature is made of.

    Args:
        params: ``None`` (all trainable parameters) or parameter/module names.
        projection_dim: ``None`` for exact gradients, else the random projection dimension.
        projection_seed: seed of the projection matrix.
        factored: keep ``nn.Linear`` (and transformers ``Conv1D``) gradients as their
            factors, per token for ``(B, T, d)`` inputs (``None``: without projection, where
            the factors of N tokens are smaller than the formed gradient,
            ``N(out + in) < out·in``, always for one token, their products by the cheaper of
            token pairs and gradients formed in cache; ``True``: always). Unprojected and
            unless ``False``, an untied ``nn.Embedding`` likewise keeps its tokens' ids and
            output gradients instead of a (rows × dim) gradient per example, where they
            are smaller and exact in the features' dtypes (float32/float64).
        layer_hooks: per-example gradients of the layers with hook rules
            (:mod:`datatrace.grads.rules`: Linear, Conv1D, Conv2d, Embedding, LayerNorm;
            tied parameters get every layer's rule summed) from one batched backward pass
            (requires examples that do not interact in eval mode); ``False``: vmap for
            every parameter.
        vmap: per-example gradients of other parameters with ``torch.func.vmap`` (``None``:
            try it, fall back to a per-example loop if the model cannot be traced).
        kronecker: with a projection, project hooked layers' gradients ``G = e ãᵀ`` (summed
            over tokens and positions; an Embedding's ``Σ_t onehot(id_t) e_tᵀ``, a tied
            weight's summed over its layers) from the factors, never forming G, with r
            independent Kronecker-product blocks: ``φ = [vec(U_c e (V_c ã)ᵀ)]_c / √k``
            (U_c, V_c Gaussian m × out and m × in', m = ``kronecker_block``, r = k/m²;
            ``E[φ·φ'] = ⟨G, G'⟩`` like a dense Gaussian projection; per-layer features are
            summed; LoGra, Choe et al. 2024). Cost O(N(k(out + in)/m + k)) per example for
            N tokens instead of O(k·out·in); the
            variance of inner products grows about like √m (m = 1: independent rows
            u_r ⊗ v_r, closest to a dense projection). ``None``: for Linear, Conv1D and
            Embedding weights (Conv2d only when asked: with many positions the dense path
            can be cheaper);
            ``False``: never.
        kronecker_block: m above.
        feature_dtype: dtype features are kept in (store, memory) and rounded to; ``None``:
            the model's. ``torch.bfloat16`` halves the store and its reads: every feature
            entry is rounded (relative error ≤ u = 2⁻⁸) and scores are computed from the
            rounded values in the model's dtype, so for first-order scores
            ``|S̃ − S| ≤ ((1 + u)^(2f) − 1) Σ_c |w_c| ‖φ_c(q)‖ ‖φ_c(z)‖`` (f = 1 for dense or
            projected features, 2 for factored layers: ≈ 0.008 or 0.016 times the product
            of norms, plus float32 summation error); tested on random and real features.
        tf32: on CUDA, score (the query × training matmuls) with TF32 inputs (10-bit
            mantissa, u = 2⁻¹¹, float32 accumulation): the same bound with u = 2⁻¹¹
            (≈ 0.001 times the product of norms for dense features). No effect on the CPU.
    """

    params: tuple[str, ...] | None = None
    projection_dim: int | None = None
    projection_seed: int = 0
    factored: bool | None = None
    layer_hooks: bool = True
    vmap: bool | None = None
    kronecker: bool | None = None
    kronecker_block: int = 4
    feature_dtype: torch.dtype | None = None
    tf32: bool = False

    def __post_init__(self) -> None:
        if self.feature_dtype not in (None, torch.bfloat16, torch.float32, torch.float64):
            raise ConfigError(
                "feature_dtype must be None, torch.bfloat16, torch.float32 or torch.float64, "
                f"got {self.feature_dtype!r}"
            )
        if self.params is not None:
            if isinstance(self.params, str):
                object.__setattr__(self, "params", (self.params,))
            else:
                object.__setattr__(self, "params", tuple(self.params))
            if not self.params:
                raise ConfigError("params is an empty list; pass None to use every parameter")
        if self.projection_dim is not None:
            ProjectionSpec(self.projection_dim, self.projection_seed)  # validates
        if isinstance(self.kronecker_block, bool) or not (
            isinstance(self.kronecker_block, int) and self.kronecker_block >= 1
        ):
            raise ConfigError(
                f"kronecker_block must be a positive integer, got {self.kronecker_block!r}"
            )

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "params": list(self.params) if self.params is not None else None,
            "projection_dim": self.projection_dim,
            "projection_seed": self.projection_seed if self.projection_dim else None,
        }
        if self.projection_dim is not None:
            out["kronecker"] = self.kronecker
            out["kronecker_block"] = self.kronecker_block
            out["checkpoint_seeds"] = "independent"  # see for_checkpoint
            # 2: Embedding, Conv1D, Linear on token inputs and tied weights are Kronecker
            # projected (version 1 projected them densely): older stores are not reused
            out["kronecker_units"] = 2
        if self.feature_dtype is not None:
            out["feature_dtype"] = str(self.feature_dtype).replace("torch.", "")
        return out

    def for_checkpoint(self, c: int) -> FeatureSpec:
        """The spec used at checkpoint ``c``: with a projection, each checkpoint gets its own
        independent matrix (seed :func:`derive_seed` ``(c, projection_seed)``; checkpoint 0
        keeps ``projection_seed``), so projection errors average out over checkpoints instead
        of repeating; without one, the spec itself."""
        if self.projection_dim is None or c == 0:
            return self
        return dataclasses.replace(self, projection_seed=derive_seed(c, self.projection_seed))
