"""Data-parallel Hessian products on torch.distributed: 2 gloo ranks against 1.

The digits MLP (``digits_mlp_problem``) with a hidden layer of 512 (64 -> 512 -> 10,
37,888 parameters) on all 1,797 digits, float32, one thread per rank; each rank holds
every R-th digit. ``TrackDataParallelHessian.track_seconds`` is the wall time of H @ V
for a block V of 100 Rademacher columns (100 HVPs, the ranks' check that they multiply
the same block, and one ``all_reduce`` of the (37,888, 100) products, 15 MB), measured
inside the ranks after a warm-up product (the slowest rank's median of 5 rounds):
torchrun's start-up and the imports are left out. The width makes the products outweigh
the communication and the per-block overheads, which at BackPACK's width of 20 leave two
ranks no faster than one. Two ranks need two free cores to show their speed-up.

Skipped (``NotImplementedError``) where torch or gloo is missing. Run
``python -m benchmarks.distributed [pairs]`` from ``asv_bench/`` to print, for each pair
of runs (1 rank, then 2), the seconds per block, the speed-up, the seconds of one
``all_reduce`` of a block of products alone, and the load average of the machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

HIDDEN = 512
NUM_COLUMNS = 100
NUM_SAMPLES = 1797
ROUNDS = 5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_ranks(num_ranks: int) -> dict[str, float]:
    """What the ranks measured (the slowest rank's seconds): ``seconds`` per 100-column
    product, ``all_reduce_seconds`` for the sum of such a block alone, ``all_reduce_bytes``."""
    with tempfile.TemporaryDirectory() as output:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={num_ranks}",
            "--nnodes=1",
            "--master-addr=127.0.0.1",
            f"--master-port={_free_port()}",
            str(Path(__file__).resolve()),
            output,
        ]
        subprocess.run(command, env=env, check=True, capture_output=True, timeout=600)
        ranks = [json.loads((Path(output) / f"rank{r}.json").read_text()) for r in range(num_ranks)]
        return {key: max(rank[key] for rank in ranks) for key in ranks[0]}


class TrackDataParallelHessian:
    """Seconds of one 100-HVP block product of the digits Hessian, by number of ranks."""

    params = [1, 2]
    param_names = ["ranks"]
    unit = "seconds"
    timeout = 600

    def setup(self, ranks: int) -> None:
        if importlib.util.find_spec("torch") is None:
            raise NotImplementedError("torch is not installed")
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_gloo_available()):
            raise NotImplementedError("torch.distributed with gloo is not available")

    def track_seconds(self, ranks: int) -> float:
        return _run_ranks(ranks)["seconds"]


def _rank_main(output: Path) -> None:
    """One rank: build the operator on this rank's digits, time the block products, then
    one ``all_reduce`` of a block of products alone."""
    import statistics
    import time

    import torch
    import torch.distributed as dist

    import linop_trace as lt
    from linop_trace.autodiff._examples import digits_mlp_problem

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, ranks = dist.get_rank(), dist.get_world_size()
    model, loss_fn, (X, y) = digits_mlp_problem(NUM_SAMPLES, hidden=HIDDEN)
    H = lt.hessian(model, loss_fn, (X[rank::ranks], y[rank::ranks]), process_group=dist.group.WORLD)
    generator = torch.Generator().manual_seed(0)
    V = torch.randint(0, 2, (H.shape[1], NUM_COLUMNS), generator=generator).float() * 2 - 1
    H @ V  # warm-up: torch.func's first transform, the route timing of mode="auto"

    def median_seconds(run: Callable[[], object]) -> float:
        seconds = []
        for _ in range(ROUNDS):
            dist.barrier()
            start = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - start)
        return statistics.median(seconds)

    products = torch.zeros(H.shape[1], NUM_COLUMNS)
    measured = {
        "seconds": median_seconds(lambda: H @ V),
        "all_reduce_seconds": median_seconds(lambda: dist.all_reduce(products)),
        "all_reduce_bytes": products.numel() * products.element_size(),
    }
    (output / f"rank{rank}.json").write_text(json.dumps(measured))
    dist.destroy_process_group()


def _compare(pairs: int) -> None:
    """``pairs`` runs of 1 rank and then 2, side by side, with the load average."""
    for _ in range(pairs):
        load = os.getloadavg()[0]
        one, two = _run_ranks(1), _run_ranks(2)
        print(
            f"1 rank {one['seconds']:.3f} s, 2 ranks {two['seconds']:.3f} s per "
            f"{NUM_COLUMNS} HVPs: {one['seconds'] / two['seconds']:.2f}x; all_reduce of "
            f"{two['all_reduce_bytes'] / 1e6:.1f} MB alone {two['all_reduce_seconds']:.3f} s; "
            f"load {load:.2f} before, {os.getloadavg()[0]:.2f} after",
            flush=True,
        )


if __name__ == "__main__" and len(sys.argv) == 2 and "LOCAL_RANK" in os.environ:
    _rank_main(Path(sys.argv[1]))
elif __name__ == "__main__":
    _compare(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
