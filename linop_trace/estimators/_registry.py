"""Named estimators: ``method="hutch++"`` looks the name up here."""

from __future__ import annotations

from typing import Any

from ._base import Estimator

__all__ = ["available_methods", "get_estimator", "register_estimator"]

_REGISTRY: dict[str, Estimator] = {}


def register_estimator(name: str, estimator: Estimator, *, overwrite: bool = False) -> None:
    """Make ``estimator`` available as ``method=name`` in :func:`trace` and :func:`diagonal`.

    Parameters
    ----------
    name : str
        Case-insensitive name.
    estimator : Estimator
        An object with ``trace(operator, request)`` and/or ``diagonal(operator, request)``.
    overwrite : bool
        Replacing an existing name must be asked for.

    Examples
    --------
    >>> from linop_trace import register_estimator, available_methods
    >>> from linop_trace.estimators import Hutchinson
    >>> register_estimator("gauss-hutch", Hutchinson(probe="gaussian"))
    >>> "gauss-hutch" in available_methods()
    True
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"estimator name must be a non-empty str, got {name!r}")
    if not (
        callable(getattr(estimator, "trace", None))
        or callable(getattr(estimator, "diagonal", None))
    ):
        raise TypeError(f"estimator {estimator!r} has neither a `trace` nor a `diagonal` method")
    key = name.lower()
    if key in _REGISTRY and not overwrite and _REGISTRY[key] is not estimator:
        raise ValueError(f"an estimator named {name!r} exists; pass overwrite=True to replace it")
    _REGISTRY[key] = estimator


def available_methods(quantity: str | None = None) -> list[str]:
    """Registered method names, optionally only those that estimate ``quantity``."""
    names = sorted(_REGISTRY)
    if quantity is None:
        return names
    return [n for n in names if _supports(_REGISTRY[n], quantity)]


def _supports(estimator: Any, quantity: str) -> bool:
    if isinstance(estimator, Estimator):
        return estimator.supports(quantity)
    return callable(getattr(estimator, quantity, None))


def get_estimator(method: Any, quantity: str) -> Any:
    """Resolve a name or an estimator object; unknown names list the known ones."""
    if isinstance(method, str):
        key = method.lower()
        if key not in _REGISTRY:
            raise ValueError(
                f"unknown method {method!r}; known methods are: "
                f"{', '.join(available_methods(quantity))}"
            )
        estimator = _REGISTRY[key]
    else:
        estimator = method
    if not _supports(estimator, quantity):
        name = getattr(estimator, "name", repr(estimator))
        raise ValueError(
            f"method {name!r} does not estimate a {quantity}; methods that do: "
            f"{', '.join(available_methods(quantity))}"
        )
    return estimator
