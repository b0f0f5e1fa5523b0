"""Exchangeable estimators (XTrace, XNysTrace, XDiag) on degenerate sketches.

Their leave-one-out algebra downdates the triangular factor R of Y = A Omega = QR. It
must stay finite and right when R is singular: an operator that is zero on the probes
or of rank below s (exact zeros in R), of rank exactly s - 1 (every downdate direction
parallel: the pairs' 1 - |c_ij|^2 vanish), and probe blocks with dependent columns
(two equal Rademacher columns, likely for short probes).
"""

from __future__ import annotations

import warnings
from typing import Any

import array_api_compat.numpy as npx
import numpy as np
import pytest
from conftest import numpy_of

import linop_trace as lt
from linop_trace._probes import MARGIN, REDRAWS, SHORT_PROBES, ProbeSampler
from linop_trace.estimators import XDiag


def _low_rank(n: int, rank: int, seed: int) -> np.ndarray:
    G = np.random.default_rng(seed).standard_normal((n, rank))
    return G @ G.T


def test_xtrace_rank_one_below_the_sketch_every_backend(backend):
    # rank(A) = s - 1 = 9: every t_i is exact (the other 9 probes capture range(A)), so the
    # deviations and the honest variance are 0 whatever the pairs, which leave 8 probes.
    # The pairs divide by 1 - |s_i^H s_j|^2 = 0 here: before the guard, a NaN stderr.
    A = _low_rank(60, 9, seed=4)
    for probe in ("sphere", "rademacher"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no division by zero on the way either
            est = lt.trace(backend.matrix(A), method="xtrace", num_matvecs=20, probe=probe, seed=2)
        assert abs(float(est) - np.trace(A)) <= 1e-10 * np.trace(A)
        stderr = float(est.stderr)
        assert np.isfinite(stderr) and 0 <= stderr <= 1e-10 * np.trace(A)
        assert np.all(np.isfinite(numpy_of(est.info["pseudo_values"])))


@pytest.mark.parametrize("noise", [1e-14, 1e-12, 1e-10, 1e-8])
def test_xtrace_numerically_rank_one_below_the_sketch(noise):
    # A = rank-29 part + noise I at s = 30: R is singular up to the noise. Every stderr is
    # finite (it was NaN through noise 1e-8, 5e-11 of the largest eigenvalue), and the
    # interval still contains the error: |error| <= stderr + round-off.
    A = _low_rank(200, 29, seed=0) + noise * np.eye(200)
    exact = np.trace(A)
    for seed in range(5):
        est = lt.trace(A, method="xtrace", num_matvecs=60, probe="rademacher", seed=seed)
        stderr = float(est.stderr)
        assert np.isfinite(stderr)
        assert abs(float(est) - exact) <= 4 * stderr + 1e-14 * exact


def _zero_on_probes_cases() -> list[tuple[str, np.ndarray]]:
    ones = np.ones((50, 50))
    sparse_diagonal = np.diag(np.r_[1.0, 2.0, 3.0, np.zeros(47)])
    return [("zero", np.zeros((50, 50))), ("all ones", ones), ("3 nonzeros", sparse_diagonal)]


@pytest.mark.parametrize("two_sided", [None, False])
def test_xdiag_with_exact_zeros_in_r_every_backend(backend, two_sided):
    # rank(A) <= 3 < s = 10 with exact zero rows in Y: R has exact zeros on its diagonal
    # (it raised LinAlgError). XDiag is exact below rank s - 1, with a zero stderr up to
    # round-off, and exactly zero on the zero operator.
    for name, A in _zero_on_probes_cases():
        op = lt.aslinearoperator(backend.matrix(A), tags=("symmetric",))
        est = lt.diagonal(op, method=XDiag(two_sided=two_sided), num_matvecs=20, seed=0)
        value, stderr = numpy_of(est.value), numpy_of(est.stderr)
        scale = max(np.abs(A).max(), 1.0)
        np.testing.assert_allclose(value, np.diag(A), rtol=0, atol=1e-13 * scale, err_msg=name)
        assert np.all(np.isfinite(stderr)) and stderr.max() <= 1e-13 * scale, name
        if name == "zero":
            assert np.all(value == 0) and np.all(stderr == 0)


def test_xtrace_and_xnystrace_with_exact_zeros_in_r():
    for name, A in _zero_on_probes_cases():
        op = lt.aslinearoperator(A, tags=("symmetric", "positive_semidefinite"))
        for method in ("xtrace", "xnystrace"):
            est = lt.trace(op, method=method, num_matvecs=20, seed=0)
            scale = max(np.trace(A), 1.0)
            assert abs(float(est) - np.trace(A)) <= 1e-13 * scale, (name, method)
            assert 0 <= float(est.stderr) <= 1e-13 * scale, (name, method)


def test_xdiag_takes_at_most_n_probes():
    # s = min(m // 2, n), like XTrace: 15 probes of length 8 cannot be independent (they
    # gave a broadcasting error); it spends 2 n = 16 columns.
    A = _low_rank(8, 8, seed=1)
    est = lt.diagonal(A, method="xdiag", num_matvecs=30, seed=0)
    assert est.num_matvecs == 16 and est.info["num_probes"] == 8
    assert np.all(np.isfinite(est.value)) and np.all(np.isfinite(est.stderr))


def _dependent(block: np.ndarray) -> bool:
    return np.linalg.matrix_rank(block) < block.shape[1]


def _sampler(backend, n: int, kind: str = "rademacher", seed: int = 0) -> ProbeSampler:
    op = lt.aslinearoperator(backend.matrix(np.eye(n)))
    return ProbeSampler(kind, n, op.xp, op.dtype, op.device, seed)


def _first_draw_dependent(sampler: ProbeSampler) -> ProbeSampler:
    """The sampler, but its first block has column 1 = -column 0 (then plain draws)."""
    plain_call = ProbeSampler.__call__
    state = {"first": True}

    def call(self, num_probes, **options):
        block = plain_call(self, num_probes, **options)
        if state.pop("first", False):
            xp = self.xp
            block = xp.concat([block[:, :1], -block[:, :1], block[:, 2:]], axis=1)
        return block

    sampler.__class__ = type("FirstDependent", (ProbeSampler,), {"__call__": call})
    return sampler


def test_independent_redraws_a_dependent_block(backend):
    # the redraw is the next block of the same stream: the seed still decides everything
    plain = _sampler(backend, 16, seed=7)
    first, second = numpy_of(plain(4)), numpy_of(plain(4))
    chosen = numpy_of(_first_draw_dependent(_sampler(backend, 16, seed=7)).independent(4))
    np.testing.assert_array_equal(chosen, second)
    assert not _dependent(chosen) and set(np.unique(chosen)) <= {-1.0, 1.0}
    # an independent first draw is kept as it is
    np.testing.assert_array_equal(numpy_of(_sampler(backend, 16, seed=7).independent(4)), first)


class _NumpyBackend:
    matrix = staticmethod(np.asarray)


def test_independent_extends_an_existing_block():
    # XTrace's adaptive growth appends blocks: a new column equal (up to sign) to an
    # existing one is drawn again, so the union stays independent
    sampler = _sampler(_NumpyBackend, 24, seed=1)
    existing = sampler(4)
    plain_call = ProbeSampler.__call__
    state = {"first": True}

    def call(self, num_probes, **options):
        block = plain_call(self, num_probes, **options)
        if state.pop("first", False):
            block[:, 2] = -existing[:, 3]
        return block

    sampler.__class__ = type("Repeats", (ProbeSampler,), {"__call__": call})
    block = sampler.independent(5, existing)
    assert not _dependent(np.concatenate([existing, block], axis=1))
    assert not state  # the dependent first block was drawn, then replaced


def test_independent_keeps_iid_draws_without_the_margin():
    # n - s < MARGIN: conditioning would bias the estimates; the dependent block is kept
    assert MARGIN == 10
    sampler = _first_draw_dependent(_sampler(_NumpyBackend, 13, seed=7))
    assert _dependent(sampler.independent(4))
    sampler = _first_draw_dependent(_sampler(_NumpyBackend, 14, seed=7))
    assert not _dependent(sampler.independent(4))


def test_independent_leaves_other_blocks_alone():
    FakeBackend = _NumpyBackend
    # continuous probes; long Rademacher probes (dependent with probability < s^2 2^-64);
    # more columns than entries (cannot be independent): the plain draw, unchanged
    for kind, n, count in [("gaussian", 8, 4), ("sphere", 8, 4), ("rademacher", 65, 4)]:
        plain = _sampler(FakeBackend, n, kind, seed=3)(count)
        np.testing.assert_array_equal(
            _sampler(FakeBackend, n, kind, seed=3).independent(count), plain
        )
    assert SHORT_PROBES == 64
    plain = _sampler(FakeBackend, 3, seed=3)(5)
    np.testing.assert_array_equal(_sampler(FakeBackend, 3, seed=3).independent(5), plain)


def test_independent_gives_up_after_redraws():
    # an existing block that is itself dependent makes every union dependent: the sampler
    # draws REDRAWS more blocks, then keeps the last one rather than looping forever
    sampler = _sampler(_NumpyBackend, 16, seed=0)
    draws = []
    plain_call = ProbeSampler.__call__

    def counting(self, num_probes, **options):
        draws.append(num_probes)
        return plain_call(self, num_probes, **options)

    sampler.__class__ = type("Counting", (ProbeSampler,), {"__call__": counting})
    block = sampler.independent(1, np.ones((16, 2)))
    assert block.shape == (16, 1) and len(draws) == REDRAWS + 1


def _orth(Y: np.ndarray) -> np.ndarray:
    U, sv, _ = np.linalg.svd(Y, full_matrices=False)
    return U[:, sv > 1e-10 * sv.max()]


def _literal_xtrace(A: np.ndarray, W: np.ndarray) -> np.ndarray:
    """t_i = tr(Q_i^T A Q_i) + x_i^T A x_i, x_i = (I - Q_i Q_i^T) w_i (Rademacher)."""
    out = []
    for i in range(W.shape[1]):
        Q = _orth(A @ np.delete(W, i, axis=1))
        x = W[:, i] - Q @ (Q.T @ W[:, i])
        out.append(np.trace(Q.T @ A @ Q) + x @ A @ x)
    return np.array(out)


def _literal_xdiag(A: np.ndarray, W: np.ndarray) -> np.ndarray:
    """mean_i diag(Q_i Q_i^T A) + w_i * (I - Q_i Q_i^T) A w_i (one-sided)."""
    out = []
    for i in range(W.shape[1]):
        Q = _orth(A @ np.delete(W, i, axis=1))
        y = A @ W[:, i]
        out.append(np.einsum("ij,ji->i", Q, Q.T @ A) + W[:, i] * (y - Q @ (Q.T @ y)))
    return np.mean(out, axis=0)


def test_estimators_use_independent_probes_on_short_operators(monkeypatch):
    # the first block of 4 probes of length 16 made dependent: the estimators draw the
    # next one, and their estimates are the literal leave-one-out of that block (with the
    # dependent one the fast downdates would depend on round-off)
    rng = np.random.default_rng(6)
    A = rng.standard_normal((16, 16))
    S = A @ A.T
    plain = ProbeSampler("rademacher", 16, npx, np.float64, "cpu", 3)
    plain(4)
    W = plain(4)
    plain_call = ProbeSampler.__call__
    for quantity, method, operator, literal in [
        ("trace", "xtrace", S, lambda M, W: np.mean(_literal_xtrace(M, W))),
        ("diagonal", "xdiag", A, _literal_xdiag),
    ]:
        state = {"first": True}

        def call(self, num_probes, state=state, **options):
            block = plain_call(self, num_probes, **options)
            if state.pop("first", False):
                block[:, 1] = block[:, 0]
            return block

        monkeypatch.setattr(ProbeSampler, "__call__", call)
        est = getattr(lt, quantity)(
            operator, method=method, num_matvecs=8, probe="rademacher", seed=3
        )
        assert not state
        np.testing.assert_allclose(numpy_of(est.value), literal(operator, W), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "quantity, method, num_matvecs",
    [("trace", "xtrace", 8), ("trace", "xnystrace", 5), ("diagonal", "xdiag", 8)],
)
def test_tiny_operators_with_rademacher_probes_never_fail(quantity, method, num_matvecs):
    # n = 8: before the redraw and the guards, 13 of 300 XTrace runs returned a NaN stderr
    # and 2 of 300 XDiag runs raised LinAlgError (equal probe columns).
    A = _low_rank(8, 8, seed=5)
    op = lt.aslinearoperator(A, tags=("symmetric", "positive_semidefinite"))
    function = getattr(lt, quantity)
    for seed in range(300):
        est = function(op, method=method, num_matvecs=num_matvecs, probe="rademacher", seed=seed)
        assert np.all(np.isfinite(est.value)) and np.all(np.isfinite(est.stderr)), seed


def test_xdiag_when_the_solve_meets_an_exact_zero_pivot():
    # 4 i.i.d. probes of length 8 (no redraw without the margin); with this seed two are
    # equal and R's round-off diagonal passes the first shift, but NumPy's LU of R^H meets
    # an exact zero pivot: the wider shift takes over (it raised LinAlgError)
    A = np.random.default_rng(5).standard_normal((8, 8))
    est = lt.diagonal(A, method="xdiag", num_matvecs=8, seed=1620)
    assert np.all(np.isfinite(est.value)) and np.all(np.isfinite(est.stderr))


def test_two_probes_give_no_error_estimate():
    # s = 2: on a diagonal operator with Rademacher probes the two leave-one-out estimates
    # are one symmetric function of the pair, so their spread (the stderr) was 0 while the
    # error is about 1 / sqrt(n) (XDiag on I, n = 200: 0.055). From s = 3 on there is one.
    eye = np.eye(200)
    for num_matvecs, has_error in [(4, False), (6, True)]:
        options = {"num_matvecs": num_matvecs, "seed": 0}
        estimates = [
            lt.diagonal(eye, method="xdiag", **options),
            lt.trace(eye, method="xtrace", probe="rademacher", **options),
            lt.trace(
                lt.aslinearoperator(eye, tags=("positive_semidefinite",)),
                method="xnystrace",
                probe="rademacher",
                num_matvecs=num_matvecs // 2,
                seed=0,
            ),
        ]
        for est in estimates:
            assert (est.stderr is not None) == has_error, (est.method, num_matvecs)
            assert (est.dof is not None) == has_error
    # adaptive XTrace from two probes still grows until the interval meets the tolerance
    A = _low_rank(300, 300, seed=2)
    est = lt.trace(A, method="xtrace", num_matvecs=4, rtol=0.05, max_matvecs=290, seed=0)
    assert est.converged is True and est.stderr is not None


def test_hutchpp_sketch_takes_at_most_n_columns():
    # num_matvecs = 20000 on n = 1: the sketch was 6667 columns; at most n columns
    # already span everything
    op = lt.LinearOperator.from_callable(
        matvec=lambda x: 2 * x, rmatvec=lambda x: 2 * x, shape=(1, 1)
    )
    est = lt.trace(op, method="hutch++", num_matvecs=20000, seed=0)
    assert est.info["sketch_size"] == 1
    assert float(est) == pytest.approx(2.0, rel=1e-12) and float(est.stderr) <= 1e-12


@pytest.mark.parametrize("method", ["na-hutch++", "xnystrace", "xtrace"])
@pytest.mark.parametrize("budget", [30, 31, 20000])
def test_sketches_compute_exactly_from_a_budget_of_n(method, budget):
    # NA-Hutch++ with both sketches of n columns took the pseudo-inverse of an n x n core
    # and missed 26 of 30 intervals (n = 60); XNysTrace's square Nystrom core missed 14 of
    # 30 in float32 by up to 23% (n = 300). n identity columns fit the budget: exact.
    rng = np.random.default_rng(0)
    B = rng.standard_normal((30, 30))
    A = B @ B.T
    calls = []
    op = lt.LinearOperator.from_callable(
        matmat=lambda X: calls.append(X.shape[1]) or A @ X,
        shape=A.shape,
        tags=("symmetric", "positive_semidefinite"),
    )
    est = lt.trace(op, method=method, num_matvecs=budget, seed=0)
    assert est.method == "exact" and est.info["requested_method"] == method
    assert est.num_matvecs == sum(calls) == 30
    assert float(est) == pytest.approx(np.trace(A), rel=1e-13) and float(est.stderr) == 0.0
    # one column short of n: the method itself (XNysTrace leaves a gap: sketch_width)
    est = lt.trace(op, method=method, num_matvecs=29, seed=0)
    assert est.method == method and est.num_matvecs <= 29


def _indefinite(n: int, seed: int) -> np.ndarray:
    """A symmetric matrix with standard normal eigenvalues (of both signs)."""
    rng = np.random.default_rng(seed)
    U = np.linalg.qr(rng.standard_normal((n, n)))[0]
    return (U * rng.standard_normal(n)) @ U.T


@pytest.mark.parametrize("adaptive", [False, True])
def test_hutchpp_with_a_sketch_of_full_rank_covers_the_trace(adaptive):
    # a sketch of n columns spans C^n: the low-rank trace tr(Q^H A Q) is tr(A) to rounding
    # and the residual samples are rounding alone (about 1e-31). Their standard error was
    # the interval's whole width, and 30 of 40 fixed-budget intervals missed tr(A) by a
    # few ulps (18 of 40 adaptive ones, whose sketch grows to n on this matrix); the
    # standard error now includes the low-rank trace's rounding, eps sqrt(n) sum |q^H A q|
    A = _indefinite(60, seed=0)
    op = lt.LinearOperator.from_callable(matmat=lambda X: A @ X, shape=A.shape)
    truth = np.trace(A)
    scale = np.abs(np.linalg.eigvalsh(A)).sum()
    for seed in range(40):
        if adaptive:
            est = lt.trace(op, method="hutch++", rtol=1e-3, max_matvecs=400, seed=seed)
        else:
            est = lt.trace(op, method="hutch++", num_matvecs=200, seed=seed)
        assert est.info["sketch_size"] == 60
        low, high = est.ci()
        assert low <= truth <= high
        assert high - low < 1e-11 * scale  # (rounding, not sampling)


@pytest.mark.parametrize("tags", [("symmetric",), ()])
def test_diagpp_with_a_sketch_of_full_rank_covers_the_diagonal(tags):
    # the same for Diag++ (two-sided on the symmetric tag, one-sided with an adjoint): the
    # low-rank diagonal is diag(A) to rounding; before its rounding entered the error bar,
    # at least one of the 60 entries missed in 30 of 30 runs (symmetric), 27 of 30 (PSD)
    A = _indefinite(60, seed=1)
    op = lt.LinearOperator.from_callable(
        matmat=lambda X: A @ X, rmatmat=lambda X: A @ X, shape=A.shape, tags=tags
    )
    scale = np.abs(A).sum(axis=1)
    for seed in range(30):
        est = lt.diagonal(op, method="diag++", num_matvecs=200, seed=seed)
        assert est.info["sketch_size"] == 60 and est.info["two_sided"] == bool(tags)
        low, high = est.ci()
        assert np.all((low <= np.diag(A)) & (np.diag(A) <= high))
        assert np.all(high - low < 1e-11 * scale)  # (rounding, not sampling)


def _low_rank_symmetric(n: int, eigenvalues: list[float], seed: int) -> np.ndarray:
    U = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, len(eigenvalues))))[0]
    return (U * np.asarray(eigenvalues)) @ U.T


