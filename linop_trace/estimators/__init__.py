"""Trace and diagonal estimators; each method in its own module, registered by name."""

from ._auto import Auto
from ._base import CountingMatmat, EstimationRequest, Estimator
from ._diagpp import DiagPlusPlus
from ._exact import Exact
from ._hutchinson import Hutchinson
from ._hutchpp import HutchPlusPlus, NAHutchPlusPlus
from ._registry import available_methods, get_estimator, register_estimator
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

register_estimator("exact", Exact())
register_estimator("hutchinson", Hutchinson())
register_estimator("hutch++", HutchPlusPlus())
register_estimator("na-hutch++", NAHutchPlusPlus())
register_estimator("diag++", DiagPlusPlus())
register_estimator("xdiag", XDiag())
register_estimator("xtrace", XTrace())
register_estimator("xnystrace", XNysTrace())
register_estimator("auto", Auto())
