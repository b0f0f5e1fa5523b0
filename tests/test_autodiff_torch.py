"""Autodiff operators on torch: every product against the dense torch.func reference.

Comparisons are in float64 with a relative tolerance of 1e-10 on the largest entry
(``assert_close``): the operators and the references run the same arithmetic in a
different order, so they agree to a few ulps times the size of the problem.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import linop_trace as lt  # noqa: E402
from linop_trace.autodiff._examples import digits_mlp_problem  # noqa: E402
from linop_trace.autodiff._torch import (  # noqa: E402
    FORWARD_GGN,
    FORWARD_HVP,
    LOOP_GGN,
    LOOP_HVP,
    REVERSE_HVP,
)

F64 = torch.float64
RTOL = 1e-10


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    """max |actual - expected| <= rtol * max |expected| (and identical shapes)."""
    assert tuple(actual.shape) == tuple(expected.shape)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    error = float((actual - expected).abs().max()) if expected.numel() else 0.0
    assert error <= rtol * max(scale, 1e-300), f"max error {error:.3e} vs scale {scale:.3e}"


def flat_hessian(f, leaves):
    """Dense Hessian of f(leaves) over the concatenated leaves, by torch.func.hessian."""
    shapes = [leaf.shape for leaf in leaves]
    sizes = [leaf.numel() for leaf in leaves]

    def flat_f(theta):
        pieces = torch.split(theta, sizes)
        return f([p.reshape(s) for p, s in zip(pieces, shapes)])

    theta = torch.cat([leaf.reshape(-1) for leaf in leaves])
    return torch.func.hessian(flat_f)(theta)


def module_loss_hessian(model, loss_fn, X, y):
    """Dense Hessian of the loss over the trainable parameters of ``model``."""
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    fixed = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    names = list(trainable)

    def f(leaves):
        params = dict(zip(names, leaves))
        return loss_fn(torch.func.functional_call(model, {**fixed, **params}, (X,)), y)

    return flat_hessian(f, [trainable[n] for n in names])


@pytest.fixture(scope="module")
def digits64():
    model, loss_fn, (X, y) = digits_mlp_problem(batch_size=256, seed=0, dtype=F64)
    H = lt.hessian(model, loss_fn, (X, y))
    dense = module_loss_hessian(model, loss_fn, X, y)
    return model, loss_fn, X, y, H, dense


# ------------------------------------------------------------------------- hessian


def quartic(x):
    return (x**4).sum() + (torch.sin(x) * x.sum()).sum()


def test_hessian_of_a_tensor_matches_torch_func():
    x = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    H = lt.hessian(quartic, x)
    assert H.shape == (6, 6) and H.dtype == F64 and H.library == "torch"
    assert "symmetric" in H.tags
    assert_close(H.to_dense(), torch.func.hessian(quartic)(x).reshape(6, 6))


@pytest.mark.parametrize("kind", ["list", "tuple", "dict"])
def test_hessian_of_structured_variables_matches_torch_func(kind):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, dtype=F64, generator=g)
    b = torch.randn(2, 2, dtype=F64, generator=g)

    def f_leaves(leaves):
        u, w = leaves
        return (u**3).sum() * w.sum() + (w @ w).trace() * u[0] + torch.exp(u).sum()

    if kind == "dict":
        x = {"u": a, "w": b}
        H = lt.hessian(lambda v: f_leaves([v["u"], v["w"]]), x)
    else:
        x = [a, b] if kind == "list" else (a, b)
        H = lt.hessian(f_leaves, x)
    assert H.shape == (7, 7)
    assert_close(H.to_dense(), flat_hessian(f_leaves, [a, b]))
    # flatten / unflatten move between the structure and vectors
    vector = H.flatten(x)
    assert_close(vector, torch.cat([a, b.reshape(-1)]))
    back = H.unflatten(vector)
    leaves = [back["u"], back["w"]] if kind == "dict" else list(back)
    assert type(back) is type(x)
    assert_close(leaves[1], b)


def test_matvec_rmatvec_and_float32_keep_library_and_dtype():
    x = torch.randn(5, generator=torch.Generator().manual_seed(2))  # float32
    H = lt.hessian(quartic, x)
    assert H.dtype == torch.float32 and H.device == x.device
    v = torch.ones(5)
    out = H @ v
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (5,)
    reference = torch.func.hessian(quartic)(x) @ v
    assert torch.allclose(out, reference, rtol=1e-5, atol=1e-5)
    assert torch.allclose(H.rmatvec(v), out)
    # a float64 block gets a float64 result (products in the Hessian's float32, as a dense
    # float32 operator does), with float32 accuracy
    block = torch.eye(5, dtype=F64)[:, :3]
    wide = H.matmat(block)
    assert wide.dtype == F64 == lt.aslinearoperator(torch.eye(5)).matmat(block).dtype
    dense = torch.func.hessian(quartic)(x.double())
    assert torch.allclose(wide, dense[:, :3], rtol=1e-5, atol=1e-5)


def test_row_sums_of_the_note_example_with_one_hvp():
    # f(x1, x2) = x1^2 + 2 x1^2 x2 - 3 x2^3 at (1, 2): H = [[2 + 4 x2, 4 x1], [4 x1, -18 x2]]
    x = [torch.tensor([1.0], dtype=F64), torch.tensor([2.0], dtype=F64)]
    H = lt.hessian(lambda v: (v[0] ** 2 + 2 * v[0] ** 2 * v[1] - 3 * v[1] ** 3).sum(), x)
    est = lt.row_sums(H)
    assert est.num_matvecs == 1
    assert est.value.tolist() == [14.0, -32.0]


def test_reverse_over_reverse_mode_equals_forward_over_reverse():
    x = torch.randn(4, dtype=F64, generator=torch.Generator().manual_seed(3))
    V = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(4))
    forward = lt.hessian(quartic, x, mode="forward")
    reverse = lt.hessian(quartic, x, mode="reverse")
    assert_close(reverse @ V, forward @ V)
    assert "reverse" in reverse.mode and "forward" in forward.mode


class _CubeWithoutJvp(torch.autograd.Function):
    """x^3 with a backward formula but no forward-mode (jvp) rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad_output