@pytest.mark.parametrize(
    ("method", "case"),
    [
        ("xtrace", "rank 5, PSD"),
        ("xtrace", "rank 5, indefinite"),
        ("xtrace", "1.1 I"),
        ("xnystrace", "rank 5, PSD"),
        ("xnystrace", "1.1 I"),
    ],
)
def test_exchangeable_traces_that_capture_a_cover_the_trace(method, case):
    # s = 15 probes capture a matrix of rank 5 (and XTrace's normalization makes every t_i
    # exact on c I): every t_i is tr(A) but for rounding, and their spread alone gave
    # intervals a few ulps wide. Each case but XNysTrace's rank 5 (kept as a guard) had
    # misses before the rounding floor: XTrace on 5 - 13 of 30 seeds, XNysTrace on 1.1 I
    # on 7 of 30 (its shifted Nystrom core rounds more than the others' sums)
    n = 80
    A = {
        "rank 5, PSD": _low_rank_symmetric(n, [1.1, 1.3, 1.5, 1.7, 1.9], seed=0),
        "rank 5, indefinite": _low_rank_symmetric(n, [1.0, -1.5, 2.0, -0.7, 1.2], seed=0),
        "1.1 I": 1.1 * np.eye(n),
    }[case]
    tags = ("symmetric",) if "indefinite" in case else ("symmetric", "positive_semidefinite")
    op = lt.LinearOperator.from_callable(matmat=lambda X: A @ X, shape=A.shape, tags=tags)
    scale = np.abs(np.linalg.eigvalsh(A)).sum()
    for seed in range(30):
        est = lt.trace(op, method=method, num_matvecs=30, seed=seed)
        low, high = est.ci()
        assert low <= np.trace(A) <= high
        assert high - low < 1e-11 * scale


