"""Which parameter goes where in :class:`~datatrace.features.featurizer.GradientFeatures`,
and how big its features and work are: the hook rules' cover, the factored layers and
their token counts, the split between the Kronecker and the dense projection, the layout
and the per-example work (:class:`FeaturePlanning`, the featurizer's planning half)."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from ..core.data import batch_len
from ..core.errors import ConfigError
from ..core.task import AbstractTask
from ..grads.layers import NotFactorable
from ..grads.rules import CONV1D, CONV2D, EMBEDDING, LINEAR, HookPlan, capture, hook_plan
from .projector import KroneckerProjector, ProjectionSpec, RandomProjector
from .spec import FeatureSpec

log = logging.getLogger("datatrace")


class FeaturePlanning:
    """The planning half of :class:`~datatrace.features.featurizer.GradientFeatures`
    (which sets these attributes; the plan is probed on the first batch)."""

    spec: FeatureSpec
    task: AbstractTask
    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    _skip: list[str]
    #: factored layers' tokens per example (decided on the first batch)
    tokens: dict[str, int]
    _probed: bool
    _activations: int
    plan: HookPlan
    units: list[tuple[str | None, str | None, int, int]]
    kr_layers: list[str]
    dense_proj_names: list[str]
    sizes: list[int]
    _use_vmap: bool
    _warned_loop: bool
    _site_param: dict[tuple[str, str], str]
    _candidate_layers: dict[str, tuple[bool, bool]]
    _index_candidates: dict[str, str]
    projector: RandomProjector | None
    kronecker_projector: KroneckerProjector | None

    # -- which parameter goes where ---------------------------------------------------------

    def _plan(self) -> None:
        model = self.task.model
        self.plan = (
            hook_plan(model, self.names, self._skip) if self.spec.layer_hooks else HookPlan({}, {})
        )
        #: {(layer, role): parameter} of every hooked call site, and the factored
        #: candidates: derived from the plan once (they are read for every batch)
        self._site_param = {site: n for n, sites in self.plan.params.items() for site in sites}
        self._candidate_layers = self._find_candidates()
        self._index_candidates = self._find_index_candidates()

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
        return self._site_param[(lay, role)]

    def _candidates(self) -> dict[str, tuple[bool, bool]]:
        """Linear/Conv1D layers that may be kept factored: {layer: (weight, bias)}."""
        return self._candidate_layers

    def _find_candidates(self) -> dict[str, tuple[bool, bool]]:
        out = {}
        for lay, kind in self.plan.layers.items():
            sole = self._sole(lay) if kind in (LINEAR, CONV1D) else None
            if sole is not None:
                out[lay] = sole
        return out

    def _find_index_candidates(self) -> dict[str, str]:
        """Embedding layers that may keep their tokens' ids and output gradients: {layer:
        weight parameter}, where the layer alone uses its weight and the ids are exact in
        every dtype the features may be held in (float32/float64: the feature dtype, the
        weight's, and the first parameter's, which stores and scoring use; at most 2²⁴
        rows)."""
        params = dict(self.task.model.named_parameters())
        exact = (torch.float32, torch.float64)
        held = {self.spec.feature_dtype} - {None}
        first = [next(iter(params.values()), None), params.get(self.names[0] if self.names else "")]
        held |= {p.dtype for p in first if p is not None}
        out = {}
        for lay, kind in self.plan.layers.items():
            sole = self._sole(lay) if kind == EMBEDDING else None
            if sole is None or not sole[0]:
                continue
            name = self._param_of(lay, "weight")
            weight = params[name]
            if {weight.dtype, *held} <= set(exact) and weight.shape[0] <= 1 << 24:
                out[lay] = name
        return out

    @property
    def indexed(self) -> dict[str, str]:
        """The Embedding layers kept as their tokens' ids and output gradients
        (``"<layer>.i"`` (batch, N), ``"<layer>.e"`` (batch, N·dim)): {layer: weight
        parameter} (before the first batch: every candidate)."""
        if self.spec.factored is False or self.projector is not None:
            return {}
        if not self._probed:
            return dict(self._index_candidates)
        return {lay: p for lay, p in self._index_candidates.items() if lay in self.tokens}

    def _row_width(self, lay: str) -> int:
        """The width of a factored or indexed layer's ``e`` rows (out, or the embedding's)."""
        if lay in self._index_candidates:
            return self.shapes[self._index_candidates[lay]][1]
        return self._dims(lay)[1]

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
        factored |= set(self.indexed.values())
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
        for lay in self.indexed:
            tokens = self.tokens.get(lay, 1)
            out[f"{lay}.i"] = tokens
            out[f"{lay}.e"] = tokens * self._row_width(lay)
        return out

    def _size_factored(self, calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Keep a candidate layer factored when its N tokens' factors (``N·(out + in')``
        numbers) are smaller than its formed gradient (``out·in'``), for one token, or always
        with ``factored=True``; the others are formed per example. Inner products of factored
        layers take the cheaper of token pairs and gradients formed in cache
        (:func:`~datatrace.features.products.layer_products`), so smaller features cost
        no speed. An Embedding keeps its N tokens' ids and output gradients when they are
        smaller than its gradient (``N·(1 + dim) < rows·dim``: always for a vocabulary)."""
        if self.spec.factored is False or self.projector is not None:
            return
        for lay, (w, _) in self._candidates().items():
            n_in, n_out = self._dims(lay)
            tokens = sum(x.numel() // max(1, x.shape[0] * x.shape[-1]) for x, _ in calls[lay])
            if w and tokens == 0:  # not called on the first batch: no layout to size
                log.info("layer %r is not called on the first batch: its gradient is formed", lay)
                continue
            tokens = tokens if w else 1
            if self.spec.factored or tokens == 1 or tokens * (n_in + n_out) < n_in * n_out:
                self.tokens[lay] = tokens
            else:
                log.info(
                    "layer %r: %d tokens per example; its per-example gradient is formed "
                    "(smaller than the factors of %d tokens)",
                    lay,
                    tokens,
                    tokens,
                )
        for lay, name in self._index_candidates.items():
            rows, dim = self.shapes[name]
            tokens = sum(x.numel() // max(1, x.shape[0]) for x, _ in calls[lay])
            if tokens > 0 and tokens * (1 + dim) < rows * dim:  # ids and gradients: smaller
                self.tokens[lay] = tokens

    def sized_by_example(self) -> bool:
        """A factored or indexed layer keeps more than one token per example: the layout
        holds as many tokens as the example it was probed on."""
        return any(t > 1 for t in self.tokens.values())

    def describe(self) -> dict[str, Any]:
        return {
            **self.spec.describe(),
            "selected": self.names,
            "factored_layers": sorted(self.layers),
            "indexed_layers": sorted(self.indexed),
            "layout": self.layout(),
        }

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


def _orient(kind: str, shape: torch.Size) -> tuple[int, int]:
    """(rows, cols) of a weight's gradient ``Σ left rightᵀ``: (out, in) for Linear and
    Conv2d (in = patch size), (out, in) for Conv1D (stored (in, out)), (vocab, dim) for an
    Embedding."""
    if kind == CONV1D:
        return int(shape[1]), int(shape[0])
    return int(shape[0]), math.prod(int(d) for d in shape[1:])
