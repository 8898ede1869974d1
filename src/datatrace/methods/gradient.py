"""The gradient attributor: ``S[j, i] = Σ_c w_c ⟨φ_c(query_j), P_c φ_c(train_i)⟩``.

:class:`GradientAttributor` is the one engine behind every gradient method (see
:mod:`datatrace.methods.recipes`, :mod:`~datatrace.methods.influence` and
:mod:`~datatrace.methods.trak`): a feature spec (which parameters, projection), whether
features are normalised (cosine), whether every checkpoint counts (weighted by its
weight) or only the final one, and an optional curvature preconditioner ``P_c`` (then
scores carry influence's ``1/n``). Fitting featurizes the training set once per
checkpoint into a :class:`~datatrace.store.FeatureStore` (or memory); scoring streams
training blocks from it.
"""

from __future__ import annotations

import functools
import logging
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import distributed
from ..checkpoint import Checkpoint
from ..curvature.problem import CurvatureProblem
from ..data import ExampleSource
from ..errors import CheckpointError, ConfigError
from ..features import Features, FeatureSpec, GradientFeatures
from ..featurize import State, featurize, featurize_into_store, model_device
from ..scoring import merge_top_k, running_top_k
from ..store import FeatureStore, MemoryFeatureStore
from ..task import AbstractTask

log = logging.getLogger("datatrace")


