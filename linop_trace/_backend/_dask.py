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
    "check_dask_chunks",
    "check_dask_support",
    "compute_together",
    "dask_probe_block",
    "in_memory",
    "is_dask_array",
    "is_dask_namespace",
]

#: Rows per page of the probe generator: a probe's values depend on (seed, page, column).
PAGE_ROWS = 4096


#: Methods that need linear algebra ``dask.array`` lacks, and what they need.
DASK_REFUSED = {
    "xnystrace": "a symmetric eigendecomposition (linalg.eigh)",
    "na-hutch++": "a pseudo-inverse (linalg.pinv)",
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


def check_dask_chunks(matrix: Any) -> None:
    """``TypeError`` for a Dask array whose chunks are not NumPy arrays (scipy.sparse,
    CuPy): its products are not supported yet. A no-op for other arrays."""
    if not is_dask_array(matrix):
        return
    chunk_type = type(getattr(matrix, "_meta", None))
    if chunk_type is not np.ndarray:
        raise TypeError(
            "Dask arrays are supported with NumPy chunks only; this one has "
            f"{chunk_type.__module__}.{chunk_type.__name__} chunks (for scipy.sparse "
            "chunks, wrap the product: LinearOperator.from_callable(matmat=..., like=...))"
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


def _page_column(kind: str, key: int, page: int, column: int, rows: int) -> np.ndarray:
    """Column ``column`` of page ``page``: ``rows`` (the page's length) float64 values."""
    bits = np.random.Philox(
        key=np.array([key, page], dtype=np.uint64),
        counter=np.array([0, 0, column, 0], dtype=np.uint64),
    )
    generator = np.random.Generator(bits)
    if kind == "rademacher":  # one random bit per entry, as the NumPy source draws them
        words = generator.integers(0, 2**64, size=-(-rows // 64), dtype=np.uint64)
        unpacked = np.unpackbits(words.view(np.uint8), count=rows, bitorder="little")
        return 2.0 * unpacked - 1.0
    if kind == "normal":
        return generator.standard_normal(rows)
    return generator.random(rows)  # uniform


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
    shape): the pages it overlaps, cut to its rows."""
    assert block_info is not None
    (start, stop), (col_start, col_stop) = block_info[None]["array-location"]
    out = np.empty((stop - start, col_stop - col_start), dtype=dtype)
    for page in range(start // PAGE_ROWS, -(-stop // PAGE_ROWS)):
        page_start = page * PAGE_ROWS
        page_rows = min(PAGE_ROWS, n - page_start)
        low, high = max(start, page_start), min(stop, page_start + page_rows)
        for column in range(col_start, col_stop):
            values = _page_column(kind, key, page, first_column + column, page_rows)
            out[low - start : high - start, column - col_start] = values[
                low - page_start : high - page_start
            ]
    return out


def dask_probe_block(
    kind: str,
    key: int,
    shape: tuple[int, int],
    first_column: int,
    dtype: Any,
    chunks: Any = None,
) -> Any:
    """An ``(n, k)`` Dask probe block: columns ``first_column .. first_column + k`` of the
    stream ``key`` (a 64-bit integer), ``kind`` one of ``"rademacher"``, ``"normal"``,
    ``"uniform"``; real floating ``dtype``. Rows are chunked by ``chunks`` (default: by
    page), columns in one chunk. Its values do not depend on ``chunks``."""
    import dask.array as da

    n, k = shape
    row_chunks = PAGE_ROWS if chunks is None else chunks
    dtype = np.dtype(dtype)
    template = da.empty((n, k), chunks=(row_chunks, max(k, 1)), dtype=dtype)
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
