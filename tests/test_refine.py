"""Refining an estimate without redoing its products (issue 18, item 13), and estimates
that do not depend on the block size (issue 18, minor).

Both rest on column streams: a probe block's columns are the random stream's next
columns however the blocks are cut (``RandomSource``). So a Hutchinson run in blocks of 8
draws the probes of a run in one block, and an estimate refined by k probes has drawn the
probes of one run of the total budget. The products of the same columns are the same
numbers (OpenBLAS rounds a column's product alike in blocks of 8 or more columns; sparse
products always), so on NumPy the trace is the one run's bit for bit. The diagonal adds
its running sums block by block, so there it agrees to rounding (a few ulps: rtol 1e-12
for float64). torch on CUDA and CuPy draw probes by the block: their tests skip.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import numpy_of

import linop_trace as lt
from linop_trace._probes import ProbeSampler
from linop_trace._testing import test_matrix
from linop_trace.estimators._hutchpp import hutchpp_core

N = 60


def _matrix(backend):
    return backend.matrix(test_matrix("flat", N, seed=0))  # not diagonal: noisy estimates


def _skip_block_draws(backend):
    if backend.name in ("cupy", "torch-cuda"):
        pytest.skip(f"{backend.name} draws each probe block at once (by its launch grid)")


def _exactly_equal(backend, quantity) -> bool:
    """Whether the values must agree bit for bit (NumPy and SciPy traces)."""
    return backend.name in ("numpy", "scipy") and quantity == "trace"


def _assert_same(backend, quantity, got, expected):
    assert got.num_matvecs == expected.num_matvecs
    for a, b in ((got.value, expected.value), (got.stderr, expected.stderr)):
        if _exactly_equal(backend, quantity):
            np.testing.assert_array_equal(numpy_of(a), numpy_of(b))
        else:  # the same probes and products, sums added in other orders
            np.testing.assert_allclose(numpy_of(a), numpy_of(b), rtol=1e-12)


# --------------------------------------------------------------------- block sizes
@pytest.mark.parametrize("quantity", ["trace", "diagonal"])
@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_does_not_depend_on_the_block_size(backend, quantity, probe):
    """48 probes in one block, in blocks of 8 and of 13 (three of 13 and one of 9): the
    same estimate. Before column streams each block was a fresh row-major draw, and the
    value changed with the block size."""
    _skip_block_draws(backend)
    function = getattr(lt, quantity)
    options = {"method": "hutchinson", "num_matvecs": 48, "seed": 5, "probe": probe}
    whole = function(_matrix(backend), **options)
    for block_size in (8, 13):
        cut = function(_matrix(backend), block_size=block_size, **options)
        _assert_same(backend, quantity, cut, whole)


def test_probe_blocks_are_the_stream_cut_anywhere(backend):
    """Blocks of 2, 4 and 3 columns are the block of 9: every probe kind, real and
    complex (complex Gaussian columns take two stream columns each)."""
    _skip_block_draws(backend)
    like = backend.asarray(np.zeros((2, 2)))
    xp, device = lt.aslinearoperator(like).xp, lt.aslinearoperator(like).device
    kinds = [("rademacher", "float64"), ("gaussian", "float64"), ("gaussian", "complex128")]
    kinds.append(("steinhaus", "complex128"))
    for kind, dtype in kinds:
        for n in (5, 37):
            whole = ProbeSampler(kind, n, xp, backend.dtype(dtype), device, seed=3)
            cut = ProbeSampler(kind, n, xp, backend.dtype(dtype), device, seed=3)
            expected = numpy_of(whole(9))
            got = np.concatenate([numpy_of(cut(2)), numpy_of(cut(4)), numpy_of(cut(3))], axis=1)
            if kind == "gaussian" and backend.library == "jax":
                # the same random bits; XLA's float32 inverse-erf kernel may round an entry
                # differently for another batch shape (measured: 1e-7 relative, JAX on
                # Python 3.12 and 3.13)
                np.testing.assert_allclose(got, expected, rtol=1e-6, err_msg=f"{kind} {dtype}")
            else:
                np.testing.assert_array_equal(got, expected, err_msg=f"{kind} {dtype} n={n}")


# ------------------------------------------------------------------------- refine
@pytest.mark.parametrize("quantity", ["trace", "diagonal"])
def test_a_refined_estimate_is_the_one_run_of_the_total_budget(backend, quantity):
    """32 probes refined by 24 (then by 16 more) are the run of 56 (72) with the seed."""
    _skip_block_draws(backend)
    function = getattr(lt, quantity)
    A = _matrix(backend)
    first = function(A, method="hutchinson", num_matvecs=32, seed=1)
    refined = first.refine(A, num_matvecs=24)
    _assert_same(
        backend, quantity, refined, function(A, method="hutchinson", num_matvecs=56, seed=1)
    )
    again = refined.refine(A, num_matvecs=16)
    _assert_same(backend, quantity, again, function(A, method="hutchinson", num_matvecs=72, seed=1))
    # the first estimate is left as it was, and refines to the same result again
    assert first.num_matvecs == 32
    _assert_same(backend, quantity, first.refine(A, num_matvecs=24), refined)


@pytest.mark.parametrize("quantity", ["trace", "diagonal"])
def test_a_refined_adaptive_run_is_the_adaptive_run_of_the_tighter_tolerance(backend, quantity):
    """rtol 0.3 then refined to rtol 0.05 spends what, and gives what, one run with rtol
    0.05 does: the doubling rounds are the same rounds."""
    _skip_block_draws(backend)
    function = getattr(lt, quantity)
    A = _matrix(backend)
    options = {"method": "hutchinson", "seed": 2, "max_matvecs": 2000, "num_matvecs": 4}
    loose = function(A, rtol=0.3, **options)
    refined = loose.refine(A, rtol=0.05, max_matvecs=2000)
    tight = function(A, rtol=0.05, **options)
    assert loose.num_matvecs < tight.num_matvecs
    assert refined.converged is tight.converged is True
    _assert_same(backend, quantity, refined, tight)


def test_hutchpp_refines_its_residual_phase(dense_backend):
    """Hutch++ with 60 columns (sketch 20, A Q 20, residual 20) refined by 30 residual
    probes: the same sketch, and the residual mean of the stream's next 50 probes."""
    _skip_block_draws(dense_backend)
    A = _matrix(dense_backend)
    first = lt.trace(A, method="hutch++", num_matvecs=60, seed=4)
    refined = first.refine(A, num_matvecs=30)
    assert refined.num_matvecs == 90 and refined.info["num_residual_probes"] == 50
    assert refined.info["sketch_size"] == first.info["sketch_size"] == 20
    operator = lt.aslinearoperator(A)
    sampler = ProbeSampler("rademacher", N, operator.xp, operator.dtype, operator.device, seed=4)
    sketch = sampler(20)
    expected = hutchpp_core(operator.matmat, sketch, sampler(50), operator.xp).residual
    np.testing.assert_allclose(numpy_of(refined.value), numpy_of(expected.value), rtol=1e-12)
    np.testing.assert_allclose(numpy_of(refined.stderr), numpy_of(expected.stderr), rtol=1e-12)


