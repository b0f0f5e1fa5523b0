"""Hessian, Gauss-Newton and Jacobian operators of JAX functions.

Each block product is one compiled program, ``jit(vmap(...))`` over the columns of the
block, of a Jacobian-vector product or a forward-over-reverse Hessian-vector product
``jvp(grad(f))``. The compiled programs are cached per user function (and mode), with
the variables and data passed as arguments, so neither repeated products nor new
operators built from the same function at new points recompile. A function of ``x``
(``hessian(f, x)``, ``jacobian``, ``divergence``) is traced once when its operator is
built: the arrays it reads from outside its arguments are taken then and passed as
arguments too (:class:`_Pure`), so an operator built after they changed has the new ones.

Hessians and Gauss-Newton matrices also take ``mode="loop"``: the same column function
under ``lax.map`` instead of ``vmap``, a loop inside the compiled program. ``"auto"`` does
not time the two, as the torch operators do: a product must stay traceable under the
user's ``jit``/``grad``/``vmap`` and free of host synchronisation (where a timing needs
concrete values and ``block_until_ready``), and timing both would compile a second
program per block width, which costs as much as the products themselves.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from .. import _backend as backend
from ._common import (
    CURVATURE_MODES,
    AutodiffOperator,
    FallbackChain,
    batch_weights,
    check_batch,
    check_mode,
    loss_reduction,
    split_data,
)

__all__ = ["JaxGGN", "JaxHessian", "JaxJacobian", "jax_divergence_jvp"]


# ------------------------------------------------------------------- program cache

_UNCACHED: dict[Any, Callable] = {}


def _program(builder: Callable[..., Callable], *key: Any) -> Callable:
    """``jax.jit(builder(*key))``, built once per key (per user function and mode)."""
    try:
        return _cached_program(builder, *key)
    except TypeError:  # an unhashable user function: compile per operator
        return jax.jit(builder(*key))


@functools.lru_cache(maxsize=256)
def _cached_program(builder: Callable[..., Callable], *key: Any) -> Callable:
    return jax.jit(builder(*key))


class _Pure:
    """A user function ``f`` as a pure function ``(consts, *args) -> f(*args)`` of its
    arguments and of the arrays it reads from outside them (globals, closures, attributes
    of a bound method's object): ``consts``, hoisted by tracing ``f`` once at ``example``.

    A compiled program traced from ``f`` itself embeds those arrays as constants, and
    the programs are shared by every operator built from ``f``: an operator built after
    they changed gave the old matrix for the block widths already compiled and the new
    one for the others. The consts are now the operators' data (arguments of the
    programs), taken when the operator is built. Two of these compare equal when they come
    from the same ``f`` and trace to the same program text (Python numbers ``f`` reads
    are literals in it, so a changed one makes a new program)."""

    def __init__(self, f: Callable, *example: Any) -> None:
        # (through a fresh function: JAX caches a trace per function object, and a bound
        # method compares equal to the next one of the same object, old consts and all)
        closed, output = jax.make_jaxpr(lambda *args: f(*args), return_shape=True)(*example)
        self.jaxpr = closed.jaxpr
        self.consts = list(closed.consts)
        self.output = output  # (its shapes and dtypes)
        self.output_tree = jax.tree_util.tree_structure(output)
        self.function = f
        self._text = str(closed.jaxpr)
        self._hash = hash((self._text, self.output_tree))

    def __call__(self, consts: Any, *args: Any) -> Any:
        from jax.extend.core import ClosedJaxpr, jaxpr_as_fun

        outputs = jaxpr_as_fun(ClosedJaxpr(self.jaxpr, consts))(*jax.tree_util.tree_leaves(args))
        return jax.tree_util.tree_unflatten(self.output_tree, outputs)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _Pure)
            and self._hash == other._hash
            and (self.function is other.function or self.function == other.function)
            and self._text == other._text
            and self.output_tree == other.output_tree  # type: ignore[operator]
        )

    def __hash__(self) -> int:
        return self._hash


# ---------------------------------------------------------------------- HVP kernels


def _over_columns(column: Callable[[Any], Any], V: Any, loop: bool) -> Any:
    """``[column(v) for the columns v of V]`` as a block: ``vmap``, or ``lax.map`` (a loop
    in the compiled program, one column at a time)."""
    if loop:
        return jax.lax.map(column, V.T).T
    return jax.vmap(column, in_axes=1, out_axes=1)(V)


def _hvp_block(fn: Callable, theta: Any, V: Any, mode: str, loop: bool) -> Any:
    """H V for an (n, k) block: over the columns, jvp(grad(fn)) or the pullback of grad(fn)."""
    if mode == "forward":

        def column(v: Any) -> Any:
            return jax.jvp(jax.grad(fn), (theta,), (v,))[1]

    else:
        _, pullback = jax.vjp(jax.grad(fn), theta)

        def column(v: Any) -> Any:
            return pullback(v)[0]

    return _over_columns(column, V, loop)


def _function_hvp_builder(f: _Pure, mode: str, loop: bool) -> Callable:
    def program(consts: Any, x: Any, V: Any) -> Any:
        theta, unravel = ravel_pytree(x)
        return _hvp_block(lambda t: jnp.reshape(f(consts, unravel(t)), ()), theta, V, mode, loop)

    return program


def _network_hvp_builder(apply_fn: Callable, loss_fn: Callable, mode: str, loop: bool) -> Callable:
    def program(params: Any, inputs: Any, targets: Any, V: Any, weight: Any) -> Any:
        theta, unravel = ravel_pytree(params)

        def loss(t: Any) -> Any:
            return loss_fn(apply_fn(unravel(t), inputs), targets)

        return weight * _hvp_block(loss, theta, V, mode, loop)

    return program


def _linear_jvp(fn: Callable, theta: Any, mode: str) -> tuple[Any, Callable, Callable]:
    """``(outputs, v -> J v, w -> J^T w)`` at ``theta``.

    Forward mode linearizes; reverse mode gets J v as the pullback of the linear map
    w -> J^T w (for functions without forward-mode rules, e.g. ``jax.custom_vjp``).
    """
    if mode == "forward":
        outputs, push = jax.linearize(fn, theta)
        transpose = jax.linear_transpose(push, theta)
        return outputs, push, lambda w: transpose(w)[0]
    outputs, pullback = jax.vjp(fn, theta)
    transpose = jax.linear_transpose(lambda w: pullback(w)[0], outputs)
    return outputs, lambda v: transpose(v)[0], lambda w: pullback(w)[0]


def _network_ggn_builder(apply_fn: Callable, loss_fn: Callable, mode: str, loop: bool) -> Callable:
    def program(params: Any, inputs: Any, targets: Any, V: Any, weight: Any) -> Any:
        theta, unravel = ravel_pytree(params)
        outputs, push, pull = _linear_jvp(lambda t: apply_fn(unravel(t), inputs), theta, mode)
        loss_gradient = jax.grad(lambda out: loss_fn(out, targets))
        if loop:

            def column(v: Any) -> Any:
                return pull(jax.jvp(loss_gradient, (outputs,), (push(v),))[1])

            return weight * _over_columns(column, V, loop=True)
        JV = jax.vmap(push, in_axes=1)(V)
        HJV = jax.vmap(lambda u: jax.jvp(loss_gradient, (outputs,), (u,))[1])(JV)
        return weight * jax.vmap(pull, out_axes=1)(HJV)

    return program


def _jacobian_builder(f: _Pure, mode: str, adjoint: bool) -> Callable:
    def program(consts: Any, x: Any, V: Any) -> Any:
        theta, unravel = ravel_pytree(x)

        def fn(t: Any) -> Any:
            return ravel_pytree(f(consts, unravel(t)))[0]

        _, push, pull = _linear_jvp(fn, theta, mode)
        return jax.vmap(pull if adjoint else push, in_axes=1, out_axes=1)(V)

    return program


def _divergence_builder(f: _Pure, mode: str) -> Callable:
    def program(consts: Any, x: Any, Z: Any) -> Any:
        _, push, _ = _linear_jvp(lambda y: f(consts, y), x, mode)
        return jax.vmap(push)(Z)

    return program


_FORWARD = "forward-over-reverse HVP (jit(vmap(jvp(grad))))"
_REVERSE = "reverse-over-reverse HVP (jit(vmap(vjp(grad))))"
_LOOP_FORWARD = "a loop of forward-over-reverse HVPs (jit(lax.map(jvp(grad))))"
_LOOP_REVERSE = "a loop of reverse-over-reverse HVPs (jit(lax.map(vjp(grad))))"
_JVP_FORWARD = "forward-mode JVP (jit(vmap(jvp)))"
_JVP_REVERSE = "a JVP through two reverse passes"
_GGN_LOOP_FORWARD = "a loop of GGN products by forward-mode JVPs (jit(lax.map(jvp)))"
_GGN_LOOP_REVERSE = "a loop of GGN products by JVPs through two reverse passes"


def _chain(
    make: Callable[[str], Callable], mode: str, names: tuple[str, str], what: str
) -> FallbackChain:
    forward = (names[0], make("forward"))
    reverse = (names[1], make("reverse"))
    order = {"auto": [forward, reverse], "forward": [forward], "reverse": [reverse]}
    return FallbackChain(order[mode], what)


def _curvature_chain(
    make: Callable[[str, bool], Callable],
    mode: str,
    names: tuple[str, str],
    loop_names: tuple[str, str],
    what: str,
) -> FallbackChain:
    """As :func:`_chain`, and ``"loop"``: ``lax.map`` over the columns, forward mode
    falling back to reverse mode."""
    if mode == "loop":
        forward = (loop_names[0], make("forward", True))
        reverse = (loop_names[1], make("reverse", True))
        return FallbackChain([forward, reverse], what)
    return _chain(lambda m: make(m, False), mode, names, what)


# ------------------------------------------------------------------------- layout


class _Layout:
    """Flattening of a pytree of JAX arrays into one vector (``ravel_pytree``)."""

    def __init__(self, structure: Any, what: str) -> None:
        leaves, self.treedef = jax.tree_util.tree_flatten(structure)
        if not leaves:
            raise ValueError(f"{what} holds no arrays")
        for leaf in leaves:
            if not isinstance(leaf, jax.Array):
                raise TypeError(
                    f"{what} must hold JAX arrays only, found {type(leaf).__module__}."
                    f"{type(leaf).__name__}"
                )
        dtypes = {leaf.dtype for leaf in leaves}
        if len(dtypes) > 1:
            names = sorted(backend.dtype_name(d) for d in dtypes)
            raise TypeError(f"{what} mixes dtypes {' and '.join(names)}; cast them to one dtype")
        dtype = leaves[0].dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{what} must be real floating arrays to differentiate, got {backend.dtype_name(dtype)}"
            )
        self.shapes = [tuple(leaf.shape) for leaf in leaves]
        self.theta, self._unravel = ravel_pytree(structure)
        self.dtype = dtype
        self.size = int(self.theta.shape[0])
        self.what = what
        try:
            device = backend.device_of(self.theta)
        except Exception:  # tracers (under jax.grad) do not always carry a device
            device = None
        self.device = jax.devices()[0] if device is None else device

    # Layouts of one structure compare equal (``theta`` is data, not structure), so that
    # operators at new points share a compiled estimate.
    def _key(self) -> tuple[Any, ...]:
        return (self.treedef, tuple(self.shapes), self.dtype, self.what, str(self.device))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Layout) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def flatten(self, structure: Any) -> Any:
        leaves, treedef = jax.tree_util.tree_flatten(structure)
        if treedef != self.treedef:  # type: ignore[operator]
            raise ValueError(f"the structure to flatten does not match that of {self.what}")
        for leaf, shape in zip(leaves, self.shapes):
            if tuple(jnp.shape(leaf)) != shape:
                raise ValueError(
                    f"a leaf of shape {tuple(jnp.shape(leaf))} does not match the shape {shape} "
                    f"in {self.what}"
                )
        return ravel_pytree(structure)[0]

    def unflatten(self, vector: Any) -> Any:
        return self._unravel(vector)


def _batch_size(inputs: Any, targets: Any) -> int:
    if jnp.ndim(targets) > 0:
        return int(jnp.shape(targets)[0])
    first = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
    return int(jnp.shape(first)[0])


def _is_array(a: Any) -> bool:
    import numpy as np

    return isinstance(a, (jax.Array, np.ndarray))


class _NetworkProblem:
    """``loss_fn(apply_fn(params, inputs), targets)`` summed over the batches of ``data``."""

    def __init__(
        self, apply_fn: Callable, params: Any, loss_fn: Callable, data: Any, reduction: str | None
    ) -> None:
        if not callable(apply_fn) or not callable(loss_fn):
            raise TypeError("`apply_fn` and `loss_fn` must be callables")
        self.apply_fn = apply_fn
        self.loss_fn = loss_fn
        self.params = params
        self.layout = _Layout(params, "the parameters")
        self.batches, _ = split_data(data, _is_array)
        sizes = []
        for index, batch in enumerate(self.batches):
            inputs, targets = check_batch(batch, index)
            sizes.append(_batch_size(inputs, targets))
        self.reduction = loss_reduction(loss_fn, reduction)
        batch_weights(sizes, self.reduction)  # validates: some batches, some samples
        self.num_samples = sum(sizes)

    @property
    def materialized(self) -> bool:
        """Whether the batches are a list or tuple (then they can be a compiled program's
        arguments; a data loader is iterated on every product instead)."""
        return isinstance(self.batches, (list, tuple))

    def _tree_flatten(self) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        static = (self.apply_fn, self.loss_fn, self.layout, self.reduction, self.num_samples)
        return (self.params, list(self.batches)), static

    @classmethod
    def _tree_unflatten(cls, static: tuple[Any, ...], children: tuple[Any, ...]) -> Any:
        problem = cls.__new__(cls)
        problem.apply_fn, problem.loss_fn, problem.layout, problem.reduction = static[:4]
        problem.num_samples = static[4]
        problem.params, problem.batches = children
        return problem

    def batch_terms(self) -> Any:
        """``(weight, inputs, targets)`` per batch; weights from each batch's own size."""
        for index, batch in enumerate(self.batches):
            inputs, targets = check_batch(batch, index)
            size = _batch_size(inputs, targets)
            yield (1.0 if self.reduction == "sum" else size / self.num_samples), inputs, targets


