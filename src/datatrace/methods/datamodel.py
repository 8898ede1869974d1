"""Distilled Datamodel (Ye et al., CVPR 2024), as reconstructed in METHODS.md.

**Offline** (from saved checkpoints, or during training with :meth:`DistilledDatamodel.recorder`):
each group of training examples G_k gets a small synthetic set s_k
(``m_k = min(|G_k|, max(m, ceil(synset_fraction · |G_k|)))`` inputs, m =
``synset_per_group``, initialised from real members, labels fixed, each standing for
``|G_k|/m_k`` real examples). At every trajectory point θ_t, processed from the last to
the first (the "reverse" walk from the final model), the synthetic inputs are moved by Adam
to minimise a layer-wise gradient distance between the synset's contribution to the mean
training loss and the group's (a point whose steps raise the distance is undone: Adam's
scale-free steps would otherwise move synsets that already match away from the match)::

    D_k(θ_t) = Σ_layers ‖ĝ_k,l − g_k,l‖² / ‖g_k,l‖²
    g_k = (1/n) Σ_{i ∈ G_k} ∇ℓ(z_i; θ_t),   ĝ_k = (|G_k| / (n m_k)) Σ_{s ∈ s_k} ∇ℓ(s; θ_t)

(summed over groups, each trajectory point weighted by its checkpoint weight; the final
point, where the online phase starts, by the largest).

**Online**: the distilled objective ``L̂(θ) = Σ_k ĝ-weighted synset losses`` stands in for
the mean training loss. For group k, the final model is fast-learned for ``unlearn_steps``
heavy-ball steps on ``L̂`` without s_k, and the reference model the same steps on all of
``L̂`` (the adjustment cancels drift of L̂ itself). By default (``stationary=True``) every
model's gradient has ``∇L̂(θ_T)`` subtracted, so θ_T is a stationary point, the reference
stays at θ_T and a removed model moves by its removal only (a guard stops a model that
escapes along negative curvature)::

    A[j, k] = f(z_j; θ₋ₖ) − f(z_j; θ₀)

the sign and units of every datatrace score (positive: removing group k raises the query's
loss). All K + 1 fast-learned models train together (stacked parameters, ``vmap``). A
datamodel mode drops random subsets of groups and fits a linear model from masks to
outputs; :meth:`FittedDistilledDatamodel.unlearn` returns the fast-unlearned module.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.checkpoint import Checkpoint
from ..core.data import ExampleSource
from ..core.errors import (
    CheckpointError,
    ConfigError,
)
from ..core.runtime import eval_mode
from ..core.task import AbstractTask
from .ddm_fitted import FittedDistilledDatamodel
from .distill import _Distiller, kmeans_groups

__all__ = ["DistilledDatamodel", "FittedDistilledDatamodel", "Recorder", "kmeans_groups"]


@dataclass
class DistilledDatamodel:
    """Distilled Datamodel settings.

    Args:
        groups: group id of every training example (LongTensor (n,), ids 0..K-1, every
            group non-empty); ``None``: class-wise k-means on the inputs,
            ``clusters_per_class`` per class.
        synset_per_group, synset_fraction: synthetic examples per group,
            ``m_k = min(|G_k|, max(m, ceil(fraction · |G_k|)))``: every member of a group
            smaller than m, at least m, and a share of a large group (the fit log says
            which groups got what). Measured against group leave-out retraining
            (bench/defaults.py, 400 examples, class-wise k-means groups as they come): on
            breast cancer (6 groups of 14-124) a fixed m = 16 gives Pearson 0.68, a
            fraction 0.25 / 0.33 / 0.4 / 0.5 gives 0.70 / 0.79-0.83 / 0.84 / 0.85 (summed
            exact influence: 0.726): 16 synthetic inputs cannot match both the gradient and
            the curvature of a group of 124 along the unlearning path. The digits tasks'
            groups (1-27 members) are unaffected by the fraction. (The paper keeps a fixed
            number per cluster: a deviation, measured.)
        steps_per_point: Adam steps on the synsets at each trajectory point. The final
            checkpoint, where every online fast learning starts, is matched with the
            largest checkpoint weight, not its own (a learning rate ≈ 0 at the end of a
            cosine schedule left it undistilled: breast cancer 0.60 → 0.68 at m = 16).
        lr: Adam learning rate, in units of the inputs' standard deviation.
        unlearn_steps, unlearn_lr, unlearn_momentum: online fast learning: heavy-ball
            gradient steps, their step size (``None``: 2 / the largest eigenvalue of the
            distilled Hessian at θ_T, by power iteration; heavy-ball is stable up to
            2(1 + μ) / λ_max) and momentum. 20 steps of 2 / λ_max at μ = 0.8 learn for
            τ ≈ 160 / λ_max: the digits MLP peaks near 80 / λ_max (0.972) and holds ≥ 0.95
            to 200; the CNN rises to 360 / λ_max and beyond (0.655 at 160, 0.698 at 360);
            breast cancer is flat from 50 to 360 (0.84-0.86).
        stationary: fast-learn each model on ``L̂₋ₖ(θ) − ⟨∇L̂(θ_T), θ⟩`` (the anchor): θ_T
            is made a stationary point of the distilled objective, as influence functions
            assume, so the reference model (every group) stays at θ_T and each removed
            model moves only by what removing its group changes; on a quadratic it converges
            to ``θ_T + (Ĥ₋ₖ + λ I)⁻¹ ĝ_k``, the leave-group-out Newton step. Without it (the
            paper's plain fine-tuning from θ_T) the models keep training: the digits MLP,
            far from a minimum (loss 0.54), drifts 5-7× further than the removal effect
            and its agreement falls with the steps (0.94 at 20 → 0.05 at 200). A guard
            stops a model whose secant curvature along its path from θ_T, c, is negative
            once ``τ |c| > 1`` (its escape has grown e-fold; never on a convex objective);
            the log counts them.
        weight_decay: the L2 coefficient of training (``α‖θ‖²`` → ``weight_decay=2α``), kept
            in the fast-learned objective.
        seed: synset initialisation and k-means seed.
    """

    groups: torch.Tensor | None = None
    synset_per_group: int = 16
    synset_fraction: float = 0.5
    clusters_per_class: int = 2
    steps_per_point: int = 30
    lr: float = 0.05
    unlearn_steps: int = 20
    unlearn_lr: float | None = None
    unlearn_momentum: float = 0.8
    weight_decay: float = 0.0
    stationary: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("synset_per_group", "clusters_per_class", "unlearn_steps"):
            if not int(getattr(self, name)) >= 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not 0 <= self.synset_fraction <= 1:
            raise ConfigError(f"synset_fraction must be in [0, 1], got {self.synset_fraction!r}")
        if self.steps_per_point < 0 or not self.lr > 0 or self.weight_decay < 0:
            raise ConfigError("steps_per_point >= 0, lr > 0 and weight_decay >= 0 are required")
        if self.unlearn_lr is not None and not self.unlearn_lr > 0:
            raise ConfigError(f"unlearn_lr must be > 0, got {self.unlearn_lr!r}")
        if not 0 <= self.unlearn_momentum < 1:
            raise ConfigError(f"unlearn_momentum must be in [0, 1), got {self.unlearn_momentum!r}")

    # -- offline -------------------------------------------------------------------------

    def fit(
        self,
        task: AbstractTask,
        checkpoints: Sequence[Checkpoint],
        train: Any,
        *,
        store: str | os.PathLike[str] | None = None,
        progress: bool | None = None,
    ) -> FittedDistilledDatamodel:
        """Distil from saved checkpoints (weights = their learning rates), last first. With
        ``store=DIR`` the synsets are saved after every trajectory point (one checksummed
        safetensors file) and an interrupted fit resumes there, with the same result; a
        second fit of the same store waits for the first (it holds the store's lock)."""
        if not checkpoints:
            raise CheckpointError("no checkpoints given")
        src = ExampleSource(train, "training data")
        with eval_mode(task.model):  # dropout off, batch-norm statistics frozen
            distiller = _Distiller(self, task, src, checkpoints[-1])
            points = list(reversed(list(checkpoints)))
            weights = [c.weight for c in points]
            # the online phase fast-learns from θ_T: its point gets the largest weight, not
            # its learning rate (≈ 0 at the end of a cosine schedule, issue 12)
            weights[0] = max(weights)
            distiller.held = set.intersection(*(set(c.state) for c in points))
            states = [c.parameters_for(task.model, distiller.device) for c in points]
            distiller.run(
                # each point's own buffers (batch-norm statistics), the model's where it
                # holds none
                [({**p, **b}, w) for (p, b), w in zip(states, weights, strict=True)],
                [c.fingerprint() for c in points],
                store,
                progress,
            )
            return distiller.fitted()

    def recorder(self, task: AbstractTask, train: Any, every: int = 1) -> Recorder:
        """For use inside a training loop: ``rec.observe(model, batch_indices, lr)`` after
        every step (it snapshots θ every ``every`` steps, weighted by the learning rate
        summed since the last snapshot), then ``rec.finish(model)`` distils."""
        return Recorder(self, task, ExampleSource(train, "training data"), every)


@dataclass
class Recorder:
    ddm: DistilledDatamodel
    task: AbstractTask
    train: ExampleSource
    every: int
    points: list[Checkpoint] = field(default_factory=list)
    _steps: int = 0
    _lr_sum: float = 0.0

    def observe(self, model: nn.Module, batch_indices: Any = None, lr: float = 1.0) -> None:
        """Record one training step (``batch_indices`` is accepted for API symmetry; the
        group targets use whole groups, so it is not needed)."""
        self._steps += 1
        self._lr_sum += float(lr)
        if self._steps % self.every == 0:
            self.points.append(Checkpoint.from_module(model, weight=self._lr_sum))
            self._lr_sum = 0.0

    def finish(
        self, model: nn.Module, store: str | os.PathLike[str] | None = None
    ) -> FittedDistilledDatamodel:
        points = list(self.points)
        if not points or self._lr_sum > 0:
            points.append(Checkpoint.from_module(model, weight=max(self._lr_sum, 1e-12)))
        return self.ddm.fit(self.task, points, self.train, store=store)
