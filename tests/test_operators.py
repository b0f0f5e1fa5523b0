"""LinearOperator: every constructor x backend x dtype against a dense NumPy reference."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import numpy_of, rtol_for

import linop_trace as lt
from linop_trace import LinearOperator, aslinearoperator

DTYPES = ("float32", "float64", "complex128")


def random_matrix(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape)
    if np.dtype(dtype).kind == "c":
        values = values + 1j * rng.standard_normal(shape)
    return values.astype(dtype)


def assert_close(actual, expected, dtype):
    np.testing.assert_allclose(
        numpy_of(actual),
        expected,
        rtol=rtol_for(dtype),
        atol=rtol_for(dtype) * np.abs(expected).max(initial=1.0),
    )


def _constructors(backend):
    """(name, build(M) -> operator) for every way this backend's users hold a matrix."""
    out = [("aslinearoperator", lambda M: aslinearoperator(backend.matrix(M)))]
    if backend.library == "numpy":
        import scipy.sparse as sp
        import scipy.sparse.linalg as spla

        out.append(("scipy csr_matrix", lambda M: aslinearoperator(sp.csr_matrix(M))))
        out.append(("scipy LinearOperator", lambda M: aslinearoperator(spla.aslinearoperator(M))))
    if backend.library == "torch":
        out.append(("torch sparse coo", lambda M: aslinearoperator(backend.asarray(M).to_sparse())))
        out.append(
            ("torch sparse csr", lambda M: aslinearoperator(backend.asarray(M).to_sparse_csr()))
        )
    if backend.library == "jax":
        from jax.experimental import sparse as jsparse

        out.append(
            ("jax BCOO", lambda M: aslinearoperator(jsparse.BCOO.fromdense(backend.asarray(M))))
        )
    if backend.name != "scipy":

        def from_matvec(M):
            dense = backend.asarray(M)
            adjoint = backend.asarray(M.conj().T)
            return LinearOperator.from_callable(
                matvec=lambda x: dense @ x,
                rmatvec=lambda x: adjoint @ x,
                shape=M.shape,
                like=dense,
            )

        def from_matmat(M):
            dense = backend.asarray(M)
            adjoint = backend.asarray(M.conj().T)
            return LinearOperator.from_callable(
                matmat=lambda X: dense @ X, rmatmat=lambda X: adjoint @ X, shape=M.shape, like=dense
            )

        out.append(("from_callable matvec", from_matvec))
        out.append(("from_callable matmat", from_matmat))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 6), (7, 4)])
