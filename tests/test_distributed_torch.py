"""Data-parallel Hessians and GGNs on torch.distributed: two gloo ranks on the CPU.

One ``torchrun --nproc-per-node=2`` run of tests/distributed_torch_worker.py (the digits
MLP, 256 samples split 128/128) serves every test: the ranks' products and estimates
against one process on all 256 samples, in float64 (the two sum the same terms in a
different order: agreement to a few ulps, RTOL), the ranks' estimates against each
other (bitwise: both read the same all-reduced products), and the errors when a rank's
loss raises, the ranks hold different models, or they draw different probes (other
seeds, other budgets: caught on the first block by the fingerprints of the blocks, which
are tested here in one process too).
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
from linop_trace.autodiff._torch import _fingerprints_differ, _probe_fingerprint  # noqa: E402

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


@pytest.mark.parametrize("empty", ["empty_batch", "no_batches"])
@pytest.mark.parametrize("name", ["hessian", "ggn"])
def test_a_rank_whose_shard_holds_no_samples_adds_nothing(ranks, digits, empty, name):
    # rank 0 holds all 256 samples, rank 1 a batch of none or no batches at all: it used
    # to raise ("`data` holds no samples") and so stop every rank
    model, loss_fn, data = digits
    operator = getattr(lt, name)(model, loss_fn, data)
    expected = operator @ probe_block(operator.shape[1])
    for results in ranks:
        assert f"{empty}_failure" not in results, results.get(f"{empty}_failure")
        assert_close(results[f"{empty}_{name}_products"], expected)


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


def test_ranks_given_different_seeds_fail_on_the_first_block(ranks):
    for results in ranks:
        kind, message, seconds = results["seed_mismatch"]
        assert kind == "ValueError"
        assert "hessian: the ranks of the process group multiply probe blocks of 20 " in message
        assert "columns that hold different values" in message
        assert "were the ranks given the same seed and num_matvecs?" in message
        assert seconds < 30  # the gloo timeout of the worker is 60 s


@pytest.mark.parametrize("case", ["budget_mismatch", "later_budget_mismatch"])
def test_ranks_given_different_budgets_fail_on_the_first_block(ranks, case):
    """Also where the first blocks agree (block_size=10, 20 against 30 columns): the
    fingerprint holds a code of the estimate's plan, which differs."""
    for results in ranks:
        kind, message, seconds = results[case]
        assert kind == "ValueError"
        assert "hessian: the ranks of the process group run different estimates" in message
        assert "every rank must make the same call with the same seed" in message
        assert seconds < 30


def test_the_ranks_go_on_after_a_mismatch(ranks):
    for results in ranks:  # (mode="auto" may have picked another route since: not bitwise)
        assert_close(results["products_after_mismatch"], results["hessian_products"])
    assert torch.equal(ranks[0]["products_after_mismatch"], ranks[1]["products_after_mismatch"])


def test_ranks_with_models_of_different_dtypes_fail_on_the_first_block(ranks):
    for rank, results in enumerate(ranks):
        kind, message = results["dtype_mismatch"]
        assert kind == "ValueError"
        assert "probe blocks of different dtypes" in message
        assert f"(this rank {'float32' if rank == 1 else 'float64'})" in message


def fingerprints_differ(*blocks: torch.Tensor) -> bool:
    """What the ranks holding ``blocks`` decide (as in ``_DataParallel.sum``)."""
    prints = torch.stack([_probe_fingerprint(block) for block in blocks])
    return bool(_fingerprints_differ(prints.max(0).values, prints.min(0).values, blocks[0].dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64])
def test_probe_fingerprints_tell_other_probes_but_not_rounding(dtype):
    generator = torch.Generator().manual_seed(0)
    wide = torch.randn(1000, 30, generator=generator, dtype=dtype)
    V = wide[:, 5:25]  # a strided chunk of a wider block, as CountingMatmat passes on
    signs = torch.randint(0, 2, V.shape, generator=generator).to(dtype) * 2 - 1
    rounded = V * (1 + 4 * torch.finfo(dtype).eps * signs)  # a few ulps off in every entry
    assert not fingerprints_differ(V, V.contiguous(), rounded)

    other = torch.randn(1000, 20, generator=generator, dtype=dtype)
    prints = torch.stack([_probe_fingerprint(V), _probe_fingerprint(other)])
    norm = float(prints[0, 2])
    for weighted in prints[:, 3:].T:  # each weighted sum alone tells the two apart
        assert abs(float(weighted[0] - weighted[1])) > 1e-3 * norm
    assert fingerprints_differ(V, other)
    assert fingerprints_differ(V, V[:, [1, 0, *range(2, 20)]])  # two columns swapped
    assert fingerprints_differ(V, V.flip(0))  # the rows in reverse
    assert fingerprints_differ(V, wide[:, 5:24])  # another width
    assert fingerprints_differ(V, V.to(torch.complex128 if V.is_complex() else torch.bfloat16))


def test_rademacher_probes_of_two_seeds_differ_in_their_fingerprints():
    def rademacher(seed):
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, 2, (1480, 20), generator=generator).float() * 2 - 1

    assert not fingerprints_differ(rademacher(0), rademacher(0))
    assert all(fingerprints_differ(rademacher(0), rademacher(seed)) for seed in range(1, 20))


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
