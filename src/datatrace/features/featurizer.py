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

``⟨φ(z), φ(z')⟩`` is :meth:`GradientFeatures.pairwise` (factored and indexed layers' by
:mod:`datatrace.features.products`); its float64 twin is the dot product of flattened
per-example gradients from :func:`datatrace.grads.per_example_grads_loop`.

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
from .products import indexed_products, layer_products
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
        batch = self._padding(
            batch,
            lambda b, p: value(bound_model(self.task.model, {**buffers, **p}), b),
            kind,
            params,
        )
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
        concatenated, a 1 appended to each input for the bias, zero-padded to the layout's
        N (zero tokens add nothing), or to this batch's own when it has more
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
                f"than the {tokens} its factored features were sized for on the training "
                "example with the most entries; pad every example to one length (tokenizer "
                "padding='max_length': padding is cut before the model) or pass factored=False"
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
        p = self.task.model.get_submodule(lay).weight
        assert isinstance(p, torch.Tensor)
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
            if key.endswith((".a", ".i")):
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


def _tensors(part: Grad) -> list[torch.Tensor]:
    """The floating-point tensors of a contribution (for the non-finite check)."""
    if isinstance(part, Term):
        return [part.right] if part.indexed else [part.left, part.right]
    return [part]


def flat_dense(feats: Sequence[Features]) -> Features:
    """Concatenate feature dicts along the example dimension."""
    return {k: torch.cat([f[k] for f in feats], dim=0) for k in feats[0]}