def test_fallback_to_reverse_over_reverse_warns_once():
    x = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    H = lt.hessian(lambda v: _CubeWithoutJvp.apply(v).sum(), x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = H.to_dense()
        second = H @ torch.ones(3, dtype=F64)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "falling back" in messages[0]
    assert "reverse-over-reverse" in H.mode
    assert_close(first, torch.diag(6 * x))
    assert_close(second, 6 * x)


def test_hessian_rejects_bad_input():
    with pytest.raises(ValueError, match="scalar"):
        lt.hessian(lambda v: v**2, torch.ones(3, dtype=F64))
    with pytest.raises(TypeError, match="mixes dtypes"):
        lt.hessian(lambda v: v[0].sum() + v[1].sum(), [torch.ones(2), torch.ones(2, dtype=F64)])
    with pytest.raises(TypeError, match="real floating"):
        lt.hessian(lambda v: v.sum(), torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="mode"):
        lt.hessian(quartic, torch.ones(3), mode="sideways")
    with pytest.raises(TypeError, match="torch tensors"):
        lt.hessian(quartic, [1.0, 2.0])
    H = lt.hessian(quartic, torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="length 3"):
        H.unflatten(torch.ones(4, dtype=F64))


# --------------------------------------------------------------- neural networks


def small_network(frozen: bool):
    g = torch.Generator().manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).to(
        F64
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, dtype=F64, generator=g))
    if frozen:
        model[0].weight.requires_grad_(False)
    X = torch.randn(12, 3, dtype=F64, generator=g)
    return model, X, g


@pytest.mark.parametrize("frozen", [False, True])
def test_module_hessian_matches_torch_func_and_excludes_frozen_parameters(frozen):
    model, X, g = small_network(frozen)
    y = torch.randint(0, 2, (12,), generator=g)
    loss_fn = torch.nn.CrossEntropyLoss()
    H = lt.hessian(model, loss_fn, (X, y))
    expected_size = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert H.shape == (expected_size, expected_size)
    assert expected_size == (26 if not frozen else 14)
    assert_close(H.to_dense(), module_loss_hessian(model, loss_fn, X, y))
    structure = H.unflatten(
        H.flatten({n: p for n, p in model.named_parameters() if p.requires_grad})
    )
    assert ("0.weight" in structure) == (not frozen)


def test_apply_function_form_with_a_dict_of_tensors():
    model, X, g = small_network(False)
    y = torch.randn(12, 2, dtype=F64, generator=g)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def apply_fn(p, inputs):
        return torch.func.functional_call(model, p, (inputs,))

    H = lt.hessian(apply_fn, params, torch.nn.MSELoss(), (X, y))
    assert_close(H.to_dense(), module_loss_hessian(model, torch.nn.MSELoss(), X, y))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_multi_batch_hessian_equals_hessian_on_concatenated_data(reduction):
    model, X, g = small_network(True)
    y = torch.randn(12, 2, dtype=F64, generator=g)
    loss_fn = torch.nn.MSELoss(reduction=reduction)
    whole = lt.hessian(model, loss_fn, (X, y)).to_dense()
    batches = [(X[:5], y[:5]), (X[5:7], y[5:7]), (X[7:], y[7:])]  # unequal sizes
    assert_close(lt.hessian(model, loss_fn, batches).to_dense(), whole)
    # a one-shot generator is materialized, so every product sees all batches
    split = lt.hessian(model, loss_fn, (b for b in batches))
    assert_close(split.to_dense(), whole)
    assert_close(split.to_dense(), whole)
    # a shuffling data loader is walked again for every product; any order sums the same
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X, y),
        batch_size=5,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    from_loader = lt.hessian(model, loss_fn, loader)
    assert_close(from_loader.to_dense(), whole)
    assert_close(from_loader.to_dense(), whole)


def ggn_reference(model, loss_fn, X, y):
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    names = list(params)
    theta = torch.cat([params[n].reshape(-1) for n in names])
    sizes = [params[n].numel() for n in names]

    def outputs(t):
        pieces = dict(
            zip(names, [p.reshape(params[n].shape) for p, n in zip(torch.split(t, sizes), names)])
        )
        return torch.func.functional_call(model, pieces, (X,))

    J = torch.func.jacfwd(outputs)(theta).reshape(-1, theta.numel())
    out = outputs(theta)
    H_out = torch.func.hessian(lambda o: loss_fn(o.reshape(out.shape), y))(out.reshape(-1))
    return J.T @ H_out @ J


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_ggn_matches_jacobian_sandwich(loss):
    model, X, g = small_network(False)
    if loss == "mse":
        loss_fn, y = torch.nn.MSELoss(), torch.randn(12, 2, dtype=F64, generator=g)
    else:
        loss_fn, y = torch.nn.CrossEntropyLoss(), torch.randint(0, 2, (12,), generator=g)
    G = lt.ggn(model, loss_fn, (X, y))
    assert {"symmetric", "positive_semidefinite"} <= G.tags
    reference = ggn_reference(model, loss_fn, X, y)
    assert_close(G.to_dense(), reference)
    batches = [(X[:7], y[:7]), (X[7:], y[7:])]
    assert_close(lt.ggn(model, loss_fn, batches).to_dense(), reference)


