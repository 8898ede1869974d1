"""The feature store's interface in RAM (:class:`MemoryFeatureStore`): temporary features
(``store=None``) that fit in memory, where writing them to disk would only cost time."""

from __future__ import annotations

from typing import Any

import torch

from ..core import distributed
from ..core.data import batch_ranges


class MemoryFeatureStore:
    """The :class:`FeatureStore` interface, in RAM: for temporary features (``store=None``)
    that fit in memory, where writing them to disk would only cost time.

    Args:
        layout: feature name -> width.
        n: number of examples.
        n_checkpoints: number of checkpoints.
        dtype: feature dtype.
        chunk_size: examples per chunk.
        device: where the arrays live (the model's device: on a GPU, scoring then reads
            features without host-to-device copies).
    """

    path = None

    def __init__(
        self,
        layout: dict[str, int],
        n: int,
        n_checkpoints: int,
        dtype: torch.dtype,
        chunk_size: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.manifest: dict[str, Any] = {"layout": layout, "n": n, "n_checkpoints": n_checkpoints}
        self.n = n
        self.chunk_size = chunk_size
        # empty, not zeros: every chunk is written before it is read (a zeroing pass over
        # gigabytes of features costs about as much as writing them)
        self._arrays = {
            (c, name): torch.empty(n, width, dtype=dtype, device=device)
            for c in range(n_checkpoints)
            for name, width in layout.items()
        }
        self._done: dict[int, set[int]] = {c: set() for c in range(n_checkpoints)}

    def chunks(self) -> list[tuple[int, int]]:
        return batch_ranges(self.chunk_size, 0, self.n)

    def done(self, c: int) -> set[int]:
        return set(self._done[c])

    def slot(self, c: int, chunk: int) -> dict[str, torch.Tensor]:
        """Writable views of chunk ``chunk``'s rows at checkpoint ``c``: features computed
        into them need no copy (:meth:`write` them to mark the chunk done)."""
        start, stop = self.chunks()[chunk]
        return {name: self._arrays[(c, name)][start:stop] for name in self.manifest["layout"]}

    def write(self, c: int, chunk: int, feats: dict[str, torch.Tensor]) -> None:
        start, stop = self.chunks()[chunk]
        for name, t in feats.items():
            dest = self._arrays[(c, name)][start:stop]
            if t.data_ptr() != dest.data_ptr() or t.shape != dest.shape:  # else: in place
                dest.copy_(t.detach())
        self._done[c].add(chunk)

    def commit(self) -> None:
        """Nothing to flush."""

    def merge_ranks(self) -> None:
        """Under torchrun: every rank computed its own chunks into zeros; one all-reduce
        (sum) gives every rank all of them, bit-identical to one process."""
        chunks = self.chunks()
        for (c, _), t in self._arrays.items():  # the arrays start empty: zero the others
            for k, (start, stop) in enumerate(chunks):
                if k not in self._done[c]:
                    t[start:stop].zero_()
        for t in self._arrays.values():
            if t.dtype == torch.bfloat16:  # reduced as float32: exact (one rank's value + 0s)
                wide = t.float()
                distributed.all_sum(wide)
                t.copy_(wide)
            else:
                distributed.all_sum(t)
        full = set(range(len(self.chunks())))
        self._done = {c: set(full) for c in self._done}

    def read(self, c: int, start: int, stop: int) -> dict[str, torch.Tensor]:
        return {name: self._arrays[(c, name)][start:stop] for name in self.manifest["layout"]}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._arrays.values())
