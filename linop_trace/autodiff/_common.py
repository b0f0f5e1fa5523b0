"""Pieces shared by the torch and JAX autodiff operators (no library names here)."""

from __future__ import annotations

import statistics
import threading
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from .._backend import is_unsupported_transform_error
from .._operators import LinearOperator

__all__ = [
    "WARMED_UP",
    "AutodiffOperator",
    "FallbackChain",
    "FastestRoute",
    "RouteTiming",
    "batch_weights",
    "split_data",
]


class AutodiffOperator(LinearOperator):
    """A :class:`LinearOperator` over the flattened variables of an autodiff problem.

    Adds :meth:`flatten` and :meth:`unflatten`, which move between the structure the user
    differentiates with respect to (a tensor, a list/tuple/dict of tensors, a pytree, the
    trainable parameters of a module) and the vector the operator acts on.

    Examples
    --------
    >>> import torch
    >>> from linop_trace import hessian
    >>> x = {"a": torch.ones(2, dtype=torch.float64), "b": torch.zeros(1, dtype=torch.float64)}
    >>> H = hessian(lambda v: (v["a"] ** 2).sum() * (1 + v["b"].sum()), x)
    >>> H.flatten(x).tolist()
    [1.0, 1.0, 0.0]
    >>> H.unflatten(H @ H.flatten(x))["b"].tolist()  # (H x) restored to the structure
    [4.0]
    """

    # the products cast a block to the variables' real dtype: a complex block goes through
    # as its real and imaginary parts (LinearOperator._by_real_parts)
    _real_products = True

    #: Moves between the user's structure and the vector (``flatten``, ``unflatten``).
    layout: Any

    #: Memory per column of a block product, in units of the column: forward-over-reverse
    #: products hold the tangents of the parameters and of the activations for every
    #: column at once (a heuristic; block sizes divide the device's free memory by it).
    COLUMN_FACTOR = 8

    def bytes_per_column(self) -> int:
        from .._blocks import itemsize

        return self.COLUMN_FACTOR * (self.shape[0] + self.shape[1]) * itemsize(self.xp, self.dtype)

    def flatten(self, structure: Any) -> Any:
        """The vector (length ``shape[1]``) holding the leaves of ``structure`` in order."""
        return self.layout.flatten(structure)

    def unflatten(self, vector: Any) -> Any:
        """The structure of the variables, filled from a vector of length ``shape[1]``."""
        if getattr(vector, "ndim", None) != 1 or vector.shape[0] != self.shape[1]:
            raise ValueError(
                f"unflatten expects a vector of length {self.shape[1]}, "
                f"got shape {tuple(getattr(vector, 'shape', ()))}"
            )
        return self.layout.unflatten(vector)


#: The product routes (by name) that have completed a call in this process. A route's
#: first call pays what the library does once per process (torch.func's first transform
#: took over a second, a hundred products of the digits MLP), so :class:`FastestRoute`
#: gives a route not named here an untimed warm-up column before it times it.
WARMED_UP: set[str] = set()

#: Serializes the switches of :class:`FallbackChain` (rare: once per chain and route), so
#: that threads failing on one route at once move the chain one step, with one warning.
_FALLBACK_LOCK = threading.Lock()


