"""
Hutch++ and XTrace vs Hutchinson: error against the budget
==========================================================

Hutchinson's error falls like ``1 / sqrt(m)`` in the number of matvecs m, whatever the
matrix. Methods that first take the top of the spectrum with a randomized range sketch
(Hutch++, NA-Hutch++) and then estimate only the remainder reach ``1 / m`` on positive
semidefinite matrices whose spectrum decays; XTrace and XNysTrace use every product for
both jobs at once (exchangeable estimators) and gain more where the spectrum decays fast.
On a flat spectrum there is nothing to deflate and all methods are Hutchinson-like.

The standard test matrices of the literature (n = 1000, Haar eigenvectors,
``linop_trace._testing``): flat ``linspace(3, 1)``, polynomial ``i^-2`` and exponential
``0.9^i`` decay. Median relative error over 20 seeds at equal budgets (every method
spends exactly m columns), on log-log axes with ``1 / sqrt(m)`` and ``1 / m`` guides.
"""

# %%
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import NullFormatter, ScalarFormatter

import linop_trace
from linop_trace._testing import test_matrix

methods = ["hutchinson", "hutch++", "na-hutch++", "xtrace", "xnystrace"]
budgets = [12, 24, 48, 96, 192, 384]
num_seeds = 20

# %%

fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=False)
for ax, spectrum in zip(axes, ["flat", "poly", "slowexp"]):
    A = test_matrix(spectrum, n=1000, seed=0)
    # The methods that use the symmetry (NA-Hutch++ in one pass, XNysTrace) read it from
    # the operator's tags.
    operator = linop_trace.aslinearoperator(A, tags=("symmetric", "positive_semidefinite"))
    truth = float(np.trace(A))
    for method in methods:
        medians = []
        for m in budgets:
            errors = [
                abs(
                    float(linop_trace.trace(operator, method=method, num_matvecs=m, seed=s)) - truth
                )
                / truth
                for s in range(num_seeds)
            ]
            medians.append(np.median(errors))
        ax.loglog(budgets, medians, "o-", label=method)
        if m == budgets[-1]:
            print(f"{spectrum:8s} {method:11s} m = {m}: median relative error {medians[-1]:.2e}")
    # guides through the first point of Hutchinson (1/sqrt(m)) and of Hutch++ (1/m)
    m = np.array(budgets, dtype=float)
    first = {line.get_label(): line.get_ydata()[0] for line in ax.get_lines()}
    ax.loglog(m, first["hutchinson"] * np.sqrt(m[0] / m), "k--", lw=1, label="~ 1/sqrt(m)")
    ax.loglog(m, first["hutch++"] * (m[0] / m), "k:", lw=1, label="~ 1/m")
    ax.set_title(f"{spectrum} spectrum")
    ax.set_xlabel("num_matvecs m")
    ax.set_xticks(budgets)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
axes[0].set_ylabel(f"median relative error ({num_seeds} seeds)")
axes[-1].legend(fontsize=8)
fig.tight_layout()

# %%
# The asv benchmarks track the same numbers at m = 100 over 200 seeds, together with the
# coverage of each method's 95% interval (``asv_bench/benchmarks/claims.py``).
