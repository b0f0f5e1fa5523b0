"""
Estrada index of a graph: tr exp(A) from adjacency products
===========================================================

The Estrada index of a graph with adjacency matrix A is ``EE = tr exp(A) = sum_i
exp(lambda_i)``, a count of closed walks of every length weighted by ``1 / length!``
(Estrada, 2000). :func:`linop_trace.trace_exp` estimates it by stochastic Lanczos
quadrature from products with A, here a SciPy sparse matrix, and checks it against
``scipy.linalg.expm`` and ``eigvalsh``.

The exponential makes the top eigenvalue dominate: on the Les Misérables co-appearance
graph that ships with networkx (77 characters, 254 edges, unweighted), exp(lambda_1) is
95% of the index. Plain SLQ spends its probes on the whole spectrum and its error is
large. ``method="slq++"`` first takes the top of the spectrum with a block Krylov space
(a third of the budget) and estimates only the rest with probes.

The graphs are small: the dense computation needs n = 77 products, less than most
budgets below. The example shows how the estimators and their intervals behave, which is
what carries over to graphs too large for a dense matrix.
"""

# %%
import matplotlib.pyplot as plt
import networkx as nx
import numpy as np
import scipy.linalg

import linop_trace

graph = nx.les_miserables_graph()
A = nx.to_scipy_sparse_array(graph, weight=None, format="csr", dtype=float)
eigenvalues = np.linalg.eigvalsh(A.toarray())
exact = float(np.trace(scipy.linalg.expm(A.toarray())))
print(f"Les Misérables: n = {A.shape[0]}, {A.nnz // 2} edges")
print(f"Estrada index: expm {exact:.4f}, sum exp(eigvalsh) {np.exp(eigenvalues).sum():.4f}")
print(f"share of exp(lambda_1) = exp({eigenvalues[-1]:.3f}): {np.exp(eigenvalues[-1]) / exact:.1%}")

for method in ("slq", "slq++"):
    estimate = linop_trace.trace_exp(A, method=method, num_matvecs=160, lanczos_steps=10, seed=0)
    low, high = estimate.ci()
    print(
        f"{method:6s} 160 products: {float(estimate):12.1f}  95% interval "
        f"[{low:.1f}, {high:.1f}], relative error {abs(float(estimate) - exact) / exact:.1e}"
    )

# %%
# Estimate against the budget
# ---------------------------
# One seed per budget, 10 Lanczos steps per probe, the estimate divided by the exact
# index, with its 95% interval. Note the two panels' scales.

budgets = [30, 60, 120, 240, 480]
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
for ax, method in zip(axes, ("slq", "slq++")):
    ratios, lows, highs = [], [], []
    for budget in budgets:
        estimate = linop_trace.trace_exp(
            A, method=method, num_matvecs=budget, lanczos_steps=10, seed=1
        )
        low, high = estimate.ci()
        ratios.append(float(estimate) / exact)
        lows.append(low / exact)
        highs.append(high / exact)
    ratios, lows, highs = np.array(ratios), np.array(lows), np.array(highs)
    ax.errorbar(budgets, ratios, yerr=[ratios - lows, highs - ratios], fmt="o", capsize=3)
    ax.axhline(1.0, color="k", lw=1.5, label="exact (expm)")
    ax.set_xscale("log")
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.minorticks_off()
    ax.set_xlabel("num_matvecs (products with A)")
    ax.set_ylabel("estimate / exact Estrada index")
    ax.set_title(f"trace_exp, method={method!r}")
    ax.legend()
    covered = np.sum((lows <= 1) & (1 <= highs))
    print(f"{method:6s} intervals covering the exact value: {covered} of {len(budgets)}")
fig.tight_layout()

# %%
# Three graphs, 20 seeds
# ----------------------
# Median relative error over 20 seeds at 160 products, and how often the 95% interval
# held the exact index. Where the top eigenvalue dominates less (the 15 Florentine
# families), deflation gains less.

print(
    f"{'graph':>11} {'n':>3} {'Estrada':>10} {'top share':>9}   "
    f"{'method':6s} {'median err':>10} {'coverage':>8}"
)
for name, G in [
    ("Les Mis", graph),
    ("karate", nx.karate_club_graph()),
    ("Florentine", nx.florentine_families_graph()),
]:
    B = nx.to_scipy_sparse_array(G, weight=None, format="csr", dtype=float)
    values = np.linalg.eigvalsh(B.toarray())
    truth = float(np.trace(scipy.linalg.expm(B.toarray())))
    share = np.exp(values[-1]) / truth
    for method in ("slq", "slq++"):
        errors, hits = [], 0
        for seed in range(20):
            estimate = linop_trace.trace_exp(
                B, method=method, num_matvecs=160, lanczos_steps=10, seed=seed
            )
            low, high = estimate.ci()
            errors.append(abs(float(estimate) - truth) / truth)
            hits += low <= truth <= high
        print(
            f"{name:>11} {B.shape[0]:3d} {truth:10.1f} {share:9.1%}   {method:6s} "
            f"{np.median(errors):10.1e} {hits / 20:8.0%}"
        )

# %%
# What the run shows
# ------------------
# * Plain SLQ is unbiased but noisy here: its median relative error at 160 products is
#   12% to 24%, and on Les Misérables its interval is wider than the value, because a
#   few probes' quadratic forms z^T exp(A) z carry most of the index through the top
#   eigenvector.
# * Deflating the top of the spectrum (``slq++``) removes that variance: at the same
#   budget the median error drops by two orders of magnitude on the karate club and by
#   four on Les Misérables, and the interval shrinks with it.
# * On the Florentine families the top eigenvalue holds under half of the index, and
#   deflation only halves the error.
# * Coverage over 20 seeds is a coarse measure (one miss is 5%). Most rows are at or
#   near 95%; plain SLQ on the karate club covers 16 of 20. Its probes' samples are
#   heavy-tailed (most are small, a few large), and with 16 probes the t-interval is
#   then too narrow more often than the nominal 5%.
