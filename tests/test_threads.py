"""The one-thread BLAS cap around the library's own small algebra (issue 19).

With more BLAS threads than free cores, the small calls of an estimator (thin QR of the
sketch, k x k triangular solves) each wait for threads the scheduler has not run yet;
the library caps NumPy's and SciPy's BLAS at one thread around them
(:func:`linop_trace._backend.one_blas_thread`), and never around the operator's products.
The counts are read with threadpoolctl inside wrapped SciPy routines and inside the
operator's product, while the test allows the process 2 or 3 threads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from typing import Any

import array_api_compat.numpy as xp_numpy
import numpy as np
import pytest
import scipy.linalg
from threadpoolctl import ThreadpoolController, threadpool_info, threadpool_limits

import linop_trace as lt
from linop_trace import _backend as backend
from linop_trace._testing import test_matrix
from linop_trace.estimators import _linalg

SIZE = 400
NUM_MATVECS = 40  # QR of (400, 14) and (400, 20) blocks: above ONE_THREAD_MIN_WORK


def blas_threads() -> list[int]:
    """The thread count of every BLAS loaded (NumPy's and SciPy's OpenBLAS here)."""
    return sorted({info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"})


@pytest.fixture
def two_threads():
    with threadpool_limits(limits=2, user_api="blas"):
        assert blas_threads() == [2]
        yield


def spied(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, seen: list[list[int]]) -> None:
    """Record the BLAS thread counts each time ``module.name`` is called."""
    original = getattr(module, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(blas_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)


@pytest.mark.parametrize("method", ["xtrace", "hutch++"])
def test_small_algebra_runs_on_one_thread_and_products_do_not(
    method: str, monkeypatch: pytest.MonkeyPatch, two_threads: None
) -> None:
    inside_algebra: list[list[int]] = []
    for name in ("qr", "solve_triangular"):  # thin_qr's QR, the Cholesky QR's and
        spied(monkeypatch, scipy.linalg, name, inside_algebra)  # the downdates' solves
    inside_products: list[list[int]] = []
    matrix = test_matrix("poly", SIZE, seed=0)

    def matmat(block: np.ndarray) -> np.ndarray:
        inside_products.append(blas_threads())
        return matrix @ block

    operator = lt.LinearOperator.from_callable(
        matmat=matmat, shape=matrix.shape, dtype=matrix.dtype, like=matrix
    )
    estimate = lt.trace(operator, method=method, num_matvecs=NUM_MATVECS, seed=0)

    assert inside_algebra and inside_products
    assert inside_algebra == [[1]] * len(inside_algebra)
    assert inside_products == [[2]] * len(inside_products)
    assert blas_threads() == [2]
    exact = lt.trace(matrix, method=method, num_matvecs=NUM_MATVECS, seed=0).value
    assert float(estimate.value) == pytest.approx(float(exact), rel=1e-12)


def test_the_cap_nests_and_restores_the_outer_count() -> None:
    with threadpool_limits(limits=3, user_api="blas"):
        with backend.one_blas_thread(np):
            assert blas_threads() == [1]
            with backend.one_blas_thread(np):
                assert blas_threads() == [1]
            assert blas_threads() == [1]
        assert blas_threads() == [3]


def test_small_work_skips_the_cap(two_threads: None) -> None:
    with backend.one_blas_thread(np, work=backend.ONE_THREAD_MIN_WORK - 1):
        assert blas_threads() == [2]
    with backend.one_blas_thread(np, work=backend.ONE_THREAD_MIN_WORK):
        assert blas_threads() == [1]


def test_python_threads_sharing_the_cap_leave_the_count_as_it_was(two_threads: None) -> None:
    """Four threads in and out of the cap at once: whoever sets the limit restores it;
    one that restored another's limit of one would leave the BLAS there for good."""
    rng = np.random.default_rng(0)
    block = rng.standard_normal((SIZE, 20))
    triangular = np.triu(rng.standard_normal((20, 20))) + 5 * np.eye(20)
    start = threading.Barrier(4)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            start.wait()
            for _ in range(25):
                _linalg.orthonormal_factors(block, xp_numpy)
                _linalg.regularized_inverse_h(
                    triangular, xp_numpy
                )  # the namespace the library passes
        except BaseException as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert blas_threads() == [2]


def test_other_libraries_get_no_cap(backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only NumPy arrays (dense or behind a SciPy sparse matrix) are capped: torch, JAX
    and CuPy run their own thread pools."""
    limits: list[Any] = []
    original = ThreadpoolController.limit

    def counted(self: ThreadpoolController, **kwargs: Any) -> Any:
        limits.append(kwargs)
        return original(self, **kwargs)

    monkeypatch.setattr(ThreadpoolController, "limit", counted)
    matrix = backend.matrix(test_matrix("poly", SIZE, seed=0))
    with threadpool_limits(limits=2, user_api="blas"):
        lt.trace(matrix, method="xtrace", num_matvecs=NUM_MATVECS, seed=0)
    capped = backend.library in ("numpy", "scipy")
    assert bool(limits) == capped
    assert all(kwargs == {"limits": 1, "user_api": "blas"} for kwargs in limits)


def test_nothing_changes_when_the_environment_pins_one_thread() -> None:
    """``OPENBLAS_NUM_THREADS=1``: no limit is set (threadpoolctl's ``limit`` is never
    called), the count stays 1, and the estimate is the one of a capped run."""
    script = textwrap.dedent(
        """
        import json
        import threadpoolctl
        import linop_trace as lt
        from linop_trace._testing import test_matrix

        calls = []
        original = threadpoolctl.ThreadpoolController.limit
        def counted(self, **kwargs):
            calls.append(kwargs)
            return original(self, **kwargs)
        threadpoolctl.ThreadpoolController.limit = counted
        value = lt.trace(test_matrix("poly", 400, seed=0), method="xtrace",
                         num_matvecs=40, seed=0).value
        threads = sorted({i["num_threads"] for i in threadpoolctl.threadpool_info()
                          if i["user_api"] == "blas"})
        print(json.dumps({"calls": len(calls), "threads": threads, "value": float(value)}))
        """
    )
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["calls"] == 0
    assert report["threads"] == [1]
    with threadpool_limits(limits=2, user_api="blas"):
        matrix = test_matrix("poly", SIZE, seed=0)
        value = lt.trace(matrix, method="xtrace", num_matvecs=NUM_MATVECS, seed=0).value
    assert report["value"] == pytest.approx(float(value), rel=1e-12)
