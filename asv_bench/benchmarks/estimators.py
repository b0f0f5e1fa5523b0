"""Cost of each estimator at a budget of m = 100 matvecs, beside the cost of the matvecs.

Read ``TimeTrace.time_trace`` / ``TimeDiagonal.time_diagonal`` against ``TimeFloor``
(the same 100 columns through the same operator in one ``matmat``) at the same backend,
device and n: the ratio is the estimator's overhead (probe generation, QR factorizations,
reductions) on top of the operator applications it cannot avoid.

The operators: n = 1,000 is a dense float64 positive definite matrix (8 MB). At n = 10,000
a dense float64 matrix would be 800 MB per copy (one per backend in the process) and its
GEMM would drown every method's overhead; a sparse positive definite matrix with about 21
nonzeros per row is what people at that size actually hold, and it makes the overhead
visible. Both are positive definite, so XNysTrace applies.
"""

from __future__ import annotations

from typing import Any

import linop_trace

from ._common import (
    BACKENDS,
    DEVICES,
    DIAGONAL_METHODS,
    NUM_MATVECS,
    TRACE_METHODS,
    dense_psd,
    get_backend,
    pin_threads,
    require_method,
    sparse_psd,
    sync_estimate,
)

SIZES = [1000, 10000]


def _operator(backend_name: str, device: str, n: int) -> tuple[Any, Any]:
    backend = get_backend(backend_name, device)
    matrix = backend.dense(dense_psd(n)) if n <= 1000 else backend.sparse(sparse_psd(n))
    return backend, linop_trace.aslinearoperator(matrix)


class TimeTrace:
    """Wall time of ``trace(A, method, num_matvecs=100)`` per method."""

    params = (BACKENDS, DEVICES, TRACE_METHODS, SIZES)
    param_names = ["backend", "device", "method", "n"]
    timeout = 300

    def setup(self, backend_name: str, device: str, method: str, n: int) -> None:
        pin_threads()
        require_method(method, "trace")
        self.backend, self.operator = _operator(backend_name, device, n)
        self.method = method
        self.time_trace(backend_name, device, method, n)  # warm up (JAX dispatch, caches)

    def time_trace(self, backend_name: str, device: str, method: str, n: int) -> None:
        estimate = linop_trace.trace(
            self.operator, method=self.method, num_matvecs=NUM_MATVECS, seed=0
        )
        sync_estimate(self.backend, estimate)


class TimeDiagonal:
    """Wall time of ``diagonal(A, method, num_matvecs=100)`` per method."""

    params = (BACKENDS, DEVICES, DIAGONAL_METHODS, SIZES)
    param_names = ["backend", "device", "method", "n"]
    timeout = 300

    def setup(self, backend_name: str, device: str, method: str, n: int) -> None:
        pin_threads()
        require_method(method, "diagonal")
        self.backend, self.operator = _operator(backend_name, device, n)
        self.method = method
        self.time_diagonal(backend_name, device, method, n)

    def time_diagonal(self, backend_name: str, device: str, method: str, n: int) -> None:
        estimate = linop_trace.diagonal(
            self.operator, method=self.method, num_matvecs=NUM_MATVECS, seed=0
        )
        sync_estimate(self.backend, estimate)


class TimeFloor:
    """The floor under every estimator above: 100 probe columns through the operator.

    One ``matmat`` of an (n, 100) Rademacher block, i.e. the operator applications an
    estimator with m = 100 cannot avoid. Same operators, backends and devices.
    """

    params = (BACKENDS, DEVICES, SIZES)
    param_names = ["backend", "device", "n"]

    def setup(self, backend_name: str, device: str, n: int) -> None:
        pin_threads()
        self.backend, self.operator = _operator(backend_name, device, n)
        self.block = linop_trace.rademacher(self.operator, NUM_MATVECS, seed=0)
        self.time_floor(backend_name, device, n)

    def time_floor(self, backend_name: str, device: str, n: int) -> None:
        self.backend.sync(self.operator.matmat(self.block))
