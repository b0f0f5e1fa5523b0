"""One rank of the data-parallel tests (tests/test_distributed_torch.py), run by torchrun.

Each rank holds its shard of the first 256 digits and saves what it computed to
``<output directory>/rank<r>.pt``; the test compares the ranks with one process on all
256 samples. Errors the checks expect are caught and saved, so that the run itself
succeeds.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import linop_trace as lt
from linop_trace.autodiff._examples import digits_mlp_problem

NUM_SAMPLES = 256
NUM_MATVECS = 20


def probe_block(num_parameters: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(num_parameters, 5, generator=generator, dtype=torch.float64)


def main(output: Path) -> None:
    # the timeout is a backstop: the failure checks below must end long before it
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    model, loss_fn, (X, y) = digits_mlp_problem(NUM_SAMPLES, dtype=torch.float64)
    share = NUM_SAMPLES // world_size
    shard = (X[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share])
    results: dict = {}

    H = lt.hessian(model, loss_fn, shard, process_group=group)
    V = probe_block(H.shape[1])
    results["hessian_products"] = H @ V
    results["ggn_products"] = lt.ggn(model, loss_fn, shard, process_group=group) @ V
    estimate = lt.trace(H, method="hutchinson", num_matvecs=NUM_MATVECS, seed=0)
    results["trace"] = (estimate.value, estimate.stderr, estimate.num_matvecs)

    # uneven shards in batches of their own: rank r holds a different number of samples
    bounds = [0, 100, NUM_SAMPLES] if world_size == 2 else [0, *range(1, world_size), 256]
    start, stop = bounds[rank], bounds[rank + 1]
    batches = [(X[i : min(i + 32, stop)], y[i : min(i + 32, stop)]) for i in range(start, stop, 32)]
    results["uneven_hessian_products"] = (
        lt.hessian(model, loss_fn, batches, process_group=group) @ V
    )
    # a rank whose shard holds no samples adds nothing (rank 0 holds all 256): a batch of
    # no samples, and no batches at all
    everything = (X, y)
    for name, empty in [("empty_batch", (X[:0], y[:0])), ("no_batches", [])]:
        mine = everything if rank == 0 else empty
        try:
            results[f"{name}_hessian_products"] = (
                lt.hessian(model, loss_fn, mine, process_group=group) @ V
            )
            results[f"{name}_ggn_products"] = lt.ggn(model, loss_fn, mine, process_group=group) @ V
        except Exception as error:
            results[f"{name}_failure"] = (type(error).__name__, str(error))
    summed = torch.nn.CrossEntropyLoss(reduction="sum")
    results["sum_reduced_products"] = lt.hessian(model, summed, shard, process_group=group) @ V

    # a rank whose loss raises: the others get an error naming it, not a hang
    def failing_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if rank == 1:
            raise ValueError("the loss of rank 1 failed on purpose")
        return loss_fn(outputs, targets)

    started = time.perf_counter()
    try:
        lt.hessian(model, failing_loss, shard, process_group=group, mode="loop") @ V
    except Exception as error:
        results["failure"] = (type(error).__name__, str(error))
    results["failure_seconds"] = time.perf_counter() - started

    # ranks that draw other probes (other seeds, other budgets): an error on every rank at
    # the first block, not a sum of products of different probes, nor a hang
    for name, options in [
        ("seed_mismatch", {"num_matvecs": NUM_MATVECS, "seed": rank}),
        ("budget_mismatch", {"num_matvecs": NUM_MATVECS + 5 * rank, "seed": 0}),
        # the first blocks agree (10 columns of one seed); the budgets do not
        ("later_budget_mismatch", {"num_matvecs": 20 + 10 * rank, "seed": 0, "block_size": 10}),
    ]:
        started = time.perf_counter()
        try:
            lt.trace(H, method="hutchinson", **options)
        except Exception as error:
            results[name] = (type(error).__name__, str(error), time.perf_counter() - started)
    results["products_after_mismatch"] = H @ V  # the process group goes on working
    dtype = torch.float32 if rank == 1 else torch.float64  # same parameters, other dtypes
    narrow, _, _ = digits_mlp_problem(NUM_SAMPLES, dtype=dtype)
    try:
        lt.hessian(narrow, loss_fn, (shard[0].to(dtype), shard[1]), process_group=group) @ V
    except Exception as error:
        results["dtype_mismatch"] = (type(error).__name__, str(error))

    # different models on the ranks: an error on every rank when the operator is built
    width = 20 if rank == 0 else 21
    other = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, width, bias=False), torch.nn.Linear(width, 10)
    ).double()
    try:
        lt.hessian(other, loss_fn, shard, process_group=group)
    except Exception as error:
        results["mismatch"] = (type(error).__name__, str(error))

    torch.save(results, output / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
