"""
Hessian trace of a small MLP: exact vs Hutchinson, and batched products
=======================================================================

BackPACK's Hessian-trace example, on data that ships with scikit-learn: a
64-20-10 MLP without biases (sigmoid hidden layer, cross-entropy) on a batch of 256 of
the 8 x 8 handwritten digits, 1,480 parameters. :func:`linop_trace.hessian` turns the
model, its loss and the batch into a 1480 x 1480 symmetric operator whose block product
is one vectorized Hessian-vector product (``torch.func.vmap`` over forward-over-reverse
HVPs).

* The exact trace walks the identity in blocks: 1,480 HVPs.
* Hutchinson's estimate with Rademacher probes converges to it as ``1 / sqrt(m)``; the
  figure shows the running estimate of ten seeds.
* A block of k HVPs in one vectorized call against k separate HVPs.
"""

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

import linop_trace
from linop_trace.autodiff._examples import digits_mlp_problem

torch.set_num_threads(1)  # timings below compare like with like on a shared machine
model, loss_fn, data = digits_mlp_problem(batch_size=256, dtype=torch.float64)
H = linop_trace.hessian(model, loss_fn, data)
print(H)

exact = linop_trace.trace(H, method="exact")
print(f"exact trace: {float(exact):.6f} from {exact.num_matvecs} Hessian-vector products")

# %%
# Hutchinson over seeds
# ---------------------
# One call per seed with 200 probes; the per-probe samples ``z^T H z`` are in
# ``estimate.info["samples"]``, so the running mean shows the estimate at every budget.

budget = 200
fig, ax = plt.subplots(figsize=(6.5, 4))
finals = []
for seed in range(10):
    est = linop_trace.trace(H, method="hutchinson", num_matvecs=budget, seed=seed)
    samples = np.asarray(est.info["samples"])
    running = np.cumsum(samples) / np.arange(1, budget + 1)
    ax.plot(np.arange(1, budget + 1), running, lw=1, alpha=0.8)
    finals.append((float(est), *est.ci(0.95)))
ax.axhline(float(exact), color="k", lw=2, label=f"exact = {float(exact):.3f}")
ax.set_xlabel("number of Rademacher probes m")
ax.set_ylabel("trace estimate")
ax.set_ylim(float(exact) * 0.5, float(exact) * 1.5)
ax.set_title("Hessian trace of the digits MLP: 10 seeds")
ax.legend()
fig.tight_layout()

covered = sum(low <= float(exact) <= high for _, low, high in finals)
print(
    f"at m = {budget}: estimates {min(f[0] for f in finals):.3f} .. "
    f"{max(f[0] for f in finals):.3f}; the 95% interval holds the exact trace "
    f"in {covered} of 10 seeds"
)

# %%
# The methods that deflate the top of the spectrum use the same budget better:

for method in ("hutchinson", "hutch++", "xtrace"):
    runs = [float(linop_trace.trace(H, method=method, num_matvecs=100, seed=s)) for s in range(10)]
    error = np.median(np.abs(np.array(runs) - float(exact))) / float(exact)
    print(f"{method:10s} m = 100: median relative error over 10 seeds {error:.4f}")

# %%
# Batched vs one at a time
# ------------------------
# ``H.matmat(V)`` with k columns is one vectorized call; ``H.matvec`` k times is what a
# loop over probes costs. Best of five repeats, measured side by side in this process.


def best_time(function, repeats=5):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


V = linop_trace.rademacher(H, 20, seed=0)
H.matmat(V[:, :1])  # warm up
print(f"{'k':>3} {'one matmat [ms]':>16} {'k matvecs [ms]':>15} {'speed-up':>9}")
for k in (1, 5, 10, 20):
    block = V[:, :k]
    batched = best_time(lambda block=block: H.matmat(block))
    looped = best_time(lambda block=block, k=k: [H.matvec(block[:, j]) for j in range(k)])
    print(f"{k:>3} {batched * 1e3:16.2f} {looped * 1e3:15.2f} {looped / batched:8.1f}x")
