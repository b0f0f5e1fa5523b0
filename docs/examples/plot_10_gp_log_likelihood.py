"""
Gaussian-process log marginal likelihood without a Cholesky factor
==================================================================

The log marginal likelihood of a Gaussian process with kernel matrix
K = k(X, X) + sigma^2 I is

.. math::

   \\log p(y) = -\\tfrac12 y^T K^{-1} y - \\tfrac12 \\log\\det K - \\tfrac n2 \\log 2\\pi .

A Cholesky factor gives both terms in O(n^3). Matrix-free, the quadratic term is a
conjugate-gradient solve and the log-determinant a stochastic Lanczos quadrature
estimate (:func:`linop_trace.logdet`), both from products with K only, as GPyTorch
computes them (Gardner et al., 2018). Here on scikit-learn's diabetes data (n = 442, ten
standardized features, standardized target), RBF kernel with unit signal variance and
noise sigma^2 = 0.5, against the Cholesky values. At n = 442 the Cholesky factor takes
milliseconds; the example checks the matrix-free route's accuracy and error bars, which
is what matters where n makes Cholesky impossible.
"""

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import scipy.linalg
import scipy.sparse.linalg
from sklearn.datasets import load_diabetes

import linop_trace

X, y = load_diabetes(return_X_y=True)
X = (X - X.mean(axis=0)) / X.std(axis=0)
y = (y - y.mean()) / y.std()
n = len(y)
noise = 0.5
squared = np.sum(X**2, axis=1)
squared_distances = np.maximum(squared[:, None] + squared[None, :] - 2 * X @ X.T, 0.0)


def kernel_matrix(length_scale):
    return np.exp(-squared_distances / (2 * length_scale**2)) + noise * np.eye(n)


def exact_log_likelihood(K):
    """Cholesky: log det K = 2 sum log L_ii, K^-1 y by two triangular solves."""
    factor = scipy.linalg.cho_factor(K, lower=True)
    logdet = 2 * np.sum(np.log(np.diag(factor[0])))
    quadratic = y @ scipy.linalg.cho_solve(factor, y)
    return -0.5 * quadratic - 0.5 * logdet - 0.5 * n * np.log(2 * np.pi), logdet, quadratic


def estimated_log_likelihood(K, seed=0):
    """SLQ for log det K (40 probes of 25 Lanczos steps, 1,000 products) and conjugate
    gradients for y^T K^-1 y (scipy's cg on the same dense K, relative residual 1e-10).
    Returns the value, its 95% interval and the parts."""
    logdet = linop_trace.logdet(K, num_matvecs=1000, lanczos_steps=25, seed=seed)
    iterations = []
    solution, status = scipy.sparse.linalg.cg(
        K, y, rtol=1e-10, callback=lambda _: iterations.append(1)
    )
    assert status == 0, "cg did not converge"
    quadratic = y @ solution
    constant = -0.5 * quadratic - 0.5 * n * np.log(2 * np.pi)
    value = constant - 0.5 * float(logdet)
    low, high = logdet.ci()  # the CG error (1e-10) is negligible beside the logdet's
    interval = (constant - 0.5 * high, constant - 0.5 * low)
    return value, interval, logdet, quadratic, len(iterations)


# %%
# One length scale
# ----------------

K = kernel_matrix(5.0)
start = time.perf_counter()
exact, exact_logdet, exact_quadratic = exact_log_likelihood(K)
cholesky_seconds = time.perf_counter() - start
start = time.perf_counter()
value, interval, logdet, quadratic, iterations = estimated_log_likelihood(K)
matrix_free_seconds = time.perf_counter() - start
low, high = logdet.ci()
print(f"length scale 5, n = {n}")
print(
    f"log det K: Cholesky {exact_logdet:.3f}, SLQ {float(logdet):.3f} "
    f"[{low:.3f}, {high:.3f}] (stderr {float(logdet.stderr):.3f}, quadrature error "
    f"{float(logdet.info['systematic_error']):.1e})"
)
print(f"y^T K^-1 y: Cholesky {exact_quadratic:.6f}, CG {quadratic:.6f} ({iterations} iterations)")
print(
    f"log p(y):  Cholesky {exact:.3f}, matrix-free {value:.3f} "
    f"[{interval[0]:.3f}, {interval[1]:.3f}]"
)
print(
    f"time: Cholesky {cholesky_seconds * 1e3:.1f} ms, "
    f"matrix-free {matrix_free_seconds * 1e3:.1f} ms"
)

# %%
# A scan over length scales
# -------------------------
# The same seed at every length scale, so every estimate uses the same probes.

length_scales = np.geomspace(1.0, 30.0, 12)
exact_curve, estimates, intervals = [], [], []
print(f"{'length':>7} {'Cholesky':>9} {'estimate':>9} {'95% interval':>21} {'covers':>6}")
for length_scale in length_scales:
    K = kernel_matrix(length_scale)
    exact_value = exact_log_likelihood(K)[0]
    value, (low, high), *_ = estimated_log_likelihood(K)
    exact_curve.append(exact_value)
    estimates.append(value)
    intervals.append((low, high))
    print(
        f"{length_scale:7.2f} {exact_value:9.2f} {value:9.2f} [{low:9.2f}, {high:9.2f}] "
        f"{str(low <= exact_value <= high):>6}"
    )
best_exact = length_scales[int(np.argmax(exact_curve))]
best_estimate = length_scales[int(np.argmax(estimates))]
print(f"best length scale on this grid: Cholesky {best_exact:.2f}, estimate {best_estimate:.2f}")

estimates = np.array(estimates)
intervals = np.array(intervals)
fig, ax = plt.subplots(figsize=(6.5, 4))
ax.plot(length_scales, exact_curve, "k-", lw=2, label="Cholesky")
ax.errorbar(
    length_scales,
    estimates,
    yerr=[estimates - intervals[:, 0], intervals[:, 1] - estimates],
    fmt="o",
    capsize=3,
    label="SLQ log det + CG, 95% interval",
)
ax.set_xscale("log")
ax.set_xlabel("RBF length scale")
ax.set_ylabel("log marginal likelihood")
ax.set_title(f"GP on the diabetes data (n = {n}, noise {noise})")
ax.legend()
fig.tight_layout()

# %%
# What the run shows
# ------------------
# * The quadratic term is exact to the solver's tolerance: CG took 39 products at length
#   scale 5 and agrees with Cholesky to the printed digits.
# * The log-determinant carries the whole error bar. With 1,000 products the interval's
#   half-width is 1.8 to 3.6 in log p(y), all of it the probes' variance: the quadrature
#   error is a few 1e-9 at length scale 5 (3.4e-9 in this run). In this run 11 of the
#   12 intervals cover the Cholesky value; the one at length scale 1 misses by 0.14,
#   about what a 95% interval does once in twenty.
# * Near its maximum the likelihood changes by 1 to 3 per grid step, comparable to the
#   error bar, so independent estimates per length scale could misplace the maximum.
#   Using the same probes at every length scale correlates the errors: here every
#   estimate lies above the exact value, by 3 at short length scales falling to 0.1 at
#   long ones, so the estimated curve is smooth and has its maximum at the same grid
#   point as the exact one (6.4).
# * At n = 442 this is slower than Cholesky (26 ms against 2 ms); the products with K
#   are all it needs, so it carries over to kernels too large to factor, or known only
#   through fast products.