@dataclass(frozen=True)
class GradientAttributor:
    """Scores from (optionally projected, optionally normalised) gradient inner products.

    Args:
        features: what a gradient feature is (parameters, projection).
        normalize: divide by the feature norms (Grad-Cos).
        all_checkpoints: sum over every checkpoint weighted by its weight (TracIn); if
            False, use only the last checkpoint with weight 1 (Grad-Dot, Grad-Cos).
        name: the method's name in logs and reports.
        preconditioner: ``None`` (identity), or a curvature preconditioner
            (``dt.ExactHessian``, ``dt.ConjugateGradient``, ``dt.EKFAC``...): scores become
            influence ``(1/n) Σ_c w_c q_cᵀ (H_c + λI)⁻¹ g_c`` (needs exact dense features).
    """

    features: FeatureSpec = field(default_factory=FeatureSpec)
    normalize: bool = False
    all_checkpoints: bool = True
    name: str = "gradient"
    preconditioner: Any = None

    def __post_init__(self) -> None:
        if self.preconditioner is None:
            return
        projected_ok = getattr(self.preconditioner, "accepts_projection", False)
        if self.features.factored is not False or (
            self.features.projection_dim is not None and not projected_ok
        ):
            raise ConfigError(
                f"{type(self.preconditioner).__name__} needs exact dense gradient features: "
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
        batch_size: int = 256,
        block_size: int = 8192,
        progress: bool | None = None,
        max_store_bytes: int | None = 8 << 30,
        max_memory_bytes: int = 4 << 30,
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
            batch_size: examples per featurization batch (and resumable chunk).
            block_size: training examples per scoring block.
            progress: progress bars (default: when stderr is a terminal).
            max_store_bytes: cache training features on disk only up to this size
                (``None``: no limit); above it they are recomputed block by block at
                scoring time (same scores, more compute, no disk).
            max_memory_bytes: with ``store=None``, keep features in memory (on the model's
                device: GPU memory for a CUDA model) up to this size.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ConfigError(f"block_size must be a positive integer, got {block_size!r}")
        ckpts = _check_checkpoints(checkpoints)
        if not self.all_checkpoints:
            if len(ckpts) > 1:
                log.info("%s uses only the last of %d checkpoints", self.name, len(ckpts))
            ckpts = [ckpts[-1]]
            weights = [1.0]
        else:
            weights = [c.weight for c in ckpts]
        source = ExampleSource(train, "training data")
        # one featurizer per checkpoint: projected features get an independent matrix each
        per_ckpt = [
            GradientFeatures(self.features.for_checkpoint(c), task) for c in range(len(ckpts))
        ]
        feats = per_ckpt[0]
        device = model_device(task.model)
        distributed.ensure_initialized(device)
        states = [c.parameters_for(task.model, device) for c in ckpts]
        dtype = self.features.feature_dtype or next(iter(states[0][0].values())).dtype
        # Probe the model on one example: fixes the factored layout before the store is sized.
        for f, st in zip(per_ckpt, states, strict=True):
            featurize(f, st, source, False, batch_size, 0, 1, progress=False)
        nbytes = len(source) * sum(feats.layout().values()) * dtype.itemsize * len(states)
        fs: FeatureStore | MemoryFeatureStore | None = None
        tmp = None
        if store is None and nbytes <= max_memory_bytes:
            fs = MemoryFeatureStore(
                feats.layout(), len(source), len(states), dtype, batch_size, device
            )
            featurize_into_store(per_ckpt, states, source, fs, progress, shard=True)
            log.info("%s: training features in memory (%.1f MB)", self.name, nbytes / 1e6)
        elif max_store_bytes is not None and nbytes > max_store_bytes:
            log.info(
                "%s: training features would take %.1f MB > max_store_bytes; not cached, "
                "recomputed block by block when scoring (set projection_dim or params, or "
                "raise max_store_bytes, to cache them)",
                self.name,
                nbytes / 1e6,
            )
        else:
            if store is None:
                store = tmp = tempfile.mkdtemp(prefix="datatrace-features-")
            try:
                fs = self._disk_store(
                    task,
                    ckpts,
                    states,
                    per_ckpt,
                    source,
                    store,
                    dtype,
                    batch_size,
                    overwrite,
                    progress,
                    shared=tmp is None,  # a temporary directory is per rank: not shared
                )
            except BaseException:
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise
        fitted = FittedGradientAttributor(
            self, task, per_ckpt, states, weights, source, fs, batch_size, block_size, progress
        )
        if self.preconditioner is not None:
            fitted.fit_preconditioners(self.preconditioner)
        if tmp is not None:
            weakref.finalize(fitted, shutil.rmtree, tmp, True)
        return fitted

    def _disk_store(
        self,
        task: AbstractTask,
        ckpts: list[Checkpoint],
        states: list[State],
        per_ckpt: list[GradientFeatures],
        source: ExampleSource,
        path: str | Path,
        dtype: torch.dtype,
        batch_size: int,
        overwrite: bool,
        progress: bool | None,
        shared: bool = True,
    ) -> FeatureStore:
        """Open (or create) the fingerprinted store at ``path`` and fill what is missing.
        Under torchrun with a ``shared`` directory, rank 0 creates (or checks, or
        overwrites) the store, then every rank fills its share of the missing chunks."""
        fingerprint = {
            "method": {"normalize": self.normalize},
            "task": type(task).__name__,
            "features": self.features.describe(),
            "checkpoints": [c.fingerprint() for c in ckpts],
            "data": source.fingerprint(),
        }
        rank, size = distributed.world() if shared else (0, 1)

        def open_store(overwrite: bool) -> FeatureStore:
            return FeatureStore(
                path,
                fingerprint,
                per_ckpt[0].layout(),
                len(source),
                len(ckpts),
                dtype,
                chunk_size=batch_size,
                overwrite=overwrite,
            )

        if size > 1:
            fs = open_store(overwrite) if rank == 0 else None
            distributed.barrier()
            fs = fs or open_store(False)
        else:
            fs = open_store(overwrite)
        computed = featurize_into_store(per_ckpt, states, source, fs, progress, shard=shared)
        log.info(
            "%s: %s training features of %d examples x %d checkpoint(s) at %s (%.1f MB)",
            self.name,
            "computed" if computed else "reused",
            len(source),
            len(ckpts),
            fs.path,
            fs.nbytes() / 1e6,
        )
        return fs


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


class FittedGradientAttributor:
    """A fitted gradient attributor: scores queries against the stored training features."""

    def __init__(
        self,
        method: GradientAttributor,
        task: AbstractTask,
        features: list[GradientFeatures],
        states: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]],
        weights: list[float],
        train: ExampleSource,
        store: FeatureStore | MemoryFeatureStore | None,
        batch_size: int,
        block_size: int,
        progress: bool | None,
    ) -> None:
        self.method = method
        self.task = task
        #: the featurizer of each checkpoint (independent projections), and the first one's
        #: shared helpers (inner products, norms)
        self.checkpoint_features = features
        self.features = features[0]
        self.states = states
        self.weights = weights
        self.train = train
        self.store = store
        self.batch_size = batch_size
        self.block_size = block_size
        self.progress = progress
        self.preconditioners: list[Any] = []
        self.scale = 1.0
        #: optional per-checkpoint weights of each training example's column, (n_train,)
        self.column_weights: list[torch.Tensor] | None = None
        #: scores are computed in the model's dtype (features may be kept in bfloat16)
        self.compute_dtype = next(iter(states[0][0].values())).dtype

    def fit_preconditioners(self, spec: Any) -> None:
        """Fit ``spec`` at every checkpoint; scores get the ``1/n`` of influence functions."""
        from ..curvature import FitContext

        for c, (params, buffers) in enumerate(self.states):
            problem = CurvatureProblem(
                self.task, self.features.names, params, buffers, self.train, self.batch_size
            )
            lambda0 = float(
                sum(float(self.features.sqnorm(g).sum()) for _, g in self._blocks(c))
                / (problem.n * problem.p)
            )
            path = self.store.path if self.store is not None else None
            cache = path / f"curvature-c{c}" if path is not None else None
            ctx = FitContext(problem, lambda0, cache, functools.partial(self._blocks, c))
            fitted = spec.fit(ctx)
            log.info(
                "%s: checkpoint %d: lambda0 %.3g, damping %.3g",
                self.method.name,
                c,
                lambda0,
                fitted.damping,
            )
            self.preconditioners.append(fitted)
        self.scale = 1.0 / self.n_train

    @property
    def damping(self) -> list[float]:
        """The damping used at each checkpoint (influence methods)."""
        return [pc.damping for pc in self.preconditioners]

    def _blocks(self, c: int) -> Iterator[tuple[int, Features]]:
        for start in range(0, self.n_train, self.block_size):
            stop = min(start + self.block_size, self.n_train)
            yield start, self._train_block(c, start, stop)

    def _precondition(self, c: int, feats: Features) -> Features:
        if not self.preconditioners:
            return feats
        return {k: self.preconditioners[c].solve(v) for k, v in feats.items()}

    @property
    def n_train(self) -> int:
        return len(self.train)

    def query_features(self, queries: Any) -> list[Features]:
        """Measurement-gradient features of the queries at each checkpoint used."""
        source = ExampleSource(queries, "queries")
        out = []
        for f, st in zip(self.checkpoint_features, self.states, strict=True):
            feats = featurize(
                f,
                st,
                source,
                True,
                self.batch_size,
                progress=self.progress,
                desc="featurizing queries",
            )
            out.append({k: v.to(self.compute_dtype) for k, v in feats.items()})
        return out

    def _train_block(self, c: int, start: int, stop: int) -> Features:
        if self.store is None:  # not cached: recompute (same features, bit for bit per batch)
            feats = featurize(
                self.checkpoint_features[c],
                self.states[c],
                self.train,
                False,
                self.batch_size,
                start,
                stop,
                progress=False,
            )
        else:
            feats = self.store.read(c, start, stop)
        device = model_device(self.task.model)
        return {k: v.to(device, self.compute_dtype) for k, v in feats.items()}

    def score_blocks(
        self, queries: Any, starts: Sequence[int] | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(start, S[:, start:stop])`` over training blocks (all, or those starting
        at ``starts``, multiples of ``block_size``); never the whole matrix."""
        qfeats = [self._precondition(c, q) for c, q in enumerate(self.query_features(queries))]
        qnorms = [self.features.sqnorm(q).sqrt() for q in qfeats]
        for start in range(0, self.n_train, self.block_size) if starts is None else starts:
            stop = min(start + self.block_size, self.n_train)
            total = None
            for c, (q, w) in enumerate(zip(qfeats, self.weights, strict=True)):
                g = self._train_block(c, start, stop)
                with self.features.scoring():
                    s = self.features.pairwise(q, g)
                if self.method.normalize:
                    gnorm = self.features.sqnorm(g).sqrt()
                    s = s / _safe(qnorms[c])[:, None] / _safe(gnorm)[None, :]
                s = s * (w * self.scale)
                if self.column_weights is not None:
                    s = s * self.column_weights[c][start:stop].to(s)
                total = s if total is None else total + s
            assert total is not None
            yield start, total

    def attribute(self, queries: Any) -> torch.Tensor:
        """Scores of every training example for every query, shape (n_query, n_train).

        ``S[j, i] > 0``: training example i is a proponent of query j (training on it
        lowered the query's loss).
        """
        return torch.cat([s for _, s in self.score_blocks(queries)], dim=1)

    def _my_block_starts(self) -> list[int]:
        """Starts of the training blocks this rank scores (all of them in one process)."""
        n_blocks = -(-self.n_train // self.block_size)
        return [j * self.block_size for j in distributed.my_jobs(n_blocks)]

    def attribute_to_file(self, queries: Any, path: str | Path) -> Path:
        """Write ``S`` (n_query, n_train) to an ``.npy`` file block by block: memory stays
        O(n_query × block_size) whatever n_train. Under torchrun the training blocks are
        split across the ranks (``path`` must be on a filesystem they share); every rank
        returns when the file is complete."""
        out = Path(path)
        n_query = len(ExampleSource(queries, "queries"))
        dtype = np.dtype(str(self.compute_dtype).replace("torch.", ""))
        if distributed.world()[0] == 0:
            out.parent.mkdir(parents=True, exist_ok=True)
            mm = np.lib.format.open_memmap(
                out, mode="w+", dtype=dtype, shape=(n_query, self.n_train)
            )
            del mm
        distributed.barrier()
        mm = np.load(out, mmap_mode="r+")
        for start, block in self.score_blocks(queries, self._my_block_starts()):
            mm[:, start : start + block.shape[1]] = block.detach().cpu().numpy()
        mm.flush()
        del mm
        distributed.barrier()
        return out

    def top_k(
        self, queries: Any, k: int = 10, opponents: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The k largest scores (proponents) or smallest (``opponents=True``) per query.

        Streams training blocks: memory is O(n_query × (k + block_size)). Under torchrun
        the blocks are split across the ranks and the lists merged (every rank returns
        the single-process result).

        Returns:
            (values, indices), each (n_query, min(k, n_train)), best first.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"k must be a positive integer, got {k!r}")
        size = distributed.world()[1]
        if size == 1:
            return running_top_k(self.score_blocks(queries), k, largest=not opponents)
        # under torchrun: each rank scores its share of the training blocks, then the
        # per-rank top-k lists are merged (same result as one process, on every rank)
        starts = self._my_block_starts()
        local = (
            running_top_k(self.score_blocks(queries, starts), k, largest=not opponents)
            if starts
            else None
        )
        gathered: list[Any] = [None] * size
        torch.distributed.all_gather_object(gathered, local)
        parts = [(v.cpu(), i.cpu()) for g in gathered if g is not None for v, i in [g]]
        return merge_top_k(parts, k, largest=not opponents)

    def self_influence(self) -> torch.Tensor:
        """``s_i = Σ_c w_c ‖φ_c(z_i)‖²`` (the score of each training example with itself,
        measured by its training loss; ``(1/n) Σ_c w_c g_cᵀ (H_c + λI)⁻¹ g_c`` for influence
        methods), shape (n_train,). High values flag suspected mislabelled or atypical
        examples. Under torchrun the training blocks are split across the ranks and the
        values merged (every rank returns the single-process result)."""
        starts = self._my_block_starts()
        out = []
        for start in starts:
            stop = min(start + self.block_size, self.n_train)
            total = None
            for c, w in enumerate(self.weights):
                g = self._train_block(c, start, stop)
                if self.preconditioners:
                    sq = self.features.pairwise_diagonal(self._precondition(c, g), g)
                else:
                    sq = self.features.sqnorm(g)
                s = (sq / _safe(sq) if self.method.normalize else sq) * (w * self.scale)
                if self.column_weights is not None:
                    s = s * self.column_weights[c][start:stop].to(s)
                total = s if total is None else total + s
            assert total is not None
            out.append(total)
        if distributed.world()[1] == 1:
            return torch.cat(out)
        # each rank's blocks into zeros, one all-reduce: bit-identical to one process
        full = torch.zeros(
            self.n_train, dtype=self.compute_dtype, device=model_device(self.task.model)
        )
        for start, values in zip(starts, out, strict=True):
            full[start : start + values.shape[0]] = values
        return distributed.all_sum(full)


def _safe(norm: torch.Tensor) -> torch.Tensor:
    """Norms with exact zeros replaced by 1, so a zero gradient scores 0, not NaN."""
    return torch.where(norm == 0, torch.ones_like(norm), norm)
