"""
Hutchinson's trick: Gaussian vs Rademacher probes
=================================================

For any probe ``z`` with ``E[z z^T] = I``, ``E[z^T A z] = tr(A)``: the trace of a
matrix you can only multiply by. How good one sample is depends on the probe. With
``S = (A + A^T) / 2`` the variance of one sample is

* ``2 ||S||_F^2`` for standard Gaussian probes,
* ``2 sum_{i != j} S_ij^2`` for Rademacher (random sign) probes, which is the smallest
  variance any probe with independent entries can reach.

The Rademacher variance ignores the diagonal: a probe with ``z_i^2 = 1`` reads the diagonal
exactly. So adding ``c I`` to the matrix leaves the Rademacher variance unchanged, while
the Gaussian variance grows like ``2 (2 c tr(S) + c^2 n)``. We check both claims with
:func:`linop_trace.trace` on a 20 x 20 Gaussian matrix.
"""

# %%
import matplotlib.pyplot as plt
import numpy as np

import linop_trace

rng = np.random.default_rng(0)
n = 20
A = rng.standard_normal((n, n))


def theory(matrix, probe):
    """Variance of one Hutchinson sample (Avron and Toledo 2011)."""
    S = (matrix + matrix.T) / 2
    off_diagonal = np.sum(S**2) - np.sum(np.diag(S) ** 2)
    return 2 * np.sum(S**2) if probe == "gaussian" else 2 * off_diagonal


# %%
# Empirical variance of one sample: the estimator's standard error times sqrt(m).
# One call pushes all m = 20,000 probes through the matrix as a few (n, k) blocks.

num_probes = 20_000
shifts = np.linspace(0.0, 10.0, 11)
measured = {"gaussian": [], "rademacher": []}
for shift in shifts:
    shifted = A + shift * np.eye(n)
    for probe in measured:
        est = linop_trace.trace(
            shifted, method="hutchinson", probe=probe, num_matvecs=num_probes, seed=1
        )
        measured[probe].append(float(est.stderr) ** 2 * num_probes)

for probe, values in measured.items():
    ratio = values[0] / theory(A, probe)
    print(
        f"{probe:10s} variance at shift 0: measured {values[0]:8.1f}, "
        f"theory {theory(A, probe):8.1f}, ratio {ratio:.3f}"
    )

# %%
# The shift: Gaussian variance grows quadratically, Rademacher stays put.

fig, ax = plt.subplots(figsize=(6, 4))
fine = np.linspace(shifts[0], shifts[-1], 200)
for probe, color in (("gaussian", "C0"), ("rademacher", "C1")):
    ax.plot(
        fine,
        [theory(A + c * np.eye(n), probe) for c in fine],
        color=color,
        label=f"{probe}: theory",
    )
    ax.plot(shifts, measured[probe], "o", color=color, label=f"{probe}: measured")
ax.set_xlabel("shift c in A + c I")
ax.set_ylabel("variance of one sample")
ax.set_title("Hutchinson variance, 20 x 20 Gaussian matrix")
ax.legend()
fig.tight_layout()

# %%
# The diagonal, too
# -----------------
# The same probes estimate the diagonal: ``E[z * (A z)] = diag(A)`` entrywise. With
# Rademacher probes the diagonal of the shift is again read exactly, so the estimate of
# ``diag(A + 5 I)`` is the estimate of ``diag(A)`` plus 5, probe for probe.

d0 = linop_trace.diagonal(A, method="hutchinson", num_matvecs=2000, seed=3)
d5 = linop_trace.diagonal(A + 5 * np.eye(n), method="hutchinson", num_matvecs=2000, seed=3)
print(
    "max |(estimate at +5) - (estimate at 0) - 5| =", float(np.max(np.abs(d5.value - d0.value - 5)))
)
print(
    "max error of the diagonal estimate:",
    float(np.max(np.abs(d0.value - np.diag(A)))),
    " max stderr:",
    float(np.max(d0.stderr)),
)
