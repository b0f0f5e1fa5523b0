"""method="auto": exact when cheap, else Hutchinson or XTrace from shared first products."""

from __future__ import annotations

import warnings

import array_api_compat.numpy as npx
import numpy as np
import pytest
from conftest import numpy_of

import linop_trace as lt
from linop_trace._testing import test_matrix
from linop_trace.estimators import Auto, Hutchinson
from linop_trace.estimators._auto import predict_variances


def implicit(M, log=None):
    """M as an operator known only through products (no stored diagonal)."""

    def matmat(X):
        if log is not None:
            log.append(X.shape[1])
        return M @ X

    return lt.LinearOperator.from_callable(matvec=lambda x: M @ x, matmat=matmat, shape=M.shape)


def test_exact_when_budget_covers_n_or_diagonal_is_stored(backend):
    A = np.arange(16.0).reshape(4, 4)
    est = lt.trace(backend.matrix(A), num_matvecs=10)
    assert est.method == "exact" and float(est) == 30.0
    big = np.diag(np.arange(1.0, 301.0))
    assert lt.trace(backend.matrix(big), num_matvecs=10).method == "exact"  # stored diagonal
    assert lt.diagonal(backend.matrix(A), num_matvecs=10).method == "exact"


@pytest.mark.parametrize(
    ("spectrum", "method"),
    [("flat", "hutchinson"), ("poly", "xtrace"), ("fastexp", "xtrace"), ("bigstep", "xtrace")],
)
def test_chooses_by_spectrum_without_wasting_columns(spectrum, method):
    M = test_matrix(spectrum, 400)
    log = []
    est = lt.trace(implicit(M, log), num_matvecs=100, seed=0)
    assert est.method == method
    assert sum(log) == est.num_matvecs == 100  # the first half is reused by either method
    assert len(log) == 2
    predictions = est.info["auto"]
    better = (
        "xtrace"
        if predictions["xtrace_variance"] < predictions["hutchinson_variance"]
        else "hutchinson"
    )
    assert better == method


@pytest.mark.parametrize(("num_matvecs", "max_matvecs", "first"), [(10, 150, 16), (10, 20, 10)])
def test_adaptive_auto_starts_with_a_useful_sketch(num_matvecs, max_matvecs, first):
    # with a tolerance the first block is half of max(num_matvecs, min(32, max_matvecs))
    # (max_matvecs < n = 200, else the exact trace is cheaper)
    log = []
    lt.trace(
        implicit(test_matrix("flat", 200), log),
        num_matvecs=num_matvecs,
        rtol=1e-3,
        max_matvecs=max_matvecs,
        seed=0,
    )
    assert log[0] == first


def naive_predictions(A, Om, m):
    """Hutchinson: var(w_i^T A w_i) / m. XTrace: 2 mean_i |(I - P_i)(A - mu I) w_i|^2 / s."""
    n, s = Om.shape
    samples = np.einsum("ij,ij->j", Om, A @ Om)
    mu = samples.mean() / n
    rho = []
    for i in range(s):
        Qi = np.linalg.qr(np.delete(A @ Om, i, axis=1))[0]
        v = (A - mu * np.eye(n)) @ Om[:, i]
        rho.append(np.sum((v - Qi @ (Qi.T @ v)) ** 2))
    return samples.var(ddof=1) / m, 2 * np.mean(rho) / s


def test_predictions_match_naive_reference():
    rng = np.random.default_rng(0)
    A = test_matrix("slowexp", 60, seed=2) + 0.01 * rng.standard_normal((60, 60))
    Om = rng.choice([-1.0, 1.0], size=(60, 8))
    got = predict_variances(Om, A @ Om, 16, npx)[:2]
    np.testing.assert_allclose(got, naive_predictions(A, Om, 16), rtol=1e-10)


