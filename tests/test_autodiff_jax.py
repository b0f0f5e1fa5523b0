"""Autodiff operators on JAX: every product against jax.hessian / jax.jacfwd.

float64 throughout (x64 enabled here, as conftest does for the backend fixture);
comparisons with a relative tolerance of 1e-10 on the largest entry (``assert_close``).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import linop_trace as lt  # noqa: E402
from linop_trace.autodiff._examples import digits_mlp_jax_problem  # noqa: E402

RTOL = 1e-10


def assert_close(actual, expected, rtol: float = RTOL) -> None:
    """max |actual - expected| <= rtol * max |expected| (and identical shapes)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    error = float(np.abs(actual - expected).max()) if expected.size else 0.0
    assert error <= rtol * max(scale, 1e-300), f"max error {error:.3e} vs scale {scale:.3e}"


def flat_hessian(f, x):
    theta, unravel = ravel_pytree(x)
    return jax.hessian(lambda t: f(unravel(t)))(theta)


def quartic(x):
    return jnp.sum(x**4) + jnp.sum(jnp.sin(x) * jnp.sum(x))


@pytest.fixture(scope="module")
def digits64():
    apply_fn, params, loss_fn, (X, y) = digits_mlp_jax_problem(256, seed=0, dtype=jnp.float64)
    H = lt.hessian(apply_fn, params, loss_fn, (X, y))
    dense = flat_hessian(lambda p: loss_fn(apply_fn(p, X), y), params)
    return apply_fn, params, loss_fn, X, y, H, dense


# ------------------------------------------------------------------------- hessian


def test_hessian_of_an_array_matches_jax_hessian():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3)))
    H = lt.hessian(quartic, x)
    assert H.shape == (6, 6) and H.dtype == jnp.float64 and H.library == "jax"
    assert "symmetric" in H.tags
    assert_close(H.to_dense(), jax.hessian(quartic)(x).reshape(6, 6))


def test_hessian_of_a_pytree_matches_jax_hessian():
    rng = np.random.default_rng(1)
    x = {"u": jnp.asarray(rng.standard_normal(3)), "w": [jnp.asarray(rng.standard_normal((2, 2)))]}

    def f(v):
        u, w = v["u"], v["w"][0]
        return jnp.sum(u**3) * jnp.sum(w) + jnp.trace(w @ w) * u[0] + jnp.sum(jnp.exp(u))

    H = lt.hessian(f, x)
    assert H.shape == (7, 7)
    assert_close(H.to_dense(), flat_hessian(f, x))
    vector = H.flatten(x)
    assert_close(vector, ravel_pytree(x)[0])
    back = H.unflatten(vector)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(x)
    assert_close(back["w"][0], x["w"][0])


def test_float32_operator_keeps_dtype_and_products_match():
    x = jnp.asarray(np.random.default_rng(2).standard_normal(5), dtype=jnp.float32)
    H = lt.hessian(quartic, x)
    assert H.dtype == jnp.float32
    out = H @ jnp.ones(5, dtype=jnp.float32)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, jax.hessian(quartic)(x) @ jnp.ones(5), rtol=1e-5, atol=1e-5)


def test_row_sums_of_the_note_example_with_one_hvp():
    # f(x1, x2) = x1^2 + 2 x1^2 x2 - 3 x2^3 at (1, 2): row sums of H are (14, -32)
    x = {"x1": jnp.array(1.0), "x2": jnp.array(2.0)}
    H = lt.hessian(lambda v: v["x1"] ** 2 + 2 * v["x1"] ** 2 * v["x2"] - 3 * v["x2"] ** 3, x)
    est = lt.row_sums(H)
    assert est.num_matvecs == 1
    assert np.asarray(est.value).tolist() == [14.0, -32.0]


def test_reverse_mode_equals_forward_mode():
    x = jnp.asarray(np.random.default_rng(3).standard_normal(4))
    V = jnp.asarray(np.random.default_rng(4).standard_normal((4, 3)))
    forward = lt.hessian(quartic, x, mode="forward")
    reverse = lt.hessian(quartic, x, mode="reverse")
    assert_close(reverse @ V, forward @ V)


