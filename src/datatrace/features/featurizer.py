"""Gradient features of one example set at one checkpoint, and the inner products between them.

A :class:`GradientFeatures` is the resolved featurizer for one task: which parameters,
which of them go through the factored ``nn.Linear`` path (input activation ⊗ output
gradient, never forming the full gradient), and the optional random projection. Features
are dicts of tensors with a leading example dimension:

* ``"proj"``: the projected gradient, (batch, k), when a projection is set;
* otherwise ``"dense"``: the flattened gradient of the non-factored parameters, (batch, p),
  and for each factored layer ``"<layer>.a"`` (batch, in[+1 for the bias]) and
  ``"<layer>.e"`` (batch, out).

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
from ..core.loop import check_finite
from ..core.task import AbstractTask
from ..grads.per_example import (
    bound_model,
    per_example_grads,
    per_example_grads_loop,
    select_parameters,
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
    inputs and output gradients per token, ``"<layer>.a"``/``"<layer>.e"``) when the
    pairwise inner products are cheaper from the factors (``N²(out + in) < out·in`` for
    N tokens; always for N = 1), else its gradient is formed per example. Projected,
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
        store), the dense gradients are formed straight into it: no per-batch copy."""
        dtype = next(iter(params.values())).dtype if params else None
        cast = self.spec.feature_dtype is not None and self.spec.feature_dtype != dtype
        feats = self._compute(params, buffers, batch, measurement, offset, None if cast else out)
        if cast:
            feats = {k: v.to(self.spec.feature_dtype) for k, v in feats.items()}
        if out is None:
            return feats
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
        self.task.check_batch(bound_model(self.task.model, {**buffers, **params}), batch, offset)
        if not self._probed:
            self._probe(params, buffers, batch)
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
        check_finite(values, rows, offset, "measurement" if measurement else "loss")
        if self.projector is not None:
            return {"proj": self._project(contrib, grads, n)}
        feats: Features = {}
        factored = self.layers
        if self.dense_names:
            feats["dense"] = self._dense_into(
                out["dense"] if out is not None else None, grads, contrib, values
            )
        for lay, (w, b) in factored.items():
            feats[f"{lay}.a"], feats[f"{lay}.e"] = self._factors(lay, w, b, contrib, n, offset)
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
                view.copy_(grads[name].reshape(n, *shape))
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
        self, lay: str, w: bool, b: bool, contrib: dict[str, list[Grad]], n: int, offset: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A factored layer's ``a`` (n, N·in') and ``e`` (n, N·out): its calls' tokens
        concatenated, a 1 appended to each input for the bias, zero-padded to the N of the
        first batch (zero tokens add nothing)."""
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
        e = torch.cat([t.left for t in terms], 1)
        a = torch.cat([t.right for t in terms], 1)
        if b:
            a = torch.cat([a, torch.ones_like(a[:, :, :1])], 2)
        have = e.shape[1]
        if have > tokens:
            raise DataError(
                f"examples {offset}..{offset + n - 1} give layer {lay!r} {have} tokens, more "
                f"than the {tokens} its factored features were sized for on the first batch; "
                "pad every example to one length (tokenizer padding='max_length') or pass "
                "factored=False"
            )
        if have < tokens:
            e = torch.nn.functional.pad(e, (0, 0, 0, tokens - have))
            a = torch.nn.functional.pad(a, (0, 0, 0, tokens - have))
        return a.reshape(n, -1), e.reshape(n, -1)

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
        ``Σ_{t,s} (e_t·e'_s)(ã_t·ã'_s)`` over token pairs (one product for one token)."""
        out = None
        for key in q:
            if key.endswith(".a"):
                continue
            if key.endswith(".e"):
                lay = key[:-2]
                term = _factored_products(
                    q[key], g[key], q[lay + ".a"], g[lay + ".a"], self.tokens.get(lay, 1)
                )
            else:
                term = q[key] @ g[key].T
            out = term if out is None else out + term
        assert out is not None
        return out

    def pairwise_diagonal(self, q: Features, g: Features) -> torch.Tensor:
        """``⟨φ(q_i), φ(g_i)⟩`` row by row, shape (n,)."""
        out = None
        for key in g:
            if key.endswith(".a"):
                continue
            if key.endswith(".e"):
                lay, t = key[:-2], self.tokens.get(key[:-2], 1)
                qe, ge = _tokens(q[key], t), _tokens(g[key], t)
                qa, ga = _tokens(q[lay + ".a"], t), _tokens(g[lay + ".a"], t)
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


def _tokens(x: torch.Tensor, tokens: int) -> torch.Tensor:
    return x.reshape(x.shape[0], tokens, -1)


#: entries of a (n_q·N) × (n_g·N) token-product matrix computed at once
_PAIR_CHUNK = 1 << 24


def _factored_products(
    qe: torch.Tensor, ge: torch.Tensor, qa: torch.Tensor, ga: torch.Tensor, tokens: int
) -> torch.Tensor:
    """``Σ_{t,s} (E_q E_gᵀ)[t,s] ∘ (A_q A_gᵀ)[t,s]`` for every (query, training) pair,
    (n_q, n_g), in chunks of training rows (never forming a per-example gradient)."""
    if tokens == 1:
        return (qe @ ge.T) * (qa @ ga.T)
    nq, ng = qe.shape[0], ge.shape[0]
    qe2, qa2 = qe.reshape(nq * tokens, -1), qa.reshape(nq * tokens, -1)
    ge2, ga2 = ge.reshape(ng * tokens, -1), ga.reshape(ng * tokens, -1)
    step = max(1, _PAIR_CHUNK // max(1, nq * tokens * tokens))
    parts = []
    for s in range(0, ng, step):
        rows = slice(s * tokens, min(ng, s + step) * tokens)
        prod = (qe2 @ ge2[rows].T) * (qa2 @ ga2[rows].T)
        parts.append(prod.view(nq, tokens, -1, tokens).sum((1, 3)))
    return torch.cat(parts, 1)


def _tensors(part: Grad) -> list[torch.Tensor]:
    """The floating-point tensors of a contribution (for the non-finite check)."""
    if isinstance(part, Term):
        return [part.right] if part.indexed else [part.left, part.right]
    return [part]


def flat_dense(feats: Sequence[Features]) -> Features:
    """Concatenate feature dicts along the example dimension."""
    return {k: torch.cat([f[k] for f in feats], dim=0) for k in feats[0]}
