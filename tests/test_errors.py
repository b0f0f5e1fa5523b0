"""The error table: each bad input raises the right exception, naming the problem."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import linop_trace as lt
from linop_trace import LinearOperator, aslinearoperator


def test_matvec_returning_wrong_shape(dense_backend):
    like = dense_backend.asarray(np.ones(3))
    A = LinearOperator.from_callable(matmat=lambda X: X[:2, :], shape=(3, 3), like=like)
    with pytest.raises(
        ValueError, match=r"`matmat` returned an array of shape \(2, 1\), expected \(3, 1\)"
    ):
        A @ like


def test_matvec_returning_wrong_dtype(dense_backend):
    xp = dense_backend.xp
    like = dense_backend.asarray(np.ones(3))
    A = LinearOperator.from_callable(
        matmat=lambda X: xp.astype(X, xp.float32), shape=(3, 3), like=like
    )
    with pytest.raises(TypeError, match="returned dtype float32, expected float64"):
        A @ like


def test_matvec_returning_wrong_library():
    torch = pytest.importorskip("torch")
    A = LinearOperator.from_callable(matmat=lambda X: torch.from_numpy(X), shape=(3, 3))
    with pytest.raises(TypeError, match="returned a torch array.*operator is numpy"):
        A @ np.ones(3)


def test_matvec_returning_another_library_is_named():
    torch = pytest.importorskip("torch")
    A = LinearOperator.from_callable(matvec=lambda x: torch.from_numpy(x), shape=(3, 3))
    with pytest.raises(TypeError, match="`matvec` returned a torch array.*operator is numpy"):
        A @ np.ones((3, 2))
    B = LinearOperator.from_callable(
        matvec=lambda x: x.numpy(), shape=(3, 3), like=torch.ones(3, dtype=torch.float64)
    )
    with pytest.warns(RuntimeWarning, match="could not be vectorized"):
        with pytest.raises(TypeError, match="`matvec` returned a numpy array.*operator is torch"):
            B @ torch.ones(3, 2, dtype=torch.float64)


def test_negative_seed_and_bad_shape_are_named():
    with pytest.raises(ValueError, match="seed must be a non-negative int, got -1"):
        lt.trace(np.eye(200), method="hutchinson", seed=-1)
    with pytest.raises(ValueError, match=r"`shape` must be a pair \(rows, columns\), got \(5,\)"):
        LinearOperator.from_callable(matvec=lambda x: x, shape=(5,))


def test_input_of_another_library_is_refused_naming_both():
    torch = pytest.importorskip("torch")
    A = aslinearoperator(np.eye(3))
    with pytest.raises(TypeError, match="got a torch array on cpu.*operator is numpy on cpu"):
        A @ torch.ones(3, dtype=torch.float64)


def test_operators_of_two_libraries_cannot_be_combined():
    torch = pytest.importorskip("torch")
    A = aslinearoperator(np.eye(3))
    B = aslinearoperator(torch.eye(3, dtype=torch.float64))
    for combine in (lambda: A + B, lambda: A @ B, lambda: B - A):
        with pytest.raises(
            TypeError, match="two libraries: (numpy|torch) on cpu and (torch|numpy) on cpu"
        ):
            combine()


def test_mixed_devices_are_named():
    # array_api_strict offers extra virtual devices: a stand-in for cpu vs cuda:0
    strict = pytest.importorskip("array_api_strict")
    A = aslinearoperator(strict.eye(3, dtype=strict.float64))
    other = strict.Device("device1")
    x = strict.ones(3, dtype=strict.float64, device=other)
    with pytest.raises(
        ValueError, match="array on .*device1.*operator is array_api_strict on .*CPU_DEVICE"
    ):
        A @ x
    B = aslinearoperator(strict.eye(3, dtype=strict.float64, device=other))
    with pytest.raises(ValueError, match="two devices"):
        A + B


def test_input_of_wrong_shape(backend):
    A = aslinearoperator(backend.matrix(np.eye(3)))
    with pytest.raises(ValueError, match=r"expects a vector of length 3, got shape \(4,\)"):
        A @ backend.asarray(np.ones(4))
    with pytest.raises(ValueError, match=r"expects an array of shape \(3, k\), got shape \(2, 2\)"):
        A.matmat(backend.asarray(np.ones((2, 2))))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_matvec_raises_floating_point_error(dense_backend, bad):
    values = np.eye(4)
    values[1, 2] = bad
    like = dense_backend.asarray(values)
    A = LinearOperator.from_callable(matmat=lambda X: like @ X, shape=(4, 4), like=like)
    # on NumPy at once; where values live on a device (torch, JAX) when first read, so
    # that the estimate itself never waits for the device
    for call in (
        lambda: lt.trace(A, method="exact"),
        lambda: lt.trace(A, method="hutchinson", seed=0),
        lambda: lt.row_sums(A),
    ):
        with pytest.raises(FloatingPointError, match="non-finite.*check_finite=False"):
            call().value  # noqa: B018
    # opting out returns the non-finite value instead
    value = lt.row_sums(A, check_finite=False).value
    assert not np.isfinite(np.asarray(lt._backend.to_numpy(value))[1])


def test_finite_products_whose_sum_overflows_pass_the_finite_check(dense_backend):
    """The check sums the block first (one pass) and tests entries only when the sum is
    not finite: four entries of 1.5e308 sum to inf, yet every one of them is finite."""
    like = dense_backend.asarray(np.diag(np.full(4, 1.5e308)))
    A = LinearOperator.from_callable(matmat=lambda X: like @ X, shape=(4, 4), like=like)
    value = np.asarray(lt._backend.to_numpy(lt.row_sums(A).value))
    np.testing.assert_array_equal(value, np.full(4, 1.5e308))


def test_non_finite_stored_diagonal_raises(backend):
    values = np.eye(3)
    values[0, 0] = np.nan
    with pytest.raises(FloatingPointError, match="non-finite"):
        lt.trace(backend.matrix(values), method="exact").value  # noqa: B018


def test_unknown_probe_lists_known_ones():
    with pytest.raises(ValueError, match="unknown probe 'bernoulli'; known probes are rademacher"):
        lt.trace(np.eye(200), method="hutchinson", probe="bernoulli")


def test_not_a_matrix():
    with pytest.raises(TypeError, match="aslinearoperator expects a 2-d array.*got builtins.list"):
        aslinearoperator([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match=r"expected a 2-d matrix, got shape \(3,\)"):
        aslinearoperator(np.ones(3))


def test_bad_seed_type_is_named():
    with pytest.raises(TypeError, match="seed must be an int, None or a numpy generator"):
        lt.trace(np.eye(200), method="hutchinson", seed="zero")


def test_no_adjoint_is_named():
    A = LinearOperator.from_callable(matvec=lambda x: x, shape=(2, 2))
    with pytest.raises(NotImplementedError, match="no adjoint product"):
        A.rmatvec(np.ones(2))
    with pytest.raises(NotImplementedError, match="no adjoint product"):
        lt.col_sums(A)


def test_from_callable_needs_a_function():
    with pytest.raises(ValueError, match="needs `matvec` or `matmat`"):
        LinearOperator.from_callable(shape=(2, 2))


def test_from_callable_with_a_foreign_dtype_asks_for_like():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="needs `like=`"):
        lt.LinearOperator.from_callable(matvec=lambda x: x, shape=(3, 3), dtype=torch.float64)


def test_ci_without_stderr_is_refused():
    est = lt.Estimate(np.asarray(1.0), None, 3, "custom")
    with pytest.raises(ValueError, match="reports no error estimate"):
        est.ci()


def test_interval_of_a_complex_estimate_is_refused():
    with pytest.raises(ValueError, match="complex"):
        lt.Estimate(np.complex128(1 + 1j), np.float64(1.0), 1, "x").ci()


def test_autodiff_fallback_reports_the_first_failure():
    from linop_trace.autodiff._common import FallbackChain

    def forward(x):
        raise ValueError("forward mode: the first, most telling error")

    def reverse(x):
        raise TypeError("reverse mode failed too")

    chain = FallbackChain([("forward", forward), ("reverse", reverse)], "HVP")
    with pytest.warns(RuntimeWarning, match="HVP: forward failed.*falling back to reverse"):
        with pytest.raises(ValueError, match="the first, most telling error"):
            chain(1.0)
    working = FallbackChain([("forward", forward), ("reverse", lambda x: 2 * x)], "HVP")
    with pytest.warns(RuntimeWarning):
        assert working(3.0) == 6.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second attempt, no second warning
        assert working.mode == "reverse" and working(4.0) == 8.0


def test_a_key_of_another_library_names_the_operators_library():
    """from_callable without like= makes a NumPy operator; a JAX key then got a message
    about NumPy generators only."""
    jax = pytest.importorskip("jax")
    A = np.eye(3)
    operator = lt.LinearOperator.from_callable(matmat=lambda X: A @ X, shape=(3, 3))
    with pytest.raises(TypeError, match="like="):
        lt.trace(operator, method="hutchinson", num_matvecs=4, seed=jax.random.key(0))


def test_torch_meta_tensors_and_block_sparse_layouts_are_refused_by_name():
    """A meta tensor failed deep inside (torch.Generator on 'meta'), a BSR tensor with
    torch's own conversion error."""
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="'meta' device"):
        lt.trace(torch.empty(4, 4, device="meta"), method="exact")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch: BSR support is in beta)
        block_sparse = torch.eye(4).to_sparse_bsr((2, 2))
    with pytest.raises(TypeError, match="sparse_bsr"):
        lt.trace(block_sparse, method="exact")


