"""Hessian, Gauss-Newton and Jacobian operators of PyTorch functions (torch.func).

Every block product is one vectorized call: ``torch.func.vmap`` over the columns of the
block of a Jacobian-vector product (forward mode), of a forward-over-reverse
Hessian-vector product ``jvp(grad(f))``, or of the pullback of ``grad(f)``
(reverse-over-reverse). Where forward-mode AD is not available for the user's function
(custom ``autograd.Function`` without ``jvp``, some operators), the operators fall back to
reverse-over-reverse products and say so once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.func import functional_call, grad, jvp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from .. import _backend as backend
from ._common import (
    AutodiffOperator,
    FallbackChain,
    batch_weights,
    check_batch,
    check_mode,
    loss_reduction,
    split_data,
)

__all__ = ["TorchGGN", "TorchHessian", "TorchJacobian", "torch_divergence_jvp"]


# --------------------------------------------------------------------------- layout


class _Layout:
    """Flattening of a tensor or a (nested) list/tuple/dict of tensors into one vector."""

    def __init__(self, structure: Any, what: str) -> None:
        leaves, self.spec = tree_flatten(structure)
        if not leaves:
            raise ValueError(f"{what} holds no tensors")
        for leaf in leaves:
            if not isinstance(leaf, torch.Tensor):
                raise TypeError(
                    f"{what} must hold torch tensors only, found {type(leaf).__module__}."
                    f"{type(leaf).__name__}"
                )
        first = leaves[0]
        for leaf in leaves[1:]:
            if leaf.dtype != first.dtype:
                raise TypeError(
                    f"{what} mixes dtypes {backend.dtype_name(first.dtype)} and "
                    f"{backend.dtype_name(leaf.dtype)}; cast them to one dtype"
                )
            if leaf.device != first.device:
                raise ValueError(f"{what} mixes devices {first.device} and {leaf.device}")
        if not first.is_floating_point():
            raise TypeError(
                f"{what} must be real floating tensors to differentiate, "
                f"got {backend.dtype_name(first.dtype)}"
            )
        self.dtype = first.dtype
        self.device = first.device
        self.shapes = [tuple(leaf.shape) for leaf in leaves]
        self.sizes = [leaf.numel() for leaf in leaves]
        self.size = sum(self.sizes)
        self.what = what

    def flatten(self, structure: Any) -> torch.Tensor:
        leaves, spec = tree_flatten(structure)
        if spec != self.spec:
            raise ValueError(f"the structure to flatten does not match that of {self.what}")
        for leaf, shape in zip(leaves, self.shapes):
            if tuple(leaf.shape) != shape:
                raise ValueError(
                    f"a leaf of shape {tuple(leaf.shape)} does not match the shape {shape} "
                    f"in {self.what}"
                )
        return torch.cat([leaf.reshape(-1) for leaf in leaves])

    def unflatten(self, vector: torch.Tensor) -> Any:
        pieces = torch.split(vector, self.sizes)
        leaves = [piece.reshape(shape) for piece, shape in zip(pieces, self.shapes)]
        return tree_unflatten(leaves, self.spec)


def _no_grad_unless(differentiable: bool) -> Any:
    # torch.func transforms ignore an outer no_grad for their own levels, so the products
    # work under it; it only stops an autograd graph to captured tensors from being built.
    return contextlib.nullcontext() if differentiable else torch.no_grad()


def _check_scalar(value: Any, what: str) -> None:
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = tuple(getattr(value, "shape", ()))
        raise ValueError(f"{what} must return a scalar tensor, got shape {shape}")


def _vjp(fn: Callable, primal: torch.Tensor) -> tuple[Any, Callable]:
    """``(fn(primal), pullback)`` (torch.func.vjp without auxiliary outputs)."""
    result = torch.func.vjp(fn, primal)
    return result[0], result[1]


# ---------------------------------------------------------------------- HVP kernels


def hvp_forward_over_reverse(fn: Callable, theta: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """H V for the (n, k) block V: vmap over columns of jvp(grad(fn))."""

    def column(v: torch.Tensor) -> torch.Tensor:
        return jvp(grad(fn), (theta,), (v,))[1]

    return vmap(column, in_dims=1, out_dims=1)(V)


def hvp_reverse_over_reverse(fn: Callable, theta: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """H V by one gradient and a vmapped pullback of it (H is symmetric, so H V = V^T H)."""
    _, pullback = _vjp(grad(fn), theta)
    return vmap(lambda v: pullback(v)[0], in_dims=1, out_dims=1)(V)


def hvp_double_backward_loop(
    fn: Callable, theta: torch.Tensor, V: torch.Tensor, differentiable: bool
) -> torch.Tensor:
    """The last resort: double-backward HVPs with torch.autograd, one column at a time."""
    with torch.enable_grad():
        variable = (
            theta if differentiable and theta.requires_grad else theta.detach().requires_grad_()
        )
        (gradient,) = torch.autograd.grad(fn(variable), variable, create_graph=True)
        columns = []
        for j in range(V.shape[1]):
            (column,) = torch.autograd.grad(
                gradient, variable, V[:, j], retain_graph=True, create_graph=differentiable
            )
            columns.append(column)
    return torch.stack(columns, dim=1)


def _hvp_chain(mode: str, differentiable: bool, compile: bool = False) -> FallbackChain:
    forward = ("forward-over-reverse HVP (vmap(jvp(grad)))", hvp_forward_over_reverse)
    reverse = ("reverse-over-reverse HVP (vmap(vjp(grad)))", hvp_reverse_over_reverse)
    loop = (
        "a loop of double-backward HVPs",
        lambda fn, theta, V: hvp_double_backward_loop(fn, theta, V, differentiable),
    )
    order = {"auto": [forward, reverse, loop], "forward": [forward], "reverse": [reverse, loop]}
    chain = order[mode]
    if compile:
        # Compiled once per kernel and reused: dynamo guards on the code and the tensor
        # metadata of what the objective captures, not on the closure object itself.
        name, kernel = chain[0]
        chain = [(f"torch.compile'd {name}", torch.compile(kernel)), *chain]
    return FallbackChain(chain, "hessian")


def _jvp_block(fn: Callable, theta: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """(k, *out) block of J v for the columns v of V (forward mode)."""
    return vmap(lambda v: jvp(fn, (theta,), (v,))[1], in_dims=1)(V)


def _jvp_block_by_double_vjp(fn: Callable, theta: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """J v without forward mode: u -> J^T u is linear, and its pullback applied to v is J v."""
    outputs, pullback = _vjp(fn, theta)
    seed = torch.zeros_like(outputs)
    _, pull_pullback = _vjp(lambda u: pullback(u)[0], seed)
    return vmap(lambda v: pull_pullback(v)[0], in_dims=1)(V)


def _jvp_chain(what: str, mode: str = "auto") -> FallbackChain:
    forward = ("forward-mode JVP (vmap(jvp))", _jvp_block)
    reverse = ("a JVP through two reverse passes (vmap(vjp(vjp)))", _jvp_block_by_double_vjp)
    order = {"auto": [forward, reverse], "forward": [forward], "reverse": [reverse]}
    return FallbackChain(order[mode], what)


# ------------------------------------------------------------------------ problems


def _function_objective(f: Callable, x: Any) -> tuple[_Layout, Callable, torch.Tensor]:
    layout = _Layout(x, "`x`")

    def fn(theta: torch.Tensor) -> torch.Tensor:
        return f(layout.unflatten(theta))

    theta = layout.flatten(x)
    return layout, fn, theta


class _ModuleParameters:
    """The trainable parameters of a module as the variables, the rest held fixed."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        named = dict(model.named_parameters())
        self.trainable = {name: p for name, p in named.items() if p.requires_grad}
        if not self.trainable:
            raise ValueError("the module has no parameters with requires_grad=True")
        self.fixed = {name: p.detach() for name, p in named.items() if not p.requires_grad}
        self.fixed.update(dict(model.named_buffers()))

    def apply(self, params: dict[str, torch.Tensor], inputs: Any) -> torch.Tensor:
        arguments = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        return functional_call(self.model, {**self.fixed, **params}, arguments)


