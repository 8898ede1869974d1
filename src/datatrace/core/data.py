"""Uniform random access to training or query data.

Accepts what users have: a tuple/list of tensors or NumPy arrays ``(inputs, targets, ...)``
with a shared first dimension, a dict of such arrays (Hugging Face style batches), a
``torch.utils.data.Dataset``, or a ``DataLoader``. Examples are addressed by contiguous index
ranges so that featurization can resume from the first unfinished range after a crash.

**What the rows of S are, for a DataLoader.** Its dataset and collate function are used,
and its sampler decides *which* examples, never their order (attribution needs a fixed
order, the same on every call):

* sequential or shuffling (``shuffle=True``) over the whole dataset: every example, in
  dataset order (row i = ``dataset[i]``);
* a sampler over a subset (``SubsetRandomSampler``, a custom sampler or batch sampler):
  exactly the examples it yields, in increasing dataset index; ``source.indices[i]`` is the
  dataset index of row i;
* a sampler that draws with replacement (``WeightedRandomSampler``,
  ``RandomSampler(replacement=True)``) or repeats an example, or a random sampler whose
  order decides what ``drop_last=True`` drops: refused (:class:`DataError`), since it has
  no fixed set of examples.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)
from torch.utils.data import default_collate as _default_collate

from .errors import DataError

Batch = Any  # a tuple/list of tensors or a dict of tensors, leading dimension = examples


class ExampleSource:
    """A fixed, ordered collection of examples read in index ranges.

    Args:
        data: tensors ``(inputs, targets)``, a dict of tensors, a Dataset or a DataLoader.
        name: what the data is called in error messages ("training data", "queries").
    """

    def __init__(self, data: Any, name: str = "data") -> None:
        self.name = name
        self._tensors: Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | None = None
        self._dataset: Any = None
        self._collate: Callable[[list[Any]], Batch] = _default_collate
        if isinstance(data, ExampleSource):
            self.__dict__.update(data.__dict__)
            self.name = name
            return
        #: dataset index of each row (``None``: row i is example i)
        self.indices: torch.Tensor | None = None
        if isinstance(data, DataLoader):
            if isinstance(data.dataset, IterableDataset):
                raise DataError(
                    f"{name}: an IterableDataset has no fixed order or length; "
                    "materialise it into tensors or a map-style Dataset first"
                )
            self._dataset = data.dataset
            if data.collate_fn is not None:
                self._collate = data.collate_fn
            self.indices = _sampled_indices(data, name)
        elif isinstance(data, Dataset):
            if isinstance(data, IterableDataset):
                raise DataError(f"{name}: an IterableDataset has no fixed order or length")
            self._dataset = data
        elif isinstance(data, Mapping):
            self._tensors = {k: _as_tensor(v) for k, v in data.items()}
            self._check_tensors(list(self._tensors.items()))
        elif isinstance(data, (tuple, list)):
            self._tensors = tuple(_as_tensor(v) for v in data)
            self._check_tensors([(f"element {i}", t) for i, t in enumerate(self._tensors)])
        elif isinstance(data, (torch.Tensor, np.ndarray)):
            raise DataError(
                f"{name}: got a single tensor; pass a tuple (inputs, targets) so the loss "
                "has its targets"
            )
        else:
            raise DataError(
                f"{name}: expected a tuple of tensors, a dict of tensors, a Dataset or a "
                f"DataLoader, got {type(data).__name__}"
            )
        if len(self) == 0:
            raise DataError(f"{name} is empty: there is nothing to attribute")

    def _check_tensors(self, items: list[tuple[str, Any]]) -> None:
        if not items:
            raise DataError(f"{self.name}: no tensors given")
        lengths = {}
        for key, t in items:
            if not isinstance(t, torch.Tensor):
                raise DataError(f"{self.name}: {key} is a {type(t).__name__}, not a tensor")
            if t.dim() == 0:
                raise DataError(f"{self.name}: {key} is a scalar; need one row per example")
            if t.is_meta:
                raise DataError(
                    f"{self.name}: {key} is on the 'meta' device (shape only, no values); "
                    "materialise it (e.g. .to_empty(device='cpu') and fill it, or load the data)"
                )
            lengths[key] = t.shape[0]
        if len(set(lengths.values())) > 1:
            desc = ", ".join(f"{k}: {v}" for k, v in lengths.items())
            raise DataError(
                f"{self.name}: inputs and targets must have the same number of examples "
                f"(first dimension), got {desc}"
            )

    def __len__(self) -> int:
        if self.indices is not None:
            return int(self.indices.numel())
        if self._tensors is not None:
            first = (
                next(iter(self._tensors.values()))
                if isinstance(self._tensors, Mapping)
                else self._tensors[0]
            )
            return int(first.shape[0])
        return len(self._dataset)

    def batch(self, start: int, stop: int) -> Batch:
        """Examples ``start..stop-1`` as one batch (tuple or dict of tensors)."""
        if self._tensors is not None:
            if isinstance(self._tensors, Mapping):
                return {k: v[start:stop] for k, v in self._tensors.items()}
            return tuple(t[start:stop] for t in self._tensors)
        rows = range(start, stop) if self.indices is None else self.indices[start:stop].tolist()
        return self._collate([self._dataset[i] for i in rows])

    def take(self, indices: Sequence[int] | torch.Tensor) -> Batch:
        """The examples at ``indices`` (any order, repeats allowed) as one batch."""
        if self._tensors is not None:
            if isinstance(indices, torch.Tensor):
                idx = indices.to("cpu", torch.long)
            else:
                idx = torch.as_tensor(list(indices), dtype=torch.long)
            if isinstance(self._tensors, Mapping):
                return {k: v[idx] for k, v in self._tensors.items()}
            return tuple(t[idx] for t in self._tensors)
        rows = [int(i) for i in indices]
        if self.indices is not None:
            rows = self.indices[rows].tolist()
        return self._collate([self._dataset[i] for i in rows])

    def whole(self) -> Batch | None:
        """Every example as one batch when the data are tensors (no copy); else ``None``."""
        if self._tensors is None:
            return None
        return dict(self._tensors) if isinstance(self._tensors, Mapping) else tuple(self._tensors)

    def longest(self) -> int:
        """The row of the example with the most entries (tensor elements, sequence items,
        characters of text: what a collate function pads or tokenizes), read one example
        at a time without collating; the first of equals. Tensor data: 0 (one shape)."""
        if self._tensors is not None:
            return 0
        rows = range(len(self)) if self.indices is None else self.indices.tolist()
        best, at = -1, 0
        for row, i in enumerate(rows):
            size = _entries(self._dataset[i])
            if size > best:
                best, at = size, row
        return at

    def example_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape and dtype kind of one example's tensors, by position or key (from example 0)."""
        first = self.batch(0, 1)
        items = first.items() if isinstance(first, Mapping) else enumerate(first)
        return {str(k): tuple(v.shape[1:]) for k, v in items if isinstance(v, torch.Tensor)}

    def check_like(self, other: ExampleSource, lengths: tuple[int, int] | None = None) -> None:
        """Raise :class:`DataError` unless examples have ``other``'s structure and shapes
        (queries scored against training features must be the same kind of example);
        ``lengths``: token sequences of these lengths (this source's first example's,
        ``other``'s), so a part whose first dimension is that length may differ there
        (padded to its batch's longest) but in nothing else."""
        mine, theirs = self.example_shapes(), other.example_shapes()
        if mine.keys() != theirs.keys():
            raise DataError(
                f"{self.name} have parts {sorted(mine)}, {other.name} {sorted(theirs)}; "
                "pass queries in the same form as the training data"
            )
        for key in mine:
            a, b = mine[key], theirs[key]
            if lengths and len(a) == len(b) >= 1 and (a[0], b[0]) == lengths and a[1:] == b[1:]:
                continue  # another length: a sequence padded to its batch's longest
            if a != b:
                raise DataError(
                    f"{self.name}: part {key} of each example has shape {mine[key]}, in "
                    f"{other.name} {theirs[key]}; queries must have the training data's shape"
                )

    def ranges(self, batch_size: int) -> list[tuple[int, int]]:
        """Contiguous ``(start, stop)`` ranges covering every example once."""
        return batch_ranges(batch_size, 0, len(self))

    def fingerprint(self, batch_size: int = 1024) -> str:
        """A hash of every example (keys, shapes, dtypes and bytes), so that a store is never
        reused for data that changed anywhere. Tensors are hashed in place; a Dataset is
        read once for it."""
        h = hashlib.blake2b(f"n={len(self)}".encode(), digest_size=16)
        parts = (
            [self._tensors]
            if self._tensors is not None
            else (self.batch(s, e) for s, e in self.ranges(batch_size))
        )
        for part in parts:
            for where, t in _keyed_leaves(part):  # the key too: swapped columns differ
                if not isinstance(t, torch.Tensor):  # text or numbers a collate left as is
                    h.update(f"{where}={t!r}".encode())
                    continue
                hash_tensor(h, where, t)
        return h.hexdigest()


