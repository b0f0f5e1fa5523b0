"""Count the host reads (device synchronizations on a GPU) and the tensor operations (kernel
launches on a GPU) of one fixed-budget estimate.

A torch function mode counts every read of a tensor's value on the host (``item``,
``float``, ``int``, ``bool``, ``tolist``, ``cpu``, ``numpy``) while ``trace``/``diagonal``
runs on a torch operator on the CPU; on a CUDA device each of them makes the host wait
for the device. It also counts every other torch function and tensor method called
(except reads of metadata: shape, dtype, device, ...): on a GPU each is a kernel launch
or a view, and with a small budget their fixed cost (microseconds each) is what an
estimate pays above its products. ``--compare PATH`` also counts an earlier copy of the package importable
from PATH as ``linop_trace_before`` (e.g. ``git worktree add`` of an older commit with its
``linop_trace`` folder copied to that name), side by side.

    python tools/count_host_reads.py [--compare /path/to/folder]
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections import Counter
from typing import Any

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

READS = ("item", "__float__", "__int__", "__bool__", "__index__", "tolist", "cpu", "numpy")
CASES = [
    ("trace", "hutchinson", ()),
    ("trace", "hutch++", ()),
    ("trace", "na-hutch++", ()),
    ("trace", "xtrace", ()),
    ("trace", "xnystrace", ("symmetric", "positive_semidefinite")),
    ("trace", "auto", ()),
    ("diagonal", "hutchinson", ()),
    ("diagonal", "diag++", ()),
    ("diagonal", "xdiag", ()),
    ("diagonal", "xdiag", ("symmetric",)),
]


#: Tensor methods that read metadata only (no kernel, no view).
METADATA = {
    "__get__",
    "size",
    "dim",
    "stride",
    "numel",
    "element_size",
    "data_ptr",
    "is_contiguous",
    "is_complex",
    "is_floating_point",
    "__len__",
    "__hash__",
}


class CountReads(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.operations = 0
        self.forbidden = {getattr(torch.Tensor, name): name for name in READS}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = self.forbidden.get(func)
        if name is not None:
            self.counts[name] += 1
        elif getattr(func, "__name__", "") not in METADATA:
            self.operations += 1
        return func(*args, **(kwargs or {}))


def count(package: Any, quantity: str, method: str, tags: tuple[str, ...]) -> tuple[int, int]:
    """``(host reads, tensor operations)`` of one estimate (after one warm-up call)."""
    rng = np.random.default_rng(0)
    U, _ = np.linalg.qr(rng.standard_normal((400, 400)))
    A = torch.from_numpy((U * 0.8 ** np.arange(400)) @ U.T)
    operator = package.LinearOperator.from_callable(
        matmat=lambda X: A @ X, rmatmat=lambda X: A.T @ X, shape=A.shape, like=A, tags=tags
    )
    function = getattr(package, quantity)
    function(operator, method=method, num_matvecs=100, seed=0)
    with CountReads() as mode:
        function(operator, method=method, num_matvecs=100, seed=0)
    return sum(mode.counts.values()), mode.operations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", help="folder holding linop_trace_before")
    args = parser.parse_args()
    packages = [("now", importlib.import_module("linop_trace"))]
    if args.compare:
        sys.path.insert(0, args.compare)
        packages.insert(0, ("before", importlib.import_module("linop_trace_before")))
    header = "".join(f"{'reads ' + label:>14s}{'ops ' + label:>12s}" for label, _ in packages)
    print(f"{'estimate':52s}{header}")
    for quantity, method, tags in CASES:
        label = f"{quantity} {method}" + (f" ({', '.join(tags)})" if tags else "")
        cells = [count(package, quantity, method, tags) for _, package in packages]
        print(f"{label:52s}" + "".join(f"{reads:14d}{ops:12d}" for reads, ops in cells))


if __name__ == "__main__":
    main()
