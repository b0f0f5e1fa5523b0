"""Deflated stochastic Lanczos quadrature (``trace_function(..., method="slq++")``): the
block Gauss rule of the deflated space is exact where its theory says, the estimate is
unbiased and beats plain SLQ at equal budget on decaying spectra, every backend, the
guards, and (``stats``) the interval's coverage over 400 seeds."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import numpy_of
from test_spectral import FUNCTIONS, coverage_over_400_seeds, spd_matrix

import linop_trace as lt
from linop_trace._operators import aslinearoperator
from linop_trace._probes import ProbeSampler
from linop_trace._spectral import _deflate, deflation_plan


def _powers(degree: int):
    return lambda xp, x: x**degree


# ------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("degree", [3, 5])
def test_block_rule_is_exact_for_polynomials_of_degree_2_gap_plus_1(backend, degree):
    """With s block steps and q deflated blocks, A^j Q stays in the Krylov space for
    j <= s - q, so sum_{i <= qb} f(T)_ii = tr Q^T f(A) Q for polynomials of degree up to
    2 (s - q) + 1: here s - q = 2, degree 5 (and 3) exactly."""
    n, b, s, q = 80, 3, 5, 3
    A = spd_matrix(np.linspace(0.5, 2.0, n), seed=3)
    operator = aslinearoperator(backend.matrix(A))
    xp = operator.xp
    sampler = ProbeSampler("rademacher", n, xp, operator.dtype, operator.device, 0)
    kept, value, error, ritz = _deflate(operator.matmat, sampler, (b, s, q), _powers(degree), xp)
    Q = numpy_of(kept)
    assert Q.shape == (n, q * b)
    assert Q.T @ Q == pytest.approx(np.eye(q * b), abs=1e-12)
    expected = np.trace(Q.T @ np.linalg.matrix_power(A, degree) @ Q)
    assert float(value) == pytest.approx(expected, rel=1e-10)
    # the rule of s - 1 blocks is exact too up to degree 3: the error estimate vanishes
    if degree == 3:
        assert float(error) <= 1e-10 * abs(expected)
    # Ritz values of the whole space lie in the spectrum
    assert 0.5 - 1e-12 <= float(numpy_of(ritz).min()) <= float(numpy_of(ritz).max()) <= 2 + 1e-12


def test_budget_plan_spends_the_budget_and_names_a_small_one():
    # a third of 600 to 13 x 15 Krylov columns, the rest to 27 probes of 15 steps
    assert deflation_plan(600, 15, 1000) == (13, 15, 13, 27)
    # at most half the dimensions are spent on the Krylov space
    assert deflation_plan(400, 20, 100) == (2, 20, 18, 18)
    assert deflation_plan(400, 20, 30) == (1, 15, 13, 19)
    with pytest.raises(ValueError, match=r"method='slq\+\+'\) needs .* num_matvecs >= 30"):
        lt.logdet(np.eye(200), method="slq++", num_matvecs=29, lanczos_steps=10)


def test_tiny_operators():
    """Below n = 4 there is no deflated space of 2 to n / 2 directions: a clear error (at
    n = 1 the block Krylov space had 4 columns in one dimension, and exp(2) came out 63
    with a zero-width interval). At n = 4 a +-1 probe can lie in the deflated space and
    project to 0 (17 of 20 seeds here): its sample is 0, where its normalisation was 0/0
    and a FloatingPointError blamed the operator."""
    for n in (1, 2, 3):
        with pytest.raises(ValueError, match="needs n >= 4"):
            lt.trace_exp(np.eye(n), method="slq++", seed=0)
    eigenvalues = np.array([1.0, 4 / 3, 5 / 3, 2.0])
    truth = float(np.sum(np.log(eigenvalues)))
    estimates = [float(lt.logdet(np.diag(eigenvalues), method="slq++", seed=s)) for s in range(40)]
    # unbiased: the mean of 40 within 4 standard errors of the mean (sample spread)
    spread = np.std(estimates, ddof=1) / np.sqrt(len(estimates))
    assert abs(np.mean(estimates) - truth) <= 4 * spread + 1e-12


@pytest.mark.parametrize("method", ["slq", "slq++"])
def test_a_multiple_of_the_identity_has_no_quadrature_error(method):
    """A = 2 I: every Krylov space is invariant after one step (beta = 0); the rules are
    exact and the Radau extension adds a node of weight 0 (no singular solve). Plain SLQ
    with Rademacher probes is exact (|z|^2 = n); after deflation the probes' projected
    norms |(I - QQ^T) z|^2 vary, so the estimate is exact only in expectation."""
    est = lt.logdet(2 * np.eye(200), method=method, num_matvecs=60, lanczos_steps=10, seed=0)
    truth = 200 * np.log(2)
    assert float(est.info["systematic_error"]) <= 1e-12 * truth
    if method == "slq":
        assert float(est) == pytest.approx(truth, rel=1e-12)
    else:
        assert abs(float(est) - truth) <= 4 * float(est.stderr)


# ------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize(
    ("name", "eigenvalues"),
    [
        ("log", 1 + 100 * np.arange(1, 401) ** -2.0),  # a kernel-like decay above noise 1
        ("exp", 5 / np.arange(1, 401)),  # exp of a 1/i decay
    ],
)
def test_deflation_beats_plain_slq_at_equal_budget_on_decaying_spectra(name, eigenvalues):
    """Root-mean-square errors over 20 seeds at 360 columns: plain SLQ pays the full
    variance 2 sum_{i != j} F_ij^2 / probes; deflating the top 11 x 8 Krylov directions
    leaves the tail's (measured: log 0.9 -> 0.01, exp 17 -> 3.5 on this problem)."""
    A = spd_matrix(eigenvalues, seed=4)
    truth = float(np.sum(FUNCTIONS[name](eigenvalues)))
    errors = {"slq": [], "slq++": []}
    for seed in range(20):
        for method, sq in errors.items():
            est = lt.trace_function(
                A, name, method=method, num_matvecs=360, lanczos_steps=12, seed=seed
            )
            assert est.num_matvecs <= 360 and est.method == method
            sq.append((float(est) - truth) ** 2)
    rmse = {method: np.sqrt(np.mean(sq)) for method, sq in errors.items()}
    assert rmse["slq++"] < 0.25 * rmse["slq"], rmse


