"""Structured operators (identity, diagonal, Kronecker, block diagonal) and the
decomposition of trace/diagonal/row_sums into exact terms and an estimated rest."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import numpy_of

import linop_trace as lt


def _spd(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((n, n))
    return G @ G.T / n + np.eye(n)


def _implicit(matrix: np.ndarray, backend) -> lt.LinearOperator:
    """An operator known only through its products (a callable over a dense matrix)."""
    held = backend.asarray(matrix)
    n = matrix.shape[0]
    return lt.LinearOperator.from_callable(matmat=lambda X: held @ X, shape=(n, n), like=held)


def _close(actual, expected, rtol=1e-10, atol=1e-10):
    np.testing.assert_allclose(numpy_of(actual), expected, rtol=rtol, atol=atol)


# ------------------------------------------------------------------- the issue's example


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_issue_example_stderr_is_that_of_the_implicit_part(probe):
    n = 500
    M = _spd(n, 0)
    H = lt.LinearOperator.from_callable(matmat=lambda X: M @ X, shape=(n, n))
    d = np.arange(1.0, n + 1)
    A = H + 1000 * lt.diagonal_operator(d)
    options = dict(method="hutchinson", probe=probe, num_matvecs=50, seed=0)
    with_split = lt.trace(A, **options)
    alone = lt.trace(H, **options)
    black_box = lt.trace(A, decompose=False, **options)
    truth = np.trace(M) + 1000 * d.sum()
    assert with_split.num_matvecs == 50
    np.testing.assert_allclose(float(with_split.stderr), float(alone.stderr), rtol=1e-12)
    assert abs(float(with_split) - truth) <= 4 * float(with_split.stderr)
    assert with_split.info["exact_terms"] == ["1000 * Diagonal 500x500"]
    np.testing.assert_allclose(float(with_split.info["exact_part"]), 1000 * d.sum())
    ratio = float(black_box.stderr) / float(with_split.stderr)
    print(f"{probe}: stderr without / with decomposition = {ratio:.4g}")
    if probe == "gaussian":  # the diagonal's 1000 * ||d|| dominates the black box
        assert ratio > 1000
    else:  # Rademacher probes see no variance from a diagonal: nothing to gain
        np.testing.assert_allclose(ratio, 1.0, rtol=1e-6)


def test_issue_example_on_every_backend(backend):
    n = 40
    M = _spd(n, 1)
    H = _implicit(M, backend)
    d = backend.asarray(np.arange(1.0, n + 1))
    A = H - 3.0 * lt.diagonal_operator(d) + 0.5 * lt.identity(n, like=d)
    options = dict(method="hutchinson", probe="gaussian", num_matvecs=12, seed=3)
    est = lt.trace(A, **options)
    alone = lt.trace(H, **options)
    exact = -3.0 * np.arange(1.0, n + 1).sum() + 0.5 * n
    assert est.num_matvecs == 12
    _close(est.stderr, numpy_of(alone.stderr))
    _close(est.value, numpy_of(alone.value) + exact, rtol=1e-12)
    assert backend.library in type(est.value).__module__ or backend.library in ("numpy", "scipy")


# ------------------------------------------------------------------------- Kronecker


def test_kronecker_trace_and_diagonal_are_exact_without_forming_it():
    rng = np.random.default_rng(0)
    A, B = rng.standard_normal((300, 300)), rng.standard_normal((400, 400))
    K = lt.kronecker(A, B)
    assert K.shape == (120_000, 120_000)
    est = lt.trace(K, method="hutchinson", num_matvecs=100, seed=0)
    assert est.num_matvecs == 0 and est.method == "exact"
    np.testing.assert_allclose(float(est), np.trace(A) * np.trace(B), rtol=1e-12)
    diag = lt.diagonal(K)
    assert diag.num_matvecs == 0
    np.testing.assert_allclose(diag.value, np.kron(np.diag(A), np.diag(B)), rtol=1e-12)
    assert float(np.max(np.abs(diag.stderr))) == 0.0


def test_kronecker_products_match_numpy_kron(backend):
    rng = np.random.default_rng(1)
    a, b, c = rng.standard_normal((3, 4)), rng.standard_normal((2, 5)), rng.standard_normal((2, 2))
    K = lt.kronecker(backend.matrix(a), backend.matrix(b), backend.matrix(c))
    dense = np.kron(np.kron(a, b), c)
    assert K.shape == dense.shape
    X = rng.standard_normal((dense.shape[1], 3))
    Y = rng.standard_normal((dense.shape[0], 2))
    _close(K @ backend.asarray(X), dense @ X)
    _close(K.H @ backend.asarray(Y), dense.T @ Y)
    _close(K @ backend.asarray(X[:, 0]), dense @ X[:, 0])
    assert K.xp is lt.aslinearoperator(backend.matrix(a)).xp


# -------------------------------------------------------------------- block diagonal


def test_block_diagonal_estimates_only_the_implicit_block(backend):
    rng = np.random.default_rng(2)
    stored = rng.standard_normal((30, 30))
    hidden = _spd(50, 3)
    implicit = _implicit(hidden, backend)
    op = lt.block_diagonal([backend.matrix(stored), implicit])
    est = lt.trace(op, method="hutchinson", num_matvecs=24, seed=0)
    assert est.num_matvecs == 24
    _close(est.info["exact_part"], np.trace(stored), rtol=1e-12)
    # zero blocks add nothing to the samples: the implicit part is hidden's own estimate
    assert abs(float(est) - np.trace(stored) - np.trace(hidden)) <= 5 * float(est.stderr)
    diag = lt.diagonal(op, method="hutchinson", num_matvecs=24, seed=0)
    assert diag.num_matvecs == 24
    _close(numpy_of(diag.value)[:30], np.diag(stored), rtol=1e-12)
    assert np.all(numpy_of(diag.stderr)[:30] == 0) and np.all(numpy_of(diag.stderr)[30:] > 0)
    rows = lt.row_sums(op)
    assert rows.num_matvecs == 1
    _close(rows.value, np.concatenate([stored.sum(1), hidden.sum(1)]))


# ----------------------------------------------------------------- rules vs the dense


def _structured_expression(backend, rng):
    """Every exact rule in one sum, with its dense matrix."""
    A = rng.standard_normal((6, 6))
    B, C = rng.standard_normal((2, 2)), rng.standard_normal((3, 3))
    d = rng.standard_normal(6)
    e = rng.standard_normal(3)
    b1 = rng.standard_normal((2, 2))
    D = lt.diagonal_operator(backend.asarray(d))
    like = backend.asarray(d)
    op = (
        2.0 * lt.identity(6, like=like)
        + D
        - 0.5 * lt.kronecker(backend.matrix(B), backend.matrix(C))
        + lt.kronecker(backend.matrix(B), lt.diagonal_operator(backend.asarray(e)))
        + lt.block_diagonal([backend.matrix(b1), 3.0 * lt.identity(4, like=like)])
        + D @ D
        + D @ lt.aslinearoperator(backend.matrix(A))
        + lt.aslinearoperator(backend.matrix(A)).T @ (2 * D)
        + lt.kronecker(backend.matrix(B), backend.matrix(C)).H
    )
    block = np.zeros((6, 6))
    block[:2, :2], block[2:, 2:] = b1, 3 * np.eye(4)
    dense = (
        2 * np.eye(6)
        + np.diag(d)
        - 0.5 * np.kron(B, C)
        + np.kron(B, np.diag(e))
        + block
        + np.diag(d * d)
        + np.diag(d) @ A
        + A.T @ (2 * np.diag(d))
        + np.kron(B, C).T
    )
    return op, dense


def test_every_rule_matches_the_dense_matrix(backend):
    rng = np.random.default_rng(4)
    op, dense = _structured_expression(backend, rng)
    _close(op.to_dense(), dense)
    est = lt.trace(op, method="hutchinson", num_matvecs=5, seed=0)
    assert est.num_matvecs == 0 and est.method == "exact"
    _close(est.value, np.trace(dense))
    diag = lt.diagonal(op, method="hutchinson", num_matvecs=5, seed=0)
    assert diag.num_matvecs == 0
    _close(diag.value, np.diag(dense))
    rows = lt.row_sums(op)
    assert rows.num_matvecs == 0
    _close(rows.value, dense.sum(axis=1))
    # the black box agrees (exactly, through the identity walk)
    _close(lt.trace(op, method="exact").value, np.trace(dense))
    assert (
        lt.trace(op, method="hutchinson", num_matvecs=5, seed=0, decompose=False).num_matvecs == 5
    )


def test_mixed_expression_estimates_one_sum_of_implicit_terms(backend):
    rng = np.random.default_rng(5)
    op, dense = _structured_expression(backend, rng)
    M1, M2 = _spd(6, 6), _spd(6, 7)
    calls = []
    first, second = _implicit(M1, backend), _implicit(M2, backend)

    def counted_product(X):
        calls.append(X.shape[1])
        return first @ X

    like = backend.asarray(np.ones(6))
    counted = lt.LinearOperator.from_callable(matmat=counted_product, shape=(6, 6), like=like)
    mixed = op + counted - 2.0 * second
    options = dict(method="hutchinson", probe="gaussian", num_matvecs=8, seed=1, block_size=4)
    est = lt.trace(mixed, **options)
    assert est.num_matvecs == 8
    assert calls == [4, 4]  # one product per probe block through the implicit sum
    implicit_only = lt.trace(counted - 2.0 * second, **options)
    _close(est.stderr, numpy_of(implicit_only.stderr))
    _close(est.value, numpy_of(implicit_only.value) + np.trace(dense), rtol=1e-12)
    _close(est.info["exact_part"], np.trace(dense))
    assert len(est.info["exact_terms"]) == 9
    diag = lt.diagonal(mixed, **options)
    implicit_diag = lt.diagonal(counted - 2.0 * second, **options)
    _close(diag.value, numpy_of(implicit_diag.value) + np.diag(dense), rtol=1e-12)
    rows = lt.row_sums(mixed)
    assert rows.num_matvecs == 1
    _close(rows.value, (dense + M1 - 2 * M2).sum(axis=1))


def test_exact_method_and_stored_expressions_keep_their_behaviour():
    rng = np.random.default_rng(8)
    M = _spd(20, 8)
    H = lt.LinearOperator.from_callable(matmat=lambda X: M @ X, shape=(20, 20))
    est = lt.trace(H + lt.identity(20), method="exact")
    assert est.num_matvecs == 20 and "exact_terms" not in est.info
    np.testing.assert_allclose(float(est), np.trace(M) + 20)
    A = rng.standard_normal((20, 20))
    plain = lt.trace(
        lt.aslinearoperator(A) + 2 * lt.aslinearoperator(A),
        method="hutchinson",
        num_matvecs=10,
        seed=0,
    )
    assert plain.num_matvecs == 10 and "exact_terms" not in plain.info


def test_refine_continues_on_the_implicit_part():
    n = 30
    M = _spd(n, 9)
    H = lt.LinearOperator.from_callable(matmat=lambda X: M @ X, shape=(n, n))
    A = H + 5.0 * lt.identity(n)
    est = lt.trace(A, method="hutchinson", num_matvecs=10, seed=0)
    more = est.refine(A, num_matvecs=10)
    assert more.num_matvecs == 20
    reference = lt.trace(H, method="hutchinson", num_matvecs=10, seed=0).refine(H, num_matvecs=10)
    np.testing.assert_allclose(float(more), float(reference) + 5 * n, rtol=1e-12)


def test_structured_constructors_check_their_input(backend):
    with pytest.raises(ValueError, match="1-d array"):
        lt.diagonal_operator(backend.asarray(np.ones((2, 2))))
    with pytest.raises(ValueError, match="non-negative int"):
        lt.identity(-1)
    with pytest.raises(TypeError, match="list of blocks"):
        lt.block_diagonal(lt.identity(2))
    with pytest.raises(ValueError, match="at least one"):
        lt.kronecker()
    eye = lt.identity(3, like=backend.asarray(np.ones(2, dtype=np.float32)))
    assert eye.xp is lt.aslinearoperator(backend.matrix(np.eye(2))).xp
    assert str(eye.dtype).endswith("float32")


# -------------------------------------------------------------------------- autodiff


def test_torch_hessian_plus_identity():
    torch = pytest.importorskip("torch")
    x = torch.linspace(-1.0, 1.0, 8, dtype=torch.float64)

    def f(v):
        return (v**4).sum() + (v[:-1] * v[1:]).sum()

    H = lt.hessian(f, x)
    est = lt.trace(H + 0.1 * lt.identity(8, like=x), method="hutchinson", num_matvecs=16, seed=0)
    truth = torch.autograd.functional.hessian(f, x).trace().item() + 0.8
    assert isinstance(est.value, torch.Tensor) and est.num_matvecs == 16
    assert abs(float(est) - truth) <= 5 * float(est.stderr) + 1e-9
    np.testing.assert_allclose(float(est.info["exact_part"]), 0.8)


def test_jax_hessian_plus_identity():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    x = jnp.linspace(-1.0, 1.0, 8)

    def f(v):
        return jnp.sum(v**4) + jnp.sum(v[:-1] * v[1:])

    H = lt.hessian(f, x)
    est = lt.trace(H + 0.1 * lt.identity(8, like=x), method="hutchinson", num_matvecs=16, seed=0)
    truth = float(jnp.trace(jax.hessian(f)(x))) + 0.8
    assert est.num_matvecs == 16
    assert abs(float(est) - truth) <= 5 * float(est.stderr) + 1e-9


def test_computes_exactly_follows_the_decomposition():
    M = _spd(10, 10)
    H = lt.LinearOperator.from_callable(matmat=lambda X: M @ X, shape=(10, 10))
    K = lt.kronecker(np.eye(3), np.ones((2, 2)))
    assert lt.computes_exactly(K, method="hutchinson")
    assert lt.computes_exactly(H + lt.identity(10), num_matvecs=10)
    assert not lt.computes_exactly(H + lt.identity(10), num_matvecs=5)
    assert not lt.computes_exactly(H + lt.identity(10), method="hutchinson", num_matvecs=50)


def test_half_precision_exact_part_is_float32():
    torch = pytest.importorskip("torch")
    d = torch.arange(1.0, 7.0, dtype=torch.float16)
    est = lt.trace(lt.diagonal_operator(d) + lt.identity(6, like=d))
    assert est.value.dtype == torch.float32 and est.num_matvecs == 0
    assert float(est) == 27.0


def _demo(capsys, *argv):
    import json

    from linop_trace.cli import main

    code = main(["demo", "--matvecs", "20", "--json", *argv])
    assert code == 0
    return json.loads(capsys.readouterr().out)


def test_cli_demo_damping_of_a_stored_matrix_is_exact(capsys):
    """``demo --problem sparse --damping c``: the Laplacian stores its diagonal and c I is
    an identity, so every method computes the trace exactly, with 0 products."""
    plain = _demo(capsys, "--problem", "sparse")
    damped = _demo(capsys, "--problem", "sparse", "--damping", "2.5")
    assert damped["exact"] == pytest.approx(plain["exact"] + 2.5 * plain["n"], rel=1e-12)
    for result in damped["results"]:
        if result["method"] == "exact":
            continue  # the reference itself: n products
        assert result["value"] == pytest.approx(damped["exact"], rel=1e-12)
        assert result["matvecs"] == 0
    # the table: each exact result's interval covers the reference (to rounding; they
    # read "covers no", their zero-width intervals 1e-16 off the reference's rounding)
    from linop_trace.cli import main

    assert main(["demo", "--matvecs", "20", "--problem", "sparse", "--damping", "0.1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    covers = [row[4] for row in rows if row and row[0] in ("hutchinson", "hutch++", "xtrace")]
    assert covers == ["yes", "yes", "yes"]


def test_cli_demo_damping_of_a_hessian_is_added_exactly(capsys):
    """``demo --problem hessian --damping c``: c I's trace is computed exactly and only the
    Hessian estimated, so every estimate (same seed and budget) is the undamped one plus
    c n, with the same products."""
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    plain = _demo(capsys, "--problem", "hessian")
    damped = _demo(capsys, "--problem", "hessian", "--damping", "0.5")
    shift = 0.5 * plain["n"]
    assert damped["exact"] == pytest.approx(plain["exact"] + shift, rel=1e-5)  # float32
    for before, after in zip(plain["results"], damped["results"], strict=True):
        if "value" not in before or before["method"] == "exact":
            continue
        assert after["value"] == pytest.approx(before["value"] + shift, rel=1e-5)
        assert after["matvecs"] == before["matvecs"] == 20


def test_torch_ggn_plus_damping():
    """A damped GGN of the digits MLP: damping * n exact, the GGN alone estimated (its
    samples are those of the undamped GGN with the same seed)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    from linop_trace.autodiff._examples import digits_mlp_problem

    model, loss_fn, data = digits_mlp_problem(batch_size=64, seed=0, dtype=torch.float64)
    G = lt.ggn(model, loss_fn, data)
    n = G.shape[0]
    damped = lt.trace(
        G + 0.01 * lt.identity(n, like=G), method="hutchinson", num_matvecs=30, seed=3
    )
    plain = lt.trace(G, method="hutchinson", num_matvecs=30, seed=3)
    assert damped.num_matvecs == 30
    assert float(damped) == pytest.approx(float(plain) + 0.01 * n, rel=1e-12)
    assert float(damped.stderr) == pytest.approx(float(plain.stderr), rel=1e-12)


def test_a_product_with_a_diagonal_factor_is_exact_alone():
    """D @ A and A @ D with a diagonal D and a stored A are exact by their rule; alone (not
    in a sum with another structured term) they ran Hutchinson: 100 products, 252186 for
    250500."""
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    L = sp.random(50, 50, density=0.1, random_state=1, format="csr") + sp.eye(50)
    d = rng.standard_normal(50)
    D = lt.diagonal_operator(d)
    dense = L.toarray()
    for expression, matrix in (
        (D @ lt.aslinearoperator(L), d[:, None] * dense),
        (lt.aslinearoperator(L) @ D, dense * d[None, :]),
    ):
        estimate = lt.trace(expression, num_matvecs=10, seed=0)
        assert estimate.num_matvecs == 0 and lt.computes_exactly(expression, num_matvecs=10)
        assert float(estimate.value) == pytest.approx(np.trace(matrix), rel=1e-12)
        np.testing.assert_allclose(lt.diagonal(expression).value, np.diag(matrix), rtol=1e-12)
