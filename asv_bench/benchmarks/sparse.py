"""Cheap sparse operators: Hutchinson against a hand-written loop, and its memory (issue 17).

With a sparse operator the product is cheap (a few flops per entry of the probe block),
so everything else an estimate does shows: drawing the probes, the column reduction, the
statistics. The yardstick is what a user writes by hand in the same library, blocks of
the same 64 MiB as our default block (``trace``'s ``block_size``; 83 columns at
n = 10^5, 8 at n = 10^6, where one block of all 100 columns would spend its time in page
faults): draw a Rademacher block, one sparse product, the column reduction, then the
mean and the standard error of the samples. The reduction is the fastest one-liner of
each library on one thread: NumPy's ``einsum("ij,ij->j", Z, AZ)`` (4x faster than
``(Z * AZ).sum(0)``), torch's ``linalg.vecdot(Z, AZ, dim=0)`` (torch's ``einsum`` is 3x
slower there).

* ``TrackSparseHutchinson.track_ratio``: ``trace(A, method="hutchinson",
  num_matvecs=100)`` over that loop, interleaved, best of 5 each (target <= 1.0), on the
  1-d Laplacian tridiag(-1, 2, -1) and the 2-d Laplacian (5-point stencil on a square
  grid: 316^2 = 99,856 and 1000^2 = 10^6 unknowns) as SciPy CSR and torch sparse CSR.
  ``TimeSparseHutchinson`` times ours, the loop and the bare products (the same blocks of
  Rademacher columns through ``A @ Z``, drawn once) for history: their ratios to the
  products are the issue's "3.1-4.3x against 2.1-2.8x". (One unblocked product of 100
  columns is no floor at n = 10^6: it spends its time in the page faults of an 800 MB
  result, and the blocked loop beats it.)
* ``MemSparseDiagonalHutchinson``: ``diagonal(L, method="hutchinson", num_matvecs=100)``
  on the 2-d Laplacian at n = 10^6: peak resident memory, time, and (NumPy)
  ``track_traced_peak``, the peak of NumPy's own allocations during the call in units of
  one float64 n-vector (8n bytes). Running sums need O(n + n x block): a few tens of
  such vectors at the default block of 8 columns, where keeping every probe block costs
  hundreds.
"""

from __future__ import annotations

import math
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse as sp

import linop_trace

from ._common import get_backend, interleaved_best, laplacian_1d, pin_threads

NUM_MATVECS = 100
SIZES = [100_000, 1_000_000]
MATRICES = ["laplacian 1-d", "laplacian 2-d"]
BACKENDS = ["scipy", "torch"]
REPEATS = 5  # one estimate takes ~1 s at n = 10^6

#: The memory budget of one probe block, as ``trace``'s default ``block_size``.
BLOCK_BYTES = 64 * 2**20


def laplacian_2d(n: int) -> sp.csr_array:
    """The 2-d Dirichlet Laplacian (5-point stencil) on a square grid of about n points."""
    side = math.isqrt(n)
    T = laplacian_1d(side)
    identity = sp.identity(side, format="csr")
    return sp.csr_array(sp.kron(identity, T) + sp.kron(T, identity))


def _matrix(name: str, n: int) -> sp.csr_array:
    return laplacian_1d(n) if name == "laplacian 1-d" else laplacian_2d(n)


def _backend(name: str) -> Any:
    backend = get_backend("numpy" if name == "scipy" else name, "cpu")
    pin_threads()  # (again: torch may just have been imported)
    return backend