@pytest.mark.parametrize("name", ["log", "exp"])
def test_deflated_estimate_on_every_backend(backend, name):
    """Truth within 4 standard errors plus the quadrature error, on every backend."""
    eigenvalues = 1 + 20 * 0.9 ** np.arange(120)
    A = spd_matrix(eigenvalues, seed=5)
    truth = float(np.sum(FUNCTIONS[name](eigenvalues)))
    est = lt.trace_function(
        backend.matrix(A), name, method="slq++", num_matvecs=240, lanczos_steps=10, seed=1
    )
    # b = 6 columns (60 <= n / 2), s = 10 steps, 8 blocks deflated; 18 probes of 10 steps
    assert deflation_plan(240, 10, 120) == (6, 10, 8, 18)
    assert est.method == "slq++" and est.num_matvecs == 240
    assert est.info["deflated"] == 48
    bound = 4 * float(est.stderr) + float(est.info["systematic_error"])
    assert abs(float(est) - truth) <= bound


def test_indefinite_operator_is_refused():
    indefinite = np.diag(np.linspace(-1.0, 1.0, 200))
    with pytest.raises(ValueError, match="needs a positive definite operator"):
        float(lt.logdet(indefinite, method="slq++", num_matvecs=300, lanczos_steps=10, seed=0))


