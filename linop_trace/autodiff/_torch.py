"""Hessian, Gauss-Newton and Jacobian operators of PyTorch functions (torch.func).

A block product is one vectorized call: ``torch.func.vmap`` over the columns of the block
of a Jacobian-vector product (forward mode), of a forward-over-reverse Hessian-vector
product ``jvp(grad(f))``, or of the pullback of ``grad(f)`` (reverse-over-reverse). Where
forward-mode AD is not available for the user's function (custom ``autograd.Function``
without ``jvp``, some operators), the operators fall back to reverse-over-reverse products
and say so once.

Hessians and Gauss-Newton matrices also have a loop route: one autograd graph per block,
then one backward pass through it per column. On a wide network on a CPU the loop can be
the faster of the two (the batched intermediates of the vectorized call outgrow the
caches); ``mode="auto"`` times both on one block and keeps the faster
(:class:`~linop_trace.autodiff._common.FastestRoute`).

The operators may be shared between threads: the forward-mode products, whose AD levels
torch keeps per process, hold :data:`_FORWARD_AD_LOCK`, and a forward pass through a
module with swapped-in parameters holds :data:`_MODULE_CALL_LOCK`.

Data-parallel Hessians and GGNs (``process_group=``) sum each rank's weighted products
over the ranks with one ``torch.distributed.all_reduce`` per block
(:class:`_DataParallel`); every rank draws the same probes, so every rank computes the
same estimate (SPMD). A small collective before it checks that the ranks multiply the
same probe block (other seeds or budgets on the ranks are an error on the first block).
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
from torch.func import functional_call, grad, jvp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from .. import _backend as backend
from .._plan import plan_code
from ._common import (
    CURVATURE_MODES,
    AutodiffOperator,
    FallbackChain,
    FastestRoute,
    RouteTiming,
    batch_weights,
    check_batch,
    check_mode,
    loss_reduction,
    split_data,
)

__all__ = ["TorchGGN", "TorchHessian", "TorchJacobian", "torch_divergence_jvp"]

_Result = TypeVar("_Result")

#: torch keeps its forward-mode AD levels per process, not per thread: a ``jvp`` that
#: enters or leaves its level while another thread's ``jvp`` is inside its own fails
#: ("Trying to access a forward AD level with an invalid index"). Every forward-mode
#: product holds this lock while it runs (:func:`_forward_mode`); reverse mode and the
#: loops keep their state per thread and run concurrently. Reentrant, for a function
#: whose value itself calls a forward-mode product of this module.
_FORWARD_AD_LOCK = threading.RLock()

#: ``functional_call`` swaps the variables into the module's attributes for the forward
#: pass: two threads doing so at once read each other's (functorch-wrapped) tensors,
#: which gave wrong products and functorch's internal asserts. Held for one forward pass
#: through a module (:meth:`_ModuleParameters.apply`); one lock for all modules, since
#: modules may share submodules. Taken after :data:`_FORWARD_AD_LOCK`, never before.
_MODULE_CALL_LOCK = threading.RLock()


def _forward_mode(kernel: Callable[..., _Result]) -> Callable[..., _Result]:
    """``kernel`` (a product by ``torch.func.jvp``) run under :data:`_FORWARD_AD_LOCK`."""

    @functools.wraps(kernel)
    def one_at_a_time(*args: Any, **kwargs: Any) -> _Result:
        with _FORWARD_AD_LOCK:
            return kernel(*args, **kwargs)

    return one_at_a_time


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

    def facts(self) -> tuple[Any, ...]:
        """What a product's cost depends on in the layout: shapes, dtype, device."""
        return (tuple(self.shapes), self.dtype, str(self.device))

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


def _as_scalar(value: Any) -> Any:
    """A one-element tensor as a 0-d one (``torch.func.grad`` refuses shape (1,), which
    the scalar check accepts: every vectorized route failed and the operator fell back to
    the loop, with warnings that blamed the function); anything else as it is."""
    if isinstance(value, torch.Tensor) and value.ndim and value.numel() == 1:
        return value.reshape(())
    return value


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


