"""The output side of K-FAC/EK-FAC: vectors in output space whose outer products average to
the curvature of the loss in the model's outputs.

K-FAC's output-gradient factor is ``S = E_i[Σ_c e_c e_cᵀ]`` with ``e_c = J_iᵀ r_c`` the
pullback of an output-space column ``r_c``; it describes the Gauss–Newton matrix when
``E[Σ_c r_c r_cᵀ] = ∇²_out ℓ_i``. :func:`output_columns` gives the columns, one of three ways
(:class:`Fisher`):

* ``EXACT``: the columns of a square root of each example's output Hessian (d columns for d
  outputs; exact Gauss–Newton, no sampling). Cheap for small classifiers; for a language
  model's logits (T·V outputs) the Hessian alone is T·V × T·V, so it is refused above
  :data:`EXACT_LIMIT` outputs.
* ``SAMPLED``: the true Fisher from labels sampled from the model's predictive distribution
  (``samples`` per example, seeded): ``r = √c (p − onehot(ŷ))``, ``ŷ ~ p``, whose
  expectation ``c (diag p − p pᵀ)`` is exactly the output Hessian of softmax cross-entropy;
  one backward pass per batch and sample. Needs an output loss that is (a positive multiple
  c of) softmax cross-entropy over the last axis of the outputs at every counted position —
  classification logits (batch, classes), a language model's (batch, T, vocab) — which is
  checked on every batch from the loss's own gradient (the EK-FAC eigenvalue pass reuses the
  factor pass's labels, :class:`Draw`) (``∇_o ℓ = c (p − onehot(y))``,
  rows that do not count have gradient 0).
* ``EMPIRICAL``: the gradient at the training labels (one column; the empirical Fisher,
  which is not the Gauss–Newton matrix away from a perfect fit; any output loss).

``fisher=None`` (the default of ``dt.KFAC``/``dt.EKFAC``): ``EXACT`` up to
:data:`EXACT_MAX_OUTPUTS` outputs per example, ``SAMPLED`` above (kronfluence's default for
language models).

References:
    Martens 2020, "New insights and perspectives on the natural gradient method" (the
    Fisher, Gauss–Newton and sampled labels); Kunstner et al. 2019, "Limitations of the
    empirical Fisher approximation"; Grosse et al. 2023 (sampled labels for EK-FAC on LLMs).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import hessian, vmap

from ..core.data import as_single_batch
from ..core.errors import ConfigError
from ..core.task import AbstractTask
from .base import symmetric_eigh


class Fisher(enum.Enum):
    """How K-FAC/EK-FAC's output-side factor is formed (see :mod:`datatrace.curvature.fisher`)."""

    #: square roots of the per-example output Hessians (exact Gauss–Newton)
    EXACT = "exact"
    #: labels sampled from the model's predictive distribution (true Fisher)
    SAMPLED = "sampled"
    #: gradients at the training labels (empirical Fisher)
    EMPIRICAL = "empirical"


#: ``fisher=None`` uses the exact output Hessian up to this many outputs per example (its
#: cost is one pulled-back column per output: 10 for a 10-class classifier, fine; 100 already
#: costs as much as 100 sampled passes), sampled labels above
EXACT_MAX_OUTPUTS = 100
#: the exact path refuses more outputs per example than this (a d × d Hessian per example
#: and d pulled-back columns: a language model's T·V outputs would need terabytes)
EXACT_LIMIT = 4096


def as_fisher(value: Fisher | str | None) -> Fisher | None:
    """A :class:`Fisher` from itself, its value (``"sampled"``) or ``None`` (automatic)."""
    if value is None or isinstance(value, Fisher):
        return value
    try:
        return Fisher(value)
    except ValueError:
        raise ConfigError(
            f"fisher must be None, 'exact', 'sampled' or 'empirical' (dt.Fisher), got {value!r}"
        ) from None


def resolve_fisher(fisher: Fisher | None, outputs_per_example: int) -> Fisher:
    """The Fisher used for outputs of this size: ``fisher``, or the automatic choice."""
    if fisher is None:
        return Fisher.EXACT if outputs_per_example <= EXACT_MAX_OUTPUTS else Fisher.SAMPLED
    if fisher is Fisher.EXACT and outputs_per_example > EXACT_LIMIT:
        raise ConfigError(
            f"fisher='exact' needs a {outputs_per_example:,} × {outputs_per_example:,} output "
            f"Hessian per example ({outputs_per_example:,} outputs, limit {EXACT_LIMIT:,}); use "
            "fisher='sampled' (labels sampled from the model, the default for large outputs)"
        )
    return fisher


def loss_gradient(task: AbstractTask, out: torch.Tensor, batch: Any) -> torch.Tensor:
    """The gradient of the summed training output loss in the outputs ``out`` (batch, ...)."""
    o = out.detach().requires_grad_(True)
    return torch.autograd.grad(task.output_loss(o, batch).sum(), o)[0]


def output_columns(
    task: AbstractTask,
    out: torch.Tensor,
    batch: Any,
    fisher: Fisher,
    samples: int,
    generator: torch.Generator | None,
    grad: torch.Tensor | None = None,
) -> torch.Tensor:
    """Columns ``r_c`` (C, *out.shape) with ``E[Σ_c r_c r_cᵀ]`` the curvature of each
    example's output loss in its outputs ``out`` (batch, ...). ``grad``: the loss's output
    gradient (:func:`loss_gradient`) when already computed."""
    out = out.detach()
    if fisher is Fisher.EXACT:
        return _hessian_roots(task, out, batch)
    if grad is None:
        grad = loss_gradient(task, out, batch)
    if fisher is Fisher.EMPIRICAL:
        return grad[None]
    return sampled_columns(out, draw_labels(out, grad, samples, generator))


