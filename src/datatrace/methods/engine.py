"""The one engine: ``S[j, i] = Σ_c w_c v_c(i) ⟨φ_c(query_j), P_c φ_c(train_i)⟩``.

:class:`GradientAttributor` is the engine behind every gradient method (the recipes in
:mod:`datatrace.methods.recipes` and :mod:`~datatrace.methods.trak` are a few lines each).
Its slots are typed:

* the featurizer φ: a :class:`~datatrace.features.FeatureSpec` (which parameters,
  factored or projected), bound to the task at each checkpoint
  (:class:`~datatrace.features.GradientFeatures`);
* the preconditioner P: ``None`` (identity) or an
  :class:`~datatrace.curvature.AbstractPreconditioner` (then scores carry influence's
  ``1/n``);
* the checkpoint weights w_c: :class:`CheckpointWeights`;
* the example weights v_c(i): ``None`` or an :class:`AbstractExampleWeights` (TRAK's
  ``1 − p_i``);
* the output: ``None`` (the task's own loss and measurement) or an
  :class:`AbstractOutput` that says which function of the model is differentiated (TRAK's
  margin).

Fitting featurizes the training set once per checkpoint (memory, a store, or recomputed:
:mod:`datatrace.features.placement`); scoring streams training blocks.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core import distributed
from ..core.checkpoint import Checkpoint
from ..core.data import ExampleSource
from ..core.errors import CheckpointError, ConfigError
from ..core.fingerprint import (
    check_extra,
    environment_fingerprint,
    model_fingerprint,
    task_fingerprint,
)
from ..core.runtime import model_device
from ..core.task import AbstractTask
from ..curvature.base import AbstractFittedPreconditioner, AbstractPreconditioner
from ..features.featurizer import AbstractFeaturizer, GradientFeatures
from ..features.loop import State, featurize
from ..features.placement import MEMORY_BUDGET, place_training_features, plan_sizes
from ..features.spec import FeatureSpec
from ..features.store import Verify
from ..grads.per_example import select_parameters
from .autodamp import calibrate_damping
from .fitted import FittedGradientAttributor
from .kronecker import FittedKroneckerInfluence, fused_batch_size
from .slots import AbstractExampleWeights, AbstractOutput, CheckpointWeights

log = logging.getLogger("datatrace")


@dataclass(frozen=True)
class GradientAttributor:
    """Scores from (optionally projected, normalised or preconditioned) gradient inner products.

    Args:
        features: what a gradient feature is (parameters, projection).
        normalize: divide by the feature norms (Grad-Cos).
        checkpoints: which checkpoints count and their weights (:class:`CheckpointWeights`).
        name: the method's name in logs and reports.
        preconditioner: ``None`` (identity), or a curvature preconditioner
            (``dt.ExactHessian``, ``dt.ConjugateGradient``, ``dt.EKFAC``...): scores become
            influence ``(1/n) Σ_c w_c q_cᵀ (H_c + λI)⁻¹ g_c`` (needs exact dense features
            unless it ``accepts_projection``).
        example_weights: ``None``, or per-example column weights (TRAK's ``1 − p_i``).
        output: ``None``, or the function differentiated instead of the task's loss and
            measurement (TRAK's margin).
    """

    features: FeatureSpec = field(default_factory=FeatureSpec)
    normalize: bool = False
    checkpoints: CheckpointWeights = CheckpointWeights.LEARNING_RATE
    name: str = "gradient"
    preconditioner: AbstractPreconditioner | None = None
    example_weights: AbstractExampleWeights | None = None
    output: AbstractOutput | None = None

    def __post_init__(self) -> None:
        _check_slot("features", self.features, FeatureSpec, optional=False)
        _check_slot("checkpoints", self.checkpoints, CheckpointWeights, optional=False)
        _check_slot("preconditioner", self.preconditioner, AbstractPreconditioner)
        _check_slot("example_weights", self.example_weights, AbstractExampleWeights)
        _check_slot("output", self.output, AbstractOutput)
        pc = self.preconditioner
        if pc is None:
            return
        if self.features.factored is not False or (
            self.features.projection_dim is not None and not pc.accepts_projection
        ):
            raise ConfigError(
                f"{type(pc).__name__} needs exact dense gradient features: "
                "FeatureSpec(projection_dim=None, factored=False)"
            )

    def fit(
        self,
        task: AbstractTask,
        checkpoints: Sequence[Checkpoint],
        train: Any,
        *,
        store: str | Path | None = None,
        overwrite: bool = False,
        batch_size: int | None = None,
        block_size: int | None = None,
        progress: bool | None = None,
        max_store_bytes: int | None = 8 << 30,
        max_memory_bytes: int = MEMORY_BUDGET,
        fingerprint_extra: Any = None,
        verify: Verify | str = Verify.SAMPLE,
    ) -> FittedGradientAttributor:
        """Featurize the training data at every checkpoint used.

        Args:
            task: the model and its loss/measurement.
            checkpoints: where gradients are taken (and with which weight).
            train: training data (tuple of tensors, dict, Dataset or DataLoader).
            store: directory of the feature store (reused when its settings match, resumed
                after a crash); ``None``: temporary features, in memory up to
                ``max_memory_bytes``, else in a temporary directory.
            overwrite: replace a store written with other settings.
            batch_size: examples per featurization batch (and resumable chunk); ``None``:
                sized from the features (:func:`~datatrace.features.placement.plan_sizes`:
                at most 256, the work within a quarter of ``max_memory_bytes``, or of
                256 MiB if that is more).
            block_size: training examples per scoring block; ``None``: at most 8,192, a
                block's features within a quarter of ``max_memory_bytes``.
            progress: progress bars (default: when stderr is a terminal).
            max_store_bytes: cache training features on disk only up to this size
                (``None``: no limit); above it they are recomputed block by block at
                scoring time (same scores, more compute, no disk).
            max_memory_bytes: the memory budget (default 4 GiB): with ``store=None``, keep
                features in memory (on the model's device: GPU memory for a CUDA model) up
                to this size, else stream them (WARNING): first-order methods (no
                preconditioner) recompute them block by block at each scoring call,
                influence methods write them to a temporary disk store (their fit reads
                them several times); it also sizes batches and blocks.
            verify: when reusing a store, re-hash a sample of its chunks
                (``Verify.SAMPLE`` or ``"sample"``, at most 32 MiB per checkpoint: all of a
                small store) or every chunk (``Verify.FULL``, ``"full"``); damage raises
                :class:`~datatrace.StoreCorruptError`.
            fingerprint_extra: anything else the scores depend on that datatrace cannot see
                (JSON-able; recorded in the store's fingerprint, e.g. a data version).

        The store is reused only when its fingerprint matches: the method's settings, the
        model (class, module tree, forward code), the task (class, settings, loss and
        measurement code), the parameters selected, every checkpoint's bytes (and the
        model's buffers it lacks), the data's bytes, the dtype, the device kind and torch's
        version (:mod:`datatrace.core.fingerprint`).
        """
        for what, size in (("batch_size", batch_size), ("block_size", block_size)):
            if size is not None:
                _check_positive_int(what, size)
        ckpts = _check_checkpoints(checkpoints)
        if self.checkpoints is CheckpointWeights.LAST and len(ckpts) > 1:
            log.info("%s uses only the last of %d checkpoints", self.name, len(ckpts))
        ckpts, weights = self.checkpoints.select(ckpts)
        source = ExampleSource(train, "training data")
        whole = source.whole()
        if whole is not None:
            task.check_data(whole, source.name)
        scored = self.output.wrap(task) if self.output is not None else task
        spec = self._features_for(scored, source)
        per_ckpt, states = self._bind(scored, ckpts, source, spec)
        device = model_device(task.model)
        dtype = self.features.feature_dtype or next(iter(states[0][0].values())).dtype
        given_batch = batch_size
        batch_size, block_size = plan_sizes(
            per_ckpt[0], dtype, max_memory_bytes, batch_size, block_size, self.name
        )
        if self._fused(store) and given_batch is None:
            owners = dict.fromkeys(n.rpartition(".")[0] for n in per_ckpt[0].names)
            modules = {m: scored.model.get_submodule(m) for m in owners}
            batch_size = fused_batch_size(scored, modules, source, max_memory_bytes)

        def fingerprint() -> dict[str, Any]:  # only for a disk store: hashing costs a pass
            return {
                "method": {"normalize": self.normalize},
                "model": model_fingerprint(task.model),
                "task": task_fingerprint(scored),
                "features": spec.describe(),
                "parameters": list(per_ckpt[0].names),  # requires_grad decides them too
                "checkpoints": [c.fingerprint(scored.model) for c in ckpts],
                "data": source.fingerprint(),
                "environment": environment_fingerprint(dtype, device),
                "extra": extra,
            }

        extra = check_extra(fingerprint_extra)
        if self._fused(store):
            return self._fit_fused(
                scored, task, ckpts, weights, source, per_ckpt, states, batch_size,
                block_size, progress, train, max_memory_bytes,
            )  # fmt: skip
        placed = place_training_features(
            per_ckpt, states, source, fingerprint, dtype, name=self.name, store=store,
            overwrite=overwrite, batch_size=batch_size, progress=progress,
            max_store_bytes=max_store_bytes, max_memory_bytes=max_memory_bytes, verify=verify,
            single_pass=self.preconditioner is None,
        )  # fmt: skip
        try:  # a failed preconditioner fit leaves no temporary store behind
            column_weights = (
                [self.example_weights.weights(task, st, source, batch_size) for st in states]
                if self.example_weights is not None
                else None
            )
            fitted = FittedGradientAttributor(
                self, scored, per_ckpt, states, weights, source, placed.store, batch_size,
                block_size, progress, column_weights,
            )  # fmt: skip
        except BaseException:
            if placed.temporary is not None:
                shutil.rmtree(placed.temporary, ignore_errors=True)
            raise
        if placed.temporary is not None:
            weakref.finalize(fitted, shutil.rmtree, placed.temporary, True)
        if self.preconditioner is not None and self.preconditioner.calibrates_damping():
            self._calibrate(fitted, task, ckpts[-1], train)
        return fitted

    def _fused(self, store: str | Path | None) -> bool:
        """Influence with K-FAC/EK-FAC and no store asked for: scored in one fused pass
        (:mod:`.kronecker`), training features never stored."""
        pc = self.preconditioner
        return (
            store is None and pc is not None and pc.fused_scoring and not self.normalize
            and self.example_weights is None and self.output is None
            and self.features.projection_dim is None and self.features.feature_dtype is None
        )  # fmt: skip

    def _fit_fused(
        self,
        scored: AbstractTask,
        task: AbstractTask,
        ckpts: list[Checkpoint],
        weights: list[float],
        source: ExampleSource,
        per_ckpt: list[AbstractFeaturizer],
        states: list[State],
        batch_size: int,
        block_size: int,
        progress: bool | None,
        train: Any,
        budget: int,
    ) -> FittedGradientAttributor:
        log.info("%s: fused K-FAC scoring in batches of %d (training features not stored)",
                 self.name, batch_size)  # fmt: skip
        fitted = FittedKroneckerInfluence(
            self, scored, per_ckpt, states, weights, source, None, batch_size, block_size,
            progress,
        )  # fmt: skip
        fitted.memory_budget = budget
        if self.preconditioner is not None and self.preconditioner.calibrates_damping():
            self._calibrate(fitted, task, ckpts[-1], train)
        return fitted

    def _features_for(self, scored: AbstractTask, source: ExampleSource) -> FeatureSpec:
        """The feature spec restricted to the parameters the preconditioner works on (K-FAC:
        its supported layers), decided before any gradient pass."""
        if self.preconditioner is None:
            return self.features
        names = select_parameters(scored.model, self.features.params)
        kept = self.preconditioner.parameters(scored, names, self.features.params, source)
        if kept == names:
            return self.features
        return dataclasses.replace(self.features, params=tuple(kept))

    def _calibrate(
        self, fitted: FittedGradientAttributor, task: AbstractTask, last: Checkpoint, train: Any
    ) -> None:
        """``damping="auto"``: refit the preconditioner at the damping that agrees best with
        further training on a sample (:mod:`.autodamp`; fitted above at the default rule's
        damping, the grid's centre)."""
        pc = self.preconditioner
        assert pc is not None
        if len(fitted.preconditioners) != 1:
            raise ConfigError(
                "damping='auto' calibrates one checkpoint's damping; this method uses "
                f"{len(fitted.preconditioners)} checkpoints: give a number"
            )

        def refit(damping: float) -> None:
            """The same curvature at another damping (the matrix, eigenpairs, Kronecker
            factors or CG's last solutions reused); a full refit where none is kept."""
            again = [f.with_damping(damping) for f in fitted.preconditioners]
            if all(f is not None for f in again):
                fitted.preconditioners[:] = again  # type: ignore[assignment]
                return
            fitted.preconditioners.clear()
            fitted.lambda0.clear()
            fitted._fit_preconditioners(dataclasses.replace(pc, damping=damping))  # type: ignore[type-var]

        def restore(kept: list[AbstractFittedPreconditioner]) -> None:
            fitted.preconditioners[:] = kept

        result = calibrate_damping(
            fitted, task, last, train, refit, fitted.damping[0],
            keep=lambda: list(fitted.preconditioners), restore=restore,
            indefinite_below=lambda: max(f.indefinite_below() for f in fitted.preconditioners),
        )  # fmt: skip
        fitted.auto_damping = result
        for f in fitted.preconditioners:  # what was kept for the grid is not needed now
            f.release()

    def _bind(
        self,
        scored: AbstractTask,
        ckpts: list[Checkpoint],
        source: ExampleSource,
        spec: FeatureSpec,
    ) -> tuple[list[AbstractFeaturizer], list[State]]:
        """One featurizer per checkpoint (projected features get an independent matrix each)
        and the checkpoints' states on the model's device, probed on one example (which
        fixes the factored layout before a store is sized): the first, or, where the
        layout holds each example's tokens and the examples may differ in length (a
        Dataset or DataLoader whose collate pads each batch to its own longest), the
        longest, so that every batch fits."""
        device = model_device(scored.model)
        distributed.ensure_initialized(device)
        states = [c.parameters_for(scored.model, device) for c in ckpts]

        def probed(at: int) -> list[AbstractFeaturizer]:
            per_ckpt: list[AbstractFeaturizer] = [
                GradientFeatures(spec.for_checkpoint(c), scored) for c in range(len(ckpts))
            ]
            for f, st in zip(per_ckpt, states, strict=True):
                featurize(f, st, source, False, 1, at, at + 1, progress=False)
            return per_ckpt

        per_ckpt = probed(0)
        if per_ckpt[0].sized_by_example() and source.whole() is None:
            longest = source.longest()
            if longest != 0:
                log.info("features sized on the longest training example (%d)", longest)
                per_ckpt = probed(longest)
        return per_ckpt, states


def _check_slot(name: str, value: Any, kind: type, optional: bool = True) -> None:
    if (value is None and optional) or isinstance(value, kind):
        return
    raise ConfigError(
        f"{name} must be a {kind.__name__}{' or None' if optional else ''}, "
        f"got {type(value).__name__}"
    )


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _check_checkpoints(checkpoints: Sequence[Checkpoint]) -> list[Checkpoint]:
    if isinstance(checkpoints, Checkpoint):
        checkpoints = [checkpoints]
    ckpts = list(checkpoints)
    if not ckpts:
        raise CheckpointError("no checkpoints given; pass [dt.Checkpoint.from_module(model)]")
    for c in ckpts:
        if not isinstance(c, Checkpoint):
            raise CheckpointError(
                f"expected dt.Checkpoint objects, got {type(c).__name__}; wrap state dicts "
                "with dt.Checkpoint.from_state_dict(sd, weight=lr)"
            )
    return ckpts
