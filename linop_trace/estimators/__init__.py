"""Trace and diagonal estimators; each method in its own module, registered by name.

The kernel they stand on: ``_base`` (the contract: request, estimator, counted product),
``linop_trace._stats`` (means, errors, interval shapes, degrees of freedom; below this
package, since the autodiff operators use it too), ``_linalg`` (bases, downdates) and
``_adaptive`` (the one stopping rule and its driver). Method modules import the kernel
only, never each other.
"""

from ._auto import Auto
from ._base import CountingMatmat, EstimationRequest, Estimator
from ._diagpp import DiagPlusPlus
from ._exact import Exact
from ._hutchinson import Hutchinson
from ._hutchpp import HutchPlusPlus
from ._na_hutchpp import NAHutchPlusPlus
from ._registry import available_methods, get_estimator, register_builtin, register_estimator
from ._xdiag import XDiag
from ._xnystrace import XNysTrace
from ._xtrace import XTrace

__all__ = [
    "Auto",
    "CountingMatmat",
    "EstimationRequest",
    "Estimator",
    "Exact",
    "DiagPlusPlus",
    "Hutchinson",
    "HutchPlusPlus",
    "NAHutchPlusPlus",
    "XDiag",
    "XNysTrace",
    "XTrace",
    "available_methods",
    "get_estimator",
    "register_estimator",
]

register_builtin("exact", Exact())
register_builtin("hutchinson", Hutchinson())
register_builtin("hutch++", HutchPlusPlus())
register_builtin("na-hutch++", NAHutchPlusPlus())
register_builtin("diag++", DiagPlusPlus())
register_builtin("xdiag", XDiag())
register_builtin("xtrace", XTrace())
register_builtin("xnystrace", XNysTrace())
register_builtin("auto", Auto())