def _hessian_roots(task: AbstractTask, out: torch.Tensor, batch: Any) -> torch.Tensor:
    """``R`` with ``R Rᵀ = ∇²_out ℓ_i`` per example (outputs flattened), (d, *out.shape)."""
    shape = out.shape[1:]
    d = math.prod(shape)

    def single(flat: torch.Tensor, example: Any) -> torch.Tensor:
        return task.output_loss(flat.reshape(shape)[None], as_single_batch(example))[0]

    h_out = vmap(hessian(single), in_dims=(0, 0))(out.reshape(len(out), d), batch)
    evals, evecs = symmetric_eigh(h_out, "the output Hessian of a K-FAC layer")
    roots = evecs * evals.clamp_min(0).sqrt()[:, None, :]  # (b, d, columns)
    return roots.permute(2, 0, 1).reshape(d, *out.shape)


@dataclass(frozen=True)
class Draw:
    """Sampled labels of one batch: the counted rows (flat positions) of the outputs, the
    loss's scale ``c`` at each, and ``labels`` (rows, samples). A second pass over the same
    batch at the same parameters reuses it (same columns, no loss gradient needed)."""

    rows: torch.Tensor
    scale: torch.Tensor
    labels: torch.Tensor


def draw_labels(
    out: torch.Tensor, grad: torch.Tensor, samples: int, generator: torch.Generator | None
) -> Draw:
    """Check that the loss's output gradient is ``c (softmax − onehot(y))`` at every counted
    position (rows with a non-zero gradient) and draw ``samples`` labels per counted row from
    the softmax (inverse transform sampling: one uniform per label, a binary search in the
    cumulative probabilities; no one-hot matrix is formed)."""
    vocab = out.shape[-1]
    if out.dim() < 2 or vocab < 2:
        raise _not_categorical(f"outputs of shape {tuple(out.shape)}")
    g = grad.reshape(-1, vocab)
    # (row reductions without indices are vectorised; argmin, any and aminmax are not)
    rows = ((g.amax(dim=1) > 0) | (g.amin(dim=1) < 0)).nonzero().flatten()
    g = g[rows]
    p = torch.softmax(out.reshape(-1, vocab)[rows], dim=-1)
    k = torch.arange(len(rows), device=p.device)
    g_min, label = torch.min(g, dim=1)  # the only negative entry of c (p − onehot(y))
    g_big = torch.maximum(-g_min, g.amax(dim=1))
    cdf = p.cumsum(dim=1)
    residual = p  # p − onehot(y), in place (p is not needed any more)
    residual[k, label] -= 1
    tiny = torch.finfo(p.dtype).tiny
    r_norm = torch.linalg.vector_norm(residual, dim=1).clamp_min(tiny)
    scale = torch.linalg.vector_norm(g, dim=1) / r_norm
    tol = 10 * math.sqrt(torch.finfo(p.dtype).eps)
    diff = residual.mul_(-scale[:, None]).add_(g)  # g − c (p − onehot(y))
    err = torch.maximum(diff.amax(dim=1), -diff.amin(dim=1))
    if bool((err > tol * g_big).any()):
        raise _not_categorical("an output loss whose gradient is not c·(softmax − onehot)")
    del residual, diff
    return _sample(cdf, rows, scale, samples, generator)


def draw_at_rows(
    out: torch.Tensor, rows: torch.Tensor, samples: int, generator: torch.Generator | None
) -> Draw:
    """:func:`draw_labels` where the task declares its loss a weight-1 cross-entropy at
    ``rows`` (:meth:`~datatrace.core.task.AbstractTask.cross_entropy_rows`): the same
    sampling, with no gradient to check."""
    vocab = out.shape[-1]
    cdf = torch.softmax(out.detach().reshape(-1, vocab)[rows], dim=-1).cumsum_(dim=1)
    scale = torch.ones(len(rows), dtype=cdf.dtype, device=cdf.device)
    return _sample(cdf, rows, scale, samples, generator)


def _sample(
    cdf: torch.Tensor,
    rows: torch.Tensor,
    scale: torch.Tensor,
    samples: int,
    generator: torch.Generator | None,
) -> Draw:
    """``samples`` labels per row from the cumulative probabilities ``cdf`` (rows, vocab)
    by inverse transform sampling: one uniform per label, a binary search."""
    u = torch.rand(len(rows), samples, generator=generator, dtype=cdf.dtype, device=cdf.device)
    labels = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_max_(cdf.shape[1] - 1)
    return Draw(rows, scale, labels)


def sampled_columns(out: torch.Tensor, draw: Draw) -> torch.Tensor:
    """Sampled-label columns ``√c (p − onehot(ŷ)) / √samples`` (samples, *out.shape), zero
    at the rows that do not count."""
    vocab = out.shape[-1]
    samples = draw.labels.shape[1]
    flat = out.detach().reshape(-1, vocab)
    factor = flat.new_zeros(flat.shape[0])
    factor[draw.rows] = (draw.scale / samples).sqrt()
    p = torch.softmax(flat, dim=-1).mul_(factor[:, None])
    cols = []
    for s in range(samples):
        col = p.clone() if s < samples - 1 else p
        col.index_put_((draw.rows, draw.labels[:, s]), -factor[draw.rows], accumulate=True)
        cols.append(col)
    return (torch.stack(cols) if samples > 1 else cols[0][None]).reshape(samples, *out.shape)


def _not_categorical(what: str) -> ConfigError:
    return ConfigError(
        f"fisher='sampled' samples labels from a softmax over the last axis of the task's "
        f"outputs, with cross-entropy as the output loss; got {what}. Use fisher='exact' "
        "(small outputs) or fisher='empirical'"
    )
