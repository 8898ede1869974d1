"""Peer libraries, one adapter module each: scores (n_test, n_train) in datatrace's convention
(positive = proponent), times from a ``harness.Clock``; peers are imported inside the
functions. The settings a benchmark and its adapters share are here."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass
class InfluenceSettings:
    damping: float  # lam, mean-loss convention: (H + lam I), H of the mean training loss
    batch_size: int
    cg_iters: int = 0
    lissa_depth: int = 1000
    lissa_batch: int = 50
    lissa_scale: float = 1.0
    arnoldi_rank: int = 50
    arnoldi_iter: int = 120

    def warm_up(self, n_train: int) -> InfluenceSettings:
        """Cheap settings for a warm-up run on ``n_train`` examples."""
        return replace(self, batch_size=min(self.batch_size, n_train), cg_iters=min(self.cg_iters, 3),
                       lissa_depth=min(self.lissa_depth, 20), lissa_batch=min(self.lissa_batch, n_train),
                       arnoldi_rank=min(self.arnoldi_rank, 10), arnoldi_iter=min(self.arnoldi_iter, 30))  # fmt: skip


@dataclass
class TrakSettings:
    proj_dim: int
    damping: float  # lam, datatrace's convention
    batch_size: int
    seed: int = 0
