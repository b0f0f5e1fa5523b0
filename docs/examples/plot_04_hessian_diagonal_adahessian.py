"""
The Hessian diagonal, and what AdaHessian's ``z * Hz`` estimates
================================================================

AdaHessian preconditions with a "Hutchinson" Hessian: it draws Rademacher ``z``, forms
``z * (H z)`` (entrywise) and averages. That is an estimate of the Hessian's *diagonal*,
not of its trace: entry i is ``z_i sum_j H_ij z_j = H_ii + sum_{j != i} H_ij z_i z_j``,
and the cross terms average to zero because ``E[z_i z_j] = 0``. Summing the entries
gives ``z^T H z``, one Hutchinson sample of the trace, which is the link between the two.

Here on the digits MLP (1,480 weights): the exact diagonal (1,480 Hessian-vector
products, in blocks), AdaHessian's running average, and the package's diagonal
estimators at equal budgets.
"""

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch

import linop_trace
from linop_trace.autodiff._examples import digits_mlp_problem

torch.set_num_threads(1)
model, loss_fn, data = digits_mlp_problem(batch_size=256, dtype=torch.float64)
H = linop_trace.hessian(model, loss_fn, data)
exact = linop_trace.diagonal(H, method="exact").value.numpy()
print(f"exact diagonal: {H.shape[0]} entries, sum {exact.sum():.4f} (= the trace)")

# %%
# AdaHessian's estimate by hand: one block of Rademacher probes, ``Z * (H Z)``.

Z = linop_trace.rademacher(H, 100, seed=0)
products = (Z * H.matmat(Z)).numpy()  # column j is z_j * (H z_j)
for m in (1, 10, 100):
    average = products[:, :m].mean(axis=1)
    error = np.linalg.norm(average - exact) / np.linalg.norm(exact)
    print(
        f"m = {m:3d}: relative error of the diagonal {error:.3f}; "
        f"sum of entries {average.sum():.3f} (a trace estimate)"
    )

# %%
# The same with :func:`linop_trace.diagonal` (Hutchinson's diagonal estimator, with a
# standard error per entry), and with the methods that first capture the dominant part
# of the Hessian with a sketch.

budgets = [10, 20, 50, 100, 200, 400]
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
for method in ("hutchinson", "diag++", "xdiag"):
    errors = []
    for m in budgets:
        runs = []
        for seed in range(5):
            value = linop_trace.diagonal(H, method=method, num_matvecs=m, seed=seed).value
            runs.append(np.linalg.norm(value.numpy() - exact) / np.linalg.norm(exact))
        errors.append(np.median(runs))
    left.loglog(budgets, errors, "o-", label=method)
left.set_xlabel("num_matvecs (Hessian-vector products)")
left.set_ylabel("relative error of the diagonal (median, 5 seeds)")
left.set_title("Hessian diagonal estimators")
left.legend()

estimate = linop_trace.diagonal(H, method="hutchinson", num_matvecs=100, seed=0)
right.plot(exact, estimate.value.numpy(), ".", ms=3, label="hutchinson, m = 100")
lims = [exact.min(), exact.max()]
right.plot(lims, lims, "k--", lw=1)
right.set_xlabel("exact H_ii")
right.set_ylabel("estimate")
right.set_title("entry by entry")
right.legend()
fig.tight_layout()
