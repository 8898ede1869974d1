"""A fitted gradient attributor: scores queries against the training features, block by block
(``attribute``, ``attribute_to_file``, ``top_k``, ``self_influence``), never holding the full
(n_query, n_train) matrix unless asked for it."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core import distributed
from ..core.data import ExampleSource
from ..core.errors import ConfigError, NonFiniteError
from ..core.language import LanguageModelingTask
from ..core.runtime import model_device, show_progress
from ..core.task import AbstractTask
from ..curvature.base import (
    AbstractFittedPreconditioner,
    AbstractPreconditioner,
    mean_squared_entry,
)
from ..curvature.context import FitContext
from ..curvature.problem import CurvatureProblem
from ..features.featurizer import AbstractFeaturizer, Features
from ..features.loop import State, featurize
from ..features.memory import MemoryFeatureStore
from ..features.placement import MIN_SIZING_BUDGET
from ..features.store import FeatureStore
from .check import CheckResult, check
from .topk import merge_top_k, running_top_k

if TYPE_CHECKING:
    from .engine import GradientAttributor

log = logging.getLogger("datatrace")


class FittedGradientAttributor:
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
        #: optional per-checkpoint weights of each training example's column, (n_train,)
        self.column_weights = column_weights
        #: scores are computed in the model's dtype (features may be kept in bfloat16)
        self.compute_dtype = next(iter(states[0][0].values())).dtype
        self.preconditioners: list[AbstractFittedPreconditioner] = []
        #: λ₀ (the damping scale) at each checkpoint (influence methods)
        self.lambda0: list[float] = []
        self.scale = 1.0
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
        path = self.store.path if self.store is not None else None
        cache = path / f"curvature-c{c}" if path is not None else None
        return FitContext(problem, lambda0, cache, functools.partial(self._blocks, c))

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

    def query_chunks(self, n_query: int) -> list[tuple[int, int]]:
        """The query ranges scored together: the queries' features held at once take at
        most what one scoring block of training features may (``block_size`` examples,
        or a quarter of :data:`~datatrace.features.placement.MIN_SIZING_BUDGET` if that
        is more: budgets below it do not shrink work): ``block_size // n_checkpoints``
        queries. Scored checkpoint by checkpoint (:meth:`_by_checkpoint`: the training
        features are recomputed for every chunk, so fewer chunks save whole
        featurizations), one checkpoint's queries take two such shares, ``2 ×
        block_size`` (the budget's spare quarter besides the query, block and batch
        ones), or ``block_size`` when only those scores fit a block's share. The
        training features are read once per chunk."""
        block = self._block_rows()
        step = max(1, block // len(self.states))
        for rows in (block, 2 * block):  # the larger when its scores fit too
            if self._by_checkpoint(min(rows, n_query)):
                step = rows
        return [(a, min(a + step, n_query)) for a in range(0, n_query, step)]

    def _block_rows(self) -> int:
        row = max(1, sum(self.features.layout().values()) * self.compute_dtype.itemsize)
        return max(self.block_size, MIN_SIZING_BUDGET // 4 // row)

    def _by_checkpoint(self, n_rows: int) -> bool:
        """Score ``n_rows`` queries one checkpoint at a time (holding one checkpoint's
        query features and the (n_rows, n_train) scores being summed) rather than block
        by block over all checkpoints: when training features are recomputed (each
        chunk of queries then costs a featurization at every checkpoint, so fewer,
        larger chunks are cheaper) and the scores take at most a block's share."""
        if self.store is not None or len(self.states) == 1:
            return False
        row = max(1, sum(self.features.layout().values()) * self.compute_dtype.itemsize)
        item = self.compute_dtype.itemsize
        return n_rows * self.n_train * item <= self._block_rows() * row

    def query_source(self, queries: Any) -> ExampleSource:
        """``queries`` as a checked example source: like the training data (or, for language
        modelling, sequences of any length with the task's own keys), values in range."""
        source = ExampleSource(queries, "queries")
        if isinstance(self.task, LanguageModelingTask):  # sequences: any length, own keys
            self.task.check_queries(source)
        else:
            source.check_like(self.train)
        whole = source.whole()
        if whole is not None:
            self.task.check_data(whole, source.name)
        return source

    def query_features(
        self,
        queries: Any,
        rows: tuple[int, int] | None = None,
        checkpoints: Sequence[int] | None = None,
    ) -> list[Features]:
        """Measurement-gradient features of the queries (those in ``rows``, a range, when
        given) at each checkpoint used (or those in ``checkpoints``)."""
        source = self.query_source(queries)
        out = []
        for c in range(len(self.states)) if checkpoints is None else checkpoints:
            f, st = self.checkpoint_features[c], self.states[c]
            feats = featurize(
                f,
                st,
                source,
                True,
                self.batch_size,
                *(rows or (0, len(source))),
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
        self,
        queries: Any,
        starts: Sequence[int] | None = None,
        rows: tuple[int, int] | None = None,
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(start, S[rows, start:stop])`` over training blocks (all, or those
        starting at ``starts``, multiples of ``block_size``) for the queries in ``rows``
        (a range; ``None``: all, their features held at once); never the whole matrix.
        :meth:`attribute`, :meth:`top_k` and :meth:`attribute_to_file` score the queries
        in :meth:`query_chunks`."""
        n_rows = len(ExampleSource(queries, "queries")) if rows is None else rows[1] - rows[0]
        every = list(range(len(self.states)))
        groups = [[c] for c in every] if self._by_checkpoint(n_rows) else [every]
        blocks = range(0, self.n_train, self.block_size) if starts is None else starts
        bar = show_progress(self.progress) and len(blocks) * len(groups) > 1
        totals: dict[int, torch.Tensor] = {}  # summed over groups of checkpoints
        normalize = self.method.normalize
        for group in groups:
            qfeats = self.query_features(queries, rows, group)
            qfeats = [self._precondition(c, q) for c, q in zip(group, qfeats, strict=True)]
            qnorms = [self.features.sqnorm(q).sqrt() for q in qfeats] if normalize else []
            for start in tqdm(blocks, desc="scoring", unit="block", disable=not bar, leave=False):
                total = self._score_block(group, qfeats, qnorms, start)
                if len(groups) == 1:
                    _check_scores(total, start, self.preconditioners, "scores")
                    yield start, total
                else:
                    totals[start] = total + totals[start] if start in totals else total
        for start, total in totals.items():
            _check_scores(total, start, self.preconditioners, "scores")
            yield start, total

    def _score_block(
        self, group: list[int], qfeats: list[Features], qnorms: list[torch.Tensor], start: int
    ) -> torch.Tensor:
        """``Σ_{c ∈ group}`` of one training block's weighted scores at checkpoint c
        (``qnorms``: the queries' feature norms, for normalised methods)."""
        stop = min(start + self.block_size, self.n_train)
        total = None
        for i, (c, q) in enumerate(zip(group, qfeats, strict=True)):
            g = self._train_block(c, start, stop)
            with self.features.scoring():
                s = self.features.pairwise(q, g)
            if self.method.normalize:
                gnorm = self.features.sqnorm(g).sqrt()
                s = s / _safe(qnorms[i])[:, None] / _safe(gnorm)[None, :]
            s = s * (self.weights[c] * self.scale)
            if self.column_weights is not None:
                s = s * self.column_weights[c][start:stop].to(s)
            total = s if total is None else total + s
        assert total is not None
        return total

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

    def _chunks(self, queries: Any) -> list[tuple[int, int]]:
        """:meth:`query_chunks` of ``queries``, logged when there are several."""
        chunks = self.query_chunks(len(ExampleSource(queries, "queries")))
        if len(chunks) > 1:
            log.info(
                "%s: %d queries scored in %d chunks of %d (their features within the memory "
                "budget's scoring share): the training features are read once per chunk%s",
                self.method.name, chunks[-1][1], len(chunks), chunks[0][1] - chunks[0][0],
                " (recomputed: not cached)" if self.store is None else "",
            )  # fmt: skip
        return chunks

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
        return check(
            self,
            queries,
            n_examples=n_examples,
            n_queries=n_queries,
            epochs=epochs,
            seed=seed,
            n_seeds=n_seeds,
            lr=lr,
            batch_size=batch_size,
            progress=progress,
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
                s = (sq / _safe(sq) if self.method.normalize else sq) * (w * self.scale)
                if self.column_weights is not None:
                    s = s * self.column_weights[c][start:stop].to(s)
                total = s if total is None else total + s
            assert total is not None
            _check_scores(total[None], start, self.preconditioners, "self-influence")
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


def _check_scores(
    block: torch.Tensor, start: int, preconditioners: Sequence[Any], what: str
) -> None:
    """Never return a NaN or inf score silently: name where, and the likely cause."""
    bad = ~torch.isfinite(block)
    if not bool(bad.any()):
        return
    cols = (bad.any(0).nonzero().flatten() + start)[:10].tolist()
    if preconditioners:
        cause = (
            "the preconditioner is singular or overflowed (damping "
            f"{[round(p.damping, 6) for p in preconditioners]}); use damping > 0 or a larger "
            "one, or dt.GaussNewton/EKFAC with the default damping"
        )
    else:
        cause = (
            "the gradient products overflowed the compute dtype (inputs or gradients of "
            "huge magnitude); rescale the inputs, or use a float64 model"
        )
    raise NonFiniteError(
        f"non-finite {what} (NaN or inf) for training examples {cols}"
        f"{' and more' if int(bad.any(0).sum()) > 10 else ''}: {cause}",
        indices=cols,
    )