@jax.custom_vjp
def _square(v):
    return v**2


_square.defvjp(lambda v: (v**2, v), lambda v, g: (2 * v * g,))


@jax.custom_vjp
def _cube(v):
    return v**3


# the backward rule calls a custom_vjp function, so jvp(grad(cube)) has no forward rule
_cube.defvjp(lambda v: (v**3, v), lambda v, g: (3 * _square(v) * g,))


def test_fallback_to_reverse_over_reverse_warns_once():
    x = jnp.array([1.0, -2.0, 0.5])
    H = lt.hessian(lambda v: jnp.sum(_cube(v)), x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = H.to_dense()
        second = H @ jnp.ones(3)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "falling back" in messages[0]
    assert "reverse-over-reverse" in H.mode
    assert_close(first, jnp.diag(6 * x))
    assert_close(second, 6 * x)


def test_compiled_program_is_reused_across_products_and_operators():
    """f is traced once per operator built (the arrays it reads from outside its
    arguments are taken then), and its products compile once per block width for every
    operator built from it: none at a new point of the same shapes."""
    from linop_trace.autodiff._jax import _cached_program

    calls = []

    def f(v):
        calls.append(1)  # runs only while JAX traces
        return jnp.sum(v**4)

    x = jnp.arange(1.0, 4.0)
    H = lt.hessian(f, x)
    assert len(calls) == 1
    H @ jnp.ones((3, 2))
    compiled = _cached_program.cache_info().misses
    H @ jnp.zeros((3, 2))
    lt.hessian(f, x + 1.0) @ jnp.ones((3, 2))  # a new point, same function and shapes
    assert len(calls) == 2  # the second build's trace; no product traced f again
    assert _cached_program.cache_info().misses == compiled


class _Quadratic:
    def __init__(self, scale):
        self.scale = scale

    def loss(self, v):  # Hessian diag(scale)
        return 0.5 * jnp.sum(self.scale * v**2)

    def field(self, z):  # Jacobian diag(scale), for each row of a batch
        return self.scale * z


def test_operators_take_the_arrays_a_function_reads_when_built():
    """Arrays a function reads from outside its arguments (here a bound method's
    attribute) were constants of the compiled programs that every operator built from
    the function shared: after they changed, a new operator gave the old matrix for the
    block widths compiled before (trace 6 instead of 60) and the new one for the others."""
    x, batch = jnp.ones(3), jnp.ones((2, 3))
    q = _Quadratic(jnp.array([1.0, 2.0, 3.0]))
    assert float(lt.trace(lt.hessian(q.loss, x), method="exact")) == pytest.approx(6.0)
    lt.jacobian(q.field, x).to_dense()
    lt.divergence(q.field, batch, method="exact")
    H = lt.hessian(q.loss, x)
    q.scale = jnp.array([10.0, 20.0, 30.0])
    # built before the change: the old matrix, at every block width
    assert float(lt.trace(H, method="exact")) == pytest.approx(6.0)
    assert np.allclose(np.asarray(H @ jnp.ones(3)), [1.0, 2.0, 3.0])
    H = lt.hessian(q.loss, x)  # built after it: the new matrix
    assert float(lt.trace(H, method="exact")) == pytest.approx(60.0)
    assert np.allclose(np.diag(np.asarray(H.to_dense())), [10.0, 20.0, 30.0])
    assert np.allclose(np.asarray(H @ jnp.ones(3)), [10.0, 20.0, 30.0])
    J = lt.jacobian(q.field, x)
    assert np.allclose(np.diag(np.asarray(J.to_dense())), [10.0, 20.0, 30.0])
    assert np.allclose(np.asarray(J.rmatvec(jnp.ones(3))), [10.0, 20.0, 30.0])
    divergence = lt.divergence(q.field, batch, method="exact").value
    assert np.allclose(np.asarray(divergence), [60.0, 60.0])
    estimate = lt.trace(H, method="hutchinson", num_matvecs=4, seed=0)  # compiled estimate
    assert float(estimate) == pytest.approx(60.0)  # (diagonal H: Rademacher is exact)


def test_hessian_of_a_function_returning_shape_one():
    """A function returning shape (1,) is accepted as a scalar; its products failed in
    every mode (grad needs a scalar) and only the torch-like loop got through."""
    H = lt.hessian(lambda v: jnp.sum(v**3)[None], jnp.array([1.0, 2.0, 3.0]))
    for mode in ("auto", "forward", "reverse", "loop"):
        H = lt.hessian(lambda v: jnp.sum(v**3)[None], jnp.array([1.0, 2.0, 3.0]), mode=mode)
        assert np.allclose(np.asarray(H @ jnp.ones(3)), [6.0, 12.0, 18.0])


def test_hessian_rejects_bad_input():
    with pytest.raises(ValueError, match="scalar"):
        lt.hessian(lambda v: v**2, jnp.ones(3))
    with pytest.raises(TypeError, match="mixes dtypes"):
        lt.hessian(lambda v: v[0].sum(), [jnp.ones(2, jnp.float32), jnp.ones(2)])
    with pytest.raises(TypeError, match="real floating"):
        lt.hessian(lambda v: v.sum(), jnp.ones(3, dtype=jnp.int32))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        lt.hessian(lambda p, x: x, lambda o, y: o, (jnp.ones((2, 2)), jnp.ones(2)))


# --------------------------------------------------------------- neural networks


def tiny_network(seed: int = 5):
    rng = np.random.default_rng(seed)
    params = {
        "W1": jnp.asarray(rng.standard_normal((3, 4))),
        "b1": jnp.asarray(rng.standard_normal(4)),
        "W2": jnp.asarray(rng.standard_normal((4, 2))),
    }

    def apply_fn(p, X):
        return jnp.tanh(X @ p["W1"] + p["b1"]) @ p["W2"]

    X = jnp.asarray(rng.standard_normal((12, 3)))
    return apply_fn, params, X, rng


def mse(out, y):
    return jnp.mean((out - y) ** 2)


def sum_squared_error(out, y):
    return jnp.sum((out - y) ** 2)


def cross_entropy(out, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out), y[:, None], axis=1))


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_network_hessian_matches_jax_hessian(loss):
    apply_fn, params, X, rng = tiny_network()
    loss_fn = mse if loss == "mse" else cross_entropy
    y = (
        jnp.asarray(rng.standard_normal((12, 2)))
        if loss == "mse"
        else jnp.asarray(rng.integers(0, 2, 12))
    )
    H = lt.hessian(apply_fn, params, loss_fn, (X, y))
    assert H.shape == (24, 24)
    assert_close(H.to_dense(), flat_hessian(lambda p: loss_fn(apply_fn(p, X), y), params))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_multi_batch_hessian_equals_hessian_on_concatenated_data(reduction):
    apply_fn, params, X, rng = tiny_network()
    y = jnp.asarray(rng.standard_normal((12, 2)))
    loss_fn = mse if reduction == "mean" else sum_squared_error
    whole = lt.hessian(apply_fn, params, loss_fn, (X, y), loss_reduction=reduction).to_dense()
    batches = [(X[:5], y[:5]), (X[5:7], y[5:7]), (X[7:], y[7:])]
    split = lt.hessian(apply_fn, params, loss_fn, batches, loss_reduction=reduction)
    assert_close(split.to_dense(), whole)
    assert_close(whole, flat_hessian(lambda p: loss_fn(apply_fn(p, X), y), params))


