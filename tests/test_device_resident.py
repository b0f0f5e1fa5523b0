"""Estimates run where the operator lives: no host read during a fixed-budget estimate
(torch), one compiled program under JAX (``jit``, ``grad``, ``vmap``, transfer guard),
and probe blocks sized by the device's free memory.

These run on the CPU and stand guard for the GPU: a read of a tensor's value on the host
(``item``, ``float``, ``bool``, ``tolist``, ``cpu``, ``numpy``) is what makes a CUDA
stream wait, and under JAX a value that is not traced is what breaks ``jax.jit``.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from conftest import numpy_of

import linop_trace as lt
from linop_trace._testing import test_matrix

#: (quantity, method, tags) of every fixed-budget estimate checked here.
CASES = [
    ("trace", "exact", ()),
    ("trace", "hutchinson", ()),
    ("trace", "hutch++", ()),
    ("trace", "na-hutch++", ()),
    ("trace", "na-hutch++", ("symmetric",)),
    ("trace", "xtrace", ()),
    ("trace", "xnystrace", ("symmetric", "positive_semidefinite")),
    ("diagonal", "exact", ()),
    ("diagonal", "hutchinson", ()),
    ("diagonal", "diag++", ()),
    ("diagonal", "diag++", ("symmetric",)),
    ("diagonal", "xdiag", ()),
    ("diagonal", "xdiag", ("symmetric",)),
    # auto: exact on a stored matrix; on a callable, Hutchinson or XTrace chosen on the
    # device (XNysTrace or its fallback with the tag), XDiag for a diagonal
    ("trace", "auto", ()),
    ("trace", "auto", ("symmetric", "positive_semidefinite")),
    ("diagonal", "auto", ()),
]
#: Waits inside torch itself on a CUDA device: its eigendecomposition and SVD read their
#: LAPACK status on the host (XNysTrace, NA-Hutch++). No Python-level read
#: is ours; CUDA's detector is not applied to these two.
TORCH_CUDA_SYNCS = {"xnystrace": "torch.linalg.eigh", "na-hutch++": "torch.linalg.svd"}
#: n > 64: short Rademacher blocks (n <= 64) are checked for independence on the host.
SIZE = 100
BUDGET = 30


def _ids(case):
    quantity, method, tags = case
    return f"{quantity}-{method}" + ("-" + "-".join(tags) if tags else "")


# ------------------------------------------------------------------------ torch
READS = ("item", "__float__", "__int__", "__bool__", "__index__", "tolist", "cpu", "numpy")


@pytest.fixture
def no_host_reads():
    """A torch function mode that fails on every read of a tensor's value on the host."""
    torch = pytest.importorskip("torch")
    from torch.overrides import TorchFunctionMode

    forbidden = {getattr(torch.Tensor, name) for name in READS}

    class NoHostReads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in forbidden:
                raise AssertionError(f"host read of a tensor during an estimate: {func.__name__}")
            return func(*args, **(kwargs or {}))

    return NoHostReads


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def torch_device(request):
    """The CPU, and a CUDA device where there is one (the ``gpu`` subset)."""
    torch = pytest.importorskip("torch")
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device and torch sees none")
    return torch.device(request.param)


@pytest.fixture
def cuda_syncs_fail(torch_device):
    """On a CUDA device, also CUDA's own detector: every synchronizing call (including those
    inside torch's operations) raises while an estimate runs."""
    torch = pytest.importorskip("torch")
    if torch_device.type != "cuda":
        return contextlib.nullcontext

    @contextlib.contextmanager
    def detector():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")

    return detector


def _torch_operator(tags, kind="dense", device="cpu"):
    torch = pytest.importorskip("torch")
    A = torch.from_numpy(test_matrix("poly", SIZE, seed=0)).to(device)
    if kind == "dense":
        return lt.aslinearoperator(A, tags=tags), A
    return (
        lt.LinearOperator.from_callable(
            matmat=lambda X: A @ X, rmatmat=lambda X: A.T @ X, shape=A.shape, like=A, tags=tags
        ),
        A,
    )


