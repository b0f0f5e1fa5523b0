"""Defects found by the reliability audit (issue 18): each test failed before its fix.

Silent wrong results first (NumPy matrices, functions that write into their input), then
errors that were deep or late (SciPy operators without an adjoint) and the small ones
(tags, shapes, seeds, masks). The tests of runaway budgets (item 7), of a bool as a
tolerance, and of an estimator class for an instance (item 8) sit with the code they
test, in tests/test_functions.py and tests/estimators/test_registry.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from conftest import numpy_of

import linop_trace as lt
from linop_trace._testing import test_matrix

DIAGONAL = np.arange(1.0, 51.0)  # trace 1275


# ------------------------------------------------------------- np.matrix (item 1)
def test_numpy_matrix_is_read_as_an_array():
    """``scipy.sparse...todense()`` gives an ``np.matrix``, in which ``*`` is a matrix
    product and reductions keep two dimensions: row sums came back (50, 1), and the
    Hutchinson trace of the audit read 82.56 for 1275."""
    M = sp.diags(DIAGONAL).todense()
    assert type(M) is np.matrix
    estimate = lt.trace(M, method="hutchinson", num_matvecs=50, seed=0)
    assert float(estimate) == pytest.approx(1275.0)  # Rademacher probes: exact on a diagonal
    assert estimate.stderr is not None
    sums = lt.row_sums(M).value
    assert type(sums) is np.ndarray and sums.shape == (50,)
    np.testing.assert_allclose(sums, DIAGONAL)
    assert lt.diagonal(M, method="hutchinson", num_matvecs=4, seed=0).value.shape == (50,)


def test_products_returned_as_numpy_matrices_are_read_as_arrays():
    A = np.diag(DIAGONAL)
    operator = lt.LinearOperator.from_callable(matmat=lambda X: np.asmatrix(A @ X), shape=A.shape)
    product = operator.matmat(np.ones((50, 3)))
    assert type(product) is np.ndarray
    for method in ("hutchinson", "hutch++", "xtrace"):
        estimate = lt.trace(operator, method=method, num_matvecs=30, seed=0)
        low, high = estimate.ci(0.999)
        assert low <= 1275.0 <= high, method
    assert lt.row_sums(operator).value.shape == (50,)


def test_masked_arrays_are_refused_or_read_as_their_data():
    A = np.diag(DIAGONAL)
    unmasked = np.ma.masked_array(A, mask=np.zeros_like(A, dtype=bool))
    assert float(lt.trace(unmasked, method="exact")) == 1275.0
    masked = np.ma.masked_array(A, mask=np.zeros_like(A, dtype=bool))
    masked.mask[2, 3] = True
    with pytest.raises(ValueError, match="masked array with 1 masked entries"):
        lt.trace(masked, method="exact")


# ------------------------------------------------- input written in place (item 3)
def _scales_its_input(X):
    X *= DIAGONAL[:, None]
    return X


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace", "na-hutch++"])
def test_a_matmat_that_writes_into_its_input_is_refused(method):
    """``X *= d; return X`` turned Hutchinson's samples into |A z|^2 (42925 for 1275)
    and XTrace's into -67317; now the fingerprint of the block catches it."""
    operator = lt.LinearOperator.from_callable(
        matmat=_scales_its_input, shape=(50, 50), tags=("symmetric",)
    )
    with pytest.raises(ValueError, match="wrote into its input"):
        lt.trace(operator, method=method, num_matvecs=40, seed=0)
    with pytest.raises(ValueError, match="`matmat` changed the block"):
        operator @ np.ones((50, 2))


def test_a_matmat_that_leaves_its_input_alone_passes():
    operator = lt.LinearOperator.from_callable(
        matmat=lambda X: X * DIAGONAL[:, None], shape=(50, 50)
    )
    block = np.full((50, 2), np.nan)  # NaN inputs compare equal to themselves here
    assert np.isnan(operator @ block).all()
    assert float(lt.trace(operator, method="hutchinson", num_matvecs=40, seed=0)) == 1275.0