def test_ggn_of_a_linear_model_with_squared_error_is_the_hessian():
    model = torch.nn.Linear(3, 2).to(F64)
    g = torch.Generator().manual_seed(6)
    data = (torch.randn(9, 3, dtype=F64, generator=g), torch.randn(9, 2, dtype=F64, generator=g))
    G = lt.ggn(model, torch.nn.MSELoss(), data).to_dense()
    H = lt.hessian(model, torch.nn.MSELoss(), data).to_dense()
    assert_close(G, H)


def test_network_forms_reject_bad_data():
    model, X, g = small_network(False)
    with pytest.raises(TypeError, match="iterable"):
        lt.hessian(model, torch.nn.MSELoss(), 3)
    with pytest.raises(TypeError, match="pair"):
        lt.hessian(model, torch.nn.MSELoss(), [(X, X, X)])
    with pytest.raises(ValueError, match="no batches"):
        lt.hessian(model, torch.nn.MSELoss(), [])
    with pytest.raises(TypeError, match="positional"):
        lt.hessian(model, torch.nn.MSELoss(), (X, X), 1, 2)
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=True"):
        lt.hessian(frozen, torch.nn.MSELoss(), (X[:, :2], X[:, :2]))


# --------------------------------------------------------- BackPACK's digits example


def test_digits_exact_trace_equals_sum_of_hessian_diagonal(digits64):
    _, _, _, _, H, dense = digits64
    assert H.shape == (1480, 1480)
    est = lt.trace(H, method="exact")
    assert est.num_matvecs == 1480
    expected = torch.diagonal(dense).sum()
    assert abs(float(est.value) - float(expected)) <= RTOL * float(
        torch.diagonal(dense).abs().sum()
    )


def test_digits_exact_diagonal_equals_hessian_diagonal(digits64):
    _, _, _, _, H, dense = digits64
    est = lt.diagonal(H, method="exact")
    assert_close(est.value, torch.diagonal(dense))


def test_digits_hessian_products_match_dense(digits64):
    _, _, _, _, H, dense = digits64
    V = torch.randn(1480, 7, dtype=F64, generator=torch.Generator().manual_seed(7))
    assert_close(H @ V, dense @ V)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_digits_trace_estimates_fall_in_their_99_percent_intervals(digits64, method, seed):
    # Each interval is the method's own: mean +- t_{0.995} stderr. For a fixed seed set
    # the outcome is deterministic; at 99% a miss is a 1-in-100 event per (method, seed).
    _, _, _, _, H, dense = digits64
    exact = float(torch.diagonal(dense).sum())
    est = lt.trace(H, method=method, num_matvecs=100, seed=seed)
    assert est.num_matvecs <= 100
    low, high = est.ci(0.99)
    assert low <= exact <= high, f"{method} seed {seed}: {exact} not in ({low}, {high})"


def test_digits_multi_batch_hessian_equals_concatenated_batch(digits64):
    model, loss_fn, X, y, H, _ = digits64
    batches = [(X[:100], y[:100]), (X[100:200], y[100:200]), (X[200:], y[200:])]
    split = lt.hessian(model, loss_fn, batches)
    V = torch.randn(1480, 5, dtype=F64, generator=torch.Generator().manual_seed(8))
    assert_close(split @ V, H @ V)


# -------------------------------------------------------------------- jacobian


def test_jacobian_products_match_jacfwd_with_structured_input_and_output():
    g = torch.Generator().manual_seed(9)
    x = {"a": torch.randn(3, dtype=F64, generator=g), "b": torch.randn(2, dtype=F64, generator=g)}

    def f(v):
        return (torch.sin(v["a"]) * v["b"].sum(), torch.outer(v["b"], v["a"]))

    J = lt.jacobian(f, x)
    assert J.shape == (3 + 6, 5)
    theta = torch.cat([x["a"], x["b"]])

    def flat(t):
        out = f({"a": t[:3], "b": t[3:]})
        return torch.cat([o.reshape(-1) for o in out])

    dense = torch.func.jacfwd(flat)(theta)
    assert_close(J.to_dense(), dense)
    W = torch.randn(9, 4, dtype=F64, generator=g)
    assert_close(J.rmatmat(W), dense.T @ W)
    assert_close(J.H.to_dense(), dense.T)
    sine, outer = J.unflatten_output(J @ torch.ones(5, dtype=F64))
    assert sine.shape == (3,) and outer.shape == (2, 3)


def test_jacobian_trace_and_reverse_mode():
    x = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    J = lt.jacobian(lambda v: v**2 * v.sum(), x, mode="reverse")
    dense = torch.func.jacfwd(lambda v: v**2 * v.sum())(x)
    assert_close(J.to_dense(), dense)
    assert float(lt.trace(J, method="exact").value) == pytest.approx(
        float(torch.trace(dense)), rel=1e-12
    )


