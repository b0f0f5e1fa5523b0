"""Spectral sums by stochastic Lanczos quadrature: trace_function, logdet, trace_inverse,
trace_exp. Exactness where the quadrature is exact, accuracy against the probes' variance,
the guards, real data, and (``stats``) the interval's coverage over hundreds of seeds."""

from __future__ import annotations

import array_api_compat
import array_api_compat.numpy
import numpy as np
import pytest
import scipy.linalg
import scipy.sparse as sp
import scipy.sparse.linalg
from conftest import numpy_of, rtol_for
from scipy.integrate import trapezoid

import linop_trace as lt
from linop_trace._spectral import batched_lanczos, lanczos_quadrature

FUNCTIONS = {
    "log": np.log,
    "inverse": lambda x: 1 / x,
    "exp": np.exp,
    "sqrt": np.sqrt,
}


def spd_matrix(eigenvalues: np.ndarray, seed: int = 0) -> np.ndarray:
    n = len(eigenvalues)
    basis = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))[0]
    return (basis * eigenvalues) @ basis.T


def matrix_function(A: np.ndarray, f) -> np.ndarray:
    values, vectors = np.linalg.eigh(A)
    return (vectors * f(values)) @ vectors.T


def rademacher_sd(F: np.ndarray, num_probes: int) -> float:
    """Standard deviation of the mean of ``num_probes`` Rademacher quadratic forms
    z^T F z of a symmetric F: Var(z^T F z) = 2 sum_{i != j} F_ij^2."""
    off = np.sum(F**2) - np.sum(np.diag(F) ** 2)
    return float(np.sqrt(2 * off / num_probes))


# ------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("name", ["log", "inverse", "exp", "square"])
def test_exact_method_sums_f_over_the_eigenvalues(backend, name):
    eigenvalues = np.linspace(0.5, 3.0, 40)
    A = spd_matrix(eigenvalues)
    f = (lambda x: x**2) if name == "square" else name
    reference = float(np.sum(eigenvalues**2 if name == "square" else FUNCTIONS[name](eigenvalues)))
    estimate = lt.trace_function(backend.matrix(A), f, method="exact")
    assert estimate.method == "exact" and estimate.num_matvecs == 40
    assert float(estimate) == pytest.approx(reference, rel=1e-10)
    assert float(estimate.stderr) == 0.0


@pytest.mark.parametrize("name", ["log", "inverse", "exp"])
def test_lanczos_over_the_whole_space_is_each_probes_quadratic_form(backend, name):
    """With n steps (and reorthogonalisation) the quadrature is exact for every probe:
    each sample is z^T f(A) z, and the quadrature error is reported as zero."""
    n, num_probes = 12, 4
    A = spd_matrix(np.linspace(0.5, 2.0, n), seed=1)
    operator = backend.matrix(A)
    estimate = lt.trace_function(
        operator,
        name,
        num_matvecs=n * num_probes,
        lanczos_steps=n,
        seed=3,
        reorthogonalize=True,
    )
    probes = numpy_of(lt.rademacher(operator, num_probes, seed=3))
    F = matrix_function(A, FUNCTIONS[name])
    expected = np.einsum("ij,ik,kj->j", probes, F, probes)
    assert numpy_of(estimate.info["samples"]) == pytest.approx(expected, rel=1e-9)
    assert float(estimate) == pytest.approx(expected.mean(), rel=1e-9)
    assert float(estimate.info["systematic_error"]) == 0.0
    assert estimate.num_matvecs == n * num_probes


def test_gauss_rule_is_exact_for_polynomials_of_degree_2k_minus_1(backend):
    """k = 2 Lanczos steps integrate x^3 exactly: each sample is z^T A^3 z."""
    n, num_probes = 60, 5
    A = spd_matrix(np.linspace(1.0, 2.0, n), seed=2)
    operator = backend.matrix(A)
    estimate = lt.trace_function(
        operator, lambda x: x**3, num_matvecs=2 * num_probes, lanczos_steps=2, seed=5
    )
    probes = numpy_of(lt.rademacher(operator, num_probes, seed=5))
    A3 = A @ A @ A
    expected = np.einsum("ij,ik,kj->j", probes, A3, probes)
    assert numpy_of(estimate.info["samples"]) == pytest.approx(expected, rel=1e-9)


def test_float32_keeps_its_dtype_and_agrees(dense_backend):
    A = spd_matrix(np.linspace(1.0, 3.0, 80), seed=4)
    matrix = dense_backend.asarray(A, np.float32)
    estimate = lt.logdet(matrix, num_matvecs=200, lanczos_steps=10, seed=0)
    assert estimate.value.dtype == dense_backend.dtype(np.float32)
    reference = lt.logdet(dense_backend.asarray(A), num_matvecs=200, lanczos_steps=10, seed=0)
    # same probes, same coefficients up to float32 rounding of 10 Lanczos steps
    assert float(estimate) == pytest.approx(float(reference), rel=1e3 * rtol_for(np.float32))


# ------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("name", ["log", "inverse", "exp", "sqrt"])
def test_estimate_and_stderr_agree_with_the_probes_variance(name):
    """Rademacher SLQ with converged quadrature: the error is within 4 theoretical
    standard deviations (sd = sqrt(2 sum_{i!=j} F_ij^2 / m), F = f(A)), and the reported
    stderr is within 30% of that sd (with m = 100 probes the sample sd's own relative
    spread is about 1 / sqrt(2 (m - 1)) = 7%, plus the forms' kurtosis)."""
    eigenvalues = np.linspace(0.5, 2.5, 200)
    A = spd_matrix(eigenvalues, seed=6)
    num_probes = 100
    estimate = lt.trace_function(A, name, num_matvecs=15 * num_probes, lanczos_steps=15, seed=11)
    F = matrix_function(A, FUNCTIONS[name])
    sd = rademacher_sd(F, num_probes)
    systematic = float(estimate.info["systematic_error"])
    assert systematic < 1e-6 * sd  # 15 nodes on a condition number of 5: converged
    assert abs(float(estimate) - np.trace(F)) <= 4 * sd + systematic
    assert float(estimate.stderr) == pytest.approx(sd, rel=0.3)