# -------------------------------------------- SciPy operators without rmatvec (item 6)
@pytest.mark.parametrize(
    "call",
    [
        lambda S: lt.col_sums(S),
        lambda S: lt.diagonal(S, method="xdiag", num_matvecs=20, seed=0),
        lambda S: lt.diagonal(S, method="diag++", num_matvecs=20, seed=0),
        lambda S: lt.trace(S, method="na-hutch++", num_matvecs=20, seed=0),
    ],
    ids=["col_sums", "xdiag", "diag++", "na-hutch++"],
)
def test_scipy_operator_without_rmatvec_gets_a_named_error(call):
    """It failed with "TypeError: 'NoneType' object is not callable"; now it gets the
    message an operator from ``from_callable`` without an adjoint gets."""
    A = test_matrix("flat", 60, seed=0)
    S = spla.LinearOperator(A.shape, matvec=lambda x: A @ x, dtype=np.float64)
    with pytest.raises((ValueError, NotImplementedError), match="adjoint|A\\^H"):
        call(S)


def test_scipy_operator_without_rmatvec_still_gets_a_diagonal():
    """``diagonal(method="auto")`` picks a method that needs no adjoint."""
    A = test_matrix("flat", 60, seed=0)
    S = spla.LinearOperator(A.shape, matvec=lambda x: A @ x, dtype=np.float64)
    estimate = lt.diagonal(S, num_matvecs=20, seed=0)
    assert estimate.method == "hutchinson"
    with_adjoint = spla.LinearOperator(
        A.shape, matvec=lambda x: A @ x, rmatvec=lambda x: A.T @ x, dtype=np.float64
    )
    np.testing.assert_allclose(lt.col_sums(with_adjoint).value, A.sum(axis=0))


# ------------------------------------------------------------------------ minor
def test_one_tag_given_as_a_string_is_one_tag():
    """``tags="symmetric"`` was split into its letters (an "unknown tags" error)."""
    operator = lt.aslinearoperator(np.eye(3), tags="symmetric")
    assert operator.tags == frozenset({"symmetric"})
    with pytest.raises(TypeError, match="iterable of strings"):
        lt.aslinearoperator(np.eye(3), tags=[1])


def test_fractional_shapes_are_refused():
    """``shape=(3.7, 3.7)`` was truncated to (3, 3)."""
    with pytest.raises(ValueError, match="pair of non-negative ints"):
        lt.LinearOperator.from_callable(matvec=lambda x: x, shape=(3.7, 3.7))
    with pytest.raises(ValueError, match="pair of non-negative ints"):
        lt.LinearOperator.from_callable(matvec=lambda x: x, shape=(True, True))


@pytest.mark.parametrize("seed", [2**63, 2**64 + 5, 2**200])
def test_seeds_beyond_64_bits_work_on_every_backend(backend, seed):
    """Seeds >= 2**64 overflowed inside torch's and JAX's seeding (2**63 in JAX)."""
    A = backend.matrix(test_matrix("flat", 30, seed=0))
    first = lt.trace(A, method="hutchinson", num_matvecs=10, seed=seed)
    again = lt.trace(A, method="hutchinson", num_matvecs=10, seed=seed)
    assert float(first) == float(again)
    assert np.isfinite(numpy_of(first.stderr))


def test_large_seeds_stay_distinct():
    from linop_trace._backend import fold_seed

    assert fold_seed(12345, 63) == 12345  # seeds that fit are used as they are
    folded = {fold_seed(2**70 + k, 63) for k in range(100)}
    assert len(folded) == 100 and all(0 <= s < 2**63 for s in folded)


