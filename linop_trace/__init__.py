"""linop_trace: trace, diagonal and row sums of matrices you only know through products.

Works on the arrays you already hold (NumPy/SciPy, PyTorch, JAX, CuPy, any array-API
library) and keeps their library, dtype and device.
"""

from ._estimate import Estimate
from ._functions import col_sums, diagonal, row_sums, trace
from ._operators import LinearOperator, aslinearoperator
from ._probes import gaussian, rademacher, sphere, steinhaus
from .estimators import EstimationRequest, Estimator, available_methods, register_estimator

__version__ = "0.1.0"

__all__ = [
    "Estimate",
    "EstimationRequest",
    "Estimator",
    "LinearOperator",
    "aslinearoperator",
    "available_methods",
    "col_sums",
    "diagonal",
    "gaussian",
    "rademacher",
    "register_estimator",
    "row_sums",
    "sphere",
    "steinhaus",
    "trace",
]