def test_constructors_match_dense_reference(backend, dtype, shape):
    M = random_matrix(shape, dtype)
    X = random_matrix((shape[1], 3), dtype, seed=1)
    Y = random_matrix((shape[0], 3), dtype, seed=2)
    for name, build in _constructors(backend):
        A = build(M)
        assert A.shape == shape, name
        assert A.dtype == backend.dtype(dtype), name
        assert backend.xp is A.xp or A.library == "numpy", name
        Xb, Yb = backend.asarray(X), backend.asarray(Y)
        assert_close(A.matmat(Xb), M @ X, dtype)
        assert_close(A @ Xb[:, 0], M @ X[:, 0], dtype)
        assert_close(A.matvec(Xb[:, 0]), M @ X[:, 0], dtype)
        assert_close(A.rmatmat(Yb), M.conj().T @ Y, dtype)
        assert_close(A.rmatvec(Yb[:, 0]), M.conj().T @ Y[:, 0], dtype)
        assert_close(A.H @ Yb, M.conj().T @ Y, dtype)
        assert_close(A.T @ Yb, M.T @ Y, dtype)
        assert_close(A.to_dense(), M, dtype)
        # the generic identity-block walk, whatever the subclass overrides
        assert_close(LinearOperator.to_dense(A, block_size=2), M, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_adjoint_of_column_major_block(backend, dtype):
    """A^H X for X laid out column by column (as QR factors are): the dense operator
    multiplies it as (X^H A)^H."""
    M = random_matrix((6, 5), dtype)
    Y = random_matrix((6, 3), dtype, seed=2)
    A = aslinearoperator(backend.asarray(M))
    column_major = A.xp.matrix_transpose(backend.asarray(np.ascontiguousarray(Y.T)))
    assert_close(A.rmatmat(column_major), M.conj().T @ Y, dtype)


def test_operator_keeps_library_device_dtype(backend):
    M = random_matrix((5, 5), "float32")
    A = aslinearoperator(backend.matrix(M))
    out = A @ backend.asarray(np.ones((5, 2), dtype=np.float32))
    assert A.xp is backend.xp
    assert out.dtype == backend.dtype("float32")
    from linop_trace._backend import array_namespace, device_of, same_device

    assert array_namespace(out) is backend.xp
    assert same_device(device_of(out), backend.device)


@pytest.mark.parametrize("dtype", ["int64", "bool"])
def test_integer_and_bool_promote_to_default_float(dense_backend, dtype):
    M = (np.arange(9).reshape(3, 3) % 2).astype(dtype)
    A = aslinearoperator(dense_backend.asarray(M))
    xp = dense_backend.xp
    expected = xp.__array_namespace_info__().default_dtypes()["real floating"]
    assert A.dtype == expected
    np.testing.assert_array_equal(numpy_of(A.to_dense()), M.astype(float))


def test_float32_input_on_float64_operator_promotes(backend):
    M = random_matrix((4, 4), "float64")
    A = aslinearoperator(backend.matrix(M))
    X = backend.asarray(np.ones((4, 2), dtype=np.float32))
    out = A @ X
    assert out.dtype == backend.dtype("float64")
    assert_close(out, M @ np.ones((4, 2)), "float64")


@pytest.mark.parametrize("dtype", DTYPES)
def test_algebra(backend, dtype):
    M = random_matrix((5, 5), dtype, 3)
    N = random_matrix((5, 5), dtype, 4)
    A, B = aslinearoperator(backend.matrix(M)), aslinearoperator(backend.matrix(N))
    X = random_matrix((5, 2), dtype, 5)
    Xb = backend.asarray(X)
    assert_close((A + B) @ Xb, (M + N) @ X, dtype)
    assert_close((A - B) @ Xb, (M - N) @ X, dtype)
    assert_close((2.5 * A) @ Xb, 2.5 * M @ X, dtype)
    assert_close((A * 2.5) @ Xb, 2.5 * M @ X, dtype)
    assert_close((A / 2.0) @ Xb, M / 2.0 @ X, dtype)
    assert_close((-A) @ Xb, -M @ X, dtype)
    assert_close((A @ B) @ Xb, M @ N @ X, dtype)
    assert_close((A @ B).H @ Xb, (M @ N).conj().T @ X, dtype)
    assert_close((A @ B).T @ Xb, (M @ N).T @ X, dtype)
    assert_close((A + B).T.to_dense(), (M + N).T, dtype)
    assert A.T.T is A and A.H.H is A


def test_complex_scalar_makes_complex_operator(backend):
    A = aslinearoperator(backend.matrix(np.eye(3)))
    C = 1j * A
    assert C.dtype == backend.dtype("complex128")
    assert_close(C.to_dense(), 1j * np.eye(3), "complex128")
    assert_close(C.H.to_dense(), -1j * np.eye(3), "complex128")


def test_from_callable_derives_matmat_by_vmap_or_loop(dense_backend):
    d = np.arange(1.0, 6.0)
    dd = dense_backend.asarray(d)
    A = LinearOperator.from_callable(matvec=lambda x: dd * x, shape=(5, 5), like=dd)
    X = np.ones((5, 3))
    assert_close(A @ dense_backend.asarray(X), d[:, None] * X, "float64")


def test_from_callable_falls_back_to_loop_when_not_vmappable():
    torch = pytest.importorskip("torch")
    calls = []

    def matvec(x):
        calls.append(1)
        out = torch.empty_like(x)
        out.copy_(2 * x)
        return x.new_tensor([float(v) for v in out])  # .item()-like: not vmappable

    A = LinearOperator.from_callable(
        matvec=matvec, shape=(3, 3), like=torch.ones(3, dtype=torch.float64)
    )
    with pytest.warns(RuntimeWarning, match="could not be vectorized"):
        out = A @ torch.ones(3, 4, dtype=torch.float64)
    assert torch.equal(out, 2 * torch.ones(3, 4, dtype=torch.float64))
    # later calls go straight to the loop, without a second warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = A @ torch.ones(3, 2, dtype=torch.float64)
    assert torch.equal(again, 2 * torch.ones(3, 2, dtype=torch.float64))


def test_scipy_round_trip():
    import scipy.sparse.linalg as spla

    M = random_matrix((6, 4), "float64")
    A = aslinearoperator(M)
    S = A.to_scipy()
    assert isinstance(S, spla.LinearOperator)
    X = np.ones((4, 2))
    np.testing.assert_allclose(S.matmat(X), M @ X, rtol=1e-12)
    np.testing.assert_allclose(S.rmatvec(np.ones(6)), M.T @ np.ones(6), rtol=1e-12)
    back = aslinearoperator(S)
    np.testing.assert_allclose(back.to_dense(), M, rtol=1e-12)
    np.testing.assert_allclose(back.H.to_dense(), M.T, rtol=1e-12)
    np.testing.assert_allclose(spla.aslinearoperator(M).matvec(np.ones(4)), back @ np.ones(4))


def test_to_scipy_refuses_other_libraries(dense_backend):
    if dense_backend.library == "numpy":
        pytest.skip("NumPy operators convert")
    A = aslinearoperator(dense_backend.asarray(np.eye(2)))
    with pytest.raises(TypeError, match="NumPy-backed"):
        A.to_scipy()


def test_aslinearoperator_returns_operator_unchanged():
    A = aslinearoperator(np.eye(2))
    assert aslinearoperator(A) is A


def test_tags_survive_transposition_and_are_validated():
    A = aslinearoperator(np.eye(2), tags={"symmetric", "positive_semidefinite"})
    assert A.T.tags == A.tags == A.H.tags
    assert "positive_semidefinite" not in (-A).tags
    assert "positive_semidefinite" in (A + 2 * A).tags
    with pytest.raises(ValueError, match="unknown tags"):
        aslinearoperator(np.eye(2), tags={"psd"})


def test_complex_array_scalar_drops_hermitian_tag(backend):
    A = aslinearoperator(backend.matrix(np.eye(2, dtype=complex)), tags={"hermitian"})
    scaled = A * backend.asarray(np.asarray(1j))
    assert "hermitian" not in scaled.tags
    assert "hermitian" not in (1j * A).tags and "hermitian" in (2.0 * A).tags


def test_repr_names_library_and_dtype():
    assert "numpy, float64" in repr(aslinearoperator(np.eye(2)))


def test_empty_operator_to_dense(backend):
    A = aslinearoperator(backend.matrix(np.zeros((0, 0))))
    assert tuple(A.to_dense().shape) == (0, 0)
    assert float(lt.trace(A).value) == 0.0


# ---------------------------------------------------------------- algebra, hypothesis
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra.numpy import arrays  # noqa: E402

finite = st.floats(-10, 10, allow_nan=False, allow_infinity=False)


@st.composite
def operator_expressions(draw, n=4):
    """A random expression tree over + - * @ .T .H with its dense value."""
    leaves = [draw(arrays(np.float64, (n, n), elements=finite)) for _ in range(3)]
    ops = [aslinearoperator(M) for M in leaves]
    expression_op, expression_dense = ops[0], leaves[0]
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["add", "sub", "scale", "compose", "T", "H"]))
        k = draw(st.integers(0, 2))
        if kind == "add":
            expression_op, expression_dense = expression_op + ops[k], expression_dense + leaves[k]
        elif kind == "sub":
            expression_op, expression_dense = expression_op - ops[k], expression_dense - leaves[k]
        elif kind == "scale":
            c = draw(finite)
            expression_op, expression_dense = c * expression_op, c * expression_dense
        elif kind == "compose":
            expression_op, expression_dense = expression_op @ ops[k], expression_dense @ leaves[k]
        elif kind == "T":
            expression_op, expression_dense = expression_op.T, expression_dense.T
        else:
            expression_op, expression_dense = expression_op.H, expression_dense.conj().T
    return expression_op, expression_dense