# ---------------------------------------------------------- half precision (item 9)
HALF_METHODS = [
    ("trace", "exact"),
    ("trace", "hutchinson"),
    ("trace", "hutch++"),
    ("trace", "na-hutch++"),
    ("trace", "xtrace"),
    ("trace", "xnystrace"),
    ("diagonal", "hutchinson"),
    ("diagonal", "diag++"),
    ("diagonal", "xdiag"),
]


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
@pytest.mark.parametrize(("quantity", "method"), HALF_METHODS)
def test_half_precision_operators_are_estimated_in_float32(dense_backend, half, quantity, method):
    """One rule: probes and algebra in float32, products in the operator's half precision,
    results float32. Before, torch float16 failed inside its linear algebra ("geqrf_cpu"
    not implemented for 'Half'), NumPy float16 raised in XNysTrace and NA-Hutch++ and
    returned float32 elsewhere, and exact and Hutchinson returned float16."""
    xp = dense_backend.xp
    if not hasattr(xp, half) or dense_backend.name == "strict":
        pytest.skip(f"{dense_backend.name} has no {half}")
    if dense_backend.library == "jax" and method not in ("exact", "hutchinson", "xtrace"):
        pytest.skip("JAX: three methods (each half-precision program compiles for seconds)")
    values = test_matrix("fastexp", 60, seed=1) * 20.0  # trace ~ 30, entries well inside
    A = dense_backend.asarray(values)
    A = xp.astype(A, getattr(xp, half))
    exact_values = numpy_of(xp.astype(A, xp.float32)).astype(np.float64)
    tags = ("symmetric", "positive_semidefinite") if method == "xnystrace" else ()
    operator = lt.aslinearoperator(A, tags=tags)
    function = getattr(lt, quantity)
    try:
        estimate = function(operator, method=method, num_matvecs=30, seed=0)
        value = numpy_of(estimate.value)
    except ValueError as error:  # bfloat16 rounding can make Omega^H A Omega indefinite
        assert method == "xnystrace" and "positive semidefinite" in str(error)
        return
    assert estimate.value.dtype == xp.float32
    truth = np.trace(exact_values) if quantity == "trace" else np.diag(exact_values)
    if method == "exact":
        np.testing.assert_allclose(value, truth, rtol=1e-5, atol=1e-5)
        return
    stderr = numpy_of(estimate.stderr)
    assert np.all(np.isfinite(value)) and np.all(stderr >= 0)
    # Against the same method, seed and probes on the float32 copy of the rounded matrix:
    # they differ by the half-precision products alone (the probes rounded to the
    # operator's dtype and the products' own rounding: a unit of 2**-11 relative for
    # float16 and 2**-8 for bfloat16), which the stderr does not include. Measured: at
    # most 1.5 units of the value's largest entry, except XNysTrace (28 units), whose
    # eigendecomposition of Omega^H A Omega amplifies them by that matrix's conditioning.
    reference = function(
        lt.aslinearoperator(dense_backend.asarray(exact_values.astype(np.float32)), tags=tags),
        method=method,
        num_matvecs=30,
        seed=0,
    )
    unit = 2.0**-11 if half == "float16" else 2.0**-8
    scale = np.abs(numpy_of(reference.value)).max()
    units = 64 if method == "xnystrace" else 4
    np.testing.assert_allclose(value, numpy_of(reference.value), atol=units * unit * scale)


# --------------------------------------------------------- out of memory (item 11)
def _narrow_only(scale, limit, widths, error):
    """``X -> diag(scale) X``, raising ``error`` for blocks wider than ``limit``."""

    def matmat(X):
        if X.shape[1] > limit:
            raise error
        widths.append(int(X.shape[1]))
        return X * scale[:, None]

    return matmat


@pytest.mark.parametrize(
    ("quantity", "method", "tags"),
    [
        ("trace", "hutchinson", ()),
        ("trace", "hutch++", ()),
        ("trace", "xtrace", ()),
        ("diagonal", "hutchinson", ()),
        ("diagonal", "xdiag", ("symmetric",)),
    ],
)
def test_a_product_out_of_memory_is_retried_in_halves(dense_backend, quantity, method, tags):
    """A product that runs out of memory halves the block and goes on: the columns done
    are kept, the estimate equals an uninterrupted run's (a diagonal scaling gives the
    same columns whatever the block) and ``info["block_sizes"]`` records the sizes."""
    scale_values = np.arange(1.0, 201.0)
    scale = dense_backend.asarray(scale_values)
    like = dense_backend.asarray(np.zeros(1))
    widths: list[int] = []
    tight = lt.LinearOperator.from_callable(
        matmat=_narrow_only(scale, 16, widths, MemoryError("fake: no room")),
        shape=(200, 200),
        like=like,
        tags=tags,
    )
    roomy = lt.LinearOperator.from_callable(
        matmat=lambda X: X * scale[:, None], shape=(200, 200), like=like, tags=tags
    )
    function = getattr(lt, quantity)
    with pytest.warns(RuntimeWarning, match="ran out of memory"):
        estimate = function(tight, method=method, num_matvecs=100, seed=0, block_size=100)
    reference = function(roomy, method=method, num_matvecs=100, seed=0, block_size=100)
    # bit for bit on NumPy; elsewhere to rounding (torch's products of a concatenated
    # block may take another memory layout, hence another summation order in BLAS)
    exact = dense_backend.library == "numpy"
    np.testing.assert_allclose(
        numpy_of(estimate.value), numpy_of(reference.value), rtol=0 if exact else 1e-13
    )
    assert estimate.num_matvecs == reference.num_matvecs == sum(widths)
    assert max(widths) <= 16 and estimate.info["block_sizes"] == sorted(set(widths), reverse=True)


