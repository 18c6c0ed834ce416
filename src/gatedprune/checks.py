"""Checks of scalar arguments shared by the training loop (:mod:`gatedprune.train`) and the
budget snap (:mod:`gatedprune.snap`): a positive int, a finite non-negative or positive number."""

from __future__ import annotations

import math
import numbers


def _positive_int(name: str, value: object) -> int:
    """``value`` as a Python int > 0 (numpy integers accepted; bools, floats refused).

    >>> import numpy as np
    >>> _positive_int("epochs", np.int64(5))
    5
    >>> _positive_int("epochs", 2.5)
    Traceback (most recent call last):
    TypeError: epochs must be an int, got 2.5 (float)
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # numpy ints too
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{name} must be an int > 0, got {value!r}")
    return int(value)


def _positive_float(name: str, value: object, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy floats too
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    v = float(value)
    ok = v >= 0 if allow_zero else v > 0
    if not ok or not math.isfinite(v):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value}")
    return v
