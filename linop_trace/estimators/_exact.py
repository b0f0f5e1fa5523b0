"""Exact trace and diagonal: the stored diagonal where the structure has one, else the
operator applied to identity columns block by block (O(n * block) memory)."""

from __future__ import annotations

from .._estimate import Estimate
from ._base import EstimationRequest, Estimator, exact_diagonal, exact_estimate

__all__ = ["Exact", "exact_diagonal"]


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

    def trace(self, request: EstimationRequest) -> Estimate:
        return exact_estimate(request, "trace")

    def diagonal(self, request: EstimationRequest) -> Estimate:
        return exact_estimate(request, "diagonal")
