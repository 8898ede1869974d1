"""Influence with K-FAC/EK-FAC scored in one fused pass: no training features are stored.

``S[j, i] = (1/n) Σ_c w_c Σ_l ⟨(G_cl + λI)⁻¹ q_jl, g_il⟩`` needs, per layer l, the
preconditioned query gradients (a ``(n_q, out, in')`` block, formed once) and each training
example's gradient block ``g_il = Σ_p e_p ãᵀ_p`` — which the hook rules' one backward pass
gives as factors. Scoring therefore runs over the training data a batch at a time, forms a
batch's gradient blocks one layer at a time, dots them with the preconditioned queries and
drops them: memory is the factors, the preconditioned queries and one batch, never the
``n × p`` training features (which the generic path stores or recomputes). λ₀ (the damping
scale) is measured in the K-FAC factor pass (:func:`datatrace.curvature.kfac_passes.fit_factors`),
so the whole fit is three passes over the training data: factors, EK-FAC eigenvalues (not
for K-FAC) and, per scoring call, the scores.

Chosen by :class:`~datatrace.methods.engine.GradientAttributor` for a preconditioner with
``fused_scoring`` when no feature store is asked for (``store=None``); the same scores as
the stored-feature path (``store=...``), to round-off (tested in float64).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..core import distributed
from ..core.data import ExampleSource
from ..core.errors import ConfigError
from ..core.loop import TrailingPadding, check_finite, length_groups, over_batches, over_groups
from ..core.runtime import model_device
from ..core.task import AbstractTask
from ..curvature.base import AbstractPreconditioner, mean_squared_entry
from ..curvature.context import FitContext
from ..curvature.kfac import KroneckerPreconditioner
from ..curvature.kfac_layers import KLayer, live_positions, nonzero_rows
from ..curvature.problem import CurvatureProblem
from ..features.placement import MEMORY_BUDGET
from ..grads.layers import layer_calls
from ..grads.per_example import bound_model, value_fn
from ..grads.rules import capture
from .chunks import check_finite_scores
from .fitted import FittedGradientAttributor

log = logging.getLogger("datatrace")

#: a fused pass's batch is sized so that its activations, output-space columns and one
#: layer's formed gradient block take about this fraction of the memory budget (measured
#: peak RSS, 1 thread, the 929k-parameter GPT-2 of bench/bench_lm.py, 1,000 examples:
#: batch 20, 0.24-0.28 GB; 24, 0.38-0.41 GB; kronfluence at batch 32, 0.29-0.33 GB)
BATCH_FRACTION = 40
#: the largest default fused batch
MAX_FUSED_BATCH = 256


def fused_batch_size(
    task: AbstractTask, modules: dict[str, nn.Module], source: ExampleSource, budget: int
) -> int:
    """Examples per batch of the fused passes: from a forward-only probe on one example,
    the bytes a batch holds per example (the K-FAC layers' inputs and outputs, 2 copies
    each: the activations autograd keeps and their pullbacks; the model's outputs, 8
    copies: output-space columns, softmax, the loss's gradient; the widest layer's formed
    gradient block) against ``budget / BATCH_FRACTION``."""
    model = task.model
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    loop = over_batches(source, 1, 0, 1, device=model_device(model), eval_module=model)
    outputs = 0
    with torch.no_grad(), layer_calls(modules) as calls:
        for _, _, batch in loop:
            outputs = task.outputs(bound_model(model, state), batch).numel()
    acts = sum(x.numel() + y.numel() for cs in calls.values() for x, y in cs)
    widest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in modules.values()),
                 default=0)  # fmt: skip
    item = next(iter(state.values())).element_size()
    per_example = max(1, item * (2 * acts + 8 * outputs + widest))
    return max(1, min(MAX_FUSED_BATCH, budget // BATCH_FRACTION // per_example))


class FittedKroneckerInfluence(FittedGradientAttributor):
    """Influence scores from a K-FAC/EK-FAC fit without stored training features (module
    docstring). Everything else (top-k, files, saving, checks) is the generic attributor's;
    where it needs training features they are recomputed block by block."""

    #: the memory budget of the fit (``max_memory_bytes``): sizes the query chunks
    memory_budget: int = MEMORY_BUDGET

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        #: {(start, stop): a training block's length-sorted groups, None without a mask}
        self._groups: dict[tuple[int, int], list[torch.Tensor] | None] = {}
        super().__init__(*args, **kwargs)
        self._padding = TrailingPadding(self.task)

    def query_chunks(self, n_query: int) -> list[tuple[int, int]]:
        """The query ranges scored together, each costing one fused pass over the training
        data (forward, backward, gradient blocks): as few as the memory budget allows.
        No training feature block is held, so a chunk's preconditioned queries (every
        checkpoint's ``n_q × p`` blocks) may take what the budget leaves after the fitted
        factors, the parameters and two batches' share (:data:`BATCH_FRACTION`): the
        generic plan (:meth:`FittedGradientAttributor.query_chunks`) holds them to one
        training block's size, which for a wide model meant several passes. Chunks are of
        equal size (within one query)."""
        row = self.query_row_bytes()
        step = max(1, (self.memory_budget - self.held_bytes()) // row)
        n_chunks = max(1, -(-n_query // step))
        size = max(1, -(-n_query // n_chunks))
        return [(a, min(a + size, n_query)) for a in range(0, n_query, size)]

    def query_row_bytes(self) -> int:
        """Bytes of one query's preconditioned blocks, every checkpoint."""
        item = self.compute_dtype.itemsize
        return max(1, sum(self.features.layout().values()) * item * len(self.states))

    def held_bytes(self) -> int:
        """Bytes a scoring pass holds besides the queries: the gathered gradient blocks (at
        most a training block's), the parameters and fitted factors of every checkpoint,
        and two batches' share of the budget."""
        item = self.compute_dtype.itemsize
        row = sum(self.features.layout().values()) * item
        held = 2 * self.memory_budget // BATCH_FRACTION + min(self.block_size, self.n_train) * row
        for c, (params, _) in enumerate(self.states):
            held += sum(t.numel() for t in params.values()) * item
            if c < len(self.preconditioners):
                for lay in self._kron(c).layers:
                    factors = (lay.A, lay.S, lay.ua, lay.us, lay.lam)
                    held += sum(t.numel() * t.element_size() for t in factors if t is not None)
        return held

    def fit_context(self, c: int, lambda0: float | None = None) -> FitContext:
        """As the generic context, with λ₀ computed from recomputed training features only if
        read (K-FAC's and EK-FAC's default damping does not need it)."""
        params, buffers = self.states[c]
        problem = CurvatureProblem(
            self.task, self.features.names, params, buffers, self.train, self.batch_size,
            self.progress,
        )  # fmt: skip

        def from_features() -> float:
            square_sum = sum(float(self.features.sqnorm(g).sum()) for _, g in self._blocks(c))
            return mean_squared_entry(square_sum, problem.n, problem.p)

        return FitContext(
            problem, from_features if lambda0 is None else lambda0, None, lambda: self._blocks(c)
        )

    def _fit_preconditioners(self, spec: AbstractPreconditioner) -> None:
        # the task's checks (labels in range, ...) in index order, before passes that read
        # the examples in length-sorted groups: an error names the right examples
        for s, batch in self._batches(self.train, 0, self.n_train):
            self._check_batch(0, batch, s)
        for c in range(len(self.states)):
            ctx = self.fit_context(c)
            fitted = spec.fit(ctx)
            self.lambda0.append(ctx.lambda0 if ctx.lambda0_known else None)
            log.info(
                "%s: checkpoint %d: damping %.3g (fused scoring: training features not "
                "stored)", self.method.name, c, fitted.damping,
            )  # fmt: skip
            self.preconditioners.append(fitted)
        self.scale = 1.0 / self.n_train

    # -- per-example gradient blocks, a batch at a time ------------------------------------

    def _kron(self, c: int) -> KroneckerPreconditioner:
        pc = self.preconditioners[c]
        if not isinstance(pc, KroneckerPreconditioner):
            raise ConfigError(f"fused scoring needs a K-FAC/EK-FAC fit, got {type(pc).__name__}")
        return pc

    def _layer_factors(
        self, c: int, batch: Any, measurement: bool, offset: int | torch.Tensor
    ) -> Iterator[tuple[KLayer, torch.Tensor, torch.Tensor]]:
        """Each K-FAC layer's per-example gradient factors of one batch, from one batched
        backward pass: output gradients (b, P, out) and input patches (b, P, in'), whose
        per-example sum over positions ``Σ_p e_p ãᵀ_p`` is the layer's gradient block.
        ``offset``: the batch's first example index, or (a length-sorted group of training
        examples, checked in index order when the fit began) every example's index."""
        pc = self._kron(c)
        params, buffers = self.states[c]
        model = bound_model(self.task.model, {**buffers, **params})
        if isinstance(offset, int):
            self.task.check_batch(model, batch, offset)
        modules = {lay.name: lay.module for lay in pc.layers}
        what = "measurement" if measurement else "loss"
        value = value_fn(self.task, measurement)
        batch = self._padding(
            batch,
            lambda b, p: value(bound_model(self.task.model, {**buffers, **p}), b),
            what,
            params,
        )
        calls, values = capture(self.task, params, buffers, batch, modules, measurement)
        check_finite(values, [], offset, what)
        for lay in pc.layers:
            (x, e), *more = calls.pop(lay.name)
            if more:
                raise ConfigError(f"K-FAC layer {lay.name!r} was called {1 + len(more)} times")
            e, a = lay.out_grads(e, None), lay.patches(x, None)
            del x
            # positions whose output gradient is zero in every example of the batch (padding
            # the model masks out) add nothing to any Σ_p e_p ãᵀ_p: cut before the products
            check_finite(values, [e, a], offset, what)
            e, a, _ = live_positions(nonzero_rows(e), e, a)
            yield lay, e, a

    def _check_batch(self, c: int, batch: Any, offset: int) -> None:
        params, buffers = self.states[c]
        self.task.check_batch(bound_model(self.task.model, {**buffers, **params}), batch, offset)

    def _train_batches(self, start: int, stop: int) -> Iterator[tuple[int | torch.Tensor, Any]]:
        """Training examples ``start..stop-1`` for a scoring pass: sequences in groups of
        similar length (:func:`~datatrace.core.loop.length_groups`: a batch's cost follows
        its longest sequence), each group with its examples' indices (the task checked
        them in index order when the fit began); contiguous batches without a token
        mask."""
        key = (start, stop)
        if key not in self._groups:
            self._groups[key] = length_groups(
                self.train, self.task.token_mask, self.batch_size, start, stop
            )
        groups = self._groups[key]
        if groups is None:
            yield from self._batches(self.train, start, stop)
            return
        model = self.task.model
        loop = over_groups(self.train, groups, device=model_device(model), eval_module=model)
        yield from loop

    def _batches(self, source: ExampleSource, start: int, stop: int) -> Iterator[tuple[int, Any]]:
        model = self.task.model
        loop = over_batches(
            source, self.batch_size, start, stop, device=model_device(model), eval_module=model
        )
        return ((s, batch) for s, _, batch in loop)

    def preconditioned_queries(
        self, queries: Any, rows: tuple[int, int] | None = None
    ) -> list[dict[str, tuple[torch.Tensor, bool]]]:
        """``(G_c + λI)⁻¹ q_j`` per checkpoint and layer (of the queries in ``rows``, a
        range, when given), {layer: (block (n_q, out·in'),
        rotated)}: ``rotated`` blocks are left in the layer's eigenbasis (``U_Sᵀ · U_A``),
        and training gradients are rotated instead, where that is cheaper (many queries,
        wide layers, few training examples: ``n_q·out·in'(out + in')`` for the queries
        against ``n·P(out² + in'²)`` for the training factors)."""
        source = self.query_source(queries)
        first, last = rows or (0, len(source))
        n_q = last - first
        out = []
        for c in range(len(self.states)):
            pc = self._kron(c)
            blocks: dict[str, tuple[torch.Tensor, bool]] = {}  # filled in place: one copy
            for s, batch in self._batches(source, first, last):
                for lay, e, a in self._layer_factors(c, batch, True, s):
                    if lay.name not in blocks:
                        n_out, n_in = e.shape[2], a.shape[2]
                        back = n_q * n_out * n_in * (n_out + n_in)
                        rotated = self.n_train * a.shape[1] * (n_out**2 + n_in**2) < back
                        blocks[lay.name] = (e.new_empty(n_q, n_out * n_in), rotated)
                    block, rotated = blocks[lay.name]
                    block[s - first : s - first + len(e)] = pc.solve_factors(
                        lay, e, a, rotated
                    ).flatten(1)
            out.append(blocks)
        return out

    def score_blocks(
        self,
        queries: Any,
        starts: Sequence[int] | None = None,
        rows: tuple[int, int] | None = None,
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(start, S[rows, start:stop])`` over training blocks, each from one fused
        pass over its examples."""
        qt = self.preconditioned_queries(queries, rows)
        blocks = range(0, self.n_train, self.block_size) if starts is None else starts
        for start in blocks:
            stop = min(start + self.block_size, self.n_train)
            total = None
            for c, w in enumerate(self.weights):
                s = self._block_scores(c, qt[c], start, stop) * (w * self.scale)
                total = s if total is None else total + s
            assert total is not None
            check_finite_scores(total, start, self.preconditioners, "scores")
            yield start, total

    def _block_scores(
        self, c: int, qt: dict[str, tuple[torch.Tensor, bool]], start: int, stop: int
    ) -> torch.Tensor:
        pc = self._kron(c)
        # each layer's gradient blocks of several batches (up to as many examples as there
        # are queries, within the block) dotted with the queries at once: the query blocks
        # are read once per that many examples, not once per batch (memory-bound when the
        # batches are small); the blocks are formed in place in one buffer per layer (no
        # copy to gather them), as many rows as the fewest whole batches that reach n_q
        n_q = next(iter(qt.values()))[0].shape[0]
        bs = self.batch_size  # whole batches are gathered until they reach n_q rows
        rows = min(stop - start, bs * -(-n_q // bs))
        buffers: dict[str, torch.Tensor] = {}
        gathered = done = 0
        parts, order = [], []
        for at, batch in self._train_batches(start, stop):
            for lay, e, a in self._layer_factors(c, batch, False, at):
                query, rotated = qt[lay.name]
                if lay.name not in buffers:
                    buffers[lay.name] = query.new_empty(rows, query.shape[1])
                b = len(e)  # gathered < n_q before this batch: it fits
                out = buffers[lay.name][gathered : gathered + b].view(b, e.shape[2], a.shape[2])
                # in the eigenbasis when the queries were left there, else as it is
                if rotated:
                    pc.rotate_factors(lay, e, a, out=out)
                else:
                    torch.bmm(e.transpose(1, 2), a, out=out)
            order.append(at if isinstance(at, torch.Tensor) else torch.arange(at, at + len(e)))
            gathered += len(e)
            done += len(e)
            if gathered >= n_q or done >= stop - start:
                parts.append(self._dot_gathered(qt, buffers, gathered))
                gathered = 0
        scores = torch.cat(parts, 1)
        # back in index order (length-sorted groups are not)
        where = torch.cat(order).to(scores.device) - start
        return scores.new_empty(scores.shape).index_copy_(1, where, scores)

    @staticmethod
    def _dot_gathered(
        qt: dict[str, tuple[torch.Tensor, bool]], buffers: dict[str, torch.Tensor], gathered: int
    ) -> torch.Tensor:
        """Scores (n_q, gathered) of the first ``gathered`` rows of each layer's buffer."""
        total = None
        for name, buf in buffers.items():
            term = qt[name][0] @ buf[:gathered].T
            total = term if total is None else total.add_(term)
        assert total is not None
        return total

    def self_influence(self) -> torch.Tensor:
        """``(1/n) Σ_c w_c g_cᵀ (G_c + λI)⁻¹ g_c`` per training example, from the rotated
        gradient blocks of one fused pass (no training features stored)."""
        starts = self._my_block_starts()
        out = []
        for start in starts:
            stop = min(start + self.block_size, self.n_train)
            total = torch.zeros(stop - start, dtype=self.compute_dtype,
                                device=model_device(self.task.model))  # fmt: skip
            for c, w in enumerate(self.weights):
                pc = self._kron(c)
                for s, batch in self._batches(self.train, start, stop):
                    for lay, e, a in self._layer_factors(c, batch, False, s):
                        assert lay.lam is not None
                        rot = pc.rotate_factors(lay, e, a)
                        value = (rot.square() / (lay.lam + pc.damping)).sum((1, 2))
                        total[s - start : s - start + len(e)] += value * (w * self.scale)
            check_finite_scores(total[None], start, self.preconditioners, "self-influence")
            out.append(total)
        if distributed.world()[1] == 1:
            return torch.cat(out)
        full = torch.zeros(self.n_train, dtype=self.compute_dtype,
                           device=model_device(self.task.model))  # fmt: skip
        for start, values in zip(starts, out, strict=True):
            full[start : start + values.shape[0]] = values
        return distributed.all_sum(full)
