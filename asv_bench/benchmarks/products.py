"""Batched probes: one ``matmat`` of k columns against k ``matvec`` calls.

The package sends probes through the operator as (n, k) blocks. These benchmarks show what
that buys per backend and device: ``time_matmat`` vs ``time_matvec_loop`` on the same 100
columns, and the same at the level of a user call, Hutchinson with ``block_size=100``
(one operator call) vs ``block_size=1`` (100 calls).
"""

from __future__ import annotations

import linop_trace

from ._common import BACKENDS, DEVICES, NUM_MATVECS, pin_threads
from .estimators import _operator

SIZES = [1000, 10000]


class TimeBatching:
    """100 probe columns through the operator: batched vs one at a time."""

    params = (BACKENDS, DEVICES, SIZES)
    param_names = ["backend", "device", "n"]
    timeout = 300

    def setup(self, backend_name: str, device: str, n: int) -> None:
        pin_threads()
        self.backend, self.operator = _operator(backend_name, device, n)
        self.block = linop_trace.rademacher(self.operator, NUM_MATVECS, seed=0)
        self.columns = [self.block[:, j] for j in range(NUM_MATVECS)]
        # warm up every path once (JAX compiles per shape; caches fill)
        self.time_matmat(backend_name, device, n)
        self.time_matvec_loop(backend_name, device, n)
        self.time_hutchinson_block_100(backend_name, device, n)
        self.time_hutchinson_block_1(backend_name, device, n)

    def time_matmat(self, backend_name: str, device: str, n: int) -> None:
        self.backend.sync(self.operator.matmat(self.block))

    def time_matvec_loop(self, backend_name: str, device: str, n: int) -> None:
        for column in self.columns:
            out = self.operator.matvec(column)
        self.backend.sync(out)

    def time_hutchinson_block_100(self, backend_name: str, device: str, n: int) -> None:
        estimate = linop_trace.trace(
            self.operator, method="hutchinson", num_matvecs=NUM_MATVECS, seed=0, block_size=100
        )
        self.backend.sync(estimate.value)

    def time_hutchinson_block_1(self, backend_name: str, device: str, n: int) -> None:
        estimate = linop_trace.trace(
            self.operator, method="hutchinson", num_matvecs=NUM_MATVECS, seed=0, block_size=1
        )
        self.backend.sync(estimate.value)
