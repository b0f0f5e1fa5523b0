"""
Hessian row sums with one Hessian-vector product
================================================

The row sums of a matrix are its product with the vector of ones, so the row sums of a
Hessian cost one Hessian-vector product, never the Hessian. :func:`linop_trace.row_sums`
does exactly that on any operator.

The check from the source text: for ``f(x1, x2) = x1^2 + 2 x1^2 x2 - 3 x2^3`` at
``(1, 2)`` the Hessian is ``[[2 + 4 x2, 4 x1], [4 x1, -18 x2]] = [[10, 4], [4, -36]]``,
so the row sums are ``(14, -32)``. Then the same on a neural network, against its
dense Hessian.
"""

# %%
import jax
import matplotlib.pyplot as plt
import numpy as np
import torch

import linop_trace

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402


def f(x):
    return x[0] ** 2 + 2 * x[0] ** 2 * x[1] - 3 * x[1] ** 3


x_torch = torch.tensor([1.0, 2.0], dtype=torch.float64)
sums = linop_trace.row_sums(linop_trace.hessian(f, x_torch))
print("torch:", sums.value.tolist(), "with", sums.num_matvecs, "Hessian-vector product")

x_jax = jnp.array([1.0, 2.0])
sums = linop_trace.row_sums(linop_trace.hessian(f, x_jax))
print("jax:  ", np.asarray(sums.value).tolist(), "with", sums.num_matvecs, "Hessian-vector product")

# %%
# A network: the digits MLP (1,480 parameters)
# --------------------------------------------
# The Hessian of the loss with respect to all weights. Its row sums by one product,
# against the row sums of the dense Hessian (1,480 products, only to check).

from linop_trace.autodiff._examples import digits_mlp_problem  # noqa: E402

model, loss_fn, data = digits_mlp_problem(batch_size=128, dtype=torch.float64)
H = linop_trace.hessian(model, loss_fn, data)
one_product = linop_trace.row_sums(H).value
dense = H.to_dense().sum(dim=1)
print(
    f"{H.shape[0]} parameters; max |difference| to the dense Hessian's row sums: "
    f"{float((one_product - dense).abs().max()):.2e}"
)

fig, ax = plt.subplots(figsize=(5, 5))
ax.plot(dense.numpy(), one_product.numpy(), ".", ms=3)
lims = [float(dense.min()), float(dense.max())]
ax.plot(lims, lims, "k--", lw=1)
ax.set_xlabel("row sums of the dense Hessian")
ax.set_ylabel("row_sums(H): one Hessian-vector product")
ax.set_title("Digits MLP: Hessian row sums")
fig.tight_layout()
