"""The overhead table of ``asv_bench/benchmarks/overhead.py``, before and after a change,
side by side in one process.

Each cell is an estimator's time over its floor (its own operator calls replayed: the same
number of calls with the same widths), both timed interleaved (floor, before, after,
floor, ...) and the best of ``--repeats`` each, one thread, JAX pinned to one CPU. The
earlier version is a copy of the package importable as ``linop_trace_before`` from the
folder given with ``--before`` (e.g. ``git worktree add /tmp/old <commit>`` and
``cp -r /tmp/old/linop_trace /tmp/before/linop_trace_before``).

    python tools/overhead_before_after.py --before /tmp/before [--backends numpy,torch,jax]
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "asv_bench"))

from benchmarks._common import get_backend, pin_threads  # noqa: E402
from benchmarks.overhead import CASES, SIZE, _call_pattern, _matrix  # noqa: E402

NUM_MATVECS = 100


def estimator(package: Any, method: str, options: dict[str, Any]) -> Any:
    if not options:
        return method
    classes = {
        "xtrace": "XTrace",
        "xnystrace": "XNysTrace",
        "xdiag": "XDiag",
        "diag++": "DiagPlusPlus",
    }
    return getattr(package.estimators, classes[method])(**options)


def _interleaved(
    backend: Any,
    quantity: str,
    ops: dict[str, Any],
    methods: dict[str, Any],
    before: Any,
    after: Any,
    blocks: list[tuple[str, Any]],
    args: argparse.Namespace,
) -> dict[str, list[float]]:
    """Times of the floor, the earlier and the current estimate, interleaved."""

    def floor() -> None:
        for kind, block in blocks:
            backend.sync(getattr(ops["after"], kind)(block))

    def run(label: str) -> None:
        package = after if label == "after" else before
        estimate = getattr(package, quantity)(
            ops[label], method=methods[label], num_matvecs=NUM_MATVECS, seed=0
        )
        backend.sync(estimate.value)

    times: dict[str, list[float]] = {"floor": [], "before": [], "after": []}
    calls = {"floor": floor, "before": lambda: run("before"), "after": lambda: run("after")}
    for function in calls.values():  # warm up (JAX compiles)
        function()
    for _ in range(args.repeats):
        for label, function in calls.items():
            start = time.perf_counter()
            function()
            times[label].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True)
    parser.add_argument("--backends", default="numpy,torch,jax")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cases", default="")
    args = parser.parse_args()
    sys.path.insert(0, args.before)
    pin_threads()
    after = importlib.import_module("linop_trace")
    before = importlib.import_module("linop_trace_before")
    cases = [c for c in CASES if not args.cases or c in args.cases.split(",")]
    print(f"{'case':30s} {'backend':8s} {'before':>7s} {'after':>7s}", flush=True)
    for backend_name in args.backends.split(","):
        backend = get_backend(backend_name, "cpu")
        dense = backend.dense(_matrix(SIZE))
        for case in cases:
            quantity, method, tags, options = CASES[case]
            ops = {
                "before": before.aslinearoperator(dense, tags=tags),
                "after": after.aslinearoperator(dense, tags=tags),
            }
            methods = {
                "before": estimator(before, method, options),
                "after": estimator(after, method, options),
            }
            pattern = _call_pattern(ops["after"], quantity, methods["after"])
            blocks = [
                (kind, after.rademacher(ops["after"], width, seed=1)) for kind, width in pattern
            ]

            times = _interleaved(backend, quantity, ops, methods, before, after, blocks, args)
            base = min(times["floor"])
            print(
                f"{case:30s} {backend_name:8s} {min(times['before']) / base:7.3f} "
                f"{min(times['after']) / base:7.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