def ggn_reference(apply_fn, params, loss_fn, X, y):
    theta, unravel = ravel_pytree(params)
    out = apply_fn(params, X)
    J = jax.jacfwd(lambda t: apply_fn(unravel(t), X))(theta).reshape(out.size, -1)
    H_out = jax.hessian(lambda o: loss_fn(o.reshape(out.shape), y))(out.reshape(-1))
    return J.T @ H_out @ J


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_ggn_matches_jacobian_sandwich(loss):
    apply_fn, params, X, rng = tiny_network()
    loss_fn = mse if loss == "mse" else cross_entropy
    y = (
        jnp.asarray(rng.standard_normal((12, 2)))
        if loss == "mse"
        else jnp.asarray(rng.integers(0, 2, 12))
    )
    G = lt.ggn(apply_fn, params, loss_fn, (X, y))
    assert {"symmetric", "positive_semidefinite"} <= G.tags
    reference = ggn_reference(apply_fn, params, loss_fn, X, y)
    assert_close(G.to_dense(), reference)
    assert_close(
        lt.ggn(apply_fn, params, loss_fn, [(X[:7], y[:7]), (X[7:], y[7:])]).to_dense(), reference
    )


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_loop_mode_matches_the_references(loss):
    # lax.map over the columns instead of vmap, inside the same compiled program
    apply_fn, params, X, rng = tiny_network()
    loss_fn = mse if loss == "mse" else cross_entropy
    y = (
        jnp.asarray(rng.standard_normal((12, 2)))
        if loss == "mse"
        else jnp.asarray(rng.integers(0, 2, 12))
    )
    batches = [(X[:7], y[:7]), (X[7:], y[7:])]
    H = lt.hessian(apply_fn, params, loss_fn, batches, mode="loop")
    assert H.mode.startswith("a loop of forward-over-reverse HVPs")
    assert_close(H.to_dense(), flat_hessian(lambda p: loss_fn(apply_fn(p, X), y), params))
    G = lt.ggn(apply_fn, params, loss_fn, batches, mode="loop")
    assert G.mode.startswith("a loop of GGN products")
    assert_close(G.to_dense(), ggn_reference(apply_fn, params, loss_fn, X, y))