# ------------------------------------------------------------------- divergence


def flow_field(W):
    return lambda z: torch.tanh(z @ W) + 0.1 * z**3


def exact_divergence_reference(f, x):
    jac = torch.func.vmap(torch.func.jacfwd(lambda z: f(z[None])[0]))(x)
    return torch.diagonal(jac, dim1=-2, dim2=-1).sum(-1)


def test_exact_divergence_matches_dense_jacobian_traces():
    g = torch.Generator().manual_seed(10)
    W = torch.randn(4, 4, dtype=F64, generator=g)
    x = torch.randn(6, 4, dtype=F64, generator=g)
    est = lt.divergence(flow_field(W), x, method="exact", block_size=3)
    assert est.value.shape == (6,) and est.num_matvecs == 4 and est.method == "exact"
    assert_close(est.value, exact_divergence_reference(flow_field(W), x))


def test_hutchinson_divergence_is_within_its_interval_per_sample():
    # Rademacher per-sample variance is 2 sum_{i != j} S_ij^2 (S = sym. part of J_b); the
    # reported stderr estimates its square root over sqrt(m). With 400 probes the 99.9%
    # t-interval holds each of the 6 exact values for this fixed seed.
    g = torch.Generator().manual_seed(11)
    W = torch.randn(5, 5, dtype=F64, generator=g)
    x = torch.randn(6, 5, dtype=F64, generator=g)
    f = flow_field(W)
    est = lt.divergence(f, x, method="hutchinson", num_matvecs=400, seed=0, block_size=64)
    assert est.value.shape == est.stderr.shape == (6,) and est.num_matvecs == 400
    assert est.info["samples"].shape == (400, 6)
    low, high = est.ci(0.999)
    exact = exact_divergence_reference(f, x)
    assert bool(torch.all((low <= exact) & (exact <= high)))
    again = lt.divergence(f, x, method="hutchinson", num_matvecs=400, seed=0, block_size=64)
    assert_close(again.value, est.value, rtol=1e-12)


def test_divergence_is_differentiable_for_training_losses():
    # f(z) = z^3 * w elementwise: divergence_b = 3 sum_i w_i z_bi^2, so the gradient of
    # sum_b divergence_b with respect to w is 3 sum_b z_b^2.
    g = torch.Generator().manual_seed(12)
    w = torch.randn(3, dtype=F64, generator=g, requires_grad=True)
    x = torch.randn(5, 3, dtype=F64, generator=g)
    est = lt.divergence(lambda z: z**3 * w, x, method="exact", differentiable=True)
    est.value.sum().backward()
    assert_close(w.grad, 3 * (x**2).sum(0))
    plain = lt.divergence(lambda z: z**3 * w, x, method="exact")
    assert not plain.value.requires_grad


def test_divergence_rejects_bad_input():
    x = torch.ones(4, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"\(B, d\)"):
        lt.divergence(lambda z: z, torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="sample-wise"):
        lt.divergence(lambda z: z[:, :2], x, method="exact")
    with pytest.raises(ValueError, match="unknown divergence method"):
        lt.divergence(lambda z: z, x, method="hutch++")
    with pytest.raises(ValueError, match="num_matvecs >= 2"):
        lt.divergence(lambda z: z, x, method="hutchinson", num_matvecs=1)


# -------------------------------------------------------- differentiable estimates


def test_gradient_of_exact_hessian_trace_matches_closed_form():
    # f(x) = sum x^4: H = diag(12 x^2), tr H = 12 sum x^2, d tr H / dx = 24 x.
    x = torch.randn(6, dtype=F64, generator=torch.Generator().manual_seed(13), requires_grad=True)
    H = lt.hessian(lambda v: (v**4).sum(), x, differentiable=True)
    est = lt.trace(H, method="exact")
    assert_close(est.value.detach(), 12 * (x.detach() ** 2).sum())
    est.value.backward()
    assert_close(x.grad, 24 * x.detach())


def test_hutchinson_hessian_trace_is_differentiable_and_unbiased_per_probe():
    # With Rademacher z, z^T diag(12 x^2) z = 12 sum x^2 exactly, so the estimate and its
    # gradient are exact whatever the seed.
    x = torch.randn(6, dtype=F64, generator=torch.Generator().manual_seed(14), requires_grad=True)
    H = lt.hessian(lambda v: (v**4).sum(), x, differentiable=True)
    est = lt.trace(H, method="hutchinson", num_matvecs=4, seed=0)
    est.value.backward()
    assert_close(x.grad, 24 * x.detach())


def test_without_differentiable_no_graph_is_kept():
    x = torch.randn(4, dtype=F64, requires_grad=True)
    H = lt.hessian(lambda v: (v**4).sum(), x)
    assert not (H @ torch.ones(4, dtype=F64)).requires_grad


