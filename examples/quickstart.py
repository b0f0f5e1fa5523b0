"""Exact trace, diagonal and row sums of a real sparse matrix on every installed backend.

The matrix ships with the package: the graph Laplacian L = D - W of the 10-nearest-
neighbour graph of scikit-learn's 1,797 handwritten digits (1797 x 1797, integer entries).
Its trace is the sum of the vertex degrees, its diagonal the degrees themselves, and its
row sums are exactly zero, so every line below can be checked by eye.

The same matrix is handed to each array library the way its users hold it (SciPy CSR,
a NumPy array, a torch sparse tensor, a JAX BCOO array, an array_api_strict array);
libraries that are not installed are reported and skipped.

Run:  python examples/quickstart.py
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.io
import scipy.sparse as sp

import linop_trace
from linop_trace._backend import to_numpy

HEAD = 5


def load_matrix() -> sp.csr_array:
    """The bundled Laplacian as a float64 SciPy CSR array."""
    source = importlib.resources.files("linop_trace") / "data" / "digits_knn_laplacian.mtx"
    with importlib.resources.as_file(source) as path:
        return sp.csr_array(scipy.io.mmread(path), dtype=np.float64)


def as_torch(L: sp.csr_array) -> Any:
    import torch

    coo = L.tocoo()
    indices = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
    values = torch.from_numpy(coo.data)
    return torch.sparse_coo_tensor(indices, values, L.shape, check_invariants=True).coalesce()


def as_jax(L: sp.csr_array) -> Any:
    import jax

    jax.config.update("jax_enable_x64", True)  # keep float64, as the other libraries do
    from jax.experimental import sparse as jsparse

    return jsparse.BCOO.from_scipy_sparse(L)


def as_strict(L: sp.csr_array) -> Any:
    import array_api_strict

    return array_api_strict.asarray(L.toarray())


BACKENDS: dict[str, Callable[[sp.csr_array], Any]] = {
    "scipy (sparse CSR)": lambda L: L,
    "numpy (dense)": lambda L: L.toarray(),
    "torch (sparse COO)": as_torch,
    "jax (BCOO)": as_jax,
    "array_api_strict (dense)": as_strict,
    # only products are known: exact trace/diagonal walk identity blocks (n matvecs)
    "implicit (from_callable)": lambda L: linop_trace.LinearOperator.from_callable(
        matmat=lambda X: L @ X, shape=L.shape, dtype=np.float64
    ),
}


def main() -> None:
    L = load_matrix()
    print(f"digits kNN graph Laplacian: {L.shape[0]} x {L.shape[1]}, {L.nnz} nonzeros")
    print(f"linop_trace {linop_trace.__version__}\n")
    for name, convert in BACKENDS.items():
        try:
            matrix = convert(L)
        except ImportError as error:
            print(f"{name:26s} skipped: {error}")
            continue
        A = linop_trace.aslinearoperator(matrix)
        trace = linop_trace.trace(A, method="exact")
        diagonal = linop_trace.diagonal(A, method="exact")
        sums = linop_trace.row_sums(A)
        head = to_numpy(diagonal.value)[:HEAD]
        row_sums = to_numpy(sums.value)
        print(
            f"{name:26s} trace = {float(trace):.1f}  "
            f"diagonal[:{HEAD}] = {head.tolist()}  "
            f"row_sums[:{HEAD}] = {row_sums[:HEAD].tolist()}  "
            f"max |row sum| = {np.max(np.abs(row_sums)):.1f}  "
            f"(matvecs: trace {trace.num_matvecs}, diagonal {diagonal.num_matvecs}, "
            f"row sums {sums.num_matvecs})"
        )
    estimate = linop_trace.trace(L, method="hutchinson", num_matvecs=100, seed=0)
    low, high = estimate.ci(0.95)
    print(
        f"\nfor comparison, Hutchinson with 100 Rademacher probes: {float(estimate):.1f} "
        f"(95% interval {low:.1f} .. {high:.1f})"
    )


if __name__ == "__main__":
    main()