def test_loop_mode_of_a_function_and_its_fallback_for_custom_vjp():
    x = jnp.asarray(np.random.default_rng(6).standard_normal(5))
    V = jnp.asarray(np.random.default_rng(7).standard_normal((5, 3)))
    assert_close(lt.hessian(quartic, x, mode="loop") @ V, jax.hessian(quartic)(x) @ V)
    H = lt.hessian(lambda v: jnp.sum(_cube(v)), x, mode="loop")
    with pytest.warns(RuntimeWarning, match="falling back"):
        assert_close(H @ V, jnp.diag(6 * x) @ V)
    assert H.mode.startswith("a loop of reverse-over-reverse HVPs")


def test_auto_is_the_vectorized_product_and_bad_modes_name_the_valid_ones():
    apply_fn, params, X, rng = tiny_network()
    y = jnp.asarray(rng.standard_normal((12, 2)))
    H = lt.hessian(apply_fn, params, mse, (X, y))
    H.to_dense()
    assert H.mode.startswith("forward-over-reverse HVP (jit(vmap")  # JAX's auto does not time
    with pytest.raises(ValueError, match="'auto', 'forward', 'reverse', 'loop'.*'sideways'"):
        lt.hessian(quartic, jnp.ones(3), mode="sideways")
    with pytest.raises(ValueError, match="'auto', 'forward', 'reverse', 'loop'.*'vmap'"):
        lt.ggn(apply_fn, params, mse, (X, y), mode="vmap")
    with pytest.raises(ValueError, match=r"'auto', 'forward', 'reverse', got 'loop'"):
        lt.jacobian(lambda v: v**2, jnp.ones(3), mode="loop")


# --------------------------------------------------------- BackPACK's digits example


def test_digits_exact_trace_equals_sum_of_hessian_diagonal(digits64):
    *_, H, dense = digits64
    assert H.shape == (1480, 1480)
    est = lt.trace(H, method="exact")
    assert est.num_matvecs == 1480
    diagonal = jnp.diagonal(dense)
    assert abs(float(est.value) - float(diagonal.sum())) <= RTOL * float(jnp.abs(diagonal).sum())


def test_digits_exact_diagonal_equals_hessian_diagonal(digits64):
    *_, H, dense = digits64
    assert_close(lt.diagonal(H, method="exact").value, jnp.diagonal(dense))


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_digits_trace_estimates_fall_in_their_99_percent_intervals(digits64, method, seed):
    # The method's own interval, mean +- t_{0.995} stderr, at a fixed seed set.
    *_, H, dense = digits64
    exact = float(jnp.trace(dense))
    est = lt.trace(H, method=method, num_matvecs=100, seed=seed)
    assert est.num_matvecs <= 100
    low, high = est.ci(0.99)
    assert low <= exact <= high, f"{method} seed {seed}: {exact} not in ({low}, {high})"


