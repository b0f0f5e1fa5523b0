"""
Divergence of a continuous normalizing flow's vector field
==========================================================

A continuous normalizing flow moves samples along ``dz/dt = f(z, t)`` and tracks their
log-density with ``d log p / dt = -tr(df/dz)``: the divergence of the vector field, one
trace of a d x d Jacobian *per sample*. FFJORD replaces it by Hutchinson's estimate
``z^T (df/dz) z``, whose cost is one JVP per probe instead of d.

:func:`linop_trace.divergence` takes a batched, sample-wise ``f: (B, d) -> (B, d)`` and
returns all B divergences at once: each probe block is one vectorized pass of JVPs
(``vmap`` over the probes), with a standard error per sample. Here a small two-layer
field with d = 32 on a batch of B = 256, in torch and in JAX.
"""

# %%
import jax
import matplotlib.pyplot as plt
import numpy as np
import torch

import linop_trace

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402

rng = np.random.default_rng(0)
B, d, hidden = 256, 32, 64
W1 = rng.standard_normal((d, hidden)) / np.sqrt(d)
W2 = rng.standard_normal((hidden, d)) / np.sqrt(hidden)
z_np = rng.standard_normal((B, d))

W1_t, W2_t = torch.from_numpy(W1), torch.from_numpy(W2)


def field_torch(z, t=0.5):
    return torch.tanh(z @ W1_t + t) @ W2_t


W1_j, W2_j = jnp.asarray(W1), jnp.asarray(W2)


def field_jax(z, t=0.5):
    return jnp.tanh(z @ W1_j + t) @ W2_j


z_t, z_j = torch.from_numpy(z_np), jnp.asarray(z_np)

# %%
# Exact (d JVPs with the unit vectors) against Hutchinson with a few probes.

exact = linop_trace.divergence(field_torch, z_t, method="exact")
print(
    f"exact divergence: {exact.num_matvecs} JVPs for all {B} samples; "
    f"first three {exact.value[:3].tolist()}"
)

fig, ax = plt.subplots(figsize=(6, 4))
for m, marker in ((2, "x"), (4, "."), (16, "o")):  # a standard error needs 2 probes
    est = linop_trace.divergence(field_torch, z_t, method="hutchinson", num_matvecs=m, seed=0)
    rmse = float(torch.sqrt(torch.mean((est.value - exact.value) ** 2)))
    print(
        f"hutchinson, {m:2d} probes: RMS error over the batch {rmse:.3f}, "
        f"mean stderr {float(est.stderr.mean()):.3f}"
    )
    ax.plot(exact.value.numpy(), est.value.numpy(), marker, ms=4, alpha=0.6, label=f"{m} probes")
lims = [float(exact.value.min()), float(exact.value.max())]
ax.plot(lims, lims, "k--", lw=1)
ax.set_xlabel("exact divergence tr(df/dz)")
ax.set_ylabel("Hutchinson estimate")
ax.set_title(f"CNF divergence, d = {d}, batch of {B}")
ax.legend()
fig.tight_layout()

# %%
# The same field in JAX gives the same exact divergences; Hutchinson estimates are
# seeded per library (different random streams), so they differ within their errors.

exact_j = linop_trace.divergence(field_jax, z_j, method="exact")
print(
    "max |torch - jax| of the exact divergence:",
    float(np.max(np.abs(exact.value.numpy() - np.asarray(exact_j.value)))),
)

# %%
# For training, the estimate must be differentiable: ``differentiable=True`` keeps it in
# torch's autograd graph (JAX estimates always are), so ``-divergence`` can enter the
# log-likelihood and be backpropagated to the field's weights.

W2_param = W2_t.clone().requires_grad_(True)


def field_param(z):
    return torch.tanh(z @ W1_t + 0.5) @ W2_param


est = linop_trace.divergence(
    field_param, z_t, method="hutchinson", num_matvecs=8, seed=0, differentiable=True
)
est.value.mean().backward()
print("gradient of the mean divergence estimate w.r.t. W2: norm", float(W2_param.grad.norm()))
