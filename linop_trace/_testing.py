"""Standard test matrices of the randomized trace literature (for tests and benchmarks).

The six spectra of Epperly, Tropp and Webber (2024), Section 5 (after Meyer et al. 2021),
with Haar-random eigenvectors: ``A = Q diag(lambda) Q^T``. The 2-D Poisson matrix, block
by block, for the distributed benchmarks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["SPECTRA", "eigenvalues", "poisson_2d_block", "poisson_2d_dask", "test_matrix"]

#: Names accepted by :func:`test_matrix`.
SPECTRA = ("flat", "poly", "slowexp", "fastexp", "smallstep", "bigstep")


def eigenvalues(name: str, n: int = 1000) -> np.ndarray:
    """The eigenvalues of the named test matrix, in decreasing order (index i = 1..n).

    Examples
    --------
    >>> from linop_trace._testing import eigenvalues
    >>> eigenvalues("poly", 3).tolist()
    [1.0, 0.25, 0.1111111111111111]
    """
    i = np.arange(1, n + 1, dtype=np.float64)
    if name == "flat":
        return np.linspace(3.0, 1.0, n)
    if name == "poly":
        return i**-2.0
    if name == "slowexp":
        return 0.9 ** (i - 1)
    if name == "fastexp":
        return 0.7 ** (i - 1)
    if name in ("smallstep", "bigstep"):
        tail = 1e-3 if name == "smallstep" else 1e-8
        return np.where(i <= 50, 1.0, tail)
    raise ValueError(f"unknown spectrum {name!r}; known spectra are {', '.join(SPECTRA)}")


def haar_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-distributed n x n orthogonal matrix (QR of a Gaussian, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def test_matrix(spectrum: str, n: int = 1000, seed: int = 0) -> np.ndarray:
    """Symmetric ``n x n`` matrix with the named spectrum and Haar-random eigenvectors.

    Parameters
    ----------
    spectrum : {"flat", "poly", "slowexp", "fastexp", "smallstep", "bigstep"}
        ``flat``: linspace(1, 3, n); ``poly``: i^-2; ``slowexp``: 0.9^i; ``fastexp``:
        0.7^i; ``smallstep``: 50 ones then 1e-3; ``bigstep``: 50 ones then 1e-8.
    n : int
        Size.
    seed : int
        Seed of the eigenvectors.

    Returns
    -------
    numpy.ndarray
        float64, exactly symmetric; its trace is the sum of the spectrum.

    Examples
    --------
    >>> import numpy as np
    >>> from linop_trace._testing import test_matrix
    >>> A = test_matrix("poly", n=100, seed=1)
    >>> A.shape, bool(np.allclose(A, A.T)), round(float(np.trace(A)), 6)
    ((100, 100), True, 1.634984)
    """
    values = eigenvalues(spectrum, n)
    q = haar_orthogonal(n, np.random.default_rng(seed))
    a = (q * values) @ q.T
    return (a + a.T) / 2


# pytest must not collect the builder as a test when it is imported into a test module.
test_matrix.__test__ = False  # type: ignore[attr-defined]


def poisson_2d_block(k: int, rows: tuple[int, int], columns: tuple[int, int]) -> Any:
    """Rows ``rows[0]:rows[1]`` and columns ``columns[0]:columns[1]`` of the 5-point
    Laplacian on a ``k x k`` grid (Dirichlet boundary; ``n = k**2``, 4 on the diagonal,
    -1 to each grid neighbour), as a SciPy CSR matrix. O(rows) work: a block of a huge
    matrix is built without the rest of it.

    Examples
    --------
    >>> from linop_trace._testing import poisson_2d_block
    >>> poisson_2d_block(3, (0, 9), (0, 9)).toarray()[4].tolist()
    [0.0, -1.0, 0.0, -1.0, 4.0, -1.0, 0.0, -1.0, 0.0]
    """
    import scipy.sparse as sp

    n = k * k
    (r0, r1), (c0, c1) = rows, columns
    # the rows whose stencil can reach the columns c0..c1
    first, stop = max(r0, c0 - k), min(r1, c1 + k)
    i = np.arange(first, max(first, stop))
    pieces = []
    for offset, value, inside in (
        (0, 4.0, np.ones(i.shape, dtype=bool)),
        (-1, -1.0, i % k != 0),
        (1, -1.0, i % k != k - 1),
        (-k, -1.0, i >= k),
        (k, -1.0, i < n - k),
    ):
        j = i + offset
        keep = inside & (j >= c0) & (j < c1)
        pieces.append((i[keep] - r0, j[keep] - c0, np.full(int(keep.sum()), value)))
    r, c, v = (np.concatenate(part) for part in zip(*pieces))
    return sp.csr_matrix((v, (r, c)), shape=(r1 - r0, c1 - c0))


def _poisson_chunk(k: int, block_info: Any = None) -> Any:
    (r0, r1), (c0, c1) = block_info[None]["array-location"]
    return poisson_2d_block(k, (r0, r1), (c0, c1))


def poisson_2d_dask(k: int, chunks: int) -> Any:
    """The 5-point Laplacian on a ``k x k`` grid as a Dask array of SciPy CSR blocks,
    ``chunks`` rows and columns a block: each block is built by a task (on the workers,
    never gathered). Persist it to keep it in the workers' memory."""
    import dask.array as da
    import scipy.sparse as sp

    return da.map_blocks(
        _poisson_chunk,
        k,
        chunks=da.core.normalize_chunks(chunks, (k * k, k * k)),
        dtype=np.float64,
        meta=sp.csr_matrix((0, 0)),
    )
