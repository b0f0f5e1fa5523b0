"""How many columns go through an operator at once: the block sizes.

Below the estimators (and the autodiff constructors), above the operators. A probe block
is sized by the memory the operator's device has free and by what one column of the
operator's product needs there, and on a CPU it is also kept under 64 MiB; the identity
walk of the exact methods keeps a fixed memory budget, so that it never holds n x n
entries unless n is small.
"""

from __future__ import annotations

from typing import Any

from . import _backend as backend

__all__ = [
    "IDENTITY_BLOCK_BYTES",
    "MEMORY_FRACTION",
    "block_size_for",
    "itemsize",
    "probe_block_size",
]

#: Share of the device's free memory that one probe block and its product may take.
MEMORY_FRACTION = 0.25
#: Bytes an (n, block) slice of the identity (and its image) may take in the exact walk.
IDENTITY_BLOCK_BYTES = 64 * 2**20
#: Bytes a probe block may take on a CPU: larger blocks gain nothing there and cost page
#: faults (every fresh (n, block) array is faulted in: torch's Hutchinson on a sparse
#: n = 10^6 Laplacian took 2.5 s in one 100-column block against 1.6 s in blocks of 8).
CPU_BLOCK_BYTES = 64 * 2**20
#: Used when the device does not report its free memory.
FALLBACK_FREE_BYTES = 1 * 2**30


def itemsize(xp: Any, dtype: Any) -> int:
    """Bytes per entry of ``dtype`` (complex: both parts)."""
    size = getattr(dtype, "itemsize", None)  # NumPy, JAX, CuPy and torch dtypes say it
    if isinstance(size, int):
        return size
    try:
        size = int(xp.finfo(dtype).bits // 8)
    except (TypeError, ValueError):  # pragma: no cover - not a floating dtype
        return 8
    return 2 * size if xp.isdtype(dtype, "complex floating") else size


def probe_block_size(operator: Any, limit: int | None = None) -> int:
    """Columns per operator call for probe blocks: as many as fit in ``MEMORY_FRACTION`` of
    the free memory of the operator's device, at the operator's own bytes per column
    (:meth:`~linop_trace.LinearOperator.bytes_per_column`); on a CPU also at most
    ``CPU_BLOCK_BYTES`` per probe block (per row chunk of a Dask matrix's probes, each
    held by one worker); at most ``limit``.

    Examples
    --------
    >>> import numpy as np
    >>> from linop_trace import aslinearoperator
    >>> from linop_trace._blocks import probe_block_size
    >>> probe_block_size(aslinearoperator(np.eye(1000)), limit=100)  # 100 columns fit
    100
    """
    xp, device = operator.xp, operator.device
    # a data-parallel operator's products are collectives: its ranks size their blocks by
    # the free memory they agreed on, so that every rank makes the same products
    free = getattr(operator, "shared_free_memory", None)
    block = block_size_for(xp, device, operator.bytes_per_column(), limit, free=free)
    if not backend.is_accelerator(device):
        # (a Dask matrix's probes are held chunk by chunk: the limit is a chunk's)
        rows = backend.rows_held_together(getattr(operator, "matrix", None), operator.shape[1])
        probe_column = max(1, rows * itemsize(xp, operator.dtype))
        block = max(1, min(block, CPU_BLOCK_BYTES // probe_column))
    return block


def block_size_for(
    xp: Any, device: Any, bytes_per_column: int, limit: int | None = None, free: int | None = None
) -> int:
    """Columns of ``bytes_per_column`` each that fit in ``MEMORY_FRACTION`` of the free
    memory of ``device`` (at least 1, at most ``limit``); ``free`` bytes if given."""
    if free is None:
        free = backend.free_memory(xp, device)
    if free is None:
        free = FALLBACK_FREE_BYTES
    block = max(1, int(MEMORY_FRACTION * free) // max(1, int(bytes_per_column)))
    return block if limit is None else max(1, min(block, int(limit)))