def _as_tensor(value: Any) -> Any:
    """NumPy arrays become tensors (shared memory, converted once); the rest is checked later."""
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise DataError("an object-dtype NumPy array is not numeric data; convert it first")
        return torch.from_numpy(np.ascontiguousarray(value))
    return value


def _sampled_indices(loader: DataLoader, name: str) -> torch.Tensor | None:
    """The dataset indices a loader's sampler selects (``None``: all, in dataset order)."""
    batch_sampler = loader.batch_sampler
    sampler = getattr(batch_sampler, "sampler", loader.sampler)
    n = len(loader.dataset)  # type: ignore[arg-type]
    whole = isinstance(batch_sampler, BatchSampler) and not (
        batch_sampler.drop_last and n % batch_sampler.batch_size
    )  # batches cover every example the sampler yields
    if isinstance(sampler, SequentialSampler) and whole:
        return None
    random_subset = isinstance(sampler, WeightedRandomSampler) or (
        isinstance(sampler, RandomSampler)
        and (sampler.replacement or sampler.num_samples != n or not whole)
    )
    if random_subset:
        raise DataError(
            f"{name}: the DataLoader's sampler draws a random set of examples (with "
            "replacement, another number of samples, or drop_last), so the examples to "
            "attribute are not fixed; pass the Dataset, a Subset, or a loader with "
            "shuffle=False and drop_last=False"
        )
    if isinstance(sampler, RandomSampler):
        return None  # shuffling the whole dataset: read in dataset order
    drawn = [int(i) for batch in batch_sampler for i in batch]  # type: ignore[union-attr]
    chosen = torch.tensor(sorted(set(drawn)), dtype=torch.long)
    if _another_set_each_pass(batch_sampler, sampler, drawn, whole=chosen.numel() == n):
        raise DataError(
            f"{name}: the DataLoader's sampler is random and drops other examples on every "
            "pass (drop_last=True), or selects another subset each time, so the examples to "
            "attribute are not fixed; pass drop_last=False (or a fixed Subset)"
        )
    if chosen.numel() != len(drawn):
        raise DataError(
            f"{name}: the DataLoader's sampler yields some examples more than once; "
            "attribution needs each example once (pass a Subset or SubsetRandomSampler)"
        )
    if chosen.numel() and (int(chosen[0]) < 0 or int(chosen[-1]) >= n):
        raise DataError(f"{name}: the sampler yields indices outside [0, {n})")
    if chosen.numel() == n:
        return None
    return chosen


