"""DataInf (Kwon et al. 2024): a closed-form, per-layer approximation of ``(G_l + λ_l I)⁻¹``.

``(G_l + λ_l I)⁻¹ v ≈ (1/(n λ_l)) Σ_i [v − (g_iᵀ v) / (λ_l + ‖g_i‖²) g_i]`` per layer l
(the parameters of one module), from the stored per-example training gradients. The
default damping is ONE λ for every layer, the factored Gauss–Newton rule's ``GN_FACTOR × λ₀``
(:func:`~datatrace.curvature.damping.curvature_damping`), not the paper's per-layer
``λ_l = 0.1 × mean(g_l²)``: with λ small next to ``‖g_i‖²`` a layer's scores scale as
``1/λ_l``, so per-layer dampings weight the layers by the inverse of their mean squared
gradient and the damping's overall size hardly matters. bench/defaults.py (full sizes, LDS):
per-layer ``c × mean(g_l²)`` for c = 0.001..10 gave 0.532 on the SGD digits MLP at every c,
one λ = λ₀ × 0.001..100 gave 0.571 at every λ; digits CNN 0.166-0.168 vs 0.171-0.173;
momentum + weight decay MLP 0.385-0.387 vs 0.382-0.385; diabetes MLP 0.234-0.236 vs
0.230-0.233; breast cancer (one layer) 0.676-0.686 both.

References:
    Kwon et al., "DataInf: Efficiently Estimating Data Influence in LoRA-tuned LLMs and
    Diffusion Models", ICLR 2024.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import AbstractFittedPreconditioner, AbstractPreconditioner, check_damping
from .context import FitContext
from .damping import resolve_damping


@dataclass(frozen=True)
class DataInfPreconditioner(AbstractPreconditioner):
    """Settings: ``damping``: one λ for every layer (``None``: the Gauss–Newton rule, see
    the module docstring)."""

    damping: float | str | None = None

    def __post_init__(self) -> None:
        check_damping(self.damping)

    def fit(self, ctx: FitContext) -> FittedDataInf:
        problem = ctx.problem
        # one slice per module: its parameters are adjacent in the flat order
        slices: list[tuple[int, int]] = []
        current = None
        for name, (start, stop) in problem.offsets.items():
            module = name.rpartition(".")[0]
            if module != current:
                slices.append((start, stop))
                current = module
            else:
                slices[-1] = (slices[-1][0], stop)
        lam = resolve_damping(
            self.damping, ctx, gauss_newton=True, what="DataInf's G", factored=True
        )
        return FittedDataInf(ctx, slices, [lam] * len(slices))


@dataclass
class FittedDataInf(AbstractFittedPreconditioner):
    ctx: FitContext
    slices: list[tuple[int, int]]
    lams: list[float]

    #: the mean of the per-layer dampings (each is in ``lams``)
    damping: float = field(init=False)

    def __post_init__(self) -> None:
        self.damping = sum(self.lams) / len(self.lams)

    def with_damping(self, damping: float) -> FittedDataInf:
        return FittedDataInf(self.ctx, self.slices, [damping] * len(self.slices))

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        n = self.ctx.problem.n
        acc = torch.zeros_like(vectors)
        for _, feats in self.ctx.train_blocks():
            g = feats["dense"]
            for (a, b), lam in zip(self.slices, self.lams, strict=True):
                gl = g[:, a:b]
                coef = (vectors[:, a:b] @ gl.T) / (lam + (gl**2).sum(1))[None, :]
                acc[:, a:b] += coef @ gl
        out = torch.empty_like(vectors)
        for (a, b), lam in zip(self.slices, self.lams, strict=True):
            out[:, a:b] = (vectors[:, a:b] - acc[:, a:b] / n) / lam
        return out