@pytest.mark.parametrize("differentiable", [False, True])
def test_loop_mode_keeps_a_graph_only_when_differentiable(differentiable):
    # fn = sum(theta^4) / 12 has H = diag(theta^2), so H V = theta^2 * V and
    # d/dtheta sum(H V) = 2 theta * (row sums of V)
    theta = torch.tensor([1.0, -2.0, 0.5], dtype=F64, requires_grad=True)
    V = torch.arange(6, dtype=F64).reshape(3, 2)
    H = lt.hessian(lambda t: (t**4).sum() / 12, theta, mode="loop", differentiable=differentiable)
    HV = H @ V
    assert_close(HV.detach(), theta.detach()[:, None] ** 2 * V)
    assert HV.requires_grad == differentiable
    if differentiable:
        (gradient,) = torch.autograd.grad(HV.sum(), theta)
        assert_close(gradient, 2 * theta.detach() * V.sum(dim=1))


def test_loop_mode_of_the_ggn_is_differentiable_like_the_vectorized_one():
    # the GGN depends on the inputs: d sum(G V) / d X by the loop and by forward mode
    model, X, g = small_network(frozen=False)
    y = torch.randint(0, 2, (12,), generator=g)
    V = torch.randn(26, 3, dtype=F64, generator=g)
    gradients = {}
    for mode in ("loop", "forward"):
        inputs = X.clone().requires_grad_()
        G = lt.ggn(model, torch.nn.CrossEntropyLoss(), (inputs, y), mode=mode, differentiable=True)
        (gradients[mode],) = torch.autograd.grad((G @ V).sum(), inputs)
    assert_close(gradients["loop"], gradients["forward"])
    plain = lt.ggn(model, torch.nn.CrossEntropyLoss(), (X.clone().requires_grad_(), y), mode="loop")
    assert not (plain @ V).requires_grad


# ------------------------------------------------------------ loop and auto routes


def test_loop_mode_gives_the_products_of_the_vectorized_routes():
    x = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(16))
    V = torch.randn(6, 5, dtype=F64, generator=torch.Generator().manual_seed(17))
    loop = lt.hessian(quartic, x, mode="loop")
    assert loop.mode == LOOP_HVP
    expected = torch.func.hessian(quartic)(x).reshape(6, 6) @ V
    for mode in ("forward", "reverse", "auto"):
        assert_close(lt.hessian(quartic, x, mode=mode) @ V, expected)
    assert_close(loop @ V, expected)
    assert_close(loop @ V[:, 0], expected[:, 0])  # a matvec is a one-column loop
    # a function with a constant gradient: its Hessian is zero, not an autograd error
    assert_close(
        lt.hessian(lambda v: (3 * v).sum(), x, mode="loop") @ V, torch.zeros(6, 5, dtype=F64)
    )


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_loop_mode_of_networks_matches_the_references(loss):
    model, X, g = small_network(frozen=True)
    if loss == "mse":
        loss_fn, y = torch.nn.MSELoss(), torch.randn(12, 2, dtype=F64, generator=g)
    else:
        loss_fn, y = torch.nn.CrossEntropyLoss(), torch.randint(0, 2, (12,), generator=g)
    batches = [(X[:5], y[:5]), (X[5:], y[5:])]
    H = lt.hessian(model, loss_fn, batches, mode="loop")
    assert_close(H.to_dense(), module_loss_hessian(model, loss_fn, X, y))
    G = lt.ggn(model, loss_fn, batches, mode="loop")
    assert G.mode == LOOP_GGN
    assert_close(G.to_dense(), ggn_reference(model, loss_fn, X, y))
    assert_close(lt.ggn(model, loss_fn, batches, mode="reverse").to_dense(), G.to_dense())


class FakeClock:
    """``perf_counter`` for the route timing: advanced only by the products spied on."""

    def __init__(self) -> None:
        self.now = 0.0
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


@pytest.fixture
def spied_routes(monkeypatch):
    """A fake clock, and the widths of the blocks that reach the forward-over-reverse HVP
    and the double-backward loop; each advances the clock by ``cost[route]`` per column.
    No route has run yet, as in a new process."""
    from linop_trace.autodiff import _common, _torch

    clock = FakeClock()
    monkeypatch.setattr(_torch, "route_clock", lambda device: clock)
    monkeypatch.setattr(_common, "WARMED_UP", set())  # as in a new process: warm-ups first
    monkeypatch.setattr(_common, "_CHOSEN_ROUTES", {})  # and no route chosen yet
    calls = {"vectorized": [], "loop": []}
    cost = {"vectorized": 1.0, "loop": 2.0}
    forward_over_reverse = _torch.hvp_forward_over_reverse
    double_backward_products = _torch.double_backward_products

    def vectorized(fn, theta, V):
        calls["vectorized"].append(V.shape[1])
        clock.now += cost["vectorized"] * V.shape[1]
        return forward_over_reverse(fn, theta, V)

    def loop(fn, theta, differentiable):
        products = double_backward_products(fn, theta, differentiable)

        def columns(V):
            calls["loop"].append(V.shape[1])
            clock.now += cost["loop"] * V.shape[1]
            return products(V)

        return columns

    # the operators look both up when they are built
    monkeypatch.setattr(_torch, "hvp_forward_over_reverse", vectorized)
    monkeypatch.setattr(_torch, "double_backward_products", loop)
    return clock, calls, cost


