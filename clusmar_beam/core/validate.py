"""The checks of numeric arguments, one place for all of them: each raises the caller's error type
(HacError, InputError, ValueError) with a message naming the argument and the value given."""
from __future__ import annotations

import math

import numpy as np


def check_int(name: str, value, minimum: int = 1, error: type[Exception] = ValueError) -> int:
    """value as an int, unless it is not an integer (bools are not) or is below `minimum`."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise error(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_number(name: str, value, minimum: float, strict: bool = False,
                 error: type[Exception] = ValueError) -> float:
    """value as a float, unless it is not a finite number >= minimum (> with `strict`)."""
    message = f"{name} must be a finite number {'>' if strict else '>='} {minimum:g}, got {value!r}"
    if isinstance(value, (bool, np.bool_)):
        raise error(message)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise error(message) from None
    if not math.isfinite(number) or number < minimum or (strict and number == minimum):
        raise error(message)
    return number
