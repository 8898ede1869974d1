"""Distilled Datamodel (Ye et al., CVPR 2024), as reconstructed in METHODS.md.

**Offline** (from saved checkpoints, or during training with :meth:`DistilledDatamodel.recorder`):
each group of training examples G_k gets a small synthetic set s_k (``synset_per_group``
inputs, ``m_k = min(m, |G_k|)`` per group, initialised from real members, labels fixed,
each standing for ``|G_k|/m_k`` real examples). At every trajectory point θ_t, processed
from the last to the first (the "reverse" walk from the final model), the synthetic inputs
are moved by Adam to minimise a layer-wise gradient distance between the synset's
contribution to the mean training loss and the group's (a point whose steps raise the
distance is undone: Adam's scale-free steps would otherwise move synsets that already
match away from the match)::

    D_k(θ_t) = Σ_layers ‖ĝ_k,l − g_k,l‖² / ‖g_k,l‖²
    g_k = (1/n) Σ_{i ∈ G_k} ∇ℓ(z_i; θ_t),   ĝ_k = (|G_k| / (n m_k)) Σ_{s ∈ s_k} ∇ℓ(s; θ_t)

(summed over groups, each trajectory point weighted by its checkpoint weight).

**Online**: the distilled objective ``L̂(θ) = Σ_k ĝ-weighted synset losses`` stands in for
the mean training loss. For group k, the final model is fast-learned for ``unlearn_steps``
gradient steps on ``L̂`` without s_k, and the reference model the same steps on all of
``L̂`` (the adjustment cancels drift of L̂ itself)::

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
        synset_per_group: synthetic examples per group, m (a group of fewer members gets
            one per member, ``min(m, |G_k|)``; the fit log says which). Default 16 (was 4),
            measured against group leave-out retraining (bench/defaults.py, 400 examples,
            class-wise k-means groups as they come; Pearson, m = 4 / 16 / 64, summed exact
            influence in brackets): breast-cancer logistic regression (6 groups of 14-124)
            0.558 / 0.603 / 0.872 [0.726]; SGD digits MLP (30 groups of 1-27) 0.913 /
            0.932 / 0.925 [0.939]; digits CNN 0.503 / 0.580 / 0.630 [0.643]. Why the DDM
            trails: (1) a synset of m_k ≪ |G_k| matches the group's gradients along the
            trajectory but not its curvature, which the fast unlearning relies on; (2) on
            networks even the real groups (m = |G_k|, no distillation) agree only 0.925
            (MLP) and 0.630 (CNN): the ceiling of emulating retraining by fast unlearning
            from θ_T (5, 20 or 100 steps: 0.922 / 0.925 / 0.883), whereas on the convex
            model they reach 0.889. m = 16 gains on all three at 2-3× m = 4's cost.
        steps_per_point: Adam steps on the synsets at each trajectory point.
        lr: Adam learning rate, in units of the inputs' standard deviation.
        unlearn_steps, unlearn_lr, unlearn_momentum: online fast-learning: heavy-ball
            gradient steps, their step size (``None``: 1 / the largest eigenvalue of the
            distilled Hessian at θ_T, by power iteration during ``fit``) and momentum.
        weight_decay: the L2 coefficient of training (``α‖θ‖²`` → ``weight_decay=2α``), kept
            in the fast-learned objective.
        seed: synset initialisation and k-means seed.
    """

    groups: torch.Tensor | None = None
    synset_per_group: int = 16
    clusters_per_class: int = 2
    steps_per_point: int = 30
    lr: float = 0.05
    unlearn_steps: int = 20
    unlearn_lr: float | None = None
    unlearn_momentum: float = 0.8
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("synset_per_group", "clusters_per_class", "unlearn_steps"):
            if not int(getattr(self, name)) >= 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
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
            distiller.run(
                [(c.parameters_for(task.model, distiller.device)[0], c.weight) for c in points],
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
