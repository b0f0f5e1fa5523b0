"""Dask arrays: recognising them, their probes, and computing an estimate once.

A Dask array is a lazy graph: ``A @ Z`` and every statistic of it are recorded, not
run. Two things differ from the eager libraries:

- **Probes by row page.** A probe's entries depend on the seed, the global row and the
  column only, never on the chunks or the workers: rows are cut into pages of
  ``PAGE_ROWS``, and page p's column j comes from a Philox generator keyed by
  ``(seed, p)`` whose counter starts at ``(0, 0, j, 0)`` (a counter-based generator:
  any page of any column, drawn by any worker, without the ones before it). Each chunk
  of the probe block draws the pages it overlaps (``map_blocks``).
- **One compute.** An estimate's value, standard error, finiteness flags and the state
  that :meth:`~linop_trace.Estimate.refine` continues from are computed together in one
  ``dask.compute`` (:func:`compute_together`), so each probe block's product runs once;
  reading them several times would run the graph again each time.

``dask`` is imported only when a Dask array is already in the user's hands.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import array_api_compat
import numpy as np

__all__ = [
    "DASK_REFUSED",
    "PAGE_ROWS",
    "adopts_block",
    "as_dask_block",
    "check_dask_chunks",
    "check_dask_support",
    "refuse_dask",
    "compute_together",
    "computed_graph_hint",
    "dask_column_inner",
    "dask_probe_block",
    "fit_block",
    "in_memory",
    "is_dask_array",
    "is_dask_namespace",
    "mixed_libraries_reason",
    "rows_held_together",
    "substitute",
]

#: Rows per page of the probe generator: a probe's values depend on (seed, page, column).
PAGE_ROWS = 4096

#: Bytes a probe block's row chunk aims at (a whole number of pages): few enough chunks
#: that the graph stays small (each chunk is a task in every step of an estimate), small
#: enough that a worker holds several.
PROBE_CHUNK_BYTES = 64 * 2**20


#: Methods that need linear algebra ``dask.array`` lacks, and what they need.
DASK_REFUSED = {
    "xnystrace": "a symmetric eigendecomposition (linalg.eigh)",
    "na-hutch++": "a singular value decomposition of its core (linalg.svd)",
}


def check_dask_support(xp: Any, method: str, adaptive: bool) -> None:
    """``NotImplementedError`` naming Dask for what its arrays cannot run: the methods of
    :data:`DASK_REFUSED`, and tolerances (each adaptive round would compute the graph of
    every block before it again). A no-op for other libraries."""
    if not is_dask_namespace(xp):
        return
    if method in DASK_REFUSED:
        raise NotImplementedError(
            f"method {method!r} does not run on Dask arrays: it needs "
            f"{DASK_REFUSED[method]}, which dask.array lacks; use 'hutchinson', 'hutch++', "
            "'xtrace', 'diag++', 'xdiag' or 'exact', or compute the array into NumPy"
        )
    if adaptive:
        raise NotImplementedError(
            "rtol/atol (adaptive estimates) are not supported on Dask arrays: every round "
            "would compute the products of all earlier rounds again; give num_matvecs"
        )


def refuse_dask(xp: Any, what: str) -> None:
    """``NotImplementedError`` naming Dask for ``what`` (a function whose linear algebra
    ``dask.array`` lacks: a symmetric eigendecomposition); a no-op for other libraries.
    It was an ``AttributeError`` from inside the function."""
    if is_dask_namespace(xp):
        raise NotImplementedError(
            f"{what} does not run on Dask arrays: it needs a symmetric eigendecomposition "
            "(linalg.eigh), which dask.array lacks; compute the array into NumPy first"
        )


def check_dask_chunks(matrix: Any) -> None:
    """``TypeError`` for a dense Dask array whose chunks are not NumPy arrays (CuPy, ...):
    its products are not supported. A no-op for other arrays. (Sparse chunks are a sparse
    matrix: :mod:`._dask_sparse`.)"""
    if not is_dask_array(matrix):
        return
    chunk_type = type(getattr(matrix, "_meta", None))
    if chunk_type is not np.ndarray:
        raise TypeError(
            "Dask arrays are supported with NumPy chunks or sparse chunks (scipy.sparse, "
            f"pydata sparse); this one has {chunk_type.__module__}.{chunk_type.__name__} "
            "chunks (wrap its product: LinearOperator.from_callable(matmat=..., like=...))"
        )


def is_dask_namespace(xp: Any) -> bool:
    """Whether ``xp`` is Dask's array namespace (array-api-compat's or Dask's own)."""
    if "dask" not in sys.modules:
        return False
    return bool(array_api_compat.is_dask_namespace(xp))


