"""Operators of peer libraries (curvlinops, lineax, PyLops, linear_operator) through
``aslinearoperator``: each against its dense matrix, in its own library."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import linop_trace as lt

N = 40
SEED = 3


def _matrix(symmetric: bool = False) -> np.ndarray:
    M = np.random.default_rng(0).standard_normal((N, N))
    return M + M.T if symmetric else M


def _as_numpy(value):
    return np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)


def _check_against_dense(peer, dense, tags):
    """Exact trace, diagonal, row and column sums, and Hutchinson with one seed, of the
    peer's operator and of its dense matrix (same library, same probes: equal to round-off)."""
    A = lt.aslinearoperator(peer)
    assert A.tags == frozenset(tags)
    assert A.xp is lt.aslinearoperator(dense).xp
    M = _as_numpy(dense)
    np.testing.assert_allclose(_as_numpy(lt.trace(A, method="exact").value), np.trace(M))
    diagonal = lt.diagonal(A, method="exact").value
    assert type(diagonal) is type(dense)
    np.testing.assert_allclose(_as_numpy(diagonal), np.diag(M), atol=1e-12)
    np.testing.assert_allclose(_as_numpy(lt.row_sums(A).value), M.sum(axis=1), atol=1e-12)
    np.testing.assert_allclose(_as_numpy(lt.col_sums(A).value), M.sum(axis=0), atol=1e-12)
    estimate = lt.trace(A, method="hutchinson", num_matvecs=12, seed=SEED)
    reference = lt.trace(dense, method="hutchinson", num_matvecs=12, seed=SEED)
    assert estimate.num_matvecs == 12
    np.testing.assert_allclose(float(estimate), float(reference), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(float(estimate.stderr), float(reference.stderr), rtol=1e-8)
    # a complex block on the real operator: both parts go through (the imaginary part
    # was dropped: A @ (1j v) gave 0)
    rng = np.random.default_rng(1)
    n = M.shape[1]
    V = rng.standard_normal((n, 2)) + 1j * rng.standard_normal((n, 2))
    block = A.xp.asarray(V, device=A.device)
    atol = 1e3 * np.finfo(M.dtype).eps * np.abs(M).sum(axis=1).max()  # (M's precision)
    np.testing.assert_allclose(_as_numpy(A @ block), M @ V, atol=atol)
    np.testing.assert_allclose(_as_numpy(A.H @ block), M.T @ V, atol=atol)


def test_importing_linop_trace_imports_no_peer():
    code = (
        "import linop_trace, sys; "
        "assert not {'curvlinops', 'lineax', 'pylops', 'linear_operator'} & set(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------ lineax
@pytest.mark.parametrize("symmetric", [True, False])
def test_lineax(symmetric):
    lx = pytest.importorskip("lineax")
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    M = jnp.asarray(_matrix(symmetric))
    tags = (lx.symmetric_tag,) if symmetric else ()
    _check_against_dense(lx.MatrixLinearOperator(M, tags), M, {"symmetric"} if symmetric else ())


def test_lineax_psd_tag_and_vector_structures():
    lx = pytest.importorskip("lineax")
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    M = jnp.asarray(_matrix(symmetric=True)) + 2 * N * jnp.eye(N)
    op = lx.MatrixLinearOperator(M, (lx.symmetric_tag, lx.positive_semidefinite_tag))
    assert lt.aslinearoperator(op).tags == {"symmetric", "positive_semidefinite"}
    assert lt.aslinearoperator(op, tags="hermitian").tags == {
        "symmetric",
        "positive_semidefinite",
        "hermitian",
    }
    pytree = lx.IdentityLinearOperator(
        {"a": jax.ShapeDtypeStruct((2,), jnp.float64), "b": jax.ShapeDtypeStruct((3,), jnp.float64)}
    )
    with pytest.raises(TypeError, match="lineax operators on vectors"):
        lt.aslinearoperator(pytree)


# ------------------------------------------------------------------------ PyLops
def test_pylops_symmetric_derivative_product():
    pylops = pytest.importorskip("pylops")
    D = pylops.FirstDerivative(N, dtype="float64")
    op = D.H @ D
    _check_against_dense(op, np.asarray(op.todense()), ())


def test_pylops_dense_nonsymmetric():
    pylops = pytest.importorskip("pylops")
    M = _matrix()
    _check_against_dense(pylops.MatrixMult(M, dtype="float64"), M, ())


def test_pylops_products_are_counted_blocks_and_errors_are_ours():
    pylops = pytest.importorskip("pylops")
    M = _matrix()
    columns = []

    def matvec(x):
        columns.append(1)
        return M @ x

    op = pylops.FunctionOperator(matvec, N, N, dtype="float64")
    estimate = lt.trace(op, method="hutchinson", num_matvecs=10, seed=SEED)
    assert estimate.num_matvecs == 10 and len(columns) == 10
    with pytest.raises(NotImplementedError, match="pylops operator .* no adjoint product"):
        lt.col_sums(op)

    broken = pylops.FunctionOperator(lambda x: np.full_like(x, np.nan), N, N, dtype="float64")
    with pytest.raises(FloatingPointError):
        lt.trace(broken, method="hutchinson", num_matvecs=4, seed=SEED)


# -------------------------------------------------------------- linear_operator
def test_linear_operator_dense():
    pytest.importorskip("linear_operator")
    import torch
    from linear_operator.operators import DenseLinearOperator

    M = torch.tensor(_matrix())
    _check_against_dense(DenseLinearOperator(M), M, ())


def test_linear_operator_diagonal_plus_low_rank():
    pytest.importorskip("linear_operator")
    import torch
    from linear_operator.operators import (
        AddedDiagLinearOperator,
        DiagLinearOperator,
        LowRankRootLinearOperator,
    )

    generator = torch.Generator().manual_seed(0)
    R = torch.randn(N, 3, dtype=torch.float64, generator=generator)
    d = torch.rand(N, dtype=torch.float64, generator=generator) + 0.5
    low_rank = LowRankRootLinearOperator(R)
    _check_against_dense(low_rank, R @ R.T, {"symmetric", "positive_semidefinite"})
    kernel = AddedDiagLinearOperator(low_rank, DiagLinearOperator(d))
    # the diagonal could be negative: only the symmetry is certain
    _check_against_dense(kernel, R @ R.T + torch.diag(d), {"symmetric"})


def test_linear_operator_products_are_counted_blocks():
    pytest.importorskip("linear_operator")
    import torch
    from linear_operator.operators import DenseLinearOperator

    columns = []

    class Counting(DenseLinearOperator):
        def _matmul(self, rhs):
            columns.append(rhs.shape[-1])
            return super()._matmul(rhs)

    op = Counting(torch.tensor(_matrix()))
    estimate = lt.trace(op, method="hutchinson", num_matvecs=10, seed=SEED)
    assert estimate.num_matvecs == 10 and sum(columns) == 10
    assert isinstance(estimate.value, torch.Tensor)


# ------------------------------------------------------------------- curvlinops
def _tiny_problem():
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).double()
    params = list(model.parameters())
    data = [(torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64))]
    return model, torch.nn.MSELoss(), params, data


