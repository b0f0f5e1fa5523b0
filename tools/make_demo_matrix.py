"""Write linop_trace/data/digits_knn_laplacian.mtx, the sparse matrix of ``linop-trace demo``.

The graph Laplacian L = D - W of the symmetric 10-nearest-neighbour graph of the 1,797
handwritten digits shipped with scikit-learn (8x8 images, Euclidean distance on the 64
pixel values): a real sparse matrix (1797 x 1797, 26,567 nonzeros), stored in Matrix
Market "integer symmetric" form, so the file is small and exact.

The pixels are integers, so squared distances are computed exactly in integers, and many
are equal: 62 digits have a tie at their 10th neighbour. Rather than break ties by an
arbitrary order (which made a kNN library's answer depend on the BLAS thread count), a
digit is joined to every digit at most as far as its 10th nearest one. The file is
therefore the same on every machine; tests/test_cli.py checks it against this script.

Run from the repository root (needs scikit-learn):

    python tools/make_demo_matrix.py
"""

from __future__ import annotations

import pathlib

import numpy as np
import scipy.io
import scipy.sparse as sp
from sklearn.datasets import load_digits

NEIGHBOURS = 10
TARGET = pathlib.Path(__file__).resolve().parents[1] / "linop_trace" / "data"
NAME = "digits_knn_laplacian.mtx"


def build() -> sp.csr_array:
    """The Laplacian of the symmetrized kNN graph (ties included), integer entries."""
    pixels = load_digits().data.astype(np.int64)  # integers 0..16
    squares = np.sum(pixels * pixels, axis=1)
    distances = squares[:, None] + squares[None, :] - 2 * pixels @ pixels.T  # exact
    np.fill_diagonal(distances, np.iinfo(np.int64).max)  # no self loops
    kth = np.sort(distances, axis=1)[:, NEIGHBOURS - 1]
    directed = sp.csr_array((distances <= kth[:, None]).astype(np.int64))  # ties included
    adjacency = ((directed + directed.T) > 0).astype(np.int64)
    degrees = np.asarray(adjacency.sum(axis=1)).ravel()
    return sp.csr_array(sp.csr_array(sp.diags(degrees, dtype=np.int64)) - adjacency)


def main() -> None:
    laplacian = build()
    TARGET.mkdir(parents=True, exist_ok=True)
    path = TARGET / NAME
    scipy.io.mmwrite(
        path,
        sp.coo_array(laplacian),
        comment=(
            f"Graph Laplacian D - W of the symmetric {NEIGHBOURS}-nearest-neighbour graph "
            "(ties included) of the 1797 scikit-learn digits (tools/make_demo_matrix.py)"
        ),
        field="integer",
        symmetry="symmetric",
    )
    size = path.stat().st_size
    print(
        f"wrote {path} ({laplacian.shape[0]} x {laplacian.shape[1]}, nnz {laplacian.nnz}, {size} bytes)"
    )
    print(f"trace {laplacian.diagonal().sum()}")


if __name__ == "__main__":
    main()