def is_dask_array(x: Any) -> bool:
    """Whether ``x`` is a ``dask.array.Array``."""
    if "dask" not in sys.modules:
        return False
    return bool(array_api_compat.is_dask_array(x))


class _PageGenerator:
    """Draws page p's column j of a stream: NumPy's Philox keyed by ``(key, p)``, its
    counter at ``(0, 0, j, 0)``. One bit generator is reset for every (page, column):
    the values of a fresh ``Philox(key=..., counter=...)``, at a tenth of its cost (that
    constructor also draws OS entropy it does not use)."""

    def __init__(self, kind: str, key: int) -> None:
        self.kind = kind
        self.key = key
        self.bits = np.random.Philox(key=np.array([key, 0], dtype=np.uint64))
        self.generator = np.random.Generator(self.bits)
        self._empty = np.zeros(4, dtype=np.uint64)

    def _reset(self, page: int, column: int) -> None:
        self.bits.state = {
            "bit_generator": "Philox",
            "state": {
                "counter": np.array([0, 0, column, 0], dtype=np.uint64),
                "key": np.array([self.key, page], dtype=np.uint64),
            },
            "buffer": self._empty,
            "buffer_pos": 4,
            "has_uint32": 0,
            "uinteger": 0,
        }

    def columns(self, page: int, first: int, k: int, rows: int) -> np.ndarray:
        """Columns ``first .. first + k`` of page ``page`` (``rows`` long): a ``(k, rows)``
        array, 0/1 bits (uint8) for Rademacher signs, else float64 values."""
        if self.kind == "rademacher":  # one random bit per entry, as NumPy's source draws
            words = np.empty((k, -(-rows // 64)), dtype=np.uint64)
            for j in range(k):
                self._reset(page, first + j)
                words[j] = self.bits.random_raw(words.shape[1])
            return np.unpackbits(words.view(np.uint8), axis=1, count=rows, bitorder="little")
        out = np.empty((k, rows))
        for j in range(k):
            self._reset(page, first + j)
            if self.kind == "normal":
                self.generator.standard_normal(rows, out=out[j])
            else:  # uniform
                self.generator.random(rows, out=out[j])
        return out


def _draw_rows(
    kind: str, key: int, first_column: int, n: int, dtype: Any, rows: tuple[int, int], k: int
) -> np.ndarray:
    """Rows ``rows = (start, stop)`` of columns ``first_column .. + k`` of the stream: the
    pages they overlap, cut to them. Drawn column by column, ``(k, rows)``, and turned
    into the ``(rows, k)`` chunk in one pass (Rademacher signs formed in the bytes)."""
    start, stop = rows
    values = np.empty((k, stop - start), dtype=np.uint8 if kind == "rademacher" else np.float64)
    if k:
        pages = _PageGenerator(kind, key)
        for page in range(start // PAGE_ROWS, -(-stop // PAGE_ROWS)):
            page_start = page * PAGE_ROWS
            page_rows = min(PAGE_ROWS, n - page_start)
            low, high = max(start, page_start), min(stop, page_start + page_rows)
            drawn = pages.columns(page, first_column, k, page_rows)
            values[:, low - start : high - start] = drawn[:, low - page_start : high - page_start]
    if kind == "rademacher":
        signs = values.view(np.int8)  # bits 0/1 -> signs -1/+1
        signs *= 2
        signs -= 1
        values = signs
    return np.ascontiguousarray(values.T, dtype=dtype)


def _probe_chunk(
    template: np.ndarray,
    kind: str,
    key: int,
    first_column: int,
    n: int,
    dtype: Any,
    block_info: dict[Any, Any] | None = None,
) -> np.ndarray:
    """One row chunk of a probe block (``map_blocks`` over an empty ``template`` of its
    shape)."""
    assert block_info is not None
    (start, stop), (col_start, col_stop) = block_info[None]["array-location"]
    return _draw_rows(
        kind, key, first_column + col_start, n, dtype, (start, stop), col_stop - col_start
    )


def _anchored_chunk(anchor: Any, *args: Any) -> np.ndarray:
    """:func:`_draw_rows`, with a block of the matrix as an argument it does not read: the
    scheduler runs the task where that block is held (see :func:`dask_probe_block`)."""
    return _draw_rows(*args)


def dask_probe_block(
    kind: str,
    key: int,
    shape: tuple[int, int],
    first_column: int,
    dtype: Any,
    chunks: Any = None,
    anchor: Any = None,
) -> Any:
    """An ``(n, k)`` Dask probe block: columns ``first_column .. first_column + k`` of the
    stream ``key`` (a 64-bit integer), ``kind`` one of ``"rademacher"``, ``"normal"``,
    ``"uniform"``; real floating ``dtype``. Its values do not depend on how it is chunked.

    Rows are chunked by ``chunks`` (an int or the chunks' sizes), or else like the columns
    of ``anchor`` (the operator's Dask matrix, n columns): chunk j is then drawn where the
    matrix's block of column chunk j and the row chunk that overlaps it most is held (the
    diagonal block of a square matrix chunked alike both ways), so the product's and the
    estimate's tasks find their probes in place instead of fetching them from another
    worker. Otherwise whole pages, about :data:`PROBE_CHUNK_BYTES` a chunk. Columns are
    one chunk.
    """
    import dask.array as da

    n, k = shape
    dtype = np.dtype(dtype)
    if anchor is not None and chunks is None and anchor.ndim == 2 and anchor.shape[1] == n:
        return _anchored_probe_block(kind, key, shape, first_column, dtype, anchor)
    if isinstance(chunks, tuple) and sum(chunks) != n:
        chunks = None
    if chunks is None:
        pages = max(1, PROBE_CHUNK_BYTES // (PAGE_ROWS * max(k, 1) * dtype.itemsize))
        chunks = pages * PAGE_ROWS
    template = da.empty((n, k), chunks=(chunks, max(k, 1)), dtype=dtype)
    return da.map_blocks(
        _probe_chunk,
        template,
        kind,
        key,
        first_column,
        n,
        dtype,
        dtype=dtype,
        meta=np.empty((0, 0), dtype=dtype),
    )


def _anchored_probe_block(
    kind: str, key: int, shape: tuple[int, int], first_column: int, dtype: Any, anchor: Any
) -> Any:
    import dask
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    n, k = shape
    row_edges = np.concatenate([[0], np.cumsum(anchor.chunks[0])]).tolist()
    column_edges = np.concatenate([[0], np.cumsum(anchor.chunks[1])]).tolist()
    name = "probes-" + tokenize(kind, key, shape, first_column, dtype, anchor.name)
    tasks: dict[Any, Any] = {}
    for j in range(len(anchor.chunks[1])):
        start, stop = column_edges[j], column_edges[j + 1]
        overlaps = [
            min(stop, row_edges[i + 1]) - max(start, row_edges[i])
            for i in range(len(anchor.chunks[0]))
        ]
        i = int(np.argmax(overlaps)) if overlaps else 0
        tasks[(name, j, 0)] = (
            _anchored_chunk,
            (anchor.name, i, j),
            kind,
            key,
            first_column,
            n,
            dtype,
            (start, stop),
            k,
        )
    with dask.annotate(priority=-first_column):  # (see dask_probe_block)
        graph = HighLevelGraph.from_collections(name, tasks, dependencies=[anchor])
    meta = np.empty((0, 0), dtype=dtype)
    return da.Array(graph, name, (anchor.chunks[1], (k,)), dtype=dtype, meta=meta)


def rows_held_together(matrix: Any, n: int) -> int:
    """The most rows of an ``(n, k)`` probe block that one array holds: the largest column
    chunk of a Dask ``matrix`` (its probes are chunked so, each chunk on its worker), else
    all ``n``."""
    if is_dask_array(matrix) and matrix.ndim == 2 and matrix.shape[1] == n:
        return int(max(matrix.chunks[1], default=n))
    return n


def _chunk_column_inner(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->j", x, y)[None, :]


def dask_column_inner(x: Any, y: Any) -> Any:
    """``sum_i x[i, j] y[i, j]`` per column of two ``(n, k)`` Dask arrays: NumPy's einsum
    on each row chunk (no ``(n, k)`` temporary), then the chunks' partial sums added."""
    import dask.array as da

    dtype = np.result_type(x.dtype, y.dtype)
    partial = da.blockwise(
        _chunk_column_inner,
        "ij",
        x,
        "ij",
        y,
        "ij",
        dtype=dtype,
        adjust_chunks={"i": 1},
        meta=np.empty((0, 0), dtype=dtype),
    )
    return partial.sum(axis=0)


def compute_together(arrays: list[Any]) -> list[np.ndarray]:
    """The Dask arrays ``arrays`` computed in one ``dask.compute`` (the graphs they share
    run once), as NumPy arrays."""
    import dask

    return [np.asarray(value) for value in dask.compute(*arrays)] if arrays else []


def in_memory(value: np.ndarray) -> Any:
    """A computed value as a Dask array again (one in-memory chunk): what estimates hold."""
    import dask.array as da

    return da.from_array(value, chunks=-1)


def substitute(tree: Any, leaves: Callable[[Any], Any]) -> Any:
    """``tree`` (nested dicts, lists, tuples) with each Dask array ``x`` replaced by
    ``leaves(x)``."""
    if is_dask_array(tree):
        return leaves(tree)
    if isinstance(tree, dict):
        return {key: substitute(value, leaves) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(substitute(value, leaves) for value in tree)
    return tree


def as_dask_block(block: Any, row_chunks: tuple[int, ...] | None) -> Any:
    """An ``(n, k)`` NumPy or Dask ``block`` as a Dask array whose rows are cut by
    ``row_chunks``, the chunks of the matrix they meet in a product (``None``: a Dask
    block as it is, a NumPy one by probe page like :func:`dask_probe_block`). Columns
    keep their chunks (a NumPy block: one). Lazy: nothing is computed.

    A Dask block cut otherwise is rechunked here, on purpose: ``matmul`` would cut both
    operands to the common refinement of their chunks, splitting the ``(m, n)`` matrix's
    chunks where rechunking the ``(n, k)`` block is enough.
    """
    import dask.array as da

    if is_dask_array(block):
        if row_chunks is None or tuple(block.chunks[0]) == tuple(row_chunks):
            return block
        return block.rechunk({0: row_chunks})
    # a copy: the graph reads the block when it runs, later; the caller's array may have
    # changed by then (an (n, k) block, the size of the product's image)
    snapshot = np.array(block, copy=True)
    return da.from_array(snapshot, chunks=(PAGE_ROWS if row_chunks is None else row_chunks, -1))


def adopts_block(operator_xp: Any, block_xp: Any) -> bool:
    """Whether an operator of ``operator_xp`` takes a block of the other library
    ``block_xp`` (wrapping it, :func:`fit_block`): a Dask operator takes NumPy blocks."""
    return is_dask_namespace(operator_xp) and bool(array_api_compat.is_numpy_namespace(block_xp))


def mixed_libraries_reason(block: Any, operator_xp: Any, operator_library: str) -> str:
    """Why a block of another library is refused, with what to do: a Dask block is never
    computed into memory behind the user's back."""
    if not is_dask_array(block):
        return "arrays of two libraries are mixed"
    remedy = (
        "or make the operator from a Dask array (dask.array.from_array(matrix, chunks=...))"
        if array_api_compat.is_numpy_namespace(operator_xp)
        else f"and convert it to {operator_library}"
    )
    return (
        "a Dask block is never computed into memory behind your back: compute it first "
        f"(X.compute()) {remedy}"
    )


def fit_block(operator_xp: Any, block: Any, matrix: Any, adjoint: bool) -> Any:
    """A block for an operator of ``operator_xp`` whose stored matrix (if any) is
    ``matrix``: for Dask, a Dask array whose rows are cut like the matrix's chunks they
    meet (its columns', or its rows' for the ``adjoint`` product;
    :func:`as_dask_block`); other libraries' blocks as they are."""
    if not is_dask_namespace(operator_xp):
        return block
    chunks = None
    if is_dask_array(matrix):
        chunks = tuple(matrix.chunks[0] if adjoint else matrix.chunks[1])
    return as_dask_block(block, chunks)


def computed_graph_hint(operator_xp: Any, out: Any) -> str:
    """For an operator's function that returned NumPy where Dask was due: it computed
    the graph (empty otherwise)."""
    if is_dask_namespace(operator_xp) and isinstance(out, np.ndarray):
        return (
            "; the function computed the Dask graph (np.asarray, .compute() or a NumPy "
            "function on its block): build the product with dask.array instead, so that "
            "the estimate stays one lazy graph"
        )
    return ""