def test_quadrature_error_bounds_an_undersized_rule():
    """Too few steps for the spectrum (k = 4, condition number 500): the Gauss rule's
    own error is far beyond the Monte-Carlo error, and the reported systematic error
    (Gauss-Radau) bounds it, so the interval still covers."""
    eigenvalues = 0.01 + 5 * 0.98 ** np.arange(200)
    A = spd_matrix(eigenvalues, seed=0)
    truth = float(np.sum(1 / eigenvalues))
    estimate = lt.trace_inverse(A, num_matvecs=4 * 400, lanczos_steps=4, seed=0)
    # the bias of 4-node Gauss on this spectrum, per probe, from the dense quadrature
    bias = abs(float(estimate) - truth)
    assert bias > 5 * float(estimate.stderr)  # the case is the quadrature's, not the probes'
    assert float(estimate.info["systematic_error"]) >= bias - 4 * float(estimate.stderr)
    low, high = estimate.ci()
    assert low <= truth <= high


def test_without_reorthogonalisation_ritz_values_repeat_but_the_quadrature_holds():
    """float32 Lanczos without reorthogonalisation (the default) repeats converged Ritz
    values ("ghosts"); with it the nodes are distinct. The quadrature of log agrees to
    float32 rounding either way (the ghosts' weights add up to the one node's)."""
    rng = np.random.default_rng(0)
    n = 400
    eigenvalues = np.concatenate([np.linspace(1, 2, n - 5), [50, 60, 70, 80, 90]])
    A = spd_matrix(eigenvalues, seed=3).astype(np.float32)
    probes = rng.choice([-1.0, 1.0], size=(n, 2)).astype(np.float32)
    xp = array_api_compat.numpy  # the namespace the library passes (NumPy 1.x has no isdtype)
    values = []
    for reorthogonalize, expect_ghosts in ((False, True), (True, False)):
        alphas, betas = batched_lanczos(lambda X: A @ X, probes, 60, xp, reorthogonalize)
        quadrature, _, nodes, _ = lanczos_quadrature(alphas, betas, lambda xp, x: xp.log(x), xp)
        top = np.sort(nodes[0])[-10:]
        ghosts = np.sum(np.abs(np.diff(top)) < 1e-3 * top[1:])
        assert (ghosts > 0) == expect_ghosts
        values.append(quadrature)
    assert values[0] == pytest.approx(values[1], rel=1e-5)
    assert not lt.logdet(A, num_matvecs=40, lanczos_steps=20, seed=0).info["reorthogonalized"]


def test_lanczos_on_torch_cpu_allocates_no_block_per_step():
    """On torch's CPU the recurrence works in reused blocks: the products are written into
    one (a CSR product of a 2-d Laplacian at n = 10^5 took 3.7x as long when each fresh
    result was faulted in page by page), the three-term update and the next vector into
    the others. The number of fresh (n, m) tensors must not grow with the number of steps;
    it grew by two a step (each product, and the finiteness check's temporary). (n is
    large enough for the column sums to go in cache-sized row chunks.)"""
    torch = pytest.importorskip("torch")
    from torch.overrides import TorchFunctionMode

    from linop_trace._functions import CountingMatmat

    n, m = 40_000, 16
    M = sp.diags([-np.ones(n - 1), 3 * np.ones(n), -np.ones(n - 1)], [-1, 0, 1], format="csr")
    held = torch.sparse_csr_tensor(
        torch.from_numpy(M.indptr.astype(np.int64)),
        torch.from_numpy(M.indices.astype(np.int64)),
        torch.from_numpy(M.data),
        size=M.shape,
    )

    class FreshBlocks(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if isinstance(result, torch.Tensor) and result.numel() >= n * m:
                given = [
                    a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)
                ]
                if all(
                    result.data_ptr() != a.data_ptr() for a in given if a.layout == torch.strided
                ):
                    self.count += 1  # (not a view of an argument, nor written into one)
            return result

    probes = torch.from_numpy(np.random.default_rng(0).choice([-1.0, 1.0], (n, m)))
    counts = []
    for steps in (4, 12):
        matmat = CountingMatmat(lt.aslinearoperator(held))
        with FreshBlocks() as mode:
            alphas, betas = batched_lanczos(matmat, probes, steps, array_api_compat.torch, False)
        counts.append(mode.count)
        assert matmat.columns == steps * m
    assert counts[0] == counts[1], counts
    # the same recurrence with fresh products (a plain callable: no block to write into)
    plain = batched_lanczos(lambda X: held @ X, probes, 12, array_api_compat.torch, False)
    np.testing.assert_allclose(numpy_of(alphas), numpy_of(plain[0]), rtol=1e-12)
    np.testing.assert_allclose(numpy_of(betas), numpy_of(plain[1]), rtol=1e-12)


# --------------------------------------------------------------------------- guards
def test_indefinite_or_singular_operator_is_refused(backend):
    indefinite = backend.matrix(np.diag(np.linspace(-1.0, 1.0, 50)))
    for function in (lt.logdet, lt.trace_inverse):
        with pytest.raises(ValueError, match="needs a positive definite operator"):
            float(function(indefinite, num_matvecs=100, lanczos_steps=10, seed=0))
    singular = backend.matrix(np.diag(np.concatenate([np.zeros(5), np.linspace(1, 2, 45)])))
    with pytest.raises(ValueError, match="indefinite or singular"):
        float(lt.logdet(singular, method="exact"))
    # exp needs no definiteness
    value = float(lt.trace_exp(indefinite, num_matvecs=100, lanczos_steps=10, seed=0))
    assert np.isfinite(value)


def test_bad_arguments_are_named():
    A = np.eye(30)
    with pytest.raises(ValueError, match="unknown function 'cosh'"):
        lt.trace_function(A, "cosh")
    with pytest.raises(TypeError, match="f must be a function name or a callable"):
        lt.trace_function(A, 3)
    with pytest.raises(ValueError, match="unknown method 'hutchinson'"):
        lt.trace_function(A, "log", method="hutchinson")
    with pytest.raises(ValueError, match=r"at least 2 probes of 10 Lanczos steps.*>= 20"):
        lt.logdet(A, num_matvecs=19, lanczos_steps=10)
    with pytest.raises(ValueError, match="`lanczos_steps` must be >= 2"):
        lt.logdet(A, lanczos_steps=1)
    with pytest.raises(ValueError, match=r"square operator, got shape \(3, 4\)"):
        lt.logdet(np.ones((3, 4)))
    with pytest.raises(ValueError, match="spectrum_bounds must be"):
        lt.logdet(A, spectrum_bounds=(2.0, 1.0), seed=0)


