"""
Structure-aware estimation: exact parts computed exactly
========================================================

A regularised curvature matrix ``H + D`` is a sum of an implicit term (a Hessian known
only through products) and a term whose trace is known (a diagonal, a stored matrix).
Estimated as a black box, the known term's variance swamps the estimate: a Gaussian
probe's sample ``z^T D z`` has variance ``2 ||D||_F^2``. :func:`linop_trace.trace` walks
the sum, computes the exact terms exactly and spends the probes on ``H`` alone
(``decompose=False`` restores the black box).

Here n = 500, ``H`` is a dense SPD matrix behind a callable, ``D = 1000 diag(1..n)``
and ``S`` a stored dense symmetric matrix (not diagonal, so that Rademacher probes,
exact on diagonals, see its variance too). Median relative error over 20 seeds against
the budget, with and without decomposition.
"""

# %%
import matplotlib.pyplot as plt
import numpy as np

import linop_trace as lt

n = 500
rng = np.random.default_rng(0)
G = rng.standard_normal((n, n))
M = G @ G.T / n + np.eye(n)
H = lt.LinearOperator.from_callable(matmat=lambda X: M @ X, shape=(n, n))
d = np.arange(1.0, n + 1)
S = rng.standard_normal((n, n))
S = 50 * (S + S.T)
A = H + 1000 * lt.diagonal_operator(d) + lt.aslinearoperator(S)
truth = np.trace(M) + 1000 * d.sum() + np.trace(S)

budgets = [10, 20, 40, 80, 160]
num_seeds = 20

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
for ax, probe in zip(axes, ["gaussian", "rademacher"]):
    for decompose, style in [(False, "o--"), (True, "o-")]:
        medians = []
        for m in budgets:
            errors = [
                abs(
                    float(
                        lt.trace(
                            A,
                            method="hutchinson",
                            probe=probe,
                            num_matvecs=m,
                            seed=s,
                            decompose=decompose,
                        )
                    )
                    - truth
                )
                / abs(truth)
                for s in range(num_seeds)
            ]
            medians.append(np.median(errors))
        label = "decomposed" if decompose else "black box"
        ax.loglog(budgets, medians, style, label=label)
    with_split = lt.trace(A, method="hutchinson", probe=probe, num_matvecs=50, seed=0)
    black_box = lt.trace(
        A, method="hutchinson", probe=probe, num_matvecs=50, seed=0, decompose=False
    )
    ratio = float(black_box.stderr) / float(with_split.stderr)
    print(f"{probe:10s} m = 50: stderr black box / decomposed = {ratio:.0f}")
    ax.set_title(f"{probe} probes")
    ax.set_xlabel("num_matvecs (through H only, when decomposed)")
    ax.legend()
axes[0].set_ylabel("median relative error")
fig.tight_layout()
plt.show()
