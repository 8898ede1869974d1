"""The exceptions datatrace raises on bad input; every one is a :class:`DatatraceError`.

Hierarchy::

    DatatraceError
    ├── ConfigError           a setting is invalid (negative damping, projection_dim < 1,
    │                         unknown parameter names); the message names the fix
    ├── DataError             the data cannot be used (empty, mismatched lengths, labels out
    │   │                     of range, wrong shapes)
    │   └── NonFiniteError    a loss or gradient is NaN/inf; ``.indices`` lists the examples
    ├── ModelError            the model cannot be attributed (no trainable parameters)
    ├── CheckpointError       a checkpoint is missing, corrupt or does not fit the model
    └── StoreError            a feature store is unusable
        ├── StoreMismatchError  written with other settings, checkpoints or data
        └── StoreCorruptError   unreadable, truncated or not a datatrace store
"""

from __future__ import annotations

from collections.abc import Sequence


class DatatraceError(Exception):
    """Base class of every error datatrace raises on purpose."""


class ConfigError(DatatraceError, ValueError):
    """An invalid setting; the message says which value would work."""


class DataError(DatatraceError, ValueError):
    """Data that cannot be attributed (empty, mismatched, out of range)."""


class NonFiniteError(DataError):
    """A NaN or infinite loss or gradient; ``indices`` are the offending example indices."""

    def __init__(self, message: str, indices: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.indices = list(indices)


class ModelError(DatatraceError, ValueError):
    """A model that cannot be attributed (e.g. it has no trainable parameters)."""


class CheckpointError(DatatraceError, ValueError):
    """A checkpoint that is missing, corrupt, or whose parameters do not fit the model."""


class StoreError(DatatraceError):
    """A feature store that cannot be used."""


class StoreMismatchError(StoreError):
    """A store written with other settings, checkpoints or data than requested."""


class StoreCorruptError(StoreError):
    """A store that is unreadable, truncated, or was not written by datatrace."""