@settings(max_examples=60, deadline=None)
@given(operator_expressions(), arrays(np.float64, (4, 3), elements=finite))
def test_algebra_matches_dense_hypothesis(expression, X):
    op, dense = expression
    scale = max(1.0, np.abs(dense).max()) * max(1.0, np.abs(X).max())
    np.testing.assert_allclose(op @ X, dense @ X, rtol=1e-10, atol=1e-10 * scale * 4)
    np.testing.assert_allclose(op.rmatmat(X), dense.T @ X, rtol=1e-10, atol=1e-10 * scale * 4)
    np.testing.assert_allclose(
        lt.trace(op, method="exact").value, np.trace(dense), rtol=1e-10, atol=1e-10 * scale * 4
    )


@pytest.mark.parametrize("sparse", [False, True])
def test_adjoint_exact_quantities_are_conjugated(sparse):
    import scipy.sparse as sp

    rng = np.random.default_rng(12)
    M = rng.standard_normal((6, 6)) + 1j * rng.standard_normal((6, 6))
    A = aslinearoperator(sp.csr_array(M) if sparse else M)
    np.testing.assert_allclose(lt.diagonal(A.H, method="exact").value, np.diag(M).conj())
    assert complex(lt.trace(A.H, method="exact")) == pytest.approx(np.trace(M).conj())


