"""Named estimators: ``method="hutch++"`` looks the name up here."""

from __future__ import annotations

from typing import Any

from ._base import Estimator

__all__ = ["available_methods", "builtin", "get_estimator", "register_estimator"]

_REGISTRY: dict[str, Estimator] = {}
#: The package's own estimators by name, whatever users register over them: what
#: ``method="auto"`` composes.
_BUILTIN: dict[str, Estimator] = {}


def builtin(name: str) -> Estimator:
    """The package's own estimator registered as ``name`` (not a user's replacement)."""
    return _BUILTIN[name]


def register_builtin(name: str, estimator: Estimator) -> None:
    """Register one of the package's own estimators (also reachable by :func:`builtin`)."""
    _BUILTIN[name] = estimator
    register_estimator(name, estimator)


def register_estimator(name: str, estimator: Estimator, *, overwrite: bool = False) -> None:
    """Make ``estimator`` available as ``method=name`` in :func:`trace` and :func:`diagonal`.

    Parameters
    ----------
    name : str
        Case-insensitive name.
    estimator : Estimator
        An object with ``trace(request)`` and/or ``diagonal(request)`` (see
        :class:`~linop_trace.Estimator`).
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
    _check_signature(estimator)
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


def registered(name: str) -> Estimator | None:
    """The estimator registered as ``name`` now (``None``: none), with no checks: for a
    caller that resolved the name with :func:`get_estimator` before and asks whether it
    still names the same object."""
    return _REGISTRY.get(name.lower())


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
    elif isinstance(method, type):
        estimator = _instance_of(method)
    else:
        estimator = method
    if not isinstance(method, str):
        _check_signature(estimator)
    if not _supports(estimator, quantity):
        name = getattr(estimator, "name", repr(estimator))
        raise ValueError(
            f"method {name!r} does not estimate a {quantity}; methods that do: "
            f"{', '.join(available_methods(quantity))}"
        )
    return estimator


def _instance_of(cls: type) -> Any:
    """``method=Hutchinson`` (the class where an instance is meant): its default instance,
    as ``method=Hutchinson()`` would give; a class that needs arguments, or one that is not
    an estimator, gets an error that names the mistake."""
    if not (issubclass(cls, Estimator) or callable(getattr(cls, "trace", None))):
        raise TypeError(
            f"method must be a method name or an estimator instance, got the class {cls.__name__}"
        )
    try:
        return cls()
    except TypeError as error:
        raise TypeError(
            f"method={cls.__name__} is a class; it needs arguments to become an estimator "
            f"({error}): pass an instance, method={cls.__name__}(...)"
        ) from None


def _check_signature(estimator: Any) -> None:
    """Refuse the former ``trace(operator, request)`` signature with a message that says
    what changed (an estimator now gets the request only, never the operator)."""
    import inspect

    for quantity in ("trace", "diagonal"):
        method = getattr(estimator, quantity, None)
        if not callable(method):
            continue
        try:
            parameters = [
                p
                for p in inspect.signature(method).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
            ]
        except (TypeError, ValueError):  # builtins without a signature
            continue
        if len(parameters) >= 2:
            raise TypeError(
                f"estimator {estimator!r}: `{quantity}` takes {len(parameters)} arguments, but "
                f"an estimator's `{quantity}(request)` gets the EstimationRequest alone (its "
                "products request.matmat / request.adjoint, probes and budget; the operator "
                "itself is not passed)"
            )