@pytest.mark.parametrize("kind", ["dense", "callable"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_torch_fixed_budget_estimate_reads_nothing_on_the_host(
    no_host_reads, cuda_syncs_fail, torch_device, case, kind, monkeypatch
):
    quantity, method, tags = case
    if method == "auto":  # on a CPU auto reads its choice (free there): the GPU's path
        from linop_trace.estimators import _auto

        monkeypatch.setattr(_auto, "_chooses_on_host", lambda request, products: False)
    operator, A = _torch_operator(tags, kind, torch_device)
    function = getattr(lt, quantity)
    function(operator, method=method, num_matvecs=BUDGET, seed=0).value  # noqa: B018 - warm-up
    detector = cuda_syncs_fail if method not in TORCH_CUDA_SYNCS else contextlib.nullcontext
    with no_host_reads(), detector():
        estimate = function(operator, method=method, num_matvecs=BUDGET, seed=0)
    # read afterwards: the checks run, the numbers are those of an estimate
    assert estimate.value.device == A.device
    A = A.cpu()
    reference = np.trace(A.numpy()) if quantity == "trace" else np.diag(A.numpy())
    value = numpy_of(estimate.value)
    assert value.shape == np.shape(reference)
    assert np.all(np.isfinite(value)) and estimate.num_matvecs <= BUDGET or method == "exact"
    if estimate.stderr is not None and method != "exact":
        assert np.all(numpy_of(estimate.stderr) >= 0)


def test_the_guard_catches_a_host_read(no_host_reads):
    """The mode fails on the reads a careless estimator makes (so the test above can fail)."""
    torch = pytest.importorskip("torch")

    class Careless(lt.Estimator):
        name = "careless"

        def trace(self, request):
            Z = request.probes(4)
            value = float(request.xp.sum(Z * request.matmat(Z)) / 4)  # a host read
            return lt.Estimate(torch.tensor(value), None, request.columns, self.name)

    operator, _ = _torch_operator(())
    with pytest.raises(AssertionError, match="host read of a tensor"):
        with no_host_reads():
            lt.trace(operator, method=Careless(), num_matvecs=4, seed=0)


def test_torch_non_finite_product_raises_when_read(no_host_reads):
    """check_finite costs no host read: the flag stays on the device and the estimate
    raises when it is first read."""
    torch = pytest.importorskip("torch")
    A = torch.eye(SIZE, dtype=torch.float64)
    A[3, 4] = float("nan")
    operator = lt.LinearOperator.from_callable(matmat=lambda X: A @ X, shape=A.shape, like=A)
    with no_host_reads():
        estimate = lt.trace(operator, method="hutchinson", num_matvecs=10, seed=0)
    with pytest.raises(FloatingPointError, match="non-finite.*check_finite=False"):
        estimate.value  # noqa: B018
    with pytest.raises(FloatingPointError, match="non-finite"):
        float(estimate)
    quiet = lt.trace(operator, method="hutchinson", num_matvecs=10, seed=0, check_finite=False)
    assert not np.isfinite(float(quiet))


def test_torch_xnystrace_not_psd_raises_when_read(no_host_reads):
    torch = pytest.importorskip("torch")
    A = torch.from_numpy(test_matrix("flat", SIZE, seed=0) - 2.0 * np.eye(SIZE))
    with no_host_reads():
        estimate = lt.trace(A, method="xnystrace", num_matvecs=BUDGET, seed=0)
    with pytest.raises(ValueError, match="positive semidefinite.*xtrace"):
        estimate.ci()


def test_estimate_reads_dof_and_shape_lazily(no_host_reads):
    """dof, skewness and kurtosis stay device arrays until asked for, then are numbers."""
    torch = pytest.importorskip("torch")
    operator, _ = _torch_operator(())
    with no_host_reads():
        xtrace = lt.trace(operator, method="xtrace", num_matvecs=BUDGET, seed=0)
        hutchinson = lt.trace(operator, method="hutchinson", num_matvecs=BUDGET, seed=0)
    assert isinstance(xtrace._dof, torch.Tensor) and isinstance(xtrace.dof, int)
    assert 2 <= xtrace.dof <= BUDGET // 2 - 1
    assert isinstance(hutchinson.skewness, float) and hutchinson.dof == BUDGET - 1


# -------------------------------------------------------------------------- JAX
@pytest.fixture(params=["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def jax_setup(request):
    """JAX with its arrays on the CPU, and on a GPU where there is one (``gpu`` subset)."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    try:
        devices = jax.devices(request.param)
    except RuntimeError:
        devices = []
    if not devices:
        pytest.skip(f"needs a JAX {request.param} device")
    with jax.default_device(devices[0]):
        yield jax, jnp


def _jax_matrix(jnp, tags):
    return jnp.asarray(test_matrix("poly", SIZE, seed=0))


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_jax_whole_estimate_compiles_and_runs_under_the_transfer_guard(jax_setup, case):
    """``jax.jit`` of a whole estimate agrees with the plain call, and the plain call runs
    with no implicit host-to-device transfer (a Python number shipped to the device) and
    no read on the host: it is one compiled program."""
    jax, jnp = jax_setup
    quantity, method, tags = case
    function = getattr(lt, quantity)
    A = _jax_matrix(jnp, tags)
    key = jax.random.key(3)

    def estimate(matrix, key):
        operator = lt.aslinearoperator(matrix, tags=tags)
        return function(operator, method=method, num_matvecs=BUDGET, seed=key)

    estimate(A, key)  # compiled once
    with jax.transfer_guard("disallow"):
        eager = estimate(A, key)
    compiled = jax.jit(lambda matrix, key: estimate(matrix, key).value)(A, key)
    np.testing.assert_allclose(numpy_of(compiled), numpy_of(eager.value), rtol=1e-12, atol=1e-14)
    if eager.stderr is not None:
        stderr = jax.jit(lambda matrix, key: estimate(matrix, key).stderr)(A, key)
        np.testing.assert_allclose(numpy_of(stderr), numpy_of(eager.stderr), rtol=1e-10)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_jax_estimate_over_uncompiled_functions_ships_nothing_to_the_device(jax_setup, case):
    """An operator known by plain Python functions runs eagerly (its functions may close
    over arrays that change), each step of the method a dispatch of its own. Those steps
    shipped Python numbers to the device (an index of each slice of the product, ``eye``'s
    offset, ``zeros``' fill, a ``/ 2``): under ``jax.transfer_guard("disallow")`` Hutch++,
    NA-Hutch++, XNysTrace, Diag++ and the exact walk raised. (n = 100: Rademacher blocks
    of up to 64 rows are read on the host, to redraw dependent ones.)"""
    jax, jnp = jax_setup
    quantity, method, tags = case
    matrix = jnp.asarray(test_matrix("poly", SIZE, seed=0))
    A = lt.LinearOperator.from_callable(
        matmat=lambda X: matrix @ X,
        rmatmat=lambda X: matrix.T @ X,
        shape=matrix.shape,
        like=matrix,
        tags=tags,
    )
    function = getattr(lt, quantity)
    first = function(A, method=method, num_matvecs=BUDGET, seed=3)  # (compiles its steps)
    with jax.transfer_guard("disallow"):
        estimate = function(A, method=method, num_matvecs=BUDGET, seed=3)
        value, stderr = estimate.value, estimate.stderr
    np.testing.assert_array_equal(numpy_of(value), numpy_of(first.value))
    np.testing.assert_array_equal(numpy_of(stderr), numpy_of(first.stderr))
    if method not in ("auto", "exact"):  # (a stored matrix: auto reads its diagonal)
        tagged = lt.aslinearoperator(matrix, tags=tags)  # (compiled as one program)
        compiled = function(tagged, method=method, num_matvecs=BUDGET, seed=3)
        np.testing.assert_allclose(numpy_of(value), numpy_of(compiled.value), rtol=1e-9)
    elif method == "exact":
        expected = jnp.trace(matrix) if quantity == "trace" else jnp.diagonal(matrix)
        np.testing.assert_allclose(numpy_of(value), numpy_of(expected), rtol=1e-13)


@pytest.mark.parametrize("block_size", [30, 100])
def test_jax_exact_walk_over_uncompiled_functions_in_blocks(jax_setup, block_size):
    """The exact diagonal of an operator known by functions walks the identity in blocks
    (30, 30, 30 and the last 10 columns here): each block is the last one shifted down,
    made on the device, and its diagonal is read where the block has its ones."""
    jax, jnp = jax_setup
    values = test_matrix("poly", SIZE, seed=0) + np.triu(np.ones((SIZE, SIZE)), 1)
    matrix = jnp.asarray(values)
    A = lt.LinearOperator.from_callable(
        matmat=lambda X: matrix @ X, shape=values.shape, like=matrix
    )
    lt.diagonal(A, method="exact", block_size=block_size)
    with jax.transfer_guard("disallow"):
        estimate = lt.diagonal(A, method="exact", block_size=block_size)
        value = estimate.value
    np.testing.assert_allclose(numpy_of(value), np.diagonal(values), rtol=1e-14, atol=1e-16)
    assert estimate.num_matvecs == SIZE


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_jax_compiled_estimate_raises_on_a_non_finite_product(jax_setup, case):
    """Inside the one compiled program the finiteness check of a product rides on the
    samples it flows into (Hutchinson-type methods, so that XLA fuses the product with
    their sum) or on the product itself (the rest): either way a NaN in one entry of A
    raises when the estimate is read, and ``check_finite=False`` returns it. (The exact
    methods, and auto on a stored matrix, read the stored diagonal; XNysTrace's check of
    its product runs before its own, which would blame an overflow of the Gram matrix.)"""
    jax, jnp = jax_setup
    quantity, method, tags = case
    values = test_matrix("poly", SIZE, seed=0)
    values[7, 7] = np.nan  # symmetric still, so tagged operators stay honest
    operator = lt.aslinearoperator(jnp.asarray(values), tags=tags)
    function = getattr(lt, quantity)
    estimate = function(operator, method=method, num_matvecs=BUDGET, seed=0)
    message = {
        "exact": "diagonal holds non-finite",
        "auto": "diagonal holds non-finite",  # (exact: the matrix stores its diagonal)
    }.get(method, "non-finite.*check_finite=False")
    with pytest.raises(FloatingPointError, match=message):
        estimate.value  # noqa: B018
    # a function that returns only the value has no check to run after it: the value read
    # inside the trace is NaN where a check failed (it was the raw estimate)
    traced = jax.jit(
        lambda matrix: (
            function(
                lt.aslinearoperator(matrix, tags=tags), method=method, num_matvecs=BUDGET, seed=0
            ).value
        )
    )(jnp.asarray(values))
    assert np.all(np.isnan(numpy_of(traced)))
    if method in ("exact", "auto", "xnystrace"):
        return
    quiet = function(operator, method=method, num_matvecs=BUDGET, seed=0, check_finite=False)
    assert not np.all(np.isfinite(numpy_of(quiet.value)))


def test_jax_one_compiled_program_per_shape(jax_setup):
    """New operators of the same shapes reuse the compiled estimate (the matrix is an
    argument of the program, not a constant baked into it)."""
    jax, jnp = jax_setup
    from linop_trace import _backend, _functions

    key = jax.random.key(0)
    first = jnp.asarray(test_matrix("flat", SIZE, seed=0))
    lt.trace(first, method="hutchinson", num_matvecs=BUDGET, seed=key)
    program = _backend.compiled(_functions._compiled_run, num_static=4)
    before = program._cache_size()
    for seed in range(3):
        other = jnp.asarray(test_matrix("poly", SIZE, seed=seed))
        lt.trace(other, method="hutchinson", num_matvecs=BUDGET, seed=jax.random.key(seed))
    assert program._cache_size() == before


def test_jax_integer_seed_is_passed_as_its_kept_key(jax_setup):
    """An integer seed reaches the compiled estimate as ``jax.random.key(seed)``, made once
    per seed (a NumPy integer argument takes JAX's slower Python dispatch): the same key
    object on every call, the estimate that key gives bit for bit, and one program."""
    jax, jnp = jax_setup
    from linop_trace import _backend, _functions

    A = jnp.asarray(test_matrix("flat", SIZE, seed=3))
    argument, is_key = _backend.jax_seed(7)
    assert is_key
    assert _backend.jax_seed(7)[0] is argument
    assert np.array_equal(jax.random.key_data(argument), jax.random.key_data(jax.random.key(7)))
    by_int = lt.trace(A, method="xtrace", num_matvecs=BUDGET, seed=7)
    program = _backend.compiled(_functions._compiled_run, num_static=4)
    size = program._cache_size()
    by_key = lt.trace(A, method="xtrace", num_matvecs=BUDGET, seed=jax.random.key(7))
    assert float(by_int.value) == float(by_key.value)
    assert float(by_int.stderr) == float(by_key.stderr)
    assert program._cache_size() == size  # the key path: the same program
    assert float(lt.trace(A, method="xtrace", num_matvecs=BUDGET, seed=8).value) != float(
        by_int.value
    )


def test_jax_keys_of_another_default_implementation(jax_setup):
    """With ``jax_default_prng_impl`` set to ``rbg`` (or ``unsafe_rbg``), integer seeds and
    keys of that implementation draw through jax.random, and a threefry key draws what it
    draws under the default threefry. The compiled draws took the default implementation
    at their first call for threefry: a process whose default was rbg failed every
    estimate (a TypeError on the key's data), and a threefry key gave another estimate
    there (found by a review)."""
    jax, jnp = jax_setup
    from linop_trace._backend import _random

    A = jnp.asarray(test_matrix("flat", SIZE, seed=3))
    options = {"method": "xtrace", "num_matvecs": BUDGET}
    threefry = float(lt.trace(A, seed=jax.random.key(4, impl="threefry2x32"), **options))
    default = str(jax.config.jax_default_prng_impl)
    try:
        for impl in ("rbg", "unsafe_rbg"):
            jax.config.update("jax_default_prng_impl", impl)
            _random._jax_programs.cache_clear()  # (their first call: a fresh process's)
            by_int = lt.trace(A, seed=4, **options)
            by_key = lt.trace(A, seed=jax.random.key(4), **options)
            assert float(by_int) == float(by_key)
            assert np.isfinite(float(by_int))
            again = lt.trace(A, seed=jax.random.key(4, impl="threefry2x32"), **options)
            assert float(again) == threefry
    finally:
        jax.config.update("jax_default_prng_impl", default)
        _random._jax_programs.cache_clear()


def test_jax_integer_seed_keys_follow_64_bit_mode(jax_setup):
    """An integer seed's key is kept per seed, PRNG implementation, device and 64-bit
    mode: with x64 off JAX keeps a seed's low 32 bits, and a key kept from a call with it
    on came back after it was turned off (another estimate than a fresh process gives;
    found by a review)."""
    jax, jnp = jax_setup
    A = jnp.asarray(test_matrix("flat", SIZE, seed=3), dtype=jnp.float32)
    seed = 2**40 + 5
    options = {"method": "hutchinson", "num_matvecs": BUDGET}
    float(lt.trace(A, seed=seed, **options))  # (x64 on: its key is kept)
    try:
        jax.config.update("jax_enable_x64", False)
        narrow = jnp.asarray(test_matrix("flat", SIZE, seed=3), dtype=jnp.float32)
        by_int = float(lt.trace(narrow, seed=seed, **options))
        by_key = float(lt.trace(narrow, seed=jax.random.key(seed), **options))
    finally:
        jax.config.update("jax_enable_x64", True)
    assert by_int == by_key


def test_an_estimator_changed_in_place_gets_a_new_plan():
    """Plans and repeated calls are keyed by an estimator's settings, not the object:
    after ``est.probe = "gaussian"`` the next call drew Rademacher probes still, both
    by the repeat shortcut and by the kept plan (found by a review)."""
    from linop_trace.estimators import Hutchinson

    A = test_matrix("flat", SIZE, seed=3)
    estimator = Hutchinson()
    first = lt.trace(A, method=estimator, num_matvecs=BUDGET, seed=2)
    estimator.probe = "gaussian"
    changed = lt.trace(A, method=estimator, num_matvecs=BUDGET, seed=2)
    fresh = lt.trace(A, method=Hutchinson(probe="gaussian"), num_matvecs=BUDGET, seed=2)
    assert changed.info["probe"] == "gaussian" == fresh.info["probe"]
    assert float(changed) == float(fresh) != float(first)


def test_jax_seeds_of_a_loop_get_their_keys_made_in_a_batch(jax_setup):
    """Seeds in a loop (a constant stride, three calls running) get their next keys made
    in one program (a fresh key per estimate cost 110 us of an n = 512 estimate's 380:
    the key's own dispatch and the estimate's wait for it): the keys ``jax.random.key``
    makes, the estimates those keys give bit for bit; seeds out of step make one key each;
    keys made inside a trace are not kept."""
    jax, jnp = jax_setup
    from linop_trace._backend import _random

    _random._JAX_KEYS.clear()
    _random._RECENT_SEEDS.clear()
    for seed in (3, 1000, 7, 12):  # out of step: a key each
        _random._jax_key(seed)
    assert len(_random._JAX_KEYS) == 4
    _random._jax_key(17)  # 7, 12, 17: a loop with stride 5
    batch = _random.JAX_KEY_BATCH
    assert len(_random._JAX_KEYS) == 4 + batch
    seeds = [17 + 5 * i for i in range(batch)]
    made = jnp.stack([jax.random.key_data(_random._jax_key(seed)) for seed in seeds])
    expected = jnp.stack([jax.random.key_data(jax.random.key(seed)) for seed in seeds])
    assert np.array_equal(numpy_of(made), numpy_of(expected))
    assert _random._jax_key(22) is _random._jax_key(22)
    A = jnp.asarray(test_matrix("flat", SIZE, seed=4))
    for seed in range(40, 44):  # the loop of a user: the estimates of the seeds' keys
        by_int = lt.trace(A, method="xtrace", num_matvecs=BUDGET, seed=seed)
        by_key = lt.trace(A, method="xtrace", num_matvecs=BUDGET, seed=jax.random.key(seed))
        assert float(by_int.value) == float(by_key.value)
    batched = [slot for slot in _random._JAX_KEYS if slot[0] in range(42, 42 + batch)]
    assert len(batched) == batch  # (40, 41, 42: a batch from 42)
    for seed in range(10**6, 10**6 + 5 * batch):  # the most recently made are kept
        _random._jax_key(seed)
    assert len(_random._JAX_KEYS) == _random.JAX_KEYS_KEPT
    assert (10**6 + 5 * batch - 1) in {slot[0] for slot in _random._JAX_KEYS}
    kept = dict(_random._JAX_KEYS)
    _random._RECENT_SEEDS[:] = [2**40, 2**40 + 1]
    jax.jit(lambda x: x + jax.random.normal(_random._jax_key(2**40 + 2), ()))(1.0)
    assert _random._JAX_KEYS == kept


def test_jax_traced_intervals_and_tolerances_are_refused_not_approximated(jax_setup):
    """Inside jax.jit the interval's degrees of freedom and the samples' shape have no
    values: quantile() fell back to the normal quantile (XTrace: 1.96 for 2.57, 24%
    narrower) and rtol stopped after the first round (4 products, converged=False, a
    value 30 for 0.8); both now raise. Outside, the Estimate the function returns gives
    the eager interval."""
    jax, jnp = jax_setup
    A = jnp.asarray(test_matrix("poly", SIZE, seed=0))
    key = jax.random.key(2)

    def run(matrix, key):
        return lt.trace(matrix, method="xtrace", num_matvecs=BUDGET, seed=key)

    with pytest.raises(ValueError, match="JAX transformation"):
        jax.jit(lambda matrix, key: run(matrix, key).quantile())(A, key)
    returned = jax.jit(run)(A, key)
    assert returned.quantile() == pytest.approx(run(A, key).quantile(), rel=1e-12)
    assert returned.ci() == pytest.approx(run(A, key).ci(), rel=1e-10)
    for method in ("hutchinson", "hutch++"):
        with pytest.raises(ValueError, match="rtol/atol"):
            jax.jit(lambda matrix, m=method: lt.trace(matrix, method=m, rtol=0.05, seed=key).value)(
                A
            )
    with pytest.raises(ValueError, match="rtol/atol"):
        jax.jit(lambda matrix: lt.diagonal(matrix, method="hutchinson", rtol=0.05).value)(A)
    with pytest.raises(ValueError, match="JAX transformation"):
        jax.jit(lambda m: lt.trace(m, method="hutchinson", num_matvecs=BUDGET, seed=key))(A).refine(
            A, num_matvecs=BUDGET
        )


@pytest.mark.parametrize("form", ["array", "functions"])
def test_jax_row_and_column_sums_make_their_ones_on_the_device(jax_setup, form):
    """``row_sums``/``col_sums`` of a JAX array shipped their column of ones (its fill
    value) from the host: under ``jax.transfer_guard("disallow")`` they raised. So did
    those of an operator known by its functions (run eagerly, not compiled)."""
    jax, jnp = jax_setup
    values = test_matrix("poly", SIZE, seed=0) + np.triu(np.ones((SIZE, SIZE)))
    A = matrix = jnp.asarray(values)
    if form == "functions":
        A = lt.LinearOperator.from_callable(
            matmat=lambda X: matrix @ X,
            rmatmat=lambda X: matrix.T @ X,
            shape=values.shape,
            like=matrix,
        )
    lt.row_sums(A), lt.col_sums(A)  # compiled once
    with jax.transfer_guard("disallow"):
        rows, cols = lt.row_sums(A), lt.col_sums(A)
    np.testing.assert_allclose(numpy_of(rows.value), values.sum(axis=1), rtol=1e-13)
    np.testing.assert_allclose(numpy_of(cols.value), values.sum(axis=0), rtol=1e-13)
    assert rows.num_matvecs == cols.num_matvecs == 1
    assert not np.any(numpy_of(rows.stderr))


def test_jax_estimate_returned_from_jit_keeps_its_confidence(jax_setup):
    """The level ``ci()`` uses by default is the call's ``confidence``, through ``jax.jit``
    (the Estimate's pytree) as eagerly."""
    jax, jnp = jax_setup
    A = jnp.asarray(test_matrix("poly", SIZE, seed=0))
    key = jax.random.key(2)
    run = jax.jit(
        lambda matrix, key: lt.trace(
            matrix, method="hutchinson", num_matvecs=BUDGET, seed=key, confidence=0.99
        )
    )
    returned = run(A, key)
    assert returned.confidence == 0.99
    assert returned.ci() == returned.ci(0.99) != returned.ci(0.95)


def test_jax_auto_estimates_pickle_and_keep_their_shape(jax_setup):
    """A compiled ``auto`` trace (its choice made on the device) leaked tracers through
    ``info["auto"]``, a dict of arrays kept in the Estimate's static part: pickle and
    deepcopy failed. A Hermitian operator's compiled auto estimate lost its samples'
    skewness (the choice's estimates stayed complex), so its interval was the eager one's
    without the shape correction."""
    import copy
    import pickle

    jax, jnp = jax_setup
    rng = np.random.default_rng(0)
    C = rng.standard_normal((60, 60)) + 1j * rng.standard_normal((60, 60))
    for values, tags in [(np.diag(np.arange(1.0, 61.0)), ()), (C + C.conj().T, ("hermitian",))]:
        A = jnp.asarray(values)
        estimates = []
        for matmat in (jax.jit(lambda X, A=A: A @ X), lambda X, A=A: A @ X):
            op = lt.LinearOperator.from_callable(matmat=matmat, shape=(60, 60), like=A, tags=tags)
            estimates.append(lt.trace(op, method="auto", num_matvecs=30, seed=0))
        compiled, eager = estimates
        assert compiled.method == eager.method
        assert not any(_is_tracer(value) for value in compiled.info["auto"].values())
        np.testing.assert_allclose(compiled.ci(), eager.ci(), rtol=1e-9)
        # the shape correction is there (None before), equal to the eager one up to the
        # compiled program's rounding: identical on JAX 0.10, 1.7e-9 relative on JAX 0.6.2
        # (the Python 3.10 session), a third moment amplifying the rounding
        assert compiled.skewness is not None
        assert compiled.skewness == pytest.approx(eager.skewness, rel=1e-6)
        for duplicate in (copy.deepcopy(compiled), pickle.loads(pickle.dumps(compiled))):
            assert float(duplicate) == float(compiled)


def _is_tracer(value):
    from linop_trace import _backend

    return _backend.is_tracer(value)


def test_jax_integer_array_seed_is_the_int_seed(jax_setup):
    """A 0-d integer JAX array (a jit argument, a vmapped seed) is the seed it holds, as a
    Python int is; it was taken as key data and refused."""
    jax, jnp = jax_setup
    A = jnp.asarray(test_matrix("flat", SIZE, seed=1))

    def hutchinson(seed):
        return lt.trace(A, method="xtrace", num_matvecs=BUDGET, seed=seed).value

    expected = [float(hutchinson(seed)) for seed in range(3)]
    assert float(hutchinson(jnp.asarray(1))) == pytest.approx(expected[1], rel=1e-12)
    assert float(jax.jit(hutchinson)(2)) == pytest.approx(expected[2], rel=1e-12)
    np.testing.assert_allclose(numpy_of(jax.vmap(hutchinson)(jnp.arange(3))), expected, rtol=1e-12)
    with pytest.raises(TypeError, match="0-d integer"):
        hutchinson(jnp.ones(3))


def test_jax_grad_and_vmap_through_an_estimate(jax_setup):
    jax, jnp = jax_setup
    A = jnp.asarray(test_matrix("flat", SIZE, seed=1))
    key = jax.random.key(5)

    def hutchinson(matrix):
        return lt.trace(matrix, method="hutchinson", num_matvecs=BUDGET, seed=key).value

    # the gradient of mean_j z_j^T A z_j is mean_j z_j z_j^T: its trace is n (Rademacher)
    gradient = jax.grad(hutchinson)(A)
    assert gradient.shape == A.shape
    assert float(jnp.trace(gradient)) == pytest.approx(SIZE, rel=1e-12)
    # vmap over a batch of matrices: each the estimate of its own matrix, same probes
    batch = jnp.stack([A, 2.0 * A])
    values = jax.vmap(hutchinson)(batch)
    np.testing.assert_allclose(numpy_of(values), [float(hutchinson(A)), 2 * float(hutchinson(A))])


def test_jax_vmap_returns_estimates_whose_checks_read(jax_setup):
    """``jax.vmap`` of a function that returns the Estimate itself gives a batch of
    estimates: reading its value runs the checks of every member (their flags batched).
    That read raised "The truth value of an array with more than one element is
    ambiguous" for every method; now the batch reads, and a failed member raises its own
    error, with its own evidence."""
    jax, jnp = jax_setup
    keys = jax.random.split(jax.random.key(0), 3)
    A = jnp.asarray(test_matrix("flat", SIZE, seed=1))
    batch = jax.vmap(lambda k: lt.trace(A, method="hutchinson", num_matvecs=BUDGET, seed=k))(keys)
    expected = [
        float(lt.trace(A, method="hutchinson", num_matvecs=BUDGET, seed=k).value) for k in keys
    ]
    np.testing.assert_allclose(numpy_of(batch.value), expected, rtol=1e-12)
    indefinite = np.diag(np.linspace(1.0, 2.0, SIZE))
    indefinite[0, 0] = -50.0  # (some probes see z^H A z < 0)
    M = jnp.asarray(indefinite)
    batch = jax.vmap(lambda k: lt.trace(M, method="xnystrace", num_matvecs=BUDGET, seed=k))(keys)
    with pytest.raises(ValueError, match=r"z\^H A z = -[0-9.e+]+ < 0"):
        batch.value  # noqa: B018


@pytest.mark.parametrize(
    "quantity, method, tags",
    [
        ("trace", "hutchinson", ("symmetric",)),
        ("trace", "hutch++", ("symmetric",)),
        ("trace", "na-hutch++", ("symmetric",)),
        ("trace", "xtrace", ("symmetric",)),
        ("trace", "xnystrace", ("symmetric", "positive_semidefinite")),
        ("trace", "auto", ("symmetric",)),
        ("trace", "auto", ("symmetric", "positive_semidefinite")),
        ("diagonal", "hutchinson", ("symmetric",)),
        ("diagonal", "diag++", ("symmetric",)),
        ("diagonal", "xdiag", ("symmetric",)),
        ("diagonal", "auto", ("symmetric",)),
    ],
)
def test_jax_estimate_tree_keeps_its_structure_when_rebuilt(jax_setup, quantity, method, tags):
    """An Estimate rebuilt from other leaves flattens to the same structure. Its dof and
    info entries were children where they were arrays and static where they were not, so
    a rebuilt tree changed its structure: JAX 0.6's ``vmap`` (which rebuilds its output
    from placeholder leaves) could not return an Estimate at all, nor could a user's
    ``tree_map`` to numbers be flattened back to the same structure."""
    jax, jnp = jax_setup
    A = jnp.asarray(test_matrix("flat", SIZE, seed=1))
    operator = lt.LinearOperator.from_callable(
        matmat=lambda X: A @ X, shape=A.shape, like=A, tags=tags
    )  # (products only: auto estimates)
    estimate = getattr(lt, quantity)(operator, method=method, num_matvecs=BUDGET, seed=0)
    leaves, structure = jax.tree_util.tree_flatten(estimate)
    for stand_in in (object(), 0.0):
        rebuilt = structure.unflatten([stand_in] * len(leaves))
        assert jax.tree_util.tree_structure(rebuilt) == structure
    mapped = jax.tree_util.tree_map(lambda x: 1, estimate)
    assert jax.tree_util.tree_structure(mapped) == structure


def test_jax_vmap_of_auto_names_each_members_choice(jax_setup):
    """``jax.vmap`` of ``auto`` returning the Estimate: each member chooses on the device.
    Reading the batch read one member's choice as if it were all of them' ("truth value
    of an array ... ambiguous"). Now each member's value and stderr are its own eager
    estimate's; where the members chose differently the batch keeps the name "auto" and
    ``info["methods"]`` names each one's method."""
    jax, jnp = jax_setup
    A = jnp.asarray(test_matrix("flat", 40, seed=1))
    operator = lt.LinearOperator.from_callable(matmat=lambda X: A @ X, shape=A.shape, like=A)
    keys = jax.random.split(jax.random.key(0), 8)
    batch = jax.vmap(lambda k: lt.trace(operator, num_matvecs=12, seed=k))(keys)
    eager = [lt.trace(operator, num_matvecs=12, seed=k) for k in keys]
    methods = [estimate.method for estimate in eager]
    assert len(set(methods)) == 2  # (this seed's keys: both methods chosen)
    np.testing.assert_allclose(
        numpy_of(batch.value), [float(e.value) for e in eager], rtol=1e-12, atol=1e-12
    )
    np.testing.assert_allclose(
        numpy_of(batch.stderr), [float(e.stderr) for e in eager], rtol=1e-12, atol=1e-12
    )
    assert batch.method == "auto" and batch.info["methods"] == methods
    same = jax.vmap(lambda k: lt.trace(operator, num_matvecs=12, seed=k))(keys[1:3])
    assert same.method == methods[1] == methods[2]  # (one choice: its name)
    indefinite = np.diag(np.linspace(1.0, 2.0, 40))
    indefinite[0, 0] = -50.0  # (tagged PSD: XNysTrace's check fails, Hutchinson's stands)
    M = jnp.asarray(indefinite)
    tagged = lt.LinearOperator.from_callable(
        matmat=lambda X: M @ X, shape=M.shape, like=M, tags=("symmetric", "positive_semidefinite")
    )
    batch = jax.vmap(lambda k: lt.trace(tagged, num_matvecs=12, seed=k))(keys)
    with pytest.warns(RuntimeWarning, match="in 8 of 8 members of the batch"):
        batch.value  # noqa: B018
    assert batch.method == "hutchinson"


def test_jax_auto_on_a_stored_matrix_is_one_compiled_exact_program(jax_setup, monkeypatch):
    """``auto`` reads a stored matrix's diagonal: that branch is taken once per plan, ahead
    of the run, so the estimate is the compiled program of ``exact`` (one dispatch, not
    auto's eager run of a dozen operations: 250 against 60 us at n = 512), the same
    estimate; an operator known by a callable still runs ``auto`` (it estimates)."""
    jax, jnp = jax_setup
    from linop_trace import _backend, _functions
    from linop_trace._backend import _compiled
    from linop_trace.estimators._auto import Auto

    decided = []
    original = Auto.uses_exact
    monkeypatch.setattr(Auto, "uses_exact", lambda self, r: decided.append(1) or original(self, r))
    monkeypatch.setattr(_functions, "_RECENT_SETTINGS", [])
    monkeypatch.setattr(_backend, "free_memory", lambda xp, device: 10**12)  # (part of the key)
    A = jnp.asarray(test_matrix("flat", 37, seed=0))
    estimates = [lt.trace(A), lt.trace(A, seed=3), lt.diagonal(A)]
    assert decided == [1, 1]  # once per plan: trace, then diagonal
    from linop_trace.estimators._exact import Exact

    compiled_exact = [
        key
        for key in _compiled._FLAT_PROGRAMS
        if key[0] is _functions._compiled_run and isinstance(key[1][0], Exact)
    ]
    assert len(compiled_exact) >= 2  # trace, diagonal
    for estimate in estimates[:2]:
        assert estimate.method == "exact" and float(estimate.stderr) == 0.0
        assert float(estimate.value) == pytest.approx(float(jnp.trace(A)), rel=1e-13)
    np.testing.assert_array_equal(np.asarray(estimates[2].value), np.asarray(jnp.diagonal(A)))
    callable_only = lt.LinearOperator.from_callable(matmat=lambda X: A @ X, shape=A.shape, like=A)
    assert lt.trace(callable_only, num_matvecs=10, seed=0).method in ("hutchinson", "xtrace")


def test_jax_repeated_call_goes_straight_to_its_program(jax_setup, monkeypatch):
    """The same compiled estimate again (same object, method, options) skips the full
    path (operator, settings key, plan) and runs the recorded program: the same estimate
    as the full path, a new seed a new one. Anything the full path's key holds that
    changed sends the call down the full path again: another object (but a JAX array of
    the same layout), option or method, the estimator a name stands for, JAX's product
    precision, the free memory. The record keeps no array alive."""
    jax, jnp = jax_setup
    import gc
    import weakref

    from linop_trace import _functions
    from linop_trace.estimators import Hutchinson

    full_path = []
    original = _functions._settings_key
    monkeypatch.setattr(
        _functions, "_settings_key", lambda *args: full_path.append(1) or original(*args)
    )
    monkeypatch.setattr(_functions, "_LAST_CALLS", {})
    # the free memory is part of what a repeat must match (block sizes follow it); the
    # host's figure moves with other processes (pytest's other worker), which sent a
    # repeat down the full path now and then: fixed here, changed on purpose below
    monkeypatch.setattr(_functions.backend, "free_memory", lambda xp, device: 2**34)
    A = jnp.asarray(test_matrix("flat", SIZE, seed=0))
    stored = lt.aslinearoperator(A)

    def run(X, method="hutchinson", num_matvecs=8, seed=1):
        """The estimate, and whether it took the full path."""
        before = len(full_path)
        estimate = lt.trace(X, method=method, num_matvecs=num_matvecs, seed=seed)
        return estimate, len(full_path) - before

    for given in (A, stored):
        first, ran = run(given)
        assert ran == 1
        again, ran = run(given)
        assert ran == 0 and float(again.value) == float(first.value)
        other, ran = run(given, seed=2)
        assert ran == 0 and float(other.value) != float(first.value)
        _functions._LAST_CALLS.clear()  # the full path's estimate, for that seed
        fresh, ran = run(given, seed=2)
        assert ran == 1 and float(fresh.value) == float(other.value)
        refined = other.refine(given, num_matvecs=8)  # refinable as the full path's
        assert refined.num_matvecs == 16
    # another JAX array of the same layout (type, shape, dtype, weak typing, sharding):
    # the same program, the estimate of that array as the full path gives it
    B = jnp.asarray(test_matrix("poly", SIZE, seed=0))
    run(A)
    repeated, ran = run(B)
    assert ran == 0
    _functions._LAST_CALLS.clear()
    assert float(run(B)[0].value) == float(repeated.value) != float(run(A)[0].value)
    for layout in (A[:-1, :-1], A.astype(jnp.float32), jnp.full(A.shape, 1.0)):
        run(A)
        assert run(layout)[1] == 1  # another shape, dtype, weak type
    run(stored)
    assert run(lt.aslinearoperator(B))[1] == 1  # another operator object
    assert run(A, num_matvecs=10)[1] == 1  # an option
    assert run(A, method="xtrace", num_matvecs=10)[1] == 1  # the method
    run(A)
    with jax.default_matmul_precision("bfloat16"):  # the products' precision
        assert run(A)[1] == 1
    assert run(A)[1] == 1
    monkeypatch.setattr(_functions.backend, "free_memory", lambda xp, device: 2**20)
    narrow, ran = run(A)  # the free memory (block sizes follow it)
    assert ran == 1 and float(narrow.value) == pytest.approx(float(first.value), rel=1e-12)
    lt.register_estimator("repeat-test", Hutchinson(probe="gaussian"))
    try:
        run(A, method="repeat-test")
        lt.register_estimator("repeat-test", Hutchinson(probe="sphere"), overwrite=True)
        sphere, ran = run(A, method="repeat-test")  # what the name stands for
        assert ran == 1 and sphere.info["probe"] == "sphere"
    finally:
        from linop_trace.estimators import _registry

        _registry._REGISTRY.pop("repeat-test", None)
    for as_operator in (False, True):  # an array, an operator (whose arrays it keeps)
        B = jnp.asarray(test_matrix("flat", SIZE, seed=1))
        gone = weakref.ref(B)
        given = lt.aslinearoperator(B) if as_operator else B
        lt.trace(given, method="hutchinson", num_matvecs=8, seed=1)
        assert run(given)[1] == 0
        del B, given
        gc.collect()
        assert gone() is None


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_eager_repeated_call_goes_straight_to_its_run(library, monkeypatch):
    """The same eager estimate again (NumPy, torch) skips the full path and runs its
    recorded plan: the estimate of the full path, a new seed a new one, a generator seed
    still drawn from; a change of object or option takes the full path."""
    from linop_trace import _functions

    if library == "torch":
        torch = pytest.importorskip("torch")
        A = torch.from_numpy(test_matrix("flat", SIZE, seed=0))
        generator = torch.Generator().manual_seed(5)
    else:
        A = test_matrix("flat", SIZE, seed=0)
        generator = np.random.default_rng(5)
    full_path = []
    original = _functions._settings_key
    monkeypatch.setattr(
        _functions, "_settings_key", lambda *args: full_path.append(1) or original(*args)
    )
    monkeypatch.setattr(_functions, "_LAST_CALLS", {})
    # (the host's free memory, which a repeat must match, fixed: see the JAX test above)
    monkeypatch.setattr(_functions.backend, "free_memory", lambda xp, device: 2**34)

    def run(X, num_matvecs=8, seed=1):
        before = len(full_path)
        estimate = lt.trace(X, method="hutch++", num_matvecs=num_matvecs, seed=seed)
        return float(estimate), len(full_path) - before

    for given in (A, lt.aslinearoperator(A)):
        first = run(given)
        assert first[1] == 1
        assert run(given) == (first[0], 0)
        other = run(given, seed=2)
        assert other[1] == 0 and other[0] != first[0]
        _functions._LAST_CALLS.clear()
        assert run(given, seed=2) == (other[0], 1)
        drawn = [run(given, seed=generator) for _ in range(2)]  # the generator moves on
        assert drawn[1][1] == 0 and drawn[0][0] != drawn[1][0]
    assert run(A * 1.0)[1] == 1 and run(A, num_matvecs=12)[1] == 1


def test_jax_flat_program_outputs_each_array_once(jax_setup):
    """A flat program's result is the function's (its structure, its arrays), with one
    output per distinct array: an array the result holds twice is one output, not a copy
    of its own; another static argument or structure is another program."""
    jax, jnp = jax_setup
    from linop_trace._backend import _compiled

    def function(scale, pair):
        x, y = pair
        total = scale * (x + y)
        return {"total": total, "again": total, "y": y, "count": scale}

    x, y = jnp.arange(3.0), jnp.ones(3)
    leaves, structure = _compiled.flatten(((x, y),))
    program = _compiled.flat_program(function, (2.0,), structure)
    result = program(*leaves)
    assert set(result) == {"total", "again", "y", "count"}
    np.testing.assert_array_equal(np.asarray(result["total"]), [2.0, 4.0, 6.0])
    assert result["again"] is result["total"] and result["count"] == 2.0
    outputs = program._jitted(*leaves)
    assert len(outputs) == 3  # total (twice in the result), y, count
    assert _compiled.flat_program(function, (2.0,), structure) is program
    assert _compiled.flat_program(function, (3.0,), structure) is not program


def test_jax_fresh_entropy_comes_from_a_pool_of_split_keys(jax_setup):
    """``seed=None`` takes a key no earlier call got from a pool split off one key of the
    operating system's entropy (making a key eagerly took 35 us a call, and a NumPy
    integer seed 30 us of JAX's Python dispatch): one key per estimate, compiled or
    eager, different estimates; a pool refilled inside a trace is not kept."""
    jax, jnp = jax_setup
    from linop_trace._backend import _random

    A = jnp.asarray(test_matrix("flat", SIZE, seed=0))
    stored = lt.aslinearoperator(A)
    known_by_callable = lt.LinearOperator.from_callable(
        matmat=lambda X: A @ X, shape=A.shape, like=A
    )
    _random._FRESH_KEYS.clear()
    _random._fresh_jax_key()  # a new pool: FRESH_KEY_BATCH - 1 keys left
    (pool,) = _random._FRESH_KEYS.values()
    assert len(pool) == _random.FRESH_KEY_BATCH - 1
    for operator in (stored, known_by_callable):
        before = len(pool)
        first = lt.trace(operator, method="hutchinson", num_matvecs=BUDGET)
        second = lt.trace(operator, method="hutchinson", num_matvecs=BUDGET)
        assert len(pool) == before - 2
        assert float(first.value) != float(second.value)
    keys = [jax.random.key_data(_random._fresh_jax_key()) for _ in range(3)]
    assert len({tuple(int(word) for word in key) for key in keys}) == 3
    _random._FRESH_KEYS.clear()
    jax.jit(lambda x: x + jax.random.normal(_random._fresh_jax_key(), ()))(1.0)
    assert not _random._FRESH_KEYS  # split inside the trace: tracers, not kept


def test_jax_eager_estimate_of_a_callable_runs_its_algebra_compiled(jax_setup):
    """An operator known only through a Python callable cannot join the compiled program,
    so its estimate runs eagerly, where each JAX operation is a dispatch of its own (tens
    of microseconds). The statistics, the column sums and the finiteness flag each run as
    one compiled program there (compiled once for the shape), the key of an integer seed
    is made once, and a concrete array is not wrapped in ``stop_gradient``."""
    jax, jnp = jax_setup
    from linop_trace import _stats
    from linop_trace._backend import _compiled, _device, _linalg, _random

    A = jnp.asarray(test_matrix("flat", SIZE, seed=0))
    operator = lt.LinearOperator.from_callable(matmat=lambda X: A @ X, shape=A.shape, like=A)
    first = lt.trace(operator, method="hutchinson", num_matvecs=BUDGET, seed=11)
    helpers = [_stats._mean_and_stderr, _linalg._column_inner, _device._zero_sum_finite]
    programs = [_compiled._JITTED[helper] for helper in helpers]
    sizes = [program._cache_size() for program in programs]
    assert min(sizes) >= 1
    again = lt.trace(operator, method="hutchinson", num_matvecs=BUDGET, seed=11)
    assert [program._cache_size() for program in programs] == sizes
    assert float(again.value) == float(first.value)
    assert float(again.stderr) == float(first.stderr)
    # the same key object for the seed; one made inside a trace is not kept
    assert _random._jax_key(11) is _random._jax_key(11)
    kept = dict(_random._JAX_KEYS)
    jax.jit(lambda x: x + jax.random.normal(_random._jax_key(2**40 + 3), ()))(1.0)
    assert _random._JAX_KEYS == kept
    # stop_gradient: the array itself when concrete, still a cut under differentiation
    assert _device.stop_gradient(A) is A
    assert float(jax.grad(lambda x: _device.stop_gradient(x) * x)(3.0)) == 3.0
    # the same for the optimization barrier: none dispatched eagerly, one when traced
    assert _linalg.materialized(operator.xp, A) is A
    traced = jax.make_jaxpr(lambda x: _linalg.materialized(operator.xp, x))(A)
    assert "optimization_barrier" in str(traced)
    # a draw returns its column count, not its key (a key among a program's outputs costs
    # JAX's dispatch about 20 us a call): the key stays with the source on the host
    drawn, block = _random._jax_programs()["rademacher"](
        _random._jax_key(11), None, (7, 3), A.dtype
    )
    assert int(drawn) == 3 and block.shape == (7, 3)
    source = _random.make_random_source(operator.xp, None, 11)
    source.rademacher((7, 3), A.dtype)
    key, count = source._state
    assert key is _random._jax_key(11) and int(count) == 3


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_jax_jitted_functions_join_the_compiled_estimate(jax_setup, case):
    """An operator of functions compiled by ``jax.jit`` is traced into the estimate's one
    program: it runs under the transfer guard, its values are those of the same functions
    called eagerly (each wrapped in a plain function, which keeps the eager path), and a
    second operator of the same functions runs the same program."""
    jax, jnp = jax_setup
    from linop_trace import _functions

    quantity, method, tags = case
    function = getattr(lt, quantity)
    A = _jax_matrix(jnp, tags)
    forward, backward = jax.jit(lambda X: A @ X), jax.jit(lambda X: A.T @ X)

    def operator(matmat, rmatmat):
        return lt.LinearOperator.from_callable(
            matmat=matmat, rmatmat=rmatmat, shape=A.shape, like=A, tags=tags
        )

    key = jax.random.key(5)
    eager = function(
        operator(lambda X: forward(X), lambda X: backward(X)),
        method=method,
        num_matvecs=BUDGET,
        seed=key,
    )
    assert _functions._LAST_CALLS[quantity].launch is None  # (plain functions: eager)
    jitted = operator(forward, backward)
    function(jitted, method=method, num_matvecs=BUDGET, seed=key)  # compiled once
    with jax.transfer_guard("disallow"):
        compiled = function(jitted, method=method, num_matvecs=BUDGET, seed=key)
    launch = _functions._LAST_CALLS[quantity].launch
    assert launch is not None
    # the one traced program rounds otherwise than the eager programs: a value from a QR
    # or eigendecomposition of the sketch A Omega moves by about kappa(A Omega)^2 eps
    # sqrt(n) relative (kappa of a Gaussian sketch of the budget's width: 2e3 here, so
    # 4e-9; JAX 0.6's fusion moved XNysTrace's by 1.5e-11), a stderr (a spread of up to
    # BUDGET samples around the value) by BUDGET |value| / stderr times that
    values = numpy_of(A)
    sketch = values @ np.random.default_rng(0).standard_normal((SIZE, BUDGET))
    bound = np.linalg.cond(sketch) ** 2 * np.finfo(float).eps * np.sqrt(SIZE)
    value = numpy_of(eager.value)
    np.testing.assert_allclose(numpy_of(compiled.value), value, rtol=bound, atol=1e-12)
    if eager.stderr is not None:
        stderr = numpy_of(eager.stderr)
        spread = BUDGET * np.max(np.abs(value)) / np.min(stderr[stderr > 0], initial=np.inf)
        np.testing.assert_allclose(numpy_of(compiled.stderr), stderr, rtol=bound * spread)
    function(operator(forward, backward), method=method, num_matvecs=BUDGET, seed=key)
    assert _functions._LAST_CALLS[quantity].launch.program is launch.program


def test_jax_jitted_matvec_is_compiled_and_a_plain_function_keeps_eager(jax_setup):
    """A jitted ``matvec`` (batched by ``jax.vmap``) compiles too, and two operators of it
    share their structure; one plain function among jitted ones keeps the estimate eager,
    as does a jitted function with an operator of another library."""
    jax, jnp = jax_setup
    from linop_trace import _functions

    A = _jax_matrix(jnp, ())
    matvec = jax.jit(lambda x: A @ x)
    first = lt.LinearOperator.from_callable(matvec=matvec, shape=A.shape, like=A)
    second = lt.LinearOperator.from_callable(matvec=matvec, shape=A.shape, like=A)
    assert first.compilable() and jax.tree_util.tree_structure(
        first
    ) == jax.tree_util.tree_structure(second)
    estimate = lt.trace(first, method="hutchinson", num_matvecs=BUDGET, seed=1)
    assert _functions._LAST_CALLS["trace"].launch is not None
    np.testing.assert_allclose(
        float(estimate.value),
        float(lt.trace(A, method="hutchinson", num_matvecs=BUDGET, seed=1).value),
        rtol=1e-12,
    )
    mixed = lt.LinearOperator.from_callable(
        matmat=jax.jit(lambda X: A @ X), rmatmat=lambda X: A.T @ X, shape=A.shape, like=A
    )
    assert not mixed.compilable()
    lt.trace(mixed, method="hutchinson", num_matvecs=BUDGET, seed=1)
    assert _functions._LAST_CALLS["trace"].launch is None
    other = lt.LinearOperator.from_callable(matvec=matvec, shape=(SIZE, SIZE))  # NumPy
    assert not other.compilable()


def test_jax_array_passed_again_reuses_its_operator_without_holding_it(jax_setup):
    """``trace(A)`` on the same JAX array again, or on another of the same layout, takes
    the operator's attributes made the first time (they follow from the layout, and JAX
    arrays are immutable; making them costs 20 - 45 us a call); an array of another
    layout gets its own. No array is kept: once the caller drops it, nothing holds it."""
    import gc
    import weakref

    jax, jnp = jax_setup
    from linop_trace import _operators

    A = jnp.asarray(test_matrix("flat", SIZE, seed=0))
    first = lt.aslinearoperator(A)
    again = lt.aslinearoperator(A)
    assert again is not first and again.matrix is A
    assert again._static_part is first._static_part  # made once, for the array
    assert vars(again).keys() == vars(first).keys()
    other = jnp.asarray(test_matrix("flat", SIZE, seed=1))  # the same layout
    assert lt.aslinearoperator(other)._static_part is first._static_part
    assert lt.aslinearoperator(other).matrix is other
    for layout in (A[:-1, :-1], A.astype(jnp.float32), jnp.full(A.shape, 1.0)):
        lt.aslinearoperator(A)
        made = lt.aslinearoperator(layout)
        assert made._static_part is not first._static_part  # (its own attributes)
        assert made.shape == layout.shape and made.dtype == layout.dtype
    estimate = lt.trace(other, method="hutchinson", num_matvecs=BUDGET, seed=0)
    reference = lt.trace(
        lt.aslinearoperator(other), method="hutchinson", num_matvecs=BUDGET, seed=0
    )
    assert float(estimate.value) == float(reference.value)
    tagged = lt.aslinearoperator(other, tags=("symmetric",))
    assert "symmetric" in tagged.tags and not lt.aslinearoperator(other).tags
    dropped = weakref.ref(other)
    del other, estimate, reference, tagged
    gc.collect()
    assert dropped() is None
    kept = jax.tree_util.tree_leaves(_operators._LAST_JAX_DENSE)
    assert not any(isinstance(leaf, jax.Array) for leaf in kept)  # (layouts, attributes)


def test_jax_eager_adaptive_estimate_compiles_its_draw_once(jax_setup):
    """An adaptive estimate doubles its block every round. Eagerly, the blocks wider than
    twice the first are drawn in chunks of the first width (the same columns as one draw:
    column j's key is fold_in(key, j)), so the threefry program, 0.3 - 1 s to compile on a
    CPU, compiles for the first width (twice: from a bare key, then from the stream's
    state) and at most one narrower rest, not once a round (six programs before)."""
    jax, jnp = jax_setup
    from linop_trace._backend import _random

    xp = lt.aslinearoperator(jnp.ones((2, 2))).xp
    chunked = _random.make_random_source(xp, None, 7)
    whole = _random.make_random_source(xp, None, 7)
    for draw in ("rademacher", "standard_normal"):
        first = getattr(chunked, draw)((70, 3), jnp.float64)
        wide = getattr(chunked, draw)((70, 11), jnp.float64)  # chunks 3, 3, 3, 2
        same = getattr(whole, draw)((70, 14), jnp.float64)
        assert bool(jnp.all(jnp.concatenate([first, wide], axis=1) == same))
        chunked, whole = chunked.snapshot(), whole.snapshot()

    n = 93  # a size no other test draws at: the program's cache entries are this test's
    A = jnp.asarray(test_matrix("flat", n, seed=2))
    operator = lt.LinearOperator.from_callable(matmat=lambda X: A @ X, shape=A.shape, like=A)
    program = _random._jax_programs()["rademacher"]
    before = program._cache_size()
    estimate = lt.trace(
        operator, method="hutchinson", num_matvecs=4, rtol=1e-3, max_matvecs=90, seed=1
    )
    assert estimate.num_matvecs == 90  # rounds of 4, 4, 8, 16, 32 and the last 26 columns
    assert program._cache_size() - before <= 3


def test_jax_exact_trace_uses_full_precision_products(jax_setup):
    """The exact walk multiplies at full precision (TF32 is JAX's default on NVIDIA GPUs)."""
    jax, jnp = jax_setup
    A = jnp.asarray(test_matrix("poly", SIZE, seed=0), dtype=jnp.float32)
    operator = lt.LinearOperator.from_callable(matmat=lambda X: A @ X, shape=A.shape, like=A)
    estimate = lt.trace(operator, method="exact")
    assert float(estimate) == pytest.approx(float(jnp.trace(A)), rel=1e-6)


# ------------------------------------------------------------------ block sizes
def test_block_size_follows_the_devices_free_memory(backend, monkeypatch):
    """With a fake free-memory figure the default block is a quarter of it over the
    operator's bytes per column: 1000 free bytes per ... here exactly 7 columns."""
    from linop_trace import _backend

    A = test_matrix("flat", 40, seed=0)
    operator = lt.aslinearoperator(backend.matrix(A))
    per_column = operator.bytes_per_column()
    assert per_column == 2 * 40 * np.dtype(np.float64).itemsize
    monkeypatch.setattr(_backend, "free_memory", lambda xp, device: 4 * 7 * per_column + 3)
    widths = []
    counting = lt.LinearOperator.from_callable(
        matmat=lambda X: widths.append(X.shape[1]) or operator.matmat(X),
        shape=operator.shape,
        like=backend.asarray(A[:1, :1]),
    )
    lt.trace(counting, method="hutchinson", num_matvecs=20, seed=0)
    assert widths == [7, 7, 6]
    # with room for every probe, one call
    monkeypatch.setattr(_backend, "free_memory", lambda xp, device: 10**12)
    widths.clear()
    lt.trace(counting, method="hutchinson", num_matvecs=20, seed=0)
    assert widths == [20]


def test_settings_are_reused_for_arrays_of_one_structure(backend, monkeypatch):
    """A call on a fresh dense array (a new operator) reuses the settings of an earlier
    one of the same type, shape, dtype and device (they depend on nothing else), and a
    different dtype or shape gets its own: ``_settings`` counted, estimates exact."""
    from linop_trace import _backend, _functions

    made = []
    original = _functions._settings
    monkeypatch.setattr(
        _functions, "_settings", lambda *a, **k: made.append(a[0].shape) or original(*a, **k)
    )
    monkeypatch.setattr(_functions, "_RECENT_SETTINGS", [])
    # the free memory is part of the key (re-read once a second on the host): held fixed,
    # so that a first call that compiles for seconds does not see another figure
    monkeypatch.setattr(_backend, "free_memory", lambda xp, device: 10**12)
    diagonals = [np.arange(1.0, 31.0) * scale for scale in (1.0, 2.0)]
    for d in diagonals:  # Rademacher probes are exact on a diagonal matrix
        estimate = lt.trace(backend.asarray(np.diag(d)), method="hutchinson", seed=0)
        assert float(numpy_of(estimate.value)) == pytest.approx(d.sum(), rel=1e-12)
    assert made == [(30, 30)]
    lt.trace(backend.asarray(np.eye(31)), method="hutchinson", seed=0)
    assert made == [(30, 30), (31, 31)]
    if backend.float64_supported:
        lt.trace(backend.asarray(np.eye(31), dtype=np.float32), method="hutchinson", seed=0)
        assert made == [(30, 30), (31, 31), (31, 31)]


def test_expression_walk_is_skipped_for_a_known_plan(backend, monkeypatch):
    """The same operator with the same call again skips walking its expression (its plan,
    no exact terms to split off, is known), a fresh operator walks its own, and an
    expression with exact terms is split on every call (their values are read anew)."""
    from linop_trace import _backend, _functions

    walks = []
    original = _functions.decompose_expression
    monkeypatch.setattr(
        _functions, "decompose_expression", lambda op: walks.append(op) or original(op)
    )
    monkeypatch.setattr(_functions, "_RECENT_SETTINGS", [])
    monkeypatch.setattr(_backend, "free_memory", lambda xp, device: 10**12)  # (as above)
    d = np.arange(1.0, 31.0)
    implicit = lt.LinearOperator.from_callable(
        matmat=lambda X: backend.asarray(np.diag(d)) @ X,
        shape=(30, 30),
        like=backend.asarray(np.zeros(1)),
    )
    for _ in range(3):  # Rademacher probes are exact on a diagonal matrix
        estimate = lt.trace(implicit, method="hutchinson", num_matvecs=10, seed=0)
        assert float(numpy_of(estimate.value)) == pytest.approx(d.sum(), rel=1e-12)
    assert walks == [implicit]
    lt.trace(implicit, method="hutchinson", num_matvecs=12, seed=0)  # another call
    assert len(walks) == 2
    shifted = implicit + 2.0 * lt.identity(30, like=backend.asarray(np.zeros(1)))
    for _ in range(2):
        estimate = lt.trace(shifted, method="hutchinson", num_matvecs=10, seed=0)
        assert float(numpy_of(estimate.value)) == pytest.approx(d.sum() + 60.0, rel=1e-12)
        assert "exact_terms" in estimate.info
    assert walks[2:] == [shifted, shifted]


# ------------------------------------------------------- every method, every backend
@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_every_method_on_every_backend(backend, case):
    """Each fixed-budget method on each backend (the GPU ones in ``nox -s gpu``): the result
    in the operator's library and on its device, and as accurate as its error bar says."""
    quantity, method, tags = case
    A = test_matrix("fastexp", SIZE, seed=2)
    operator = lt.aslinearoperator(backend.matrix(A), tags=tags)
    estimate = getattr(lt, quantity)(operator, method=method, num_matvecs=BUDGET, seed=1)
    like = backend.asarray(np.zeros(1))
    assert type(estimate.value).__module__.split(".")[0] == type(like).__module__.split(".")[0]
    from linop_trace._backend import device_of, same_device

    assert same_device(device_of(estimate.value), device_of(like))
    truth = np.trace(A) if quantity == "trace" else np.diag(A)
    if method == "exact":
        np.testing.assert_allclose(numpy_of(estimate.value), truth, rtol=1e-10, atol=1e-12)
        return
    # inside the method's own interval at level 1 - 1e-6 (t quantile with its dof, which
    # XTrace and XDiag may set as low as 2): a miss has probability about 1e-6 per entry
    low, high = estimate.ci(1 - 1e-6)
    slack = 1e-9 * np.max(np.abs(truth))
    assert np.all(numpy_of(low) - slack <= truth) and np.all(truth <= numpy_of(high) + slack)


def test_a_subclass_of_auto_runs_its_own_trace(monkeypatch):
    """Only the built-in ``auto`` has its exact branch taken ahead of the run: a plug-in
    subclass's own ``trace`` runs, even where ``auto`` would read the stored diagonal."""
    from linop_trace.estimators._auto import Auto

    ran = []

    class Logged(Auto):
        name = "logged-auto"

        def trace(self, request):
            ran.append(request.n)
            return super().trace(request)

    A = np.diag(np.arange(1.0, 6.0))
    estimate = lt.trace(A, method=Logged())
    assert ran == [5] and estimate.method == "exact" and float(estimate.value) == 15.0


def test_jax_auto_on_a_sparse_matrix_asks_for_its_diagonal_without_computing_it(jax_setup):
    """auto's exact branch needs to know that a BCOO stores its diagonal, not the
    diagonal itself: it computed it eagerly on every call (1.7 ms at n = 2000, before
    the compiled exact run computed it again), which also broke the transfer guard."""
    jax, jnp = jax_setup
    from jax.experimental import sparse as jsparse

    M = test_matrix("poly", SIZE, seed=0)
    for function in (lt.trace, lt.diagonal):
        # a budget below n: exact because the matrix stores its diagonal
        options = {"num_matvecs": 4, "seed": jax.random.key(0)}
        function(jsparse.BCOO.fromdense(jnp.asarray(M)), **options)  # compiled once
        S = jsparse.BCOO.fromdense(jnp.asarray(M))  # (a new matrix: no plan to recall)
        with jax.transfer_guard("disallow"):
            estimate = function(S, **options)
        assert estimate.method == "exact"
        expected = np.trace(M) if function is lt.trace else np.diag(M)
        np.testing.assert_allclose(numpy_of(estimate.value), expected, rtol=1e-12)