TRACE_METHODS = ["hutchinson", "hutch++", "na-hutch++", "xtrace", "xnystrace", "auto"]
DIAGONAL_METHODS = ["hutchinson", "diag++", "xdiag", "auto"]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize(
    "quantity, method",
    [("trace", m) for m in TRACE_METHODS] + [("diagonal", m) for m in DIAGONAL_METHODS],
)
def test_every_method_names_a_non_finite_product(dense_backend, quantity, method, bad):
    """A non-finite product raises a FloatingPointError that says so, whatever linear
    algebra the method runs on it first. XNysTrace on torch raised torch's LinAlgError
    ("linalg.eigh: The algorithm failed to converge"): its products are checked when the
    estimate is read, and the eigendecomposition of their sketch ran before that; then
    its own check, run first, blamed an overflow and advised rescaling the operator."""
    values = np.diag(np.linspace(1.0, 2.0, 40))
    values[3, 9] = values[9, 3] = bad  # (symmetric: the tags below stay true)
    like = dense_backend.asarray(values)
    A = LinearOperator.from_callable(
        matmat=lambda X: like @ X,
        shape=(40, 40),
        like=like,
        tags=("symmetric", "positive_semidefinite"),
    )
    function = getattr(lt, quantity)
    with pytest.raises(FloatingPointError, match="matmat returned non-finite values"):
        function(A, method=method, num_matvecs=20, seed=0).value  # noqa: B018


