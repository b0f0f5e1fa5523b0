"""Sparse matrices of SciPy, torch, JAX (BCOO), cupyx and Dask (sparse chunks): products,
adjoints, diagonals."""

from __future__ import annotations

from typing import Any

from ._dask_sparse import (
    dask_sparse_adjoint,
    dask_sparse_astype,
    dask_sparse_diagonal,
    dask_sparse_matmat,
    dask_sparse_to_dense,
    is_dask_sparse,
    prepare_dask_sparse,
)
from ._identity import _is_cupy_sparse, _is_jax_sparse, _is_scipy_sparse, _is_torch_sparse

__all__ = [
    "prepare_sparse",
    "sparse_adjoint",
    "sparse_astype",
    "sparse_diagonal",
    "sparse_matmat",
    "sparse_to_dense",
]


def sparse_astype(matrix: Any, dtype: Any) -> Any:
    """A sparse matrix with its values cast to ``dtype`` (no copy if unchanged)."""
    if matrix.dtype == dtype:
        return matrix
    if is_dask_sparse(matrix):
        return dask_sparse_astype(matrix, dtype)
    if _is_jax_sparse(matrix):
        return matrix.astype(dtype)
    if _is_torch_sparse(matrix):
        return matrix.to(dtype)
    return matrix.astype(dtype)


def sparse_matmat(matrix: Any, block: Any) -> Any:
    """``matrix @ block`` for a sparse matrix and a dense 2-d block of its library."""
    if is_dask_sparse(matrix):
        return dask_sparse_matmat(matrix, block)
    if _is_scipy_sparse(matrix) or _is_cupy_sparse(matrix):
        return matrix @ block
    if _is_torch_sparse(matrix):
        import torch

        if matrix.layout == torch.sparse_coo:
            return torch.sparse.mm(matrix, block)
        half = {torch.float16: torch.float32, torch.bfloat16: torch.float32}
        half[torch.complex32] = torch.complex64
        if matrix.device.type == "cpu" and matrix.dtype in half:
            # torch's CPU kernels for compressed layouts have no half precision ("addmm_out_
            # sparse_csr_impl_mkl" not implemented for 'Half'): in single precision, each
            # entry rounded back, as a half-precision product rounds it
            wide = half[matrix.dtype]
            return (matrix.to(wide) @ block.to(wide)).to(block.dtype)
        return matrix @ block
    return matrix @ block


def sparse_adjoint(matrix: Any) -> Any:
    """The conjugate transpose of a sparse matrix, in its library and (where it can) format."""
    if is_dask_sparse(matrix):
        return dask_sparse_adjoint(matrix)
    if _is_scipy_sparse(matrix):
        # the transpose of CSR is CSC over the same arrays (no conversion: CSR's took half
        # a 20-column product at n = 10^5, 10 entries per row; CSC's product is as fast)
        return matrix.conj().T
    if _is_cupy_sparse(matrix):
        return matrix.conj().T.tocsr()
    if _is_torch_sparse(matrix):
        import torch

        coo = matrix if matrix.layout == torch.sparse_coo else matrix.to_sparse_coo()
        adjoint = coo.t().coalesce()
        if adjoint.is_complex():
            adjoint = adjoint.conj().coalesce()
        return adjoint.to_sparse_csr() if matrix.layout == torch.sparse_csr else adjoint
    if _is_jax_sparse(matrix):
        from jax.experimental import sparse as jsparse

        transposed = matrix.T
        return jsparse.BCOO((transposed.data.conj(), transposed.indices), shape=transposed.shape)
    raise TypeError(f"not a supported sparse matrix: {type(matrix)!r}")  # pragma: no cover


def sparse_to_dense(matrix: Any) -> Any:
    """A dense array of the same library holding the sparse matrix."""
    if is_dask_sparse(matrix):
        return dask_sparse_to_dense(matrix)
    if _is_scipy_sparse(matrix):
        return matrix.toarray()
    if _is_cupy_sparse(matrix):
        return matrix.toarray()
    if _is_torch_sparse(matrix):
        return matrix.to_dense()
    return matrix.todense()


def sparse_diagonal(matrix: Any) -> Any:
    """The main diagonal of a square sparse matrix as a dense 1-d array, O(nnz) work."""
    if is_dask_sparse(matrix):
        return dask_sparse_diagonal(matrix)
    if _is_scipy_sparse(matrix) or _is_cupy_sparse(matrix):
        return matrix.diagonal()
    if _is_torch_sparse(matrix):
        import torch

        coo = matrix if matrix.layout == torch.sparse_coo else matrix.to_sparse_coo()
        coo = coo.coalesce()
        rows, cols = coo.indices()
        values = coo.values()
        on_diag = rows == cols
        out = torch.zeros(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
        return out.index_add(0, rows[on_diag], values[on_diag])
    if _is_jax_sparse(matrix):
        import jax.numpy as jnp

        rows, cols = matrix.indices[:, 0], matrix.indices[:, 1]
        values = jnp.where(rows == cols, matrix.data, 0)
        return jnp.zeros(matrix.shape[0], dtype=matrix.dtype).at[rows].add(values)
    raise TypeError(f"not a supported sparse matrix: {type(matrix)!r}")  # pragma: no cover


def prepare_sparse(matrix: Any) -> Any:
    """Normalize a sparse input to a format with fast products (CSR for SciPy/CuPy)."""
    if is_dask_sparse(matrix):
        return prepare_dask_sparse(matrix)
    if _is_scipy_sparse(matrix) or _is_cupy_sparse(matrix):
        return matrix.tocsr()
    if _is_torch_sparse(matrix):
        import torch

        if matrix.layout == torch.sparse_coo:
            return matrix.coalesce()
        if matrix.layout in (torch.sparse_csr,):
            return matrix
        return matrix.to_sparse_csr()
    return matrix