@pytest.mark.stats
def test_accuracy_close_to_the_better_method():
    """On an implicit decaying and a flat matrix, auto's mean error over 60 seeds is
    within 1.5x of the better of Hutchinson and XTrace (the benchmark checks n = 1000, 200
    seeds). Measured over 150 seeds the ratio is 0.91 (flat) and 1.00 (slowexp); a mean
    absolute error over s seeds scatters by about 0.75/sqrt(s) relative, so the ratio of
    two by about 1.06/sqrt(s): 0.14 at s = 60, which puts 1.5 3.6 of them away (at s = 30
    it was 2.6 away, and one seed stream crossed it)."""
    for spectrum in ("flat", "slowexp"):
        M = test_matrix(spectrum, 300)
        op, truth = implicit(M), np.trace(M)
        errors = {}
        for method in ("auto", "hutchinson", "xtrace"):
            errors[method] = np.mean(
                [
                    abs(float(lt.trace(op, method=method, num_matvecs=60, seed=s)) - truth)
                    for s in range(60)
                ]
            )
        assert errors["auto"] <= 1.5 * min(errors["hutchinson"], errors["xtrace"]), errors


@pytest.mark.parametrize("spectrum", ["flat", "poly"])
def test_adaptive(spectrum):
    M = test_matrix(spectrum, 300)
    est = lt.trace(implicit(M), rtol=5e-3, num_matvecs=20, max_matvecs=299, seed=0)
    assert est.converged is True and est.num_matvecs <= 299
    low, high = est.ci(0.95)
    assert (high - low) / 2 <= 5e-3 * abs(float(est)) * (1 + 1e-12)


def test_adaptive_default_start_can_choose_xtrace():
    est = lt.trace(implicit(test_matrix("fastexp", 300)), rtol=1e-8, max_matvecs=200, seed=0)
    assert est.method == "xtrace" and est.converged is True


def test_small_budget_falls_back_to_hutchinson():
    est = lt.trace(implicit(test_matrix("poly", 50)), num_matvecs=3, seed=0)
    assert est.method == "hutchinson" and est.num_matvecs == 3


def test_fixed_methods_and_diagonal():
    M = test_matrix("poly", 120)
    est = lt.trace(implicit(M), method=Auto(trace_method=Hutchinson()), num_matvecs=40, seed=0)
    assert est.method == "hutchinson"
    # no adjoint: Hutchinson's diagonal; with one (here a symmetric tag): XDiag
    diag = lt.diagonal(implicit(M), num_matvecs=60, seed=0)
    assert diag.method == "hutchinson"
    symmetric = lt.LinearOperator.from_callable(
        matvec=lambda x: M @ x, shape=M.shape, tags=("symmetric",)
    )
    diag = lt.diagonal(symmetric, num_matvecs=60, seed=0)
    expected = "xdiag" if "xdiag" in lt.available_methods("diagonal") else "hutchinson"
    assert diag.method == expected
    assert np.max(np.abs(np.asarray(diag.value) - np.diag(M))) < 0.1 * np.max(np.diag(M))


def test_psd_tag_uses_xnystrace_and_falls_back_on_contradiction():
    M = test_matrix("smallstep", 300)
    calls = []

    def matmat(X):
        calls.append(X.shape[1])
        return M @ X

    op = lt.LinearOperator.from_callable(
        matvec=lambda x: M @ x, matmat=matmat, shape=M.shape, tags=("positive_semidefinite",)
    )
    est = lt.trace(op, num_matvecs=100, seed=0)
    assert est.method == "xnystrace" and calls == [100] and est.num_matvecs == 100
    assert abs(float(est) - np.trace(M)) < 5 * float(est.stderr) + 1e-12
    wrong = lt.LinearOperator.from_callable(
        matvec=lambda x: (M - np.eye(300)) @ x, shape=M.shape, tags=("positive_semidefinite",)
    )
    with pytest.warns(RuntimeWarning, match="positive semidefinite.*Hutchinson"):
        est = lt.trace(wrong, num_matvecs=100, seed=0)
    assert est.method == "hutchinson" and est.num_matvecs == 100


def test_diagonal_with_non_unit_modulus_probes_avoids_xdiag():
    # XDiag accepts only Rademacher/Steinhaus probes: Gaussian ones go to Diag++
    M = test_matrix("poly", 120)
    symmetric = lt.LinearOperator.from_callable(
        matvec=lambda x: M @ x, shape=M.shape, tags=("symmetric",)
    )
    for probe in ("gaussian", "sphere"):
        diag = lt.diagonal(symmetric, num_matvecs=60, seed=0, probe=probe)
        assert diag.method == "diag++" and diag.num_matvecs == 60
        assert np.max(np.abs(np.asarray(diag.value) - np.diag(M))) < 0.1 * np.max(np.diag(M))
    # no adjoint: Hutchinson's diagonal, with the Gaussian probes asked for
    assert lt.diagonal(implicit(M), num_matvecs=60, seed=0, probe="gaussian").method == "hutchinson"