def test_jax_deflated_estimate_compiles_under_jit_and_agrees():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    A = jnp.asarray(spd_matrix(1 + 10 * 0.9 ** np.arange(60)))
    key = jax.random.key(0)

    def value(M, k):
        return lt.logdet(M, method="slq++", num_matvecs=120, lanczos_steps=6, seed=k).value

    eager = lt.logdet(A, method="slq++", num_matvecs=120, lanczos_steps=6, seed=key)
    assert float(jax.jit(value)(A, key)) == pytest.approx(float(eager), rel=1e-10)


# ---------------------------------------------------------------------- coverage
@pytest.mark.stats
@pytest.mark.parametrize("name", ["log", "exp", "inverse"])
@pytest.mark.parametrize("spectrum", ["flat", "decaying"])
def test_deflated_interval_coverage_over_400_seeds(name, spectrum):
    """The 95% interval (t-interval of the 14 remaining probes, plus the Gauss-Radau
    bound of their quadrature and the change of the block rule from s - 1 blocks) covers
    the truth in at least 93% of 400 seeds (binomial sd 1.1%), on the matrices of
    test_spectral's coverage test, and in at most 97% on the decaying spectrum for log
    and exp, the spectra deflation is for. Elsewhere it is conservative (measured): on the
    flat spectrum 97.75% for log and exp (the deflated probes' forms are lighter-tailed
    than normal: the studentized errors' sd is 1.00 against the t13's 1.08) and 98.25%
    for the inverse on the decaying spectrum (condition ~500: the block rule's error is
    estimated by the error of the smaller rule, an overestimate)."""
    coverage = coverage_over_400_seeds(name, spectrum, "slq++")
    assert coverage >= 0.93
    if spectrum == "decaying" and name != "inverse":
        assert coverage <= 0.97


# ---------------------------------------------------------------- adaptive stopping
@pytest.mark.parametrize("method", ["slq", "slq++"])
def test_tolerance_is_met_by_doubling_rounds_of_probes(backend, method):
    """rtol: rounds of probes (20, then as many as all before: 40, 80, ...) until the 95%
    interval's half-width is at most rtol |value|; the truth lies in that interval."""
    eigenvalues = 1 + 20 * 0.9 ** np.arange(150)
    A = spd_matrix(eigenvalues, seed=6)
    truth = float(np.sum(np.log(eigenvalues)))
    # plain SLQ's probes have sd ~12.6 here (half-width ~5.5 at 20 probes): rtol = 0.04
    # (a half-width of 2.4) needs about 100; deflation's sd is ~1.4, one round
    rtol = 0.04
    est = lt.logdet(backend.matrix(A), method=method, rtol=rtol, lanczos_steps=10, seed=2)
    low, high = est.ci()
    assert est.converged is True
    assert (high - low) / 2 <= rtol * abs(float(est))
    assert low <= truth <= high
    if method == "slq":
        assert est.info["num_probes"] in (80, 160)
        assert est.num_matvecs == 10 * est.info["num_probes"]
    else:
        assert est.info["num_probes"] == deflation_plan(200, 10, 150)[3]  # one round


def test_tolerance_out_of_reach_stops_at_the_cap():
    A = spd_matrix(np.linspace(1.0, 3.0, 200), seed=7)
    est = lt.logdet(A, rtol=1e-9, lanczos_steps=10, max_matvecs=700, seed=0)
    # 20 probes, +20, +30 (what the cap leaves): 70 probes of 10 steps
    assert est.converged is False and est.num_matvecs == 700
    assert est.info["num_probes"] == 70
    with pytest.raises(ValueError, match="`rtol` must be a non-negative number"):
        lt.logdet(A, rtol=-1.0)
    with pytest.raises(ValueError, match="`max_matvecs`=100 is smaller than `num_matvecs`=200"):
        lt.logdet(A, atol=1.0, num_matvecs=200, max_matvecs=100)