@pytest.mark.parametrize("faster", ["loop", "vectorized"])
def test_auto_times_the_first_block_once_and_keeps_the_faster_route(spied_routes, faster):
    clock, calls, cost = spied_routes
    cost["loop"] = 0.5 if faster == "loop" else 2.0
    g = torch.Generator().manual_seed(19)
    x = torch.randn(40, dtype=F64, generator=g)
    V = torch.randn(40, 40, dtype=F64, generator=g)
    expected = torch.func.hessian(quartic)(x) @ V
    H = lt.hessian(quartic, x)
    assert H.mode == FORWARD_HVP and H.route_timing is None

    assert_close(H @ V[:, :3], expected[:, :3])  # too narrow to time: vectorized
    assert clock.reads == 0 and calls == {"vectorized": [3], "loop": []}
    calls["vectorized"].clear()

    # 16 columns: the loop takes a warm-up column (its first in the process) and
    # 16 // 8 = 2 timed ones, the vectorized route the rest, in one timed call (the
    # 3 columns above were its warm-up); each column computed once
    assert_close(H @ V[:, :16], expected[:, :16])
    assert calls == {"vectorized": [13], "loop": [1, 1, 1]}
    timing = H.route_timing
    assert (timing.columns, timing.loop_columns) == (16, 2)
    assert timing.loop_seconds == 16 * cost["loop"]
    assert timing.vectorized_seconds == 16 * cost["vectorized"]
    chosen = LOOP_HVP if faster == "loop" else FORWARD_HVP
    assert H.mode == timing.chosen == chosen

    # later blocks, up to twice as wide, go to the chosen route alone, untimed
    reads = clock.reads
    calls["vectorized"].clear()
    calls["loop"].clear()
    for width in (16, 32, 5, 1):
        assert_close(H @ V[:, :width], expected[:, :width])
    assert clock.reads == reads and H.route_timing is timing
    other = "vectorized" if faster == "loop" else "loop"
    assert calls == {faster: [16, 32, 5, 1], other: []}

    # a block more than twice as wide as the timed one is timed again, now without
    # warm-ups: 4 loop columns (40 // 8, at most 4), then 36 vectorized
    cost["loop"], cost["vectorized"] = cost["vectorized"], cost["loop"]
    calls[faster].clear()
    assert_close(H @ V, expected)
    assert calls == {"vectorized": [36], "loop": [1, 1, 1, 1]}
    assert H.route_timing.columns == 40 and H.mode == (
        FORWARD_HVP if faster == "loop" else LOOP_HVP
    )


def test_auto_times_the_network_hessian_in_the_first_batch_and_uses_the_choice_for_all(
    spied_routes,
):
    clock, calls, cost = spied_routes
    cost["loop"] = 0.5
    model, X, g = small_network(frozen=False)
    y = torch.randint(0, 2, (12,), generator=g)
    loss_fn = torch.nn.CrossEntropyLoss()
    batches = [(X[:4], y[:4]), (X[4:], y[4:])]
    H = lt.hessian(model, loss_fn, batches)
    V = torch.randn(26, 8, dtype=F64, generator=g)
    assert_close(H @ V, module_loss_hessian(model, loss_fn, X, y) @ V)
    # batch 1 timed (8 columns: a warm-up and 1 timed loop column, then a warm-up and
    # 5 timed vectorized columns); batch 2 already on the loop
    assert calls == {"vectorized": [1, 5], "loop": [1, 1, 8]}
    assert H.mode == LOOP_HVP


def test_an_operator_built_again_for_the_same_problem_takes_the_route_timed_for_it(
    spied_routes,
):
    """``hessian(model, loss, batch)`` built again (every step of a training loop, every
    estimate) takes the choice of the last operator timed over the same model, loss and
    batch shapes, without timing; another batch shape, another model of the same shapes
    and a GGN of the same problem are timed on their own."""
    clock, calls, cost = spied_routes
    cost["loop"] = 0.5
    model, X, g = small_network(frozen=False)
    y = torch.randint(0, 2, (12,), generator=g)
    loss_fn = torch.nn.CrossEntropyLoss()
    V = torch.randn(26, 8, dtype=F64, generator=g)
    reference = module_loss_hessian(model, loss_fn, X, y) @ V
    first = lt.hessian(model, loss_fn, (X, y))
    assert_close(first @ V, reference)
    assert first.mode == LOOP_HVP and not first.route_timing.reused
    reads = clock.reads
    calls["vectorized"].clear()
    calls["loop"].clear()

    again = lt.hessian(model, loss_fn, (X.clone(), y.clone()))  # same shapes, new tensors
    assert again.route_timing is None  # (nothing computed yet)
    assert_close(again @ V, reference)
    assert clock.reads == reads and calls == {"vectorized": [], "loop": [8]}
    assert again.mode == LOOP_HVP and again.route_timing.reused
    assert again.route_timing.columns == first.route_timing.columns == 8

    wider = torch.randn(26, 17, dtype=F64, generator=g)  # > 2x the width timed: timed
    lt.hessian(model, loss_fn, (X, y)) @ wider
    assert clock.reads > reads

    reads = clock.reads
    lt.hessian(model, loss_fn, (X[:6], y[:6])) @ V  # another batch shape: timed
    assert clock.reads > reads

    other, _, _ = small_network(frozen=False)  # another model, the same shapes: timed
    reads = clock.reads
    lt.hessian(other, loss_fn, (X, y)) @ V
    assert clock.reads > reads

    reads = clock.reads
    lt.ggn(model, loss_fn, (X, y)) @ V  # another product of the same problem: timed
    assert clock.reads > reads