def _hutchinson_interval(samples):
    """The interval method="hutchinson" gives for these samples (shape-corrected t)."""
    from linop_trace._stats import sample_mean

    return sample_mean(samples, npx).estimate(samples.shape[0], "hutchinson").ci(0.95)


def test_hutchinson_choice_has_the_hutchinson_interval():
    M = test_matrix("flat", 400)
    for kwargs in ({"num_matvecs": 100}, {"rtol": 0.02, "max_matvecs": 200}):
        est = lt.trace(implicit(M), seed=0, **kwargs)
        assert est.method == "hutchinson"
        samples = np.asarray(est.info["samples"])
        assert samples.shape[0] == est.num_matvecs
        low, high = _hutchinson_interval(samples)
        # same samples, same formula: equal to round-off (skewed samples make the
        # shape-corrected quantile differ from the plain t one by far more than 1e-12)
        np.testing.assert_allclose(est.ci(0.95), (low, high), rtol=1e-12)
        assert est.skewness is not None


def test_psd_fallback_has_the_hutchinson_interval():
    M = test_matrix("smallstep", 300) - 0.5 * np.eye(300)
    wrong = lt.LinearOperator.from_callable(
        matvec=lambda x: M @ x, shape=M.shape, tags=("positive_semidefinite",)
    )
    with pytest.warns(RuntimeWarning, match="positive semidefinite"):
        est = lt.trace(wrong, num_matvecs=100, seed=0)
    assert est.method == "hutchinson"
    np.testing.assert_allclose(
        est.ci(0.95), _hutchinson_interval(np.asarray(est.info["samples"])), rtol=1e-12
    )


def test_xtrace_choice_orthonormalizes_the_sketch_once(monkeypatch):
    from linop_trace.estimators import _auto, _xtrace

    calls = []

    def counted(block, xp):
        calls.append(block.shape[1])
        return original(block, xp)

    original = _auto.orthonormal_factors
    monkeypatch.setattr(_auto, "orthonormal_factors", counted)  # (auto's basis)
    monkeypatch.setattr(_xtrace, "orthonormal_factors", counted)
    M = test_matrix("fastexp", 300)
    est = lt.trace(implicit(M), num_matvecs=60, seed=0)
    assert est.method == "xtrace" and calls == [30]
    reference = lt.trace(implicit(M), method="xtrace", num_matvecs=60, seed=0)
    assert abs(float(est) - float(reference)) <= 1e-8 * abs(np.trace(M))


def test_budget_below_two_is_refused_unless_exact():
    with pytest.raises(ValueError, match="needs num_matvecs >= 2"):
        lt.trace(implicit(test_matrix("poly", 50)), num_matvecs=1, seed=0)
    with pytest.raises(ValueError, match="needs num_matvecs >= 2"):
        lt.diagonal(implicit(test_matrix("poly", 50)), num_matvecs=1, seed=0)
    one = implicit(np.array([[3.0]]))
    est = lt.trace(one, num_matvecs=1)
    assert est.method == "exact" and float(est) == 3.0


@pytest.mark.parametrize("adjoint, method", [(True, "diag++"), (False, "hutchinson")])
def test_adaptive_diagonal_meets_the_tolerance(adjoint, method):
    # XDiag has no adaptive stopping: with rtol/atol, auto takes Diag++ (Hutchinson without
    # an adjoint) and grows it from a first budget of 32; before, XDiag ran the default
    # 2 columns (s = 1, no stderr) and converged stayed None
    A = test_matrix("flat", 400, seed=1)
    op = lt.LinearOperator.from_callable(
        matvec=lambda x: A @ x, rmatvec=(lambda x: A.T @ x) if adjoint else None, shape=A.shape
    )
    est = lt.diagonal(op, rtol=0.1, max_matvecs=390, seed=0)
    assert est.method == method and est.converged is True and 32 <= est.num_matvecs <= 390
    assert est.quantile(0.95) * np.max(est.stderr) <= 0.1 * np.max(np.abs(est.value))
    est = lt.diagonal(op, rtol=1e-6, max_matvecs=100, seed=0)
    assert est.method == method and est.converged is False and est.num_matvecs == 100