def _block_widths(n: int, num_matvecs: int) -> list[int]:
    """Columns per block: as many float64 columns as fit in BLOCK_BYTES (100 = 83 + 17 at
    n = 10^5, 12 x 8 + 4 at n = 10^6)."""
    block = max(1, min(num_matvecs, BLOCK_BYTES // (8 * n)))
    return [min(block, num_matvecs - start) for start in range(0, num_matvecs, block)]


def hand_written_hutchinson(A: Any, num_matvecs: int, library: str) -> Callable[[], Any]:
    """Hutchinson's trace by hand, as a user writes it: (mean, standard error)."""
    n = A.shape[0]
    widths = _block_widths(n, num_matvecs)
    if library == "scipy":
        rng = np.random.default_rng(0)

        def numpy_loop() -> Any:
            samples = []
            for width in widths:
                Z = rng.integers(0, 2, size=(n, width), dtype=np.int8).astype(np.float64)
                Z *= 2.0
                Z -= 1.0
                samples.append(np.einsum("ij,ij->j", Z, A @ Z))
            values = np.concatenate(samples)
            return values.mean(), values.std(ddof=1) / math.sqrt(num_matvecs)

        return numpy_loop
    import torch

    generator = torch.Generator().manual_seed(0)

    def torch_loop() -> Any:
        samples = []
        for width in widths:
            Z = torch.randint(0, 2, (n, width), generator=generator, dtype=torch.float64)
            Z.mul_(2.0).sub_(1.0)
            samples.append(torch.linalg.vecdot(Z, A @ Z, dim=0))
        values = torch.cat(samples)
        return values.mean(), values.std() / math.sqrt(num_matvecs)

    return torch_loop


class _SparseHutchinson:
    params = (BACKENDS, MATRICES, SIZES)
    param_names = ["backend", "matrix", "n"]
    timeout = 300

    def setup(self, backend_name: str, matrix: str, n: int) -> None:
        pin_threads()
        backend = _backend(backend_name)
        A = backend.sparse(_matrix(matrix, n))
        operator = linop_trace.aslinearoperator(A)
        self.ours = lambda: (
            linop_trace.trace(operator, method="hutchinson", num_matvecs=NUM_MATVECS, seed=0).value
        )
        self.hand = hand_written_hutchinson(A, NUM_MATVECS, backend_name)
        size = A.shape[0]  # (316^2 for the 2-d Laplacian at n = 10^5)
        rng = np.random.default_rng(1)
        blocks = [
            backend.dense(2.0 * rng.integers(0, 2, size=(size, width)) - 1.0)
            for width in _block_widths(size, NUM_MATVECS)
        ]

        def products() -> None:
            for Z in blocks:  # (each image dropped at once, as in the loop)
                A @ Z

        self.product = products
        # (no warm-up call: interleaved_best's calibration call is one, asv's timings
        # take several samples, and a call at n = 10^6 takes seconds)


class TrackSparseHutchinson(_SparseHutchinson):
    """Our Hutchinson trace / the hand-written loop, interleaved, best of 5 each."""

    def track_ratio(self, backend_name: str, matrix: str, n: int) -> float:
        hand, ours = interleaved_best([self.hand, self.ours], repeats=REPEATS)
        return ours / hand

    track_ratio.unit = "our time / hand-written loop time"


class TimeSparseHutchinson(_SparseHutchinson):
    """Ours, the hand-written loop and the bare products, for history."""

    repeat = (1, 3, 5.0)  # a call takes 1-4 s at n = 10^6: not asv's up to 10 in 20 s
    warmup_time = 0.0

    def time_ours(self, backend_name: str, matrix: str, n: int) -> None:
        self.ours()

    def time_hand_written(self, backend_name: str, matrix: str, n: int) -> None:
        self.hand()

    def time_product(self, backend_name: str, matrix: str, n: int) -> None:
        self.product()


class MemSparseDiagonalHutchinson:
    """Diagonal Hutchinson at m = 100 on the 2-d Laplacian, n = 10^6: memory and time."""

    params = [BACKENDS]
    param_names = ["backend"]
    timeout = 300
    repeat = (1, 3, 10.0)
    warmup_time = 0.0
    size = 1_000_000

    def setup(self, backend_name: str) -> None:
        pin_threads()
        backend = _backend(backend_name)
        self.operator = linop_trace.aslinearoperator(backend.sparse(laplacian_2d(self.size)))

    def _diagonal(self) -> Any:
        return linop_trace.diagonal(
            self.operator, method="hutchinson", num_matvecs=NUM_MATVECS, seed=0
        )

    def peakmem_diagonal_hutchinson(self, backend_name: str) -> None:
        self._diagonal()

    def time_diagonal_hutchinson(self, backend_name: str) -> None:
        self._diagonal()


class TrackSparseDiagonalAllocations:
    """NumPy's peak allocation during the diagonal Hutchinson at n = 10^6 (tracemalloc).

    tracemalloc sees NumPy's allocations, not torch's, so this is SciPy CSR only. In units
    of one float64 n-vector (8n bytes); the target O(n + n x block) is a few tens.
    """

    timeout = 300
    size = 1_000_000

    def setup(self) -> None:
        pin_threads()
        self.operator = linop_trace.aslinearoperator(laplacian_2d(self.size))

    def track_traced_peak(self) -> float:
        tracemalloc.start()
        try:
            linop_trace.diagonal(
                self.operator, method="hutchinson", num_matvecs=NUM_MATVECS, seed=0
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        return peak / (8 * self.operator.shape[0])

    track_traced_peak.unit = "float64 n-vectors"
