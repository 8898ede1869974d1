"""Inner products of factored and indexed features (:mod:`datatrace.features.featurizer`)
between every query and training example, without a features array of formed gradients:

* :func:`layer_products`: a factored Linear/Conv1D layer's, by the cheaper of
  :func:`token_products` (token pairs) and :func:`formed_products` (both sides' gradients
  formed a few at a time in cache, then multiplied);
* :func:`indexed_products`: an indexed Embedding's, its gradients scattered onto only the
  rows the queries use.

Each is tested in float64 against the dot products of the formed gradients.
"""

from __future__ import annotations

import math

import torch

#: entries of a (n_q·N) × (n_g·N) token-product matrix computed at once
_PAIR_CHUNK = 1 << 24
#: bytes of the buffers that :func:`formed_products` forms gradients into: small enough to
#: stay in cache between being formed and being multiplied
FORM_SCRATCH = 256 << 20
#: training examples formed per product in :func:`formed_products` (fewer when the
#: scratch is short): larger products run faster, up to about this many rows
FORM_CHUNK = 32


def layer_products(
    qe: torch.Tensor,
    ge: torch.Tensor,
    qa: torch.Tensor,
    ga: torch.Tensor,
    tq: int,
    tg: int,
) -> torch.Tensor:
    """A factored layer's inner products for every (query, training) pair, (n_q, n_g),
    by the cheaper of two routes (both exact; the choice changes only round-off):

    * :func:`token_products`: ``Σ_{t,s} (e_t·e'_s)(ã_t·ã'_s)``, ``N_q·N_g·(out + in')``
      per pair (N: the tokens of the layout, padding included);
    * :func:`formed_products`: each side's gradients ``Σ_t e_t ãᵀ_t`` formed over their
      non-zero rows, ``out·in'`` per pair plus the forming (once per example and block of
      queries). For sequences of tens of tokens through wide layers this is the cheaper
      one by far; it holds at most :data:`FORM_SCRATCH` of formed gradients (or one of
      each side, when a single gradient is larger).

    ``tq``/``tg``: each side's N (queries may be longer than the training layout).
    """
    if tq == tg == 1:
        return token_products(qe, ge, qa, ga, tq, tg)
    nq, ng = qe.shape[0], ge.shape[0]
    n_out, n_in = qe.shape[1] // tq, qa.shape[1] // tq
    pairs = nq * ng * tq * tg * (n_out + n_in)
    q_live = _live_rows(qe.reshape(nq, tq, n_out))
    g_live = _live_rows(ge.reshape(ng, tg, n_out))
    q_step, _ = _form_steps(nq, ng, n_out * n_in * qe.element_size())
    forming = -(-nq // q_step) * sum(map(abs, g_live)) + sum(map(abs, q_live))
    if (forming + nq * ng) * n_out * n_in < pairs:
        return formed_products(qe, ge, qa, ga, tq, tg, q_live, g_live)
    return token_products(qe, ge, qa, ga, tq, tg)


def token_products(
    qe: torch.Tensor,
    ge: torch.Tensor,
    qa: torch.Tensor,
    ga: torch.Tensor,
    tq: int,
    tg: int,
) -> torch.Tensor:
    """``Σ_{t,s} (E_q E_gᵀ)[t,s] ∘ (A_q A_gᵀ)[t,s]`` for every (query, training) pair,
    (n_q, n_g), in chunks of training rows (never forming a per-example gradient)."""
    if tq == tg == 1:
        return (qe @ ge.T) * (qa @ ga.T)
    nq, ng = qe.shape[0], ge.shape[0]
    qe2, qa2 = qe.reshape(nq * tq, -1), qa.reshape(nq * tq, -1)
    ge2, ga2 = ge.reshape(ng * tg, -1), ga.reshape(ng * tg, -1)
    step = max(1, _PAIR_CHUNK // max(1, nq * tq * tg))
    parts = []
    for s in range(0, ng, step):
        rows = slice(s * tg, min(ng, s + step) * tg)
        prod = (qe2 @ ge2[rows].T) * (qa2 @ ga2[rows].T)
        parts.append(prod.view(nq, tq, -1, tg).sum((1, 3)))
    return torch.cat(parts, 1)


def formed_products(
    qe: torch.Tensor,
    ge: torch.Tensor,
    qa: torch.Tensor,
    ga: torch.Tensor,
    tq: int,
    tg: int,
    q_live: list[int] | None = None,
    g_live: list[int] | None = None,
) -> torch.Tensor:
    """``⟨Σ_t e_t ãᵀ_t, Σ_s e'_s ã'ᵀ_s⟩`` for every (query, training) pair, (n_q, n_g):
    the queries' gradients formed a block at a time, then the training examples'
    :data:`FORM_CHUNK` at a time, each block multiplied as soon as it is formed, all in two
    reused buffers of :data:`FORM_SCRATCH` bytes together. Forming the same gradients into
    a features array first writes them to memory and reads them back (several times
    the arithmetic's cost); here they stay in cache. Each example's sum runs over its
    non-zero output-gradient rows only (``q_live``/``g_live``: how many, negated where
    they are not the first rows; from :func:`_live_rows` when not given)."""
    nq, ng = qe.shape[0], ge.shape[0]
    eq, aq = qe.reshape(nq, tq, -1), qa.reshape(nq, tq, -1)
    eg, ag = ge.reshape(ng, tg, -1), ga.reshape(ng, tg, -1)
    n_out, n_in = eq.shape[2], aq.shape[2]
    q_live = _live_rows(eq) if q_live is None else q_live
    g_live = _live_rows(eg) if g_live is None else g_live
    q_step, g_step = _form_steps(nq, ng, n_out * n_in * qe.element_size())
    out = torch.zeros(nq, ng, dtype=qe.dtype, device=qe.device)
    q_buf = qe.new_empty(q_step, n_out * n_in)
    g_buf = qe.new_empty(g_step, n_out * n_in)
    for q0 in range(0, nq, q_step):
        q1 = min(q0 + q_step, nq)
        q = _form_rows(q_buf[: q1 - q0], eq[q0:q1], aq[q0:q1], q_live[q0:q1])
        for g0 in range(0, ng, g_step):
            g1 = min(g0 + g_step, ng)
            g = _form_rows(g_buf[: g1 - g0], eg[g0:g1], ag[g0:g1], g_live[g0:g1])
            out[q0:q1, g0:g1].addmm_(q, g.T)
    return out


def indexed_products(
    qi: torch.Tensor, qe: torch.Tensor, gi: torch.Tensor, ge: torch.Tensor, tq: int, tg: int
) -> torch.Tensor:
    """An Embedding's inner products ``Σ_{t,s} [i_t = i'_s] e_t·e'_s`` for every (query,
    training) pair, (n_q, n_g), from ids ``qi`` (n_q, N_q) and output gradients ``qe``
    (n_q, N_q·dim) (likewise ``gi``, ``ge``): both sides' gradients formed over the rows
    of the ids a block of queries uses (never the whole vocabulary), a block at a time in
    buffers of at most :data:`FORM_SCRATCH` bytes, and multiplied. A training token
    whose id no query of the block uses adds nothing."""
    nq, ng = qi.shape[0], gi.shape[0]
    dim = qe.shape[1] // tq
    eq, eg = qe.reshape(nq, tq, dim), ge.reshape(ng, tg, dim)
    q_live, g_live = eq.ne(0).any(-1), eg.ne(0).any(-1)  # padding: id -1, zero gradient
    q_ids, g_ids = qi.long(), gi.long()
    item = qe.element_size()
    # a block of b queries uses at most b·N_q rows: (b·N_q)·b·dim numbers within half
    q_step = max(1, min(nq, math.isqrt(FORM_SCRATCH // 2 // max(1, tq * dim * item))))
    out = torch.zeros(nq, ng, dtype=qe.dtype, device=qe.device)
    for q0 in range(0, nq, q_step):
        q1 = min(q0 + q_step, nq)
        rows = torch.unique(q_ids[q0:q1][q_live[q0:q1]])  # sorted
        if len(rows) == 0:
            continue
        q = _scatter_rows(eq[q0:q1], q_ids[q0:q1], q_live[q0:q1], rows)
        g_step = max(1, min(ng, FORM_CHUNK, FORM_SCRATCH // 2 // (len(rows) * dim * item)))
        for g0 in range(0, ng, g_step):
            g1 = min(g0 + g_step, ng)
            g = _scatter_rows(eg[g0:g1], g_ids[g0:g1], g_live[g0:g1], rows)
            out[q0:q1, g0:g1].addmm_(q, g.T)
    return out


def _scatter_rows(
    e: torch.Tensor, ids: torch.Tensor, live: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """(b, len(rows)·dim): each example's gradient restricted to the sorted ``rows`` of
    the embedding, ``Σ_t onehot(ids_t) e_tᵀ`` for its live tokens whose id is among them."""
    b, _, dim = e.shape
    at = torch.searchsorted(rows, ids).clamp_(max=len(rows) - 1)
    hit = live & (rows[at] == ids)
    flat = (torch.arange(b, device=e.device)[:, None] * len(rows) + at)[hit]
    out = e.new_zeros(b * len(rows), dim)
    out.index_add_(0, flat, e[hit])
    return out.view(b, -1)


def _form_steps(nq: int, ng: int, row_bytes: int) -> tuple[int, int]:
    """(queries, training examples) formed at once by :func:`formed_products`: up to
    :data:`FORM_CHUNK` training examples (at most half the scratch), the queries in the
    rest (at least one each)."""
    g_step = max(1, min(ng, FORM_CHUNK, FORM_SCRATCH // 2 // row_bytes))
    q_step = max(1, min(nq, (FORM_SCRATCH - g_step * row_bytes) // row_bytes))
    return q_step, g_step


def _live_rows(e: torch.Tensor) -> list[int]:
    """Per example of ``e`` (n, N, out): how many rows are non-zero, negated where they are
    not its first rows (a right-padded sequence's are; 0: a zero gradient)."""
    live = e.ne(0).any(-1)
    counts = live.sum(1)
    first = torch.arange(live.shape[1], device=live.device)[None, :] < counts[:, None]
    return torch.where((live == first).all(1), counts, -counts).tolist()


def _form_rows(
    buf: torch.Tensor, e: torch.Tensor, a: torch.Tensor, live: list[int]
) -> torch.Tensor:
    """``buf[k] := Σ_t e[k, t] a[k, t]ᵀ`` flattened, over each example's live rows."""
    n_out, n_in = e.shape[2], a.shape[2]
    for k, rows in enumerate(live):
        mat = buf[k].view(n_out, n_in)
        if rows == 0:
            mat.zero_()
            continue
        if rows > 0:
            ek, ak = e[k, :rows], a[k, :rows]
        else:
            keep = e[k].ne(0).any(-1).nonzero().squeeze(1)
            ek, ak = e[k].index_select(0, keep), a[k].index_select(0, keep)
        torch.mm(ek.t(), ak, out=mat)
    return buf
