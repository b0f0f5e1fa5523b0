"""
VJP, JVP and HVP in torch and JAX
=================================

Three products make every autodiff operator:

* the Jacobian-vector product ``J v`` (forward mode: ``torch.func.jvp``, ``jax.jvp``),
* the vector-Jacobian product ``J^T w`` (reverse mode: ``torch.func.vjp``, ``jax.vjp``),
* the Hessian-vector product ``H v``: the JVP of the gradient (forward over reverse).

:func:`linop_trace.jacobian` and :func:`linop_trace.hessian` wrap them as operators whose
``matmat`` is one vectorized call over the columns of a block (``vmap``), whose
``rmatmat`` (for the Jacobian) is the VJP, and which stay in the library, dtype and
device of the input. The same function, written once per library, gives the same
numbers in both; the dense matrices below are formed only to check.
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
n, m = 6, 4
W_np = rng.standard_normal((m, n)) / np.sqrt(n)
x_np = rng.standard_normal(n)
V_np = rng.standard_normal((n, 3))  # three directions at once
U_np = rng.standard_normal((m, 2))

W_t, x_t = torch.from_numpy(W_np), torch.from_numpy(x_np)
W_j, x_j = jnp.asarray(W_np), jnp.asarray(x_np)


def f_torch(x):
    return torch.tanh(W_t @ x)


def f_jax(x):
    return jnp.tanh(W_j @ x)


# %%
# Jacobian products: ``J V`` forward, ``J^T U`` backward, checked against the dense
# Jacobian from each library's own ``jacrev``.

J_t = linop_trace.jacobian(f_torch, x_t)
J_j = linop_trace.jacobian(f_jax, x_j)
print(J_t, J_j, sep="\n")

JV_t = J_t.matmat(torch.from_numpy(V_np))
JV_j = J_j.matmat(jnp.asarray(V_np))
JtU_t = J_t.rmatmat(torch.from_numpy(U_np))
JtU_j = J_j.rmatmat(jnp.asarray(U_np))
dense_t = torch.func.jacrev(f_torch)(x_t)
dense_j = jax.jacrev(f_jax)(x_j)
print(
    "J V  : torch vs dense",
    float((JV_t - dense_t @ torch.from_numpy(V_np)).abs().max()),
    "| torch vs jax",
    float(np.abs(JV_t.numpy() - np.asarray(JV_j)).max()),
)
print(
    "J^T U: torch vs dense",
    float((JtU_t - dense_t.T @ torch.from_numpy(U_np)).abs().max()),
    "| torch vs jax",
    float(np.abs(JtU_t.numpy() - np.asarray(JtU_j)).max()),
)

# %%
# Hessian-vector products of the scalar ``g(x) = sum(tanh(W x)^2)``, batched over the
# three directions, against the dense Hessian.


def g_torch(x):
    return torch.sum(f_torch(x) ** 2)


def g_jax(x):
    return jnp.sum(f_jax(x) ** 2)


H_t = linop_trace.hessian(g_torch, x_t)
H_j = linop_trace.hessian(g_jax, x_j)
HV_t = H_t.matmat(torch.from_numpy(V_np))
HV_j = H_j.matmat(jnp.asarray(V_np))
dense_H = torch.func.hessian(g_torch)(x_t)
print(
    "H V  : torch vs dense",
    float((HV_t - dense_H @ torch.from_numpy(V_np)).abs().max()),
    "| torch vs jax",
    float(np.abs(HV_t.numpy() - np.asarray(HV_j)).max()),
)

# %%
# A differentiable trace
# ----------------------
# ``tr(H)`` as a term of a loss (as in sliced score matching) needs its gradient.
# With ``differentiable=True`` the torch products stay in the autograd graph, so the
# trace estimate can be backpropagated to the weights; JAX estimates are always
# differentiable. Here the exact trace through identity blocks, and its gradient with
# respect to ``W``, against the gradient of the dense Hessian's trace.

W_param = W_t.clone().requires_grad_(True)


def g_param(x):
    return torch.sum(torch.tanh(W_param @ x) ** 2)


H_param = linop_trace.hessian(g_param, x_t, differentiable=True)
tr = linop_trace.trace(H_param, method="exact").value
(grad_ours,) = torch.autograd.grad(tr, W_param)
W_check = W_t.clone().requires_grad_(True)
dense_tr = torch.trace(torch.func.hessian(lambda x: torch.sum(torch.tanh(W_check @ x) ** 2))(x_t))
(grad_dense,) = torch.autograd.grad(dense_tr, W_check)
print(
    f"tr(H) = {float(tr.detach()):.6f}; max |d tr(H)/dW - dense| = "
    f"{float((grad_ours - grad_dense).abs().max()):.2e}"
)

# %%
# The Jacobian in both libraries, side by side (formed by ``to_dense()``: n JVPs).

fig, axes = plt.subplots(1, 3, figsize=(10, 3))
for ax, (title, matrix) in zip(
    axes,
    [
        ("torch: to_dense()", J_t.to_dense().numpy()),
        ("jax: to_dense()", np.asarray(J_j.to_dense())),
        ("difference", J_t.to_dense().numpy() - np.asarray(J_j.to_dense())),
    ],
):
    image = ax.imshow(matrix, cmap="RdBu_r")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.8)
fig.tight_layout()