def test_torch_and_xla_out_of_memory_errors_are_recognized():
    from linop_trace._backend import is_out_of_memory

    torch = pytest.importorskip("torch")
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_other_errors_of_a_product_are_not_retried():
    widths: list[int] = []
    operator = lt.LinearOperator.from_callable(
        matmat=_narrow_only(np.ones(50), 4, widths, KeyError("a bug of the function")),
        shape=(50, 50),
    )
    with pytest.raises(KeyError, match="a bug"):
        lt.trace(operator, method="hutchinson", num_matvecs=20, seed=0)
    assert widths == []


def test_a_single_column_out_of_memory_propagates():
    operator = lt.LinearOperator.from_callable(
        matmat=_narrow_only(np.ones(50), 0, [], MemoryError("fake: no room at all")),
        shape=(50, 50),
    )
    with pytest.warns(RuntimeWarning, match="ran out of memory"):
        with pytest.raises(MemoryError, match="no room at all"):
            lt.trace(operator, method="hutchinson", num_matvecs=4, seed=0)


# ----------------------------------------------------------- extreme scales (item 2)
SCALED_METHODS = [
    ("trace", "hutchinson", ()),
    ("trace", "hutch++", ()),
    ("trace", "na-hutch++", ()),
    ("trace", "xtrace", ()),
    ("trace", "xnystrace", ("symmetric", "positive_semidefinite")),
    ("diagonal", "hutchinson", ()),
    ("diagonal", "diag++", ()),
    ("diagonal", "xdiag", ()),
]


@pytest.mark.parametrize(("quantity", "method", "tags"), SCALED_METHODS)
@pytest.mark.parametrize(("dtype", "exponent"), [("float64", 150), ("float32", 30)])
def test_every_method_survives_extreme_scales(
    dense_backend, quantity, method, tags, dtype, exponent
):
    """At P * 1e+-150 (float64) and P * 1e+-30 (float32) every method returns what it
    returns for P, times the scale, with a positive finite stderr. Before, XTrace gave NaN
    at 1e200 and 3.63e-199 +- 0 at 1e-200, XNysTrace and the diagonal Hutchinson a zero
    stderr on underflow, NA-Hutch++ NaN at 1e155, XDiag an all-NaN float32 diagonal at
    1e36, and float32 XTrace 3.66e-24 +- 0 at 1e-25. (P = G G^T / 50, G 50 x 50 Gaussian:
    the audit's matrix.)"""
    if dtype == "float64" and not dense_backend.float64_supported:
        pytest.skip("no float64")
    G = np.random.default_rng(0).standard_normal((50, 50))
    P = G @ G.T / 50
    function = getattr(lt, quantity)

    def run(scale):
        A = dense_backend.asarray((P * scale).astype(dtype))
        return function(lt.aslinearoperator(A, tags=tags), method=method, num_matvecs=20, seed=0)

    reference = run(1.0)
    expected_value = numpy_of(reference.value).astype(np.float64)
    expected_stderr = numpy_of(reference.stderr).astype(np.float64)
    # the scaled matrices differ from P by one rounding of each entry: relative 2**-52
    # (2**-23), passed through the methods' solves; 1e-8 (1e-3) leaves a wide margin
    rtol = 1e-8 if dtype == "float64" else 1e-3
    for sign in (1, -1):
        scale = 10.0 ** (sign * exponent)
        estimate = run(scale)
        value = numpy_of(estimate.value).astype(np.float64) / scale
        stderr = numpy_of(estimate.stderr).astype(np.float64) / scale
        assert np.all(np.isfinite(value)) and np.all(stderr > 0), (scale, value, stderr)
        np.testing.assert_allclose(
            value, expected_value, rtol=rtol, atol=rtol * np.abs(expected_value).max()
        )
        np.testing.assert_allclose(
            stderr, expected_stderr, rtol=rtol, atol=rtol * expected_stderr.max()
        )