class FallbackChain:
    """Try product implementations in order; move to the next one (and warn once) where
    the function does not support one.

    An implementation is given up, for this chain's whole life, on an error that may mean
    the function does not support its transform
    (:func:`~linop_trace._backend.is_unsupported_transform_error`); the first one that
    works is remembered. Any other error (out of memory, an interrupt, a bug of the
    function) propagates unchanged, and the next call tries the same implementation again.
    If every implementation is unsupported, the error of the first is raised, since it is
    the one that describes the user's function best. Threads may share a chain: each
    switch happens once, with one warning.
    """

    def __init__(self, implementations: list[tuple[str, Callable[..., Any]]], what: str) -> None:
        self.implementations = implementations
        self.what = what
        self.index = 0

    # Chains of the same implementations compare equal (the compiled programs are cached
    # per user function), so that under JAX one compiled estimate serves every operator
    # built from the same function. The index is not part of it: it only moves forward,
    # and a program traced after a fallback has the fallback in it.
    def _key(self) -> tuple[Any, ...]:
        return (self.what, tuple(id(impl) for _, impl in self.implementations))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FallbackChain) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    @property
    def mode(self) -> str:
        return self.implementations[self.index][0]

    def __call__(self, *args: Any) -> Any:
        first_error: BaseException | None = None
        index = self.index
        while True:
            name, implementation = self.implementations[index]
            try:
                result = implementation(*args)
            except Exception as error:
                if not is_unsupported_transform_error(error):
                    raise  # transient, or the function's own bug: no route would help
                if first_error is None:
                    first_error = error
                if index + 1 >= len(self.implementations):
                    break
                index = self._fall_back(index, error)
            else:
                WARMED_UP.add(name)
                return result
        assert first_error is not None
        raise first_error

    def _fall_back(self, index: int, error: BaseException) -> int:
        """The implementation after ``index``, which failed with ``error``; the chain moves
        to it (and warns) unless another thread already moved past ``index``."""
        with _FALLBACK_LOCK:
            if self.index == index:
                name, following = self.implementations[index][0], self.implementations[index + 1][0]
                first_line = str(error).splitlines()[0] if str(error) else ""
                warnings.warn(
                    f"{self.what}: {name} failed for this function "
                    f"({type(error).__name__}: {first_line}); "
                    f"falling back to {following} from now on",
                    RuntimeWarning,
                    stacklevel=5,
                )
                self.index = index + 1
            return max(self.index, index + 1)


#: The narrowest block that is timed: a warm-up column and a timed one for each route.
MIN_TIMED_COLUMNS = 4
#: A block more than this many times wider than the last one timed is timed again.
RETIME_WIDTH_FACTOR = 2
#: The loop times at most this many columns of a block (one per 8 columns, at least one).
MAX_LOOP_TIMED_COLUMNS = 4


@dataclass(frozen=True)
class RouteTiming:
    """What ``mode="auto"`` measured on the block it timed.

    ``vectorized_seconds`` and ``loop_seconds`` estimate each route's seconds for the
    whole block: ``columns`` times the vectorized route's time per column in its timed
    call, and ``columns`` times the median time of the loop's ``loop_columns`` timed
    columns. The one gradient pass that each route makes per block is left out of both.
    ``reused``: the timing of an earlier operator over the same problem (see
    :class:`FastestRoute`), taken instead of timing again.
    """

    columns: int
    loop_columns: int
    vectorized_seconds: float
    loop_seconds: float
    chosen: str
    reused: bool = False


#: Routes chosen by earlier operators, by problem signature (most recent last), each with
#: weak references to the objects the signature names by identity: an operator built
#: again for the same problem takes the route timed for it.
_CHOSEN_ROUTES: dict[Any, tuple[RouteTiming, tuple[Any, ...]]] = {}
_CHOSEN_LIMIT = 64


def _remembered_route(signature: Any) -> RouteTiming | None:
    """The timing an earlier operator recorded for ``signature`` (``(key, objects)``), if
    the objects it named are these very objects still."""
    key, objects = signature
    entry = _CHOSEN_ROUTES.get(key)
    if entry is None:
        return None
    timing, references = entry
    if len(references) != len(objects) or any(
        reference() is not obj for reference, obj in zip(references, objects)
    ):
        return None
    return timing


def _remember_route(signature: Any, timing: RouteTiming) -> None:
    key, objects = signature
    try:
        references = tuple(weakref.ref(obj) for obj in objects)
    except TypeError:  # an object without weak references: nothing shared
        return
    _CHOSEN_ROUTES.pop(key, None)
    _CHOSEN_ROUTES[key] = (timing, references)
    while len(_CHOSEN_ROUTES) > _CHOSEN_LIMIT:
        del _CHOSEN_ROUTES[next(iter(_CHOSEN_ROUTES))]