def test_overflowing_function_is_named():
    """tr exp(A) with an eigenvalue of 100 is beyond float32 (exp(88.7) is its largest)."""
    A = np.diag(np.linspace(1.0, 100.0, 50)).astype(np.float32)
    with pytest.raises(FloatingPointError, match="'exp' of the Ritz values is not finite"):
        float(lt.trace_exp(A, num_matvecs=100, lanczos_steps=10, seed=0))


def test_non_finite_product_is_named():
    A = np.eye(30)
    A[3, 3] = np.nan
    with pytest.raises(FloatingPointError, match="non-finite"):
        lt.trace_exp(A, num_matvecs=40, lanczos_steps=5, seed=0)


@pytest.mark.parametrize("step", [0, 3])
def test_a_non_finite_product_at_any_lanczos_step_is_named(backend, step):
    """Lanczos checks its products through its coefficients (each alpha_j = q_j^H A q_j
    takes in every entry of A q_j), not one pass per product: a NaN that the operator
    returns at one step, in one entry of one column, still raises, on every backend
    (at once on NumPy, when the value is read elsewhere)."""
    n, m, steps = 30, 4, 5
    A = backend.asarray(spd_matrix(np.linspace(1.0, 2.0, n)))
    calls = []

    def matmat(X):
        calls.append(1)
        product = A @ X
        if len(calls) == step + 1:  # one entry of this step's product
            mask = np.zeros((n, m))
            mask[7, 2] = 1.0
            product = product + backend.asarray(mask) * float("nan")
        return product

    operator = lt.LinearOperator.from_callable(matmat=matmat, shape=(n, n), like=A)
    with pytest.raises(FloatingPointError, match="non-finite"):
        estimate = lt.logdet(operator, num_matvecs=m * steps, lanczos_steps=steps, seed=0)
        float(estimate)
    assert len(calls) == steps


def test_lanczos_makes_no_pass_over_its_products_to_check_them(monkeypatch):
    """The finiteness of SLQ's products is read from the (m, k) coefficients once, not
    from each (n, m) product (a pass that cost a tenth of a cheap sparse product); a
    product taken unchecked and never covered is an error, not a silent skip."""
    from linop_trace import _backend
    from linop_trace.estimators._base import CountingMatmat

    checked_shapes = []
    original = _backend.all_finite

    def spy(xp, x):
        checked_shapes.append(tuple(x.shape))
        return original(xp, x)

    monkeypatch.setattr(_backend, "all_finite", spy)
    n, m, steps = 200, 6, 8
    A = sp.diags([-np.ones(n - 1), 3 * np.ones(n), -np.ones(n - 1)], [-1, 0, 1], format="csr")
    lt.logdet(A, num_matvecs=m * steps, lanczos_steps=steps, seed=0)
    assert (m, steps) in checked_shapes
    assert not [shape for shape in checked_shapes if n in shape]
    matmat = CountingMatmat(lt.aslinearoperator(A))
    matmat(np.ones((n, 2)), covered=True)
    with pytest.raises(RuntimeError, match="never covered"):
        matmat.deferred_checks()


def test_known_spectrum_bounds_are_used():
    eigenvalues = np.linspace(1.0, 4.0, 100)
    A = spd_matrix(eigenvalues, seed=8)
    tight = lt.trace_inverse(A, num_matvecs=60, lanczos_steps=3, seed=0, spectrum_bounds=(1, 4))
    loose = lt.trace_inverse(A, num_matvecs=60, lanczos_steps=3, seed=0, spectrum_bounds=(0.1, 40))
    assert float(tight) == float(loose)  # the bounds change the error bar, not the value
    assert float(loose.info["systematic_error"]) > float(tight.info["systematic_error"])
    truth = float(np.sum(1 / eigenvalues))
    # with true bounds, each probe's Gauss and Radau rules bracket its quadratic form
    assert abs(float(tight) - truth) <= float(tight.info["systematic_error"]) + 4 * float(
        tight.stderr
    )


def test_known_bounds_are_used_as_given_and_bracket_every_probe():
    """Eigenvalues logspace(-2, 2) (condition 1e4), 20 steps: with the exact bounds each
    probe's Gauss rule and its Gauss-Radau rules bracket the probe's quadratic form
    (Golub and Meurant), so the per-probe errors bound the quadrature's. The low end was
    raised to half the smallest Ritz value even when given (above lambda_min: the bracket
    failed for most probes, and the interval covered 27 of 100 seeds), and a Ritz value
    converged onto lambda_max = 100 made the error bound NaN (33 of 50 seeds)."""
    eigenvalues = np.logspace(-2, 2, 100)
    A = spd_matrix(eigenvalues, seed=1)
    inverse = matrix_function(A, lambda x: 1 / x)
    for seed in range(4):
        estimate = lt.trace_inverse(A, seed=seed, spectrum_bounds=(0.01, 100.0))
        systematic = float(estimate.info["systematic_error"])
        assert np.isfinite(systematic)
        low, high = estimate.ci()
        assert low <= float(np.sum(1 / eigenvalues)) <= high
    # per probe, from the Lanczos coefficients: |z^T A^-1 z / |z|^2 - Gauss| <= error
    probes = np.random.default_rng(0).choice([-1.0, 1.0], size=(100, 20))
    xp = array_api_compat.numpy
    alphas, betas = batched_lanczos(lambda X: A @ X, probes, 20, xp, False)
    ends = (np.asarray(0.01), np.asarray(100.0))
    values, error, _, _ = lanczos_quadrature(
        alphas, betas, lambda xp, x: 1 / x, xp, ends, positive=True
    )
    exact = np.einsum("ij,ij->j", probes, inverse @ probes) / 100
    assert np.all(np.isfinite(error))
    assert np.all(np.abs(exact - values) <= error * (1 + 1e-8))