def _on_device_and_on_host(backend, monkeypatch, M, budget, tags=()):
    """The estimate of ``M`` (known by products) with the choice made on the device, and
    the same run with the choice read on the host, as NumPy makes it."""
    from linop_trace.estimators import _auto

    A = backend.asarray(M)
    operator = lt.LinearOperator.from_callable(
        matmat=lambda X: A @ X, shape=M.shape, like=A, tags=tags
    )
    results = []
    for host in (False, True):  # (the device's path is forced on a CPU, as on a GPU)
        monkeypatch.setattr(_auto, "_chooses_on_host", lambda request, products, h=host: h)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            estimate = lt.trace(operator, num_matvecs=budget, seed=3)
            unread = estimate._choice is not None  # (nothing read yet)
            numbers = (float(estimate.value), float(estimate.stderr), *estimate.ci())
            results.append((estimate, numbers, [str(w.message) for w in caught], unread))
    return results


@pytest.mark.parametrize(
    ("spectrum", "budget", "method"),
    [("flat", 20, "hutchinson"), ("flat", 21, "hutchinson"), ("poly", 20, "xtrace")],
)
def test_choice_on_the_device_gives_the_hosts_estimate(
    backend, monkeypatch, spectrum, budget, method
):
    """On a GPU and under a JAX trace the choice is made on the device (no read while
    the estimate runs): the estimate is the one the host's choice gives, to rounding; its
    method, info and interval are the chosen method's, read when first asked for."""
    M = test_matrix(spectrum, 300)
    (device, numbers, _, unread), (host, host_numbers, _, _) = _on_device_and_on_host(
        backend, monkeypatch, M, budget
    )
    assert unread
    np.testing.assert_allclose(numbers, host_numbers, rtol=1e-10)
    assert device.method == host.method == method
    assert device.dof == host.dof and device.num_matvecs == host.num_matvecs == budget
    assert sorted(device.info) == sorted(host.info)
    predictions = {key: float(item) for key, item in device.info["auto"].items()}
    np.testing.assert_allclose(
        list(predictions.values()), list(host.info["auto"].values()), rtol=1e-10
    )
    if method == "hutchinson":  # shape-corrected interval: the same samples' shape
        assert device.skewness == pytest.approx(host.skewness, rel=1e-8)
    else:
        assert device.skewness is None and host.skewness is None


def test_xtrace_chosen_on_the_device_spends_an_odd_budgets_last_column(backend, monkeypatch):
    """With an odd budget XTrace's second pass is one column narrower than Hutchinson's;
    on the device both go through one product of Hutchinson's width, so XTrace's
    estimate (the host's, to rounding) counts that column too."""
    M = test_matrix("poly", 300)
    (device, numbers, _, _), (host, host_numbers, _, _) = _on_device_and_on_host(
        backend, monkeypatch, M, 21
    )
    np.testing.assert_allclose(numbers, host_numbers, rtol=1e-10)
    assert device.method == host.method == "xtrace"
    assert (device.num_matvecs, host.num_matvecs) == (21, 20)


def test_psd_fallback_chosen_on_the_device_warns_when_read(backend, monkeypatch):
    """XNysTrace's check of the tag decides on the device too: an operator that is not
    positive semidefinite gets Hutchinson's estimate from the same products, with the
    host's warning and info, given when the estimate is read."""
    if backend.name in ("numpy", "scipy", "strict"):
        pytest.skip("where reads are free checks raise at once: the host reads the choice")
    M = test_matrix("flat", 300) - 2.5 * np.eye(300)  # eigenvalues in [-1.5, 0.5]
    tags = ("symmetric", "positive_semidefinite")
    (device, numbers, warned, _), (host, host_numbers, host_warned, _) = _on_device_and_on_host(
        backend, monkeypatch, M, 20, tags
    )
    np.testing.assert_allclose(numbers, host_numbers, rtol=1e-10)
    assert device.method == host.method == "hutchinson"
    assert warned == host_warned and len(warned) == 1 and "falls back" in warned[0]
    assert device.info["auto"] == host.info["auto"]