class FastestRoute:
    """The faster of a vectorized block product and a loop of one product per column.

    The vectorized route (a :class:`FallbackChain`, called as ``vectorized(*problem, V)``)
    is one batched call for the whole (n, k) block V. Its k-fold batched intermediates can
    outgrow the caches of a CPU on a wide network, where a loop of k single products
    through one graph (``loop(*problem)`` builds the graph and returns ``V -> product``) is
    faster; on a GPU or a small network the batched call wins by a wide margin.

    The first block of at least :data:`MIN_TIMED_COLUMNS` columns is split. The loop
    computes ``c = min(4, max(1, k // 8))`` columns timed one by one, the vectorized route
    the rest in one timed call; a route that has not yet run in this process
    (:data:`WARMED_UP`) first computes one untimed warm-up column. ``clock`` reads the
    time in seconds; ``synchronize`` waits for the device, around the timed calls only.
    The route with the smaller time per column (for the loop, the median of its c) serves
    every later product. Every column is computed once, by one route, and the pieces are
    joined in order (``join(*pieces)``).

    The vectorized route's cost per column changes with the width, so a block more than
    :data:`RETIME_WIDTH_FACTOR` times wider than the one timed is timed again. Until a
    choice is made, and where the loop does not support the function (an error that
    :func:`~linop_trace._backend.is_unsupported_transform_error` accepts), the vectorized
    route is used; a transient error of the loop (out of memory) propagates, and the next
    block is timed again.

    ``signature``: ``(key, objects)``, what the products' cost depends on (the shapes,
    dtypes and devices of the parameters and of every batch, and the ``objects``, the
    model and the loss, by identity), or None. An
    operator built again for a problem of the same signature (``hessian(model, loss,
    batch)`` called at every step of a training loop, or for every estimate) takes the
    choice of the last one timed, for blocks up to :data:`RETIME_WIDTH_FACTOR` times as
    wide, instead of splitting its first block to time both routes again: on the digits
    MLP that timing cost 5.7 ms of a 21 ms ``eigenvalues`` call. The objects are held by
    weak reference and compared by identity, so a model built anew (at the address of a
    freed one) is timed anew.
    """

    def __init__(
        self,
        vectorized: FallbackChain,
        loop_name: str,
        loop: Callable[..., Callable[[Any], Any]],
        join: Callable[..., Any],
        synchronize: Callable[[], None],
        clock: Callable[[], float],
        signature: Any = None,
    ) -> None:
        self.signature = signature
        self.vectorized = vectorized
        self.loop_name = loop_name
        self.loop = loop
        self.join = join
        self.synchronize = synchronize
        self.clock = clock
        self.use_loop = False
        self.timing: RouteTiming | None = None
        self._timed_width: int | None = None
        self._loop_failed = False

    @property
    def mode(self) -> str:
        """The route in use: the vectorized chain's until the loop was timed faster."""
        return self.loop_name if self.use_loop else self.vectorized.mode

    def __call__(self, *args: Any) -> Any:
        *problem, V = args
        if self._should_time(int(V.shape[1])):
            return self._timed(problem, V)
        if self.use_loop:
            return self.loop(*problem)(V)
        return self.vectorized(*problem, V)

    def _should_time(self, columns: int) -> bool:
        if columns < MIN_TIMED_COLUMNS or self._loop_failed:
            return False
        if self.vectorized.mode == self.loop_name:
            return False  # the chain itself fell back to the loop: nothing to choose
        if self._timed_width is None and self.signature is not None:
            known = _remembered_route(self.signature)
            if known is not None and columns <= RETIME_WIDTH_FACTOR * known.columns:
                self.use_loop = known.chosen == self.loop_name
                self._timed_width = known.columns
                self.timing = replace(known, reused=True)
                return False
        return self._timed_width is None or columns > RETIME_WIDTH_FACTOR * self._timed_width

    def _timed(self, problem: list[Any], V: Any) -> Any:
        columns = int(V.shape[1])
        timed_loop = min(MAX_LOOP_TIMED_COLUMNS, max(1, columns // 8))
        pieces = []
        try:
            products = self.loop(*problem)
            first = 0 if self.loop_name in WARMED_UP else 1
            if first:
                pieces.append(products(V[:, :1]))
            seconds = []
            for column in range(first, first + timed_loop):
                self.synchronize()
                start = self.clock()
                pieces.append(products(V[:, column : column + 1]))
                self.synchronize()
                seconds.append(self.clock() - start)
        except Exception as error:
            if not is_unsupported_transform_error(error):
                raise  # transient: the next block times the loop again
            self._loop_failed = True  # the loop cannot differentiate this function
            return self.vectorized(*problem, V)
        WARMED_UP.add(self.loop_name)
        loop_seconds = statistics.median(seconds)  # a column slowed by other work is ignored
        split = first + timed_loop
        if self.vectorized.mode not in WARMED_UP:
            pieces.append(self.vectorized(*problem, V[:, split : split + 1]))
            split += 1
        index = self.vectorized.index
        self.synchronize()
        start = self.clock()
        pieces.append(self.vectorized(*problem, V[:, split:]))
        self.synchronize()
        vectorized_seconds = (self.clock() - start) / (columns - split)
        if self.vectorized.index != index:
            # it fell back within the timed call, whose time holds the failed attempt
            return self.join(*pieces)
        self.use_loop = loop_seconds < vectorized_seconds
        self._timed_width = columns
        self.timing = RouteTiming(
            columns, timed_loop, vectorized_seconds * columns, loop_seconds * columns, self.mode
        )
        if self.signature is not None:
            _remember_route(self.signature, self.timing)
        return self.join(*pieces)


def split_data(data: Any, is_array: Callable[[Any], bool]) -> tuple[list[Any] | Any, bool]:
    """``(batches, materialized)`` for one ``(inputs, targets)`` batch or an iterable of them.

    A single batch is a 2-sequence ``(inputs, targets)`` with ``targets`` an array and
    ``inputs`` an array or a tuple of arrays; any other iterable holds batches.
    One-shot iterators are materialized into a list; re-iterable containers (lists,
    data loaders) are kept and iterated on every product.
    """
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and is_array(data[1])
        and _looks_like_inputs(data[0], is_array)
    ):
        return [tuple(data)], True
    if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise TypeError(
            "`data` must be one (inputs, targets) batch or an iterable of such batches, "
            f"got {type(data).__name__}"
        )
    if iter(data) is data:  # a generator or iterator: can be walked only once
        return list(data), True
    return data, False


def _looks_like_inputs(inputs: Any, is_array: Callable[[Any], bool]) -> bool:
    if is_array(inputs):
        return True
    return (
        isinstance(inputs, (tuple, list)) and len(inputs) > 0 and all(is_array(a) for a in inputs)
    )


def check_batch(batch: Any, index: int) -> tuple[Any, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            f"batch {index} of `data` must be an (inputs, targets) pair, got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        )
    return batch[0], batch[1]


def loss_reduction(loss_fn: Any, reduction: str | None) -> str:
    """``"mean"`` or ``"sum"``: given, or read from ``loss_fn.reduction``, else ``"mean"``."""
    if reduction is None:
        reduction = getattr(loss_fn, "reduction", "mean")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"`loss_reduction` must be 'mean' or 'sum', got {reduction!r}")
    return reduction


def batch_weights(sizes: list[int], reduction: str) -> list[float]:
    """Weights that make the sum of per-batch losses the loss of the concatenated data.

    For a mean-reduced loss, L(all) = sum_b (n_b / N) L_b; for a sum-reduced one, the
    batch losses add up as they are.
    """
    if not sizes:
        raise ValueError("`data` holds no batches")
    if reduction == "sum":
        return [1.0] * len(sizes)
    total = sum(sizes)
    if total == 0:
        raise ValueError("`data` holds no samples")
    return [size / total for size in sizes]


#: The ``mode`` values every autodiff operator takes: how its block products are formed.
PRODUCT_MODES = ("auto", "forward", "reverse")
#: Hessians and Gauss-Newton matrices also take a loop of one product per column.
CURVATURE_MODES = (*PRODUCT_MODES, "loop")


def check_mode(mode: str, modes: tuple[str, ...] = PRODUCT_MODES) -> str:
    """``mode`` if it is one of ``modes``, else a ValueError that lists them."""
    if mode not in modes:
        known = ", ".join(repr(m) for m in modes)
        raise ValueError(f"`mode` must be one of {known}, got {mode!r}")
    return mode
