"""Checks of scalar arguments, one place for the rule: bad input gets a one-line ``ValueError``
that names the argument, the value and what was expected."""
from __future__ import annotations

import math

import numpy as np


def check_int(value, name, minimum=0, what=None) -> int:
    """``value`` as an ``int`` if it is an integer (not a bool) ``>= minimum``; else a ValueError
    ``"<name> must be <what>, got <value>"`` (``what`` defaults to ``"an integer >= minimum"``)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be {what or f'an integer >= {minimum}'}, got {value!r}")
    return int(value)


def check_number(name, value, expected, ok=lambda x: True) -> float:
    """``float(value)`` if it is finite and ``ok``; else a ValueError naming ``name``:
    ``"<name> must be a number <expected>, got <value>"`` when it is not a number at all,
    ``"<name> must be <expected>, got <value>"`` when it is out of range.

    A Python float, never ``np.float64``: under NumPy 2 promotion a NumPy float64 scalar would
    silently compute float32 arithmetic in float64 (and break bit-exact resume).
    """
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number {expected}, got {value!r}") from None
    if isinstance(value, bool) or not (math.isfinite(x) and ok(x)):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return x
