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
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError, DatatraceError, NonFiniteError
from ..core.task import AbstractTask
from ..grads.layers import NotFactorable, conv_grads, hookable, layer_io
from ..grads.per_example import (
    flatten_grads,
    per_example_grads,
    per_example_grads_loop,
    select_parameters,
)
from .projector import ProjectionSpec, RandomProjector
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
        self.kr_layers: list[str] = []
        if spec.projection_dim is not None and spec.kronecker is not False:
            self.kr_layers = [
                n
                for n in self.hooked
                if spec.kronecker or type(module.get_submodule(n)) is nn.Linear
            ]
        owned = self._owned({n: (True, True) for n in self.kr_layers})
        self.dense_proj_names = [n for n in self.names if n not in owned]
        self.projector = (
            RandomProjector(
                ProjectionSpec(spec.projection_dim, spec.projection_seed),
                [shapes[n].numel() for n in self.dense_proj_names],
            )
            if spec.projection_dim is not None
            else None
        )
        self._kr: dict[
            tuple[str, torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]
        ] = {}
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
        self.task.check_batch(self.task.model, batch, offset)
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
        _check_finite(values, grads, factors, offset, measurement)
        if self.projector is not None:
            k = self.projector.spec.dim
            out = None
            if kr_io:
                # every layer's r m×m blocks summed in place into one (batch, r·m²) buffer
                acc = None
                for lay, (x, e) in kr_io.items():
                    acc = self._kronecker_project(lay, x, e, acc)
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
        """``U`` (r·m, out) and ``V`` (r·m, in'), ``m = kronecker_block``, ``r = ⌈k/m²⌉``:
        r independent Gaussian blocks, seeded by the projection seed and the layer's
        position (identical on every process and device). Returned as used: ``U / √k``
        (the projection's scale folded in) and ``V`` (its last column multiplies the bias
        input 1 when the layer has a selected bias)."""
        key = (lay, like.dtype, like.device)
        if key not in self._kr:
            spec = self.projector.spec if self.projector is not None else None
            assert spec is not None
            m = self.spec.kronecker_block
            r = -(-spec.dim // (m * m))
            pos = self.kr_layers.index(lay)
            seed = (spec.seed * 1_000_003 + 104_729 * (pos + 1)) % (2**63 - 1)
            g = torch.Generator().manual_seed(seed)
            mats = []
            for dim in (out_dim, in_dim):
                if spec.rademacher:
                    mat = (torch.randint(0, 2, (r * m, dim), generator=g) * 2 - 1).double()
                else:
                    mat = torch.randn(r * m, dim, generator=g, dtype=torch.float64)
                mats.append(mat)
            mats[0] = mats[0] / math.sqrt(spec.dim)
            u, v = (t.to(dtype=like.dtype, device=like.device) for t in mats)
            self._kr[key] = (u, v)
        return self._kr[key]

    def _kronecker_project(
        self, lay: str, x: torch.Tensor, e: torch.Tensor, acc: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[vec(U_c G V_cᵀ)]_c / √k`` (the first k of its r·m² entries are used),
        ``G = Σ_t e_t ã_tᵀ`` the layer's per-example [weight | bias] gradient, computed from
        the factors: r independent m × m Kronecker-product blocks ``U_c ⊗ V_c``, added to
        ``acc`` (batch, r, m, m) in place (a new tensor when ``acc`` is None)."""
        w, b = self.hooked[lay]
        mod = self.task.model.get_submodule(lay)
        if isinstance(mod, nn.Conv2d):
            pad = 0 if isinstance(mod.padding, str) else mod.padding
            a = F.unfold(x, mod.kernel_size, mod.dilation, pad, mod.stride)  # (B, in·kk, T)
            et = e.flatten(2)  # (B, out, T)
        else:
            a, et = x[:, :, None], e[:, :, None]
        n_in = a.shape[1] if w else 0
        u, v = self._kronecker_factors(lay, et.shape[1], n_in + (1 if b else 0), et)
        m = self.spec.kronecker_block
        batch, steps = et.shape[0], et.shape[2]
        if steps == 1:  # Linear: two GEMMs, then an outer product per block
            ue = (et[:, :, 0] @ u.T).view(batch, -1, m, 1)  # (B, r, m, 1)
            if w and b:  # ã = [a, 1]: V ã = V_w a + v_b, without concatenating
                va = torch.addmm(v[:, -1], a[:, :, 0], v[:, :-1].T)
            elif w:
                va = a[:, :, 0] @ v.T
            else:
                va = v[:, -1].expand(batch, -1)
            va = va.reshape(batch, -1, 1, m)
            if acc is None:
                return ue * va  # (B, r, m, m)
            return acc.addcmul_(ue, va)
        # Conv2d: sum the per-position outer products
        parts = ([a] if w else []) + ([torch.ones_like(a[:, :1])] if b else [])
        a = torch.cat(parts, dim=1)
        ue4 = torch.einsum("ko,bot->bkt", u, et).view(batch, -1, m, steps)
        va4 = torch.einsum("ki,bit->bkt", v, a).view(batch, -1, m, steps)
        blocks = torch.matmul(ue4, va4.transpose(2, 3))
        return blocks if acc is None else acc.add_(blocks)

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


def _check_finite(
    values: torch.Tensor,
    grads: dict[str, torch.Tensor],
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    offset: int,
    measurement: bool,
) -> None:
    bad_value = ~torch.isfinite(values)
    # A row sum is non-finite if any entry is (one pass, no boolean copy of the gradients);
    # rows flagged only by an overflowing sum are re-checked entry by entry below.
    rows = [g.reshape(g.shape[0], -1) for g in grads.values()]
    rows += [t for pair in factors.values() for t in pair]
    suspect = bad_value.clone()
    for r in rows:
        suspect |= ~torch.isfinite(r.sum(dim=1))
    if not bool(suspect.any()):
        return
    bad = bad_value.clone()
    for r in rows:
        bad |= ~torch.isfinite(r).all(dim=1)
    if bool(bad.any()):
        idx = (bad.nonzero().flatten() + offset).tolist()
        what = "measurement" if measurement else "loss"
        kind = what if bool(bad_value.any()) else f"gradient of the {what}"
        raise NonFiniteError(
            f"non-finite (NaN or inf) {kind} at examples {idx[:20]}"
            f"{' and more' if len(idx) > 20 else ''}; check these inputs/labels or the "
            "checkpoint (a diverged model)",
            indices=idx,
        )


def flat_dense(feats: Sequence[Features]) -> Features:
    """Concatenate feature dicts along the example dimension."""
    return {k: torch.cat([f[k] for f in feats], dim=0) for k in feats[0]}