def test_auto_estimates_refine_when_auto_ran_hutchinson():
    """``auto`` on a flat spectrum runs Hutchinson (its first probes serve both
    predictions): refinable; on a decaying one it runs XTrace: not."""

    def implicit(M):
        return lt.LinearOperator.from_callable(matvec=lambda x: M @ x, shape=M.shape)

    flat = implicit(test_matrix("flat", 300))
    estimate = lt.trace(flat, num_matvecs=60, seed=0)
    assert estimate.method == "hutchinson"
    assert estimate.refine(flat, num_matvecs=40).num_matvecs == 100
    decaying = implicit(test_matrix("fastexp", 300))
    estimate = lt.trace(decaying, num_matvecs=60, seed=0)
    assert estimate.method == "xtrace"
    with pytest.raises(ValueError, match="cannot be refined"):
        estimate.refine(decaying, num_matvecs=40)


@pytest.mark.parametrize(
    "quantity, method",
    [
        ("trace", "xtrace"),
        ("trace", "xnystrace"),
        ("trace", "na-hutch++"),
        ("trace", "exact"),
        ("diagonal", "diag++"),
        ("diagonal", "xdiag"),
        ("diagonal", "exact"),
    ],
)
def test_methods_that_cannot_refine_say_so(quantity, method):
    A = test_matrix("flat", N, seed=0)
    estimate = getattr(lt, quantity)(A, method=method, num_matvecs=30, seed=0)
    with pytest.raises(ValueError, match=re.escape(f"{method!r} estimate cannot be refined")):
        estimate.refine(A, num_matvecs=10)