def test_known_bounds_need_a_positive_low_end_for_positive_functions():
    A = spd_matrix(np.linspace(1.0, 2.0, 20))
    for f in (lt.logdet, lt.trace_inverse):
        with pytest.raises(ValueError, match="low > 0"):
            f(A, seed=0, spectrum_bounds=(0.0, 2.0))
    lt.trace_exp(A, seed=0, spectrum_bounds=(0.0, 2.0))  # exp is defined everywhere


# ------------------------------------------------------------------------------ JAX
def test_jax_estimate_compiles_under_jit_and_agrees():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    A = jnp.asarray(spd_matrix(np.linspace(0.5, 2.0, 60)))
    key = jax.random.key(0)
    compiled = jax.jit(lambda M, k: lt.logdet(M, num_matvecs=60, lanczos_steps=6, seed=k).value)
    eager = lt.logdet(A, num_matvecs=60, lanczos_steps=6, seed=key)
    assert float(compiled(A, key)) == pytest.approx(float(eager), rel=1e-10)


# ------------------------------------------------------------------------ real data
def _primitive_count(jaxpr, name):
    """Equations of primitive ``name`` in a jaxpr and the jaxprs nested in it."""
    count = 0
    for equation in jaxpr.eqns:
        count += equation.primitive.name == name
        for value in equation.params.values():
            for inner in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    count += _primitive_count(inner, name)
    return count


def test_jax_quadrature_runs_its_batched_eigensolvers_one_after_the_other():
    """Under JAX on the CPU two batched ``eigh`` calls that a program may run at once can
    each wait for the thread pool the other holds (jaxlib 0.10 on two cores: an eager
    ``jax.grad`` of ``logdet`` hung in 5 of 6 runs). The quadrature has one ``eigh`` of
    the Lanczos matrices and one of both Gauss-Radau extensions, which depend on the
    first's eigenpairs; it had four (the spectrum's ends solved the same matrices again,
    and the two extensions went one call each)."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    alphas = jnp.asarray(2.0 + rng.random((6, 5)))
    betas = jnp.asarray(0.1 + 0.1 * rng.random((6, 5)))
    for ends in (None, (jnp.asarray(0.5), jnp.asarray(4.0))):

        def quadrature(alphas, betas, ends=ends):
            return lanczos_quadrature(alphas, betas, lambda xp, x: xp.log(x), jnp, ends, True)

        for program in (quadrature, jax.grad(lambda a, b: jnp.sum(quadrature(a, b)[0]))):
            jaxpr = jax.make_jaxpr(program)(alphas, betas).jaxpr
            assert _primitive_count(jaxpr, "eigh") == 2


def test_jax_logdet_second_derivative_agrees_with_differences_of_the_gradient():
    """The gradient's rule (Daleckii-Krein) is a differentiable function of the Lanczos
    matrices: forward over reverse gives the derivative of the gradient (with the
    eigenpairs held fixed it read -4.31 where the gradient's difference is -4.63).
    Central differences of the gradient: error ~ h^2 (~1e-8 here) plus eps / h."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    rng = np.random.default_rng(4)
    n = 20
    M = rng.standard_normal((n, n))
    A = jnp.asarray(M @ M.T / n + 0.5 * np.eye(n))
    V = rng.standard_normal((n, n))
    V = jnp.asarray((V + V.T) / 20)
    key = jax.random.key(0)

    def f(t):
        return lt.logdet(A + t * V, num_matvecs=20, lanczos_steps=5, seed=key).value

    t0, h = 0.2, 1e-4
    second = float(jax.hessian(f)(t0))
    gradient = jax.grad(f)
    differences = float((gradient(t0 + h) - gradient(t0 - h)) / (2 * h))
    assert second == pytest.approx(differences, rel=1e-6)


def test_jax_logdet_gradient_does_not_hang():
    """The case that hung (above), run in a process of its own with a time limit:
    twelve eager gradients of a log-determinant on a matrix with three outliers."""
    pytest.importorskip("jax")
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        jax.config.update("jax_enable_x64", True)
        import linop_trace as lt
        n = 100
        Q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((n, n)))
        A = jnp.asarray((Q * np.r_[np.linspace(1, 2, n - 3), 50, 100, 200]) @ Q.T)
        for seed in range(6):
            for steps in (10, 20):
                g = jax.grad(lambda M: lt.logdet(M, seed=seed, lanczos_steps=steps).value)(A)
                assert np.all(np.isfinite(np.asarray(g)))
        print("done")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "done"


def test_logdet_of_a_2d_poisson_matrix_against_sparse_lu():
    """The 5-point Laplacian on a 40 x 40 grid (pyamg.gallery.poisson's matrix), log det
    by sparse LU: the estimate within 4 standard errors plus the quadrature error."""
    grid = 40
    one_d = sp.diags([-np.ones(grid - 1), 2 * np.ones(grid), -np.ones(grid - 1)], [-1, 0, 1])
    A = (sp.kron(one_d, sp.identity(grid)) + sp.kron(sp.identity(grid), one_d)).tocsc()
    lu = scipy.sparse.linalg.splu(A)
    truth = float(np.sum(np.log(np.abs(lu.U.diagonal()))))
    estimate = lt.logdet(A, num_matvecs=40 * 50, lanczos_steps=40, seed=0)
    error = abs(float(estimate) - truth)
    assert error <= 4 * float(estimate.stderr) + float(estimate.info["systematic_error"])
    assert error < 0.01 * abs(truth)


def test_logdet_of_an_rbf_kernel_on_digits_against_cholesky():
    """A GP's kernel matrix: RBF on 500 scikit-learn digits plus noise 0.1 I."""
    from sklearn.datasets import load_digits

    X = load_digits().data[:500] / 16.0
    squared = np.sum(X**2, axis=1)
    distances = squared[:, None] + squared[None, :] - 2 * X @ X.T
    K = np.exp(-np.maximum(distances, 0) / (2 * 4.0**2)) + 0.1 * np.eye(500)
    truth = 2 * float(np.sum(np.log(np.diag(scipy.linalg.cholesky(K)))))
    estimate = lt.logdet(K, num_matvecs=30 * 40, lanczos_steps=30, seed=1)
    sd = rademacher_sd(matrix_function(K, np.log), 40)
    assert abs(float(estimate) - truth) <= 4 * sd + float(estimate.info["systematic_error"])