def test_xdiag_that_captures_a_covers_every_entry():
    # the same for XDiag's entries (rank 5 below s = 15, one- and two-sided): the entries'
    # spread was rounding alone and about 4.7% of them missed, as if by chance
    A = _low_rank_symmetric(80, [1.0, -1.5, 2.0, -0.7, 1.2], seed=0)
    for tags in [("symmetric",), ()]:
        op = lt.LinearOperator.from_callable(
            matmat=lambda X: A @ X, rmatmat=lambda X: A @ X, shape=A.shape, tags=tags
        )
        for seed in range(30):
            est = lt.diagonal(op, method="xdiag", num_matvecs=30, seed=seed)
            low, high = est.ci()
            assert np.all((low <= np.diag(A)) & (np.diag(A) <= high))
            assert np.all(high - low < 1e-11 * np.abs(A).sum(axis=1).max())


def _decaying_low_rank(n: int, rank: int, decay: float, dtype: Any) -> Any:
    """``U diag(decay^k) U^T`` of the given rank, applied through its factors, tagged."""
    U = np.linalg.qr(np.random.default_rng(7).standard_normal((n, rank)))[0].astype(dtype)
    lam = (decay ** np.arange(rank)).astype(dtype)
    return lt.LinearOperator.from_callable(
        matmat=lambda X: U @ (lam[:, None] * (U.T @ X)),
        shape=(n, n),
        dtype=dtype,
        tags=("symmetric",),
    )


