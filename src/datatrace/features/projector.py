"""Random projections of per-example gradients, seeded and streamed.

Implementations of the projector slot (:class:`AbstractProjector`):

* :class:`RandomProjector`: a dense Gaussian/Rademacher ``P``; any parameter, cost
  O(k·p) per example. The default for everything that is not a hooked layer.
* :class:`KroneckerProjector`: per hooked weight (``nn.Linear`` on any ``(B, ..., in)``
  input, transformers' Conv1D, ``nn.Embedding``, a tied weight, ``nn.Conv2d``), r
  independent Kronecker-product blocks applied to the gradient's factors (inputs ⊗ output
  gradients per token, :meth:`KroneckerProjector.project_terms`) without forming the
  gradient (LoGra); cost O(N(k(out + in)/m + k)) per example of N tokens. Its matrices
  are generated once per unit and kept.

Every random stream is seeded by :func:`derive_seed` (the base seed and the stream's
position: parameter block, layer, checkpoint), so matrices are identical on every process
and device.

:class:`RandomProjector` maps a gradient split into named blocks (one per parameter) to
``P g`` with ``P ∈ R^{k×p}`` and ``E[PᵀP] = I``: entries are i.i.d. Gaussian (or Rademacher)
scaled by ``1/√k``. ``P`` is generated block by block from a seed derived from the base
seed and the block's position, so it is identical across processes, devices, batches and
query/training data, and is never held larger than ``max_block_elems`` at once (blocks are
kept in memory only while their total stays under ``cache_bytes``).

References:
    Johnson and Lindenstrauss (1984); Pruthi et al. 2020 (TracIn-RP); Park et al. 2023 (TRAK);
    Choe et al. 2024 (LoGra: "What is your data worth to GPT?").
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..core.errors import ConfigError
from ..grads.rules import Term

#: the prime that separates the streams of consecutive base seeds
SEED_STEP = 1_000_003


def derive_seed(base: int, offset: int) -> int:
    """THE seed of the random stream at ``offset`` under the base seed ``base``:
    ``(base · 1,000,003 + offset) mod (2⁶³ − 1)``. Offsets in use: a dense block's rows
    ``7,919 · block + first row`` (:class:`RandomProjector`), a Kronecker layer's
    ``104,729 · (layer + 1)`` (:class:`KroneckerProjector`); checkpoint c's base seed is
    ``derive_seed(c, projection_seed)`` (:meth:`FeatureSpec.for_checkpoint`; checkpoint 0
    keeps ``projection_seed``). Every matrix is the one earlier releases generated, so
    existing feature stores stay valid."""
    return (int(base) * SEED_STEP + int(offset)) % (2**63 - 1)


def _gaussian_or_signs(
    shape: tuple[int, int], rademacher: bool, gen: torch.Generator
) -> torch.Tensor:
    """i.i.d. N(0, 1) or ±1 entries, float64 (generated on the CPU: the same everywhere)."""
    if rademacher:
        return (torch.randint(0, 2, shape, generator=gen, dtype=torch.int8) * 2 - 1).double()
    return torch.randn(shape, generator=gen, dtype=torch.float64)


@dataclass(frozen=True)
class ProjectionSpec:
    """Settings of a random projection.

    Args:
        dim: output dimension k (>= 1).
        seed: base seed; same seed, same matrix.
        rademacher: ±1 entries instead of Gaussian ones.
    """

    dim: int
    seed: int = 0
    rademacher: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise ConfigError(
                f"projection_dim must be a positive integer or None (no projection), "
                f"got {self.dim!r}"
            )


class AbstractProjector(ABC):
    """The projection slot of a featurizer: maps per-example gradients to k numbers with
    ``E[φ(z)·φ(z')] = ⟨g(z), g(z')⟩``. Implementations are final and deterministic given
    their settings (same seed, same matrix on every process and device)."""

    spec: ProjectionSpec

    @property
    def dim(self) -> int:
        """The output dimension k."""
        return self.spec.dim

    @abstractmethod
    def __call__(self, blocks: Sequence[torch.Tensor]) -> torch.Tensor:
        """Project per-example gradient blocks, each (batch, size_j), to (batch, k)."""


class RandomProjector(AbstractProjector):
    """Applies a fixed random ``P`` (k × p) to gradients given as per-parameter blocks.

    Args:
        spec: projection settings.
        sizes: number of entries of each parameter block, in feature order.
        max_block_elems: the largest slice of ``P`` materialised at once.
        cache_bytes: keep generated slices (in the dtype and on the device they are used
            in) while their total stays under this; slices beyond it are regenerated from
            their seeds at every call (:attr:`regenerated` entries of ``P`` per call).
    """

    def __init__(
        self,
        spec: ProjectionSpec,
        sizes: Sequence[int],
        max_block_elems: int = 1 << 22,
        cache_bytes: int = 256 << 20,
    ) -> None:
        self.spec = spec
        self.sizes = list(sizes)
        self.rows_per_block = max(1, max_block_elems // spec.dim)
        self._cache: dict[tuple[int, int, torch.dtype, torch.device], torch.Tensor] = {}
        self._cache_left = cache_bytes
        #: entries of P generated at the last call that were not cached (0: all cached)
        self.regenerated = 0

    def _slice(
        self, param: int, start: int, stop: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        key = (param, start, dtype, device)
        if key in self._cache:
            return self._cache[key]
        gen = torch.Generator().manual_seed(derive_seed(self.spec.seed, 7_919 * param + start))
        block = _gaussian_or_signs((stop - start, self.spec.dim), self.spec.rademacher, gen)
        block = (block / math.sqrt(self.spec.dim)).to(dtype=dtype, device=device)
        nbytes = block.numel() * block.element_size()
        if nbytes <= self._cache_left:
            self._cache[key] = block
            self._cache_left -= nbytes
        else:
            self.regenerated += block.numel()
        return block

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The whole ``Pᵀ`` (p × k): for tests and small problems only."""
        cols = []
        for j, size in enumerate(self.sizes):
            for s in range(0, size, self.rows_per_block):
                cols.append(
                    self._slice(
                        j, s, min(size, s + self.rows_per_block), dtype, torch.device("cpu")
                    )
                )
        return torch.cat(cols, dim=0)

    def __call__(self, blocks: Sequence[torch.Tensor]) -> torch.Tensor:
        """Project per-example gradient blocks, each (batch, size_j), to (batch, k)."""
        if len(blocks) != len(self.sizes):
            raise ValueError(f"expected {len(self.sizes)} blocks, got {len(blocks)}")
        g0 = blocks[0]
        self.regenerated = 0
        out = torch.zeros(g0.shape[0], self.spec.dim, dtype=g0.dtype, device=g0.device)
        for j, g in enumerate(blocks):
            for s in range(0, self.sizes[j], self.rows_per_block):
                e = min(self.sizes[j], s + self.rows_per_block)
                out.addmm_(g[:, s:e], self._slice(j, s, e, g.dtype, g.device))
        return out


class KroneckerProjector(AbstractProjector):
    """Projects each hooked layer's per-example gradient ``G = e ãᵀ`` ((out, in'), summed
    over positions for Conv2d; ã = the input or patch with a 1 appended for a selected bias)
    with r independent Kronecker-product blocks: ``φ = [vec(U_c G V_cᵀ)]_c / √k``, the first
    k of the r·m² entries, layers summed. U_c, V_c are i.i.d. Gaussian (or ±1) m × out and
    m × in', m = ``block``, r = ⌈k/m²⌉, so ``E[φ·φ'] = ⟨G, G'⟩`` like a dense projection.

    :meth:`project_factors` is the fast path (from ã and e, never forming G);
    ``__call__`` (from explicit gradients) is its slow twin.

    Args:
        spec: projection settings (k, seed, Rademacher).
        layers: per layer, ``(out, n_in, bias)``: output width, input (patch) width of the
            selected weight (0 when only the bias is selected), and whether the bias is.
        block: m above.
    """

    def __init__(
        self, spec: ProjectionSpec, layers: Sequence[tuple[int, int, bool]], block: int
    ) -> None:
        self.spec = spec
        self.layers = list(layers)
        self.block = block
        self._factors: dict[tuple[int, torch.dtype, torch.device], tuple[torch.Tensor, ...]] = {}

    def factors(
        self, layer: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U / √k, V)`` of a layer, (r·m, out) and (r·m, in'): the projection's scale is
        folded into U; V's last column multiplies the bias input 1 when the bias is
        selected."""
        key = (layer, dtype, device)
        if key not in self._factors:
            out_dim, n_in, bias = self.layers[layer]
            rows = -(-self.dim // self.block**2) * self.block
            gen = torch.Generator().manual_seed(derive_seed(self.spec.seed, 104_729 * (layer + 1)))
            u = _gaussian_or_signs((rows, out_dim), self.spec.rademacher, gen)
            v = _gaussian_or_signs((rows, n_in + int(bias)), self.spec.rademacher, gen)
            u = u / math.sqrt(self.dim)
            self._factors[key] = (
                u.to(dtype=dtype, device=device),
                v.to(dtype=dtype, device=device),
            )
        u, v = self._factors[key]
        return u, v

    def project_factors(
        self,
        layer: int,
        a: torch.Tensor,
        e: torch.Tensor,
        acc: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A layer's blocks ``U_c G V_cᵀ`` from its inputs ``a`` (batch, n_in, positions;
        ignored when only the bias is selected) and output gradients ``e``
        (batch, out, positions), added to ``acc`` (batch, r, m, m) in place (a new tensor
        when ``acc`` is None). The features are the first k entries of the flattened sum."""
        _, n_in, bias = self.layers[layer]
        u, v = self.factors(layer, e.dtype, e.device)
        m, batch, steps = self.block, e.shape[0], e.shape[2]
        if steps == 1:  # Linear: two GEMMs, then an outer product per block
            ue = (e[:, :, 0] @ u.T).view(batch, -1, m, 1)  # (B, r, m, 1)
            if n_in and bias:  # ã = [a, 1]: V ã = V_w a + v_b, without concatenating
                va = torch.addmm(v[:, -1], a[:, :, 0], v[:, :-1].T)
            elif n_in:
                va = a[:, :, 0] @ v.T
            else:
                va = v[:, -1].expand(batch, -1)
            va = va.reshape(batch, -1, 1, m)
            return ue * va if acc is None else acc.addcmul_(ue, va)
        # Conv2d: sum the per-position outer products
        parts = ([a] if n_in else []) + ([torch.ones_like(e[:, :1])] if bias else [])
        a = torch.cat(parts, dim=1)
        ue4 = torch.einsum("ko,bot->bkt", u, e).view(batch, -1, m, steps)
        va4 = torch.einsum("ki,bit->bkt", v, a).view(batch, -1, m, steps)
        blocks = torch.matmul(ue4, va4.transpose(2, 3))
        return blocks if acc is None else acc.add_(blocks)

    def project_terms(
        self,
        unit: int,
        terms: Sequence[Term],
        bias: torch.Tensor | None,
        n: int,
        acc: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A unit's blocks ``U_c G V_cᵀ`` of ``G = [Σ_terms Σ_t left_t right_tᵀ | bias]``,
        from the factors (LoGra: ``Σ_t (U left_t)(V right_t)ᵀ``; an indexed (Embedding)
        term's ``U left_t`` is a column of U), never forming G; added to ``acc``
        (n, r, m, m) in place (a new tensor when None). ``bias``: (n, rows), the
        per-example gradient of the bias folded into the unit's last column."""
        _, n_in, has_bias = self.layers[unit]
        like = bias if bias is not None else terms[0].right if terms else None
        if acc is None:
            dtype = like.dtype if like is not None else torch.get_default_dtype()
            device = like.device if like is not None else torch.device("cpu")
            r = -(-self.dim // self.block**2)
            acc = torch.zeros(n, r, self.block, self.block, dtype=dtype, device=device)
        if like is None:
            return acc
        u, v = self.factors(unit, like.dtype, like.device)
        m = self.block
        for t in terms:
            ul = u.T[t.left] if t.indexed else t.left @ u.T  # (n, N, r·m)
            vr = t.right @ v[:, :n_in].T
            tokens = ul.shape[1]
            acc.add_(
                torch.einsum(
                    "bnci,bncj->bcij",
                    ul.reshape(n, tokens, -1, m),
                    vr.reshape(n, tokens, -1, m),
                )
            )
        if bias is not None and has_bias:
            ub = (bias @ u.T).view(n, -1, m, 1)
            acc.addcmul_(ub, v[:, -1].view(1, -1, 1, m))
        return acc

    def __call__(self, blocks: Sequence[torch.Tensor]) -> torch.Tensor:
        """The slow twin: project explicit per-example layer gradients, each
        (batch, out·in') (``G`` flattened row-major), to (batch, k)."""
        if len(blocks) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} blocks, got {len(blocks)}")
        out = None
        for j, g in enumerate(blocks):
            u, v = self.factors(j, g.dtype, g.device)
            grad = g.reshape(g.shape[0], u.shape[1], v.shape[1])
            m = self.block
            uc, vc = u.view(-1, m, u.shape[1]), v.view(-1, m, v.shape[1])
            part = torch.einsum("cio,boj,cnj->bcin", uc, grad, vc).reshape(g.shape[0], -1)
            out = part if out is None else out + part
        assert out is not None
        return out[:, : self.dim]
