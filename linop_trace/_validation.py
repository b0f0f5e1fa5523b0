"""Shared checks with messages that name the offending argument (one helper per rule)."""

from __future__ import annotations

import numbers
from typing import Any

__all__ = ["check_num_matvecs", "check_positive_int", "check_square", "check_tolerance"]


def check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    return int(value)


def check_square(operator: Any, quantity: str) -> int:
    rows, cols = operator.shape
    if rows != cols:
        raise ValueError(f"{quantity} needs a square operator, got shape {operator.shape}")
    return rows


def check_num_matvecs(num_matvecs: Any, method: str, minimum: int) -> int:
    """Validate a budget of operator applications against a method's minimum."""
    if isinstance(num_matvecs, bool) or not isinstance(num_matvecs, numbers.Integral):
        raise TypeError(f"`num_matvecs` must be an int, got {type(num_matvecs).__name__}")
    if num_matvecs < minimum:
        raise ValueError(
            f"method {method!r} needs num_matvecs >= {minimum}, got num_matvecs={num_matvecs}"
        )
    return int(num_matvecs)


def check_tolerance(rtol: Any, atol: Any, confidence: Any) -> None:
    if rtol is None and atol is None and type(confidence) is float and 0 < confidence < 1:
        return  # (the common call, checked at every estimate)
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value) >= 0
        ):
            raise ValueError(f"`{name}` must be a non-negative number, got {value!r}")
    if (
        isinstance(confidence, bool)
        or not isinstance(confidence, numbers.Real)
        or not 0 < float(confidence) < 1
    ):
        raise ValueError(f"`confidence` must lie in (0, 1), got {confidence!r}")