@pytest.mark.parametrize("rtol", [None, 1e-9])
def test_xtrace_stops_at_a_non_finite_product_where_reads_are_free(dense_backend, rtol):
    """XTrace applies the operator to the basis of its first products (and, growing, of
    each new block's): a non-finite product must stop the run there, not reach a function
    that refuses NaN input with an error of its own (NumPy, array_api_strict; where checks
    are deferred to the read, the operator does get the NaN block, as before)."""
    if not lt._backend.reads_are_free(dense_backend.xp):
        pytest.skip("checks are read with the estimate on this backend")
    bad_call = 1 if rtol is None else 3
    calls = []
    M = np.diag(np.linspace(1.0, 2.0, 40))

    def matmat(X):
        values = np.asarray(lt._backend.to_numpy(X))
        if not np.all(np.isfinite(values)):
            raise ValueError("this operator refuses non-finite input")
        calls.append(values.shape[1])
        out = M @ values
        if len(calls) == bad_call:
            out[0, 0] = np.inf
        return dense_backend.asarray(out)

    like = dense_backend.asarray(M)
    A = LinearOperator.from_callable(matmat=matmat, shape=(40, 40), like=like)
    with pytest.raises(FloatingPointError, match="matmat returned non-finite values"):
        lt.trace(A, method="xtrace", num_matvecs=8, seed=0, rtol=rtol).value  # noqa: B018
    assert len(calls) == bad_call