@pytest.mark.parametrize("graph", ["karate_club_graph", "les_miserables_graph"])
def test_estrada_index_of_networkx_graphs_against_expm(graph):
    nx = pytest.importorskip("networkx")
    A = nx.to_numpy_array(getattr(nx, graph)(), weight=None)
    truth = float(np.trace(scipy.linalg.expm(A)))
    estimate = lt.trace_exp(A, num_matvecs=20 * 60, lanczos_steps=20, seed=2)
    sd = rademacher_sd(scipy.linalg.expm(A), 60)
    assert abs(float(estimate) - truth) <= 4 * sd + float(estimate.info["systematic_error"])
    low, high = estimate.ci()
    # the interval's width is that of the probes' variance: 2 t_{0.975, 59} sd, within
    # the sample sd's spread at 60 probes (the matrix exponential of a graph is dominated
    # by its top eigenvector, so plain SLQ's relative error here is 10-15%)
    assert (high - low) / (2 * 2.0 * sd) == pytest.approx(1.0, abs=0.4)


def test_trace_inverse_at_n_2000_against_a_dense_inverse():
    rng = np.random.default_rng(3)
    G = rng.standard_normal((2000, 2000)) / np.sqrt(2000)
    A = G @ G.T + 0.5 * np.eye(2000)  # Marchenko-Pastur spectrum shifted by 0.5
    truth = float(np.trace(np.linalg.inv(A)))
    estimate = lt.trace_inverse(A, num_matvecs=30 * 30, lanczos_steps=30, seed=4)
    low, high = estimate.ci()
    assert low <= truth <= high
    assert (high - low) / truth < 0.05


# ---------------------------------------------------------------------- coverage
def coverage_over_400_seeds(name: str, spectrum: str, method: str) -> float:
    """Share of 400 seeds whose 95% interval (300 columns, 15 Lanczos steps) covers
    tr f(A), n = 200: a flat spectrum (condition 3) or a decaying one (condition ~500)."""
    n = 200
    if spectrum == "flat":
        eigenvalues = np.linspace(1.0, 3.0, n)
    else:
        eigenvalues = 0.01 + 5 * 0.98 ** np.arange(n)
    A = spd_matrix(eigenvalues, seed=0)
    truth = float(np.sum(FUNCTIONS[name](eigenvalues)))
    hits = 0
    for seed in range(400):
        estimate = lt.trace_function(
            A, name, method=method, num_matvecs=300, lanczos_steps=15, seed=seed
        )
        low, high = estimate.ci()
        hits += low <= truth <= high
    return hits / 400


@pytest.mark.stats
@pytest.mark.parametrize("name", ["log", "inverse", "exp"])
@pytest.mark.parametrize("spectrum", ["flat", "decaying"])
def test_interval_coverage_over_400_seeds(name, spectrum):
    """The 95% interval (t-interval of 20 probes plus the quadrature bound) covers the
    truth in 93-97% of 400 seeds (binomial sd 1.1%), on a flat spectrum (condition 3)
    and a decaying one (condition ~500, where the quadrature error is not negligible for
    the inverse)."""
    assert 0.93 <= coverage_over_400_seeds(name, spectrum, "slq") <= 0.97


# ------------------------------------------------------------------ autodiff operators
@pytest.mark.parametrize("library", ["torch", "jax"])
def test_logdet_of_an_autodiff_hessian(library):
    """The Hessian of f(x) = x^T M x / 2 + sum(x^4) / 4 at x is M + diag(3 x^2): SLQ over
    Hessian-vector products against the dense log-determinant."""
    n = 50
    M = spd_matrix(np.linspace(1.0, 3.0, n), seed=5)
    x0 = np.random.default_rng(6).standard_normal(n)
    H = M + np.diag(3 * x0**2)
    truth = float(np.linalg.slogdet(H)[1])
    if library == "torch":
        torch = pytest.importorskip("torch")
        Mt = torch.tensor(M)

        def f(x):
            return x @ Mt @ x / 2 + torch.sum(x**4) / 4

        x = torch.tensor(x0)
    else:
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        Mj = jnp.asarray(M)

        def f(x):
            return x @ Mj @ x / 2 + jnp.sum(x**4) / 4

        x = jnp.asarray(x0)
    estimate = lt.logdet(lt.hessian(f, x), num_matvecs=n * 4, lanczos_steps=n, seed=0)
    sd = rademacher_sd(matrix_function(H, np.log), 4)
    assert abs(float(estimate) - truth) <= 4 * sd
    assert estimate.num_matvecs == n * 4


# ---------------------------------------------------------------- spectral densities
def test_density_of_a_diagonal_matrix_over_the_whole_space_is_exact(backend):
    """Rademacher probes see every eigenvector of a diagonal matrix with weight 1/n, so
    n Lanczos steps (reorthogonalised) give exactly the eigenvalue distribution."""
    eigenvalues = np.array([0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0, 8.0, 9.0, 10.0, 12.0])
    n = len(eigenvalues)
    density = lt.spectral_density(
        backend.matrix(np.diag(eigenvalues)),
        num_matvecs=3 * n,
        lanczos_steps=n,
        seed=0,
        reorthogonalize=True,
    )
    values, masses = density.atoms()
    assert masses.sum() == pytest.approx(1.0, abs=1e-12)
    points = np.array([0.0, 0.75, 2.5, 6.0, 11.0, 13.0])
    expected = np.array([np.mean(eigenvalues <= t) for t in points])
    assert density.cdf(points) == pytest.approx(expected, abs=1e-9)
    assert density.num_matvecs == 3 * n and density.n == n