def test_single_precision_stays_single():
    rng = np.random.default_rng(13)
    real = aslinearoperator(rng.standard_normal((6, 6)).astype(np.float32))
    assert np.dtype((2j * real).dtype) == np.complex64
    M = (rng.standard_normal((6, 6)) + 1j * rng.standard_normal((6, 6))).astype(np.complex64)
    est = lt.trace(aslinearoperator(M), method="hutchinson", num_matvecs=10, seed=0)
    assert est.value.dtype == np.complex64 and est.stderr.dtype == np.float32
    empty = lt.trace(aslinearoperator(np.zeros((0, 0), dtype=np.complex128)))
    assert np.asarray(empty.stderr).dtype == np.float64


# ------------------------------------------------- NumPy scalars, tags, peers' layouts
def test_numpy_scalars_scale_as_the_python_numbers_they_hold():
    """np.complex64 is no ``complex``: the adjoint of c A kept c instead of conj(c) and
    the Hermitian tag survived; np.float64 widened a float32 operator's products (NumPy
    scalars are not weakly typed)."""
    M = np.array([[1.0, 2.0], [3.0, 4.0]])
    B = np.complex64(1 + 2j) * aslinearoperator(M)
    np.testing.assert_allclose(B.H.to_dense(), np.conj(1 + 2j) * M.T)
    np.testing.assert_allclose(lt.col_sums(B).value, (1 + 2j) * M.sum(axis=0))
    H = aslinearoperator(M + M.T, tags=("hermitian",))
    assert "hermitian" not in (np.complex64(1j) * H).tags
    M32 = M.astype(np.float32)
    for scalar in (np.float64(2.0), np.float32(2.0)):
        C = scalar * aslinearoperator(M32)
        assert C.dtype == np.float32
        assert (C @ np.ones((2, 1), dtype=np.float32)).dtype == np.float32
        assert lt.trace(C, method="exact").value.dtype == np.float32


def test_numpy_scalar_on_array_api_strict_stays_in_its_library():
    xps = pytest.importorskip("array_api_strict")
    A = aslinearoperator(xps.asarray([[1.0, 2.0], [3.0, 4.0]]))
    B = np.float64(2.0) * A
    product = B @ xps.ones((2, 1), dtype=xps.float64)
    assert type(product) is type(A @ xps.ones((2, 1), dtype=xps.float64))
    assert float(lt.trace(B, method="exact").value) == 10.0