# ------------------------------------------------------ interrupted runs (item 12)
class _Interrupting:
    """``X -> M X`` that raises KeyboardInterrupt (Ctrl-C) at call ``at``."""

    def __init__(self, matrix, at):
        self.matrix, self.at, self.calls = matrix, at, 0

    def __call__(self, X):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.matrix @ X


@pytest.mark.parametrize("quantity", ["trace", "diagonal"])
def test_an_interrupted_runs_partial_estimate_has_the_calls_confidence(quantity):
    """The partial estimate of an interrupted run gives its interval at the call's
    ``confidence`` (it gave 95% after ``confidence=0.99``; the CLI printed that)."""
    matrix = test_matrix("flat", 60, seed=0)
    interrupting = lt.LinearOperator.from_callable(
        matmat=_Interrupting(matrix, at=4), shape=(60, 60)
    )
    with pytest.raises(lt.EstimateInterrupted) as caught:
        getattr(lt, quantity)(
            interrupting, method="hutchinson", num_matvecs=80, block_size=8, confidence=0.99
        )
    partial = caught.value.partial
    assert partial.confidence == 0.99
    assert partial.quantile() == partial.quantile(0.99)
    # an interrupted refine: its partial at the estimate's level too
    first = getattr(lt, quantity)(
        lt.LinearOperator.from_callable(matmat=lambda X: matrix @ X, shape=(60, 60)),
        method="hutchinson",
        num_matvecs=8,
        block_size=8,  # (refine's blocks too)
        confidence=0.8,
        seed=0,
    )
    with pytest.raises(lt.EstimateInterrupted) as caught:
        first.refine(
            lt.LinearOperator.from_callable(matmat=_Interrupting(matrix, at=2), shape=(60, 60)),
            num_matvecs=80,
        )
    assert caught.value.partial.confidence == 0.8


def test_an_interrupted_sums_partial_estimate_has_its_exact_part():
    """The partial estimate of an interrupted ``A + 5 I`` was the implicit part's alone
    (-4.2 for about 246): now the exact part is added, as to the whole estimate."""
    matrix = test_matrix("flat", 60, seed=0)
    interrupting = lt.LinearOperator.from_callable(
        matmat=_Interrupting(matrix, at=4), shape=(60, 60)
    )
    shifted = interrupting + 5 * lt.identity(60)
    with pytest.raises(lt.EstimateInterrupted) as caught:
        lt.trace(shifted, method="hutchinson", num_matvecs=80, block_size=8, seed=0)
    partial = caught.value.partial
    assert partial.num_matvecs == 24
    plain = lt.LinearOperator.from_callable(matmat=lambda X: matrix @ X, shape=(60, 60))
    reference = lt.trace(plain, method="hutchinson", num_matvecs=24, block_size=8, seed=0)
    assert float(partial) == pytest.approx(float(reference) + 300, rel=1e-12)


