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
  checked on every batch from the loss's own gradient (``∇_o ℓ = c (p − onehot(y))``,
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
    return _sampled(out, grad, samples, generator)


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


def _sampled(
    out: torch.Tensor, grad: torch.Tensor, samples: int, generator: torch.Generator | None
) -> torch.Tensor:
    """Sampled-label columns ``√c (p − onehot(ŷ)) / √samples`` at every counted position
    (labels drawn by inverse transform sampling: one uniform per label, a binary search in
    the cumulative probabilities; no one-hot matrix is formed)."""
    vocab = out.shape[-1]
    if out.dim() < 2 or vocab < 2:
        raise _not_categorical(f"outputs of shape {tuple(out.shape)}")
    g = grad.reshape(-1, vocab)
    counted = (g != 0).any(dim=1)
    rows = counted.nonzero().flatten()
    g = g[rows]
    p = torch.softmax(out.reshape(-1, vocab)[rows], dim=-1)
    k = torch.arange(len(rows), device=p.device)
    label = g.argmin(dim=1)  # the only negative entry of c (p − onehot(y))
    residual = p.clone()
    residual[k, label] -= 1
    scale = g.norm(dim=1) / residual.norm(dim=1).clamp_min(torch.finfo(p.dtype).tiny)
    tol = 10 * math.sqrt(torch.finfo(p.dtype).eps)
    err = residual.mul_(-scale[:, None]).add_(g).abs_().amax(dim=1)
    if bool((err > tol * g.abs().amax(dim=1)).any()):
        raise _not_categorical("an output loss whose gradient is not c·(softmax − onehot)")
    del residual, g
    cdf = p.cumsum(dim=1)
    u = torch.rand(len(rows), samples, generator=generator, dtype=p.dtype, device=p.device)
    drawn = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_max_(vocab - 1)  # (k, S)
    del cdf
    factor = (scale / samples).sqrt()
    cols = out.new_zeros(samples, counted.numel(), vocab)
    for s in range(samples):
        u_s = p * factor[:, None]
        u_s[k, drawn[:, s]] -= factor
        cols[s, rows] = u_s
    return cols.reshape(samples, *out.shape)


def _not_categorical(what: str) -> ConfigError:
    return ConfigError(
        f"fisher='sampled' samples labels from a softmax over the last axis of the task's "
        f"outputs, with cross-entropy as the output loss; got {what}. Use fisher='exact' "
        "(small outputs) or fisher='empirical'"
    )