# ------------------------------------------------------------ autodiff operators
def _quartic_hessian(library: str, n: int = 50):
    """The Hessian operator of f(x) = x^T M x / 2 + sum(x^4) / 4 at a point, built by
    ``library``'s autodiff, and its dense value M + diag(3 x^2)."""
    M = spd_matrix(np.linspace(1.0, 3.0, n), seed=5)
    x0 = np.random.default_rng(6).standard_normal(n)
    if library == "torch":
        torch = pytest.importorskip("torch")
        xl, Ml, total = torch.tensor(x0), torch.tensor(M), torch.sum
    else:
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        xl, Ml, total = jnp.asarray(x0), jnp.asarray(M), jnp.sum

    def f(x):
        return x @ Ml @ x / 2 + total(x**4) / 4

    return lt.hessian(f, xl), M + np.diag(3 * x0**2)


@pytest.mark.parametrize("library", ["torch", "jax"])
def test_every_spectral_function_on_an_autodiff_hessian(library):
    """slq++, the density and the top eigenvalues over Hessian-vector products, against
    the dense Hessian: the log-determinant within 4 standard errors plus the quadrature
    error, the density's mean (integrate x) within 4 sd of the trace's Hutchinson
    variance, the three largest eigenvalues to the requested tolerance."""
    H, dense = _quartic_hessian(library)
    eigenvalues = np.linalg.eigvalsh(dense)
    est = lt.logdet(H, method="slq++", num_matvecs=300, lanczos_steps=15, seed=0)
    bound = 4 * float(est.stderr) + float(est.info["systematic_error"])
    assert abs(float(est) - np.sum(np.log(eigenvalues))) <= bound
    density = lt.spectral_density(H, num_matvecs=200, lanczos_steps=20, seed=0)
    # integrate(x) / n is the mean of z^T H z / n over 10 probes: Var = 2 sum_{i!=j} H_ij^2
    sd = float(np.sqrt(2 * (np.sum(dense**2) - np.sum(np.diag(dense) ** 2)) / 10))
    assert abs(float(density.integrate(lambda x: x)) - np.trace(dense)) <= 4 * sd
    top = lt.eigenvalues(H, k=3, tol=1e-8, seed=0)
    assert top.converged
    assert np.sort(numpy_of(top.values))[::-1] == pytest.approx(eigenvalues[::-1][:3], rel=1e-6)


# ------------------------------------------------------------ gradients
def _logdet_gradient(library: str, A: np.ndarray, options: dict) -> tuple[np.ndarray, object]:
    """The gradient of ``logdet(A, **options).value`` by ``library``'s autodiff, and the
    estimate's value as a function of a NumPy matrix."""
    if library == "torch":
        torch = pytest.importorskip("torch")
        matrix = torch.tensor(A, requires_grad=True)
        lt.logdet(matrix, **options).value.backward()
        return matrix.grad.numpy(), lambda M: float(lt.logdet(torch.tensor(M), **options))
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    gradient = jax.grad(lambda M: lt.logdet(M, **options).value)(jnp.asarray(A))
    return np.asarray(gradient), lambda M: float(lt.logdet(jnp.asarray(M), **options))