@pytest.mark.parametrize(("method", "decay"), [("diag++", 0.7), ("xdiag", 0.8)])
def test_rounding_floor_leaves_float32_diagonal_errors_alone(method, decay):
    # n = 20000, rank 150: the sketch's basis is spread over the entries, |Q_k,:| near
    # sqrt(s / n). A floor sized by |(A^H Q)_k,:| alone (|Q_k,:| <= 1) made float32
    # standard errors 2.8 (Diag++) and 1.2 (XDiag) times the float64 ones, where the
    # float32 rounding present was a few percent of them (found by a review)
    estimates = {}
    for dtype in (np.float32, np.float64):
        op = _decaying_low_rank(20000, 150, decay, dtype)
        estimates[dtype] = lt.diagonal(op, method=method, num_matvecs=100, seed=3)
    se32 = np.asarray(estimates[np.float32].stderr, dtype=np.float64)
    se64 = np.asarray(estimates[np.float64].stderr)
    ratios = se32 / se64
    assert np.median(ratios) < 1.05 and np.mean(ratios > 1.05) < 0.1


def test_rounding_floor_lets_a_float32_adaptive_xtrace_stop():
    # XTrace's floor counted its low-rank trace twice (in |value| and as the shared part):
    # in float32 (n = 20000, rank 150, decay 0.8) an adaptive run at rtol = 1e-5 spent its
    # 400 columns, where float32 reaches the tolerance at 128 (found by a review)
    op = _decaying_low_rank(20000, 150, 0.8, np.float32)
    est = lt.trace(op, method="xtrace", rtol=1e-5, max_matvecs=400, seed=0)
    assert est.converged and est.num_matvecs < 400