def test_refine_checks_its_operator_and_budget():
    A = test_matrix("flat", N, seed=0)
    estimate = lt.trace(A, method="hutchinson", num_matvecs=20, seed=0)
    with pytest.raises(ValueError, match="operator of the first run"):
        estimate.refine(test_matrix("flat", N + 1, seed=0), num_matvecs=10)
    with pytest.raises(ValueError, match="operator of the first run"):
        estimate.refine(A.astype(np.float32), num_matvecs=10)
    with pytest.raises(ValueError, match="one of the two"):
        estimate.refine(A)
    with pytest.raises(ValueError, match="one of the two"):
        estimate.refine(A, num_matvecs=10, rtol=0.1)
    with pytest.raises(ValueError, match="max_matvecs goes with a tolerance"):
        estimate.refine(A, num_matvecs=10, max_matvecs=100)
    with pytest.raises(ValueError, match="num_matvecs >= 1"):
        estimate.refine(A, num_matvecs=0)
    with pytest.raises(TypeError, match="must be an int"):
        estimate.refine(A, num_matvecs=True)
    with pytest.raises(ValueError, match="exceeds the cap"):
        estimate.refine(A, num_matvecs=10**7)


def test_a_refined_diagonal_keeps_the_scale_of_its_products():
    """A diagonal of 1e200 * A is computed with products scaled by a power of two; the
    refinement scales its products alike (unscaled, their squares would overflow)."""
    A = 1e200 * test_matrix("flat", N, seed=0)
    refined = lt.diagonal(A, method="hutchinson", num_matvecs=32, seed=3).refine(A, num_matvecs=24)
    whole = lt.diagonal(A, method="hutchinson", num_matvecs=56, seed=3)
    assert np.all(np.isfinite(refined.stderr)) and np.all(refined.stderr > 0)
    np.testing.assert_allclose(refined.value, whole.value, rtol=1e-12)
    np.testing.assert_allclose(refined.stderr, whole.stderr, rtol=1e-12)


def _counting(M):
    calls = []

    def matmat(X):
        calls.append(X.shape[1])
        return M @ X

    operator = lt.LinearOperator.from_callable(matmat=matmat, rmatmat=matmat, shape=M.shape)
    return operator, calls


@pytest.mark.parametrize(
    ("quantity", "method"),
    [("trace", "hutchinson"), ("diagonal", "hutchinson"), ("trace", "hutch++")],
)
def test_refine_with_a_cap_already_spent_spends_nothing(quantity, method):
    """max_matvecs is the most products in all, the first run's included: at or below
    them the refine has none to spend (it spent as many again: 30 -> 60)."""
    M = test_matrix("flat", N, seed=0)
    operator, calls = _counting(M)
    first = getattr(lt, quantity)(operator, method=method, num_matvecs=30, seed=1)
    spent = sum(calls)
    for cap in (20, 30):
        refined = first.refine(operator, atol=1e-6, max_matvecs=cap)
        assert refined.num_matvecs == 30
        assert sum(calls) == spent
        assert refined.converged is False