@pytest.mark.parametrize("library", ["torch", "jax"])
@pytest.mark.parametrize("matrix", ["2 I", "two values", "low rank + I"])
def test_slq_plus_plus_gradient_where_eigenvalues_repeat(library, matrix):
    """The deflated log-determinant's gradient was NaN in every entry where A repeats an
    eigenvalue (the projected T repeats it, and eigh's derivative divides by the gaps);
    with the block Gauss rule's Daleckii-Krein gradient it was finite but had entries of
    4e13 for 2 I and a two-valued diagonal: the basis followed the jitter that extends an
    invariant space. Now d log det(A) / dA = A^{-1} up to the probes' noise: entries of
    its size (at most 1 here) and a trace within 10% of tr(A^{-1}) (60 columns, n = 60;
    the deflated part is exact, the residual's few probes are not)."""
    n = 60
    if matrix == "2 I":
        A = 2 * np.eye(n)
    elif matrix == "two values":
        A = np.diag(np.repeat([1.0, 2.0], n // 2))
    else:
        U = np.random.default_rng(0).standard_normal((n, 3))
        A = U @ U.T + np.eye(n)
    options = {"method": "slq++", "num_matvecs": 60, "lanczos_steps": 10, "seed": 1}
    gradient, _ = _logdet_gradient(library, A, options)
    assert np.all(np.isfinite(gradient))
    assert np.max(np.abs(gradient)) < 3, np.max(np.abs(gradient))
    assert np.trace(gradient) == pytest.approx(np.trace(np.linalg.inv(A)), rel=0.1)


@pytest.mark.parametrize("library", ["torch", "jax"])
def test_slq_plus_plus_gradient_is_the_estimates_derivative(library):
    """Where the estimate is differentiable (distinct eigenvalues, no invariant space in
    reach) the gradient is its derivative: the central difference along a symmetric
    direction E agrees to the difference's O(h^2) error and rounding."""
    n = 60
    A = spd_matrix(1 + 20 * 0.8 ** np.arange(n), seed=3)
    E = np.random.default_rng(5).standard_normal((n, n))
    E = (E + E.T) / 2
    options = {"method": "slq++", "num_matvecs": 60, "lanczos_steps": 10, "seed": 1}
    gradient, value = _logdet_gradient(library, A, options)
    h = 1e-6
    central = (value(A + h * E) - value(A - h * E)) / (2 * h)
    assert float(np.sum(gradient * E)) == pytest.approx(central, rel=1e-5)


@pytest.mark.parametrize("method", ["slq", "slq++"])
def test_torch_logdet_derivatives_in_every_mode(method):
    """The Gauss rules' torch Functions were in the old form: torch.func.grad and
    torch.func.jvp raised ("must override the setup_context staticmethod"), forward-mode
    AD hit the products written in place (out=), and double backward went through
    eigenpairs saved without a derivative. Every mode now gives the estimate's
    derivative: reverse, torch.func.grad, torch.func.jvp and forward_ad agree with each
    other and the central difference (O(h^2) and eps |f| / h), and the second derivative
    by double backward with the central difference of the gradient."""
    torch = pytest.importorskip("torch")
    from torch.autograd import forward_ad

    n = 40
    rng = np.random.default_rng(0)
    B = rng.standard_normal((n, n))
    A = torch.tensor(B @ B.T / n + np.eye(n))
    E = torch.tensor((lambda E: (E + E.T) / 2)(rng.standard_normal((n, n))))
    options = {"method": method, "num_matvecs": 40, "lanczos_steps": 8, "seed": 1}

    def value(M):
        return lt.logdet(M, **options).value

    def along(M):  # the gradient at M along E
        M = M.clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(value(M), M)
        return float(torch.sum(gradient * E))

    reverse = along(A)
    by_func_grad = float(torch.sum(torch.func.grad(value)(A) * E))
    by_func_jvp = float(torch.func.jvp(value, (A,), (E,))[1])
    with forward_ad.dual_level():
        by_forward_ad = float(forward_ad.unpack_dual(value(forward_ad.make_dual(A, E))).tangent)
    h = 1e-6
    central = (float(value(A + h * E)) - float(value(A - h * E))) / (2 * h)
    for derivative in (by_func_grad, by_func_jvp, by_forward_ad):
        assert derivative == pytest.approx(reverse, rel=1e-10)
    assert reverse == pytest.approx(central, rel=1e-6)
    M = A.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(value(M), M, create_graph=True)
    (second,) = torch.autograd.grad(torch.sum(gradient * E), M)
    h = 1e-5
    central_second = (along(A + h * E) - along(A - h * E)) / (2 * h)
    assert float(torch.sum(second * E)) == pytest.approx(central_second, rel=1e-5)


@pytest.mark.parametrize("library", ["torch", "jax"])
@pytest.mark.parametrize("rows", [1, 2])
def test_gauss_rule_gradient_takes_divided_differences_of_close_small_nodes(library, rows):
    """The Daleckii-Krein gradient of sum_{i<rows} log(T)_ii uses the divided difference
    (f(a) - f(b)) / (a - b) of two eigenvalues, and the mean of f' only where they are
    within sqrt(eps) of the larger of the two. The test was relative to the largest
    eigenvalue: 1e-9 and 2e-9 next to 1 counted as equal, the mean of slopes 0.75e9 stood
    for log(2) / 1e-9 = 0.69e9, and the gradient along D was 5.7% (block rule) and 5.2%
    (Lanczos rule) off (found by a review). Reference: the formula with exact divided
    differences on the eigenpairs T was built from; eigh's rounding of the small
    eigenvalues (1e-16 absolute, 1e-7 relative) moves it by under 1e-6."""
    from linop_trace import _backend as backend

    k = 4
    rng = np.random.default_rng(0)
    V = np.linalg.qr(rng.standard_normal((k, k)))[0]
    nodes = np.array([1.0, 0.5, 2e-9, 1e-9])
    T = (V * nodes) @ V.T
    T = (T + T.T) / 2
    D = rng.standard_normal((k, k))
    D = (D + D.T) / 2
    gaps = nodes[:, None] - nodes[None, :]
    same = gaps == 0
    divided = np.where(
        same, 1 / nodes[:, None], (np.log(nodes)[:, None] - np.log(nodes)[None, :]) / (gaps + same)
    )
    weights = V[:rows].T @ V[:rows]
    expected = float(np.sum((V @ (divided * weights) @ V.T) * D))

    def log(xp, x):
        return xp.log(x)

    if library == "torch":
        torch = pytest.importorskip("torch")
        import array_api_compat.torch as xp

        matrix = torch.tensor(T, requires_grad=True)
        if rows == 1:
            backend.gauss_rule(xp, matrix[None], log)[0].sum().backward()
        else:
            backend.block_gauss_rule(xp, matrix, rows, log)[0].backward()
        gradient = matrix.grad.numpy()
    else:
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        if rows == 1:
            gradient = jax.grad(lambda M: backend.gauss_rule(jnp, M[None], log)[0][0])(
                jnp.asarray(T)
            )
        else:
            gradient = jax.grad(lambda M: backend.block_gauss_rule(jnp, M, rows, log)[0])(
                jnp.asarray(T)
            )
        gradient = np.asarray(gradient)
    assert float(np.sum(gradient * D)) == pytest.approx(expected, rel=1e-5)


def test_deflated_logdet_gradient_on_a_spectrum_of_ten_orders():
    """The same fault through ``logdet(method="slq++")`` on torch: eigenvalues 1e10 and
    5e9 over fourteen between 1 and 2 (the projected T holds both scales), along a
    direction that moves the small ones only. The gradient was 1.2% off the estimate's
    central difference; it now agrees to the difference's own spread (h = 1e-3 and 1e-4
    differ by 3e-4 relative; smaller h is rounding). (JAX agrees with XLA's default
    compilation, -2.8413 against -2.8438, but not at the test sessions' optimisation level
    0, where reverse mode reads 10.80, -3.97 before this fix, and forward mode -2.8411:
    the deflated estimate's reverse pass loses it to rounding at this conditioning, which
    is open, so JAX is not asserted here.)"""
    library = "torch"
    n = 16
    rng = np.random.default_rng(5)
    V = np.linalg.qr(rng.standard_normal((n, n)))[0]
    A = (V * np.r_[1e10, 5e9, np.linspace(1, 2, n - 2)]) @ V.T
    A = (A + A.T) / 2
    S = rng.standard_normal((n, n))
    S[:2], S[:, :2] = 0, 0  # it moves the eigenvalues between 1 and 2 only
    E = V @ ((S + S.T) / 2) @ V.T
    E = (E + E.T) / 2
    gradient, value = _logdet_gradient(library, A, {"method": "slq++", "seed": 0})
    h = 1e-3
    central = (value(A + h * E) - value(A - h * E)) / (2 * h)
    assert float(np.sum(gradient * E)) == pytest.approx(central, rel=2e-3)