def test_tags_added_after_a_compiled_estimate_are_seen():
    """aslinearoperator(op, tags=...) copies op; the copy kept the compiled structure an
    estimate had stored on op, with op's tags, and NA-Hutch++ refused the tag just added."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    M = random_matrix((6, 6), np.float64)
    S = jnp.asarray(M + M.T)
    C = LinearOperator.from_callable(matmat=jax.jit(lambda X: S @ X), shape=(6, 6), like=S)
    lt.trace(C, method="hutchinson", num_matvecs=6, seed=0)
    tagged = aslinearoperator(C, tags="symmetric")
    fresh = aslinearoperator(
        LinearOperator.from_callable(matmat=jax.jit(lambda X: S @ X), shape=(6, 6), like=S),
        tags="symmetric",
    )
    key = jax.random.key(1)
    value = lt.trace(tagged, method="na-hutch++", num_matvecs=6, seed=key).value
    assert float(value) == pytest.approx(float(lt.trace(fresh, "na-hutch++", 6, key).value))


def test_scipy_operator_with_rmatmat_alone_has_an_adjoint():
    spla = pytest.importorskip("scipy.sparse.linalg")
    M = np.array([[1.0, 2.0, 0.0], [3.0, 4.0, 5.0]])
    L = spla.LinearOperator(M.shape, matvec=lambda x: M @ x, rmatmat=lambda X: M.T @ X)
    np.testing.assert_allclose(lt.col_sums(L).value, M.sum(axis=0))
    np.testing.assert_allclose(aslinearoperator(L).H.to_dense(), M.T)


@pytest.mark.parametrize("layout", ["bcsr", "n_batch", "n_dense"])
def test_jax_sparse_layouts_become_plain_bcoo(layout):
    """A BCSR, or a BCOO with batch or dense dimensions, gave right products and crashed
    the exact trace, diagonal and row sums."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from jax.experimental import sparse as jsparse

    R = np.array([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0], [4.0, 0.0, 5.0]])
    S = {
        "bcsr": lambda: jsparse.BCSR.fromdense(jnp.asarray(R)),
        "n_batch": lambda: jsparse.BCOO.fromdense(jnp.asarray(R), n_batch=1),
        "n_dense": lambda: jsparse.BCOO.fromdense(jnp.asarray(R), n_dense=1),
    }[layout]()
    assert float(lt.trace(S, method="exact").value) == 9.0
    np.testing.assert_array_equal(np.asarray(lt.diagonal(S, method="exact").value), np.diag(R))
    np.testing.assert_array_equal(np.asarray(lt.row_sums(S).value), R.sum(axis=1))


def test_non_numeric_matrices_are_refused():
    """Integer and bool matrices are promoted to float; a datetime64 one was too."""
    for M in (
        np.array([[1, 2], [3, 4]], dtype="datetime64[D]"),
        np.array([[1, 2], [3, 4]], dtype="timedelta64[s]"),
    ):
        with pytest.raises(TypeError, match="numeric matrix"):
            aslinearoperator(M)
    assert float(lt.trace(np.arange(4).reshape(2, 2), method="exact").value) == 3.0


# ----------------------------------------------------------------- the caller's data
def test_exact_diagonal_shares_no_memory_with_the_callers_matrix():
    """The exact diagonal of a stored matrix (the default method) was a view of it: a
    torch in-place edit of the result wrote into the caller's matrix, a later write into
    a NumPy matrix changed a result already returned, and a diagonal operator's diagonal
    and row sums were the caller's vector itself."""
    torch = pytest.importorskip("torch")
    T = torch.arange(9.0, dtype=torch.float64).reshape(3, 3)
    lt.diagonal(T).value.zero_()
    assert T.diagonal().tolist() == [0.0, 4.0, 8.0]
    A = np.arange(9.0).reshape(3, 3)
    d = lt.diagonal(A, method="exact").value
    A[0, 0] = 100.0
    assert d.tolist() == [0.0, 4.0, 8.0]
    for vector in (torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), np.array([1.0, 2.0, 3.0])):
        D = lt.diagonal_operator(vector)
        for result in (lt.diagonal(D, method="exact").value, lt.row_sums(D).value):
            assert not np.shares_memory(np.asarray(result), np.asarray(vector))
            assert np.asarray(result).tolist() == [1.0, 2.0, 3.0]


def test_an_operator_follows_in_place_writes_to_its_matrix():
    """An operator kept its matrix's adjoint (sparse) and its cast to another dtype
    (dense) from the first product: after an in-place write to the matrix, A^H X and a
    complex A X read the old values while A X read the new ones."""
    import scipy.sparse as sp

    torch = pytest.importorskip("torch")
    S = sp.csr_matrix(np.arange(1.0, 10.0).reshape(3, 3))
    op = aslinearoperator(S)
    lt.col_sums(op)
    S.data *= 10
    np.testing.assert_array_equal(lt.col_sums(op).value, [120.0, 150.0, 180.0])
    N = np.diag([1.0, 2.0, 3.0])
    op = aslinearoperator(N)
    ones = np.ones((3, 1), dtype=complex)
    op @ ones
    N *= 2
    np.testing.assert_array_equal((op @ ones).ravel(), [2.0, 4.0, 6.0])
    for T in (
        torch.diag(torch.arange(1.0, 4.0, dtype=torch.float64)),
        torch.diag(torch.arange(1.0, 4.0, dtype=torch.float64)).to_sparse_csr(),
    ):
        op = aslinearoperator(T)
        ones = torch.ones(3, 1, dtype=torch.complex128)
        op @ ones, lt.col_sums(op)
        T.mul_(10)
        assert (op @ ones).real.ravel().tolist() == [10.0, 20.0, 30.0]
        assert lt.col_sums(op).value.tolist() == [10.0, 20.0, 30.0]


