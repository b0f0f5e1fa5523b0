"""Trace and diagonal estimators; each method in its own module, registered by name."""

from ._auto import Auto
from ._base import CountingMatmat, EstimationRequest, Estimator
from ._exact import Exact
from ._hutchinson import Hutchinson
from ._registry import available_methods, get_estimator, register_estimator

__all__ = [
    "Auto",
    "CountingMatmat",
    "EstimationRequest",
    "Estimator",
    "Exact",
    "Hutchinson",
    "available_methods",
    "get_estimator",
    "register_estimator",
]

register_estimator("exact", Exact())
register_estimator("hutchinson", Hutchinson())
register_estimator("auto", Auto())