def test_digits_multi_batch_hessian_equals_concatenated_batch(digits64):
    apply_fn, params, loss_fn, X, y, H, _ = digits64
    batches = [(X[:100], y[:100]), (X[100:200], y[100:200]), (X[200:], y[200:])]
    split = lt.hessian(apply_fn, params, loss_fn, batches)
    V = jnp.asarray(np.random.default_rng(8).standard_normal((1480, 5)))
    assert_close(split @ V, H @ V)


def test_digits_jax_and_torch_agree_on_the_same_weights(digits64):
    torch = pytest.importorskip("torch")
    apply_fn, params, loss_fn, X, y, H, _ = digits64
    model = torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(64, 20, bias=False),
        torch.nn.Sigmoid(),
        torch.nn.Linear(20, 10, bias=False),
    ).to(torch.float64)
    with torch.no_grad():
        model[1].weight.copy_(torch.from_numpy(np.array(params["W1"])))
        model[3].weight.copy_(torch.from_numpy(np.array(params["W2"])))
    data = (torch.from_numpy(np.array(X)), torch.from_numpy(np.array(y)))
    H_torch = lt.hessian(model, torch.nn.CrossEntropyLoss(), data)
    V = np.random.default_rng(9).standard_normal((1480, 4))
    assert_close((H_torch @ torch.from_numpy(V)).numpy(), H @ jnp.asarray(V))


# -------------------------------------------------------------------- jacobian


def test_jacobian_products_match_jacfwd_with_pytrees():
    rng = np.random.default_rng(9)
    x = {"a": jnp.asarray(rng.standard_normal(3)), "b": jnp.asarray(rng.standard_normal(2))}

    def f(v):
        return {"sine": jnp.sin(v["a"]) * jnp.sum(v["b"]), "outer": jnp.outer(v["b"], v["a"])}

    J = lt.jacobian(f, x)
    assert J.shape == (9, 5)
    theta, unravel = ravel_pytree(x)
    dense = jax.jacfwd(lambda t: ravel_pytree(f(unravel(t)))[0])(theta)
    assert_close(J.to_dense(), dense)
    W = jnp.asarray(rng.standard_normal((9, 4)))
    assert_close(J.rmatmat(W), dense.T @ W)
    out = J.unflatten_output(J @ jnp.ones(5))
    assert out["outer"].shape == (2, 3) and out["sine"].shape == (3,)


def test_jacobian_falls_back_for_custom_vjp_functions():
    x = jnp.array([1.0, -2.0, 0.5])
    with pytest.warns(RuntimeWarning, match="falling back"):
        dense = lt.jacobian(_cube, x).to_dense()
    assert_close(dense, jnp.diag(3 * x**2))


# ------------------------------------------------------------------- divergence


def flow_field(W):
    return lambda z: jnp.tanh(z @ W) + 0.1 * z**3


def exact_divergence_reference(f, x):
    return jax.vmap(lambda z: jnp.trace(jax.jacfwd(lambda u: f(u[None])[0])(z)))(x)


def test_exact_divergence_matches_dense_jacobian_traces():
    rng = np.random.default_rng(10)
    W, x = jnp.asarray(rng.standard_normal((4, 4))), jnp.asarray(rng.standard_normal((6, 4)))
    est = lt.divergence(flow_field(W), x, method="exact", block_size=3)
    assert est.value.shape == (6,) and est.num_matvecs == 4
    assert_close(est.value, exact_divergence_reference(flow_field(W), x))


def test_hutchinson_divergence_is_within_its_interval_per_sample():
    # Per-sample Rademacher variance 2 sum_{i != j} S_ij^2; 400 probes, 99.9% t-interval
    # per sample, fixed seed.
    rng = np.random.default_rng(11)
    W, x = jnp.asarray(rng.standard_normal((5, 5))), jnp.asarray(rng.standard_normal((6, 5)))
    f = flow_field(W)
    est = lt.divergence(f, x, method="hutchinson", num_matvecs=400, seed=0)
    assert est.value.shape == est.stderr.shape == (6,)
    low, high = est.ci(0.999)
    exact = exact_divergence_reference(f, x)
    assert bool(jnp.all((low <= exact) & (exact <= high)))