@pytest.mark.parametrize("warm", [False, True])
def test_auto_keeps_the_fallback_when_forward_mode_fails(spied_routes, warm):
    # The failure comes in the vectorized warm-up (a new process): one warning, and the
    # reverse-over-reverse HVP, warm from then on, is timed on the rest of the block. Or
    # it comes in the timed call (forward mode warm from other functions): that time holds
    # the failed attempt, so the next block is timed instead.
    from linop_trace.autodiff import _common

    clock, calls, cost = spied_routes
    if warm:
        _common.WARMED_UP.add(FORWARD_HVP)
    x = torch.linspace(-1.0, 1.0, 8, dtype=F64)
    H = lt.hessian(lambda v: _CubeWithoutJvp.apply(v).sum(), x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = H @ torch.eye(8, dtype=F64)
        assert (H.route_timing is None) == warm and H.mode == REVERSE_HVP
        second = H @ torch.eye(8, dtype=F64)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "falling back" in messages[0]
    assert_close(first, torch.diag(6 * x))
    assert_close(second, torch.diag(6 * x))
    # the (unspied) reverse-over-reverse HVP takes no fake time: it is chosen
    assert H.route_timing.columns == 8 and H.mode == REVERSE_HVP


def test_auto_keeps_the_vectorized_route_where_the_loop_fails(monkeypatch):
    from linop_trace.autodiff import _torch

    def failing(fn, theta, differentiable):
        raise RuntimeError("no double backward for this function")

    monkeypatch.setattr(_torch, "double_backward_products", failing)
    x = torch.randn(10, dtype=F64, generator=torch.Generator().manual_seed(20))
    H = lt.hessian(quartic, x)
    eye = torch.eye(10, dtype=F64)
    assert_close(H @ eye, torch.func.hessian(quartic)(x))
    assert_close(H @ eye, torch.func.hessian(quartic)(x))  # and is not timed again
    assert H.mode == FORWARD_HVP and H.route_timing is None


def test_auto_ggn_is_timed_and_matches_the_reference():
    model, X, g = small_network(frozen=False)
    y = torch.randint(0, 2, (12,), generator=g)
    G = lt.ggn(model, torch.nn.CrossEntropyLoss(), (X, y))
    assert G.mode == FORWARD_GGN and G.route_timing is None
    reference = ggn_reference(model, torch.nn.CrossEntropyLoss(), X, y)
    assert_close(G @ torch.eye(26, dtype=F64), reference)
    assert G.route_timing.columns == 26 and G.mode in (FORWARD_GGN, LOOP_GGN)


def test_invalid_modes_are_errors_that_name_the_valid_ones():
    x = torch.ones(3, dtype=F64)
    with pytest.raises(ValueError, match="'auto', 'forward', 'reverse', 'loop'.*'sideways'"):
        lt.hessian(quartic, x, mode="sideways")
    model, X, g = small_network(frozen=False)
    data = (X, torch.randn(12, 2, dtype=F64, generator=g))
    with pytest.raises(ValueError, match="'auto', 'forward', 'reverse', 'loop'.*'vmap'"):
        lt.ggn(model, torch.nn.MSELoss(), data, mode="vmap")
    # the Jacobian has no loop route
    with pytest.raises(ValueError, match=r"'auto', 'forward', 'reverse', got 'loop'"):
        lt.jacobian(lambda v: v**2, x, mode="loop")
    with pytest.raises(ValueError, match="compile=True.*mode='loop'"):
        lt.hessian(quartic, x, mode="loop", compile=True)


def test_examples_problem_has_the_backpack_architecture():
    model, loss_fn, (X, y) = digits_mlp_problem(batch_size=32)
    assert sum(p.numel() for p in model.parameters()) == 1480
    assert X.dtype == torch.float32 and X.shape == (32, 8, 8) and float(X.max()) <= 1.0
    assert np.array_equal(
        digits_mlp_problem(batch_size=32)[0][1].weight.detach().numpy(),
        model[1].weight.detach().numpy(),
    )


# ----------------------------------------------------------------- torch.compile


def test_compile_failure_falls_back_to_the_eager_product(monkeypatch):
    def broken_compile(function, *args, **kwargs):
        def compiled(*a, **k):
            raise RuntimeError("backend unavailable")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    x = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    H = lt.hessian(lambda v: (v**4).sum(), x, compile=True)
    with pytest.warns(RuntimeWarning, match="torch.compile'd"):
        dense = H.to_dense()
    assert_close(dense, torch.diag(12 * x**2))
    assert H.mode.startswith("forward-over-reverse")


@pytest.mark.slow
def test_compiled_hessian_matches_the_eager_one():
    x = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(15))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback may happen
        H = lt.hessian(quartic, x, compile=True)
        assert_close(H.to_dense(), torch.func.hessian(quartic)(x).reshape(6, 6))
    assert H.mode.startswith("torch.compile'd")


def test_complex_blocks_go_through_by_real_and_imaginary_parts():
    """A complex block on a real Hessian or Jacobian: H (Re Z) + i H (Im Z). The block was
    cast to the variables' real dtype, and the imaginary part dropped (H @ (1j v) = 0)."""
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    H = lt.hessian(lambda v: (v**4).sum() / 4, x)  # diag(3 x^2)
    Z = torch.stack(
        [torch.ones(3, dtype=torch.complex128) * (1 + 2j), torch.arange(3.0) * 1j], dim=1
    )
    dense = torch.diag(3 * x**2).to(torch.complex128)
    assert torch.allclose(H @ Z, dense @ Z)

    def f(v):
        return torch.sin(v) * v[0]

    J = lt.jacobian(f, x)
    dense_j = torch.autograd.functional.jacobian(f, x).to(torch.complex128)
    assert torch.allclose(J @ Z, dense_j @ Z)
    assert torch.allclose(J.rmatmat(Z), dense_j.T @ Z)