def test_density_integrates_to_one_and_integrate_matches_trace_function():
    eigenvalues = np.concatenate([np.linspace(0.0, 1.0, 300), [5.0, 6.0]])
    A = spd_matrix(eigenvalues, seed=2)
    density = lt.spectral_density(A, num_matvecs=600, lanczos_steps=30, seed=1)
    points = density.grid(4096)
    assert trapezoid(density.density(points), points) == pytest.approx(1.0, abs=1e-3)
    assert density.cdf([-1.0, 2.0, 7.0]) == pytest.approx([0.0, 300 / 302, 1.0], abs=0.01)
    squares = density.integrate(lambda x: x**2)
    reference = lt.trace_function(
        A, lambda x: x**2, num_matvecs=600, lanczos_steps=30, seed=1
    )  # the same probes and rules
    assert float(squares) == pytest.approx(float(reference), rel=1e-12)
    assert float(squares.stderr) == pytest.approx(float(reference.stderr), rel=1e-12)
    with pytest.raises(ValueError, match="width must be positive"):
        density.density(width=0.0)


def test_density_of_the_digits_mlp_hessian_against_eigvalsh():
    """The Hessian of the digits MLP (1,480 parameters; BackPACK's example) from 20
    probes of 30 Hessian-vector-product steps: Wasserstein-1 distance to the dense
    eigenvalues below 0.2% of the spectrum's range (measured 0.08%), and below a tenth of
    that of the best single point (all mass at the mean eigenvalue)."""
    torch = pytest.importorskip("torch")
    from scipy.stats import wasserstein_distance

    from linop_trace.autodiff._examples import digits_mlp_problem

    model, loss_fn, (X, y) = digits_mlp_problem(batch_size=256, seed=0, dtype=torch.float64)
    H = lt.hessian(model, loss_fn, (X, y))
    eigenvalues = np.linalg.eigvalsh(numpy_of(H.to_dense()))
    density = lt.spectral_density(H, num_matvecs=600, lanczos_steps=30, seed=0)
    values, masses = density.atoms()
    distance = wasserstein_distance(values, eigenvalues, u_weights=masses)
    spread = eigenvalues[-1] - eigenvalues[0]
    assert distance < 0.002 * spread
    assert distance < 0.1 * np.mean(np.abs(eigenvalues - eigenvalues.mean()))
    # the top eigenvalue is an atom (the extreme Ritz values converge first)
    assert values.max() == pytest.approx(eigenvalues[-1], rel=1e-8)


