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
"""

from __future__ import annotations

import contextlib
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..core.data import batch_len
from ..core.errors import ConfigError, DataError, DatatraceError
from ..core.loop import check_finite
from ..core.task import AbstractTask
from ..grads.layers import NotFactorable
from ..grads.per_example import (
    bound_model,
    per_example_grads,
    per_example_grads_loop,
    select_parameters,
)
from ..grads.rules import (
    CONV1D,
    CONV2D,
    EMBEDDING,
    LINEAR,
    Grad,
    HookPlan,
    Term,
    capture,
    form,
    form_into,
    hook_plan,
    hooked_grads,
)
from .projector import KroneckerProjector, ProjectionSpec, RandomProjector
from .spec import FeatureSpec

log = logging.getLogger("datatrace")
Features = dict[str, torch.Tensor]


class AbstractFeaturizer(ABC):
    """The featurizer slot φ of ``S = Σ_c w_c ⟨φ_c(q), P_c φ_c(z)⟩``, bound to a task.

    Features are dicts of tensors with a leading example dimension (:data:`Features`); a
    featurizer says their layout, computes them for a batch, and owns the inner products
    between them (so a factored or projected layout never has to be expanded). Final
    implementations: :class:`GradientFeatures`.
    """

    task: AbstractTask
    #: the parameters differentiated, in model order
    names: list[str]

    @abstractmethod
    def layout(self) -> dict[str, int]:
        """Feature array names and their widths."""

    @abstractmethod
    def compute(
        self,
        params: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor],
        batch: Any,
        measurement: bool,
        offset: int = 0,
        out: Features | None = None,
    ) -> Features:
        """Features of one batch (of the loss, or the measurement for queries); with
        ``out`` (arrays of the layout's widths, one row per example), written into it and
        returned."""

    @abstractmethod
    def pairwise(self, q: Features, g: Features) -> torch.Tensor:
        """Inner products ``⟨φ(q_j), φ(g_i)⟩``, shape (n_q, n_g)."""

    @abstractmethod
    def pairwise_diagonal(self, q: Features, g: Features) -> torch.Tensor:
        """``⟨φ(q_i), φ(g_i)⟩`` row by row, shape (n,)."""

    @abstractmethod
    def sqnorm(self, g: Features) -> torch.Tensor:
        """Squared norms ``‖φ(g_i)‖²``, shape (n_g,)."""

    @property
    @abstractmethod
    def num_params(self) -> int:
        """The number of parameters differentiated (the width of an unprojected feature)."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Everything that changes the features (for store fingerprints and logs)."""

    def scoring(self) -> contextlib.AbstractContextManager[None]:
        """The numerical setting scoring matmuls run under (default: unchanged)."""
        return contextlib.nullcontext()

    def work_entries(self) -> int:
        """Numbers held per example while a batch is featurized, beyond its features
        (default: as many as the features; activations not counted)."""
        return sum(self.layout().values())


class GradientFeatures(AbstractFeaturizer):
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

    # -- which parameter goes where ---------------------------------------------------------

    def _plan(self) -> None:
        model = self.task.model
        self.plan = (
            hook_plan(model, self.names, self._skip) if self.spec.layer_hooks else HookPlan({}, {})
        )

    @property
    def hooked(self) -> dict[str, str]:
        """Layers whose parameters' per-example gradients come from hook rules: {layer: rule}."""
        return self.plan.layers

    @property
    def vmap_names(self) -> list[str]:
        """Parameters whose per-example gradients come from vmap (not from hooks)."""
        return [n for n in self.names if n not in self.plan.params]

    def _sole(self, lay: str) -> tuple[bool, bool] | None:
        """(weight, bias) selected of a layer that alone uses its selected parameters, or
        None (shared, or nothing selected)."""
        w = b = False
        for sites in self.plan.params.values():
            if any(s[0] == lay for s in sites):
                if len(sites) != 1:
                    return None
                w, b = w or sites[0][1] == "weight", b or sites[0][1] == "bias"
        return (w, b) if w or b else None

    def _param_of(self, lay: str, role: str) -> str:
        return next(n for n, s in self.plan.params.items() if (lay, role) in s)

    def _candidates(self) -> dict[str, tuple[bool, bool]]:
        """Linear/Conv1D layers that may be kept factored: {layer: (weight, bias)}."""
        out = {}
        for lay, kind in self.plan.layers.items():
            sole = self._sole(lay) if kind in (LINEAR, CONV1D) else None
            if sole is not None:
                out[lay] = sole
        return out

    @property
    def layers(self) -> dict[str, tuple[bool, bool]]:
        """The layers kept factored: {layer: (weight selected, bias selected)} (before the
        first batch: every candidate, as if each example were one token)."""
        if self.spec.factored is False or self.projector is not None:
            return {}
        cand = self._candidates()
        if not self._probed:
            return cand
        return {lay: wb for lay, wb in cand.items() if lay in self.tokens}

    def _dims(self, lay: str) -> tuple[int, int]:
        """(in', out) of a factored layer: input width (+1 for a selected bias), output width."""
        w, b = self._candidates()[lay]
        mod = self.task.model.get_submodule(lay)
        weight = mod.weight
        assert isinstance(weight, torch.Tensor)
        out_dim, in_dim = weight.shape if self.plan.layers[lay] == LINEAR else weight.shape[::-1]
        return (int(in_dim) if w else 0) + int(b), int(out_dim)

    @property
    def dense_names(self) -> list[str]:
        """Parameters stored as dense flattened gradients (model order)."""
        factored = {self._param_of(lay, r) for lay, (w, b) in self.layers.items()
                    for r, on in (("weight", w), ("bias", b)) if on}  # fmt: skip
        return [n for n in self.names if n not in factored]

    def _set_projections(self) -> None:
        """Split the selected parameters between the Kronecker projection (weights of hooked
        Linear/Conv1D/Embedding layers, Conv2d when ``kronecker=True``, with their layer's
        bias folded in when the layer alone uses both) and the dense one (the rest)."""
        spec, model = self.spec, self.task.model
        self.units: list[tuple[str | None, str | None, int, int]] = []
        self.kr_layers: list[str] = []
        owned: set[str] = set()
        if spec.projection_dim is not None and spec.kronecker is not False:
            kinds = {LINEAR, CONV1D, EMBEDDING} | ({CONV2D} if spec.kronecker else set())
            for lay, kind in self.plan.layers.items():
                if kind not in kinds:
                    continue
                weight_param = model.get_submodule(lay).weight
                assert isinstance(weight_param, torch.Tensor)
                rows, cols = _orient(kind, weight_param.shape)
                sole = self._sole(lay)
                if sole is not None and kind != EMBEDDING:  # the layer's own unit
                    w = self._param_of(lay, "weight") if sole[0] else None
                    b = self._param_of(lay, "bias") if sole[1] else None
                    self.units.append((w, b, rows, cols if w else 0))
                    self.kr_layers.append(lay)
                    owned |= {w, b} - {None}  # type: ignore[arg-type]
                    continue
                w = next((n for n, s in self.plan.params.items() if (lay, "weight") in s), None)
                if w is None or w in owned:
                    continue
                sites = self.plan.params[w]
                if all(self.plan.layers[s[0]] in kinds for s in sites):  # a shared weight
                    self.units.append((w, None, rows, cols))
                    self.kr_layers.append(lay)
                    owned.add(w)
        self.dense_proj_names = [n for n in self.names if n not in owned]
        self.projector: RandomProjector | None = None
        self.kronecker_projector: KroneckerProjector | None = None
        if spec.projection_dim is None:
            return
        proj = ProjectionSpec(spec.projection_dim, spec.projection_seed)
        self.projector = RandomProjector(
            proj, [math.prod(self.shapes[n]) for n in self.dense_proj_names]
        )
        if self.units:
            self.kronecker_projector = KroneckerProjector(
                proj, [(rows, cols, b is not None) for _, b, rows, cols in self.units],
                spec.kronecker_block,
            )  # fmt: skip

    def work_entries(self) -> int:
        """Numbers held per example while featurizing: the formed per-example gradients
        (vmap's, the loop's, or the hook rules' where they are formed) and their flattened
        copy, the features, and twice the hooked layers' inputs and output gradients seen on
        the first batch (the activations autograd keeps, and their gradients)."""
        factored = set() if self.projector is not None else set(self.names) - set(self.dense_names)
        formed = sum(math.prod(self.shapes[n]) for n in self.names if n not in factored)
        if self.projector is not None:
            formed = sum(math.prod(self.shapes[n]) for n in self.dense_proj_names)
        return 2 * formed + sum(self.layout().values()) + 2 * self._activations

    # -- layout ---------------------------------------------------------------------------

    @property
    def num_params(self) -> int:
        return sum(self.sizes)

    def layout(self) -> dict[str, int]:
        """Feature array names and their widths."""
        if self.projector is not None:
            return {"proj": self.projector.spec.dim}
        out: dict[str, int] = {}
        dense = self.dense_names
        if dense:
            out["dense"] = sum(math.prod(self.shapes[n]) for n in dense)
        for lay in self.layers:
            n_in, n_out = self._dims(lay)
            tokens = self.tokens.get(lay, 1)
            out[f"{lay}.a"] = tokens * n_in
            out[f"{lay}.e"] = tokens * n_out
        return out

    def describe(self) -> dict[str, Any]:
        return {
            **self.spec.describe(),
            "selected": self.names,
            "factored_layers": sorted(self.layers),
            "layout": self.layout(),
        }

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

    def _warn_loop(self, why: str) -> None:
        """Say, once, that the per-example loop runs, what it costs and how to avoid it."""
        self._warned_loop = True
        names = self.vmap_names
        count = sum(math.prod(self.shapes[n]) for n in names)
        log.warning(
            "%s; the per-example gradients of %d parameter tensor(s) (%d entries, e.g. %s) "
            "come from a per-example loop: one forward+backward per example, about batch "
            "size times the cost of one batched pass. Fix: select parameters of layers with "
            "hook rules (Linear, Conv1D, Conv2d, Embedding, LayerNorm) with params=..., or "
            "make the model traceable by torch.func.vmap; vmap=False skips the attempt",
            why,
            len(names),
            count,
            names[:4],
        )

    def _probe(
        self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], batch: Any
    ) -> None:
        """Keep only the layers the hook rules are exact for on this model (the others fall
        back to vmap), and size the factored layers (tokens per example)."""
        self._probed = True
        while self.plan.layers:
            modules = {lay: self.task.model.get_submodule(lay) for lay in self.plan.layers}
            try:
                calls, _ = capture(self.task, params, buffers, batch, modules)
            except NotFactorable as exc:
                if self.spec.factored and exc.layer in self._candidates():
                    raise ConfigError(f"factored=True does not apply: {exc}") from exc
                log.info("%s; its per-example gradients come from vmap", exc)
                self._skip.append(exc.layer)
                self._plan()
                self._set_projections()
                continue
            self._size_factored(calls)
            n = max(1, batch_len(batch))
            self._activations = sum(x.numel() + e.numel() for cs in calls.values()
                                    for x, e in cs) // n  # fmt: skip
            return

    def _size_factored(self, calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Keep a candidate layer factored when pairwise products from its N tokens
        (``N²(out + in')``) cost less than from its formed gradient (``out·in'``), or always
        with ``factored=True``; the others are formed per example."""
        if self.spec.factored is False or self.projector is not None:
            return
        for lay, (w, _) in self._candidates().items():
            n_in, n_out = self._dims(lay)
            tokens = sum(x.numel() // max(1, x.shape[0] * x.shape[-1]) for x, _ in calls[lay])
            tokens = max(1, tokens) if w else 1
            if self.spec.factored or tokens == 1 or tokens**2 * (n_in + n_out) < n_in * n_out:
                self.tokens[lay] = tokens
            else:
                log.info(
                    "layer %r: %d tokens per example; its per-example gradient is formed "
                    "(cheaper than products of %d-token factors)",
                    lay,
                    tokens,
                    tokens,
                )

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


def _orient(kind: str, shape: torch.Size) -> tuple[int, int]:
    """(rows, cols) of a weight's gradient ``Σ left rightᵀ``: (out, in) for Linear and
    Conv2d (in = patch size), (out, in) for Conv1D (stored (in, out)), (vocab, dim) for an
    Embedding."""
    if kind == CONV1D:
        return int(shape[1]), int(shape[0])
    return int(shape[0]), math.prod(int(d) for d in shape[1:])


def _tensors(part: Grad) -> list[torch.Tensor]:
    """The floating-point tensors of a contribution (for the non-finite check)."""
    if isinstance(part, Term):
        return [part.right] if part.indexed else [part.left, part.right]
    return [part]


def flat_dense(feats: Sequence[Features]) -> Features:
    """Concatenate feature dicts along the example dimension."""
    return {k: torch.cat([f[k] for f in feats], dim=0) for k in feats[0]}
