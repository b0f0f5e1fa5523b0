"""``method="auto"``: exact when that is no dearer than the budget, else a randomized method."""

from __future__ import annotations

from .._estimate import Estimate
from .._operators import LinearOperator
from ._base import EstimationRequest, Estimator
from ._exact import Exact
from ._hutchinson import Hutchinson

__all__ = ["Auto"]


class Auto(Estimator):
    """Exact when n <= the budget (or the operator stores its diagonal), else randomized.

    Examples
    --------
    >>> import numpy as np
    >>> from linop_trace import trace
    >>> trace(np.eye(3), num_matvecs=10).method
    'exact'
    """

    name = "auto"
    supports_tolerance = True

    def __init__(self, trace_method: Estimator | None = None, diagonal_method: Estimator | None = None) -> None:
        self.exact = Exact()
        self.trace_method = trace_method or Hutchinson()
        self.diagonal_method = diagonal_method

    def _use_exact(self, operator: LinearOperator, request: EstimationRequest) -> bool:
        budget = request.max_matvecs if request.adaptive else request.num_matvecs
        return operator.shape[1] <= (budget or 0) or operator._exact_diagonal() is not None

    def trace(self, operator: LinearOperator, request: EstimationRequest) -> Estimate:
        if self._use_exact(operator, request):
            return self.exact.trace(operator, request)
        return self.trace_method.trace(operator, request)

    def diagonal(self, operator: LinearOperator, request: EstimationRequest) -> Estimate:
        if self._use_exact(operator, request) or self.diagonal_method is None:
            if not self._use_exact(operator, request):
                raise ValueError(
                    "no randomized diagonal method is registered for method='auto'; "
                    "pass method='exact'"
                )
            return self.exact.diagonal(operator, request)
        return self.diagonal_method.diagonal(operator, request)
