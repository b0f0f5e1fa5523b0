"""Data-parallel Hessians and GGNs on torch.distributed: two gloo ranks on the CPU.

One ``torchrun --nproc-per-node=2`` run of tests/distributed_torch_worker.py (the digits
MLP, 256 samples split 128/128) serves every test: the ranks' products and estimates
against one process on all 256 samples, in float64 (the two sum the same terms in a
different order: agreement to a few ulps, RTOL), the ranks' estimates against each
other (bitwise: both read the same all-reduced products), and the errors when a rank's
loss raises or the ranks hold different models.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import linop_trace as lt  # noqa: E402
from linop_trace.autodiff._examples import digits_mlp_problem  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend",
)

WORKER = Path(__file__).with_name("distributed_torch_worker.py")
NUM_RANKS = 2
#: Seconds the whole torchrun run may take (about 10 s on one core, mostly imports).
RUN_TIMEOUT = 120
RTOL = 1e-10


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each rank of one torchrun run saved, by rank."""
    output = tmp_path_factory.mktemp("distributed")
    root = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={NUM_RANKS}",
        "--nnodes=1",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        str(WORKER),
        str(output),
    ]
    try:
        run = subprocess.run(
            command, env=env, cwd=root, capture_output=True, text=True, timeout=RUN_TIMEOUT
        )
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"torchrun did not finish in {RUN_TIMEOUT} s (a hang?): {expired.stderr}")
    assert run.returncode == 0, f"torchrun failed:\n{run.stdout}\n{run.stderr}"
    return [torch.load(output / f"rank{r}.pt", weights_only=False) for r in range(NUM_RANKS)]


@pytest.fixture(scope="module")
def digits():
    return digits_mlp_problem(256, dtype=torch.float64)


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert tuple(actual.shape) == tuple(expected.shape)
    error = float((actual - expected).abs().max())
    scale = float(expected.abs().max())
    assert error <= RTOL * scale, f"max error {error:.3e} vs scale {scale:.3e}"


def probe_block(num_parameters: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)  # as in the worker
    return torch.randn(num_parameters, 5, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("name", ["hessian", "ggn"])
def test_products_equal_the_single_process_products_on_all_the_data(ranks, digits, name):
    model, loss_fn, data = digits
    operator = getattr(lt, name)(model, loss_fn, data)
    expected = operator @ probe_block(operator.shape[1])
    for results in ranks:
        assert_close(results[f"{name}_products"], expected)
    assert torch.equal(ranks[0][f"{name}_products"], ranks[1][f"{name}_products"])


def test_uneven_shards_in_batches_weigh_each_rank_by_its_samples(ranks, digits):
    model, loss_fn, data = digits
    H = lt.hessian(model, loss_fn, data)
    expected = H @ probe_block(H.shape[1])
    for results in ranks:
        assert_close(results["uneven_hessian_products"], expected)


def test_sum_reduced_losses_add_the_ranks_products(ranks, digits):
    model, _, data = digits
    H = lt.hessian(model, torch.nn.CrossEntropyLoss(reduction="sum"), data)
    expected = H @ probe_block(H.shape[1])
    for results in ranks:
        assert_close(results["sum_reduced_products"], expected)


def test_every_rank_returns_the_single_process_estimate(ranks, digits):
    model, loss_fn, data = digits
    H = lt.hessian(model, loss_fn, data)
    num_matvecs = ranks[0]["trace"][2]
    expected = lt.trace(H, method="hutchinson", num_matvecs=num_matvecs, seed=0)
    value, stderr, _ = ranks[0]["trace"]
    assert torch.equal(value, ranks[1]["trace"][0])
    assert torch.equal(stderr, ranks[1]["trace"][1])
    assert_close(value, expected.value)
    assert_close(stderr, expected.stderr)


def test_a_rank_whose_loss_raises_stops_the_others_with_an_error_naming_it(ranks):
    assert ranks[1]["failure"] == ("ValueError", "the loss of rank 1 failed on purpose")
    kind, message = ranks[0]["failure"]
    assert kind == "RuntimeError"
    assert "hessian: rank 1 of the process group failed" in message
    assert "ValueError: the loss of rank 1 failed on purpose" in message
    assert ranks[0]["failure_seconds"] < 30  # the gloo timeout of the worker is 60 s


def test_ranks_with_different_models_fail_when_the_operator_is_built(ranks):
    for rank, results in enumerate(ranks):
        kind, message = results["mismatch"]
        assert kind == "ValueError"
        assert "different numbers of parameters" in message
        width = 20 if rank == 0 else 21  # the hidden width of the rank's model
        assert f"this rank {width * 64 + width * 10 + 10}" in message


def test_process_group_needs_the_network_forms_and_an_initialized_group(digits):
    model, loss_fn, data = digits
    with pytest.raises(TypeError, match="network forms"):
        lt.hessian(lambda x: (x**2).sum(), torch.ones(3), process_group=object())
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            lt.ggn(model, loss_fn, data, process_group=object())
