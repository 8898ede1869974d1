"""THE loop over data: every pass over examples (featurization, curvature fitting, TRAK's
probabilities, measuring queries) reads its batches through :func:`over_ranges`, so the
progress bar, the device move, eval mode and the non-finite checks are written once.

* :func:`~datatrace.core.data.batch_ranges` (re-exported here): the ``(start, stop)``
  ranges of a pass in batches of a given size
  (also the chunk boundaries of resumable stores, so they must never change).
* :func:`over_batches` / :func:`over_ranges`: yield ``(start, stop, batch)`` with the batch
  on the device, optionally under :func:`~datatrace.core.runtime.eval_mode`, with one
  tqdm bar (shown as :func:`~datatrace.core.runtime.show_progress` decides).
* :func:`check_finite`: raise :class:`NonFiniteError` naming every non-finite example of a
  batch; :func:`naming_every_nonfinite` widens such an error to every offending example of
  the rest of the data (a forward-only scan), so one run reports all of them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import Batch, ExampleSource, batch_ranges, batch_to, leaves, map_tensors
from .errors import NonFiniteError
from .runtime import eval_mode, show_progress

if TYPE_CHECKING:
    from .task import AbstractTask

log = logging.getLogger("datatrace")

#: how many offending indices an error message lists (``.indices`` has all of them)
SHOWN_INDICES = 20


def over_batches(
    source: ExampleSource,
    batch_size: int,
    start: int = 0,
    stop: int | None = None,
    *,
    device: torch.device | None = None,
    eval_module: nn.Module | None = None,
    progress: bool | None = False,
    desc: str | None = None,
) -> Generator[tuple[int, int, Batch], None, None]:
    """Examples ``start..stop-1`` of ``source`` (``stop=None``: to the end) in batches of
    ``batch_size``; see :func:`over_ranges` for the rest."""
    stop = len(source) if stop is None else stop
    return over_ranges(
        source,
        batch_ranges(batch_size, start, stop),
        device=device,
        eval_module=eval_module,
        progress=progress,
        desc=desc,
    )


def over_ranges(
    source: ExampleSource,
    ranges: Sequence[tuple[int, int]],
    *,
    device: torch.device | None = None,
    eval_module: nn.Module | None = None,
    progress: bool | None = False,
    desc: str | None = None,
) -> Generator[tuple[int, int, Batch], None, None]:
    """``(start, stop, batch)`` for each range, in order.

    Args:
        source: the examples.
        ranges: ``(start, stop)`` index ranges (e.g. :func:`batch_ranges`, a store's chunks).
        device: move every tensor of each batch here (``None``: leave where it is).
        eval_module: hold this module in eval mode for the whole pass; its train/eval flags
            are restored when the pass ends, is broken out of, or the loop body raises
            (the generator is closed when the ``for`` loop drops it).
        progress: one progress bar over the ranges (``None``: when stderr is a terminal).
        desc: the bar's label.
    """
    for (s, e), batch in _over(
        source, ranges, lambda r: source.batch(*r), device, eval_module, progress, desc
    ):
        yield s, e, batch


def over_groups(
    source: ExampleSource,
    groups: Sequence[torch.Tensor],
    *,
    device: torch.device | None = None,
    eval_module: nn.Module | None = None,
    progress: bool | None = False,
    desc: str | None = None,
) -> Generator[tuple[torch.Tensor, Batch], None, None]:
    """``(indices, batch)`` for each group of example indices (any order: e.g.
    :func:`length_groups`), as :func:`over_ranges` does for ranges."""
    yield from _over(source, groups, source.take, device, eval_module, progress, desc)


def _over(
    source: ExampleSource,
    items: Sequence[Any],
    fetch: Callable[[Any], Batch],
    device: torch.device | None,
    eval_module: nn.Module | None,
    progress: bool | None,
    desc: str | None,
) -> Generator[tuple[Any, Batch], None, None]:
    mode = eval_mode(eval_module) if eval_module is not None else contextlib.nullcontext()
    bar = tqdm(total=len(items), desc=desc, disable=not show_progress(progress), leave=False)
    with bar, mode:
        for item in items:
            batch = fetch(item)
            yield item, batch if device is None else batch_to(batch, device)
            bar.update()


def length_groups(
    source: ExampleSource,
    token_mask: Callable[[Batch], torch.Tensor | None],
    batch_size: int,
    start: int = 0,
    stop: int | None = None,
) -> list[torch.Tensor] | None:
    """Examples ``start..stop-1`` in groups of ``batch_size`` of similar length (sorted by
    their number of real tokens, ``token_mask(batch)`` (batch, T) summed, longest first:
    later, smaller batches reuse the memory of the first; ties in index order), or
    ``None``: the examples have no token mask, or grouping would cut fewer than
    :data:`GROUPING_GAIN` of the positions that batches in index order carry (each batch
    padded to its longest sequence). A pass whose per-batch cost grows with the longest
    sequence of the batch (token positions dead in every example are cut) then pays for
    tokens, not for padding; sums over examples do not depend on the order (to
    round-off)."""
    stop = len(source) if stop is None else stop
    counts = []
    for s, e in batch_ranges(max(batch_size, 1024), start, stop):
        mask = token_mask(source.batch(s, e))
        if mask is None:
            return None
        counts.append(mask.reshape(mask.shape[0], -1).ne(0).sum(1).cpu())
    count = torch.cat(counts)
    order = count.argsort(descending=True, stable=True)

    def carried(lengths: torch.Tensor) -> int:
        return sum(int(g.max()) * len(g) for g in lengths.split(batch_size))

    if carried(count[order]) > (1 - GROUPING_GAIN) * carried(count):
        return None
    return list((order + start).split(batch_size))


class TrailingPadding:
    """Cuts the token positions at the end of a sequence batch that are padding in every
    example (:meth:`~datatrace.core.task.AbstractTask.token_mask`): a right-padded batch
    is then carried through the model to its longest sequence, not to the padded length
    (with :func:`length_groups`, to about each example's own length).

    Every tensor of the batch whose first two dimensions are the mask's (batch, T) loses
    its positions from the end of the last real token on. That is exact when the model
    masks its padding out (attention masks; causal models' trailing tokens), and only
    then: the first batch that would be cut is checked, its per-example values
    (``value_of(batch, params)``: the loss or the measurement) and the gradient of a random
    combination of them with respect to ``params`` must agree with and without the cut to
    :data:`CUT_RTOL`, else this model reads its padding (no attention mask, pooling over
    every position, a (batch, T) input that is not positional, or a path through the
    padding that is closed only at these parameters, such as a gate at zero) and no batch
    of that kind is cut (logged once). A batch that would cut
    another set of tensors (batches padded to their own lengths, where a target's width
    can equal T by chance) is checked anew. One instance per pass (verdicts per kind of
    value, ``"loss"`` or ``"measurement"``, and set of tensors cut)."""

    def __init__(self, task: AbstractTask) -> None:
        self.task = task
        #: {(kind, the cut tensors' places in the batch): whether cutting is exact}
        self.verdicts: dict[tuple[str, tuple[str, ...]], bool] = {}

    def __call__(
        self,
        batch: Batch,
        value_of: Callable[[Batch, dict[str, torch.Tensor]], torch.Tensor],
        kind: str,
        params: dict[str, torch.Tensor],
    ) -> Batch:
        mask = self.task.token_mask(batch)
        if mask is None or mask.dim() != 2:
            return batch
        live = mask.ne(0).any(0).nonzero()
        length = int(live[-1]) + 1 if len(live) else mask.shape[1]
        if length == mask.shape[1]:
            return batch
        places: list[str] = []
        cut = cut_positions(batch, (mask.shape[0], mask.shape[1]), length, places)
        key = (kind, tuple(places))
        if self.verdicts.get(key) is False:
            return batch
        if key not in self.verdicts:
            padded = mask.ne(0).sum(1).argsort()[:CUT_CHECK_ROWS]  # most padding first
            self.verdicts[key] = self._same(batch, cut, value_of, params, padded)
            if not self.verdicts[key]:
                log.info(
                    "the %s changes when the padding after every example's last real token "
                    "is cut (the model reads its padding, or %s is not positional): these "
                    "batches keep their full length",
                    kind,
                    ", ".join(key[1]),
                )
                return batch
        return cut

    def verdict(self, kind: str) -> bool | None:
        """Whether batches of this kind were cut (all checks agreed), were not (a check
        disagreed), or ``None``: no batch needed a cut."""
        found = [v for (k, _), v in self.verdicts.items() if k == kind]
        return all(found) if found else None

    @staticmethod
    def _same(
        batch: Batch,
        cut: Batch,
        value_of: Callable[[Batch, dict[str, torch.Tensor]], torch.Tensor],
        params: dict[str, torch.Tensor],
        rows: torch.Tensor,
    ) -> bool:
        """Every example's value, and the gradient over the ``rows`` with the most padding
        (where a path through it shows), agree with and without the cut."""
        leaves = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in params.items()}
        wrt = [v for v in leaves.values() if v.requires_grad]
        try:
            with torch.no_grad():
                values = [value_of(batch, params)], [value_of(cut, params)]
            if values[0][0].shape != values[1][0].shape or not _close(*values, floor=1.0):
                return False
            n = values[0][0].shape[0]
            with torch.enable_grad():
                full, short = (value_of(_rows(b, rows, n), leaves) for b in (batch, cut))
                if not (full.requires_grad and short.requires_grad and wrt):
                    return full.requires_grad == short.requires_grad
                g = torch.Generator().manual_seed(0)
                w = torch.randn(full.shape, generator=g, dtype=full.dtype).to(full.device)
                grads = [
                    torch.autograd.grad((v * w).sum(), wrt, allow_unused=True)
                    for v in (full, short)
                ]
        except Exception:  # the cut batch does not fit the model: never cut
            return False
        full_g, short_g = (
            [torch.zeros_like(v) if d is None else d for d, v in zip(gs, wrt, strict=True)]
            for gs in grads
        )
        return _close(full_g, short_g)


def _rows(batch: Batch, rows: torch.Tensor, n: int) -> Batch:
    """The examples ``rows`` of a batch of ``n``: every tensor with ``n`` rows, indexed."""
    return map_tensors(batch, lambda t: t[rows.to(t.device)] if t.dim() and t.shape[0] == n else t)


def _close(a: list[torch.Tensor], b: list[torch.Tensor], floor: float = 0.0) -> bool:
    """Each pair agrees to :data:`CUT_RTOL`, entries near zero to 1% of that times their
    tensor's largest entry (+ a tenth of the largest of all, + ``floor``): float32 sums over
    fewer positions round differently."""
    top = max((float(x.abs().max()) for x in a if x.numel()), default=0.0)
    for x, y in zip(a, b, strict=True):
        scale = float(x.abs().max()) if x.numel() else 0.0
        atol = CUT_RTOL * 1e-2 * (floor + scale + 0.1 * top)
        if not bool(torch.allclose(y, x, rtol=CUT_RTOL, atol=atol)):
            return False
    return True


#: :class:`TrailingPadding` compares gradients over this many examples of the checked batch
#: (those with the most padding): a backward pass over a few examples, not the batch
CUT_CHECK_ROWS = 8

#: :class:`TrailingPadding` cuts a model's padding when a batch's values agree this closely
#: with and without it (float32 round-off of the shorter products is ~1e-7)
CUT_RTOL = 1e-4


def cut_positions(
    batch: Batch,
    shape: tuple[int, int],
    length: int,
    places: list[str] | None = None,
    at: str = "batch",
) -> Batch:
    """``batch`` with every tensor whose leading dimensions are ``shape`` (batch, T) cut to
    its first ``length`` positions (contiguous copies); everything else as it is. Where
    each cut tensor sits (``batch['ids']``, ``batch[0]``...) is appended to ``places``."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() >= 2 and (batch.shape[0], batch.shape[1]) == shape:
            if places is not None:
                places.append(at)
            return batch[:, :length].contiguous()
        return batch
    if isinstance(batch, Mapping):
        return {
            k: cut_positions(v, shape, length, places, f"{at}[{k!r}]") for k, v in batch.items()
        }
    if isinstance(batch, (tuple, list)):
        return type(batch)(
            cut_positions(v, shape, length, places, f"{at}[{i}]") for i, v in enumerate(batch)
        )
    return batch


#: :func:`length_groups` sorts only when that cuts at least this fraction of the positions
#: batches in index order carry (else the order, and sampled labels drawn in it, stay)
GROUPING_GAIN = 0.1


def check_finite(
    values: torch.Tensor, rows: Sequence[torch.Tensor], offset: int | torch.Tensor, what: str
) -> None:
    """Raise :class:`NonFiniteError` naming every example of a batch whose value (loss or
    measurement, (batch,)) or any row of ``rows`` (each (batch, ...)) is NaN or inf.

    ``offset`` is the index of the batch's first example, or every example's index (a
    batch of :func:`over_groups`); ``what`` names the value ("loss", "measurement") in
    the message."""
    bad_value = ~torch.isfinite(values)
    flat = [r.reshape(r.shape[0], -1) for r in rows]
    # A row sum is non-finite if any entry is (one pass, no boolean copy of the gradients);
    # rows flagged only by an overflowing sum are re-checked entry by entry below.
    suspect = bad_value.clone()
    for r in flat:
        suspect |= ~torch.isfinite(r.sum(dim=1))
    if not bool(suspect.any()):
        return
    bad = bad_value.clone()
    for r in flat:
        bad |= ~torch.isfinite(r).all(dim=1)
    if bool(bad.any()):
        at = bad.nonzero().flatten()
        idx = (offset.cpu()[at.cpu()] if isinstance(offset, torch.Tensor) else at + offset).tolist()
        kind = what if bool(bad_value.any()) else f"gradient of the {what}"
        raise NonFiniteError(
            f"non-finite (NaN or inf) {kind} at examples {idx[:SHOWN_INDICES]}"
            f"{' and more' if len(idx) > SHOWN_INDICES else ''}; check these inputs/labels "
            "or the checkpoint (a diverged model)",
            indices=idx,
        )


def nonfinite_examples(
    value_of: Callable[[Batch], torch.Tensor],
    source: ExampleSource,
    ranges: Sequence[tuple[int, int]],
    device: torch.device | None,
) -> list[int]:
    """Indices of the examples in ``ranges`` whose value ``value_of(batch)`` ((batch,)) is
    not finite, or whose floating inputs are (an inf input can leave the loss finite and
    make its gradient NaN), from forward passes only (no gradients)."""
    bad: list[int] = []
    with torch.no_grad():
        for s, _, batch in over_ranges(source, ranges, device=device):
            vals = value_of(batch)
            rows = torch.isfinite(vals).logical_not()
            for t in leaves(batch):
                if t.is_floating_point() and t.dim() >= 1 and t.shape[0] == rows.shape[0]:
                    rows |= torch.isfinite(t.reshape(t.shape[0], -1)).all(1).logical_not()
            bad += (rows.nonzero().flatten() + s).tolist()
    return bad


@contextlib.contextmanager
def naming_every_nonfinite(
    value_of: Callable[[Batch], torch.Tensor],
    source: ExampleSource,
    rest: Sequence[tuple[int, int]],
    device: torch.device | None,
    what: str,
) -> Iterator[None]:
    """On a :class:`NonFiniteError` from the body, scan the examples of ``rest`` (the ranges
    not yet reached) with ``value_of`` so the error names every offending example, not just
    those of the first bad batch."""
    try:
        yield
    except NonFiniteError as exc:
        bad = list(exc.indices) + nonfinite_examples(value_of, source, rest, device)
        if len(bad) == len(exc.indices) and source.indices is None:
            raise
        raise nonfinite_error(f"{what} or gradient", bad, source) from None


def nonfinite_error(what: str, bad: list[int], source: ExampleSource) -> NonFiniteError:
    """The error naming the examples (rows of ``source``, and their dataset indices where
    a sampler picked a subset) whose ``what`` is NaN or inf; none named if ``bad`` is
    empty."""
    more = len(bad) - SHOWN_INDICES
    where = (
        ""
        if source.indices is None or not bad
        else f" (dataset indices {source.indices[bad[:SHOWN_INDICES]].tolist()})"
    )
    at = f" at examples {bad[:SHOWN_INDICES]}{where}{f' and {more} more' if more > 0 else ''}"
    return NonFiniteError(
        f"non-finite (NaN or inf) {what}{at if bad else ''}; check these inputs/labels or "
        "the checkpoint (a diverged model)",
        indices=bad,
    )
