"""A fitted gradient attributor: the fit (featurizers, checkpoint states, fitted
preconditioners, where the training features are) and the calls that score with it
(``attribute``, ``attribute_to_file``, ``top_k``, ``self_influence``, ``check``, ``save``),
never holding the full (n_query, n_train) matrix unless asked for it. How queries and
training blocks are scored is :mod:`.chunks`."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..core import distributed
from ..core.checkpoint import Checkpoint
from ..core.data import ExampleSource
from ..core.errors import ConfigError
from ..core.runtime import model_device
from ..core.task import AbstractTask
from ..curvature.base import (
    AbstractFittedPreconditioner,
    AbstractPreconditioner,
    mean_squared_entry,
)
from ..curvature.context import FitContext
from ..curvature.problem import CurvatureProblem
from ..features.featurizer import AbstractFeaturizer
from ..features.loop import State
from ..features.memory import MemoryFeatureStore
from ..features.store import FeatureStore
from ..metrics import agreement
from ..truth.further import further_training
from .check import CheckResult, check_sample
from .chunks import BlockScoring, check_finite_scores, safe_norms
from .topk import merge_top_k, running_top_k
from .trak import MarginTask

if TYPE_CHECKING:
    from .autodamp import AutoDampingResult
    from .engine import GradientAttributor

log = logging.getLogger("datatrace")


class FittedGradientAttributor(BlockScoring):
    """A fitted gradient attributor: scores queries against the stored training features."""

    def __init__(
        self,
        method: GradientAttributor,
        task: AbstractTask,
        features: list[AbstractFeaturizer],
        states: list[State],
        weights: list[float],
        train: ExampleSource,
        store: FeatureStore | MemoryFeatureStore | None,
        batch_size: int,
        block_size: int,
        progress: bool | None,
        column_weights: list[torch.Tensor] | None = None,
        fit_preconditioners: bool = True,
    ) -> None:
        self.method = method
        self.task = task
        self.checkpoint_features = features
        self.features = features[0]
        self.states = states
        self.weights = weights
        self.train = train
        self.store = store
        self.batch_size = batch_size
        self.block_size = block_size
        self.progress = progress
        self.column_weights = column_weights
        self.compute_dtype = next(iter(states[0][0].values())).dtype
        self.preconditioners: list[AbstractFittedPreconditioner] = []
        #: λ₀ (the damping scale) at each checkpoint (influence methods; ``None`` where the
        #: fit did not need it: K-FAC/EK-FAC without stored features)
        self.lambda0: list[float | None] = []
        self.scale = 1.0
        #: what ``damping="auto"`` chose and why (``None`` where it was not used)
        self.auto_damping: AutoDampingResult | None = None
        if method.preconditioner is not None and fit_preconditioners:
            self._fit_preconditioners(method.preconditioner)

    def fit_context(self, c: int, lambda0: float | None = None) -> FitContext:
        """What a preconditioner is fitted from at checkpoint ``c`` (λ₀ computed from the
        training features unless given)."""
        params, buffers = self.states[c]
        problem = CurvatureProblem(
            self.task,
            self.features.names,
            params,
            buffers,
            self.train,
            self.batch_size,
            self.progress,
        )
        if lambda0 is None:
            square_sum = sum(float(self.features.sqnorm(g).sum()) for _, g in self._blocks(c))
            lambda0 = mean_squared_entry(square_sum, problem.n, problem.p)
        return FitContext(
            problem, lambda0, self.curvature_cache(c), functools.partial(self._blocks, c)
        )

    def curvature_cache(self, c: int) -> Path | None:
        """The prefix of the files preconditioners fitted at checkpoint ``c`` cache in the
        feature store (:meth:`AbstractPreconditioner.cache_file`), or ``None``: no store on disk."""
        path = self.store.path if self.store is not None else None
        return path / f"curvature-c{c}" if path is not None else None

    def save(self, path: str | Path) -> Path:
        """Write this fit to the folder ``path`` (settings, fingerprints, checkpoints and
        fitted preconditioners; features by reference to the store when there is one):
        ``dt.load(path, task, train)`` gives it back. See :mod:`datatrace.methods.saved`."""
        from .saved import save_fitted

        return save_fitted(self, path)

    def _fit_preconditioners(self, spec: AbstractPreconditioner) -> None:
        """Fit ``spec`` at every checkpoint; scores get the ``1/n`` of influence functions."""
        for c in range(len(self.states)):
            ctx = self.fit_context(c)
            lambda0 = ctx.lambda0
            self.lambda0.append(lambda0)
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

    def attribute(self, queries: Any) -> torch.Tensor:
        """Scores of every training example for every query, shape (n_query, n_train).

        ``S[j, i] > 0``: training example i is a proponent of query j (training on it
        lowered the query's loss).
        """
        chunks = self._chunks(queries)
        if len(chunks) == 1:
            return torch.cat([s for _, s in self.score_blocks(queries)], dim=1)
        out = None
        for a, b in chunks:
            for start, s in self.score_blocks(queries, rows=(a, b)):
                if out is None:
                    out = s.new_empty(chunks[-1][1], self.n_train)
                out[a:b, start : start + s.shape[1]] = s
        assert out is not None
        return out

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
        for a, b in self._chunks(queries):
            for start, block in self.score_blocks(queries, self._my_block_starts(), (a, b)):
                mm[a:b, start : start + block.shape[1]] = block.detach().cpu().numpy()
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
        chunks = self._chunks(queries)

        def top(starts: Sequence[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
            parts = [
                running_top_k(self.score_blocks(queries, starts, r), k, largest=not opponents)
                for r in chunks
            ]  # per query: chunks of queries are independent
            return torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts])

        if size == 1:
            return top(None)
        # under torchrun: each rank scores its share of the training blocks, then the
        # per-rank top-k lists are merged (same result as one process, on every rank)
        starts = self._my_block_starts()
        local = top(starts) if starts else None
        gathered: list[Any] = [None] * size
        torch.distributed.all_gather_object(gathered, local)
        parts = [(v.cpu(), i.cpu()) for g in gathered if g is not None for v, i in [g]]
        return merge_top_k(parts, k, largest=not opponents)

    def check(
        self,
        queries: Any = None,
        *,
        n_examples: int = 32,
        n_queries: int = 32,
        epochs: int = 1,
        seed: int = 0,
        n_seeds: int = 5,
        lr: float = 0.01,
        batch_size: int = 32,
        progress: bool | None = False,
    ) -> CheckResult:
        """Score this method against further training (Wei et al. 2024) on a random sample.

        ``n_examples`` training examples (drawn with ``seed``) are left out of ``epochs``
        of SGD from the final checkpoint (``lr``, ``batch_size``, averaged over ``n_seeds``
        batch orders: :func:`datatrace.truth.further_training`, run stacked); the scores
        of the queries (``None``: ``n_queries`` other training examples from the same
        draw) for those examples are compared with it per query.

        Returns:
            a :class:`~datatrace.methods.check.CheckResult`: cosine and Spearman agreement
            (mean, standard error over queries), the gold standard used, the sample sizes
            and the seconds taken. Reproducible given ``seed``.
        """
        t0 = time.perf_counter()
        if isinstance(n_seeds, bool) or not isinstance(n_seeds, int) or n_seeds < 1:
            raise ConfigError(f"n_seeds must be an integer >= 1, got {n_seeds!r}")
        left, query_idx = check_sample(self.n_train, n_examples, n_queries, seed, queries is None)
        if query_idx is not None:
            queries = self.train.take(query_idx)
        n_q = len(ExampleSource(queries, "queries"))
        params, buffers = self.states[-1]
        final = Checkpoint.from_state_dict({**params, **buffers})
        # further-train with the training task itself (TRAK scores a wrapped margin task,
        # whose "loss" is not what training minimised): the gold standard evaluate uses
        task = self.task.inner if isinstance(self.task, MarginTask) else self.task
        scores = self.attribute(queries)[:, left].double().cpu()
        gold = further_training(
            task, final, self.train, queries, left, epochs=epochs, seeds=range(n_seeds),
            lr=lr, batch_size=batch_size, progress=progress,
        )[-1].cpu()  # fmt: skip
        agree = agreement(scores, gold)
        what = (
            f"further training (Wei et al. 2024; {epochs} epoch(s) of SGD, lr {lr:g}, batch "
            f"{batch_size}, {n_seeds} seeds)"
        )
        return CheckResult(
            cosine=agree["cosine"],
            spearman=agree["spearman"],
            gold_standard=what,
            n_examples=int(left.numel()),
            n_queries=n_q,
            seconds=time.perf_counter() - t0,
        )

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
                s = (sq / safe_norms(sq) if self.method.normalize else sq) * (w * self.scale)
                if self.column_weights is not None:
                    s = s * self.column_weights[c][start:stop].to(s)
                total = s if total is None else total + s
            assert total is not None
            check_finite_scores(total[None], start, self.preconditioners, "self-influence")
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
