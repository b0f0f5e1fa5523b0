"""linop_trace: trace, diagonal and row sums of matrices you only know through products.

Works on the arrays you already hold (NumPy/SciPy, PyTorch, JAX, CuPy, any array-API
library) and keeps their library, dtype and device.
"""

from ._density import SpectralDensity, spectral_density
from ._eigen import EigenResult, eigenvalues
from ._estimate import Estimate, EstimateInterrupted
from ._functions import (
    DEFAULT_MAX_MATVECS,
    DEFAULT_NUM_MATVECS,
    col_sums,
    computes_exactly,
    diagonal,
    frobenius_norm_squared,
    row_sums,
    trace,
)
from ._operators import LinearOperator, aslinearoperator
from ._probes import gaussian, rademacher, sphere, steinhaus
from ._spectral import logdet, trace_exp, trace_function, trace_inverse
from ._structured import block_diagonal, diagonal_operator, identity, kronecker
from .autodiff import divergence, ggn, hessian, jacobian  # imports neither torch nor jax
from .estimators import EstimationRequest, Estimator, available_methods, register_estimator

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MAX_MATVECS",
    "DEFAULT_NUM_MATVECS",
    "EigenResult",
    "Estimate",
    "EstimateInterrupted",
    "EstimationRequest",
    "Estimator",
    "LinearOperator",
    "SpectralDensity",
    "aslinearoperator",
    "available_methods",
    "block_diagonal",
    "col_sums",
    "computes_exactly",
    "diagonal",
    "diagonal_operator",
    "divergence",
    "eigenvalues",
    "frobenius_norm_squared",
    "gaussian",
    "ggn",
    "hessian",
    "identity",
    "jacobian",
    "kronecker",
    "logdet",
    "rademacher",
    "register_estimator",
    "row_sums",
    "spectral_density",
    "sphere",
    "steinhaus",
    "trace",
    "trace_exp",
    "trace_function",
    "trace_inverse",
]
