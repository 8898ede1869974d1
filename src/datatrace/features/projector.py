"""Random projections of per-example gradients, seeded and streamed.

:class:`RandomProjector` maps a gradient split into named blocks (one per parameter) to
``P g`` with ``P ∈ R^{k×p}`` and ``E[PᵀP] = I``: entries are i.i.d. Gaussian (or Rademacher)
scaled by ``1/√k``. ``P`` is generated block by block from a seed derived from the base
seed and the block's position, so it is identical across processes, devices, batches and
query/training data, and is never held larger than ``max_block_elems`` at once (blocks are
kept in memory only while their total stays under ``cache_bytes``).

References:
    Johnson and Lindenstrauss (1984); Pruthi et al. 2020 (TracIn-RP); Park et al. 2023 (TRAK).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..core.errors import ConfigError


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
        cache_bytes: keep generated slices while their total stays under this.
    """

    def __init__(
        self,
        spec: ProjectionSpec,
        sizes: Sequence[int],
        max_block_elems: int = 1 << 22,
        cache_bytes: int = 64 << 20,
    ) -> None:
        self.spec = spec
        self.sizes = list(sizes)
        self.rows_per_block = max(1, max_block_elems // spec.dim)
        self._cache: dict[tuple[int, int, torch.dtype, torch.device], torch.Tensor] = {}
        self._cacheable = sum(self.sizes) * spec.dim * 8 <= cache_bytes

    def _slice(
        self, param: int, start: int, stop: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        key = (param, start, dtype, device)
        if key in self._cache:
            return self._cache[key]
        gen = torch.Generator().manual_seed(
            (self.spec.seed * 1_000_003 + param * 7_919 + start) % (2**63 - 1)
        )
        shape = (stop - start, self.spec.dim)
        if self.spec.rademacher:
            block = torch.randint(0, 2, shape, generator=gen, dtype=torch.int8) * 2 - 1
            block = block.to(torch.float64)
        else:
            block = torch.randn(shape, generator=gen, dtype=torch.float64)
        block = (block / math.sqrt(self.spec.dim)).to(dtype=dtype, device=device)
        if self._cacheable:
            self._cache[key] = block
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
        out = torch.zeros(g0.shape[0], self.spec.dim, dtype=g0.dtype, device=g0.device)
        for j, g in enumerate(blocks):
            for s in range(0, self.sizes[j], self.rows_per_block):
                e = min(self.sizes[j], s + self.rows_per_block)
                out.addmm_(g[:, s:e], self._slice(j, s, e, g.dtype, g.device))
        return out
