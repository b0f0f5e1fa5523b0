"""Inputs normalized at the boundary: NumPy subclasses (np.matrix, masked arrays)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._identity import _is_jax_sparse, _module_loaded

__all__ = ["plain_array", "plain_matrix"]


def plain_array(x: Any) -> Any:
    """``x``, with a NumPy ``ndarray`` subclass turned into a plain ``ndarray``: in an
    ``np.matrix`` (what SciPy's ``todense()`` returns) ``*`` is a matrix product and every
    reduction keeps two dimensions, which would make the estimators' arithmetic wrong."""
    if isinstance(x, np.ndarray) and type(x) is not np.ndarray:
        if isinstance(x, np.ma.MaskedArray):
            raise TypeError(
                "a product returned a masked array; an operator's products must be plain "
                "arrays (no entry of A x can be missing)"
            )
        return np.asarray(x)
    return x


def plain_matrix(matrix: Any) -> Any:
    """A NumPy matrix given to :func:`~linop_trace.aslinearoperator` as a plain ``ndarray``: an
    ``np.matrix`` as its array, a masked array without masked entries as its data; a
    masked array with masked entries is refused (a trace or diagonal of a matrix with
    missing entries is not defined, and its data under the mask is arbitrary).

    A JAX sparse matrix becomes a BCOO without batch or dense dimensions (the layout
    the sparse kernels read: a BCSR, or a BCOO with ``n_batch`` or ``n_dense`` above 0,
    gave right products and crashed the exact trace and diagonal)."""
    if _is_jax_sparse(matrix):
        return _plain_bcoo(matrix)
    if _module_loaded("torch"):
        _check_torch_matrix(matrix)
    if not isinstance(matrix, np.ndarray) or type(matrix) is np.ndarray:
        return matrix
    if isinstance(matrix, np.ma.MaskedArray):
        masked = int(np.count_nonzero(np.ma.getmaskarray(matrix)))
        if masked:
            raise ValueError(
                f"the matrix is a masked array with {masked} masked entries; a trace or "
                "diagonal needs every entry: fill them (matrix.filled(value)) or drop the mask"
            )
        return np.asarray(matrix.data)
    return np.asarray(matrix)


def _plain_bcoo(matrix: Any) -> Any:
    from jax.experimental import sparse as jsparse

    if not isinstance(matrix, jsparse.BCOO):
        if not hasattr(matrix, "to_bcoo"):
            raise TypeError(
                f"JAX sparse matrices are taken as BCOO or BCSR, got {type(matrix).__name__}: "
                "convert it with jax.experimental.sparse.BCOO.fromdense or its to_bcoo()"
            )
        matrix = matrix.to_bcoo()
    if matrix.n_batch or matrix.n_dense:
        matrix = jsparse.bcoo_update_layout(matrix, n_batch=0, n_dense=0)
    return matrix


def _check_torch_matrix(matrix: Any) -> None:
    """Refuse torch tensors no product can run on, naming why: the ``meta`` device (no
    values: the estimate failed deep inside, in the random generator), and the block
    sparse layouts (BSR, BSC: torch's own conversion error)."""
    import torch

    if not isinstance(matrix, torch.Tensor):
        return
    if matrix.device.type == "meta":
        raise TypeError(
            "the matrix is a torch tensor on the 'meta' device, which holds no values: "
            "materialize it on a real device first"
        )
    if matrix.layout in (torch.sparse_bsr, torch.sparse_bsc):
        raise TypeError(
            f"torch's {matrix.layout} layout is not supported: convert the matrix with "
            ".to_sparse_coo() or .to_sparse_csr() (COO, CSR and CSC are)"
        )
