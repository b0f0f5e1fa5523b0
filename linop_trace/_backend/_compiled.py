"""JAX compilation: compiled programs, pytree registration, matrix-product precision."""

from __future__ import annotations

import collections
import contextlib
import functools
from collections.abc import Callable
from typing import Any

import array_api_compat

from ._identity import _module_loaded

__all__ = [
    "caller_precision",
    "compiled",
    "compiles_estimates",
    "ensure_pytrees",
    "flat_program",
    "flatten",
    "is_array_like",
    "is_compiled_function",
    "jit",
    "product_precision",
    "register_pytree",
    "register_pytree_dataclass",
]


_JITTED: dict[Callable[..., Any], Callable[..., Any]] = {}


def jit(xp: Any, function: Callable[..., Any], num_static: int = 1) -> Callable[..., Any]:
    """``function(xp, *args)`` compiled by ``jax.jit`` for JAX (once, cached; ``xp`` and the
    next ``num_static - 1`` arguments static), as it is for other libraries.

    For the pure array algebra after an estimator's operator products: JAX runs dozens
    of small eager operations much slower than one compiled program. The function must
    not need concrete values (``concrete_float`` returns ``None`` inside)."""
    if not array_api_compat.is_jax_namespace(xp):
        return function
    compiled = _JITTED.get(function)
    if compiled is None:
        import jax

        ensure_pytrees()
        static = tuple(range(num_static))

        @functools.wraps(function)
        def precise(*args: Any) -> Any:
            with jax.default_matmul_precision("highest"):
                return function(*args)

        compiled = _JITTED[function] = jax.jit(precise, static_argnums=static)
    return compiled


def compiles_estimates(xp: Any) -> bool:
    """Whether estimators should hand this library their post-product algebra as one
    compiled program (:func:`jit`) rather than work through it in cache-sized row blocks:
    JAX, whose eager operations each cost tens of microseconds and whose compiler fuses
    the passes (its arrays are immutable, so blocks would be copies anyway)."""
    return array_api_compat.is_jax_namespace(xp)


def is_compiled_function(function: Any) -> bool:
    """Whether ``function`` was compiled by ``jax.jit``: a function its author has made
    traceable (pure, no host reads), whose arrays closed over are fixed when it is first
    traced. An estimate may then trace it into its own program, with the same result."""
    if not _module_loaded("jax"):
        return False
    import jax

    return isinstance(function, jax.stages.Wrapped)


# ---------------------------------------------------------------- JAX compilation
# Under JAX a fixed-budget estimate runs as one compiled program: operators and estimates
# are pytrees (their arrays are the program's arguments and results, not constants), and
# the program is compiled once per estimator, settings, shapes and dtypes.

_PYTREES: list[tuple[type, Callable[..., Any], Callable[..., Any]]] = []
_REGISTERED: set[type] = set()


def register_pytree(cls: type, flatten: Callable[..., Any], unflatten: Callable[..., Any]) -> None:
    """Make ``cls`` a JAX pytree (now if JAX is loaded, else when it first compiles)."""
    _PYTREES.append((cls, flatten, unflatten))
    if _module_loaded("jax"):
        ensure_pytrees()


def register_pytree_dataclass(cls: type) -> type:
    """Make a dataclass a JAX pytree (a class decorator): its fields are children, except
    those whose ``metadata`` says ``static`` (Python values: flags, counts), which the
    compiled program keeps as part of its structure."""
    import dataclasses

    names = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("static")]
    static = [f.name for f in dataclasses.fields(cls) if f.metadata.get("static")]

    def flatten(value: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        return (
            tuple(getattr(value, name) for name in names),
            tuple(getattr(value, name) for name in static),
        )

    def unflatten(aux: tuple[Any, ...], children: tuple[Any, ...]) -> Any:
        return cls(**dict(zip(names, children)), **dict(zip(static, aux)))

    def unflatten_fields(aux: tuple[Any, ...], children: tuple[Any, ...]) -> Any:
        # the fields set as they are (no __init__: a frozen dataclass sets each through
        # object.__setattr__, 2 us of every compiled estimate's result on the CPU)
        value: Any = object.__new__(cls)
        fields = value.__dict__
        fields.update(zip(names, children))
        fields.update(zip(static, aux))
        return value

    plain = not hasattr(cls, "__post_init__") and not hasattr(cls, "__slots__")
    register_pytree(cls, flatten, unflatten_fields if plain else unflatten)
    return cls


def ensure_pytrees() -> None:
    """Register every class given to :func:`register_pytree` with JAX (once each)."""
    import jax

    for cls, flatten, unflatten in _PYTREES:
        if cls not in _REGISTERED:
            jax.tree_util.register_pytree_node(cls, flatten, unflatten)
            _REGISTERED.add(cls)


def is_array_like(x: Any) -> bool:
    """Whether ``x`` is an array (or a JAX tracer), not a Python number or string."""
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, (int, float))