def test_inference_mode_tensors_keep_their_adjoint_and_casts():
    """Tensors made under ``torch.inference_mode`` count no versions: reading one for the
    kept adjoint or cast raised "Inference tensors do not track version counter"."""
    torch = pytest.importorskip("torch")
    with torch.inference_mode():
        A = torch.randn(20, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        S = A.to_sparse_csr()
    np.testing.assert_allclose(lt.col_sums(S).value.numpy(), A.sum(0).numpy(), rtol=1e-12)
    est = lt.diagonal(S, method="xdiag", num_matvecs=10, seed=0, decompose=False)
    assert est.value.shape == (20,)
    ones = torch.ones(20, 2, dtype=torch.complex128)
    np.testing.assert_allclose(
        aslinearoperator(A).matmat(ones).real.numpy(), (A @ ones.real).numpy(), rtol=1e-12
    )


def test_a_scaled_half_precision_operator_is_estimated_in_single_precision():
    """``torch.tensor(2.0) * A`` with A float16 is float32 by the array API's rule, but
    its exact diagonal stayed float16 (torch's rule for a 0-d tensor): a trace of 2e5
    read ``inf``. ``2j * A`` was complex128 for float16 and crashed torch's exact path
    (complex32 has no kernels)."""
    torch = pytest.importorskip("torch")
    A = torch.diag(torch.full((100,), 1000.0)).half()
    op = torch.tensor(2.0) * aslinearoperator(A)
    for method in ("exact", "auto"):
        est = lt.trace(op, method=method)
        assert est.value.dtype == torch.float32 and float(est) == 2e5
    assert lt.diagonal(op, method="exact").value.dtype == torch.float32
    wide = torch.tensor(2.0, dtype=torch.float64) * aslinearoperator(torch.eye(5))
    assert lt.trace(wide, method="exact").value.dtype == torch.float64  # (the operator's)
    for matrix in (np.eye(8, dtype=np.float16), torch.eye(8, dtype=torch.float16)):
        op = 2j * aslinearoperator(matrix)
        for method in ("exact", "hutchinson"):
            est = lt.trace(op, method=method, num_matvecs=4, seed=0)
            assert complex(est) == 16j
            assert str(est.value.dtype).endswith("complex64")


def test_torch_compressed_half_precision_matrices_multiply():
    """torch's CPU kernels for CSR have no float16/bfloat16: every randomized method and
    ``row_sums`` of such a matrix crashed ("addmm_out_sparse_csr_impl_mkl" not
    implemented for 'Half'); the product now runs in float32, rounded back."""
    torch = pytest.importorskip("torch")
    n = 50
    dense = torch.diag(torch.full((n,), 2.0)) - torch.diag(torch.ones(n - 1), 1)
    for dtype in (torch.float16, torch.bfloat16):
        A = dense.to(dtype).to_sparse_csr()
        assert lt.row_sums(A).value.tolist() == dense.sum(1).tolist()
        for method in ("hutchinson", "xtrace"):
            est = lt.trace(A, method=method, num_matvecs=10, seed=0)
            assert est.value.dtype == torch.float32 and np.isfinite(float(est))


def test_a_foreign_dtype_for_a_callable_is_named():
    """``from_callable(like=<torch tensor>, dtype=np.float64)`` raised an AttributeError
    about ``is_floating_point``."""
    torch = pytest.importorskip("torch")
    T = torch.eye(4, dtype=torch.float64)
    for dtype in (np.float64, "float64", float):
        with pytest.raises(TypeError, match="is not a dtype of torch, the library of `like`"):
            LinearOperator.from_callable(matmat=lambda X: T @ X, shape=(4, 4), like=T, dtype=dtype)
    op = LinearOperator.from_callable(
        matmat=lambda X: T @ X, shape=(4, 4), like=T, dtype=torch.float32
    )
    assert op.dtype == torch.float32
    A = np.eye(3)
    assert (
        LinearOperator.from_callable(
            matmat=lambda X: A @ X, shape=(3, 3), like=A, dtype="float32"
        ).dtype
        == np.float32
    )
