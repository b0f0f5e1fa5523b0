"""Dask arrays on dask.distributed: lazy products, chunk-independent probes, one compute.

The estimates are checked against the NumPy path run on the same probe values (a NumPy
random source that draws Dask's page generator), so they agree to round-off.
"""

from __future__ import annotations

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

import array_api_compat.numpy as np_compat  # noqa: E402
import dask  # noqa: E402
import scipy.sparse as sp  # noqa: E402

import linop_trace as lt  # noqa: E402
from linop_trace._backend import RandomSource, dask_probe_block  # noqa: E402

N = 700  # rows chunked by 250: three chunks, the last one short
SEED = 3


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    with distributed.Client(cluster) as dask_client:
        yield dask_client
    cluster.close()


@pytest.fixture(scope="module")
def matrix() -> np.ndarray:
    rng = np.random.default_rng(0)
    M = rng.standard_normal((N, N)) / np.sqrt(N)
    return M + M.T + np.diag(np.linspace(1.0, 3.0, N))


def as_dask(M: np.ndarray) -> da.Array:
    return da.from_array(M, chunks=(250, N))


class _DaskProbesInNumPy(RandomSource):
    """A NumPy random source drawing the values Dask's page generator draws for the
    same seed: the NumPy path on the Dask estimate's probes."""

    def __init__(self, seed: int) -> None:
        super().__init__(np_compat, "cpu", "dask", (seed, None))

    def standard_normal(self, shape, dtype):
        return super().standard_normal(shape, dtype).compute(scheduler="sync")

    def rademacher(self, shape, dtype):
        return super().rademacher(shape, dtype).compute(scheduler="sync")

    def uniform(self, shape, dtype):
        return super().uniform(shape, dtype).compute(scheduler="sync")


