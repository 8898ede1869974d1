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
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError, DatatraceError
from ..core.loop import check_finite
from ..core.task import AbstractTask
from ..grads.layers import NotFactorable, conv_grads, conv_patches, hookable, layer_io
from ..grads.per_example import (
    bound_model,
    flatten_grads,
    per_example_grads,
    per_example_grads_loop,
    select_parameters,
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
    ) -> Features:
        """Features of one batch (of the loss, or the measurement for queries)."""

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


class GradientFeatures(AbstractFeaturizer):
    """The featurizer of :class:`FeatureSpec` bound to a task's model."""

    def __init__(self, spec: FeatureSpec, task: AbstractTask) -> None:
        self.spec = spec
        self.task = task
        module = task.model
        self.names = select_parameters(module, spec.params)
        shapes = dict(module.named_parameters())
        self.sizes = [shapes[n].numel() for n in self.names]
        self.hooked = self._hookable_layers(module) if spec.layer_hooks else {}
        if spec.factored and not any(
            type(module.get_submodule(n)) is nn.Linear for n in self.hooked
        ):
            raise ConfigError(
                "factored=True needs selected parameters that belong to nn.Linear layers "
                "(and layer_hooks=True)"
            )
        self._set_projections()
        self._use_vmap = spec.vmap is not False
        self._probed = False

    def _hookable_layers(self, module: nn.Module) -> dict[str, tuple[bool, bool]]:
        """Linear/Conv2d layers with selected parameters: {layer: (weight, bias)}."""
        layers: dict[str, tuple[bool, bool]] = {}
        for name, mod in module.named_modules():
            if not hookable(mod):
                continue
            w, b = f"{name}.weight" in self.names, f"{name}.bias" in self.names
            if w or b:
                layers[name] = (w, b)
        return layers

    def _set_projections(self) -> None:
        """Split the selected parameters between the Kronecker projection (hooked layers:
        Linear, and Conv2d when ``kronecker=True``) and the dense one (the rest); called
        again when a layer leaves the hooked path, so its gradient goes to the dense one."""
        spec, module = self.spec, self.task.model
        self.kr_layers: list[str] = []
        if spec.projection_dim is not None and spec.kronecker is not False:
            self.kr_layers = [
                n
                for n in self.hooked
                if spec.kronecker or type(module.get_submodule(n)) is nn.Linear
            ]
        owned = self._owned({n: (True, True) for n in self.kr_layers})
        self.dense_proj_names = [n for n in self.names if n not in owned]
        self.projector: RandomProjector | None = None
        self.kronecker_projector: KroneckerProjector | None = None
        if spec.projection_dim is None:
            return
        proj = ProjectionSpec(spec.projection_dim, spec.projection_seed)
        shapes = dict(module.named_parameters())
        self.projector = RandomProjector(proj, [shapes[n].numel() for n in self.dense_proj_names])
        if self.kr_layers:
            self.kronecker_projector = KroneckerProjector(
                proj,
                [self._kronecker_shape(module, lay) for lay in self.kr_layers],
                spec.kronecker_block,
            )

    def _kronecker_shape(self, module: nn.Module, lay: str) -> tuple[int, int, bool]:
        """(out, selected input width, bias selected) of a layer, as KroneckerProjector
        takes them; a Conv2d's input width is its patch size, in_channels·kh·kw."""
        w, b = self.hooked[lay]
        weight = module.get_submodule(lay).weight
        assert isinstance(weight, torch.Tensor)
        return int(weight.shape[0]), int(weight[0].numel()) if w else 0, b

    @property
    def layers(self) -> dict[str, tuple[bool, bool]]:
        """The Linear layers kept factored: {layer: (weight selected, bias selected)}."""
        if self.spec.factored is False or self.projector is not None:
            return {}
        module = self.task.model
        return {
            n: wb for n, wb in self.hooked.items() if type(module.get_submodule(n)) is nn.Linear
        }

    @staticmethod
    def _owned(layers: dict[str, tuple[bool, bool]]) -> set[str]:
        return {f"{lay}.{p}" for lay in layers for p in ("weight", "bias")}

    @property
    def dense_names(self) -> list[str]:
        """Parameters stored as dense flattened gradients (model order)."""
        factored = self._owned(self.layers)
        return [n for n in self.names if n not in factored]

    @property
    def vmap_names(self) -> list[str]:
        """Parameters whose per-example gradients come from vmap (not from hooks)."""
        hooked = self._owned(self.hooked)
        return [n for n in self.names if n not in hooked]

    @property
    def num_params(self) -> int:
        return sum(self.sizes)

    def layout(self) -> dict[str, int]:
        """Feature array names and their widths."""
        if self.projector is not None:
            return {"proj": self.projector.spec.dim}
        module = self.task.model
        out: dict[str, int] = {}
        dense = self.dense_names
        if dense:
            shapes = dict(module.named_parameters())
            out["dense"] = sum(shapes[n].numel() for n in dense)
        for lay, (w, b) in self.layers.items():
            lin = module.get_submodule(lay)
            assert isinstance(lin, nn.Linear)
            out[f"{lay}.a"] = (lin.in_features if w else 0) + (1 if b else 0)
            out[f"{lay}.e"] = lin.out_features
        return out

    def describe(self) -> dict[str, Any]:
        return {
            **self.spec.describe(),
            "selected": self.names,
            "factored_layers": sorted(self.layers),
            "layout": self.layout(),
        }

    def compute(
        self,
        params: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor],
        batch: Any,
        measurement: bool,
        offset: int = 0,
    ) -> Features:
        """Features of one batch, (batch, width) each; ``offset`` = index of its first example
        (in ``feature_dtype`` when one is set)."""
        feats = self._compute(params, buffers, batch, measurement, offset)
        if self.spec.feature_dtype is None:
            return feats
        return {k: v.to(self.spec.feature_dtype) for k, v in feats.items()}

    def _compute(
        self,
        params: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor],
        batch: Any,
        measurement: bool,
        offset: int,
    ) -> Features:
        self.task.check_batch(bound_model(self.task.model, {**buffers, **params}), batch, offset)
        if not self._probed:
            self._probe(params, buffers, batch)
        grads, values = self._dense_grads(params, buffers, batch, measurement)
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        kr_io: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if self.hooked:
            io, values = layer_io(self.task, params, buffers, batch, list(self.hooked), measurement)
            kr_io = {lay: io.pop(lay) for lay in self.kr_layers}
            factors = self._split_layer_grads(io, grads)
        assert values is not None
        rows = [*grads.values(), *(t for pair in factors.values() for t in pair)]
        check_finite(values, rows, offset, "measurement" if measurement else "loss")
        if self.projector is not None:
            k = self.projector.spec.dim
            out = None
            if kr_io:
                assert self.kronecker_projector is not None
                # every layer's r m×m blocks summed in place into one (batch, r·m²) buffer
                acc = None
                for j, (lay, (x, e)) in enumerate(kr_io.items()):
                    a, et = self._layer_factors(lay, x, e)
                    acc = self.kronecker_projector.project_factors(j, a, et, acc)
                assert acc is not None
                out = acc.view(len(values), -1)[:, :k]
            blocks = [grads[n].reshape(len(values), -1) for n in self.dense_proj_names]
            if blocks:
                dense = self.projector(blocks)
                out = dense if out is None else out.add_(dense)
            assert out is not None
            return {"proj": out if out.is_contiguous() else out.contiguous()}
        feats: Features = {}
        if self.dense_names:
            feats["dense"] = flatten_grads(grads, self.dense_names)
        for lay, (a, e) in factors.items():
            w, b = self.layers[lay]
            parts = ([a] if w else []) + ([torch.ones_like(a[:, :1])] if b else [])
            feats[f"{lay}.a"] = torch.cat(parts, dim=1)
            feats[f"{lay}.e"] = e
        return feats

    def _kronecker_factors(
        self, lay: str, out_dim: int, in_dim: int, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U / √k, V)`` of a Kronecker-projected layer (see
        :meth:`KroneckerProjector.factors`; the widths are the projector's own)."""
        assert self.kronecker_projector is not None
        return self.kronecker_projector.factors(self.kr_layers.index(lay), like.dtype, like.device)

    def _layer_factors(
        self, lay: str, x: torch.Tensor, e: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A hooked layer's inputs and output gradients per position: (batch, in, positions)
        (Conv2d: the unfolded patches) and (batch, out, positions)."""
        mod = self.task.model.get_submodule(lay)
        if isinstance(mod, nn.Conv2d):
            return conv_patches(mod, x), e.flatten(2)
        return x[:, :, None], e[:, :, None]

    def _split_layer_grads(
        self, io: dict[str, tuple[torch.Tensor, torch.Tensor]], grads: dict[str, torch.Tensor]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Factored layers' (a, e) returned; other hooked layers' gradients put in ``grads``."""
        factored = self.layers
        factors = {}
        for lay, (x, e) in io.items():
            if lay in factored:
                factors[lay] = (x, e)
                continue
            w, b = self.hooked[lay]
            mod = self.task.model.get_submodule(lay)
            if isinstance(mod, nn.Conv2d):
                gw, gb = conv_grads(mod, x, e)
            else:
                gw, gb = e[:, :, None] * x[:, None, :], e
            if w:
                grads[f"{lay}.weight"] = gw
            if b:
                grads[f"{lay}.bias"] = gb
        return factors

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
                warnings.warn(
                    f"vmap could not trace this model ({type(exc).__name__}: {exc}); "
                    "falling back to a per-example loop (slower). Pass vmap=False to skip "
                    "the attempt.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._use_vmap = False
        return per_example_grads_loop(self.task, params, buffers, batch, names, measurement)

    def _probe(
        self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], batch: Any
    ) -> None:
        """Keep only the layers the hooked path is exact for on this model (the others fall
        back to vmap)."""
        self._probed = True
        while self.hooked:
            try:
                layer_io(self.task, params, buffers, batch, list(self.hooked))
                return
            except NotFactorable as exc:
                if self.spec.factored and exc.layer in self.layers:
                    raise ConfigError(f"factored=True does not apply: {exc}") from exc
                log.info("%s; its per-example gradients come from vmap", exc)
                del self.hooked[exc.layer]
                if exc.layer in self.kr_layers:  # projected densely instead
                    self._set_projections()

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

    @staticmethod
    def pairwise(q: Features, g: Features) -> torch.Tensor:
        """Inner products ``⟨φ(q_j), φ(g_i)⟩``, shape (n_q, n_g)."""
        out = None
        for key in q:
            if key.endswith(".a"):
                continue
            if key.endswith(".e"):
                a = key[:-2] + ".a"
                term = (q[key] @ g[key].T) * (q[a] @ g[a].T)
            else:
                term = q[key] @ g[key].T
            out = term if out is None else out + term
        assert out is not None
        return out

    @staticmethod
    def pairwise_diagonal(q: Features, g: Features) -> torch.Tensor:
        """``⟨φ(q_i), φ(g_i)⟩`` row by row (dense or projected features), shape (n,)."""
        return sum((q[k] * g[k]).sum(1) for k in g)  # type: ignore[return-value]

    @staticmethod
    def sqnorm(g: Features) -> torch.Tensor:
        """Squared norms ``‖φ(g_i)‖²``, shape (n_g,)."""
        out = None
        for key in g:
            if key.endswith(".a"):
                continue
            if key.endswith(".e"):
                a = key[:-2] + ".a"
                term = (g[key] ** 2).sum(1) * (g[a] ** 2).sum(1)
            else:
                term = (g[key] ** 2).sum(1)
            out = term if out is None else out + term
        assert out is not None
        return out


def flat_dense(feats: Sequence[Features]) -> Features:
    """Concatenate feature dicts along the example dimension."""
    return {k: torch.cat([f[k] for f in feats], dim=0) for k in feats[0]}
