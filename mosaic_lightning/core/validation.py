"""Checks of numeric options, shared by the components that validate their own arguments in ``__init__``.

Each raises ``ValueError`` naming the option (with its owner's prefix, e.g. ``"msp population"``) and what is
allowed, before any work starts.
"""

from __future__ import annotations

import math


def check_int(name: str, value, minimum: int) -> None:
    """An integer (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}; must be an integer >= {minimum}")


def check_positive(name: str, value) -> None:
    """A finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={value!r}; must be a finite number > 0")


def check_open_unit(name: str, value) -> None:
    """A number strictly between 0 and 1."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ValueError(f"{name}={value!r}; allowed values: 0 < {name.rpartition(' ')[2]} < 1")