class _Submissions:
    """Counts the graphs the client runs (``Client.get``: what ``dask.compute`` calls)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        original = distributed.Client.get

        def counted(client, *args, **kwargs):
            self.count += 1
            return original(client, *args, **kwargs)

        monkeypatch.setattr(distributed.Client, "get", counted)


# ------------------------------------------------------------------ operator and probes
def test_operator_keeps_dask_and_builds_a_graph(matrix):
    import array_api_compat.dask.array as dask_compat

    operator = lt.aslinearoperator(as_dask(matrix))
    assert operator.xp is dask_compat
    assert operator.shape == (N, N)
    probes = da.ones((N, 3), chunks=(250, 3))
    with dask.config.set(scheduler=_refuse_compute):  # building the product runs nothing
        image = operator.matmat(probes)
    assert isinstance(image, da.Array)
    np.testing.assert_allclose(image.compute(scheduler="sync"), matrix @ np.ones((N, 3)))


def _refuse_compute(*args, **kwargs):
    raise AssertionError("a graph was computed")


@pytest.mark.parametrize("kind", ["rademacher", "normal", "uniform"])
def test_probes_depend_on_seed_and_row_only(kind):
    n = 9000  # three pages of 4096 rows, the last one short
    blocks = [
        dask_probe_block(kind, SEED, (n, 5), 0, np.float64, chunks=chunks).compute(scheduler="sync")
        for chunks in (1000, 4096, 5000, n)
    ]
    for block in blocks[1:]:
        np.testing.assert_array_equal(block, blocks[0])
    # columns are a stream: 2 columns and then 3 are the 5 drawn at once
    first = dask_probe_block(kind, SEED, (n, 2), 0, np.float64).compute(scheduler="sync")
    then = dask_probe_block(kind, SEED, (n, 3), 2, np.float64).compute(scheduler="sync")
    np.testing.assert_array_equal(np.concatenate([first, then], axis=1), blocks[0])
    other = dask_probe_block(kind, SEED + 1, (n, 5), 0, np.float64).compute(scheduler="sync")
    assert not np.array_equal(other, blocks[0])
    if kind == "rademacher":
        assert set(np.unique(blocks[0])) == {-1.0, 1.0}


def test_probe_functions_give_dask_blocks(matrix):
    Z = lt.rademacher(as_dask(matrix), 4, seed=SEED)
    assert isinstance(Z, da.Array) and Z.shape == (N, 4)


# ------------------------------------------------------------------------- estimates
@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
def test_trace_equals_numpy_on_the_same_probes(client, matrix, method):
    estimate = lt.trace(as_dask(matrix), method=method, num_matvecs=60, seed=SEED, block_size=20)
    assert isinstance(estimate.value, da.Array)
    expected = lt.trace(
        matrix, method=method, num_matvecs=60, seed=_DaskProbesInNumPy(SEED), block_size=20
    )
    np.testing.assert_allclose(float(estimate), float(expected), rtol=1e-10)
    np.testing.assert_allclose(float(estimate.stderr.compute()), float(expected.stderr), rtol=1e-8)


def test_hutchinson_by_hand(client, matrix):
    """The NumPy path aside: the mean of z^T A z over the probes the run draws."""
    estimate = lt.trace(as_dask(matrix), method="hutchinson", num_matvecs=30, seed=SEED)
    Z = dask_probe_block("rademacher", SEED, (N, 30), 0, np.float64).compute()
    samples = np.einsum("ij,ij->j", Z, matrix @ Z)
    np.testing.assert_allclose(float(estimate), samples.mean(), rtol=1e-12)
    np.testing.assert_allclose(
        float(estimate.stderr.compute()), samples.std(ddof=1) / np.sqrt(30), rtol=1e-10
    )


@pytest.mark.parametrize("method", ["hutchinson", "diag++", "xdiag"])
def test_diagonal_equals_numpy_on_the_same_probes(client, matrix, method):
    estimate = lt.diagonal(as_dask(matrix), method=method, num_matvecs=60, seed=SEED)
    expected = lt.diagonal(matrix, method=method, num_matvecs=60, seed=_DaskProbesInNumPy(SEED))
    np.testing.assert_allclose(estimate.value.compute(), expected.value, rtol=1e-9, atol=1e-12)


def test_exact_trace_and_diagonal(client, matrix):
    A = as_dask(matrix)
    np.testing.assert_allclose(float(lt.trace(A, method="exact")), np.trace(matrix))
    np.testing.assert_allclose(lt.diagonal(A, method="exact").value.compute(), np.diag(matrix))


@pytest.mark.parametrize("quantity", ["trace", "diagonal"])
def test_one_compute_for_all_probe_blocks(client, matrix, monkeypatch, quantity):
    submissions = _Submissions(monkeypatch)
    run = lt.trace if quantity == "trace" else lt.diagonal
    estimate = run(as_dask(matrix), method="hutchinson", num_matvecs=40, seed=SEED, block_size=10)
    assert submissions.count == 1  # four probe blocks, the checks and the error: one graph
    estimate.value  # noqa: B018 - the finiteness checks were computed with it
    assert submissions.count == 1


def test_each_matrix_chunk_is_read_once(matrix):
    """Value, stderr and finiteness flags share the products: the matrix's chunks are
    loaded once for all four probe blocks (synchronous scheduler: counted in process)."""
    loads = []

    def load(block):
        if block.size:  # (not Dask's call on an empty block for the result's type)
            loads.append(block.shape)
        return block

    A = as_dask(matrix).map_blocks(load, dtype=matrix.dtype)
    with dask.config.set(scheduler="sync"):
        estimate = lt.trace(A, method="hutchinson", num_matvecs=40, seed=SEED, block_size=10)
    assert len(loads) == A.numblocks[0] * A.numblocks[1]
    np.testing.assert_allclose(
        float(estimate), float(lt.trace(matrix, "hutchinson", 40, _DaskProbesInNumPy(SEED)))
    )


@pytest.mark.parametrize("function", ["row_sums", "col_sums", "frobenius_norm_squared"])
def test_exact_sums_and_frobenius_norm_compute_their_product_once(matrix, function):
    """Their estimates' value, stderr and finiteness flags are computed in one graph, as
    the trace's are: the matrix's chunks are loaded once, and reading the value, the
    stderr and the interval loads nothing more (each read computed the product again:
    64 - 80 block computes for four reads)."""
    loads = []

    def load(block):
        if block.size:
            loads.append(block.shape)
        return block

    A = as_dask(matrix).map_blocks(load, dtype=matrix.dtype)
    options = {"num_matvecs": 20, "seed": SEED} if function == "frobenius_norm_squared" else {}
    with dask.config.set(scheduler="sync"):
        estimate = getattr(lt, function)(A, **options)
        chunks = A.numblocks[0] * A.numblocks[1]
        assert len(loads) == chunks
        for _ in range(2):
            low, high = estimate.ci()
            estimate.value.compute(), estimate.stderr.compute(), np.asarray(low)  # noqa: B018
        assert len(loads) == chunks
    if function == "frobenius_norm_squared":
        expected = lt.frobenius_norm_squared(
            matrix, probe=None, **{**options, "seed": _DaskProbesInNumPy(SEED)}
        )
        np.testing.assert_allclose(float(estimate), float(expected), rtol=1e-12)
    else:
        axis = 0 if function == "col_sums" else 1
        # a sum of N terms in another order: rounding within N eps sum |a_ij|
        bound = N * np.finfo(float).eps * np.abs(matrix).sum(axis=axis)
        error = np.abs(np.asarray(estimate.value) - matrix.sum(axis=axis))
        assert np.all(error <= bound)


def test_refine_continues_the_stream(client, matrix):
    A = as_dask(matrix)
    first = lt.trace(A, method="hutchinson", num_matvecs=20, seed=SEED)
    refined = first.refine(A, num_matvecs=20)
    whole = lt.trace(A, method="hutchinson", num_matvecs=40, seed=SEED)
    assert refined.num_matvecs == 40
    np.testing.assert_allclose(float(refined), float(whole), rtol=1e-12)


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("method", ["xnystrace", "na-hutch++"])
def test_methods_without_dask_linear_algebra_are_refused(matrix, method):
    with pytest.raises(NotImplementedError, match="Dask"):
        lt.trace(as_dask(matrix), method=method, num_matvecs=30, seed=SEED)


def test_tolerances_are_refused(matrix):
    with pytest.raises(NotImplementedError, match="Dask"):
        lt.trace(as_dask(matrix), method="hutchinson", rtol=0.1, seed=SEED)
    # refine with a tolerance too (it ran, computing the graph of every earlier round
    # again: 401 computes for one refine)
    first = lt.trace(as_dask(matrix), method="hutchinson", num_matvecs=10, seed=SEED)
    with pytest.raises(NotImplementedError, match="Dask"):
        first.refine(as_dask(matrix), rtol=0.01, max_matvecs=200)


def test_spectral_functions_are_refused_naming_dask(matrix):
    """They need eigh, which dask.array lacks: an AttributeError from inside them."""
    A = as_dask(matrix @ matrix.T + np.eye(matrix.shape[0]))
    for call in (
        lambda: lt.logdet(A, seed=SEED),
        lambda: lt.logdet(A, method="exact"),
        lambda: lt.trace_function(A, "exp", seed=SEED),
        lambda: lt.spectral_density(A, seed=SEED),
        lambda: lt.eigenvalues(A, k=2, seed=SEED),
    ):
        with pytest.raises(NotImplementedError, match="Dask"):
            call()


def test_chunks_of_other_libraries_are_refused():
    class Chunk(np.ndarray):  # not a NumPy array nor a sparse matrix as far as Dask's meta goes
        pass

    A = da.from_array(np.eye(20).view(Chunk), chunks=(10, 20), asarray=False)
    with pytest.raises(TypeError, match="NumPy chunks or sparse chunks"):
        lt.aslinearoperator(A)


def test_non_finite_products_raise_at_once(client):
    A = da.from_array(np.full((30, 30), np.nan), chunks=(10, 30))
    with pytest.raises(FloatingPointError):
        lt.trace(A, method="hutchinson", num_matvecs=4, seed=SEED)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize(
    "quantity, method",
    [("trace", m) for m in ("hutchinson", "hutch++", "xtrace", "auto")]
    + [("diagonal", m) for m in ("hutchinson", "diag++", "xdiag", "auto")],
)
def test_every_method_names_a_non_finite_product(quantity, method, bad):
    """A non-finite product raises the FloatingPointError that names it, on every method
    Dask runs. XTrace and XDiag raised SciPy's ValueError
    ("array must not contain infs or NaNs"): their solves are in the same graph as the
    products' checks, and the one ``dask.compute`` of the estimate failed in a solve
    before any check was read."""
    values = np.diag(np.linspace(1.0, 2.0, 40))
    values[3, 9] = values[9, 3] = bad
    dense = da.from_array(values, chunks=(20, 40))
    A = lt.LinearOperator.from_callable(  # (products only: auto reads no stored diagonal)
        matmat=lambda X: dense @ X, shape=(40, 40), like=dense, tags=("symmetric",)
    )
    function = getattr(lt, quantity)
    with dask.config.set(scheduler="sync"):
        with pytest.raises(FloatingPointError, match="matmat returned non-finite values"):
            function(A, method=method, num_matvecs=20, seed=SEED).value  # noqa: B018


@pytest.mark.parametrize("method", ["xtrace", "xdiag"])
def test_short_probes_checked_for_independence(method):
    """Up to 64 rows, Rademacher blocks are redrawn when dependent (Gram matrix in NumPy)."""
    rng = np.random.default_rng(1)
    M = rng.standard_normal((40, 40))
    A = da.from_array(M, chunks=(20, 40))
    run = lt.trace if method == "xtrace" else lt.diagonal
    with dask.config.set(scheduler="sync"):
        estimate = run(A, method=method, num_matvecs=20, seed=SEED)
    expected = run(M, method=method, num_matvecs=20, seed=_DaskProbesInNumPy(SEED))
    np.testing.assert_allclose(np.asarray(estimate.value), expected.value, rtol=1e-9)


# ------------------------------------------------------------------------ sparse chunks
def banded(n: int) -> sp.csr_matrix:
    """A symmetric band matrix of half-width 3 with a growing diagonal (CSR)."""
    rng = np.random.default_rng(5)
    bands = [rng.standard_normal(n - abs(k)) for k in range(-3, 4)]
    M = sp.diags(bands, list(range(-3, 4)), format="csr")
    return (M + M.T + sp.diags(np.linspace(8.0, 12.0, n))).tocsr()


def as_sparse_dask(M, chunks=(100, 50)) -> da.Array:
    return da.from_array(M, chunks=chunks, asarray=False)


def test_sparse_chunks_give_a_lazy_sparse_operator():
    import array_api_compat.dask.array as dask_compat

    M = banded(N)
    with dask.config.set(scheduler="sync"):
        operator = lt.aslinearoperator(as_sparse_dask(M))  # counts each block's entries
    assert operator.xp is dask_compat and operator.shape == (N, N)
    probes = da.from_array(np.arange(3.0 * N).reshape(N, 3), chunks=(250, 3))
    with dask.config.set(scheduler=_refuse_compute):  # the products compute nothing
        image = operator.matmat(probes)
        adjoint_image = operator.rmatmat(probes)
    assert isinstance(image, da.Array) and image.chunks[0] == (100,) * 7
    dense = M.toarray()
    with dask.config.set(scheduler="sync"):
        np.testing.assert_allclose(image.compute(), dense @ probes.compute(), rtol=1e-13)
        np.testing.assert_allclose(adjoint_image.compute(), dense.T @ probes.compute(), rtol=1e-13)
        np.testing.assert_array_equal(operator.to_dense().compute(), dense)


def test_sparse_products_meet_only_the_stored_blocks():
    """A band of half-width 3 chunked by 100 rows and 50 columns: row block i stores
    entries in column blocks 2i - 1 .. 2i + 2 only (4 of 14), so the product's tasks
    read 4 probe chunks each, not 14."""
    from linop_trace._backend._dask_sparse import nonzero_blocks

    A = lt.aslinearoperator(as_sparse_dask(banded(N)))
    pattern = nonzero_blocks(A.matrix)
    assert pattern.shape == (7, 14)
    assert pattern.sum(axis=1).tolist() == [3, 4, 4, 4, 4, 4, 3]
    for i in range(7):
        stored = np.flatnonzero(pattern[i])
        assert stored.min() >= 2 * i - 1 and stored.max() <= 2 * i + 2
    probes = da.ones((N, 2), chunks=(N, 2))
    image = A.matmat(probes)
    assert len(image.dask.layers[image.name]) == 7 + 12  # a task per row block, 12 halos
    dependencies = image.dask.get_all_dependencies()
    for i in range(7):
        read = dependencies[(image.name, i, 0)]
        blocks = [key for key in read if key[0] == A.matrix.name]
        assert len(blocks) == pattern[i].sum()  # the stored blocks only
        # the corner blocks of the band (3 of their 50 columns) read 3 probe rows, sliced
        # where the probe chunk is held; the two blocks on the diagonal, whole chunks
        halos = sorted(key for key in read if key[0].startswith("sparse-blocks-halo"))
        assert len(halos) == (1 if i in (0, 6) else 2)
        for key in halos:
            assert dask.get(image.dask, key).shape == (3, 2)
        assert len(read) == 2 * len(blocks)


def test_sparse_exact_diagonal_and_row_sums_from_the_blocks(client):
    import linop_trace._backend._dask_sparse as dask_sparse

    M = banded(N)
    A = as_sparse_dask(M, chunks=(120, 90))  # blocks that cut the diagonal unevenly
    calls = []
    original = dask_sparse.dask_sparse_matmat
    dask_sparse_matmat = lambda *args: calls.append(1) or original(*args)  # noqa: E731
    import linop_trace._backend._sparse as sparse_module

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sparse_module, "dask_sparse_matmat", dask_sparse_matmat)
        diagonal = lt.diagonal(A, method="exact")
        trace = lt.trace(A, method="exact")
    assert not calls  # no product: the blocks' own diagonals
    np.testing.assert_array_equal(diagonal.value.compute(), M.diagonal())
    np.testing.assert_allclose(float(trace), M.diagonal().sum(), rtol=1e-14)
    np.testing.assert_allclose(
        lt.row_sums(A).value.compute(), np.asarray(M.sum(axis=1)).ravel(), rtol=1e-13
    )


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
def test_sparse_trace_equals_scipy_on_the_same_probes(client, method):
    M = banded(N)
    estimate = lt.trace(as_sparse_dask(M), method=method, num_matvecs=60, seed=SEED, block_size=20)
    expected = lt.trace(
        M, method=method, num_matvecs=60, seed=_DaskProbesInNumPy(SEED), block_size=20
    )
    np.testing.assert_allclose(float(estimate), float(expected), rtol=1e-10)
    np.testing.assert_allclose(float(estimate.stderr.compute()), float(expected.stderr), rtol=1e-8)


@pytest.mark.parametrize("method", ["hutchinson", "xdiag"])
def test_sparse_diagonal_equals_scipy_on_the_same_probes(client, method):
    M = banded(N)
    estimate = lt.diagonal(as_sparse_dask(M), method=method, num_matvecs=40, seed=SEED)
    expected = lt.diagonal(M, method=method, num_matvecs=40, seed=_DaskProbesInNumPy(SEED))
    np.testing.assert_allclose(estimate.value.compute(), expected.value, rtol=1e-9, atol=1e-12)


def test_sparse_array_and_pydata_sparse_chunks():
    """scipy.sparse arrays (csr_array) and pydata ``sparse`` COO chunks give the same
    products as csr_matrix chunks (pydata's are converted to CSR block by block)."""
    M = banded(N)
    Z = np.linspace(-1.0, 1.0, 2 * N).reshape(N, 2)
    chunked = [as_sparse_dask(sp.csr_array(M))]
    try:
        import sparse as pydata_sparse
    except ImportError:
        pydata_sparse = None
    if pydata_sparse is not None:
        coo = pydata_sparse.COO.from_scipy_sparse(M)
        chunked.append(da.from_array(coo, chunks=(100, 50), asarray=False))
    for A in chunked:
        with dask.config.set(scheduler="sync"):
            image = lt.aslinearoperator(A).matmat(da.from_array(Z, chunks=(350, 2))).compute()
        np.testing.assert_allclose(image, M @ Z, rtol=1e-13)
    if pydata_sparse is None:
        pytest.skip("pydata sparse is not installed (checked csr_array only)")


# ------------------------------------------------------------------ workers and graphs
@pytest.mark.parametrize("method", ["hutchinson", "xtrace"])
def test_the_same_estimate_in_process_and_on_1_or_8_workers(method):
    """Probes depend on the seed and the row only: the estimate in this process (the
    synchronous scheduler), on one worker and on eight (threads: the count is what
    matters here; tests above run on two worker processes) agrees to round-off, for a
    matrix chunked in square blocks of 96 rows (probe pages cut across chunks)."""
    M = banded(N)
    A = as_sparse_dask(M, chunks=(96, 96))
    with dask.config.set(scheduler="sync"):
        expected = lt.trace(A, method=method, num_matvecs=24, seed=SEED)
        expected = (float(expected), float(expected.stderr.compute()))
    for workers in (1, 8):
        cluster = distributed.LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=False, dashboard_address=":0"
        )
        with distributed.Client(cluster):
            estimate = lt.trace(A, method=method, num_matvecs=24, seed=SEED)
            got = (float(estimate), float(estimate.stderr.compute()))
        cluster.close()
        np.testing.assert_allclose(got, expected, rtol=1e-12)