def test_products_leave_a_training_modules_buffers_as_they_were():
    """BatchNorm in training mode updates its running statistics at every forward pass;
    the buffers went into the products as the module's own tensors, and three products
    moved num_batches_tracked from 0 to 3."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)
    ).double()
    model.train()
    X, Y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    norm = model[1]
    before = {name: b.clone() for name, b in model.named_buffers()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (auto mode's fallback notices)
        for make in (lt.hessian, lt.ggn):
            for mode in ("loop", "auto"):
                operator = make(model, torch.nn.MSELoss(), (X, Y), mode=mode)
                for _ in range(3):
                    operator @ torch.randn(operator.shape[1], dtype=torch.float64)
    assert int(norm.num_batches_tracked) == 0
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name


def test_a_training_module_with_dropout_is_named():
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2)
    ).double()
    X, Y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    with pytest.warns(UserWarning, match="training mode with dropout"):
        lt.hessian(model.train(), torch.nn.MSELoss(), (X, Y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lt.hessian(model.eval(), torch.nn.MSELoss(), (X, Y))


@pytest.mark.parametrize("mode", ["loop", "auto", "forward"])
def test_products_under_inference_mode_are_the_products(mode):
    """torch.enable_grad does not leave torch.inference_mode: the loop route recorded no
    graph and its products were zeros (tr 0.0 for 14.25; auto then kept the loop)."""
    f = lambda v: (v**4).sum() / 12  # noqa: E731 - H = diag(v^2)
    x = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    H = lt.hessian(f, x, mode=mode)
    with torch.inference_mode():
        product = H @ torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(product, torch.diag(x**2), rtol=1e-12, atol=0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    model = model.double()
    X, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    loss = torch.nn.CrossEntropyLoss()
    references = [
        lt.trace(build(model, loss, (X, y), mode="forward"), method="exact").value
        for build in (lt.hessian, lt.ggn)
    ]
    with torch.inference_mode():
        for build, reference in zip((lt.hessian, lt.ggn), references):
            value = lt.trace(build(model, loss, (X, y), mode=mode), method="exact").value
            torch.testing.assert_close(value, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["auto", "forward", "reverse", "loop"])
def test_differentiable_network_hessian_backpropagates_to_the_parameters(mode):
    """tr(H) of a module's loss, with differentiable=True, has the gradient of the dense
    Hessian's trace with respect to the parameters (Hessian-trace regularisation). The
    parameters were detached: backward() filled no .grad (or the value had no graph)."""
    from torch.func import functional_call

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    model = model.double()
    X, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    loss = torch.nn.CrossEntropyLoss()
    parameters = dict(model.named_parameters())
    sizes = [p.numel() for p in parameters.values()]

    def loss_of(flat):
        pieces = torch.split(flat, sizes)
        shaped = {n: s.reshape(p.shape) for (n, p), s in zip(parameters.items(), pieces)}
        return loss(functional_call(model, shaped, (X,)), y)

    flat = torch.cat([p.reshape(-1) for p in parameters.values()])
    reference = torch.trace(torch.func.hessian(loss_of)(flat))
    expected = torch.autograd.grad(reference, list(parameters.values()))
    value = lt.trace(lt.hessian(model, loss, (X, y), differentiable=True, mode=mode), "exact")
    value.value.backward()
    for parameter, gradient in zip(model.parameters(), expected):
        torch.testing.assert_close(parameter.grad, gradient, rtol=1e-10, atol=1e-12)
    plain = lt.trace(lt.hessian(model, loss, (X, y), mode=mode), method="exact").value
    assert not plain.requires_grad


def test_a_one_element_output_and_an_empty_block_keep_the_vectorized_route():
    """A function returning shape (1,) passed the scalar check, but torch.func.grad
    refused it: every vectorized route failed and the operator fell back to the loop, with
    warnings that blamed the function (``mode="forward"`` raised). A block of no columns
    made vmap raise an IndexError, taken for the function's fault: a warning, and the
    slower route kept for good."""
    import warnings

    from linop_trace import ggn, hessian, jacobian

    x = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model = model.double()
    data = (torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # (a fallback warns)
        for mode in ("auto", "forward", "reverse"):
            H = hessian(lambda v: (v**3).sum().reshape(1), x, mode=mode)
            torch.testing.assert_close(H @ eye, torch.diag(6 * x))
            assert "loop" not in H.mode
        for operator in (
            hessian(model, torch.nn.CrossEntropyLoss(), data),
            hessian(model, torch.nn.CrossEntropyLoss(), data, mode="forward"),
            ggn(model, torch.nn.CrossEntropyLoss(), data),
        ):
            route = operator.mode
            assert (operator @ torch.zeros(26, 0, dtype=torch.float64)).shape == (26, 0)
            assert operator.mode == route
        J = jacobian(lambda v: v**3, x)
        assert (J @ torch.zeros(3, 0, dtype=torch.float64)).shape == (3, 0)
        torch.testing.assert_close(J @ eye, torch.diag(3 * x**2))