# ----------------------------------------------------------------------- operators


backend.register_pytree(
    _NetworkProblem, _NetworkProblem._tree_flatten, _NetworkProblem._tree_unflatten
)


class _JaxOperator(AutodiffOperator):
    # the point x (or the network's parameters and data) is the data of the operator:
    # under JAX it is an argument of a compiled estimate, which serves every point
    _data_fields: tuple[str, ...] | None = ("x",)

    def compilable(self) -> bool:
        network = vars(self).get("network")
        return super().compilable() and (network is None or network.materialized)

    def _setup(self, layout: _Layout, rows: int, tags: tuple[str, ...]) -> None:
        xp = backend.array_namespace(layout.theta)
        super().__init__((rows, layout.size), layout.dtype, xp, layout.device, tags)
        self.layout = layout

    def _in_own_dtype(self, X: Any) -> Any:
        return X if X.dtype == self.dtype else X.astype(self.dtype)


def _accumulate(network: _NetworkProblem, chain: FallbackChain, V: Any) -> Any:
    out = None
    for weight, inputs, targets in network.batch_terms():
        product = chain(network.params, inputs, targets, V, jnp.asarray(weight, dtype=V.dtype))
        out = product if out is None else out + product
    return out


class JaxHessian(_JaxOperator):
    """Hessian of a scalar JAX function of a pytree (or of a network's loss over data)."""

    def __init__(
        self,
        f: Callable | None = None,
        x: Any = None,
        *,
        network: _NetworkProblem | None = None,
        mode: str = "auto",
    ) -> None:
        check_mode(mode, CURVATURE_MODES)
        self.network = network
        self.x = x
        self._consts: Any = None
        if network is not None:
            self._data_fields = ("network",)
        if network is None:
            assert f is not None
            layout = _Layout(x, "`x`")
            pure = _Pure(f, x)
            shape = jnp.shape(pure.output)
            if shape not in ((), (1,)):
                raise ValueError(f"the function must return a scalar, got shape {shape}")
            self._consts = pure.consts
            self._data_fields = ("x", "_consts")
            self._hvp = _curvature_chain(
                lambda m, loop: _program(_function_hvp_builder, pure, m, loop),
                mode,
                (_FORWARD, _REVERSE),
                (_LOOP_FORWARD, _LOOP_REVERSE),
                "hessian",
            )
        else:
            layout = network.layout
            self._hvp = _curvature_chain(
                lambda m, loop: _program(
                    _network_hvp_builder, network.apply_fn, network.loss_fn, m, loop
                ),
                mode,
                (_FORWARD, _REVERSE),
                (_LOOP_FORWARD, _LOOP_REVERSE),
                "hessian",
            )
        self._setup(layout, layout.size, ("symmetric",))

    @property
    def mode(self) -> str:
        """The HVP in use: forward-over-reverse until a fallback was needed."""
        return self._hvp.mode

    def _matmat(self, X: Any) -> Any:
        V = self._in_own_dtype(X)
        if self.network is None:
            out = self._hvp(self._consts, self.x, V)
        else:
            out = _accumulate(self.network, self._hvp, V)
        return out.astype(X.dtype)

    def _rmatmat(self, X: Any) -> Any:
        return self._matmat(X)


