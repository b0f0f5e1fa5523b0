"""Every backend agrees with NumPy on fixed seeds and inputs.

The statistical tests (coverage of the intervals over hundreds of seeds, unbiasedness;
marked ``stats``) run once, on NumPy, in the ``stats`` nox session. What each backend and
Python must show instead is that it computes the same estimate as NumPy from the same
input and the same probes. Libraries draw different random numbers for one seed, so here
every library draws its probes from one NumPy generator (the ``"foreign"`` random source
that array_api_strict uses, which moves NumPy draws into the library): the estimates must
then agree to rounding, for every registered method, with the same matvec count, standard
error and method name.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import numpy_of

import linop_trace as lt
from linop_trace import _backend as backend
from linop_trace._backend import RandomSource
from linop_trace._testing import test_matrix

#: float64 agreement: rounding of different BLAS/LAPACK builds and summation orders over a
#: 60 x 60 problem with condition ~1e3 (poly spectrum) stays near 1e-13; 1e-9 leaves room
#: for QR/eigensolver sign and ordering choices that cancel in the formula.
RTOL = 1e-9
N = 60


def _same_probes(backend_under_test, seed: int) -> RandomSource:
    """A random source that draws ``np.random.default_rng(seed)``'s numbers in the
    backend's library and device (as array_api_strict's does)."""
    return RandomSource(
        backend_under_test.xp,
        backend_under_test.device,
        "foreign",
        np.random.default_rng(seed),
    )


@pytest.fixture
def eager(monkeypatch):
    """Run JAX estimates eagerly: inside one compiled program a NumPy draw would be a
    constant of the program, reused by the next call of the same shapes. The compiled
    path's agreement with the eager one is tests/test_device_resident.py's subject."""
    monkeypatch.setattr(backend, "compiles_estimates", lambda xp: False)


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "general"])
@pytest.mark.parametrize(
    ("quantity", "method"),
    [("trace", method) for method in lt.available_methods("trace")]
    + [("diagonal", method) for method in lt.available_methods("diagonal")],
)
def test_every_method_agrees_with_numpy_given_the_same_probes(
    backend, eager, quantity, method, symmetric
):
    A = test_matrix("poly", N, seed=4)
    if not symmetric:
        A = A + 0.1 * np.triu(np.random.default_rng(5).standard_normal((N, N)))
    tags = ("symmetric",) if symmetric else ()
    if method == "xnystrace" and not symmetric:
        pytest.skip("XNysTrace needs a symmetric positive semi-definite operator")
    if method == "xnystrace":
        tags = ("symmetric", "positive_semidefinite")
    options = {"num_matvecs": 24}
    reference = getattr(lt, quantity)(
        lt.aslinearoperator(A, tags=tags),
        method=method,
        seed=RandomSource(np, "cpu", "numpy", np.random.default_rng(11)),
        **options,
    )
    operator = lt.aslinearoperator(backend.matrix(A), tags=tags)
    estimate = getattr(lt, quantity)(
        operator, method=method, seed=_same_probes(backend, 11), **options
    )
    assert estimate.method == reference.method
    assert estimate.num_matvecs == reference.num_matvecs
    scale = np.abs(np.diag(A)).max() * (N if quantity == "trace" else 1)
    np.testing.assert_allclose(
        numpy_of(estimate.value), numpy_of(reference.value), rtol=RTOL, atol=RTOL * scale
    )
    if reference.stderr is not None:
        np.testing.assert_allclose(
            numpy_of(estimate.stderr),
            numpy_of(reference.stderr),
            rtol=1e-7,
            atol=RTOL * scale,
        )
