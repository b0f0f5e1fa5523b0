"""Exact trace and diagonal: the stored diagonal where the structure has one, else the
operator applied to identity columns block by block (O(n * block) memory)."""

from __future__ import annotations

from typing import Any

from .. import _backend as backend
from .._blocks import IDENTITY_BLOCK_BYTES, itemsize
from .._estimate import DeferredCheck, Estimate
from ._base import EstimationRequest, Estimator

__all__ = ["Exact", "exact_diagonal"]


def exact_diagonal(request: EstimationRequest) -> tuple[Any, tuple[DeferredCheck, ...]]:
    """The diagonal of the request's operator, with no n x n array unless it was given one,
    and the check that a stored diagonal is finite (empty where it was checked already).

    The identity walk sends ``(n, block)`` slices of the identity through the counted
    product: at most ``IDENTITY_BLOCK_BYTES`` each (and at most ``request.block_size``
    columns), n columns in all.
    """
    xp, n = request.xp, request.n
    stored = request.stored_diagonal()
    if stored is not None:
        return stored, _finite_checks(xp, stored, request.matmat.check_finite)
    width_bytes = n * itemsize(xp, request.dtype)
    block = max(1, min(request.block_size, IDENTITY_BLOCK_BYTES // max(1, width_bytes), n))
    # exact: the products at full precision (JAX's float32 default on GPUs is TF32)
    walk = request.matmat.with_precision("highest")
    pieces = [
        backend.block_diagonal(xp, walk(identity), start, identity)
        for start, identity in backend.identity_blocks(xp, n, block, request.dtype, request.device)
    ]
    return (pieces[0] if len(pieces) == 1 else xp.concat(pieces)), ()


def _finite_checks(xp: Any, stored: Any, check_finite: bool) -> tuple[DeferredCheck, ...]:
    if not check_finite:
        return ()
    if backend.reads_are_free(xp):
        if not bool(xp.all(xp.isfinite(stored))):
            raise _non_finite_diagonal()
        return ()
    return (DeferredCheck(~backend.finite_flag(xp, stored), (), _non_finite_diagonal),)


def _non_finite_diagonal() -> Exception:
    return FloatingPointError("the operator's diagonal holds non-finite values (NaN or inf)")


class Exact(Estimator):
    """The exact trace and diagonal.

    Uses the stored diagonal of dense and sparse matrices (and of sums, scalings and
    adjoints of them) without any product; otherwise applies the operator to identity
    columns in blocks of at most 64 MiB, n columns in all, never holding an n x n array.

    Examples
    --------
    >>> import numpy as np
    >>> from linop_trace import LinearOperator, trace
    >>> A = LinearOperator.from_callable(matvec=lambda x: 2 * x, shape=(4, 4))
    >>> est = trace(A, method="exact")
    >>> float(est), est.num_matvecs, float(est.stderr)
    (8.0, 4, 0.0)
    """

    name = "exact"
    jit_compatible = True

    def _estimate(self, request: EstimationRequest, quantity: str) -> Estimate:
        xp = request.xp
        diagonal, checks = exact_diagonal(request)
        value, stderr = backend.jit(xp, _with_zero_error, num_static=2)(xp, quantity, diagonal)
        # an exact answer meets any tolerance asked for
        converged = True if request.adaptive else None
        return Estimate(value, stderr, request.columns, self.name, converged, checks=checks)

    def trace(self, request: EstimationRequest) -> Estimate:
        return self._estimate(request, "trace")

    def diagonal(self, request: EstimationRequest) -> Estimate:
        return self._estimate(request, "diagonal")


def _with_zero_error(xp: Any, quantity: str, diagonal: Any) -> tuple[Any, Any]:
    """The exact ``quantity`` from the diagonal, and its zero standard error (one compiled
    program under JAX: made eagerly, the zeros' fill was shipped from the host)."""
    value = xp.sum(diagonal) if quantity == "trace" else diagonal
    return value, xp.zeros_like(backend.real_part(xp, value))