def test_refine_after_a_choice_on_the_device(backend, monkeypatch):
    """An estimate whose choice was made on the device refines where it chose Hutchinson
    (the run's samples are kept) and refuses where it chose XTrace."""
    from linop_trace.estimators import _auto

    monkeypatch.setattr(_auto, "_chooses_on_host", lambda request, products: False)
    for spectrum, refinable in (("flat", True), ("poly", False)):
        A = backend.asarray(test_matrix(spectrum, 300))
        operator = lt.LinearOperator.from_callable(
            matmat=lambda X, A=A: A @ X, shape=A.shape, like=A
        )
        first = lt.trace(operator, num_matvecs=20, seed=4)
        assert first._choice is not None
        if refinable:
            more = first.refine(operator, num_matvecs=10)
            assert more.num_matvecs == 30 and more.method == "hutchinson"
            samples = numpy_of(more.info["samples"])
            assert samples.shape == (30,)
            np.testing.assert_array_equal(samples[:20], numpy_of(first.info["samples"]))
            assert float(more.value) == pytest.approx(samples.mean(), rel=1e-12)
        else:
            with pytest.raises(ValueError, match="cannot be refined"):
                first.refine(operator, num_matvecs=10)


def test_the_choice_is_read_on_the_cpu_and_made_on_the_device_under_a_trace(backend):
    """On the CPU, outside a JAX trace, the choice is read (no device to wait for, and
    only the chosen method is completed); under ``jax.jit`` it is made on the device, and
    the estimate is the eager one (before, a trace had no value to choose by)."""
    M = test_matrix("poly", 300)
    A = backend.asarray(M)
    operator = lt.LinearOperator.from_callable(matmat=lambda X: A @ X, shape=M.shape, like=A)
    eager = lt.trace(operator, num_matvecs=20, seed=1)
    assert eager._choice is None and eager.method == "xtrace"
    if backend.name != "jax":
        return
    import jax

    def traced(matrix):
        inner = lt.LinearOperator.from_callable(
            matmat=lambda X: matrix @ X, shape=M.shape, like=matrix
        )
        estimate = lt.trace(inner, num_matvecs=20, seed=1)
        assert estimate.method == "auto"  # (a traced choice has no value to read)
        return estimate.value, estimate.stderr

    value, stderr = jax.jit(traced)(A)
    # one traced program rounds otherwise than the eager programs: XTrace's value, from a
    # QR of the sketch A Omega and its downdates, moves by about kappa(A Omega)^2 eps
    # sqrt(n) relative (kappa of a Gaussian sketch of the same width; 5.7e-11 here, and
    # JAX 0.6's fusion reaches 3.3e-11). Its stderr, the spread of s jackknife
    # pseudo-values s T - (s - 1) T_(i), by (s - 1) |value| / stderr times that.
    s, n = 10, M.shape[0]
    kappa = np.linalg.cond(M @ np.random.default_rng(0).standard_normal((n, s)))
    bound = kappa**2 * np.finfo(float).eps * np.sqrt(n)
    assert float(value) == pytest.approx(float(eager.value), rel=bound)
    spread = (s - 1) * abs(float(eager.value)) / float(eager.stderr)
    assert float(stderr) == pytest.approx(float(eager.stderr), rel=bound * spread)


def test_an_exact_answer_under_a_tolerance_has_converged():
    """auto answers exactly when n <= max_matvecs; with a tolerance asked for, converged
    is True (it was None, which the docs reserve for runs without a tolerance)."""
    A = np.random.default_rng(0).standard_normal((50, 50))
    operator = lt.LinearOperator.from_callable(matmat=lambda X: A @ X, shape=(50, 50))
    for estimate in (
        lt.trace(operator, method="auto", rtol=0.01),
        lt.diagonal(A, method="auto", atol=1.0),
    ):
        assert estimate.method == "exact" and estimate.converged is True
    assert lt.trace(A, method="auto").converged is None
