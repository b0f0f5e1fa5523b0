"""Autodiff operators: Hessians, Gauss-Newton matrices and Jacobians of torch and JAX code.

Each constructor returns a :class:`~linop_trace.LinearOperator` in the library, dtype
and device of the variables, so :func:`~linop_trace.trace`, :func:`~linop_trace.diagonal`
and :func:`~linop_trace.row_sums` work on it like on any other operator. Block products
are one vectorized call (``torch.func.vmap`` / ``jax.jit(jax.vmap(...))``), never a Python
loop over probes. torch and JAX are imported only when a function here receives their
arrays, so importing this module imports neither.

The torch operators (:func:`hessian`, :func:`ggn`, :func:`jacobian`, and
:func:`divergence`) may be shared between threads, each thread getting the products it
would get alone: torch keeps its forward-mode AD state per process, so forward-mode
products run one at a time, as do the forward passes through a ``torch.nn.Module`` (whose
parameters ``functional_call`` swaps in); the rest runs concurrently. Other torch code
using forward-mode AD, or the same module, in another thread at the same time is not
covered.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import array_api_compat

from .. import _backend as backend
from .._blocks import block_size_for
from .._estimate import DeferredCheck, Estimate
from .._probes import ProbeSampler
from .._stats import sample_mean
from .._validation import check_num_matvecs, check_positive_int
from ._common import CURVATURE_MODES, AutodiffOperator, FallbackChain, check_mode

__all__ = ["AutodiffOperator", "divergence", "divergence_samples", "ggn", "hessian", "jacobian"]

DEFAULT_NUM_MATVECS = 100


# ------------------------------------------------------------------------ dispatch


def _leaves(obj: Any) -> list[Any]:
    """Array leaves of nested lists/tuples/dicts (and of any JAX pytree, if JAX is loaded)."""
    if "jax" in sys.modules:
        import jax

        return jax.tree_util.tree_leaves(obj)
    if isinstance(obj, dict):
        return [leaf for value in obj.values() for leaf in _leaves(value)]
    if isinstance(obj, (list, tuple)):
        return [leaf for value in obj for leaf in _leaves(value)]
    return [obj]


def _library(what: str, *objects: Any) -> str:
    """``"torch"`` or ``"jax"``: the library of the module or arrays among ``objects``."""
    if any(_is_torch_module(obj) for obj in objects):
        return "torch"
    for obj in objects:
        for leaf in _leaves(obj):
            if array_api_compat.is_torch_array(leaf):
                return "torch"
            if array_api_compat.is_jax_array(leaf):
                return "jax"
    described = ", ".join(f"{type(o).__module__}.{type(o).__name__}" for o in objects)
    raise TypeError(
        f"{what} needs torch tensors (or a torch.nn.Module) or JAX arrays to differentiate, "
        f"got {described}"
    )


def _is_torch_module(obj: Any) -> bool:
    if "torch" not in sys.modules:
        return False
    import torch

    return isinstance(obj, torch.nn.Module)


def _network_arguments(name: str, f: Any, args: tuple[Any, ...]) -> tuple[Any, Any, Any, Any]:
    """``(model_or_apply_fn, params, loss_fn, data)`` from the network call forms."""
    if len(args) == 2:
        if not _is_torch_module(f):
            raise TypeError(
                f"{name}(model, loss_fn, data) needs a torch.nn.Module; for an apply function "
                f"call {name}(apply_fn, params, loss_fn, data)"
            )
        return f, None, args[0], args[1]
    if len(args) == 3:
        return f, args[0], args[1], args[2]
    raise TypeError(
        f"{name} takes (f, x), (model, loss_fn, data) or (apply_fn, params, loss_fn, data); "
        f"got {1 + len(args)} positional arguments"
    )


def _no_process_group_for_jax(process_group: Any) -> None:
    if process_group is not None:
        raise TypeError(
            "process_group is a torch.distributed group, for torch models; JAX shards "
            "its arrays itself (jax.sharding)"
        )


def _check_callable(f: Any, name: str) -> None:
    if not callable(f):
        raise TypeError(f"{name} expects a function (or module) first, got {type(f).__name__}")


# ------------------------------------------------------------------------- public


def hessian(
    f: Callable[..., Any],
    *args: Any,
    differentiable: bool = False,
    mode: str = "auto",
    loss_reduction: str | None = None,
    compile: bool = False,
    process_group: Any = None,
) -> AutodiffOperator:
    """The Hessian of a scalar torch or JAX function as a symmetric operator.

    Three call forms:

    - ``hessian(f, x)``: ``f(x)`` a scalar, ``x`` a tensor, a list/tuple/dict of tensors
      or a JAX pytree.
    - ``hessian(model, loss_fn, data)``: a ``torch.nn.Module``; the variables are its
      parameters with ``requires_grad=True`` (frozen ones and buffers are held fixed).
    - ``hessian(apply_fn, params, loss_fn, data)``: ``apply_fn(params, inputs)`` with a
      params pytree (JAX) or dict of tensors (torch).

    With ``data`` one ``(inputs, targets)`` batch or an iterable of batches, the operator
    is the Hessian of the loss over all of the data: batch b enters with weight n_b / N
    for a mean-reduced loss (so it equals the Hessian on the concatenated data), 1 for a
    sum-reduced one. A loss whose mean divides by something else than the batch's
    samples (``CrossEntropyLoss(weight=...)`` divides by the summed class weights, and
    ``ignore_index`` drops samples) is not the concatenated data's loss when split so:
    pass such data as one batch, or use ``reduction="sum"`` and scale.

    Parameters
    ----------
    f : callable or torch.nn.Module
    *args
        ``x``; or ``loss_fn, data``; or ``params, loss_fn, data`` (see above).
    differentiable : bool
        torch: keep the products in the autograd graph of ``x`` (and of tensors ``f``
        captures), so that ``trace(H).value`` can be backpropagated. JAX products are
        always differentiable (use :func:`jax.grad` around the estimate).
    mode : {"auto", "forward", "reverse", "loop"}
        How the block products H V are formed (``H.mode`` names the route in use):

        - ``"forward"``: forward-over-reverse HVPs, ``vmap(jvp(grad))`` over the columns.
        - ``"reverse"``: reverse-over-reverse, ``vmap`` over the pullback of the gradient
          (torch: a loop of double-backward HVPs where ``vmap`` fails).
        - ``"loop"``: one product per column. torch: one gradient graph per block, then one
          double-backward pass through it per column (``torch.autograd``). JAX:
          ``lax.map`` instead of ``vmap`` in the compiled program.
        - ``"auto"``: forward-over-reverse, falling back (with one warning) to
          reverse-over-reverse where forward mode fails on the function (an operation
          without a forward-mode rule, or one torch cannot run forward over reverse:
          torch 2.13 raises "ZeroTensors are immutable" there for ``mse_loss``; the
          warning quotes the error); an error that says nothing about the function (out of memory, an interrupt) propagates
          and switches no route. torch also times the loop against it on the first block
          of 4 or more columns (each column computed once, by one of the two; the device
          synchronized for this timing only) and keeps the faster route for later
          products; ``H.route_timing`` holds the measurement, and a block more than
          twice as wide is timed again. An operator built again for the same problem (the
          same function, or the same model and loss, and arguments or batches of the same
          shapes, dtypes and devices: ``hessian(...)`` at every training step) takes the
          last choice timed for it (``route_timing.reused``) instead of timing again.
          The loop tends to win on wide networks on a CPU,
          the vectorized product on GPUs and small networks. JAX does not time (its
          products stay traceable under ``jax.jit``): there ``"auto"`` is the vectorized
          product.
    loss_reduction : {"mean", "sum"}, optional
        How ``loss_fn`` reduces over a batch; read from ``loss_fn.reduction`` (torch
        losses), else ``"mean"``.
    compile : bool
        torch only: run the HVP through ``torch.compile`` (falls back to the eager
        product, with a warning, if compilation fails). The first product pays the
        compilation (tens of seconds); later ones ran about 2.5x faster than eager
        ``vmap(jvp(grad))`` on the digits MLP. The compiled product is not timed against
        the loop under ``mode="auto"``, and ``mode="loop"`` has none to compile. JAX
        products are always compiled.
    process_group : torch.distributed.ProcessGroup, optional
        torch network forms only: data parallel over the ranks of this group (for
        example ``torch.distributed.group.WORLD``), each rank passing its own shard of
        the data and the same model. The operator is then the Hessian of the loss over
        the union of the shards: each product sums the ranks' products in one
        ``all_reduce`` per block, a rank's batches weighted n_b / N for a mean-reduced
        loss (N, the samples of all ranks, is summed once here) and 1 for a
        sum-reduced one. Every rank must make the same calls (SPMD): same probes (same
        ``seed``), so every rank gets the same estimate. A rank whose products raise
        joins the ``all_reduce`` with a failure flag, so the others raise a
        RuntimeError naming it instead of waiting; the process group's ``timeout``
        covers a rank that stops anywhere else. Not with ``differentiable=True``.
        None (default): one process.

    Returns
    -------
    AutodiffOperator
        Square, tagged ``"symmetric"``; ``flatten``/``unflatten`` convert between the
        variables' structure and vectors.

    Examples
    --------
    The Hessian row sums of f(x1, x2) = x1^2 + 2 x1^2 x2 - 3 x2^3 at (1, 2), with one
    Hessian-vector product:

    >>> import torch
    >>> from linop_trace import hessian, row_sums
    >>> x = [torch.tensor(1.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)]
    >>> H = hessian(lambda v: v[0] ** 2 + 2 * v[0] ** 2 * v[1] - 3 * v[1] ** 3, x)
    >>> est = row_sums(H)
    >>> est.value.tolist(), est.num_matvecs
    ([14.0, -32.0], 1)
    """
    _check_callable(f, "hessian")
    mode = check_mode(mode, CURVATURE_MODES)
    if len(args) == 1:
        if process_group is not None:
            raise TypeError(
                "process_group needs the network forms hessian(model, loss_fn, data) or "
                "hessian(apply_fn, params, loss_fn, data), with each rank's shard of data"
            )
        library = _library("hessian", args[0])
        if library == "torch":
            from ._torch import TorchHessian

            return TorchHessian(
                f, args[0], differentiable=differentiable, mode=mode, compile=compile
            )
        from ._jax import JaxHessian

        return JaxHessian(f, args[0], mode=mode)
    model, params, loss_fn, data = _network_arguments("hessian", f, args)
    library = _library("hessian", model, params) if params is not None else "torch"
    if library == "torch":
        from ._torch import TorchHessian, network_problem

        problem = network_problem(
            model, params, loss_fn, data, loss_reduction, process_group, "hessian"
        )
        return TorchHessian(
            network=problem, differentiable=differentiable, mode=mode, compile=compile
        )
    _no_process_group_for_jax(process_group)
    from ._jax import JaxHessian
    from ._jax import network_problem as jax_network_problem

    return JaxHessian(
        network=jax_network_problem(model, params, loss_fn, data, loss_reduction), mode=mode
    )


def ggn(
    f: Callable[..., Any],
    *args: Any,
    differentiable: bool = False,
    mode: str = "auto",
    loss_reduction: str | None = None,
    process_group: Any = None,
) -> AutodiffOperator:
    """The generalized Gauss-Newton matrix J^T H_loss J of a network's loss over data.

    J is the Jacobian of the network outputs with respect to the parameters, H_loss the
    Hessian of the loss with respect to the outputs (computed by autodiff, so any
    twice-differentiable loss works: mean squared error, cross-entropy, ...). Call forms
    as in :func:`hessian`: ``ggn(model, loss_fn, data)`` for a ``torch.nn.Module``,
    ``ggn(apply_fn, params, loss_fn, data)`` for JAX (or torch with a dict of tensors).

    Parameters
    ----------
    f : torch.nn.Module or callable
    *args
        ``loss_fn, data`` or ``params, loss_fn, data``.
    differentiable : bool
        torch only: keep the products in the autograd graph.
    mode : {"auto", "forward", "reverse", "loop"}
        How the block products G V are formed (``G.mode`` names the route in use):

        - ``"forward"``: J V by forward mode, ``vmap(jvp)``, then H_loss and J^T vmapped.
        - ``"reverse"``: J V through two reverse passes (for networks without forward-mode
          rules; torch falls back to the loop where ``vmap`` fails).
        - ``"loop"``: one product per column. torch: one graph of the outputs per block,
          then per column three backward passes through it (J v as the pullback of
          u -> J^T u, H_loss, J^T). JAX: ``lax.map`` instead of ``vmap``.
        - ``"auto"``: forward mode, falling back (with one warning) to ``"reverse"``; torch
          times the loop against it on one block and keeps the faster, as
          :func:`hessian` does (``G.route_timing``).
    loss_reduction : {"mean", "sum"}, optional
        As in :func:`hessian`.
    process_group : torch.distributed.ProcessGroup, optional
        torch only: data parallel over the ranks of this group, each holding its shard
        of the data, as in :func:`hessian`.

    Returns
    -------
    AutodiffOperator
        Tagged ``"symmetric"`` and ``"positive_semidefinite"`` (true for losses convex in
        the outputs, such as MSE and cross-entropy).

    Examples
    --------
    For a linear model and the squared error, the GGN is the Hessian:

    >>> import torch
    >>> from linop_trace import ggn, hessian
    >>> model = torch.nn.Linear(3, 2).double()
    >>> data = (torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64))
    >>> G = ggn(model, torch.nn.MSELoss(), data).to_dense()
    >>> H = hessian(model, torch.nn.MSELoss(), data).to_dense()
    >>> bool(torch.allclose(G, H))
    True
    """
    _check_callable(f, "ggn")
    mode = check_mode(mode, CURVATURE_MODES)
    if len(args) < 2:
        raise TypeError("ggn takes (model, loss_fn, data) or (apply_fn, params, loss_fn, data)")
    model, params, loss_fn, data = _network_arguments("ggn", f, args)
    library = _library("ggn", model, params) if params is not None else "torch"
    if library == "torch":
        from ._torch import TorchGGN, network_problem

        problem = network_problem(
            model, params, loss_fn, data, loss_reduction, process_group, "ggn"
        )
        return TorchGGN(problem, differentiable=differentiable, mode=mode)
    _no_process_group_for_jax(process_group)
    from ._jax import JaxGGN
    from ._jax import network_problem as jax_network_problem

    return JaxGGN(jax_network_problem(model, params, loss_fn, data, loss_reduction), mode=mode)


def jacobian(
    f: Callable[[Any], Any], x: Any, *, differentiable: bool = False, mode: str = "auto"
) -> AutodiffOperator:
    """The Jacobian of ``f: x -> y`` as an (m, n) operator: JVPs forward, VJPs back.

    Parameters
    ----------
    f : callable
        Takes the structure of ``x`` and returns a tensor/array or a structure of them.
    x : tensor, array or structure of them
        n is the total size of ``x``, m that of ``f(x)``.
    differentiable : bool
        torch only: keep the products in the autograd graph.
    mode : {"auto", "forward", "reverse"}
        How products J V are formed: forward mode (``vmap(jvp)``), or two reverse passes
        for functions without forward-mode rules; ``"auto"`` falls back with a warning.

    Returns
    -------
    AutodiffOperator
        ``matmat`` gives J V, ``rmatmat`` gives J^T W; ``unflatten_output`` gives the
        structure of ``f(x)`` back.

    Examples
    --------
    >>> import torch
    >>> from linop_trace import jacobian, trace
    >>> x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    >>> J = jacobian(lambda v: v**2, x)
    >>> float(trace(J, method="exact"))  # 2 (1 + 2 + 3)
    12.0
    """
    _check_callable(f, "jacobian")
    mode = check_mode(mode)
    if _library("jacobian", x) == "torch":
        from ._torch import TorchJacobian

        return TorchJacobian(f, x, differentiable=differentiable, mode=mode)
    from ._jax import JaxJacobian

    return JaxJacobian(f, x, mode=mode)


# ---------------------------------------------------------------------- divergence


def divergence_samples(jvp_block: Callable[[Any], Any], probes: Any, xp: Any) -> Any:
    """Per-probe, per-sample quadratic forms z_b^T J_b z_b: a (k, B) array.

    ``probes`` is a (k, B, d) block of tangents; ``jvp_block`` returns J Z for all k
    probes in one call, where J is block diagonal over the B samples of a sample-wise
    function. Averaging over k probes gives Hutchinson's estimate of each tr(J_b);
    summing over the d unit vectors gives it exactly.

    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> from linop_trace.autodiff import divergence_samples
    >>> scales = np.array([1.0, 2.0, 3.0])  # f(x) = x * scales: J_b = diag(scales)
    >>> units = np.broadcast_to(np.eye(3)[:, None, :], (3, 2, 3))  # e_i for 2 samples
    >>> divergence_samples(lambda Z: Z * scales, units, xp).sum(axis=0)
    array([6., 6.])
    """
    image = jvp_block(probes)
    if tuple(image.shape) != tuple(probes.shape):
        raise ValueError(
            "divergence needs a sample-wise f: (B, d) -> (B, d); f returned shape "
            f"{tuple(image.shape[1:])} for inputs of shape {tuple(probes.shape[1:])}"
        )
    return xp.sum(probes * image, axis=-1)


def divergence(
    f: Callable[[Any], Any],
    x: Any,
    method: str = "auto",
    num_matvecs: int | None = None,
    seed: Any = None,
    probe: str | None = None,
    block_size: int | None = None,
    differentiable: bool = False,
    check_finite: bool = True,
) -> Estimate:
    """Per-sample divergence tr(df_b/dx_b) of a batched, sample-wise ``f: (B, d) -> (B, d)``.

    The continuous-normalizing-flow case: B traces of d x d Jacobians at once. Each
    probe block is one vectorized pass (``vmap`` over probes of a JVP of the batched
    function), giving all B estimates.

    Parameters
    ----------
    f : callable
        Maps a (B, d) tensor/array to a (B, d) one, sample by sample (row b of the
        output depends on row b of the input only; otherwise the estimate is of the
        diagonal blocks of the Jacobian).
    x : tensor or array of shape (B, d)
    method : {"auto", "exact", "hutchinson"}
        ``"exact"``: d JVPs with the unit vectors. ``"hutchinson"``: ``num_matvecs``
        random probes, per-sample mean and standard error. ``"auto"``: exact when
        d <= ``num_matvecs``.
    num_matvecs : int, optional
        Number of probes (batched JVPs), 100 if not given.
    seed : int, None, or the library's generator/key
    probe : {"rademacher", "gaussian", "sphere"}, optional
        Rademacher if not given.
    block_size : int, optional
        Most probes per vectorized pass; by default as many as fit in a quarter of the
        free memory of the device of ``x``.
    differentiable : bool
        torch: keep the estimate in the autograd graph of ``x`` and of the parameters
        ``f`` captures (for training losses). JAX estimates are always differentiable.
    check_finite : bool
        Raise ``FloatingPointError`` when a Jacobian-vector product (or a sample formed
        from it) is NaN or infinite, as :func:`~linop_trace.trace` does: when the
        estimate is first read (no wait for the device while it is computed).

    Returns
    -------
    Estimate
        ``value`` and ``stderr`` of shape (B,), ``num_matvecs`` the number of probes.

    Examples
    --------
    >>> import torch
    >>> from linop_trace import divergence
    >>> x = torch.randn(5, 3, dtype=torch.float64)
    >>> est = divergence(lambda z: z**3, x, method="exact")
    >>> bool(torch.allclose(est.value, (3 * x**2).sum(dim=1)))
    True
    """
    _check_callable(f, "divergence")
    library = _library("divergence", x)
    if getattr(x, "ndim", None) != 2:
        raise ValueError(
            f"divergence expects x of shape (B, d), got shape {tuple(getattr(x, 'shape', ()))}"
        )
    if method not in ("auto", "exact", "hutchinson"):
        raise ValueError(
            f"unknown divergence method {method!r}; known methods are: auto, exact, hutchinson"
        )
    xp = backend.array_namespace(x)
    dtype = x.dtype
    if not xp.isdtype(dtype, "real floating"):
        raise TypeError(f"divergence needs real floating x, got {backend.dtype_name(dtype)}")
    try:
        device = backend.device_of(x)
    except Exception:  # JAX tracers
        device = None
    batch, dim = int(x.shape[0]), int(x.shape[1])
    num_matvecs = check_num_matvecs(
        DEFAULT_NUM_MATVECS if num_matvecs is None else num_matvecs, method, 1
    )
    if method == "auto":
        method = "exact" if dim <= num_matvecs else "hutchinson"
    if method == "hutchinson" and num_matvecs < 2:
        raise ValueError(
            "method 'hutchinson' needs num_matvecs >= 2 for a standard error, "
            f"got num_matvecs={num_matvecs}"
        )
    jvp_block = _divergence_jvp(library, f, x, differentiable)
    total = dim if method == "exact" else num_matvecs
    itemsize = max(1, xp.finfo(dtype).bits // 8)
    if block_size is None:
        # a probe of the batch and its JVP, with room for the forward pass's activations
        block_size = block_size_for(xp, device, 4 * batch * dim * itemsize, limit=total)
    else:
        block_size = check_positive_int(block_size, "block_size")
    widths = [min(block_size, total - start) for start in range(0, total, block_size)]

    if method == "exact":
        value = None
        eye = xp.eye(dim, dtype=dtype, device=device)
        start = 0
        for width in widths:
            units = eye[start : start + width, :]
            probes = xp.broadcast_to(units[:, None, :], (width, batch, dim))
            part = xp.sum(divergence_samples(jvp_block, probes, xp), axis=0)
            value = part if value is None else value + part
            start += width
        stderr = xp.zeros((batch,), dtype=dtype, device=device)
        exact = Estimate(value, stderr, dim, "exact")
        return exact.with_checks(_finite_checks(xp, [value], check_finite), dim)

    sampler = ProbeSampler(
        "rademacher" if probe is None else probe, batch * dim, xp, dtype, device, seed
    )
    pieces = []
    for width in widths:
        block = sampler(width)  # (B d, k): one probe per column, as for any operator
        probes = xp.reshape(xp.matrix_transpose(block), (width, batch, dim))
        pieces.append(divergence_samples(jvp_block, probes, xp))
    samples = xp.concat(pieces, axis=0) if len(pieces) > 1 else pieces[0]
    # Hutchinson's estimate per sample b: mean, stderr and the shape-corrected interval
    # (over the largest deviation, so extreme scales neither overflow nor underflow)
    info = {"probe": sampler.kind}
    estimate = sample_mean(samples, xp, terms=dim).estimate(num_matvecs, "hutchinson", info=info)
    return estimate.with_checks(_finite_checks(xp, [samples], check_finite), num_matvecs)


def _finite_checks(xp: Any, results: list[Any], check_finite: bool) -> tuple[DeferredCheck, ...]:
    """The check that every JVP was finite, carried by the ``results`` they flow into
    (a non-finite entry of a JVP makes its samples non-finite)."""
    if not check_finite:
        return ()
    flags = [backend.finite_flag(xp, result) for result in results]
    failed = ~(flags[0] if len(flags) == 1 else xp.all(xp.stack(flags)))
    return (DeferredCheck(failed, (), _non_finite_jvp),)


def _non_finite_jvp() -> Exception:
    return FloatingPointError(
        "divergence: f's Jacobian-vector products returned non-finite values (NaN or inf), "
        "or the samples formed from them overflowed; pass check_finite=False to skip this "
        "check"
    )


def _divergence_jvp(library: str, f: Callable, x: Any, differentiable: bool) -> FallbackChain:
    if library == "torch":
        from ._torch import torch_divergence_jvp, torch_divergence_jvp_fallback

        forward = torch_divergence_jvp(f, x, differentiable)
        reverse = torch_divergence_jvp_fallback(f, x, differentiable)
    else:
        from ._jax import jax_divergence_jvp

        forward = jax_divergence_jvp(f, x, "forward")
        reverse = jax_divergence_jvp(f, x, "reverse")
    return FallbackChain(
        [
            ("forward-mode JVP (vmap(jvp))", forward),
            ("a JVP through two reverse passes", reverse),
        ],
        "divergence",
    )