def _another_set_each_pass(batch_sampler: Any, sampler: Any, drawn: list[int], whole: bool) -> bool:
    """Whether a (non-sequential) loader keeps another set of examples on another pass: a
    random sampler whose order decides what ``drop_last`` drops, or a random subset. Known
    random samplers are refused outright; others are iterated again (three more passes
    when ``drop_last`` drops some: a permutation may drop the same ones by chance); one
    that yields nothing on a second pass runs once and is taken as it came."""
    if isinstance(sampler, SequentialSampler):
        return False
    dropping = isinstance(batch_sampler, BatchSampler) and batch_sampler.drop_last
    if dropping and isinstance(sampler, SubsetRandomSampler) and len(drawn) < len(sampler):
        return True
    if whole and not dropping:
        return False
    kept = set(drawn)
    for _ in range(3 if dropping else 1):
        again = {int(i) for b in batch_sampler for i in b}
        if not again and kept:  # an iterator that runs once: nothing to compare, as before
            return False
        if again != kept:
            return True
    return False


def _entries(example: Any) -> int:
    """How many entries an example holds: the size of its tensors and arrays, the length of
    its sequences and strings, summed over its parts."""
    if isinstance(example, (torch.Tensor, np.ndarray)):
        return int(example.size if isinstance(example, np.ndarray) else example.numel())
    if isinstance(example, (str, bytes)):
        return len(example)
    if isinstance(example, Mapping):
        return sum(_entries(v) for v in example.values())
    if isinstance(example, (list, tuple)):
        if all(isinstance(v, (int, float)) for v in example):  # token ids: their count
            return len(example)
        return sum(_entries(v) for v in example)  # parts: a label counts one
    return 1


