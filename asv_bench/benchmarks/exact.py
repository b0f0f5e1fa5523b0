"""The exact diagonal by identity blocks: time per block size, and memory O(n * block).

An operator known only by its products (``LinearOperator.from_callable``) gets its exact
diagonal by pushing identity columns through it ``block_size`` at a time and keeping the
diagonal entries of each image: n operator applications, memory for two (n, block) arrays,
never the n x n matrix. A sparse matrix takes the fast path (its stored diagonal).

``peakmem_*`` report the process's peak resident memory (including the imported libraries):
the walk at n = 20,000 stays far below the 3.2 GB a dense 20,000^2 float64 array would take,
and the sparse fast path at n = 200,000 below a single dense 200,000-column block of 100.
``track_walk_traced_peak`` is the peak of NumPy's own allocations during the walk
(tracemalloc), the number that O(n * block) is about.
"""

from __future__ import annotations

import tracemalloc

import linop_trace

from ._common import BACKENDS, DEVICES, get_backend, laplacian_1d, pin_threads

WALK_SIZE = 20_000  # the walk is n matvecs of cost O(n): O(n^2) work, so not 200,000
SPARSE_SIZE = 200_000


def _callable_laplacian(backend_name: str, device: str, n: int):
    backend = get_backend(backend_name, device)
    matrix = backend.sparse(laplacian_1d(n))
    operator = linop_trace.LinearOperator.from_callable(
        matmat=lambda X: matrix @ X, shape=(n, n), like=backend.like()
    )
    return backend, operator


class TimeExactDiagonalBlocks:
    """Exact diagonal of a products-only operator (n = 2,000) by block size.

    ``setup`` runs the walk once, so JAX's per-shape compilation is not timed.
    """

    params = (BACKENDS, DEVICES, [1, 16, 256])
    param_names = ["backend", "device", "block_size"]
    timeout = 300

    def setup(self, backend_name: str, device: str, block_size: int) -> None:
        pin_threads()
        self.backend, self.operator = _callable_laplacian(backend_name, device, 2000)
        self.time_exact_diagonal(backend_name, device, block_size)

    def time_exact_diagonal(self, backend_name: str, device: str, block_size: int) -> None:
        estimate = linop_trace.diagonal(self.operator, method="exact", block_size=block_size)
        self.backend.sync(estimate.value)


class MemExactDiagonalWalk:
    """Peak memory of the identity-block walk at n = 20,000 (default block size)."""

    params = (BACKENDS, ["cpu"])
    param_names = ["backend", "device"]
    timeout = 600

    def setup(self, backend_name: str, device: str) -> None:
        pin_threads()
        self.backend, self.operator = _callable_laplacian(backend_name, device, WALK_SIZE)

    def peakmem_exact_diagonal_walk(self, backend_name: str, device: str) -> None:
        linop_trace.diagonal(self.operator, method="exact")


class TrackExactDiagonalWalkAllocations:
    """NumPy's own peak allocation during the walk at n = 20,000 (tracemalloc).

    tracemalloc sees the allocations NumPy makes (not those of torch or XLA), so this is
    the NumPy backend only: about two (n, block) float64 arrays with the default block.
    """

    timeout = 600

    def setup(self) -> None:
        pin_threads()
        self.backend, self.operator = _callable_laplacian("numpy", "cpu", WALK_SIZE)

    def track_walk_traced_peak(self) -> float:
        tracemalloc.start()
        try:
            linop_trace.diagonal(self.operator, method="exact")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        return peak / 2**20

    track_walk_traced_peak.unit = "MiB"


class MemExactDiagonalSparse:
    """Exact diagonal of a sparse matrix at n = 200,000 (the stored-diagonal fast path)."""

    params = (BACKENDS, ["cpu"])
    param_names = ["backend", "device"]
    timeout = 300

    def setup(self, backend_name: str, device: str) -> None:
        pin_threads()
        backend = get_backend(backend_name, device)
        self.operator = linop_trace.aslinearoperator(backend.sparse(laplacian_1d(SPARSE_SIZE)))

    def peakmem_exact_diagonal_sparse(self, backend_name: str, device: str) -> None:
        linop_trace.diagonal(self.operator, method="exact")

    def time_exact_diagonal_sparse(self, backend_name: str, device: str) -> None:
        linop_trace.diagonal(self.operator, method="exact")