# ------------------------------------------------------ gradients at degenerate sketches
GRADIENT_CASES = [
    ("trace", "xnystrace"),
    ("trace", "xtrace"),
    ("trace", "hutch++"),
    ("trace", "auto"),
    ("diagonal", "xdiag"),
    ("diagonal", "diag++"),
]


@pytest.mark.parametrize("library", ["jax", "torch"])
@pytest.mark.parametrize("matrix", ["zero", "ones"])
@pytest.mark.parametrize(("quantity", "method"), GRADIENT_CASES)
def test_gradients_are_finite_on_the_zero_operator_and_a_rank_one_matrix(
    quantity, method, matrix, library
):
    """The QR of a rank-deficient sketch (zero on the probes, or of rank 1: R has exact or
    round-off zeros on its diagonal) has a derivative that solves with R: torch's
    backward pass was NaN and jax.grad gave entries of 1e32 - 1e64 for Hutch++, XTrace,
    Diag++ and XDiag, and XNysTrace's eigh of a zero core was NaN. The derivative of the
    sum of every estimate is I plus the probes' noise where it exists; at these points
    (not differentiable: along E the estimate grows as the estimate of E) it must still be
    finite and far from the size of 1 / rounding: below 100. (XNysTrace on the matrix of
    ones differentiates eigh of a core whose other eigenvalues are all the shift's, and
    that derivative follows eigh's rounding: its largest entry read 2.6 - 3.0 with XLA's
    default compilation and 19.6 with JAX 0.6 at the test sessions' optimisation level
    0. A derivative free of the eigenvectors there is not built yet.)"""
    n = 100
    values = np.zeros((n, n)) if matrix == "zero" else np.ones((n, n))
    options = {"method": method, "num_matvecs": 60, "seed": 0}
    tags = ("symmetric", "positive_semidefinite")

    def total(M: Any) -> Any:
        est = getattr(lt, quantity)(lt.aslinearoperator(M, tags=tags), **options)
        return est.value if quantity == "trace" else est.value.sum()

    if library == "jax":
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)
        gradient = np.asarray(jax.grad(total)(jax.numpy.asarray(values)))
    else:
        torch = pytest.importorskip("torch")
        M = torch.tensor(values, requires_grad=True)
        total(M).backward()
        gradient = M.grad.numpy()
    assert np.all(np.isfinite(gradient))
    assert np.max(np.abs(gradient)) < 100, np.max(np.abs(gradient))


