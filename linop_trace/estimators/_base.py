"""What every estimator receives (``EstimationRequest``) and implements (``Estimator``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import _backend as backend
from .._estimate import Estimate
from .._operators import LinearOperator
from .._probes import ProbeSampler

__all__ = [
    "CountingMatmat",
    "apply_blocked",
    "EstimationRequest",
    "Estimator",
    "default_block_size",
    "is_self_adjoint",
]

#: Bytes a block of probes (and its image) may take by default.
DEFAULT_BLOCK_BYTES = 64 * 2**20


def default_block_size(n: int, itemsize: int, limit: int | None = None) -> int:
    """Columns per block so that an ``(n, block)`` array stays under 64 MiB."""
    block = max(1, DEFAULT_BLOCK_BYTES // max(1, n * itemsize))
    return block if limit is None else max(1, min(block, limit))


def is_self_adjoint(operator: LinearOperator) -> bool:
    """Whether the operator's tags say ``A^H = A``."""
    tags = operator.tags
    if "hermitian" in tags:
        return True
    return "symmetric" in tags and not backend.is_complex_dtype(operator.xp, operator.dtype)


class CountingMatmat:
    """``X -> A @ X`` that counts calls and columns and refuses non-finite results.

    Every estimator multiplies through one of these, so ``num_matvecs`` in the result is
    the number of columns that really passed through the operator.
    """

    def __init__(self, operator: LinearOperator, check_finite: bool = True) -> None:
        self.operator = operator
        self.check_finite = check_finite
        self.calls = 0
        self.columns = 0

    def __call__(self, block: Any) -> Any:
        return self._counted(self.operator.matmat(block), block)

    def adjoint(self, block: Any) -> Any:
        """``A^H @ X``, counted like ``A @ X`` (same ``calls`` and ``columns``).

        Self-adjoint operators (tagged ``"hermitian"``, or ``"symmetric"`` and real) use
        the forward product, so methods that need ``A^H`` work on them without an adjoint.
        """
        if is_self_adjoint(self.operator):
            return self(block)
        return self._counted(self.operator.rmatmat(block), block)

    def _counted(self, out: Any, block: Any) -> Any:
        self.calls += 1
        self.columns += int(block.shape[1])
        if self.check_finite:
            if backend.all_finite(self.operator.xp, out) is False:  # (JAX jit: unchecked)
                raise FloatingPointError(
                    f"the operator's matmat returned non-finite values (NaN or inf) for a "
                    f"block of {block.shape[1]} columns; pass check_finite=False to skip "
                    "this check"
                )
        return out


@dataclass
class EstimationRequest:
    """Everything an estimator needs besides the operator.

    Attributes
    ----------
    matmat : CountingMatmat
        The operator's block product; use it for every operator application.
    probes : ProbeSampler
        ``probes(k)`` draws an ``(n, k)`` block in the operator's library/dtype/device.
    num_matvecs : int
        The budget of operator applications (columns).
    block_size : int
        Largest number of columns to send through ``matmat`` at once.
    rtol, atol : float or None
        Tolerance on the interval half-width, for adaptive methods.
    confidence : float
        Level of that interval.
    max_matvecs : int
        Budget cap when a tolerance is given.
    """

    matmat: CountingMatmat
    probes: ProbeSampler
    num_matvecs: int
    block_size: int
    rtol: float | None = None
    atol: float | None = None
    confidence: float = 0.95
    max_matvecs: int | None = None

    @property
    def adaptive(self) -> bool:
        return self.rtol is not None or self.atol is not None

    def blocks(self, total: int) -> list[int]:
        """Split ``total`` columns into block widths of at most ``block_size``."""
        count = math.ceil(total / self.block_size) if total else 0
        return [min(self.block_size, total - i * self.block_size) for i in range(count)]

    def xp(self) -> Any:
        return self.matmat.operator.xp


