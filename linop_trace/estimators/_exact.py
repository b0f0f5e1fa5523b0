"""Exact trace and diagonal: the stored diagonal where the structure has one, else the
operator applied to identity columns block by block (O(n * block) memory)."""

from __future__ import annotations

from typing import Any

from .._estimate import Estimate
from .._operators import LinearOperator
from ._base import CountingMatmat, EstimationRequest, Estimator, default_block_size

__all__ = ["Exact", "exact_diagonal"]


def exact_diagonal(operator: LinearOperator, matmat: CountingMatmat, block_size: int | None) -> Any:
    """The diagonal of a square operator, with no n x n array unless it was given one."""
    stored = operator._exact_diagonal()
    if stored is not None:
        if matmat.check_finite:
            xp = operator.xp
            if not bool(xp.all(xp.isfinite(stored))):
                raise FloatingPointError(
                    "the operator's diagonal holds non-finite values (NaN or inf)"
                )
        return stored
    xp, n = operator.xp, operator.shape[0]
    itemsize = _itemsize(operator)
    block = block_size or default_block_size(n, itemsize, limit=n)
    pieces = []
    for start in range(0, n, block):
        width = min(block, n - start)
        # columns start..start+width of the identity: ones where row - col == start
        identity = xp.eye(n, width, k=-start, dtype=operator.dtype, device=operator.device)
        image = matmat(identity)
        # copy: the diagonal is a view that would keep the whole (n, width) image alive
        pieces.append(xp.asarray(xp.linalg.diagonal(image[start : start + width, :]), copy=True))
    return pieces[0] if len(pieces) == 1 else xp.concat(pieces)


def _itemsize(operator: LinearOperator) -> int:
    xp = operator.xp
    try:
        return int(xp.finfo(operator.dtype).bits // 8) * (
            2 if xp.isdtype(operator.dtype, "complex floating") else 1
        )
    except Exception:  # pragma: no cover
        return 8


class Exact(Estimator):
    """The exact trace and diagonal.

    Uses the stored diagonal of dense and sparse matrices (and of sums, scalings and
    adjoints of them) without any product; otherwise applies the operator to identity
    columns in blocks of ``block_size``, n columns in all, never holding an n x n array.

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

    def _estimate(
        self, operator: LinearOperator, request: EstimationRequest, quantity: str
    ) -> Estimate:
        xp = operator.xp
        diagonal = exact_diagonal(operator, request.matmat, request.block_size)
        value = xp.sum(diagonal) if quantity == "trace" else diagonal
        stderr = xp.zeros_like(
            xp.real(value) if xp.isdtype(value.dtype, "complex floating") else value
        )
        return Estimate(value, stderr, request.matmat.columns, self.name, converged=None)

    def trace(self, operator: LinearOperator, request: EstimationRequest) -> Estimate:
        return self._estimate(operator, request, "trace")

    def diagonal(self, operator: LinearOperator, request: EstimationRequest) -> Estimate:
        return self._estimate(operator, request, "diagonal")