@pytest.mark.parametrize(
    ("quantity", "method", "options"),
    [
        ("trace", "hutchinson", {"rtol": 0.01}),
        ("diagonal", "hutchinson", {"rtol": 0.1}),
        ("diagonal", "diag++", {"rtol": 0.1}),
        ("trace", "hutch++", None),  # (its residual phase, refined)
    ],
)
def test_adaptive_estimate_does_not_depend_on_the_block_size(quantity, method, options):
    """Each round doubles the samples, in blocks of at most block_size: a round cut to one
    block moved the stopping points (NumPy, trace Hutchinson: 64 products at the default
    block size, 48 at 16, with another value)."""
    A = test_matrix("flat", 300, seed=0)
    function = getattr(lt, quantity)
    runs = []
    for size in (None, 16):
        if options is None:
            first = function(A, method=method, num_matvecs=30, seed=1, block_size=size)
            runs.append(first.refine(A, rtol=0.004, max_matvecs=2000))
        else:
            runs.append(
                function(A, method=method, seed=1, max_matvecs=2000, block_size=size, **options)
            )
    assert runs[0].num_matvecs == runs[1].num_matvecs < 2000
    np.testing.assert_allclose(runs[0].value, runs[1].value, rtol=1e-12)
    np.testing.assert_allclose(runs[0].stderr, runs[1].stderr, rtol=1e-9)


@pytest.mark.parametrize(
    ("quantity", "method", "rtol"),
    [
        ("trace", "xtrace", 0.01),
        ("trace", "hutch++", 0.01),
        ("diagonal", "hutchinson", 0.1),
        ("diagonal", "diag++", 0.1),
    ],
)
def test_adaptive_estimate_is_the_same_at_any_power_of_two_scale(quantity, method, rtol):
    """Adaptive runs get the power-of-two scaling of their products that fixed budgets
    get (and atol is scaled with it): at 2^-75 the float32 diagonal's squares underflowed
    (stderr 0, 'converged' after 4 products) and at 2^75 they overflowed (NaN stderr,
    the whole cap spent); Hutch++'s sketch norms overflowed too. Scaled by a power of
    two, the run is the same run, to float32 rounding of the stopping quantities."""
    A = test_matrix("flat", 100, seed=0).astype(np.float32)
    function = getattr(lt, quantity)
    reference = function(A, method=method, rtol=rtol, seed=1)
    for power in (-75, 75):
        scale = np.float32(2.0**power)
        run = function(A * scale, method=method, rtol=rtol, seed=1)
        assert run.num_matvecs == reference.num_matvecs
        assert run.converged
        np.testing.assert_allclose(
            numpy_of(run.value) / scale, numpy_of(reference.value), rtol=1e-5, atol=1e-6
        )
    atol_run = function(A * np.float32(2.0**75), method=method, atol=float(2.0**75) * 0.05, seed=1)
    atol_reference = function(A, method=method, atol=0.05, seed=1)
    assert atol_run.num_matvecs == atol_reference.num_matvecs


def test_a_refine_sizes_its_blocks_for_its_own_budget():
    """The first run's default block (capped by its 8 columns) was inherited: 248 more
    columns in 31 calls. A refine now sizes its blocks for its own budget, one call a
    doubling round, unless the caller gave block_size."""
    M = test_matrix("flat", 300, seed=0)
    operator, calls = _counting(M)
    first = lt.trace(operator, method="hutchinson", num_matvecs=8, seed=1)
    del calls[:]
    refined = first.refine(operator, rtol=0.01, max_matvecs=2000)
    rounds = int(np.log2(refined.num_matvecs // 8))
    assert len(calls) == rounds and sum(calls) == refined.num_matvecs - 8
    given = lt.trace(operator, method="hutchinson", num_matvecs=8, seed=1, block_size=8)
    del calls[:]
    again = given.refine(operator, rtol=0.01, max_matvecs=2000)
    assert max(calls) == 8
    assert float(again) == float(refined) and again.num_matvecs == refined.num_matvecs