class Estimator:
    """Base class of trace and diagonal estimators.

    Subclasses set ``name`` and override :meth:`trace` and/or :meth:`diagonal`; each
    receives a :class:`LinearOperator` and an :class:`EstimationRequest` and returns an
    :class:`~linop_trace.Estimate`. Pass an instance as ``method=`` or register it with
    :func:`~linop_trace.register_estimator`.

    Examples
    --------
    A trace estimator that uses one Rademacher probe block and no error bar:

    >>> import numpy as np
    >>> from linop_trace import Estimate, Estimator, trace
    >>> class OneBlock(Estimator):
    ...     name = "one-block"
    ...     def trace(self, operator, request):
    ...         xp = operator.xp
    ...         Z = request.probes(request.num_matvecs)
    ...         value = xp.sum(Z * request.matmat(Z)) / request.num_matvecs
    ...         return Estimate(value, None, request.matmat.columns, self.name)
    >>> est = trace(np.diag([1.0, 2.0, 3.0]), method=OneBlock(), num_matvecs=2, seed=0)
    >>> float(est), est.num_matvecs
    (6.0, 2)
    """

    name: str = "custom"
    #: Smallest budget the method can work with (Hutch++ needs 3).
    min_matvecs: int = 1
    #: Whether ``rtol``/``atol`` are honoured.
    supports_tolerance: bool = False

    def trace(self, operator: LinearOperator, request: EstimationRequest) -> Estimate:
        raise NotImplementedError(f"method {self.name!r} does not estimate traces")

    def diagonal(self, operator: LinearOperator, request: EstimationRequest) -> Estimate:
        raise NotImplementedError(f"method {self.name!r} does not estimate diagonals")

    def supports(self, quantity: str) -> bool:
        """Whether this estimator overrides ``trace`` or ``diagonal``."""
        own = getattr(type(self), quantity, None)
        return own is not None and own is not getattr(Estimator, quantity)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ProbeChoice(Estimator):
    """An estimator whose constructor may fix the probe distribution.

    ``probe=None`` uses the request's probes (the ``probe=`` argument of
    :func:`~linop_trace.trace`, or the estimator's ``default_probe``); a name overrides it
    and draws from the request's random source, so the seed still decides everything.
    """

    def __init__(self, probe: str | None = None) -> None:
        self.probe = probe

    def __repr__(self) -> str:
        return f"{type(self).__name__}(probe={self.probe!r})"

    def _sampler(self, request: EstimationRequest) -> ProbeSampler:
        if self.probe is None or self.probe == request.probes.kind:
            return request.probes
        base = request.probes
        return ProbeSampler(self.probe, base.n, base.xp, base.dtype, base.device, base.random)


def scalar_like(operator: LinearOperator, value: float) -> Any:
    """A 0-d array of the operator's library, real dtype and device."""
    xp = operator.xp
    return xp.asarray(
        value, dtype=backend.real_dtype_for(xp, operator.dtype), device=operator.device
    )


def apply_blocked(product: Any, block: Any, block_size: int, xp: Any) -> Any:
    """``product(block)`` in column chunks of at most ``block_size`` (one call if it fits)."""
    width = int(block.shape[1])
    if width <= block_size:
        return product(block)
    pieces = [
        product(block[:, start : start + block_size]) for start in range(0, width, block_size)
    ]
    return xp.concat(pieces, axis=1)


# ----------------------------------------------------------------------- array helpers
def conj(x: Any, xp: Any) -> Any:
    """``conj(x)`` for complex arrays, ``x`` itself for real ones (no copy)."""
    return xp.conj(x) if backend.is_complex_dtype(xp, x.dtype) else x


def hermitian_transpose(x: Any, xp: Any) -> Any:
    """``x^H`` of a matrix."""
    return conj(xp.matrix_transpose(x), xp)


def column_inner(x: Any, y: Any, xp: Any) -> Any:
    """``[x_j^H y_j]_j`` for the columns of two ``(n, k)`` blocks."""
    return xp.sum(conj(x, xp) * y, axis=0)


def blocked_matmat(operator: LinearOperator, request: EstimationRequest) -> Callable[[Any], Any]:
    """``X -> A X`` through the request's counter in chunks of ``block_size`` columns."""
    xp = operator.xp
    return lambda block: apply_blocked(request.matmat, block, request.block_size, xp)


# ------------------------------------------------------------- two-sided deflation
def resolve_two_sided(adjoint: Any, two_sided: bool | None, method: str) -> bool:
    """A core's ``two_sided`` choice: by default when A is self-adjoint (``adjoint is
    None``); ``True`` with an adjoint raises ``ValueError`` naming ``method``."""
    if two_sided is None:
        return adjoint is None
    if two_sided and adjoint is not None:
        raise ValueError(f"two-sided {method} needs a self-adjoint operator (adjoint=None)")
    return bool(two_sided)


def check_two_sided_option(estimator: Estimator, adjoint: Any) -> None:
    """The estimator-level error for ``two_sided=True`` on an operator not tagged
    self-adjoint (``adjoint`` is its A^H product, ``None`` for self-adjoint ones)."""
    if getattr(estimator, "two_sided", None) and adjoint is not None:
        raise ValueError(
            f"{type(estimator).__name__}(two_sided=True) needs an operator tagged "
            "'symmetric' or 'hermitian'; use two_sided=None (the default) for others"
        )


def two_sided_low_rank_diagonal(basis: Any, image: Any, residual: Any, xp: Any) -> Any:
    """diag(P A + A P - P A P), P = QQ^H, for self-adjoint A: with Z = A Q (``image``) and
    Zp = (I - P) Z (``residual``) it is Re sum_l conj(Q_kl) (Z + Zp)_kl, in Q's dtype."""
    diagonal = backend.row_inner(xp, basis, image + residual)
    if backend.is_complex_dtype(xp, diagonal.dtype):
        diagonal = xp.astype(xp.real(diagonal), diagonal.dtype)
    return diagonal