class JaxGGN(_JaxOperator):
    """Generalized Gauss-Newton matrix J^T H_loss J of a network's loss over data."""

    def __init__(self, network: _NetworkProblem, *, mode: str = "auto") -> None:
        check_mode(mode, CURVATURE_MODES)
        self.network = network
        self._data_fields = ("network",)
        self._product = _curvature_chain(
            lambda m, loop: _program(
                _network_ggn_builder, network.apply_fn, network.loss_fn, m, loop
            ),
            mode,
            (_JVP_FORWARD, _JVP_REVERSE),
            (_GGN_LOOP_FORWARD, _GGN_LOOP_REVERSE),
            "ggn",
        )
        self._setup(network.layout, network.layout.size, ("symmetric", "positive_semidefinite"))

    @property
    def mode(self) -> str:
        """The product in use: forward-mode JVPs until a fallback was needed."""
        return self._product.mode

    def _matmat(self, X: Any) -> Any:
        V = self._in_own_dtype(X)
        return _accumulate(self.network, self._product, V).astype(X.dtype)

    def _rmatmat(self, X: Any) -> Any:
        return self._matmat(X)


class JaxJacobian(_JaxOperator):
    """Jacobian of ``f: x -> y`` (pytrees of JAX arrays): JVPs and VJPs."""

    def __init__(self, f: Callable, x: Any, *, mode: str = "auto") -> None:
        check_mode(mode)
        layout = _Layout(x, "`x`")
        pure = _Pure(f, x)
        output = pure.output
        leaves = jax.tree_util.tree_leaves(output)
        if not leaves:
            raise ValueError("`f` returns no arrays")
        if any(leaf.dtype != layout.dtype for leaf in leaves):
            raise TypeError(
                f"`f` returns {sorted({backend.dtype_name(leaf.dtype) for leaf in leaves})} for "
                f"{backend.dtype_name(layout.dtype)} inputs; the Jacobian needs one dtype"
            )
        rows = sum(math.prod(leaf.shape) for leaf in leaves)
        self.x = x
        self._output_treedef = jax.tree_util.tree_structure(output)
        self._output_shapes = [leaf.shape for leaf in leaves]
        self._consts = pure.consts
        self._data_fields = ("x", "_consts")
        self._forward = _chain(
            lambda m: _program(_jacobian_builder, pure, m, False),
            mode,
            (_JVP_FORWARD, _JVP_REVERSE),
            "jacobian",
        )
        # the adjoint needs reverse mode only
        self._adjoint = _program(_jacobian_builder, pure, "reverse", True)
        self._setup(layout, rows, ())

    def unflatten_output(self, vector: Any) -> Any:
        """The structure of ``f(x)`` filled from a vector of length ``shape[0]``."""
        pieces, start = [], 0
        for shape in self._output_shapes:
            size = math.prod(shape)
            pieces.append(jnp.reshape(vector[start : start + size], shape))
            start += size
        return jax.tree_util.tree_unflatten(self._output_treedef, pieces)

    def _matmat(self, X: Any) -> Any:
        return self._forward(self._consts, self.x, self._in_own_dtype(X)).astype(X.dtype)

    def _rmatmat(self, X: Any) -> Any:
        return self._adjoint(self._consts, self.x, self._in_own_dtype(X)).astype(X.dtype)


# ---------------------------------------------------------------------- divergence


def jax_divergence_jvp(f: Callable, x: Any, mode: str) -> Callable[[Any], Any]:
    """``Z -> (J Z)`` for a (k, B, d) block of tangents of the batched function ``f``."""
    pure = _Pure(f, x)
    program = _program(_divergence_builder, pure, mode)
    consts = pure.consts
    return lambda Z: program(consts, x, Z)


def network_problem(
    apply_fn: Callable, params: Any, loss_fn: Callable, data: Any, reduction: str | None
) -> _NetworkProblem:
    return _NetworkProblem(apply_fn, params, loss_fn, data, reduction)