@pytest.mark.parametrize(
    ("name", "tags"),
    [
        ("HessianLinearOperator", {"symmetric"}),
        ("GGNLinearOperator", {"symmetric", "positive_semidefinite"}),
    ],
)
def test_curvlinops_curvature(name, tags):
    curvlinops = pytest.importorskip("curvlinops")
    import torch

    model, loss, params, data = _tiny_problem()
    op = getattr(curvlinops, name)(model, loss, params, data)
    dense = op @ torch.eye(op.shape[1], dtype=torch.float64)  # 43 columns
    _check_against_dense(op, dense, tags)


def test_curvlinops_jacobian_adjoint():
    curvlinops = pytest.importorskip("curvlinops")
    import torch

    model, _, params, data = _tiny_problem()
    op = curvlinops.JacobianLinearOperator(model, params, data)
    dense = op @ torch.eye(op.shape[1], dtype=torch.float64)
    A = lt.aslinearoperator(op)
    assert A.shape == (24, 43) and A.tags == frozenset()
    torch.testing.assert_close(lt.row_sums(A).value, dense.sum(1))
    torch.testing.assert_close(lt.col_sums(A).value, dense.sum(0))


def test_curvlinops_products_are_counted_blocks_and_missing_adjoint():
    pytest.importorskip("curvlinops")
    import torch
    from curvlinops._torch_base import PyTorchLinearOperator

    M = torch.tensor(_matrix())
    columns = []

    class Counting(PyTorchLinearOperator):
        def __init__(self):
            super().__init__([(N,)], [(N,)])

        @property
        def dtype(self):
            return M.dtype

        @property
        def device(self):
            return M.device

        def _matmat(self, X):
            columns.append(X[0].shape[1])
            return [M @ X[0]]

    op = Counting()
    estimate = lt.trace(op, method="hutchinson", num_matvecs=10, seed=SEED)
    assert estimate.num_matvecs == 10 and sum(columns) == 10
    reference = lt.trace(M, method="hutchinson", num_matvecs=10, seed=SEED)
    torch.testing.assert_close(estimate.value, reference.value)
    torch.testing.assert_close(lt.row_sums(op).value, M.sum(1))
    with pytest.raises(NotImplementedError, match="curvlinops operator Counting has no adjoint"):
        lt.col_sums(op)