def _batch_size(inputs: Any, targets: Any) -> int:
    if isinstance(targets, torch.Tensor) and targets.ndim > 0:
        return int(targets.shape[0])
    first = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
    return int(first.shape[0])


class _NetworkProblem:
    """``loss_fn(apply(params, inputs), targets)`` summed over the batches of ``data``."""

    def __init__(
        self,
        model: Any,
        params: Any,
        loss_fn: Callable,
        data: Any,
        reduction: str | None,
    ) -> None:
        if isinstance(model, torch.nn.Module):
            if params is not None:
                raise TypeError("pass either a module or (apply_fn, params), not both")
            module = _ModuleParameters(model)
            structure: Any = module.trainable
            self.apply: Callable = module.apply
        else:
            if not callable(model):
                raise TypeError(f"expected a torch.nn.Module or an apply function, got {model!r}")
            structure = params
            self.apply = model
        self.layout = _Layout(structure, "the parameters")
        self.theta = self.layout.flatten(structure).detach()
        self.loss_fn = loss_fn
        self.batches, _ = split_data(data, lambda a: isinstance(a, torch.Tensor))
        sizes = []
        for index, batch in enumerate(self.batches):
            inputs, targets = check_batch(batch, index)
            sizes.append(_batch_size(inputs, targets))
        self.reduction = loss_reduction(loss_fn, reduction)
        batch_weights(sizes, self.reduction)  # validates: some batches, some samples
        self.num_samples = sum(sizes)

    def batch_terms(self) -> Iterable[tuple[float, Any, Any]]:
        """``(weight, inputs, targets)`` per batch, in one pass over the data.

        Weights come from each batch's own size, so a shuffling data loader, walked
        again for every product, still weighs every batch right.
        """
        for index, batch in enumerate(self.batches):
            inputs, targets = check_batch(batch, index)
            size = _batch_size(inputs, targets)
            yield (1.0 if self.reduction == "sum" else size / self.num_samples), inputs, targets

    def output_fn(self, inputs: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda theta: self.apply(self.layout.unflatten(theta), inputs)

    def loss_term(self, inputs: Any, targets: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda theta: self.loss_fn(self.apply(self.layout.unflatten(theta), inputs), targets)


# ----------------------------------------------------------------------- operators


class _TorchOperator(AutodiffOperator):
    def _setup(self, layout: _Layout, rows: int, tags: tuple[str, ...]) -> None:
        import array_api_compat.torch as xp

        super().__init__((rows, layout.size), layout.dtype, xp, layout.device, tags)
        self.layout = layout
        self._flatten_fn = layout.flatten
        self._unflatten_fn = layout.unflatten

    def _in_own_dtype(self, X: torch.Tensor) -> torch.Tensor:
        return X if X.dtype == self.dtype else X.to(self.dtype)


class TorchHessian(_TorchOperator):
    """Hessian of a scalar torch function (or of a network's loss over data)."""

    def __init__(
        self,
        f: Callable | None = None,
        x: Any = None,
        *,
        network: _NetworkProblem | None = None,
        differentiable: bool = False,
        mode: str = "auto",
        compile: bool = False,
    ) -> None:
        check_mode(mode)
        self.differentiable = bool(differentiable)
        if network is None:
            assert f is not None
            layout, fn, theta = _function_objective(f, x)
            with torch.no_grad():
                _check_scalar(fn(theta.detach()), "the function")
            self._terms: Callable[[], Iterable[tuple[float, Callable]]] = lambda: [(1.0, fn)]
        else:
            layout, theta = network.layout, network.theta
            self._terms = lambda: (
                (weight, network.loss_term(inputs, targets))
                for weight, inputs, targets in network.batch_terms()
            )
        self.theta = theta if self.differentiable else theta.detach()
        self._hvp = _hvp_chain(mode, self.differentiable, compile)
        self._setup(layout, layout.size, ("symmetric",))

    @property
    def mode(self) -> str:
        """The HVP in use: forward-over-reverse until a fallback was needed."""
        return self._hvp.mode

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        V = self._in_own_dtype(X)
        out = None
        with _no_grad_unless(self.differentiable):
            for weight, fn in self._terms():
                product = self._hvp(fn, self.theta, V)
                product = product if weight == 1.0 else weight * product
                out = product if out is None else out + product
        assert out is not None
        return out.to(X.dtype)

    def _rmatmat(self, X: torch.Tensor) -> torch.Tensor:
        return self._matmat(X)  # a real Hessian is symmetric


class TorchGGN(_TorchOperator):
    """Generalized Gauss-Newton matrix J^T H_loss J of a network's loss over data."""

    def __init__(self, network: _NetworkProblem, *, differentiable: bool = False) -> None:
        self.network = network
        self.differentiable = bool(differentiable)
        self.theta = network.theta
        self._jvp = _jvp_chain("ggn")
        self._setup(network.layout, network.layout.size, ("symmetric", "positive_semidefinite"))

    def _block(self, weight: float, inputs: Any, targets: Any, V: torch.Tensor) -> torch.Tensor:
        output_fn = self.network.output_fn(inputs)
        loss_fn = self.network.loss_fn
        outputs, pullback = _vjp(output_fn, self.theta)
        JV = self._jvp(output_fn, self.theta, V)  # (k, *outputs.shape)

        # H_loss u by reverse-over-reverse in output space: cheap there, and it avoids
        # losses whose forward-over-reverse torch lacks (mse_loss raises on ZeroTensors)
        def loss_of_outputs(out: torch.Tensor) -> torch.Tensor:
            return loss_fn(out, targets)

        _, loss_pullback = _vjp(grad(loss_of_outputs), outputs)
        HJV = vmap(lambda u: loss_pullback(u)[0])(JV)
        GV = vmap(lambda w: pullback(w)[0], in_dims=0, out_dims=1)(HJV)
        return GV if weight == 1.0 else weight * GV

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        V = self._in_own_dtype(X)
        out = None
        with _no_grad_unless(self.differentiable):
            for weight, inputs, targets in self.network.batch_terms():
                product = self._block(weight, inputs, targets, V)
                out = product if out is None else out + product
        assert out is not None
        return out.to(X.dtype)

    def _rmatmat(self, X: torch.Tensor) -> torch.Tensor:
        return self._matmat(X)


class TorchJacobian(_TorchOperator):
    """Jacobian of ``f: x -> y`` (tensors or structures of tensors): JVPs and VJPs."""

    def __init__(
        self, f: Callable, x: Any, *, differentiable: bool = False, mode: str = "auto"
    ) -> None:
        check_mode(mode)
        self.differentiable = bool(differentiable)
        layout = _Layout(x, "`x`")
        theta = layout.flatten(x)
        self.theta = theta if self.differentiable else theta.detach()
        with torch.no_grad():
            sample = f(layout.unflatten(theta.detach()))
        self.output_layout = _Layout(sample, "the output of `f`")
        if self.output_layout.dtype != layout.dtype:
            raise TypeError(
                f"`f` returns {backend.dtype_name(self.output_layout.dtype)} for "
                f"{backend.dtype_name(layout.dtype)} inputs; the Jacobian needs one dtype"
            )
        output_layout = self.output_layout

        def fn(flat: torch.Tensor) -> torch.Tensor:
            return output_layout.flatten(f(layout.unflatten(flat)))

        self.fn = fn
        self._jvp = _jvp_chain("jacobian", mode)
        self._setup(layout, output_layout.size, ())

    def unflatten_output(self, vector: torch.Tensor) -> Any:
        """The structure of ``f(x)`` filled from a vector of length ``shape[0]``."""
        return self.output_layout.unflatten(vector)

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        V = self._in_own_dtype(X)
        with _no_grad_unless(self.differentiable):
            out = self._jvp(self.fn, self.theta, V)
        return out.T.to(X.dtype)

    def _rmatmat(self, X: torch.Tensor) -> torch.Tensor:
        W = self._in_own_dtype(X)
        with _no_grad_unless(self.differentiable):
            _, pullback = _vjp(self.fn, self.theta)
            out = vmap(lambda w: pullback(w)[0], in_dims=1, out_dims=1)(W)
        return out.to(X.dtype)


# ---------------------------------------------------------------------- divergence


def torch_divergence_jvp(
    f: Callable, x: torch.Tensor, differentiable: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``Z -> (J Z)`` for a (k, B, d) block of tangents of the batched function ``f``."""
    primal = x if differentiable else x.detach()

    def block(Z: torch.Tensor) -> torch.Tensor:
        with _no_grad_unless(differentiable):
            return vmap(lambda z: jvp(f, (primal,), (z,))[1])(Z)

    return block


def torch_divergence_jvp_fallback(
    f: Callable, x: torch.Tensor, differentiable: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The same product without forward mode, through two reverse passes."""
    primal = x if differentiable else x.detach()

    def block(Z: torch.Tensor) -> torch.Tensor:
        with _no_grad_unless(differentiable):
            outputs, pullback = _vjp(f, primal)
            _, pull_pullback = _vjp(lambda u: pullback(u)[0], torch.zeros_like(outputs))
            return vmap(lambda z: pull_pullback(z)[0])(Z)

    return block


def network_problem(
    model: Any, params: Any, loss_fn: Callable, data: Any, reduction: str | None
) -> _NetworkProblem:
    return _NetworkProblem(model, params, loss_fn, data, reduction)
