"""API behaviour that surprised users of SciPy and lineax (issue 19): each test failed
before its fix."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import numpy_of

import linop_trace as lt


def test_multiplying_by_an_array_names_the_matmul_operator(dense_backend):
    """``A * x`` and ``x * A`` with an array: a TypeError naming ``@`` (before: NumPy
    broadcast the operator into an object array of operators)."""
    A = lt.aslinearoperator(dense_backend.asarray(np.eye(3)))
    x = dense_backend.asarray(np.ones(3))
    with pytest.raises(TypeError, match="A @ x"):
        A * x
    with pytest.raises(TypeError):  # the array's library may refuse first, in its words
        x * A
    with pytest.raises(TypeError, match="A @ x"):
        np.ones(3) * lt.aslinearoperator(np.eye(3))
    assert numpy_of((2.0 * A).to_dense())[0, 0] == 2.0  # numbers still scale


def test_tags_given_for_an_operator_are_kept():
    """``aslinearoperator(op, tags=...)``: a copy with both tag sets (before: dropped)."""
    A = lt.aslinearoperator(np.eye(3))
    tagged = lt.aslinearoperator(A, tags=("symmetric",))
    assert tagged.tags == frozenset({"symmetric"}) and A.tags == frozenset()
    both = lt.aslinearoperator(tagged, tags=("positive_semidefinite",))
    assert both.tags == {"symmetric", "positive_semidefinite"}
    assert lt.aslinearoperator(tagged, tags=("symmetric",)) is tagged
    with pytest.raises(ValueError):
        lt.aslinearoperator(A, tags=("symetric",))


def test_to_dense_of_a_dense_operator_is_a_copy(dense_backend):
    """Writing into ``to_dense()`` leaves the operator alone (before: it was the array)."""
    if dense_backend.library == "jax":
        pytest.skip("JAX arrays are immutable")
    matrix = dense_backend.asarray(np.eye(3))
    A = lt.aslinearoperator(matrix)
    dense = A.to_dense()
    dense[0, 0] = 5.0
    assert numpy_of(A.to_dense())[0, 0] == 1.0
    assert numpy_of(matrix)[0, 0] == 1.0


def test_complex_rademacher_probes_are_reported_as_the_steinhaus_probes_drawn():
    A = np.diag(np.arange(1.0, 7.0)).astype(complex)
    estimate = lt.trace(A, method="hutchinson", probe="rademacher", num_matvecs=8, seed=0)
    assert estimate.info["probe"] == "steinhaus"  # before: "rademacher"
    assert lt.trace(A.real, method="hutchinson", num_matvecs=8, seed=0).info["probe"] == (
        "rademacher"
    )


def test_scipys_constructor_spelling_points_to_from_callable():
    """``LinearOperator((n, n), matvec=f)``: a TypeError naming ``from_callable``
    (before: "unexpected keyword argument")."""
    with pytest.raises(TypeError, match="from_callable"):
        lt.LinearOperator((3, 3), matvec=lambda x: x)
    operator = lt.LinearOperator.from_callable(matvec=lambda x: 2 * x, shape=(3, 3))
    assert float(lt.trace(operator, method="exact")) == 6.0


def test_a_vector_estimate_converts_with_np_asarray(backend):
    """``np.asarray(diagonal(...))`` is the value (before: TypeError / object array)."""
    if backend.name in ("cupy", "torch-cuda", "jax-gpu"):
        pytest.skip("GPU values are moved by their library, not by np.asarray")
    A = backend.matrix(np.diag(np.arange(1.0, 5.0)))
    estimate = lt.diagonal(A, method="exact")
    values = np.asarray(estimate)
    assert values.dtype == np.float64 and values.shape == (4,)
    np.testing.assert_array_equal(values, np.arange(1.0, 5.0))
    assert np.asarray(lt.trace(A, method="exact")).shape == ()


def test_frobenius_norm_squared_and_divergence_take_traces_arguments():
    """One signature family: ``(A, method, num_matvecs, seed, probe, ...)`` as in
    ``trace`` (before: ``frobenius_norm_squared(A, num_matvecs, seed, probe="rademacher")``
    had no method, and ``divergence`` defaulted probe to a name where trace has None)."""
    import inspect

    order = list(inspect.signature(lt.trace).parameters)[:5]
    assert list(inspect.signature(lt.frobenius_norm_squared).parameters)[:5] == order
    divergence = list(inspect.signature(lt.divergence).parameters)
    assert divergence[2:6] == order[1:]
    assert inspect.signature(lt.divergence).parameters["probe"].default is None
    A = np.diag([1.0, 2.0, 3.0])
    est = lt.frobenius_norm_squared(A, "hutchinson", 40, 0)
    assert est.num_matvecs == 40 and est.info["probe"] == "rademacher"
    with pytest.raises(TypeError, match="num_matvecs=40 by name"):
        lt.frobenius_norm_squared(A, 40)
    with pytest.raises(ValueError, match="its one method is 'hutchinson'"):
        lt.frobenius_norm_squared(A, "xtrace")
