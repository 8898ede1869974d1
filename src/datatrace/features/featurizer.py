"""Gradient features of one example set at one checkpoint, and the inner products between them.

A :class:`GradientFeatures` is the resolved featurizer for one task: which parameters,
which of them go through the factored ``nn.Linear`` path (input activation ⊗ output
gradient, never forming the full gradient), and the optional random projection. Features
are dicts of tensors with a leading example dimension:

* ``"proj"``: the projected gradient, (batch, k), when a projection is set;
* otherwise ``"dense"``: the flattened gradient of the other parameters, (batch, p); for
  each factored layer over N tokens ``"<layer>.a"`` (batch, N·(in[+1 for the bias])) and
  ``"<layer>.e"`` (batch, N·out), token-major; for each indexed Embedding ``"<layer>.i"``
  (batch, N: its tokens' ids, -1 for padding) and ``"<layer>.e"`` (batch, N·dim).

``⟨φ(z), φ(z')⟩`` is :meth:`GradientFeatures.pairwise`; its float64 twin is the dot product
of flattened per-example gradients from :func:`datatrace.grads.per_example_grads_loop`.

The planning half (which parameter goes where, the layout, the work per example, the probe
on the first batch) is :class:`~datatrace.features.planning.FeaturePlanning`; the slot's
interface is :class:`~datatrace.features.base.AbstractFeaturizer`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..core.errors import ConfigError, DataError, DatatraceError
from ..core.loop import TrailingPadding, check_finite
from ..core.task import AbstractTask
from ..grads.per_example import (
    bound_model,
    per_example_grads,
    per_example_grads_loop,
    select_parameters,
    value_fn,
)
from ..grads.rules import (
    Grad,
    Term,
    capture,
    form,
    form_into,
    hooked_grads,
)
from .base import AbstractFeaturizer, Features
from .planning import FeaturePlanning
from .spec import FeatureSpec

log = logging.getLogger("datatrace")


class GradientFeatures(FeaturePlanning, AbstractFeaturizer):
    """The featurizer of :class:`FeatureSpec` bound to a task's model.

    Per-example gradients of the layers with a hook rule (:mod:`datatrace.grads.rules`:
    Linear on any ``(B, ..., in)`` input, transformers' Conv1D, Conv2d, Embedding,
    LayerNorm; tied parameters get the sum of their layers' rules) come from one batched
    backward pass; the other parameters' from vmap, else a per-example loop (logged at
    WARNING with its cost). Unprojected, a Linear/Conv1D layer is kept factored (its
    inputs and output gradients per token, ``"<layer>.a"``/``"<layer>.e"``) when they are
    smaller than its gradient (``N(out + in') < out·in'`` for N tokens; always for N = 1),
    else its gradient is formed per example. A batch's padding after every example's last
    real token is cut before the model sees it (:class:`~datatrace.core.loop.TrailingPadding`:
    checked on the first batch it cuts). Projected,
    every Linear/Conv1D/Embedding weight (and Conv2d with ``kronecker=True``) goes through
    the Kronecker projection from its factors, the rest through the dense one.
    """

    def __init__(self, spec: FeatureSpec, task: AbstractTask) -> None:
        self.spec = spec
        self.task = task
        module = task.model
        self.names = select_parameters(module, spec.params)
        shapes = dict(module.named_parameters())
        self.shapes = {n: tuple(shapes[n].shape) for n in self.names}
        self.sizes = [shapes[n].numel() for n in self.names]
        self._skip: list[str] = []
        self._plan()
        if spec.factored and not self._candidates():
            raise ConfigError(
                "factored=True needs selected parameters that belong to nn.Linear (or "
                "transformers Conv1D) layers (and layer_hooks=True)"
            )
        #: factored layers' tokens per example (decided on the first batch)
        self.tokens: dict[str, int] = {}
        self._set_projections()
        self._use_vmap = spec.vmap is not False
        self._probed = False
        self._warned_loop = False
        self._warned_regen = False
        self._activations = 0  # per example, measured on the first batch
        self._padding = TrailingPadding(task)

    # -- computing ------------------------------------------------------------------------

    def compute(
        self,
        params: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor],
        batch: Any,
        measurement: bool,
        offset: int = 0,
        out: Features | None = None,
    ) -> Features:
        """Features of one batch, (batch, width) each; ``offset`` = index of its first example
        (in ``feature_dtype`` when one is set). With ``out`` (e.g. rows of the feature
        store), the dense gradients are formed straight into it: no per-batch copy.
        Measurement features of sequences longer than the training layout's have wider
        factored arrays (more tokens); then new arrays are returned, not ``out``."""
        dtype = next(iter(params.values())).dtype if params else None
        cast = self.spec.feature_dtype is not None and self.spec.feature_dtype != dtype
        feats = self._compute(params, buffers, batch, measurement, offset, None if cast else out)
        if cast:
            feats = {k: v.to(self.spec.feature_dtype) for k, v in feats.items()}
        if out is None or any(out[k].shape != v.shape for k, v in feats.items()):
            return feats  # (queries with more tokens than ``out`` holds: wider arrays)
        for k, v in feats.items():
            if out[k].data_ptr() != v.data_ptr():
                out[k].copy_(v)
        return out

    def _compute(
        self,
        params: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor],
        batch: Any,
        measurement: bool,
        offset: int,
        out: Features | None = None,
    ) -> Features:
        model = bound_model(self.task.model, {**buffers, **params})
        self.task.check_batch(model, batch, offset)
        if not self._probed:  # at the full length: the factored layers' tokens are sized
            self._probe(params, buffers, batch)
        value = value_fn(self.task, measurement)
        kind = "measurement" if measurement else "loss"
        batch = self._padding(batch, lambda b: value(model, b), kind)
        grads, values = self._dense_grads(params, buffers, batch, measurement)
        contrib: dict[str, list[Grad]] = {}
        if self.plan.layers:
            modules = {lay: self.task.model.get_submodule(lay) for lay in self.plan.layers}
            calls, values = capture(self.task, params, buffers, batch, modules, measurement)
            contrib = hooked_grads(self.plan, self.task.model, calls)
        assert values is not None
        n = len(values)
        rows = [*grads.values()]
        rows += [t for cs in contrib.values() for c in cs for t in _tensors(c)]
        check_finite(values, rows, offset, kind)
        if self.projector is not None:
            return {"proj": self._project(contrib, grads, n)}
        feats: Features = {}
        factored = self.layers
        if self.dense_names:
            feats["dense"] = self._dense_into(
                out["dense"] if out is not None else None, grads, contrib, values
            )
        for lay, (w, b) in factored.items():
            ka, ke = f"{lay}.a", f"{lay}.e"
            dests = (out[ka], out[ke]) if out is not None else (None, None)
            feats[ka], feats[ke] = self._factors(lay, w, b, contrib, n, offset, measurement, *dests)
        for lay, name in self.indexed.items():
            ki, ke = f"{lay}.i", f"{lay}.e"
            dests = (out[ki], out[ke]) if out is not None else (None, None)
            feats[ki], feats[ke] = self._indexed_factors(
                lay, contrib.get(name, []), n, offset, measurement, *dests
            )
        return feats

    def _dense_into(
        self,
        dest: torch.Tensor | None,
        grads: dict[str, torch.Tensor],
        contrib: dict[str, list[Grad]],
        values: torch.Tensor,
    ) -> torch.Tensor:
        """The flattened gradients of :attr:`dense_names`, (n, width), each parameter's
        formed straight into its columns of ``dest`` (allocated when ``None``): no
        per-parameter tensors concatenated, no sum of a tied weight's parts in a temporary
        (its slow twin: :func:`~datatrace.grads.per_example.flatten_grads` of
        :meth:`_formed`, tested to agree)."""
        n = len(values)
        names = self.dense_names
        if dest is None:
            p = dict(self.task.model.named_parameters())[names[0]]
            width = sum(math.prod(self.shapes[k]) for k in names)
            dest = torch.empty(n, width, dtype=p.dtype, device=p.device)
        start = 0
        for name in names:
            shape = self.shapes[name]
            stop = start + math.prod(shape)
            view = dest[:, start:stop].view(n, *shape)
            start = stop
            if name in grads:
                view.copy_(grads[name].detach().reshape(n, *shape))  # never a graph in dest
            elif contrib.get(name):
                form_into(view, contrib[name])
            else:
                view.zero_()  # its layers were not called
        return dest

    def _formed(self, name: str, parts: list[Grad], n: int) -> torch.Tensor:
        """A hooked parameter's per-example gradient (n, *shape): its contributions summed
        (zeros when its layers were not called)."""
        shape = self.shapes[name]
        out = None
        for part in parts:
            g = form(part, shape)
            out = g if out is None else out + g
        if out is None:
            p = dict(self.task.model.named_parameters())[name]
            out = torch.zeros(n, *shape, dtype=p.dtype, device=p.device)
        return out

    def _factors(
        self,
        lay: str,
        w: bool,
        b: bool,
        contrib: dict[str, list[Grad]],
        n: int,
        offset: int,
        measurement: bool,
        dest_a: torch.Tensor | None = None,
        dest_e: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A factored layer's ``a`` (n, N·in') and ``e`` (n, N·out): its calls' tokens
        concatenated, a 1 appended to each input for the bias, zero-padded to the N of the
        first batch (zero tokens add nothing), or to this batch's own when it has more
        and these are measurement features (queries of any length); written into
        ``dest_a``/``dest_e`` (e.g. rows of a feature store) when they have that width."""
        n_in, n_out = self._dims(lay)
        tokens = self.tokens[lay]
        if not w:  # bias only: Σ_n e_n is one token with input 1
            e = self._formed(self._param_of(lay, "bias"), contrib[self._param_of(lay, "bias")], n)
            return torch.ones_like(e[:, :1]), e
        terms = [t for t in contrib[self._param_of(lay, "weight")] if isinstance(t, Term)]
        if not terms:
            p = dict(self.task.model.named_parameters())[self._param_of(lay, "weight")]
            z = torch.zeros(n, tokens, 1, dtype=p.dtype, device=p.device)
            return z.expand(n, tokens, n_in).reshape(n, -1), z.expand(n, tokens, n_out).reshape(
                n, -1
            )
        have = sum(t.left.shape[1] for t in terms)
        tokens = self._fit_tokens(lay, have, offset, n, measurement)
        a = _rows_into(dest_a, n, tokens * n_in, terms[0].right)
        e = _rows_into(dest_e, n, tokens * n_out, terms[0].right)
        a3, e3 = a.view(n, tokens, n_in), e.view(n, tokens, n_out)
        pos = 0
        for t in terms:  # the calls' tokens one after another, written in place
            k = t.left.shape[1]
            e3[:, pos : pos + k].copy_(t.left)
            a3[:, pos : pos + k, : t.right.shape[2]].copy_(t.right)
            pos += k
        if b:
            a3[:, :have, -1] = 1
        e3[:, have:] = 0
        a3[:, have:] = 0
        return a, e

    def _fit_tokens(self, lay: str, have: int, offset: int, n: int, measurement: bool) -> int:
        """The tokens a batch's factored or indexed arrays of layer ``lay`` take: the
        layout's, or the batch's own ``have`` when more (measurement features: queries of
        any length; training data must fit the layout)."""
        tokens = self.tokens[lay]
        if measurement:
            return max(tokens, have)
        if have > tokens:
            raise DataError(
                f"examples {offset}..{offset + n - 1} give layer {lay!r} {have} tokens, more "
                f"than the {tokens} its factored features were sized for on the first batch; "
                "pad every example to one length (tokenizer padding='max_length') or pass "
                "factored=False"
            )
        return tokens

    def _indexed_factors(
        self,
        lay: str,
        parts: list[Grad],
        n: int,
        offset: int,
        measurement: bool,
        dest_i: torch.Tensor | None = None,
        dest_e: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """An indexed Embedding's ids ``i`` (n, N), as floats (exact: checked at planning),
        and output gradients ``e`` (n, N·dim): its calls' tokens one after another, padded
        with id -1 and zero gradients (which add nothing); written into
        ``dest_i``/``dest_e`` when they have that width."""
        dim = self._row_width(lay)
        terms = [t for t in parts if isinstance(t, Term)]
        have = sum(t.left.shape[1] for t in terms)
        tokens = self._fit_tokens(lay, have, offset, n, measurement)
        p = dict(self.task.model.named_parameters())[self._index_candidates[lay]]
        i, e = _rows_into(dest_i, n, tokens, p), _rows_into(dest_e, n, tokens * dim, p)
        e3 = e.view(n, tokens, dim)
        pos = 0
        for t in terms:
            k = t.left.shape[1]
            i[:, pos : pos + k] = t.left
            e3[:, pos : pos + k].copy_(t.right)
            pos += k
        i[:, pos:] = -1
        e3[:, pos:] = 0
        return i, e

    def _project(
        self, contrib: dict[str, list[Grad]], grads: dict[str, torch.Tensor], n: int
    ) -> torch.Tensor:
        assert self.projector is not None
        k = self.projector.spec.dim
        out = None
        if self.units:
            assert self.kronecker_projector is not None
            # every unit's r m×m blocks summed in place into one (batch, r·m²) buffer
            acc = None
            for j, (w, b, _, _) in enumerate(self.units):
                terms = [t for t in contrib.get(w, []) if isinstance(t, Term)] if w else []
                bias = self._formed(b, contrib[b], n) if b else None
                acc = self.kronecker_projector.project_terms(j, terms, bias, n, acc)
            assert acc is not None
            out = acc.view(n, -1)[:, :k]
        for name in self.dense_proj_names:
            if name in contrib:
                grads[name] = self._formed(name, contrib[name], n)
        blocks = [grads[name].reshape(n, -1) for name in self.dense_proj_names]
        if blocks:
            dense = self.projector(blocks)
            out = dense if out is None else out.add_(dense)
            if self.projector.regenerated and not self._warned_regen:
                self._warned_regen = True
                log.warning(
                    "the dense random projection of %d parameter entries (%s) does not fit "
                    "its cache: %d entries of P are regenerated from their seeds at every "
                    "batch (slow); select fewer parameters (params=...) or use layers with "
                    "hook rules, whose weights are projected from their factors",
                    sum(math.prod(self.shapes[n]) for n in self.dense_proj_names),
                    self.dense_proj_names[:4],
                    self.projector.regenerated,
                )
        assert out is not None
        return out if out.is_contiguous() else out.contiguous()

    def _dense_grads(
        self,
        params: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor],
        batch: Any,
        measurement: bool,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        names = self.vmap_names
        if not names:
            return {}, None
        if self._use_vmap:
            try:
                return per_example_grads(self.task, params, buffers, batch, names, measurement)
            except DatatraceError:
                raise  # the user's data or settings, not vmap
            except Exception as exc:
                if self.spec.vmap:
                    raise
                self._use_vmap = False
                self._warn_loop(f"vmap could not trace this model ({type(exc).__name__}: {exc})")
        return per_example_grads_loop(self.task, params, buffers, batch, names, measurement)

    def scoring(self) -> contextlib.AbstractContextManager[None]:
        return self._scoring()

    @contextlib.contextmanager
    def _scoring(self) -> Iterator[None]:
        """The matmul precision of scoring: TF32 on CUDA when ``tf32`` is set (restored
        after)."""
        if not self.spec.tf32:
            yield
            return
        matmul = torch.backends.cuda.matmul
        # torch ≥ 2.9 names the setting fp32_precision; older releases allow_tf32
        key, value = (
            ("fp32_precision", "tf32")
            if hasattr(matmul, "fp32_precision")
            else ("allow_tf32", True)
        )
        old = getattr(matmul, key)
        setattr(matmul, key, value)
        try:
            yield
        finally:
            setattr(matmul, key, old)

    def pairwise(self, q: Features, g: Features) -> torch.Tensor:
        """Inner products ``⟨φ(q_j), φ(g_i)⟩``, shape (n_q, n_g). A factored layer's are
        ``Σ_{t,s} (e_t·e'_s)(ã_t·ã'_s)`` over token pairs, or ``⟨Σ_t e_t ãᵀ_t, Σ_s e'_s
        ã'ᵀ_s⟩`` from gradients formed a few at a time, whichever costs less
        (:func:`layer_products`)."""
        out = None
        for key in q:
            if key.endswith(".a"):
                continue
            if key.endswith(".i"):
                continue
            if key.endswith(".e"):
                lay = key[:-2]
                tokens = self._token_counts(lay, q[key], g[key])
                if lay + ".i" in q:
                    term = indexed_products(q[lay + ".i"], q[key], g[lay + ".i"], g[key], *tokens)
                else:
                    term = layer_products(q[key], g[key], q[lay + ".a"], g[lay + ".a"], *tokens)
            else:
                term = q[key] @ g[key].T
            out = term if out is None else out + term
        assert out is not None
        return out

    def pairwise_diagonal(self, q: Features, g: Features) -> torch.Tensor:
        """``⟨φ(q_i), φ(g_i)⟩`` row by row, shape (n,)."""
        out = None
        for key in g:
            if key.endswith((".a", ".i")):
                continue
            if key.endswith(".e"):
                lay = key[:-2]
                tq, tg = self._token_counts(lay, q[key], g[key])
                qe, ge = _tokens(q[key], tq), _tokens(g[key], tg)
                if lay + ".i" in g:  # the same row where the ids are equal
                    same = q[lay + ".i"][:, :, None] == g[lay + ".i"][:, None, :]
                    term = torch.bmm(qe, ge.transpose(1, 2)) * same
                else:
                    qa, ga = _tokens(q[lay + ".a"], tq), _tokens(g[lay + ".a"], tg)
                    term = torch.bmm(qe, ge.transpose(1, 2)) * torch.bmm(qa, ga.transpose(1, 2))
                term = term.sum((1, 2))
            else:
                term = (q[key] * g[key]).sum(1)
            out = term if out is None else out + term
        assert out is not None
        return out

    def sqnorm(self, g: Features) -> torch.Tensor:
        """Squared norms ``‖φ(g_i)‖²``, shape (n_g,)."""
        return self.pairwise_diagonal(g, g)

    def _token_counts(self, lay: str, qe: torch.Tensor, ge: torch.Tensor) -> tuple[int, int]:
        """Tokens of a factored layer's two feature arrays ``e`` (n, N·out): the training
        layout's, or more for queries longer than any training sequence."""
        width = self._row_width(lay)
        return qe.shape[1] // width, ge.shape[1] // width


def _rows_into(dest: torch.Tensor | None, n: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """``dest`` (e.g. rows of a feature store) when it is a contiguous (n, width) array,
    else a new one like ``like``."""
    if dest is not None and dest.is_contiguous() and dest.shape == (n, width):
        return dest
    return like.new_empty(n, width)


def _tokens(x: torch.Tensor, tokens: int) -> torch.Tensor:
    return x.reshape(x.shape[0], tokens, -1)


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


def _tensors(part: Grad) -> list[torch.Tensor]:
    """The floating-point tensors of a contribution (for the non-finite check)."""
    if isinstance(part, Term):
        return [part.right] if part.indexed else [part.left, part.right]
    return [part]


def flat_dense(feats: Sequence[Features]) -> Features:
    """Concatenate feature dicts along the example dimension."""
    return {k: torch.cat([f[k] for f in feats], dim=0) for k in feats[0]}
