"""DataInf (Kwon et al. 2024): a closed-form, per-layer approximation of ``(G_l + λ_l I)⁻¹``.

``(G_l + λ_l I)⁻¹ v ≈ (1/(n λ_l)) Σ_i [v − (g_iᵀ v) / (λ_l + ‖g_i‖²) g_i]`` per layer l
(the parameters of one module), from the stored per-example training gradients, with
``λ_l = 0.1 × mean(g_l²)`` (mean over examples and the layer's entries) by default.

References:
    Kwon et al., "DataInf: Efficiently Estimating Data Influence in LoRA-tuned LLMs and
    Diffusion Models", ICLR 2024.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import AUTO, AbstractFittedPreconditioner, AbstractPreconditioner, check_damping
from .context import FitContext


@dataclass(frozen=True)
class DataInfPreconditioner(AbstractPreconditioner):
    """Settings: ``damping=None`` for the per-layer default ``0.1 × mean(g_l²)``, or one λ
    for every layer."""

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
        sq = torch.zeros(len(slices), dtype=torch.float64)
        for _, feats in ctx.train_blocks():
            g = feats["dense"]
            for k, (a, b) in enumerate(slices):
                sq[k] += float((g[:, a:b] ** 2).sum())
        if self.damping is None or self.damping == AUTO:
            lams = [0.1 * float(sq[k]) / (problem.n * (b - a)) for k, (a, b) in enumerate(slices)]
        else:
            lams = [float(self.damping)] * len(slices)
        return FittedDataInf(ctx, slices, lams)


@dataclass
class FittedDataInf(AbstractFittedPreconditioner):
    ctx: FitContext
    slices: list[tuple[int, int]]
    lams: list[float]

    #: the mean of the per-layer dampings (each is in ``lams``)
    damping: float = field(init=False)

    def __post_init__(self) -> None:
        self.damping = sum(self.lams) / len(self.lams)

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
