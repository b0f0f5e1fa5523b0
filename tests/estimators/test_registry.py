"""The estimator registry: a user's estimator by name, unknown names, an estimator class
for its instance."""

from __future__ import annotations

import numpy as np
import pytest

import linop_trace as lt
from linop_trace.estimators import Estimator

DIAGONAL = np.arange(1.0, 51.0)  # trace 1275


# ------------------------------------------------------------------ user plug-in
class MidpointOfTwoHalves(Estimator):
    """A user's estimator: Hutchinson on two half blocks, no error bar."""

    name = "two-halves"
    min_matvecs = 2

    def trace(self, request):
        xp = request.xp
        half = request.num_matvecs // 2
        values = []
        for _ in range(2):
            Z = request.probes(half)
            values.append(xp.sum(Z * request.matmat(Z)) / half)
        return lt.Estimate((values[0] + values[1]) / 2, None, request.columns, self.name)


def test_registered_user_estimator_is_used_by_name():
    lt.register_estimator("two-halves", MidpointOfTwoHalves(), overwrite=True)
    assert "two-halves" in lt.available_methods("trace")
    assert "two-halves" not in lt.available_methods("diagonal")
    d = np.arange(1.0, 21.0)
    est = lt.trace(np.diag(d), method="two-halves", num_matvecs=10, seed=0)
    assert est.method == "two-halves" and est.num_matvecs == 10
    assert float(est) == pytest.approx(d.sum())  # Rademacher: exact on a diagonal
    with pytest.raises(ValueError, match="needs num_matvecs >= 2"):
        lt.trace(np.eye(4), method="TWO-HALVES", num_matvecs=1)
    with pytest.raises(ValueError, match="two-halves"):
        lt.trace(np.eye(4), method="no-such-method")


# ------------------------------------------------------------------ unknown names
def test_unknown_method_lists_known_ones():
    with pytest.raises(
        ValueError, match="unknown method 'hutchinsn'; known methods are: .*exact.*hutchinson"
    ):
        lt.trace(np.eye(2), method="hutchinsn")


# -------------------------------- a class for an instance (reliability audit, item 8)
def test_an_estimator_class_is_taken_as_its_default_instance():
    from linop_trace.estimators import Hutchinson, XTrace

    A = np.diag(DIAGONAL)
    assert float(lt.trace(A, method=Hutchinson, num_matvecs=10, seed=0)) == 1275.0
    by_class = lt.trace(A, method=XTrace, num_matvecs=20, seed=3)
    by_instance = lt.trace(A, method=XTrace(), num_matvecs=20, seed=3)
    assert float(by_class) == float(by_instance)


def test_a_class_that_is_not_an_estimator_is_named():
    with pytest.raises(TypeError, match="got the class int"):
        lt.trace(np.eye(3), method=int)