def leaves(batch: Batch) -> list[torch.Tensor]:
    """Every tensor of a (nested) batch."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for v in batch.values() for t in leaves(v)]
    if isinstance(batch, (tuple, list)):
        return [t for v in batch for t in leaves(v)]
    return []


def hash_tensor(h: Any, label: str, t: torch.Tensor) -> None:
    """Feed ``label``, the shape, dtype and bytes of ``t`` to the hash ``h`` (the data's and
    the checkpoints' fingerprints)."""
    t = t.detach().cpu().contiguous()
    h.update(f"{label}:{tuple(t.shape)}:{t.dtype}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")


def _keyed_leaves(batch: Batch, where: str = "") -> list[tuple[str, Any]]:
    """Every tensor (and string or number) of a (nested) batch with its key path."""
    if isinstance(batch, (torch.Tensor, str, bytes, int, float)):
        return [(where, batch)]
    if isinstance(batch, Mapping):
        return [x for k, v in batch.items() for x in _keyed_leaves(v, f"{where}/{k!r}")]
    if isinstance(batch, (tuple, list)):
        return [x for i, v in enumerate(batch) for x in _keyed_leaves(v, f"{where}/{i}")]
    return []


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``batch`` with ``fn`` applied to every tensor of it (nested dicts, tuples and lists
    keep their form; anything else is kept as it is)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch


def batch_to(batch: Batch, device: torch.device) -> Batch:
    """Move every tensor of a batch to ``device``."""
    return map_tensors(batch, lambda t: t.to(device))


def as_single_batch(example: Any) -> Any:
    """One example (no leading dimension) as a batch of one."""
    return map_tensors(example, lambda t: t.unsqueeze(0))


def batch_len(batch: Any) -> int:
    """Number of examples in a batch (tensor, tuple or dict of tensors)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        return batch_len(next(iter(batch.values())))
    return batch_len(batch[0])


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Examples start..stop-1 of a batch."""
    return map_tensors(batch, lambda t: t[start:stop])


def batch_ranges(batch_size: int, start: int, stop: int) -> list[tuple[int, int]]:
    """Contiguous ``(s, e)`` ranges covering ``start..stop-1`` in order, each ``batch_size``
    long except possibly the last. THE chunking arithmetic: data passes, resumable
    store chunks and ranges all use it, so chunk boundaries never drift apart."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    return [(s, min(s + batch_size, stop)) for s in range(start, stop, batch_size)]