@pytest.mark.parametrize("chunk_rows", [100, 50])
def test_tasks_per_estimate_grow_with_chunks_and_blocks_only(chunk_rows):
    """A Hutchinson estimate's graph: at most 10 tasks per (row chunk, probe block) pair
    plus a few per block and a few in all (the probes, the product, its halos, the
    column sums and their partial sums, the finiteness checks), not a number that
    grows with rows or with the pairs of blocks (14 chunks: 341 tasks; a product over
    every pair of blocks alone would be 14 x 14 x 4 = 784)."""
    import linop_trace._backend as backend

    captured = []
    original = backend.compute_together

    def capture(arrays):
        captured.extend(arrays)
        return original(arrays)

    A = as_sparse_dask(banded(N), chunks=(chunk_rows, chunk_rows))
    chunks = A.numblocks[0]
    with pytest.MonkeyPatch.context() as patch, dask.config.set(scheduler="sync"):
        patch.setattr(backend, "compute_together", capture)
        lt.trace(A, method="hutchinson", num_matvecs=40, seed=SEED, block_size=10)
    graph: dict = {}
    for collection in dask.optimize(*captured):  # the graph dask.compute runs
        graph.update(dict(collection.__dask_graph__()))
    blocks = 4
    matrix_tasks = chunks * chunks  # the stored matrix's own (here: built) blocks
    assert len(graph) - matrix_tasks <= 10 * chunks * blocks + 10 * blocks + 20
