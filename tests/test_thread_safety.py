"""torch autodiff operators shared between threads (issue 18, item 5).

torch keeps its forward-mode AD levels per process, not per thread: two threads inside
``torch.func.jvp`` at once failed with "Trying to access a forward AD level with an
invalid index", and under ``mode="auto"`` the failure switched the operator to its
fallback for good. Four threads here call ``trace`` on one Hessian, several times each;
every estimate must equal the single-threaded one of the same seed, and the operator
must keep its route. The probes go in blocks of 3 columns, too narrow for
``mode="auto"`` to time the loop against the vectorized product: every product is a
forward-mode one.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest

torch = pytest.importorskip("torch")

import linop_trace as lt  # noqa: E402
from linop_trace.autodiff._torch import (  # noqa: E402
    FORWARD_GGN,
    FORWARD_HVP,
    LOOP_HVP,
    REVERSE_HVP,
)

F64 = torch.float64
THREADS = 4
CALLS_PER_THREAD = 3
NUM_MATVECS = 6
BLOCK = 3  # 2 products per estimate, each a forward-mode one under "auto" as well

#: The route of each operator, before and after the threads.
ROUTES = {
    (lt.hessian, "forward"): FORWARD_HVP,
    (lt.hessian, "auto"): FORWARD_HVP,
    (lt.ggn, "forward"): FORWARD_GGN,
    (lt.ggn, "auto"): FORWARD_GGN,
    (lt.hessian, "reverse"): REVERSE_HVP,
    (lt.hessian, "loop"): LOOP_HVP,
}


def mlp_problem():
    """A small MLP (3 -> 8 -> 2, 50 parameters), its loss and one batch of data."""
    g = torch.Generator().manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    model = model.to(F64)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, dtype=F64, generator=g))
    X = torch.randn(32, 3, dtype=F64, generator=g)
    y = torch.randint(0, 2, (32,), generator=g)
    return model, torch.nn.CrossEntropyLoss(), (X, y)


def estimate(A, seed):
    return lt.trace(A, method="hutchinson", num_matvecs=NUM_MATVECS, seed=seed, block_size=BLOCK)


def concurrent_traces(A, seeds):
    """``estimate(A, seed)`` for every seed, spread over THREADS threads."""
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        return list(pool.map(lambda seed: estimate(A, seed), seeds))


@pytest.mark.parametrize(
    ("build", "mode"),
    [
        (lt.hessian, "forward"),
        (lt.hessian, "auto"),
        (lt.ggn, "forward"),
        (lt.ggn, "auto"),
        # no forward mode: the module's forward passes alone are serialized
        (lt.hessian, "reverse"),
        (lt.hessian, "loop"),
    ],
)
def test_threads_sharing_an_operator_get_the_single_threaded_estimates(build, mode):
    model, loss_fn, data = mlp_problem()
    A = build(model, loss_fn, data, mode=mode)
    seeds = list(range(THREADS * CALLS_PER_THREAD))
    expected = [estimate(A, seed).value for seed in seeds]
    route = A.mode
    assert route == ROUTES[build, mode]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback would warn
        estimates = concurrent_traces(A, seeds)
    assert [float(e.value) for e in estimates] == [float(v) for v in expected]
    assert A.mode == route


def test_threads_sharing_a_jacobian_and_a_divergence_in_forward_mode():
    g = torch.Generator().manual_seed(8)
    W = torch.randn(4, 4, dtype=F64, generator=g)
    x = torch.randn(4, dtype=F64, generator=g)
    J = lt.jacobian(lambda v: torch.tanh(W @ v), x, mode="forward")
    seeds = list(range(THREADS * CALLS_PER_THREAD))
    expected = [estimate(J, seed).value for seed in seeds]
    assert [float(e.value) for e in concurrent_traces(J, seeds)] == [float(v) for v in expected]

    Z = torch.randn(5, 4, dtype=F64, generator=g)

    def divergence(seed):
        return lt.divergence(lambda z: torch.tanh(z @ W), Z, method="hutchinson", seed=seed)

    reference = [divergence(seed).value for seed in seeds]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with ThreadPoolExecutor(max_workers=THREADS) as pool:
            values = [e.value for e in pool.map(divergence, seeds)]
    for value, expected_value in zip(values, reference):
        assert torch.equal(value, expected_value)
