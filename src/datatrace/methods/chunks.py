"""How a fitted gradient attributor scores queries: training features a block at a time
(from memory, a feature store, or recomputed), the queries' features in chunks planned
within the memory budget (:meth:`BlockScoring.query_chunks`), summed over checkpoints either
block by block or checkpoint by checkpoint, and every block of scores checked for NaN/inf.

:class:`BlockScoring` is the base of :class:`~datatrace.methods.fitted.FittedGradientAttributor`
(which holds the fit and adds the user-facing calls: ``attribute``, ``top_k``,
``self_influence``...); :class:`~datatrace.methods.kronecker.FittedKroneckerInfluence`
overrides its plan and its scoring loop for the fused K-FAC pass.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from ..core import distributed
from ..core.data import ExampleSource
from ..core.errors import NonFiniteError
from ..core.language import LanguageModelingTask
from ..core.runtime import model_device, show_progress
from ..core.task import AbstractTask
from ..curvature.base import AbstractFittedPreconditioner
from ..features.featurizer import AbstractFeaturizer, Features
from ..features.loop import State, featurize
from ..features.memory import MemoryFeatureStore
from ..features.placement import MIN_SIZING_BUDGET
from ..features.store import FeatureStore

if TYPE_CHECKING:
    from .engine import GradientAttributor

log = logging.getLogger("datatrace")


class BlockScoring:
    """Scores queries against the training features block by block, never holding the full
    (n_query, n_train) matrix (module docstring). The fit's state is set by the subclass."""

    method: GradientAttributor
    task: AbstractTask
    #: the featurizer of each checkpoint (independent projections), and the first one's
    #: shared helpers (inner products, norms)
    checkpoint_features: list[AbstractFeaturizer]
    features: AbstractFeaturizer
    states: list[State]
    weights: list[float]
    train: ExampleSource
    store: FeatureStore | MemoryFeatureStore | None
    batch_size: int
    block_size: int
    progress: bool | None
    #: optional per-checkpoint weights of each training example's column, (n_train,)
    column_weights: list[torch.Tensor] | None
    #: scores are computed in the model's dtype (features may be kept in bfloat16)
    compute_dtype: torch.dtype
    preconditioners: list[AbstractFittedPreconditioner]
    #: the factor of every score (influence's ``1/n``)
    scale: float

    @property
    def n_train(self) -> int:
        return len(self.train)

    def _blocks(self, c: int) -> Iterator[tuple[int, Features]]:
        for start in range(0, self.n_train, self.block_size):
            stop = min(start + self.block_size, self.n_train)
            yield start, self._train_block(c, start, stop)

    def _precondition(self, c: int, feats: Features) -> Features:
        if not self.preconditioners:
            return feats
        return {k: self.preconditioners[c].solve(v) for k, v in feats.items()}

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
        else:  # sequences (a token mask) may be padded to another length than training's
            masks = [self.task.token_mask(s.batch(0, 1)) for s in (source, self.train)]
            lengths = None
            if all(m is not None and m.dim() == 2 for m in masks):
                lengths = (int(masks[0].shape[1]), int(masks[1].shape[1]))  # type: ignore[union-attr]
            source.check_like(self.train, lengths)
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
                    check_finite_scores(total, start, self.preconditioners, "scores")
                    yield start, total
                else:
                    totals[start] = total + totals[start] if start in totals else total
        for start, total in totals.items():
            check_finite_scores(total, start, self.preconditioners, "scores")
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
                s = s / safe_norms(qnorms[i])[:, None] / safe_norms(gnorm)[None, :]
            s = s * (self.weights[c] * self.scale)
            if self.column_weights is not None:
                s = s * self.column_weights[c][start:stop].to(s)
            total = s if total is None else total + s
        assert total is not None
        return total

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


def safe_norms(norm: torch.Tensor) -> torch.Tensor:
    """Norms with exact zeros replaced by 1, so a zero gradient scores 0, not NaN."""
    return torch.where(norm == 0, torch.ones_like(norm), norm)


def check_finite_scores(
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