@pytest.mark.parametrize("quantity", ["trace", "diagonal"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_an_interrupted_hutchinson_run_keeps_its_estimate(dense_backend, quantity, adaptive):
    """Ctrl-C in the fourth product: an ``EstimateInterrupted`` (a KeyboardInterrupt)
    whose ``partial`` is the estimate of the three completed blocks, equal to a run of
    those three blocks with the same seed, with ``converged=False`` and an interval."""
    matrix = dense_backend.asarray(test_matrix("flat", 60, seed=0))  # not diagonal
    like = dense_backend.asarray(np.zeros(1))
    options = {"method": "hutchinson", "seed": 0, "block_size": 8, "probe": "gaussian"}
    if adaptive:
        options.update(rtol=1e-9, num_matvecs=8, max_matvecs=400)
    else:
        options.update(num_matvecs=80)
    function = getattr(lt, quantity)
    interrupting = lt.LinearOperator.from_callable(
        matmat=_Interrupting(matrix, at=4), shape=(60, 60), like=like
    )
    with pytest.raises(KeyboardInterrupt) as caught:
        function(interrupting, **options)
    assert isinstance(caught.value, lt.EstimateInterrupted)
    partial = caught.value.partial
    assert partial is not None and partial.converged is False
    assert partial.num_matvecs == 24  # three blocks of 8 (adaptive rounds grow by <= 8)
    # the same three blocks with the same seed, as a fixed budget draws them
    plain = lt.LinearOperator.from_callable(matmat=lambda X: matrix @ X, shape=(60, 60), like=like)
    reference = function(
        plain, method="hutchinson", seed=0, block_size=8, probe="gaussian", num_matvecs=24
    )
    np.testing.assert_allclose(numpy_of(partial.value), numpy_of(reference.value), rtol=1e-12)
    np.testing.assert_allclose(numpy_of(partial.stderr), numpy_of(reference.stderr), rtol=1e-12)
    if quantity == "trace":
        low, high = partial.ci()
        assert low < float(partial) < high


def test_an_interruption_between_a_product_and_its_check_keeps_the_estimate(
    dense_backend, monkeypatch
):
    """Ctrl-C after the fourth product, in the column reduction that carries its
    finiteness check: the partial estimate of the three reduced blocks, not an error
    about a product left unchecked (the fourth is checked through the partial value)."""
    from linop_trace.estimators import _hutchinson

    matrix = dense_backend.asarray(test_matrix("flat", 60, seed=0))
    like = dense_backend.asarray(np.zeros(1))
    reductions = {"calls": 0}
    reduce = _hutchinson.column_inner

    def interrupted_fourth(*args):
        reductions["calls"] += 1
        if reductions["calls"] == 4:
            raise KeyboardInterrupt
        return reduce(*args)

    monkeypatch.setattr(_hutchinson, "column_inner", interrupted_fourth)
    operator = lt.LinearOperator.from_callable(
        matmat=lambda X: matrix @ X, shape=(60, 60), like=like
    )
    options = {"method": "hutchinson", "seed": 0, "block_size": 8, "probe": "gaussian"}
    with pytest.raises(lt.EstimateInterrupted) as caught:
        lt.trace(operator, num_matvecs=80, **options)
    partial = caught.value.partial
    assert partial is not None and partial.num_matvecs == 32  # four products were spent
    monkeypatch.setattr(_hutchinson, "column_inner", reduce)
    reference = lt.trace(operator, num_matvecs=24, **options)
    np.testing.assert_allclose(numpy_of(partial.value), numpy_of(reference.value), rtol=1e-12)


def test_an_interrupted_refine_gives_a_finished_partial_estimate(dense_backend):
    """Ctrl-C in a refine's third product: the partial estimate is finished as a whole
    one is (here the products of an operator of entries near 1e-250 were scaled by a
    power of two, which the partial must undo) and counts the first run's columns."""
    matrix = dense_backend.asarray(1e-250 * test_matrix("flat", 60, seed=0))
    like = dense_backend.asarray(np.zeros(1))
    operator = lt.LinearOperator.from_callable(
        matmat=lambda X: matrix @ X, shape=(60, 60), like=like
    )
    options = {"method": "hutchinson", "seed": 0, "block_size": 8}
    first = lt.diagonal(operator, num_matvecs=16, **options)
    interrupting = lt.LinearOperator.from_callable(
        matmat=_Interrupting(matrix, at=3), shape=(60, 60), like=like
    )
    with pytest.raises(lt.EstimateInterrupted) as caught:
        first.refine(interrupting, num_matvecs=32)
    partial = caught.value.partial
    assert partial is not None and partial.num_matvecs == 32  # 16 + two blocks of 8
    reference = first.refine(operator, num_matvecs=16)  # (a refine draws alike every time)
    np.testing.assert_allclose(numpy_of(partial.value), numpy_of(reference.value), rtol=1e-12)
    np.testing.assert_allclose(numpy_of(partial.stderr), numpy_of(reference.stderr), rtol=1e-12)


def test_an_interrupted_sketching_method_says_it_has_no_partial_estimate():
    operator = lt.LinearOperator.from_callable(
        matmat=_Interrupting(test_matrix("flat", 60, seed=0), at=2), shape=(60, 60)
    )
    with pytest.raises(lt.EstimateInterrupted, match="no partial estimate") as caught:
        lt.trace(operator, method="xtrace", num_matvecs=20, seed=0)
    assert caught.value.partial is None