def test_density_plot_draws_the_smoothed_density(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (optional)")
    import matplotlib

    matplotlib.use("Agg")
    density = lt.spectral_density(np.diag(np.linspace(1, 2, 100)), num_matvecs=200, seed=0)
    ax = density.plot(num=200, log=True)
    (line,) = ax.get_lines()
    x, y = line.get_data()
    assert len(x) == 200 and np.allclose(y, density.density(x))
    assert ax.get_yscale() == "log"
    ax.figure.savefig(tmp_path / "density.png")
    assert (tmp_path / "density.png").stat().st_size > 0


def test_density_refuses_bad_operators():
    with pytest.raises(ValueError, match="square operator"):
        lt.spectral_density(np.ones((3, 4)))
    with pytest.raises(ValueError, match="non-empty"):
        lt.spectral_density(np.zeros((0, 0)))


# ---------------------------------------------------------------- extreme eigenvalues
@pytest.mark.parametrize("which", ["largest", "smallest", "both_ends"])
def test_extreme_eigenvalues_against_the_known_spectrum(backend, which):
    eigenvalues = np.concatenate([np.linspace(0.0, 1.0, 190), np.linspace(2.0, 5.0, 10)])
    A = spd_matrix(eigenvalues - 0.5, seed=4)  # shifted: both ends away from zero
    result = lt.eigenvalues(
        backend.matrix(A), k=4, which=which, tol=1e-9, seed=0, return_vectors=True
    )
    ordered = np.sort(eigenvalues - 0.5)
    expected = {
        "largest": ordered[::-1][:4],
        "smallest": ordered[:4],
        "both_ends": np.concatenate([ordered[:2], ordered[-2:]]),
    }[which]
    values = numpy_of(result.values)
    norms = numpy_of(result.residual_norms)
    assert result.converged and result.num_matvecs <= 2000
    # each Ritz value lies within its residual norm of an eigenvalue; with converged
    # residuals (<= 1e-9 * 4.5) and these gaps, of the one expected
    assert values == pytest.approx(expected, abs=1e-8)
    assert np.all(norms <= 1e-9 * 4.5 * (1 + 1e-12))
    vectors = numpy_of(result.vectors)
    assert np.abs(vectors.T @ vectors - np.eye(4)).max() < 1e-10
    assert np.linalg.norm(A @ vectors - vectors * values, axis=0) == pytest.approx(norms, abs=1e-12)


@pytest.mark.parametrize("which", ["largest", "smallest", "both_ends"])
def test_extreme_eigenvalues_when_the_krylov_space_is_invariant(backend, which):
    """I plus a rank-two part, rotated: the block Krylov space of k + 2 start vectors is
    invariant after one block (three distinct eigenvalues), and the next projected block
    is rounding errors. Orthonormalised as it stood it carried O(1) components along the
    basis: the smallest two came out 0 (converged, residuals 1e-15, "unit" vectors of
    norm 1e-15) and the largest 500 for a norm of 10."""
    eigenvalues = np.concatenate([np.ones(18), [5.0, 10.0]])
    A = spd_matrix(eigenvalues, seed=2)
    result = lt.eigenvalues(backend.matrix(A), k=2, which=which, seed=0, return_vectors=True)
    expected = {"largest": [10.0, 5.0], "smallest": [1.0, 1.0], "both_ends": [1.0, 10.0]}[which]
    assert result.converged
    assert numpy_of(result.values) == pytest.approx(expected, abs=1e-8)
    vectors = numpy_of(result.vectors)
    assert np.abs(vectors.T @ vectors - np.eye(2)).max() < 1e-8
    values = numpy_of(result.values)
    assert np.all(np.linalg.norm(A @ vectors - vectors * values, axis=0) <= 1e-8)


def test_top_eigenvalues_of_the_digits_mlp_hessian():
    """The five largest eigenvalues of the digits-MLP Hessian (1,480 parameters) from
    Hessian-vector products, to tol 1e-8: within the returned residual norms of the
    dense eigvalsh values."""
    torch = pytest.importorskip("torch")
    from linop_trace.autodiff._examples import digits_mlp_problem

    model, loss_fn, (X, y) = digits_mlp_problem(batch_size=256, seed=0, dtype=torch.float64)
    H = lt.hessian(model, loss_fn, (X, y))
    top = np.sort(np.linalg.eigvalsh(numpy_of(H.to_dense())))[::-1][:5]
    result = lt.eigenvalues(H, k=5, tol=1e-8, seed=0)
    values = numpy_of(result.values)
    assert result.converged
    assert np.all(np.abs(values - top) <= numpy_of(result.residual_norms) + 1e-12)
    assert np.all(numpy_of(result.residual_norms) <= 1e-8 * top[0])


def test_eigenvalues_budget_and_arguments():
    A = np.diag(np.linspace(0.0, 1.0, 400))  # a dense cluster: slow to resolve
    with pytest.warns(RuntimeWarning, match="raise max_matvecs"):
        result = lt.eigenvalues(A, k=5, which="smallest", tol=1e-12, max_matvecs=60, seed=0)
    assert not result.converged and result.num_matvecs <= 60
    with pytest.raises(ValueError, match="k = 5 eigenvalues asked of an operator of size n = 4"):
        lt.eigenvalues(np.eye(4), k=5)
    with pytest.raises(ValueError, match="unknown which='middle'"):
        lt.eigenvalues(A, which="middle")
    with pytest.raises(ValueError, match="tol must be a positive number"):
        lt.eigenvalues(A, tol=0)
    with pytest.raises(ValueError, match="tol must be a positive number"):
        lt.eigenvalues(A, tol=np.nan)
    # a NumPy scalar is a number (it was refused)
    assert lt.eigenvalues(np.diag([1.0, 2.0, 3.0]), k=1, tol=np.float32(1e-6), seed=0).converged
    with pytest.raises(ValueError, match="square operator"):
        lt.eigenvalues(np.ones((3, 4)))


# ------------------------------------------------------------------ PyAMG's gallery
@pytest.mark.parametrize("name", ["poisson", "bar"])
def test_logdet_of_pyamg_gallery_matrices_against_sparse_lu(name):
    """SPD matrices as PyAMG builds and ships them: ``poisson((40, 40))`` (the 5-point
    Laplacian, n = 1600, condition number about 700) and ``load_example("bar")`` (a
    linear-elasticity bar, n = 600, condition number about 3e4). The other SPD examples
    are ``airfoil``, ``knot`` and ``unit_cube``; ``unit_square`` is singular (an
    eigenvalue of -2e-15), ``helmholtz_2D`` indefinite, ``recirc_flow`` not symmetric.

    log det from sparse LU in SuperLU's symmetric mode (the same permutation on rows and
    columns, pivots on the diagonal), whose pivots U_ii are those of the Cholesky
    factorisation squared: all positive for an SPD matrix, log det = sum log U_ii
    (default partial pivoting gives two negative pivots on ``bar``).

    50 probes of 40 steps: the exact value lies in the estimate's own 95% interval.
    Measured over 200 seeds it did at 95% (poisson) and 98% (bar) of them, so the seed
    is fixed; seed 1 is one that covers for both. The interval is 1.3% (poisson) and
    0.75% (bar) of the value wide."""
    try:
        import pyamg
    except ImportError as error:  # e.g. pyamg 5.3 with SciPy 1.11 (no eye_array)
        pytest.skip(f"pyamg cannot be imported here: {error}")
    if name == "poisson":
        A = pyamg.gallery.poisson((40, 40), format="csr")
        max_relative_width = 0.02
    else:
        A = sp.csr_matrix(pyamg.gallery.load_example(name)["A"])
        max_relative_width = 0.01
    lu = scipy.sparse.linalg.splu(
        A.tocsc(),
        permc_spec="MMD_AT_PLUS_A",
        diag_pivot_thresh=0.0,
        options={"SymmetricMode": True},
    )
    assert np.array_equal(lu.perm_r, lu.perm_c)  # a symmetric permutation: P A P^T = L U
    diagonal = lu.U.diagonal()
    assert np.all(diagonal > 0)  # SPD
    truth = float(np.sum(np.log(diagonal)))
    estimate = lt.logdet(A, num_matvecs=40 * 50, lanczos_steps=40, seed=1)
    low, high = estimate.ci()
    assert low <= truth <= high
    assert (high - low) / abs(truth) < max_relative_width


@pytest.mark.parametrize("library", ["torch", "jax"])
def test_logdet_gradient_flows_through_lanczos(library):
    """The SLQ log-determinant of B + s I is differentiable in s through the Lanczos
    recurrence (torch autograd: the products then carry a gradient and are not written
    in place; jax.grad): the gradient equals the central difference of the same estimate
    (the library's own probes for the seed, a smooth function of s) to its O(h^2) error,
    and lies near the exact d/ds log det = tr (B + s I)^-1."""
    n, num_probes, steps, s0, h = 40, 8, 6, 0.3, 1e-5
    B = spd_matrix(np.linspace(0.5, 2.0, n), seed=2)
    options = {"num_matvecs": num_probes * steps, "lanczos_steps": steps, "seed": 5}
    if library == "torch":
        torch = pytest.importorskip("torch")

        def matrix(s):
            return torch.from_numpy(B) + s * torch.eye(n, dtype=torch.float64)

        shift = torch.tensor(s0, dtype=torch.float64, requires_grad=True)
        lt.logdet(matrix(shift), **options).value.backward()
        gradient = float(shift.grad)
    else:
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        def matrix(s):
            return jnp.asarray(B) + s * jnp.eye(n)

        gradient = float(jax.grad(lambda s: lt.logdet(matrix(s), **options).value)(s0))
    values = [float(numpy_of(lt.logdet(matrix(s), **options).value)) for s in (s0 + h, s0 - h)]
    central = (values[0] - values[1]) / (2 * h)
    # central difference: error ~ h^2 |f'''| (~1e-10 here) plus rounding ~ eps |f| / h
    assert gradient == pytest.approx(central, rel=1e-6)
    exact = float(np.sum(1 / (np.linspace(0.5, 2.0, n) + s0)))
    assert gradient == pytest.approx(exact, rel=0.1)  # 8 Rademacher probes: within ~3 sd


@pytest.mark.parametrize("library", ["torch", "jax"])
def test_logdet_gradient_with_repeated_ritz_values(library):
    """Three outliers and 20 steps without reorthogonalisation: Lanczos repeats the
    converged outliers ("ghosts"), and eigh's own backward pass divides by the gaps
    between eigenvalues: the gradient was NaN in every entry (torch and JAX). With the
    Daleckii-Krein gradient of e_1^T log(T) e_1 it is finite and equals the central
    difference of the same estimate along a symmetric direction E, to the difference's
    O(h^2) error and rounding (eps |f| / h ~ 1e-9)."""
    n = 100
    eigenvalues = np.concatenate([np.linspace(1.0, 2.0, n - 3), [50.0, 100.0, 200.0]])
    A = spd_matrix(eigenvalues, seed=1)
    E = np.random.default_rng(5).standard_normal((n, n))
    E = (E + E.T) / 2
    options = {"seed": 0, "lanczos_steps": 20}
    if library == "torch":
        torch = pytest.importorskip("torch")
        matrix = torch.tensor(A, requires_grad=True)
        lt.logdet(matrix, **options).value.backward()
        gradient = matrix.grad.numpy()

        def value(M):
            return float(lt.logdet(torch.tensor(M), **options))
    else:
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        gradient = np.asarray(jax.grad(lambda M: lt.logdet(M, **options).value)(jnp.asarray(A)))

        def value(M):
            return float(lt.logdet(jnp.asarray(M), **options))

    assert np.all(np.isfinite(gradient))
    h = 1e-6
    central = (value(A + h * E) - value(A - h * E)) / (2 * h)
    assert float(np.sum(gradient * E)) == pytest.approx(central, rel=1e-5)


@pytest.mark.parametrize("library", ["torch", "jax"])
def test_logdet_gradient_when_the_krylov_space_is_exhausted(library):
    """A = diag with three distinct values and 20 Lanczos steps: the recurrence leaves
    w = 0 exactly after three steps, and the derivative of sqrt at 0 made the gradient
    NaN in every entry (the value was right). It now equals the central difference of
    the estimate along a symmetric direction (error ~ h^2 plus eps |f| / h ~ 1e-9)."""
    n = 30
    A = np.diag(np.repeat([1.0, 2.0, 3.0], 10))
    E = np.random.default_rng(5).standard_normal((n, n))
    E = (E + E.T) / 2
    if library == "torch":
        torch = pytest.importorskip("torch")
        matrix = torch.tensor(A, requires_grad=True)
        lt.logdet(matrix, seed=0).value.backward()
        gradient = matrix.grad.numpy()

        def value(M):
            return float(lt.logdet(torch.tensor(M), seed=0))
    else:
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        gradient = np.asarray(jax.grad(lambda M: lt.logdet(M, seed=0).value)(jnp.asarray(A)))

        def value(M):
            return float(lt.logdet(jnp.asarray(M), seed=0))

    assert np.all(np.isfinite(gradient))
    h = 1e-6
    central = (value(A + h * E) - value(A - h * E)) / (2 * h)
    assert float(np.sum(gradient * E)) == pytest.approx(central, rel=1e-6)


def test_lanczos_functions_are_scale_invariant():
    """Products far from 1 in magnitude broke the Lanczos recurrences: the couplings'
    squares under- or overflowed. ``eigenvalues`` of a float32 matrix times 1e-25 was 7%
    and 15% off with ``converged=True`` (residuals 0), times 1e30 never converged
    (residuals inf); ``trace_inverse`` at 1e20 in float32 was 20 stderr off, as logdet at
    1e200 in float64. The products are now scaled by a power of two and the results
    scaled back, exactly: every value is the unscaled one times the scale."""
    rng = np.random.default_rng(0)
    G = rng.standard_normal((40, 40))
    M = G @ G.T / 40 + np.eye(40)
    base = lt.eigenvalues(M.astype(np.float32), k=2, seed=0)
    for scale in (1e-25, 1e30):
        result = lt.eigenvalues((M * scale).astype(np.float32), k=2, seed=0)
        assert result.converged
        np.testing.assert_allclose(np.asarray(result.values) / scale, base.values, rtol=1e-5)
        assert np.all(np.asarray(result.residual_norms) / scale < 1e-4)
    inverse = np.trace(np.linalg.inv(M))
    unit = lt.trace_inverse(M.astype(np.float32), num_matvecs=60, seed=0)
    for scale in (1e20, 1e-30):
        est = lt.trace_inverse((M * scale).astype(np.float32), num_matvecs=60, seed=0)
        assert float(est) * scale == pytest.approx(float(unit), rel=1e-5)
        low, high = est.ci()
        assert low <= inverse / scale <= high
    unit = lt.logdet(M, num_matvecs=60, seed=0)
    for scale in (1e200, 1e-200):
        est = lt.logdet(M * scale, num_matvecs=60, seed=0)
        shifted = float(unit) + 40 * np.log(scale)
        assert float(est) == pytest.approx(shifted, rel=1e-12, abs=1e-9 * abs(shifted))


def test_slq_plus_plus_of_a_zero_operator_projects_its_probes():
    """Where A is zero on the deflation's block its next block was zero too, its QR a
    repeated unit vector, and the probes' "projection" off that basis lengthened them
    (squared norms 47-215 at n = 30): tr exp(0) read 131.66 for 30. The block now gets
    unit-size jitter. What is left is the estimator's spread: projected probes' norms vary
    (the stderr, 1.2 over 40 seeds, matches it)."""
    est = lt.trace_function(np.zeros((30, 30)), "exp", method="slq++", num_matvecs=200, seed=0)
    assert np.all(np.asarray(est.info["squared_norms"]) <= 30 * (1 + 1e-12))
    assert abs(float(est) - 30.0) <= 4 * float(est.stderr)


def test_eigenvalues_of_non_finite_products_name_the_products():
    """Non-finite products reached the Rayleigh-Ritz eigensolver before their deferred
    check (torch): torch's LinAlgError named the eigensolver, not the product."""
    torch = pytest.importorskip("torch")
    for A in (torch.full((20, 20), float("inf")), np.full((20, 20), np.inf)):
        with pytest.raises(FloatingPointError, match="non-finite"):
            lt.eigenvalues(A, k=2, seed=0)