def test_divergence_is_differentiable():
    # f(z) = z^3 * w: sum_b divergence_b = 3 sum_b sum_i w_i z_bi^2; gradient 3 sum_b z_b^2.
    rng = np.random.default_rng(12)
    w, x = jnp.asarray(rng.standard_normal(3)), jnp.asarray(rng.standard_normal((5, 3)))

    def total(w):
        return jnp.sum(lt.divergence(lambda z: z**3 * w, x, method="exact").value)

    assert_close(jax.grad(total)(w), 3 * jnp.sum(x**2, axis=0))


# -------------------------------------------------------- differentiable estimates


def test_gradient_of_exact_hessian_trace_matches_closed_form():
    # f(x) = sum x^4: tr H = 12 sum x^2, gradient 24 x.
    x = jnp.asarray(np.random.default_rng(13).standard_normal(6))

    def hessian_trace(v):
        return lt.trace(lt.hessian(lambda u: jnp.sum(u**4), v), method="exact").value

    assert_close(hessian_trace(x), 12 * jnp.sum(x**2))
    assert_close(jax.grad(hessian_trace)(x), 24 * x)


def test_hessian_estimate_is_one_compiled_program_for_every_point():
    """A Hessian's point (or a network's parameters and data) is an argument of the
    compiled estimate: a Hessian at a new point reuses it, and it runs under the transfer
    guard (no Python number shipped to the device, no read on the host)."""
    from linop_trace import _backend, _functions

    def f(x):
        return jnp.sum(jnp.sin(x["a"]) * x["b"][0]) + jnp.sum(x["a"] ** 4)

    def point(shift):
        return {"a": jnp.arange(1.0, 41.0) / 40 + shift, "b": jnp.ones(3)}

    H = lt.hessian(f, point(0.0))
    assert H.compilable()
    key = jax.random.key(0)
    first = lt.trace(H, method="hutchinson", num_matvecs=20, seed=key)
    program = _backend.compiled(_functions._compiled_run, num_static=4)
    size = program._cache_size()
    for shift in (0.1, 0.2):
        other = lt.hessian(f, point(shift))
        with jax.transfer_guard("disallow"):
            estimate = lt.trace(other, method="hutchinson", num_matvecs=20, seed=key)
        hessian = jax.hessian(lambda v, H=other: f(H.unflatten(v)))
        exact = jnp.trace(hessian(other.flatten(point(shift))))
        assert abs(float(estimate) - float(exact)) <= 6 * float(estimate.stderr)
    assert program._cache_size() == size
    assert float(first) != float(estimate)  # a new point, the same probes, another value


def test_autodiff_block_size_allows_for_the_products_workspace():
    H = lt.hessian(lambda x: jnp.sum(x**4), jnp.ones(30))
    assert H.bytes_per_column() == H.COLUMN_FACTOR * 2 * 30 * 8


def test_complex_blocks_go_through_by_real_and_imaginary_parts():
    """A complex block on a real Hessian or Jacobian: H (Re Z) + i H (Im Z). The block was
    cast to the variables' real dtype, and the imaginary part dropped (H @ (1j v) = 0)."""
    x = jnp.array([1.0, 2.0, 3.0])
    H = lt.hessian(lambda v: jnp.sum(v**4) / 4, x)  # diag(3 x^2)
    Z = jnp.stack([jnp.ones(3) * (1 + 2j), jnp.arange(3.0) * 1j], axis=1)
    dense = jnp.diag(3 * x**2)
    assert np.allclose(np.asarray(H @ Z), np.asarray(dense @ Z))
    J = lt.jacobian(lambda v: jnp.sin(v) * v[0], x)
    dense_j = jax.jacfwd(lambda v: jnp.sin(v) * v[0])(x)
    assert np.allclose(np.asarray(J @ Z), np.asarray(dense_j @ Z))
    assert np.allclose(np.asarray(J.rmatmat(Z)), np.asarray(dense_j.T @ Z))
