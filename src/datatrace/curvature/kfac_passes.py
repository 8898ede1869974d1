"""The two passes over the training data that fit K-FAC/EK-FAC (see :mod:`.kfac`).

* :func:`fit_factors`: the Kronecker factors ``A`` and ``S`` of every layer, accumulated in
  place batch by batch (never a per-example quantity kept beyond its batch), then their
  eigendecompositions.
* :func:`refit_eigenvalues`: EK-FAC's eigenvalues ``(1/n) Σ_i Σ_c (U_Sᵀ G_ic U_A)²``, from the
  rotated factors (inputs rotated by ``U_A`` and output gradients by ``U_S`` per position,
  then their per-example sum over positions: never rotating a formed ``out × in`` gradient).

Both passes draw the same sampled labels (the generator is re-seeded per pass).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..core.errors import ConfigError
from ..core.loop import nonfinite_error, nonfinite_examples
from ..grads.layers import layer_calls
from .base import symmetric_eigh
from .fisher import (
    Draw,
    Fisher,
    draw_at_rows,
    draw_labels,
    loss_gradient,
    output_columns,
    resolve_fisher,
    sampled_columns,
)
from .kfac_layers import KLayer, live_positions
from .problem import CurvatureProblem

log = logging.getLogger("datatrace")


@dataclass(frozen=True)
class PassSettings:
    """How the output-side columns are drawn: ``fisher`` (None: automatic), ``samples``
    sampled labels per example, ``seed``."""

    fisher: Fisher | None
    samples: int
    seed: int


@dataclass
class _Step:
    """One layer in one batch: its input patches (b, P, in'), output pseudo-gradients per
    column [(b, P, out)], its number of counted positions, and the flat indices of the
    counted rows of ``a.reshape(-1, in')`` (None: every row counts). Positions counted in
    no example of the batch are already cut (:func:`~.kfac_layers.live_positions`)."""

    a: torch.Tensor
    e: list[torch.Tensor]
    count: float
    rows: torch.Tensor | None = None

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (b, P, d) as (counted rows, d): the rows that add to a covariance."""
        flat = x.reshape(-1, x.shape[-1])
        return flat if self.rows is None else flat.index_select(0, self.rows)


def _pseudo_grads(
    problem: CurvatureProblem,
    layers: list[KLayer],
    desc: str,
    settings: PassSettings,
    draws: list[Draw],
) -> Iterator[Iterator[tuple[KLayer, _Step]]]:
    """Per batch, an iterator over the layers' :class:`_Step` (each dropped by the caller
    before the next is formed). Batches hold sequences of similar length
    (``problem.batches(by_length=True)``: the same groups in both passes). ``draws``: the
    sampled labels of each batch (drawn and appended by the first pass, reused by the next:
    the same columns at the same parameters, without the loss gradient)."""
    theta = problem.theta.detach().requires_grad_(True)
    generator = torch.Generator(device=theta.device).manual_seed(settings.seed)
    used: Fisher | None = None
    for index, batch in enumerate(problem.batches(desc=desc, by_length=True)):
        tokens = problem.task.token_mask(batch)
        with layer_calls({lay.name: lay.module for lay in layers}) as calls:
            out = problem.outputs(theta, batch)
        for name, called in calls.items():
            if len(called) != 1:
                raise ConfigError(
                    f"K-FAC/EK-FAC: layer {name!r} is called {len(called)} times per forward "
                    "pass; its factors need exactly one call (exclude it with params=[...])"
                )
        if used is None:
            used = resolve_fisher(settings.fisher, out[0].numel())
            log.info("%s: output-side factor from the %s Fisher", desc, used.value)
        drawn = used is Fisher.SAMPLED and index < len(draws)
        sample = used is Fisher.SAMPLED and not drawn
        ce_rows = problem.task.cross_entropy_rows(out, batch) if sample else None
        needs_grad = used is not Fisher.EXACT and not drawn and ce_rows is None
        grad = loss_gradient(problem.task, out, batch) if needs_grad else None
        _check_finite(problem, out, grad)
        if used is Fisher.SAMPLED:
            if ce_rows is not None:  # a declared cross-entropy: no gradient to find or check
                draws.append(draw_at_rows(out, ce_rows, settings.samples, generator))
            elif not drawn:
                assert grad is not None
                draws.append(draw_labels(out.detach(), grad, settings.samples, generator))
            columns = sampled_columns(out, draws[index])
        else:
            columns = output_columns(
                problem.task, out, batch, used, settings.samples, generator, grad
            )
        pulled = _pull_back_columns(out, [calls[lay.name][0][1] for lay in layers], columns)
        del out, columns, grad  # nothing of this batch outlives its layers' steps

        def steps(calls=calls, pulled=pulled, tokens=tokens) -> Iterator[tuple[KLayer, _Step]]:
            for i, lay in enumerate(layers):
                x = calls[lay.name][0][0].detach()
                mask = lay.position_mask(x, tokens)
                if mask is not None:
                    mask = lay.reached(mask, pulled[i])
                a = lay.patches(x, mask)
                es = [lay.out_grads(g.detach(), mask) for g in pulled[i]]
                pulled[i] = []  # free this layer's gradients as soon as they are used
                count = float(mask.sum()) if mask is not None else float(a.shape[0] * a.shape[1])
                rows = None
                if mask is not None:  # padding: cut where no example counts, skip elsewhere
                    *es, a, live = live_positions(mask.ne(0), *es, a)
                    flat = live.reshape(-1)
                    if int(flat.sum()) < LIVE_ROWS * flat.numel():
                        rows = flat.nonzero().squeeze(1)
                yield lay, _Step(a, es, count, rows)

        yield steps()


def _check_finite(problem: CurvatureProblem, out: torch.Tensor, grad: torch.Tensor | None) -> None:
    """Raise :class:`NonFiniteError` naming every training example with a non-finite loss
    or input (a forward scan of the data: this batch is a length group, its examples'
    indices are not at hand) when this batch's outputs are NaN or +inf or its loss
    gradients are not finite."""
    out = out.detach()
    if bool(torch.isfinite(out.sum())) and (grad is None or bool(torch.isfinite(grad.sum()))):
        return  # one pass each, no boolean copy
    # elementwise (a sum overflowed, or is -inf): -inf outputs are masked classes or tokens
    # (a finite loss), NaN and +inf are not; a loss gradient must be finite
    bad_out = bool((torch.isnan(out) | torch.isposinf(out)).any())
    if not bad_out and (grad is None or bool(torch.isfinite(grad).all())):
        return
    model = problem.model_at(problem.theta)
    source = problem.train
    idx = nonfinite_examples(
        lambda b: problem.task.loss(model, b),
        source,
        source.ranges(problem.batch_size),
        problem.theta.device,
    )
    raise nonfinite_error("model outputs or loss gradients in a K-FAC pass", idx, source)


#: the counted rows of a step are gathered before its covariance products when fewer than
#: this fraction of its (cut) positions count: the gather costs less than the skipped rows
LIVE_ROWS = 0.9


def _pull_back_columns(
    out: torch.Tensor, outs: list[torch.Tensor], columns: torch.Tensor
) -> list[list[torch.Tensor]]:
    """For each layer output in ``outs``, the pullbacks of every output-space column
    (C, *out.shape) from ``out``: one batched backward pass for all columns (vmap over the
    grad outputs), or, where that cannot run, one backward pass per column (the same
    values)."""
    if columns.shape[0] == 1:
        gs = torch.autograd.grad(out, outs, columns[0], retain_graph=False, allow_unused=True)
        return [[_or_zeros(g, o)] for g, o in zip(gs, outs, strict=True)]
    try:
        with warnings.catch_warnings():  # an op without a batching rule is looped: still exact
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            gs = torch.autograd.grad(out, outs, columns, retain_graph=True, is_grads_batched=True)
        return [list(g.unbind(0)) for g in gs]
    except RuntimeError:
        per_col = [torch.autograd.grad(out, outs, col, retain_graph=True) for col in columns]
        return [[cols[i] for cols in per_col] for i in range(len(outs))]


def _or_zeros(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if g is None else g


def fit_factors(
    problem: CurvatureProblem,
    layers: list[KLayer],
    settings: PassSettings,
    draws: list[Draw],
) -> None:
    """Fit every layer's ``A``, ``S`` and their eigenbases (K-FAC eigenvalues in ``lam``).
    ``draws``: filled with the sampled labels (for :func:`refit_eigenvalues`)."""
    for lay in layers:
        lay.A = lay.S = None
        lay.positions = 0.0
    for batch in _pseudo_grads(problem, layers, "K-FAC factors", settings, draws):
        for lay, step in batch:
            a2 = step.flat(step.a)
            if lay.A is None:
                lay.A = a2.new_zeros(a2.shape[1], a2.shape[1])
            lay.A.addmm_(a2.T, a2)
            for e in step.e:
                e2 = step.flat(e)
                if lay.S is None:
                    lay.S = e2.new_zeros(e2.shape[1], e2.shape[1])
                lay.S.addmm_(e2.T, e2)
            lay.positions += step.count
    for lay in layers:
        assert lay.A is not None and lay.S is not None
        if lay.positions == 0:
            raise ConfigError(f"K-FAC layer {lay.name!r} saw no token (every position masked)")
        lay.A, lay.S = lay.A / lay.positions, lay.S / problem.n
        la, ua = symmetric_eigh(lay.A, f"the input factor A of layer {lay.name!r}")
        ls, us = symmetric_eigh(lay.S, f"the output-gradient factor S of layer {lay.name!r}")
        # row-major, as when loaded from a cache or a saved fit: the same GEMMs, bit for bit
        lay.ua, lay.us = ua.contiguous(), us.contiguous()
        lay.lam = ls.clamp_min(0)[:, None] * la.clamp_min(0)[None, :]


#: entries of the rotated per-example gradients (examples × out × in') formed at once
_REFIT_ENTRIES = 1 << 22


def refit_eigenvalues(
    problem: CurvatureProblem, layers: list[KLayer], settings: PassSettings, draws: list[Draw]
) -> None:
    """EK-FAC: replace each layer's ``lam`` by the mean squared rotated per-example
    pseudo-gradient, accumulated in place (sampled labels from ``draws``, the factor
    pass's, when it ran)."""
    sums: dict[str, torch.Tensor] = {}
    for batch in _pseudo_grads(problem, layers, "EK-FAC eigenvalues", settings, draws):
        for lay, step in batch:
            assert lay.ua is not None and lay.us is not None
            a_rot = step.a @ lay.ua  # (b, P, in')
            sq = sums.get(lay.name)
            if sq is None:
                sq = sums[lay.name] = a_rot.new_zeros(lay.us.shape[0], a_rot.shape[2])
            if a_rot.shape[1] == 1:
                # one position (Linear): Σ_c Σ_b (e_cb ⊗ a_b)² = (Σ_c e_c²)ᵀ a², one GEMM
                e2 = sum((e[:, 0] @ lay.us) ** 2 for e in step.e)
                sq.addmm_(e2.T, a_rot[:, 0] ** 2)  # type: ignore[union-attr]
                continue
            chunk = max(1, _REFIT_ENTRIES // (lay.us.shape[0] * a_rot.shape[2]))
            for e in step.e:  # G_ic = Σ_p e ãᵀ per example, rotated, in chunks of examples
                e_rot = e @ lay.us
                for s in range(0, a_rot.shape[0], chunk):
                    g = torch.bmm(e_rot[s : s + chunk].transpose(1, 2), a_rot[s : s + chunk])
                    for gi in g:  # one example at a time: read once, while in cache
                        sq.addcmul_(gi, gi)
    for lay in layers:
        lay.lam = sums[lay.name] / problem.n