def double_backward_products(
    fn: Callable, theta: torch.Tensor, differentiable: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``V -> H V`` through one gradient graph of ``fn`` at ``theta``, built here.

    Each column then costs one backward pass through the graph of the gradient (the
    double-backward HVP); the graph is kept for every column and every later call. With
    ``differentiable`` the columns keep their own graph (``create_graph``), so they can be
    backpropagated to ``theta`` (if it requires grad) and to the tensors ``fn`` captures.
    """
    with _recording():
        variable = _variable(theta, differentiable)
        gradient = _gradient(fn(variable), variable, None, create_graph=True)
    return _column_loop(_pullback_of(gradient, variable, differentiable), variable.numel())


def gauss_newton_products(
    output_fn: Callable,
    loss_of_outputs: Callable,
    theta: torch.Tensor,
    differentiable: bool,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``V -> J^T H_loss J V`` through one graph of the network outputs, built here.

    Per column: J v as the pullback of the linear map u -> J^T u (the graph of J^T u is
    built once, at u = 0), H_loss (J v) by double backward in output space, and J^T of that
    by one more backward pass: three backward passes, no forward mode.
    """
    with _recording():
        variable = _variable(theta, differentiable)
        outputs = output_fn(variable)
        probe = torch.zeros_like(outputs, requires_grad=True)
        transposed = _gradient(outputs, variable, probe, create_graph=True)  # J^T u
        loss_gradient = _gradient(loss_of_outputs(outputs), outputs, None, create_graph=True)
    jvp_of = _pullback_of(transposed, probe, differentiable)
    loss_hvp_of = _pullback_of(loss_gradient, outputs, differentiable)
    vjp_of = _pullback_of(outputs, variable, differentiable)
    return _column_loop(lambda v: vjp_of(loss_hvp_of(jvp_of(v))), variable.numel())


@contextlib.contextmanager
def _recording() -> Iterator[None]:
    """Autograd recording on, inside ``torch.no_grad`` and ``torch.inference_mode`` too:
    ``enable_grad`` alone does not leave inference mode, where no graph was recorded and
    the loop route's products came back as zeros (``mode="auto"`` then kept the loop,
    which its timing found cheapest)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _variable(theta: torch.Tensor, differentiable: bool) -> torch.Tensor:
    """``theta`` itself where its graph is wanted, else a detached leaf to differentiate
    (a copy of a tensor made under inference mode, which autograd cannot record)."""
    if differentiable and theta.requires_grad:
        return theta
    if theta.is_inference():
        return theta.clone().requires_grad_()
    return theta.detach().requires_grad_()


def _gradient(
    output: torch.Tensor, variable: torch.Tensor, seed: torch.Tensor | None, create_graph: bool
) -> torch.Tensor:
    """d<output, seed>/d variable (seed None: output is a scalar), zeros where unused."""
    if not output.requires_grad:  # the output does not depend on the variable
        return torch.zeros_like(variable)
    (result,) = torch.autograd.grad(
        output,
        variable,
        seed,
        retain_graph=True,
        create_graph=create_graph,
        allow_unused=True,
        materialize_grads=True,
    )
    return result


def _pullback_of(
    output: torch.Tensor, variable: torch.Tensor, differentiable: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``w -> (d output / d variable)^T w`` by a backward pass through output's kept graph."""

    def pullback(w: torch.Tensor) -> torch.Tensor:
        with _recording():
            return _gradient(output, variable, w.reshape(output.shape), differentiable)

    return pullback


def _column_loop(
    column: Callable[[torch.Tensor], torch.Tensor], size: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``V -> [column(v) for the columns v of V]`` as a (size, k) block."""

    def products(V: torch.Tensor) -> torch.Tensor:
        if V.shape[1] == 0:
            return V.new_zeros((size, 0))
        # rows of the transpose: each column contiguous, as the backward passes want it
        return torch.stack([column(v) for v in V.T.contiguous()], dim=1)

    return products


def _join_columns(*blocks: torch.Tensor) -> torch.Tensor:
    return torch.cat(blocks, dim=1)


def route_clock(device: torch.device) -> Callable[[], float]:
    """The clock that times the routes on ``device``, read when the timing runs.

    For CPU work on one thread, the CPU time of this thread (torch runs the products and
    their backward passes on the calling thread): other processes on the machine cannot
    slow it, where on a loaded machine they shifted the wall time of single calls by 2x.
    Else (GPUs, several threads) the wall time.
    """

    def read() -> float:
        if device.type == "cpu" and torch.get_num_threads() == 1:
            return time.thread_time()
        return time.perf_counter()

    return read


def _synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for the device's queued work (CPU: nothing to wait for); timing only."""
    if device.type == "cuda":
        return functools.partial(torch.cuda.synchronize, device)
    backend_module = getattr(torch, device.type, None)  # torch.mps, torch.xpu, ...
    synchronize = getattr(backend_module, "synchronize", None)
    if device.type == "cpu" or synchronize is None:
        return lambda: None
    return synchronize


FORWARD_HVP = "forward-over-reverse HVP (vmap(jvp(grad)))"
REVERSE_HVP = "reverse-over-reverse HVP (vmap(vjp(grad)))"
LOOP_HVP = "a loop of double-backward HVPs"
FORWARD_GGN = "GGN products by forward-mode JVPs (vmap(jvp))"
REVERSE_GGN = "GGN products by JVPs through two reverse passes (vmap(vjp(vjp)))"
LOOP_GGN = "a loop of GGN products by backward passes"


def _route(
    what: str,
    mode: str,
    forward: tuple[str, Callable],
    reverse: tuple[str, Callable],
    loop_name: str,
    loop_products: Callable[..., Callable[[torch.Tensor], torch.Tensor]],
    device: torch.device,
    signature: Any = None,
) -> FallbackChain | FastestRoute:
    """The block product of ``mode``, called as ``route(*problem, V)``.

    ``loop_products(*problem)`` builds the loop's graph and returns ``V -> product``.
    ``"auto"`` races the chain forward, reverse, loop against the loop on one block
    (:class:`FastestRoute`; ``signature`` shares the choice between operators over one
    problem); the other modes are their chain (:func:`_ordered`).
    """
    chain = FallbackChain(
        _ordered(mode, forward, reverse, (loop_name, _looped(loop_products))), what
    )
    if mode != "auto":
        return chain
    return FastestRoute(
        chain,
        loop_name,
        loop_products,
        _join_columns,
        _synchronizer(device),
        route_clock(device),
        None if signature is None else ((what, signature[0]), signature[1]),
    )


def _ordered(mode: str, forward: Any, reverse: Any, loop: Any) -> list[Any]:
    """The fallback order of ``mode``: ``"forward"`` alone; ``"reverse"`` then the loop
    (for functions vmap cannot batch); ``"auto"`` all three; ``"loop"`` alone."""
    orders = {
        "auto": [forward, reverse, loop],
        "forward": [forward],
        "reverse": [reverse, loop],
        "loop": [loop],
    }
    return orders[mode]


def _looped(
    loop_products: Callable[..., Callable[[torch.Tensor], torch.Tensor]],
) -> Callable[..., torch.Tensor]:
    """``(*problem, V) -> loop_products(*problem)(V)``: a loop route as a block product."""
    return lambda *args: loop_products(*args[:-1])(args[-1])


def _hvp_route(
    mode: str,
    differentiable: bool,
    device: torch.device,
    compile: bool = False,
    signature: Any = None,
) -> FallbackChain | FastestRoute:
    """The HVP of ``mode``, called as ``route(fn, theta, V)``."""
    forward = (FORWARD_HVP, _forward_mode(hvp_forward_over_reverse))
    reverse = (REVERSE_HVP, hvp_reverse_over_reverse)
    products = functools.partial(double_backward_products, differentiable=differentiable)
    if not compile:
        key = None if signature is None else ((differentiable, signature[0]), signature[1])
        return _route("hessian", mode, forward, reverse, LOOP_HVP, products, device, key)
    if mode == "loop":
        raise ValueError("compile=True compiles a vectorized HVP; mode='loop' has none")
    # Compiled once per kernel and reused: dynamo guards on the code and the tensor
    # metadata of what the objective captures, not on the closure object itself. The
    # compiled product is what the user asked for, so it is not raced against the loop.
    chain = _ordered(mode, forward, reverse, (LOOP_HVP, _looped(products)))
    if mode == "reverse":
        compiled = torch.compile(hvp_reverse_over_reverse)
    else:
        # the lock around the compiled call, outside what dynamo traces
        compiled = _forward_mode(torch.compile(hvp_forward_over_reverse))
    return FallbackChain([(f"torch.compile'd {chain[0][0]}", compiled), *chain], "hessian")


def _ggn_route(
    mode: str, differentiable: bool, device: torch.device, signature: Any = None
) -> FallbackChain | FastestRoute:
    """The GGN product of ``mode``, called as ``route(output_fn, loss_of_outputs, theta, V)``."""
    forward = (FORWARD_GGN, functools.partial(ggn_vectorized, jvp_block=_jvp_block))
    reverse = (REVERSE_GGN, functools.partial(ggn_vectorized, jvp_block=_jvp_block_by_double_vjp))
    products = functools.partial(gauss_newton_products, differentiable=differentiable)
    key = None if signature is None else ((differentiable, signature[0]), signature[1])
    return _route("ggn", mode, forward, reverse, LOOP_GGN, products, device, key)


def ggn_vectorized(
    output_fn: Callable,
    loss_of_outputs: Callable,
    theta: torch.Tensor,
    V: torch.Tensor,
    jvp_block: Callable[[Callable, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """J^T H_loss J V in three vmapped passes: J V (``jvp_block``), H_loss, J^T."""
    outputs, pullback = _vjp(output_fn, theta)
    JV = jvp_block(output_fn, theta, V)  # (k, *outputs.shape)
    # H_loss u by reverse-over-reverse in output space: cheap there, and it avoids
    # losses whose forward-over-reverse torch lacks (mse_loss raises on ZeroTensors)
    _, loss_pullback = _vjp(grad(loss_of_outputs), outputs)
    HJV = vmap(lambda u: loss_pullback(u)[0])(JV)
    return vmap(lambda w: pullback(w)[0], in_dims=0, out_dims=1)(HJV)


@_forward_mode
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
        return _as_scalar(f(layout.unflatten(theta)))

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
        self.buffers = dict(model.named_buffers())
        if model.training and any(
            isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0
            for module in model.modules()
        ):
            warnings.warn(
                "the module is in training mode with dropout: every product draws new "
                "dropout masks, so the operator changes from product to product (and is "
                "not symmetric); call model.eval() first for the curvature of the "
                "deterministic network",
                UserWarning,
                stacklevel=5,
            )

    def apply(self, params: dict[str, torch.Tensor], inputs: Any) -> torch.Tensor:
        """The module's outputs for ``inputs`` with ``params``, one thread at a time. The
        buffers go in as copies: a module in training mode updates its own in place at
        every forward pass (BatchNorm's running statistics), and a product must leave the
        model as it was."""
        arguments = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        buffers = {name: buffer.clone() for name, buffer in self.buffers.items()}
        with _MODULE_CALL_LOCK:
            return functional_call(self.model, {**self.fixed, **buffers, **params}, arguments)


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
        shard: bool = False,
    ) -> None:
        """``shard``: ``data`` is one rank's shard of a data-parallel problem, which may
        hold no batches or no samples (the ranks' union is checked for samples)."""
        #: The ranks sharing the data (set by :func:`network_problem`), or None.
        self.parallel: _DataParallel | None = None
        self.model = model  # (named by signature)
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
        # (the parameters' graph kept: a differentiable Hessian or GGN backpropagates to
        # them, the Hessian's own variables; they detach it otherwise)
        self.theta = self.layout.flatten(structure)
        self.loss_fn = loss_fn
        self.batches, _ = split_data(data, lambda a: isinstance(a, torch.Tensor))
        sizes = []
        for index, batch in enumerate(self.batches):
            inputs, targets = check_batch(batch, index)
            sizes.append(_batch_size(inputs, targets))
        self.reduction = loss_reduction(loss_fn, reduction)
        if not shard:
            batch_weights(sizes, self.reduction)  # validates: some batches, some samples
        #: Samples in the weights n_b / N of a mean-reduced loss: over all ranks' shards
        #: for a data-parallel problem (set by :func:`network_problem`).
        self.num_samples = sum(sizes)

    def signature(self) -> Any:
        """What a product's cost depends on, for :class:`FastestRoute` to share its choice
        between operators over this problem: ``(key, objects)``, the parameters' layout and
        every batch's shapes, dtypes and devices, and the model and the loss (compared by
        identity); None for data walked anew at every product (a data loader) or split
        over ranks."""
        if not isinstance(self.batches, list) or self.parallel is not None:
            return None
        batches = []
        for index, batch in enumerate(self.batches):
            inputs, targets = check_batch(batch, index)
            tensors = [*(inputs if isinstance(inputs, (tuple, list)) else (inputs,)), targets]
            batches.append(tuple((tuple(t.shape), t.dtype, str(t.device)) for t in tensors))
        return (self.layout.facts(), tuple(batches)), (self.model, self.loss_fn)

    def batch_terms(self) -> Iterable[tuple[float, Any, Any]]:
        """``(weight, inputs, targets)`` per batch, in one pass over the data.

        Weights come from each batch's own size, so a shuffling data loader, walked
        again for every product, still weighs every batch right. Batches without samples
        are skipped (they add nothing to the loss; a mean over none is NaN).
        """
        for index, batch in enumerate(self.batches):
            inputs, targets = check_batch(batch, index)
            size = _batch_size(inputs, targets)
            if size == 0:
                continue
            yield (1.0 if self.reduction == "sum" else size / self.num_samples), inputs, targets

    def output_fn(self, inputs: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda theta: self.apply(self.layout.unflatten(theta), inputs)

    def loss_of_outputs(self, targets: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda outputs: self.loss_fn(outputs, targets)

    def loss_term(self, inputs: Any, targets: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda theta: _as_scalar(
            self.loss_fn(self.apply(self.layout.unflatten(theta), inputs), targets)
        )


# ------------------------------------------------------------------ data parallel

#: Weighted sums in a probe fingerprint, each over its own fixed weights.
_FINGERPRINT_SUMS = 4
#: Entries of a probe fingerprint: width, dtype, the estimate's plan (exact), then the
#: Frobenius norm and the weighted sums (within rounding).
_FINGERPRINT_EXACT = 3
_FINGERPRINT_SIZE = _FINGERPRINT_EXACT + 1 + _FINGERPRINT_SUMS
#: Ranks' fingerprints within this many units in the last place (of float32, or of
#: float64 for a float64 block) of the norm agree: blocks that differ in rounding only,
#: as blocks computed from the same products by other BLAS kernels may, are the same.
_FINGERPRINT_ULPS = 64


def _fixed_weights(length: int, device: torch.device) -> torch.Tensor:
    """(length, 4) weights in [-1/2, 1/2), the same on every machine: Mueller's 32-bit
    integer hash of 4 i + t for entry (i, t), in int64 arithmetic (a random generator's
    draws can depend on the device; neighbouring entries' hashes are unrelated)."""
    mask = 2**32 - 1
    index = torch.arange(length, dtype=torch.int64, device=device)[:, None]
    hashed = (_FINGERPRINT_SUMS * index + torch.arange(_FINGERPRINT_SUMS, device=device)) & mask
    for _ in range(2):
        hashed = (((hashed >> 16) ^ hashed) * 0x45D9F3B) & mask  # products below 2^59
    hashed = (hashed >> 16) ^ hashed
    return hashed.to(torch.float64) / 2**32 - 0.5


def _probe_fingerprint(probes: torch.Tensor) -> torch.Tensor:
    """What the ranks compare to tell that they multiply the same (n, k) probe block V:
    float64 ``[k, a code of the dtype, a code of the running estimate's plan (method,
    quantity, budget, block size, probe kind, tolerances: :func:`~linop_trace._plan.
    plan_code`), ||V||_F, s_1, ..., s_4]``, with the weighted sums s_t = sum_ij c_ti V_ij
    d_tj over fixed weights (:func:`_fixed_weights`).

    For blocks drawn from two seeds, s_t differs by about ||V||_F / 8 (the weights have
    standard deviation 1 / sqrt(12)); rounding moves it by a few units in the last place
    of ||V||_F. A spread beyond :data:`_FINGERPRINT_ULPS` of them is a different block,
    which a float32 block escapes with a chance of about 5e-5 per weighted sum, 1e-17 for
    all four. Costs a float64 copy of the block and its product with a (k, 4) matrix.
    """
    rows, columns = (int(size) for size in probes.shape)
    values = torch.view_as_real(probes) if probes.is_complex() else probes
    values = values.reshape(rows, -1).to(torch.float64)
    row_weights = _fixed_weights(rows, values.device)
    column_weights = _fixed_weights(values.shape[1], values.device)
    weighted = (row_weights * (values @ column_weights)).sum(dim=0)
    code = zlib.crc32(str(probes.dtype).encode())  # Python's hash of a str varies by process
    # filled on the device: a tensor copied from the host would wait for the device
    header = torch.full((3,), float(columns), dtype=torch.float64, device=values.device)
    header[1] = code
    header[2] = plan_code()
    norm = torch.linalg.vector_norm(values).reshape(1)
    return torch.cat([header, norm, weighted])


def _fingerprints_differ(
    highest: torch.Tensor, lowest: torch.Tensor, dtype: torch.dtype | None
) -> torch.Tensor:
    """Whether the ranks multiply different blocks, from the largest and the smallest of
    their fingerprints (a 0-d bool tensor, left on the device); ``dtype``: the blocks'
    (None: no blocks, zeros for fingerprints). The width, dtype and plan must be equal,
    the norm and the weighted sums within :data:`_FINGERPRINT_ULPS` of the norm."""
    spread = highest - lowest
    ulps = 0.0
    if dtype is not None:
        ulps = _FINGERPRINT_ULPS * min(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)
    exact, norm = _FINGERPRINT_EXACT, highest[_FINGERPRINT_EXACT]
    return (spread[:exact] != 0).any() | (spread[exact:] > ulps * norm).any()


class _DataParallel:
    """The ranks of a ``torch.distributed`` process group, each holding a shard of the data.

    :meth:`sum` adds up one block per rank in two collectives. The first is small: a MAX
    ``all_reduce`` of a failure flag per rank and of the fingerprint of the rank's probe
    block (:func:`_probe_fingerprint`) and its negation, which gives every rank the same
    largest and smallest fingerprint, read once on the host. A rank whose own part raised
    still joins it (its flag set), so the others raise an error that names it instead of
    waiting for it forever in the next collective; ranks that multiply different probe
    blocks (other seeds, other budgets) all raise on that block instead of summing
    products of different probes or waiting in a sum of another size. The second sums the
    parts; nothing reads it on the host.

    The fingerprint also holds a code of the running estimate's plan
    (:mod:`linop_trace._plan`): ranks that run other methods or budgets fail on their first
    block, even where that block's probes agree. Left to the process group's ``timeout``:
    a rank that dies or stops outside these products.
    """

    def __init__(self, group: Any) -> None:
        import torch.distributed as dist

        if not dist.is_available():
            raise RuntimeError("process_group needs torch.distributed, which this torch lacks")
        if not dist.is_initialized():
            raise RuntimeError(
                "process_group needs an initialized default process group: call "
                "torch.distributed.init_process_group first (torchrun sets up its environment)"
            )
        self.dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if self.rank < 0:
            raise ValueError("this process is not a member of `process_group`")

    def device(self, like: torch.device | None = None) -> torch.device:
        """Where the collectives' tensors live: NCCL needs a GPU, gloo takes the CPU."""
        if self.dist.get_backend(self.group) == "nccl":
            if like is not None and like.type == "cuda":
                return like
            return torch.device("cuda", torch.cuda.current_device())
        return like if like is not None else torch.device("cpu")

    def sum(
        self,
        local: Callable[[], torch.Tensor],
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        what: str,
        probes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The sum over the ranks of ``local()`` (each of ``shape`` and ``dtype``).

        If ``local()`` raises on some ranks, every rank raises: those ranks their own
        error, the others a RuntimeError naming the failed ranks and their errors. If
        ``probes`` (the block that ``local()`` multiplies) is given and differs between
        the ranks, every rank raises a ValueError saying what differs.
        """
        error: Exception | None = None
        fingerprint = torch.zeros(_FINGERPRINT_SIZE, dtype=torch.float64, device=device)
        try:
            if probes is not None:
                fingerprint = _probe_fingerprint(probes).to(device)
            part = local().to(dtype).reshape(-1).contiguous()  # summed in place
        except Exception as raised:  # joins the collectives first; raised again below
            error = raised
            part = torch.zeros(math.prod(shape), dtype=dtype, device=device)
        flags = torch.zeros(self.world_size, dtype=torch.float64, device=device)
        if error is not None:
            flags[self.rank] = 1
        # MAX of (fingerprint, -fingerprint): every rank learns its largest and smallest
        status = torch.cat([fingerprint, -fingerprint, flags])
        self.dist.all_reduce(status, op=self.dist.ReduceOp.MAX, group=self.group)
        size = _FINGERPRINT_SIZE
        highest, lowest, failed = status[:size], -status[size : 2 * size], status[2 * size :]
        # every rank decides alike from the same status: all raise, or all go on to the sum
        differs = _fingerprints_differ(highest, lowest, None if probes is None else probes.dtype)
        if bool(failed.any() | differs):  # the one read on the host per block
            if bool(failed.any()):
                self._raise(failed, error, what)
            assert probes is not None
            self._raise_disagreement(probes, highest, lowest, what)
        self.dist.all_reduce(part, op=self.dist.ReduceOp.SUM, group=self.group)
        return part.reshape(shape)

    def _raise_disagreement(
        self, probes: torch.Tensor, highest: torch.Tensor, lowest: torch.Tensor, what: str
    ) -> None:
        columns = int(probes.shape[1])
        if highest[2] != lowest[2]:
            raise ValueError(
                f"{what}: the ranks of the process group run different estimates (another "
                "method, quantity, num_matvecs, block_size, probe kind or tolerance): every "
                "rank must make the same call with the same seed"
            )
        if highest[1] != lowest[1]:
            raise ValueError(
                f"{what}: the ranks of the process group multiply probe blocks of different "
                f"dtypes (this rank {backend.dtype_name(probes.dtype)}): every rank needs the "
                "same model"
            )
        if highest[0] != lowest[0]:
            problem = (
                f"probe blocks of different widths, from {int(lowest[0])} to "
                f"{int(highest[0])} columns (this rank {columns})"
            )
        else:
            problem = f"probe blocks of {columns} columns that hold different values"
        raise ValueError(
            f"{what}: the ranks of the process group multiply {problem}: every rank must "
            "draw the same probes (were the ranks given the same seed and num_matvecs?)"
        )

    def _raise(self, failed: torch.Tensor, error: Exception | None, what: str) -> None:
        # every rank saw the flags, so every rank takes part in this second collective
        messages: list[Any] = [None] * self.world_size
        own = None if error is None else f"{type(error).__name__}: {error}"
        self.dist.all_gather_object(messages, own, group=self.group)
        if error is not None:
            raise error
        ranks = [self._global_rank(r) for r in range(self.world_size) if failed[r] != 0]
        details = "; ".join(
            f"rank {self._global_rank(r)}: {messages[r]}"
            for r in range(self.world_size)
            if failed[r] != 0
        )
        raise RuntimeError(
            f"{what}: rank{'s' if len(ranks) > 1 else ''} "
            f"{', '.join(map(str, ranks))} of the process group failed on its shard of the "
            f"data ({details}); rank {self._global_rank(self.rank)} stops too"
        )

    def _global_rank(self, group_rank: int) -> int:
        try:
            return int(self.dist.get_global_rank(self.group, group_rank))
        except (AttributeError, RuntimeError, ValueError):  # the default group, old torch
            return group_rank


def _data_parallel_problem(
    parallel: _DataParallel, build: Callable[[], _NetworkProblem], what: str
) -> _NetworkProblem:
    """``build()`` on every rank, with the sample count N summed over the ranks.

    One ``all_reduce`` of (local samples, parameters p, p^2): every rank checks that the
    ranks hold the same number of parameters (sum p = R p and sum p^2 = R p^2 on every
    rank only if all p agree, by Cauchy-Schwarz), so a mismatch is an error on all ranks
    rather than a hang in the first product.
    """
    built: list[_NetworkProblem] = []

    def local() -> torch.Tensor:
        problem = build()
        built.append(problem)
        size = problem.layout.size
        return torch.tensor([problem.num_samples, size, size * size], dtype=torch.int64)

    device = parallel.device()
    totals = parallel.sum(lambda: local().to(device), (3,), torch.int64, device, what)
    problem = built[0]
    size, ranks = problem.layout.size, parallel.world_size
    if int(totals[1]) != ranks * size or int(totals[2]) != ranks * size * size:
        raise ValueError(
            f"{what}: the ranks of the process group hold different numbers of parameters "
            f"(this rank {size}, {int(totals[1])} over {ranks} ranks); every rank needs the "
            f"same model"
        )
    problem.num_samples = int(totals[0])
    if problem.num_samples == 0:
        raise ValueError(f"{what}: the ranks' shards of `data` hold no samples")
    problem.parallel = parallel
    return problem


# ----------------------------------------------------------------------- operators


def _zero_products(operator: Any, X: torch.Tensor) -> torch.Tensor:
    """Zeros of the operator's rows by the block's width, in the block's dtype and device.

    For a block of no columns (vmap over zero columns raised an IndexError that the route
    chain took for the function's fault: a warning, and the slower route kept for good),
    and for the local products of a data-parallel rank whose shard holds no samples (the
    sum over the ranks adds them to the others' products)."""
    return X.new_zeros((operator.shape[0], X.shape[1]))


class _TorchOperator(AutodiffOperator):
    def _setup(self, layout: _Layout, rows: int, tags: tuple[str, ...]) -> None:
        import array_api_compat.torch as xp

        super().__init__((rows, layout.size), layout.dtype, xp, layout.device, tags)
        self.layout = layout

    def _in_own_dtype(self, X: torch.Tensor) -> torch.Tensor:
        return X if X.dtype == self.dtype else X.to(self.dtype)

    @property
    def shared_free_memory(self) -> int | None:
        """Data parallel: the least free memory of the ranks' devices when the operator
        was built, by which every rank sizes its probe blocks
        (:func:`~linop_trace._blocks.probe_block_size`) so that all make the same
        products; else None."""
        return getattr(self, "_shared_free_memory", None)

    def _share_free_memory(self, parallel: _DataParallel | None) -> None:
        if parallel is None:
            return
        import array_api_compat.torch as xp

        free = backend.free_memory(xp, self.device)
        device = parallel.device(self.device)
        least = torch.tensor([-1 if free is None else free], dtype=torch.int64, device=device)
        # a rank that cannot tell (-1) gives the fallback; MIN over ranks: one collective
        parallel.dist.all_reduce(least, op=parallel.dist.ReduceOp.MIN, group=parallel.group)
        self._shared_free_memory = None if int(least) < 0 else int(least)


def _check_differentiable(parallel: _DataParallel | None, differentiable: bool) -> None:
    if parallel is not None and differentiable:
        raise ValueError(
            "differentiable=True is not supported with a process_group: the products' "
            "all_reduce is not part of the autograd graph"
        )


def _summed_over_ranks(
    parallel: _DataParallel | None,
    local_products: Callable[[torch.Tensor], torch.Tensor],
    V: torch.Tensor,
    what: str,
) -> torch.Tensor:
    """``local_products(V)``, summed over the ranks of a data-parallel problem."""
    if parallel is None:
        return local_products(V)
    shape = (V.shape[0], V.shape[1])
    return parallel.sum(lambda: local_products(V), shape, V.dtype, V.device, what, probes=V)


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
        check_mode(mode, CURVATURE_MODES)
        self.differentiable = bool(differentiable)
        if network is None:
            assert f is not None
            layout, fn, theta = _function_objective(f, x)
            with torch.no_grad():
                _check_scalar(fn(theta.detach()), "the function")
            self._terms: Callable[[], Iterable[tuple[float, Callable]]] = lambda: [(1.0, fn)]
            signature: Any = (("function", layout.facts()), (f,))
        else:
            layout, theta = network.layout, network.theta
            self._terms = lambda: (
                (weight, network.loss_term(inputs, targets))
                for weight, inputs, targets in network.batch_terms()
            )
            signature = network.signature()
        self._parallel = None if network is None else network.parallel
        _check_differentiable(self._parallel, self.differentiable)
        self.theta = theta if self.differentiable else theta.detach()
        self._hvp = _hvp_route(mode, self.differentiable, layout.device, compile, signature)
        self._setup(layout, layout.size, ("symmetric",))
        self._share_free_memory(self._parallel)

    @property
    def mode(self) -> str:
        """The HVP in use: under ``"auto"`` forward-over-reverse until a fallback was
        needed or the loop was timed faster (see :attr:`route_timing`)."""
        return self._hvp.mode

    @property
    def route_timing(self) -> RouteTiming | None:
        """What ``mode="auto"`` measured when it chose its route (None before, or if untimed)."""
        return getattr(self._hvp, "timing", None)

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        if not X.shape[1]:
            return _zero_products(self, X)
        V = self._in_own_dtype(X)
        return _summed_over_ranks(self._parallel, self._local_products, V, "hessian").to(X.dtype)

    def _local_products(self, V: torch.Tensor) -> torch.Tensor:
        out = None
        with _no_grad_unless(self.differentiable):
            for weight, fn in self._terms():
                product = self._hvp(fn, self.theta, V)
                product = product if weight == 1.0 else weight * product
                out = product if out is None else out + product
        return _zero_products(self, V) if out is None else out

    def _rmatmat(self, X: torch.Tensor) -> torch.Tensor:
        return self._matmat(X)  # a real Hessian is symmetric


class TorchGGN(_TorchOperator):
    """Generalized Gauss-Newton matrix J^T H_loss J of a network's loss over data."""

    def __init__(
        self, network: _NetworkProblem, *, differentiable: bool = False, mode: str = "auto"
    ) -> None:
        check_mode(mode, CURVATURE_MODES)
        self.network = network
        self.differentiable = bool(differentiable)
        _check_differentiable(network.parallel, self.differentiable)
        self.theta = network.theta if self.differentiable else network.theta.detach()
        self._product = _ggn_route(
            mode, self.differentiable, network.layout.device, network.signature()
        )
        self._setup(network.layout, network.layout.size, ("symmetric", "positive_semidefinite"))
        self._share_free_memory(network.parallel)

    @property
    def mode(self) -> str:
        """The product in use: under ``"auto"`` forward-mode JVPs until a fallback was
        needed or the loop was timed faster (see :attr:`route_timing`)."""
        return self._product.mode

    @property
    def route_timing(self) -> RouteTiming | None:
        """What ``mode="auto"`` measured when it chose its route (None before, or if untimed)."""
        return getattr(self._product, "timing", None)

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        if not X.shape[1]:
            return _zero_products(self, X)
        V = self._in_own_dtype(X)
        parallel = self.network.parallel
        return _summed_over_ranks(parallel, self._local_products, V, "ggn").to(X.dtype)

    def _local_products(self, V: torch.Tensor) -> torch.Tensor:
        out = None
        with _no_grad_unless(self.differentiable):
            for weight, inputs, targets in self.network.batch_terms():
                product = self._product(
                    self.network.output_fn(inputs),
                    self.network.loss_of_outputs(targets),
                    self.theta,
                    V,
                )
                product = product if weight == 1.0 else weight * product
                out = product if out is None else out + product
        return _zero_products(self, V) if out is None else out

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
        if not X.shape[1]:
            return _zero_products(self, X)
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
        with _FORWARD_AD_LOCK, _no_grad_unless(differentiable):
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
    model: Any,
    params: Any,
    loss_fn: Callable,
    data: Any,
    reduction: str | None,
    process_group: Any = None,
    what: str = "hessian",
) -> _NetworkProblem:
    """The loss of ``model`` over ``data``; with a ``process_group``, over the union of
    the ranks' shards of the data (one collective here, on every rank)."""
    if process_group is None:
        return _NetworkProblem(model, params, loss_fn, data, reduction)
    parallel = _DataParallel(process_group)
    return _data_parallel_problem(
        parallel,
        lambda: _NetworkProblem(model, params, loss_fn, data, reduction, shard=True),
        what,
    )
