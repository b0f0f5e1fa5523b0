"""Stochastic Lanczos quadrature against its floor: the products it needs (issue 20).

SLQ with m probes and k Lanczos steps makes k products of an (n, m) block. Its floor is
those k products alone: ``A @ Q`` with Q the same (n, m) block, k times. Everything above
that is Lanczos' own work (the three-term recurrence, reorthogonalisation against the
earlier vectors, O(n m k^2)), the tridiagonal eigenproblems and the statistics.

``TrackSlqOverFloor.track_ratio`` times ``logdet(A, num_matvecs=m k, lanczos_steps=k)``
and the k products interleaved in one process, best of 7 each, one thread, and returns
the ratio (target <= 1.2). The operators: a dense SPD matrix at n = 4,000
(``_common.dense_psd``), where the products dominate, and the 2-d Laplacian plus the
identity as a sparse CSR matrix at n = 316^2, where a product costs a few flops per
entry and Lanczos' vector work shows. Each runs without reorthogonalisation (the
default) and with it, on NumPy/SciPy, torch (a ``sparse_csr`` tensor) and JAX (BCOO;
its floor is the jitted product, called k times, each waited for). Where SLQ writes its
products into one reused block (a stored NumPy or torch CPU matrix: ``product_into``), so
do the floor's: a fresh (n, m) result per product is faulted in page by page whenever the
allocator has given the last one back to the system, which made torch's floor anywhere
from 4.5 to 18 ms a product in one process and the next.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

import linop_trace

from ._common import BACKENDS, dense_psd, get_backend, interleaved_best, pin_threads

#: (probes, Lanczos steps).
SIZES = {"dense 4000": (20, 20), "sparse 2-d Laplacian": (20, 30)}


def _operators() -> dict[str, Any]:
    grid = 316
    one_d = sp.diags([-np.ones(grid - 1), 2 * np.ones(grid), -np.ones(grid - 1)], [-1, 0, 1])
    laplacian = sp.kron(one_d, sp.identity(grid)) + sp.kron(sp.identity(grid), one_d)
    return {
        "dense 4000": dense_psd(4000),
        "sparse 2-d Laplacian": (laplacian + sp.identity(grid * grid)).tocsr(),
    }


_operators.timeout = 300  # type: ignore[attr-defined]


def _into_or_fresh(written: Any, A: Any, Z: Any) -> Any:
    return A @ Z if written is None else written


class TrackSlqOverFloor:
    """``logdet`` time / the time of its k products of an (n, m) block, interleaved."""

    params = (list(SIZES), [True, False], BACKENDS)
    param_names = ["operator", "reorthogonalize", "library"]
    timeout = 300
    setup_cache = staticmethod(_operators)

    def setup(
        self, operators: dict[str, Any], name: str, reorthogonalize: bool, library: str
    ) -> None:
        pin_threads()  # first: JAX must see one CPU before it creates its client
        backend = get_backend(library, "cpu")
        pin_threads()  # (again: torch was just imported)
        stored = operators[name]
        A = backend.sparse(stored) if sp.issparse(stored) else backend.dense(stored)
        m, k = SIZES[name]
        n = stored.shape[0]
        block = backend.dense(np.random.default_rng(0).choice([-1.0, 1.0], size=(n, m)))
        product = lambda A, Z: A @ Z  # noqa: E731
        if library == "jax":
            import jax

            product = jax.jit(product)
        else:  # into one reused block where the library can, as SLQ's own products are
            from linop_trace._backend import product_into

            buffer = backend.dense(np.zeros((n, m)))
            product = lambda A, Z: _into_or_fresh(product_into(A, Z, buffer), A, Z)  # noqa: E731

        def floor() -> None:
            for _ in range(k):
                backend.sync(product(A, block))

        def estimate() -> Any:
            return backend.sync(
                linop_trace.logdet(
                    A, num_matvecs=m * k, lanczos_steps=k, seed=0, reorthogonalize=reorthogonalize
                ).value
            )

        self.calls = [floor, estimate]
        floor()
        estimate()

    def track_ratio(
        self, operators: dict[str, Any], name: str, reorthogonalize: bool, library: str
    ) -> float:
        floor, estimate = interleaved_best(self.calls)
        return estimate / floor

    track_ratio.unit = "SLQ time / its products' time"


class TrackLanczosStepBound:
    """The least a Lanczos step can cost over its product, on the sparse operator.

    After its product ``w = A q``, a step needs ``alpha = q^H w``, a sum over all n rows,
    before it can form ``w - alpha q`` (and ``- beta q_prev``, which a kernel could fold
    into the product's own pass); so even a kernel that computed ``alpha`` inside the
    product, and deferred the scaling by 1/beta into the next one, makes one more pass
    over the block after it: it reads ``w`` and ``q`` and writes ``w``, the bytes of one
    and a half copies of the block. ``track_ratio`` returns (product + 1.5 copies) /
    product, the copy and the product (into a reused block, as SLQ's) timed interleaved,
    best of 7, one thread: a lower bound on SLQ over its floor (``TrackSlqOverFloor``)
    for any implementation that keeps its vectors in memory. NumPy and torch on the CPU
    (JAX's floor is its dispatched products; this bound is not its).
    """

    params = (["numpy", "torch"],)
    param_names = ["library"]
    timeout = 300
    setup_cache = staticmethod(_operators)

    def setup(self, operators: dict[str, Any], library: str) -> None:
        pin_threads()
        backend = get_backend(library, "cpu")
        pin_threads()
        from linop_trace._backend import product_into

        stored = operators["sparse 2-d Laplacian"]
        A = backend.sparse(stored)
        m, _ = SIZES["sparse 2-d Laplacian"]
        n = stored.shape[0]
        block = backend.dense(np.random.default_rng(0).choice([-1.0, 1.0], size=(n, m)))
        buffer = backend.dense(np.zeros((n, m)))
        copy = backend.dense(np.zeros((n, m)))

        def product() -> None:
            _into_or_fresh(product_into(A, block, buffer), A, block)

        if library == "torch":

            def copy_block() -> None:
                copy.copy_(block)

        else:

            def copy_block() -> None:
                np.copyto(copy, block)

        self.calls = [product, copy_block]
        product()
        copy_block()

    def track_ratio(self, operators: dict[str, Any], library: str) -> float:
        product, copy = interleaved_best(self.calls)
        return (product + 1.5 * copy) / product

    track_ratio.unit = "(product + one pass of 2 reads and 1 write) / product"