_PROGRAMS: dict[Any, Callable[..., Any]] = {}


def compiled(function: Callable[..., Any], num_static: int) -> Callable[..., Any]:
    """``function`` compiled whole by ``jax.jit`` (its first ``num_static`` arguments
    static), with the estimator's own matrix products at full precision (on NVIDIA GPUs
    JAX's default float32 product is TF32, with a 10-bit mantissa): the operator's products
    go through :func:`product_precision`, at the caller's. Built once per function."""
    program = _PROGRAMS.get(function)
    if program is None:
        import jax

        ensure_pytrees()

        @functools.wraps(function)
        def precise(*args: Any) -> Any:
            with jax.default_matmul_precision("highest"):
                return function(*args)

        program = _PROGRAMS[function] = jax.jit(precise, static_argnums=tuple(range(num_static)))
    return program


class FlatProgram:
    """``function(*static, *arguments)`` compiled by ``jax.jit`` for one tuple of static
    arguments and one structure of the dynamic ``arguments``, and called with the
    arguments' arrays alone (in :func:`flatten` order); it returns the function's result.

    The same program as :func:`compiled`'s, called leaner: ``jax.jit`` given the operator
    and the Estimate as pytrees, with static arguments, runs its pytree handling (Python
    callbacks for the operator's structure, the settings' hash and equality) before the
    program can start, 0.1 of a 512 x 20 product on the CPU (1.17 against 1.06-1.08 of
    it, the program included). A caller that keeps the program for its plan pays none of
    that per call. The result is rebuilt after the program is dispatched, while it runs.
    """

    def __init__(self, function: Callable[..., Any], static: tuple[Any, ...], structure: Any):
        import jax

        self._result_structure: Any = None
        self._positions: tuple[int, ...] = ()  # result leaf i is output positions[i]

        def flat(*leaves: Any) -> list[Any]:
            arguments = jax.tree_util.tree_unflatten(structure, leaves)
            with jax.default_matmul_precision("highest"):
                result = function(*static, *arguments)
            results, self._result_structure = jax.tree_util.tree_flatten(result)
            # one output per distinct array: a result that holds an array twice (samples
            # kept for the interval's shape and for refine) would have it copied into a
            # buffer of its own, a copy and a buffer per program call
            outputs: list[Any] = []
            seen: dict[int, int] = {}
            positions = []
            for leaf in results:
                position = seen.get(id(leaf))
                if position is None:
                    position = seen[id(leaf)] = len(outputs)
                    outputs.append(leaf)
                positions.append(position)
            self._positions = tuple(positions)
            return outputs

        self._jitted = jax.jit(flat)

    def __call__(self, *leaves: Any) -> Any:
        outputs = self._jitted(*leaves)
        return self._result_structure.unflatten([outputs[i] for i in self._positions])


_FLAT_PROGRAMS: collections.OrderedDict[Any, FlatProgram] = collections.OrderedDict()
#: Flat programs kept (least recently made dropped first): each holds its compiled code.
FLAT_PROGRAMS_KEPT = 64


def flatten(tree: Any) -> tuple[list[Any], Any]:
    """A pytree's arrays and its structure (``jax.tree_util.tree_flatten``)."""
    import jax

    ensure_pytrees()
    return jax.tree_util.tree_flatten(tree)  # type: ignore[no-any-return]


def flat_program(
    function: Callable[..., Any], static: tuple[Any, ...], structure: Any
) -> FlatProgram:
    """The :class:`FlatProgram` of ``function`` for these static arguments and this
    structure of the others (from :func:`flatten` of the tuple of them), made once and
    shared: plans that differ only in what the program does not see share its code."""
    key = (function, static, structure)
    program = _FLAT_PROGRAMS.get(key)
    if program is None:
        program = _FLAT_PROGRAMS[key] = FlatProgram(function, static, structure)
        if len(_FLAT_PROGRAMS) > FLAT_PROGRAMS_KEPT:
            _FLAT_PROGRAMS.popitem(last=False)
    return program


def caller_precision(xp: Any) -> str | None:
    """The matrix-product precision the caller's own ``A @ Z`` gets (JAX's
    ``jax_default_matmul_precision``; ``None``: the default, TF32 for float32 on NVIDIA
    GPUs), so that the operator's products inside an estimate are those of the caller."""
    if not array_api_compat.is_jax_namespace(xp):
        return None
    import jax

    return jax.config.jax_default_matmul_precision  # type: ignore[attr-defined,no-any-return]


def product_precision(xp: Any, precision: str | None) -> Any:
    """A context for an operator product at ``precision`` (JAX; a no-op elsewhere)."""
    if not array_api_compat.is_jax_namespace(xp):
        return contextlib.nullcontext()
    import jax

    return jax.default_matmul_precision(precision)
