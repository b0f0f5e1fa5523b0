"""Dask arrays with sparse chunks (scipy.sparse, or pydata ``sparse`` converted to CSR).

A chunked sparse matrix is a grid of blocks, most of them empty for the matrices people
chunk (a banded or mesh matrix chunked by rows and columns: a row block meets a few
column blocks). Dask's own ``A @ Z`` pairs every block with the probe rows it could
touch, empty or not; here a product meets only the blocks that hold entries:

- **The block spans** (the columns and rows each block's entries use; empty blocks use
  none) are computed once per matrix, in one small ``compute`` of four numbers a block,
  kept by the array's name (:func:`block_spans`). Persist the matrix first: the count
  then reads the blocks where they are held.
- **A product** ``A @ Z`` is one task per row block (and column chunk of ``Z``): it adds up
  ``A[i, j] @ Z[j]`` over the blocks j of row i that hold entries. ``Z``'s rows are
  rechunked to ``A``'s column chunks, explicitly (a graph step; nothing is computed).
  A block whose entries use few of its columns (a band's corner) gets only those rows
  of ``Z[j]``, sliced by a task of their own where ``Z[j]`` is held: a worker receives
  the probe rows its blocks reach, not whole chunks.
- **The diagonal** comes from the blocks that cross it, each block's own stored
  diagonal: no product with the identity.

The spans hold each block's rows too: a cast matrix keeps them, an adjoint swaps them.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from typing import Any

import numpy as np

__all__ = [
    "dask_sparse_adjoint",
    "dask_sparse_astype",
    "dask_sparse_diagonal",
    "dask_sparse_matmat",
    "dask_sparse_to_dense",
    "is_dask_sparse",
    "nonzero_blocks",
    "prepare_dask_sparse",
]

#: Block patterns kept, by the Dask array's name (one bool per block: small).
_PATTERNS: OrderedDict[str, np.ndarray] = OrderedDict()
_MAX_PATTERNS = 64


def _is_sparse_block(block: Any) -> bool:
    """Whether a chunk (or a chunk's ``_meta``) is a scipy.sparse or pydata sparse matrix."""
    if "scipy.sparse" in sys.modules:
        import scipy.sparse

        if scipy.sparse.issparse(block):
            return True
    return type(block).__module__.split(".")[0] == "sparse" and hasattr(block, "tocsr")


def is_dask_sparse(x: Any) -> bool:
    """Whether ``x`` is a 2-d Dask array whose chunks are sparse matrices."""
    if "dask" not in sys.modules:
        return False
    import dask.array as da

    return isinstance(x, da.Array) and x.ndim == 2 and _is_sparse_block(x._meta)


def _csr(block: Any) -> Any:
    import scipy.sparse

    csr = block.tocsr()
    return csr if scipy.sparse.issparse(csr) else scipy.sparse.csr_matrix(csr)


def _csr_meta(dtype: Any) -> Any:
    import scipy.sparse

    return scipy.sparse.csr_matrix((0, 0), dtype=dtype)


def _remember(name: str, pattern: np.ndarray) -> np.ndarray:
    _PATTERNS[name] = pattern
    _PATTERNS.move_to_end(name)
    while len(_PATTERNS) > _MAX_PATTERNS:
        _PATTERNS.popitem(last=False)
    return pattern


def _derived(matrix: Any, result: Any, adjoint: bool = False) -> Any:
    """``result`` (``matrix``'s blocks mapped value by value, or its adjoint: blocks and
    their rows and columns swapped) inherits its block spans."""
    spans = _PATTERNS.get(matrix.name)
    if spans is not None:
        if adjoint:
            spans = spans.transpose(1, 0, 2)[..., [2, 3, 0, 1]]
        _remember(result.name, spans)
    return result


def prepare_dask_sparse(matrix: Any) -> Any:
    """The matrix with CSR chunks (fast products), its block pattern counted once."""
    csr = matrix.map_blocks(_csr, dtype=matrix.dtype, meta=_csr_meta(matrix.dtype))
    nonzero_blocks(csr)
    return csr


def _span(block: Any) -> np.ndarray:
    """``[[first column, last + 1, first row, last + 1]]`` of a CSR block's entries (all
    zero for an empty block)."""
    if block.nnz == 0:
        return np.zeros((1, 4), dtype=np.int64)
    filled = np.flatnonzero(np.diff(block.indptr))
    return np.array(
        [[block.indices.min(), block.indices.max() + 1, filled[0], filled[-1] + 1]],
        dtype=np.int64,
    )


def block_spans(matrix: Any) -> np.ndarray:
    """A ``(row blocks, column blocks, 4)`` array: the columns ``[first, last + 1)`` and
    the rows each block's entries use, within the block (``[0, 0)``: an empty block)."""
    spans = _PATTERNS.get(matrix.name)
    if spans is not None:
        return spans
    rows, cols = matrix.numblocks
    found = matrix.map_blocks(
        _span,
        chunks=((1,) * rows, (4,) * cols),
        dtype=np.int64,
        meta=np.empty((0, 0), dtype=np.int64),
    ).compute()
    return _remember(matrix.name, np.asarray(found).reshape(rows, cols, 4))


def nonzero_blocks(matrix: Any) -> np.ndarray:
    """A ``(row blocks, column blocks)`` bool array: which blocks store entries."""
    spans = block_spans(matrix)
    return spans[..., 1] > spans[..., 0]


#: A block whose entries use at most this fraction of its columns (a band's corner)
#: multiplies only those rows of the probes, fetched alone from the worker holding them.
HALO_FRACTION = 0.5


def _rows(block: np.ndarray, first: int, stop: int) -> np.ndarray:
    """Rows ``first .. stop`` of a probe chunk, as their own (small) array."""
    return np.ascontiguousarray(block[first:stop])


def _row_block_product(
    blocks: list[Any], probes: list[Any], spans: list[Any], shape: tuple[int, int], dtype: Any
) -> np.ndarray:
    """``sum_j blocks[j] @ probes[j]`` for one row block, added up in one output.

    ``spans[j]`` is None where ``probes[j]`` is the whole probe chunk, else ``(first,
    stop)``: ``probes[j]`` holds only those rows, the columns the block's entries use. A
    block whose entries sit in a few of its rows adds to those rows only."""
    out = None
    parts = []
    for block, probe, span in zip(blocks, probes, spans):
        if span is not None:
            block = block[:, span[0] : span[1]]
        filled = np.flatnonzero(np.diff(block.indptr))
        if filled.size == block.shape[0] and out is None:  # the first full block: no zeros
            out = np.asarray(block @ probe, dtype=dtype)
        elif filled.size:
            parts.append((filled, block, probe))
    if out is None:
        out = np.zeros(shape, dtype=dtype)
    for filled, block, probe in parts:
        if filled.size == block.shape[0]:
            out += block @ probe
        else:
            out[filled] += block[filled] @ probe
    return out


def dask_sparse_matmat(matrix: Any, block: Any) -> Any:
    """``matrix @ block``: one task per row block of ``matrix`` and column chunk of
    ``block``, over the blocks that hold entries (see the module's docstring). A block
    that uses few of its columns gets only those rows of ``block``, sliced where they
    are held."""
    from dask.base import tokenize

    spans = block_spans(matrix)
    block = block.rechunk((matrix.chunks[1], block.chunks[1]))
    dtype = np.result_type(matrix.dtype, block.dtype)
    name = "sparse-blocks-matmat-" + tokenize(matrix, block)
    halo = "sparse-blocks-halo-" + tokenize(matrix, block)
    tasks: dict[Any, Any] = {}
    for i, height in enumerate(matrix.chunks[0]):
        for c, width in enumerate(block.chunks[1]):
            blocks: list[Any] = []
            probes: list[Any] = []
            used: list[Any] = []
            for j, columns in enumerate(matrix.chunks[1]):
                first, stop = (int(v) for v in spans[i, j, :2])
                if stop <= first:
                    continue
                blocks.append((matrix.name, i, j))
                if stop - first <= HALO_FRACTION * columns:
                    tasks[(halo, i, j, c)] = (_rows, (block.name, j, c), first, stop)
                    probes.append((halo, i, j, c))
                    used.append((first, stop))
                else:
                    probes.append((block.name, j, c))
                    used.append(None)
            tasks[(name, i, c)] = (_row_block_product, blocks, probes, used, (height, width), dtype)
    return _array(name, tasks, [matrix, block], (matrix.chunks[0], block.chunks[1]), dtype)


def _array(name: str, tasks: dict[Any, Any], inputs: list[Any], chunks: Any, dtype: Any) -> Any:
    """A Dask array of ``tasks`` (one per chunk, keyed ``(name, *index)``, and helpers),
    a graph layer that declares ``inputs`` as its dependencies (so Dask's optimizations
    keep their chunks as they are: each is computed once, however many tasks read it)."""
    import dask.array as da
    from dask.highlevelgraph import HighLevelGraph

    graph = HighLevelGraph.from_collections(name, tasks, dependencies=inputs)
    meta = np.empty((0,) * len(chunks), dtype=dtype)
    return da.Array(graph, name, chunks, dtype=dtype, meta=meta)


def _diagonal_part(blocks: list[Any], offsets: list[int], rows: int, dtype: Any) -> np.ndarray:
    """The diagonal entries of one row block: ``blocks`` are its blocks that cross the
    diagonal, ``offsets`` each one's (first row - first column)."""
    out = np.zeros(rows, dtype=dtype)
    for block, offset in zip(blocks, offsets):
        values = np.asarray(block.diagonal(k=offset))  # block[r, r + offset]
        start = max(0, -offset)
        out[start : start + values.shape[0]] = values
    return out


def dask_sparse_diagonal(matrix: Any) -> Any:
    """The main diagonal (length ``min(shape)``) from the blocks that cross it."""
    from dask.base import tokenize

    row_starts = np.concatenate([[0], np.cumsum(matrix.chunks[0])]).tolist()
    col_starts = np.concatenate([[0], np.cumsum(matrix.chunks[1])]).tolist()
    name = "sparse-blocks-diagonal-" + tokenize(matrix)
    tasks: dict[Any, Any] = {}
    for i in range(len(matrix.chunks[0])):
        r0, r1 = row_starts[i], row_starts[i + 1]
        crossing = [
            j for j in range(len(matrix.chunks[1])) if col_starts[j] < r1 and r0 < col_starts[j + 1]
        ]
        tasks[(name, i)] = (
            _diagonal_part,
            [(matrix.name, i, j) for j in crossing],
            [r0 - col_starts[j] for j in crossing],
            r1 - r0,
            matrix.dtype,
        )
    diagonal = _array(name, tasks, [matrix], (matrix.chunks[0],), matrix.dtype)
    return diagonal[: min(matrix.shape)]


def dask_sparse_astype(matrix: Any, dtype: Any) -> Any:
    """The matrix with its values cast to ``dtype`` (the same block pattern)."""
    if matrix.dtype == dtype:
        return matrix
    cast = matrix.map_blocks(lambda b: b.astype(dtype), dtype=dtype, meta=_csr_meta(dtype))
    return _derived(matrix, cast)


def _conjugate_block(block: Any) -> Any:
    return block.conj().tocsr()


def dask_sparse_adjoint(matrix: Any) -> Any:
    """The conjugate transpose, CSR chunks, the block spans swapped."""
    block_spans(matrix)
    # Dask's transpose transposes each block too (to CSC): conjugate them, back to CSR
    adjoint = matrix.T.map_blocks(
        _conjugate_block, dtype=matrix.dtype, meta=_csr_meta(matrix.dtype)
    )
    return _derived(matrix, adjoint, adjoint=True)


def dask_sparse_to_dense(matrix: Any) -> Any:
    """A Dask array of NumPy chunks holding the matrix (a graph; nothing computed)."""
    return matrix.map_blocks(
        lambda b: b.toarray(), dtype=matrix.dtype, meta=np.empty((0, 0), matrix.dtype)
    )
