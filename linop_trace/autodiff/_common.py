"""Pieces shared by the torch and JAX autodiff operators (no library names here)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from .._operators import LinearOperator

__all__ = ["AutodiffOperator", "FallbackChain", "batch_weights", "split_data"]


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

    _flatten_fn: Callable[[Any], Any]
    _unflatten_fn: Callable[[Any], Any]

    def flatten(self, structure: Any) -> Any:
        """The vector (length ``shape[1]``) holding the leaves of ``structure`` in order."""
        return self._flatten_fn(structure)

    def unflatten(self, vector: Any) -> Any:
        """The structure of the variables, filled from a vector of length ``shape[1]``."""
        if getattr(vector, "ndim", None) != 1 or vector.shape[0] != self.shape[1]:
            raise ValueError(
                f"unflatten expects a vector of length {self.shape[1]}, "
                f"got shape {tuple(getattr(vector, 'shape', ()))}"
            )
        return self._unflatten_fn(vector)


class FallbackChain:
    """Try product implementations in order; move to the next one (and warn once) on failure.

    The first implementation that works is remembered, so the failing ones are not tried
    again on later calls. If every implementation fails, the error of the first is raised,
    since it is the one that describes the user's function best.
    """

    def __init__(self, implementations: list[tuple[str, Callable[..., Any]]], what: str) -> None:
        self.implementations = implementations
        self.what = what
        self.index = 0

    @property
    def mode(self) -> str:
        return self.implementations[self.index][0]

    def __call__(self, *args: Any) -> Any:
        first_error: BaseException | None = None
        while self.index < len(self.implementations):
            name, implementation = self.implementations[self.index]
            try:
                return implementation(*args)
            except Exception as error:  # noqa: BLE001 - any failure of AD moves on
                if first_error is None:
                    first_error = error
                if self.index + 1 >= len(self.implementations):
                    break
                following = self.implementations[self.index + 1][0]
                warnings.warn(
                    f"{self.what}: {name} failed for this function "
                    f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                    f"falling back to {following} from now on",
                    RuntimeWarning,
                    stacklevel=4,
                )
                self.index += 1
        assert first_error is not None
        raise first_error


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


def check_mode(mode: str) -> str:
    if mode not in ("auto", "forward", "reverse"):
        raise ValueError(
            f"`mode` must be 'auto', 'forward' (forward-over-reverse) or 'reverse' "
            f"(reverse-over-reverse), got {mode!r}"
        )
    return mode