@pytest.mark.parametrize("method", ["xtrace", "hutch++"])
def test_second_derivatives_through_the_qr_rule_under_jax(method):
    """The estimate runs as the package's own compiled program, and its QR rule's
    pseudo-inverse took a traced tolerance: jax.jvp of jax.grad raised "No constant
    handler for type: DynamicJaxprTracer" (found by a review; JAX's pinv takes the
    tolerance as a static argument). E^T H E by forward-over-reverse equals the central
    difference of the gradient along E (O(h^2) plus eps |g| / h)."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    n = 30
    rng = np.random.default_rng(0)
    B = rng.standard_normal((n, n))
    M = jnp.asarray(B @ B.T / n + np.eye(n))
    E = jnp.asarray((lambda E: (E + E.T) / 2)(rng.standard_normal((n, n))))

    def along(A: Any) -> Any:  # the gradient of tr(A^2)'s estimate along E
        gradient = jax.grad(lambda A: lt.trace(A @ A, method=method, num_matvecs=12, seed=0).value)
        return jnp.sum(gradient(A) * E)

    second = float(jax.jvp(along, (M,), (E,))[1])
    h = 1e-5
    central = (float(along(M + h * E)) - float(along(M - h * E))) / (2 * h)
    assert second == pytest.approx(central, rel=1e-6)
