"""The digits MLP of BackPACK's Hessian-trace example, on scikit-learn's bundled digits.

BackPACK's example uses a 784-20-10 MLP without biases on an MNIST batch; here the
same architecture runs on 8 x 8 digit images (64 inputs), so it needs no download:
Flatten -> Linear(64, 20, bias=False) -> Sigmoid -> Linear(20, 10, bias=False),
cross-entropy, 20 * 64 + 10 * 20 = 1,480 parameters (``hidden=`` widens it). Used by the
tests, the CLI demo and the benchmarks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["digits_data", "digits_mlp_jax_problem", "digits_mlp_problem"]

NUM_PARAMETERS = 20 * 64 + 10 * 20


def digits_data(batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The first ``batch_size`` digits as ``(images (B, 8, 8) scaled to [0, 1], labels (B,))``.

    Examples
    --------
    >>> from linop_trace.autodiff._examples import digits_data
    >>> images, labels = digits_data(4)
    >>> images.shape, labels.shape, float(images.max()) <= 1.0
    ((4, 8, 8), (4,), True)
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    if not 1 <= batch_size <= digits.images.shape[0]:
        raise ValueError(
            f"`batch_size` must lie in [1, {digits.images.shape[0]}], got {batch_size}"
        )
    images = digits.images[:batch_size] / 16.0
    labels = digits.target[:batch_size]
    return images, labels


def digits_mlp_problem(
    batch_size: int = 256, seed: int = 0, dtype: Any = None, hidden: int = 20
) -> tuple:
    """``(model, loss_fn, (X, y))``: the torch digits MLP, its loss and one batch.

    Parameters
    ----------
    batch_size : int
        Number of digits in the batch (the first ones of the data set).
    seed : int
        ``torch.manual_seed`` for the default initialization of the layers (the global
        random state is restored afterwards).
    dtype : torch.dtype, optional
        float32 unless given.
    hidden : int
        Width of the hidden layer: 20 as in BackPACK's example, (64 + 10) * hidden
        parameters (a wider one for benchmarks whose products must outweigh overheads).

    Examples
    --------
    >>> from linop_trace.autodiff._examples import digits_mlp_problem
    >>> model, loss_fn, (X, y) = digits_mlp_problem(batch_size=8)
    >>> sum(p.numel() for p in model.parameters()), tuple(X.shape)
    (1480, (8, 8, 8))
    >>> sum(p.numel() for p in digits_mlp_problem(batch_size=8, hidden=256)[0].parameters())
    18944
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    images, labels = digits_data(batch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(
            torch.nn.Flatten(),
            torch.nn.Linear(64, hidden, bias=False),
            torch.nn.Sigmoid(),
            torch.nn.Linear(hidden, 10, bias=False),
        )
    model = model.to(dtype)
    X = torch.as_tensor(images, dtype=dtype)
    y = torch.as_tensor(labels, dtype=torch.long)
    return model, torch.nn.CrossEntropyLoss(), (X, y)


def digits_mlp_jax_problem(batch_size: int = 256, seed: int = 0, dtype: Any = None) -> tuple:
    """``(apply_fn, params, loss_fn, (X, y))``: the same MLP written by hand in JAX.

    The weights are drawn like PyTorch's default ``Linear`` initialization,
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), from a NumPy generator seeded with ``seed``.
    ``params`` is ``{"W1": (20, 64), "W2": (10, 20)}``, laid out as torch's weights.

    Examples
    --------
    >>> from linop_trace.autodiff._examples import digits_mlp_jax_problem
    >>> apply_fn, params, loss_fn, (X, y) = digits_mlp_jax_problem(batch_size=8)
    >>> apply_fn(params, X).shape
    (8, 10)
    """
    import jax
    import jax.numpy as jnp

    dtype = jnp.float32 if dtype is None else dtype
    images, labels = digits_data(batch_size)
    rng = np.random.default_rng(seed)

    def uniform(rows: int, cols: int) -> Any:
        bound = 1.0 / np.sqrt(cols)
        return jnp.asarray(rng.uniform(-bound, bound, size=(rows, cols)), dtype=dtype)

    params = {"W1": uniform(20, 64), "W2": uniform(10, 20)}

    def apply_fn(params: Any, inputs: Any) -> Any:
        flat = jnp.reshape(inputs, (inputs.shape[0], -1))
        hidden = jax.nn.sigmoid(flat @ params["W1"].T)
        return hidden @ params["W2"].T

    def loss_fn(logits: Any, targets: Any) -> Any:
        log_probabilities = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(log_probabilities, targets[:, None], axis=-1)
        return -jnp.mean(picked)

    X = jnp.asarray(images, dtype=dtype)
    y = jnp.asarray(labels)
    return apply_fn, params, loss_fn, (X, y)
