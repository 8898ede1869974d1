"""Settings that are one of a few named choices: enums, never strings compared inside the
library. Users may pass a member or its value (as written in configs and on the command
line); :meth:`Choice.of` converts once, where the setting enters."""

from __future__ import annotations

import enum
from typing import TypeVar

from .errors import ConfigError

C = TypeVar("C", bound="Choice")


class Choice(enum.Enum):
    """Base of datatrace's setting enums (each member's value is its config spelling)."""

    @classmethod
    def of(cls: type[C], value: C | str, setting: str) -> C:
        """The member for ``value`` (a member, or its value); anything else is a
        :class:`ConfigError` naming ``setting`` and the choices."""
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(
                f"{setting} must be one of {[m.value for m in cls]} (or "
                f"{cls.__module__.split('.')[0]}'s {cls.__name__} enum), got {value!r}"
            ) from None
