"""The ``linop-trace`` command: every format, quantity, option and bad input.

Most tests call the in-process entry point ``main([...])`` and read stdout/stderr with
``capsys``; a few run ``python -m linop_trace`` in a subprocess to check the real thing
(exit status, one-line errors, no import of torch). References are dense NumPy results.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp
from scipy import stats

import linop_trace
from linop_trace import available_methods
from linop_trace.cli import _commands, _demos, _plot, _run, _writing, main

ROOT = pathlib.Path(__file__).resolve().parents[1]
N = 40
SEED = 20260
#: Why a test of --plot skips (each one imports matplotlib first).
NO_MATPLOTLIB = "--plot needs matplotlib, which is not installed"


# ------------------------------------------------------------------------- helpers


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    assert err == ""
    return json.loads(out)


def assert_one_line_error(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("linop-trace: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_module(*argv: str, cwd: pathlib.Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "linop_trace", *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=subprocess_env(),
        timeout=300,
    )


def dense_matrix() -> np.ndarray:
    rng = np.random.default_rng(SEED)
    return rng.standard_normal((N, N)) + 3 * np.eye(N)


def sparse_matrix() -> sp.csr_array:
    values = dense_matrix()
    return sp.csr_array(np.where(np.abs(values) > 0.8, values, 0.0))


def write(path: pathlib.Path, matrix) -> pathlib.Path:
    """Write ``matrix`` in the format named by the suffix of ``path``."""
    name = path.name
    if name.endswith(".npy"):
        np.save(path, matrix.toarray() if sp.issparse(matrix) else matrix)
    elif name.endswith(".npz"):
        if sp.issparse(matrix):
            sp.save_npz(path, sp.csr_array(matrix))
        else:
            np.savez(path, matrix)
    elif name.endswith(".mtx.gz"):
        buffer = io.BytesIO()
        scipy.io.mmwrite(buffer, sp.coo_array(matrix))
        path.write_bytes(gzip.compress(buffer.getvalue()))
    elif name.endswith(".mtx"):
        scipy.io.mmwrite(path, sp.coo_array(matrix) if sp.issparse(matrix) else matrix)
    else:  # pragma: no cover
        raise AssertionError(name)
    return path


# (file name, matrix kind): every format, dense and sparse where the format has both
FORMATS = [
    ("a.npy", "dense"),
    ("a.npz", "dense"),
    ("s.npz", "sparse"),
    ("s.mtx", "sparse"),
    ("a.mtx", "dense"),
    ("s.mtx.gz", "sparse"),
]


def reference(kind: str) -> np.ndarray:
    return dense_matrix() if kind == "dense" else sparse_matrix().toarray()


@pytest.fixture
def files(tmp_path: pathlib.Path) -> dict[str, pathlib.Path]:
    made = {}
    for name, kind in FORMATS:
        matrix = dense_matrix() if kind == "dense" else sparse_matrix()
        made[name] = write(tmp_path / name, matrix)
    return made


@pytest.fixture
def dense_file(tmp_path: pathlib.Path) -> pathlib.Path:
    return write(tmp_path / "dense.npy", dense_matrix())


@pytest.fixture
def diagonal_file(tmp_path: pathlib.Path) -> pathlib.Path:
    """A diagonal matrix: Rademacher Hutchinson is exact on it (zero per-probe variance)."""
    return write(tmp_path / "diag.npy", np.diag(np.arange(1.0, N + 1.0)))


@pytest.fixture
def spd_file(tmp_path: pathlib.Path) -> pathlib.Path:
    """Symmetric positive definite with a decaying spectrum (every method applies)."""
    rng = np.random.default_rng(SEED + 1)
    basis, _ = np.linalg.qr(rng.standard_normal((N, N)))
    return write(tmp_path / "spd.npy", (basis * (1.0 / np.arange(1, N + 1))) @ basis.T)


# ------------------------------------------------------- formats x quantities (exact)


@pytest.mark.parametrize(("name", "kind"), FORMATS)
def test_trace_of_every_format(capsys, files, name, kind):
    result = run_json(capsys, "trace", files[name])
    expected = np.trace(reference(kind))
    assert result["quantity"] == "trace"
    assert result["method"] == "exact"  # auto on a stored matrix reads its diagonal
    assert result["value"] == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert result["stderr"] == 0.0
    assert result["interval"] == [result["value"], result["value"]]
    assert result["matvecs"] == 0
    assert result["n"] == N and result["shape"] == [N, N]
    assert result["converged"] is None
    assert (result["backend"], result["device"], result["dtype"]) == ("numpy", "cpu", "float64")


@pytest.mark.parametrize(("name", "kind"), FORMATS)
def test_diagonal_of_every_format(capsys, files, name, kind):
    result = run_json(capsys, "diagonal", files[name])
    np.testing.assert_allclose(result["value"], np.diag(reference(kind)), rtol=1e-12, atol=1e-12)
    assert result["stderr"] == [0.0] * N
    assert result["matvecs"] == 0


@pytest.mark.parametrize(("name", "kind"), FORMATS)
def test_rowsums_of_every_format(capsys, files, name, kind):
    result = run_json(capsys, "rowsums", files[name])
    np.testing.assert_allclose(result["value"], reference(kind).sum(axis=1), rtol=1e-12, atol=1e-12)
    assert result["method"] == "exact" and result["matvecs"] == 1


def test_rowsums_of_a_rectangular_matrix(capsys, tmp_path):
    matrix = dense_matrix()[:, :25]
    result = run_json(capsys, "rowsums", write(tmp_path / "r.npy", matrix))
    np.testing.assert_allclose(result["value"], matrix.sum(axis=1), rtol=1e-12)
    assert result["shape"] == [N, 25]


def test_integer_matrix_market_is_promoted_to_float64(capsys, tmp_path):
    path = tmp_path / "int.mtx"
    scipy.io.mmwrite(path, sp.coo_array(np.array([[2, -1], [-1, 3]])), field="integer")
    result = run_json(capsys, "trace", path)
    assert result["value"] == 5.0 and result["dtype"] == "float64"


def test_complex_matrix(capsys, tmp_path):
    matrix = dense_matrix() + 1j * np.eye(N)
    result = run_json(capsys, "trace", write(tmp_path / "c.npy", matrix))
    assert result["dtype"] == "complex128"
    assert result["value"]["real"] == pytest.approx(np.trace(matrix).real, rel=1e-12)
    assert result["value"]["imag"] == pytest.approx(N, rel=1e-12)
    assert result["interval"] is None  # no real interval for a complex value


def test_text_output_names_the_result(capsys, dense_file):
    code, out, err = run(capsys, "trace", dense_file)
    assert code == 0 and err == ""
    assert f"trace   {np.trace(dense_matrix()):.10g}" in out
    assert "method  exact (0 matvecs)" in out
    code, out, _ = run(capsys, "diagonal", dense_file)
    assert code == 0
    assert f"{N - 10} more; --output" in out
    assert f"       0  {dense_matrix()[0, 0]:.10g}" in out


def test_seconds_time_the_estimate(capsys, monkeypatch, dense_file):
    # a clock that says 2.5 s passed between the start and the end of the estimate
    ticks = iter([100.0, 102.5])
    monkeypatch.setattr(_commands.time, "perf_counter", lambda: next(ticks))
    result = run_json(capsys, "trace", dense_file)
    assert result["seconds"] == 2.5


@pytest.mark.parametrize("quantity", ["trace", "diagonal"])
def test_exact_results_report_no_seed(capsys, dense_file, quantity):
    # JSON keeps the key (the schema of trace/diagonal) with null: no randomness ran
    result = run_json(capsys, quantity, dense_file)
    assert result["method"] == "exact" and result["seed"] is None
    assert run_json(capsys, quantity, dense_file, "--seed", "5")["seed"] is None
    randomized = run_json(
        capsys, quantity, dense_file, "--method", "hutchinson", "--matvecs", "10", "--seed", "5"
    )
    assert randomized["seed"] == 5


def test_complex_results_say_why_they_have_no_interval(capsys, tmp_path):
    matrix = dense_matrix() + 1j * np.eye(N)
    path = write(tmp_path / "c.npy", matrix)
    argv = ("--method", "hutchinson", "--matvecs", "20", "--seed", "0")
    code, out, err = run(capsys, "trace", path, *argv)
    assert code == 0 and err == ""
    reason = "none for complex value: stderr is of the modulus |error|, not of each part"
    assert f"95% CI  {reason}" in out.splitlines()
    # what the line says is what the library does: no interval, stderr of |error|
    estimate = linop_trace.trace(matrix, method="hutchinson", num_matvecs=20, seed=0)
    with pytest.raises(ValueError, match="complex"):
        estimate.ci()
    samples = np.asarray(estimate.info["samples"])
    modulus = np.sqrt(np.sum(np.abs(samples - samples.mean()) ** 2) / (19 * 20))
    assert float(estimate.stderr) == pytest.approx(modulus, rel=1e-12)
    code, out, err = run(capsys, "diagonal", path, *argv)
    assert code == 0
    assert "95% CI  none for complex values: stderr is of the modulus |error|" in out
    assert "diagonal (entry, value):" in out.splitlines()  # no interval column promised


def test_unused_estimation_options_on_a_stored_matrix_are_reported(capsys, dense_file):
    code, out, err = run(capsys, "trace", dense_file, "--matvecs", "50")
    assert code == 0 and err == ""
    assert "note    exact: the stored diagonal was read (--matvecs unused)" in out.splitlines()
    result = run_json(capsys, "diagonal", dense_file, "--matvecs", "50", "--seed", "1")
    assert result["note"] == "exact: the stored diagonal was read (--matvecs, --seed unused)"
    assert "note" not in run_json(capsys, "trace", dense_file)  # nothing given, nothing unused
    randomized = run(capsys, "trace", dense_file, "--method", "hutchinson", "--matvecs", "20")
    assert "note" not in randomized[1]


# ---------------------------------------------------------------- randomized methods


def test_hutchinson_is_exact_on_a_diagonal_matrix(capsys, diagonal_file):
    result = run_json(
        capsys, "trace", diagonal_file, "--method", "hutchinson", "--matvecs", "30", "--seed", "1"
    )
    assert result["method"] == "hutchinson"
    assert result["value"] == pytest.approx(N * (N + 1) / 2, rel=1e-14)
    assert result["stderr"] == pytest.approx(0.0, abs=1e-9)
    assert result["matvecs"] == 30 and result["seed"] == 1


def test_hutchinson_fields_match_the_library_and_the_t_interval(capsys, dense_file):
    result = run_json(
        capsys,
        "trace",
        dense_file,
        "--method",
        "hutchinson",
        "--matvecs",
        "50",
        "--seed",
        "7",
        "--confidence",
        "0.9",
    )
    direct = linop_trace.trace(dense_matrix(), method="hutchinson", num_matvecs=50, seed=7)
    assert result["value"] == float(direct.value)
    assert result["stderr"] == float(direct.stderr)
    assert result["interval"] == pytest.approx(list(direct.ci(0.9)), rel=1e-12)
    assert result["interval"][0] < result["value"] < result["interval"][1]
    assert result["confidence"] == 0.9


def test_seed_is_reported_and_reproduces_the_run(capsys, dense_file):
    first = run_json(capsys, "trace", dense_file, "--method", "hutchinson", "--matvecs", "20")
    again = run_json(
        capsys,
        "trace",
        dense_file,
        "--method",
        "hutchinson",
        "--matvecs",
        "20",
        "--seed",
        str(first["seed"]),
    )
    assert again["value"] == first["value"]


TRACE_METHODS = [m for m in available_methods("trace") if m not in ("exact", "auto")]
DIAGONAL_METHODS = [m for m in available_methods("diagonal") if m not in ("exact", "auto")]


@pytest.mark.parametrize("method", TRACE_METHODS)
def test_every_registered_trace_method(capsys, spd_file, method):
    result = run_json(
        capsys, "trace", spd_file, "--method", method, "--matvecs", "24", "--seed", "3"
    )
    direct = linop_trace.trace(np.load(spd_file), method=method, num_matvecs=24, seed=3)
    assert result["method"] == direct.method
    assert result["value"] == pytest.approx(float(direct.value), rel=1e-12)
    assert result["matvecs"] == direct.num_matvecs <= 24
    exact = np.trace(np.load(spd_file))
    if result["stderr"] is not None:
        # a fixed seed: the estimate sits within 5 of its own standard errors of the truth
        assert abs(result["value"] - exact) <= 5 * result["stderr"] + 1e-10 * exact


@pytest.mark.parametrize("method", DIAGONAL_METHODS)
def test_every_registered_diagonal_method(capsys, spd_file, method):
    result = run_json(
        capsys, "diagonal", spd_file, "--method", method, "--matvecs", "24", "--seed", "3"
    )
    direct = linop_trace.diagonal(np.load(spd_file), method=method, num_matvecs=24, seed=3)
    np.testing.assert_allclose(result["value"], np.asarray(direct.value), rtol=1e-12, atol=1e-15)
    assert result["matvecs"] == direct.num_matvecs <= 24


def test_rtol_converges_and_reports_it(capsys, dense_file):
    result = run_json(
        capsys, "trace", dense_file, "--method", "hutchinson", "--rtol", "0.5", "--seed", "0"
    )
    assert result["converged"] is True
    half = (result["interval"][1] - result["interval"][0]) / 2
    assert half <= 0.5 * abs(result["value"])


def test_tolerance_not_met_within_the_cap(capsys, dense_file):
    result = run_json(
        capsys,
        "trace",
        dense_file,
        "--method",
        "hutchinson",
        "--atol",
        "1e-6",
        "--max-matvecs",
        "60",
        "--seed",
        "0",
    )
    assert result["converged"] is False
    assert result["matvecs"] == 60


def test_atol_with_confidence(capsys, diagonal_file):
    # zero variance: the first block already meets any tolerance
    result = run_json(
        capsys,
        "trace",
        diagonal_file,
        "--method",
        "hutchinson",
        "--atol",
        "1e-3",
        "--confidence",
        "0.99",
        "--seed",
        "0",
    )
    assert result["converged"] is True and result["confidence"] == 0.99


def test_block_size_is_passed_through(capsys, dense_file):
    result = run_json(
        capsys,
        "trace",
        dense_file,
        "--method",
        "hutchinson",
        "--matvecs",
        "30",
        "--seed",
        "2",
        "--block-size",
        "7",
    )
    direct = linop_trace.trace(
        dense_matrix(), method="hutchinson", num_matvecs=30, seed=2, block_size=7
    )
    assert result["value"] == float(direct.value) and result["matvecs"] == 30


def test_confidence_steers_adaptive_stopping(capsys, dense_file):
    # a wider interval (99%) needs more probes to meet the same atol (1280 against 640)
    common = ("--method", "hutchinson", "--matvecs", "10", "--atol", "4", "--seed", "0")
    caps = ("--max-matvecs", "2000")
    wide = run_json(capsys, "trace", dense_file, *common, *caps, "--confidence", "0.99")
    usual = run_json(capsys, "trace", dense_file, *common, *caps)
    direct = linop_trace.trace(
        dense_matrix(),
        method="hutchinson",
        num_matvecs=10,
        atol=4.0,
        confidence=0.99,
        max_matvecs=2000,
        seed=0,
    )
    assert wide["matvecs"] == direct.num_matvecs > usual["matvecs"]
    assert wide["confidence"] == 0.99 and wide["value"] == float(direct.value)


def test_gaussian_probe_option(capsys, dense_file):
    result = run_json(
        capsys,
        "trace",
        dense_file,
        "--method",
        "hutchinson",
        "--probe",
        "gaussian",
        "--seed",
        "4",
        "--matvecs",
        "20",
    )
    direct = linop_trace.trace(
        dense_matrix(), method="hutchinson", probe="gaussian", num_matvecs=20, seed=4
    )
    assert result["value"] == float(direct.value)


def test_dtype_float32(capsys, dense_file):
    result = run_json(capsys, "trace", dense_file, "--dtype", "float32")
    assert result["dtype"] == "float32"
    assert result["value"] == pytest.approx(np.trace(dense_matrix()), rel=1e-5)


# --------------------------------------------------------------------------- backends


@pytest.mark.parametrize("library", ["torch", "jax"])
def test_backends_exact_and_randomized(capsys, files, diagonal_file, library):
    pytest.importorskip(library, reason=f"{library} is not installed")
    for name, kind in (("a.npy", "dense"), ("s.mtx", "sparse")):
        result = run_json(capsys, "trace", files[name], "--backend", library, "--device", "cpu")
        assert result["backend"] == library and result["dtype"] == "float64"
        assert "cpu" in result["device"].lower()
        assert result["value"] == pytest.approx(np.trace(reference(kind)), rel=1e-12)
        rows = run_json(capsys, "rowsums", files[name], "--backend", library)
        np.testing.assert_allclose(
            rows["value"], reference(kind).sum(axis=1), rtol=1e-12, atol=1e-12
        )
    result = run_json(
        capsys,
        "trace",
        diagonal_file,
        "--backend",
        library,
        "--method",
        "hutchinson",
        "--matvecs",
        "16",
        "--seed",
        "0",
    )
    assert result["value"] == pytest.approx(N * (N + 1) / 2, rel=1e-12)
    result = run_json(
        capsys, "diagonal", files["s.npz"], "--backend", library, "--dtype", "float32"
    )
    assert result["dtype"] == "float32"
    np.testing.assert_allclose(result["value"], np.diag(reference("sparse")), rtol=1e-6)


# --------------------------------------------------------------------------- --threads


def pool_sizes() -> dict[str, int]:
    """Threads of each BLAS and OpenMP pool loaded in this process, as seen by this thread."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    return {
        f"{pool['internal_api']} {pool['filepath']}": pool["num_threads"]
        for pool in threadpoolctl.threadpool_info()
    }


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("threads", [None, 1, 2])
def test_threads_caps_the_pools_the_estimate_runs_in(
    capsys, monkeypatch, dense_file, library, threads
):
    """Inside the estimate (a worker thread) every BLAS and OpenMP pool, and torch's, has
    ``--threads`` threads; without the option they are the libraries' own. Afterwards
    they are as before."""
    torch = pytest.importorskip(library) if library == "torch" else None
    seen = {}
    real_trace = _commands.trace

    def watched_trace(A, **options):
        seen["pools"] = pool_sizes()
        seen["torch"] = None if torch is None else torch.get_num_threads()
        return real_trace(A, **options)

    monkeypatch.setattr(_commands, "trace", watched_trace)
    import scipy.linalg  # noqa: F401 - its BLAS is loaded before the run, as --threads does

    before = pool_sizes()
    torch_before = None if torch is None else torch.get_num_threads()
    argv = ["trace", dense_file, "--method", "hutchinson", "--matvecs", "20", "--seed", "0"]
    if threads is not None:
        argv += ["--threads", str(threads)]
    result = run_json(capsys, *argv, "--backend", library)
    assert result["threads"] == threads
    assert seen["pools"], "no BLAS pool was loaded"
    if threads is None:
        assert {name: before[name] for name in seen["pools"]} == seen["pools"]
        assert seen["torch"] == torch_before
    else:
        assert set(seen["pools"].values()) == {threads}, seen["pools"]
        assert seen["torch"] in (None, threads)
    assert pool_sizes() == before
    if torch is not None:
        assert torch.get_num_threads() == torch_before


def test_threads_is_on_every_command_that_computes(capsys, dense_file):
    for argv in (["trace", dense_file], ["diagonal", dense_file], ["rowsums", dense_file]):
        assert run_json(capsys, *argv, "--threads", "1")["threads"] == 1
    demo = run_json(capsys, "demo", "--problem", "sparse", "--matvecs", "10", "--threads", "1")
    assert demo["threads"] == 1
    assert_one_line_error(
        *run(capsys, "trace", dense_file, "--threads", "0"), "--threads", "positive integer"
    )


# ---------------------------------------------------------------- --output and --plot


@pytest.mark.parametrize("quantity", ["diagonal", "rowsums"])
def test_output_npy_and_csv(capsys, tmp_path, dense_file, quantity):
    expected = np.diag(dense_matrix()) if quantity == "diagonal" else dense_matrix().sum(axis=1)
    npy, csv = tmp_path / "out.npy", tmp_path / "out.csv"
    result = run_json(capsys, quantity, dense_file, "--output", npy)
    assert result["output"] == str(npy)
    np.testing.assert_allclose(np.load(npy), expected, rtol=1e-12)
    code, out, err = run(capsys, quantity, dense_file, "--output", csv)
    assert code == 0 and f"output  {csv} ({N} entries)" in out
    table = np.genfromtxt(csv, delimiter=",", names=True)
    assert table.dtype.names == ("index", "value", "stderr", "low", "high")
    np.testing.assert_array_equal(table["index"], np.arange(N))
    np.testing.assert_array_equal(table["value"], np.load(npy))  # repr() round-trips floats
    np.testing.assert_array_equal(table["stderr"], 0.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.npy", "out.csv", "out.npy"]


def test_output_csv_holds_the_randomized_interval(capsys, tmp_path, dense_file):
    csv = tmp_path / "d.csv"
    result = run_json(
        capsys,
        "diagonal",
        dense_file,
        "--method",
        "hutchinson",
        "--matvecs",
        "30",
        "--seed",
        "5",
        "--output",
        csv,
    )
    assert result["output"] == str(csv)
    direct = linop_trace.diagonal(dense_matrix(), method="hutchinson", num_matvecs=30, seed=5)
    low, high = direct.ci(0.95)
    table = np.genfromtxt(csv, delimiter=",", names=True)
    np.testing.assert_allclose(table["value"], np.asarray(direct.value), rtol=1e-15)
    np.testing.assert_allclose(table["stderr"], np.asarray(direct.stderr), rtol=1e-15)
    np.testing.assert_allclose(table["low"], low, rtol=1e-15)
    np.testing.assert_allclose(table["high"], high, rtol=1e-15)


@pytest.mark.parametrize("quantity", ["diagonal", "rowsums"])
@pytest.mark.parametrize("suffix", [".npy", ".csv"])
def test_json_with_output_names_the_file_instead_of_the_vector(
    capsys, tmp_path, dense_file, quantity, suffix
):
    target = tmp_path / f"out{suffix}"
    code, out, err = run(capsys, quantity, dense_file, "--output", target, "--json")
    assert code == 0 and err == ""
    result = json.loads(out)
    assert result["output"] == str(target) and target.exists()
    assert not {"value", "stderr", "interval"} & result.keys(), result
    # the text output names the file and shows no entries either
    code, out, err = run(capsys, quantity, dense_file, "--output", target)
    assert f"output  {target} ({N} entries)" in out
    assert f"{dense_matrix()[0, 0]:.10g}" not in out and "more; --output" not in out


def test_failed_run_leaves_no_output_and_keeps_an_old_file(capsys, tmp_path):
    bad = tmp_path / "nan.npy"
    values = dense_matrix()
    values[2, 3] = np.nan
    np.save(bad, values)
    target = tmp_path / "out.npy"
    assert_one_line_error(*run(capsys, "diagonal", bad, "--output", target), "non-finite")
    assert not target.exists()
    target.write_bytes(b"old")
    assert_one_line_error(*run(capsys, "diagonal", bad, "--output", target), "NaN")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.npy", "out.npy"]


def test_staged_file_removes_the_temporary_on_error(tmp_path):
    target = tmp_path / "x.npy"
    staged = _writing.Staged()
    with pytest.raises(RuntimeError):
        try:
            with staged.open(target) as handle:
                handle.write(b"partial")
                raise RuntimeError("disk full")
        finally:
            staged.discard()
    assert list(tmp_path.iterdir()) == []
    with staged.open(target) as handle:
        handle.write(b"whole")
    staged.commit()
    assert target.read_bytes() == b"whole"
    assert list(tmp_path.iterdir()) == [target]


def is_png(path: pathlib.Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "argv",
    [
        ["trace", "--method", "hutchinson", "--matvecs", "40"],  # running mean of the samples
        *[["trace", "--method", m, "--matvecs", "30"] for m in TRACE_METHODS if m != "hutchinson"],
        ["diagonal", "--method", "hutchinson", "--matvecs", "30"],  # successive budgets
        ["trace"],  # auto on a stored matrix: exact, a line at the value
        ["diagonal"],  # auto, exact: the diagonal against its index
    ],
)
def test_plot_writes_a_png(capsys, tmp_path, spd_file, argv):
    pytest.importorskip("matplotlib", reason=NO_MATPLOTLIB)
    plot = tmp_path / "run.png"
    result = run_json(capsys, argv[0], spd_file, *argv[1:], "--seed", "0", "--plot", plot)
    assert result["plot"] == str(plot)
    assert is_png(plot)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.png", "spd.npy"]


def test_plot_of_an_exact_trace_is_a_line_at_the_value(capsys, tmp_path, monkeypatch, spd_file):
    pytest.importorskip("matplotlib", reason=NO_MATPLOTLIB)
    from matplotlib.figure import Figure

    saved = []
    savefig = Figure.savefig

    def keep(figure, *args, **kwargs):
        saved.append(figure)
        return savefig(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    result = run_json(capsys, "trace", spd_file, "--plot", tmp_path / "p.png")
    assert result["method"] == "exact" and result["matvecs"] == 0  # auto, stored diagonal
    (axes,) = saved[0].axes
    (line,) = axes.get_lines()  # one horizontal line, no dot at 0 matvecs
    assert line.get_marker() in ("None", None, "")
    np.testing.assert_allclose(line.get_ydata(), result["value"], rtol=1e-15)
    assert line.get_label().startswith("exact trace = ")
    assert "read from the stored diagonal, 0 matvecs" in line.get_label()
    assert "matvecs (operator applications)" not in axes.get_xlabel()
    assert len(axes.get_xticks()) == 0


def test_sample_curve_is_the_running_mean_with_the_librarys_interval():
    estimate = linop_trace.trace(dense_matrix(), method="hutchinson", num_matvecs=25, seed=9)
    count, running, low, high = _plot.sample_curve(estimate, 0.95)
    assert list(count) == list(range(2, 26))  # every count while they are few
    assert running[-1] == pytest.approx(float(estimate.value), rel=1e-13)
    samples = np.asarray(estimate.info["samples"])
    assert running[8] == pytest.approx(samples[:10].mean(), rel=1e-13)
    # Hutchinson's estimate from the first 10 samples reports this interval
    first = linop_trace.trace(dense_matrix(), method="hutchinson", num_matvecs=10, seed=9)
    np.testing.assert_allclose(samples[:10], np.asarray(first.info["samples"]), rtol=1e-13)
    assert (low[8], high[8]) == pytest.approx(first.ci(0.95), rel=1e-12)
    # shape-corrected: not the plain Student-t half-width of those samples
    plain = stats.t.ppf(0.975, 9) * samples[:10].std(ddof=1) / np.sqrt(10)
    assert abs((high[8] - running[8]) / plain - 1) > 1e-6


@pytest.mark.parametrize("confidence", [0.9, 0.95])
def test_sample_curve_band_ends_at_the_reported_interval(confidence):
    """The plotted band and the reported interval are one computation: the last point of
    the band is ``Estimate.ci`` (Student-t, shape-corrected), for a long run too."""
    rng = np.random.default_rng(4)
    skewed = np.diag(rng.exponential(size=300) ** 3)  # skewed samples: a visible correction
    operator = linop_trace.LinearOperator.from_callable(
        matvec=lambda x: skewed @ x, shape=skewed.shape
    )
    estimate = linop_trace.trace(
        operator, method="hutchinson", num_matvecs=500, seed=2, probe="gaussian"
    )
    count, running, low, high = _plot.sample_curve(estimate, confidence)
    assert count[-1] == 500 and len(count) <= _plot.CURVE_POINTS
    assert running[-1] == pytest.approx(float(estimate.value), rel=1e-12)
    assert (low[-1], high[-1]) == pytest.approx(estimate.ci(confidence), rel=1e-12)
    samples = np.asarray(estimate.info["samples"])
    plain = stats.t.ppf(0.5 + confidence / 2, 499) * samples.std(ddof=1) / np.sqrt(500)
    assert (high[-1] - running[-1]) / plain > 1 + 1e-4  # the correction widened it


# --------------------------------------------------------------- progress, quiet, debug


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal_and_not_with_quiet():
    assert _run.progress_wanted(False, FakeTerminal()) is True
    assert _run.progress_wanted(True, FakeTerminal()) is False
    assert _run.progress_wanted(False, io.StringIO()) is False


def test_progress_bar_counts_matvecs_and_keeps_the_result(monkeypatch):
    pytest.importorskip("tqdm")
    monkeypatch.setattr(_run, "PROGRESS_DELAY", 0)
    stream = FakeTerminal()
    operator = linop_trace.aslinearoperator(dense_matrix())
    with _run.progress(operator, 30, True, "trace", stream) as watched:
        estimate = linop_trace.trace(
            watched, method="hutchinson", num_matvecs=30, seed=1, block_size=10
        )
        exact = linop_trace.trace(watched, method="exact")
    direct = linop_trace.trace(
        dense_matrix(), method="hutchinson", num_matvecs=30, seed=1, block_size=10
    )
    assert float(estimate.value) == float(direct.value)
    assert exact.num_matvecs == 0  # the stored diagonal survives the wrapper
    assert watched.columns == 30  # every column went past the bar
    assert "/30" in stream.getvalue() and "matvec" in stream.getvalue()


def test_a_shown_progress_bar_does_not_change_a_seeded_estimate(capsys, monkeypatch, dense_file):
    pytest.importorskip("tqdm")
    argv = [
        "trace",
        dense_file,
        "--method",
        "hutchinson",
        "--matvecs",
        "40",
        "--seed",
        "8",
        "--json",
    ]
    plain = json.loads(run(capsys, *argv)[1])
    monkeypatch.setattr(_run, "progress_wanted", lambda quiet, stream=None: not quiet)
    monkeypatch.setattr(_run, "PROGRESS_DELAY", 0)
    code, out, err = run(capsys, *argv)
    assert code == 0 and "matvec" in err  # the bar was drawn (on the captured stderr)
    assert json.loads(out)["value"] == plain["value"]
    code, out, err = run(capsys, *argv, "--quiet")
    assert code == 0 and err == ""
    # the exact path of an operator without a stored diagonal moves in steps
    assert _run.exact_block_for_progress(1480) == 60


def test_quiet_run_writes_nothing_to_stderr(capsys, dense_file):
    code, out, err = run(
        capsys, "trace", dense_file, "--quiet", "--method", "hutchinson", "--seed", "0"
    )
    assert code == 0 and err == "" and "hutchinson" in out


def test_debug_shows_the_traceback(capsys, dense_file):
    code, out, err = run(capsys, "trace", dense_file, "--method", "no-such-method", "--debug")
    assert code == 2
    assert "Traceback" in err
    assert err.splitlines()[-1].startswith("linop-trace: error: unknown method 'no-such-method'")


# ------------------------------------------------------------------------- bad input


def corrupt_files(tmp_path: pathlib.Path) -> dict[str, pathlib.Path]:
    paths = {}
    for name, payload in [
        ("junk.npy", b"not numpy at all"),
        ("junk.npz", b"PK\x03\x04 broken zip"),
        ("junk.mtx", b"hello\n"),
        ("junk.mtx.gz", b"\x1f\x8b\x08 truncated gzip"),
        ("short.mtx", b"%%MatrixMarket matrix coordinate real general\n3 3 2\n1 1 1.0\n"),
    ]:
        paths[name] = tmp_path / name
        paths[name].write_bytes(payload)
    return paths


@pytest.mark.parametrize("name", ["junk.npy", "junk.npz", "junk.mtx", "junk.mtx.gz", "short.mtx"])
def test_corrupt_file(capsys, tmp_path, name):
    path = corrupt_files(tmp_path)[name]
    assert_one_line_error(*run(capsys, "trace", path), str(path), "not a readable")


def test_missing_file(capsys, tmp_path):
    path = tmp_path / "nowhere.npy"
    assert_one_line_error(*run(capsys, "trace", path), str(path), "no such file")


def test_directory_instead_of_a_file(capsys, tmp_path):
    assert_one_line_error(*run(capsys, "rowsums", tmp_path), "is a directory")


@pytest.mark.parametrize("name", ["matrix.txt", "matrix.csv", "matrix"])
def test_unknown_format(capsys, tmp_path, name):
    path = tmp_path / name
    path.write_text("1 2\n3 4\n")
    assert_one_line_error(
        *run(capsys, "trace", path), "unknown format", ".npy, .npz, .mtx, .mtx.gz"
    )


@pytest.mark.parametrize("quantity", ["trace", "diagonal"])
@pytest.mark.parametrize("suffix", [".npy", ".mtx"])
def test_non_square_matrix(capsys, tmp_path, quantity, suffix):
    path = write(tmp_path / f"rect{suffix}", dense_matrix()[:, :7])
    assert_one_line_error(
        *run(capsys, quantity, path), f"{quantity} needs a square matrix", f"({N}, 7)"
    )


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".mtx"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_entries(capsys, tmp_path, suffix, bad):
    values = sparse_matrix()
    values.data[[3, 8]] = bad
    path = write(tmp_path / f"nan{suffix}", values)
    assert_one_line_error(*run(capsys, "trace", path), "2 non-finite entries (NaN or inf)")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (np.arange(5.0), "expected a 2-d matrix"),
        (np.array([["a", "b"], ["c", "d"]]), "expected numeric entries"),
    ],
)
def test_not_a_numeric_matrix(capsys, tmp_path, content, needle):
    path = tmp_path / "odd.npy"
    np.save(path, content)
    assert_one_line_error(*run(capsys, "trace", path), needle)


def test_a_file_named_npz_that_is_no_zip_archive_is_named_so(capsys, tmp_path):
    """A text file named .npz was refused as "pickled (object) data" (pointing at unsafe
    loading), a .npy file under that name with "'numpy.ndarray' object does not support
    the context manager protocol"."""
    path = tmp_path / "matrix.npz"
    path.write_text("1 2\n3 4\n")
    code, out, err = run(capsys, "trace", path)
    assert_one_line_error(code, out, err, str(path), "not a zip archive", "b'1 2\\n3 4\\n'")
    assert "pickle" not in err
    np.save(tmp_path / "array.npy", np.eye(3))
    (tmp_path / "array.npy").rename(path)
    code, out, err = run(capsys, "trace", path)
    assert_one_line_error(code, out, err, "not a zip archive", "a NumPy .npy file")
    assert "context manager" not in err
    path.write_bytes(b"")
    assert_one_line_error(*run(capsys, "trace", path), "not a zip archive", "is empty")


def test_a_level_prints_with_its_digits(capsys, tmp_path):
    """``--confidence 0.999999999`` was labelled "100% CI" (``:g`` keeps six digits)."""
    path = tmp_path / "m.npy"
    np.save(path, np.diag(np.arange(1.0, 41.0)) + 0.1)
    code, out, err = run(
        capsys, "trace", path, "--method", "hutchinson", "--confidence", "0.999999999"
    )
    assert code == 0 and "99.9999999%" in out and "100%" not in out
    code, out, err = run(
        capsys, "trace", path, "--method", "hutchinson", "--confidence", "0.99999999999"
    )
    assert code == 0 and "99.999999999%" in out


def test_an_npz_archive_without_arrays_is_read_as_one(capsys, tmp_path):
    """``numpy.savez(path)`` with no arrays writes a zip archive without files (its end
    record first): it is an archive, and holds no matrix."""
    path = tmp_path / "empty.npz"
    np.savez(path)
    assert_one_line_error(*run(capsys, "trace", path), "found 0 arrays")


def test_object_array_is_refused_without_unpickling(capsys, tmp_path):
    path = tmp_path / "obj.npy"
    np.save(path, np.array([[1, None], [None, 2]], dtype=object), allow_pickle=True)
    assert_one_line_error(*run(capsys, "trace", path), "not a readable .npy file")


def test_text_file_named_npy_is_not_called_pickled_data(capsys, tmp_path):
    path = tmp_path / "matrix.npy"
    path.write_text("1 2\n3 4\n")
    code, out, err = run(capsys, "trace", path)
    assert_one_line_error(
        code, out, err, str(path), "not a NumPy .npy file", "no magic header", "b'1 2\\n3 4\\n'"
    )
    assert "pickle" not in err
    path.write_bytes(b"")
    assert_one_line_error(*run(capsys, "trace", path), "not a NumPy .npy file", "is empty")


def test_npz_with_several_arrays(capsys, tmp_path):
    path = tmp_path / "two.npz"
    np.savez(path, first=np.eye(2), second=np.eye(3))
    assert_one_line_error(*run(capsys, "trace", path), "found 2 arrays (first, second)")


def test_unknown_method_lists_the_known_ones(capsys, dense_file):
    code, out, err = run(capsys, "trace", dense_file, "--method", "hutchinsn")
    assert_one_line_error(code, out, err, "unknown method 'hutchinsn'", "hutchinson")


def test_method_that_does_not_estimate_the_quantity(capsys, dense_file):
    only_trace = [m for m in available_methods("trace") if m not in available_methods("diagonal")]
    if not only_trace:
        pytest.skip("every registered method estimates both quantities")
    code, out, err = run(capsys, "diagonal", dense_file, "--method", only_trace[0])
    assert_one_line_error(code, out, err, f"{only_trace[0]!r} does not estimate a diagonal")


def test_unknown_method_is_reported_before_reading_the_file(capsys, tmp_path):
    code, out, err = run(capsys, "trace", tmp_path / "missing.npy", "--method", "bogus")
    assert_one_line_error(code, out, err, "unknown method 'bogus'")


def test_unknown_backend(capsys, dense_file):
    assert_one_line_error(
        *run(capsys, "trace", dense_file, "--backend", "tensorflow"), "--backend", "tensorflow"
    )


def test_unavailable_device(capsys, dense_file):
    assert_one_line_error(
        *run(capsys, "trace", dense_file, "--device", "cuda"), "'cuda'", "not available"
    )


@pytest.mark.parametrize("library", ["torch", "jax"])
def test_unavailable_device_of_a_library(capsys, dense_file, library):
    lib = pytest.importorskip(library, reason=f"{library} is not installed")
    if library == "torch" and lib.cuda.is_available():  # pragma: no cover - needs a GPU
        pytest.skip("this machine has CUDA")
    device = "cuda" if library == "torch" else "gpu"
    if library == "jax" and any(d.platform == "gpu" for d in lib.devices()):  # pragma: no cover
        pytest.skip("this machine has a GPU")
    code, out, err = run(capsys, "trace", dense_file, "--backend", library, "--device", device)
    assert_one_line_error(code, out, err, f"'{device}'", "not available")


def test_malformed_device_name(capsys, dense_file):
    pytest.importorskip("torch", reason="torch is not installed")
    code, out, err = run(
        capsys, "trace", dense_file, "--backend", "torch", "--device", "warp-drive"
    )
    assert_one_line_error(code, out, err, "'warp-drive' is not a torch device")


def test_backend_not_installed(capsys, dense_file):
    if importlib.util.find_spec("cupy") is not None:  # pragma: no cover - a GPU machine
        pytest.skip("cupy is installed")
    assert_one_line_error(
        *run(capsys, "trace", dense_file, "--backend", "cupy"), "'cupy'", "not installed"
    )


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--matvecs", "0"], "--matvecs: expected a positive integer"),
        (["--matvecs", "ten"], "--matvecs: expected a positive integer"),
        (["--rtol", "-0.1"], "--rtol: expected a non-negative number"),
        (["--confidence", "1.5"], "--confidence: expected a number in (0, 1)"),
        (["--dtype", "int8"], "--dtype: invalid choice"),
        (["--method", "hutch++", "--matvecs", "2"], "needs num_matvecs >= 3"),
        (["--method", "exact", "--plot", "x.png"], "method 'exact' has nothing to show"),
        (["--plot", "x.gif"], "--plot x.gif: unknown format (.gif)"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_bad_options(capsys, dense_file, argv, needle):
    if "hutch++" in argv and "hutch++" not in available_methods("trace"):
        pytest.skip("hutch++ is not registered yet")
    assert_one_line_error(*run(capsys, "trace", dense_file, *argv), needle)


def test_plot_options_without_matplotlib(capsys, monkeypatch, dense_file):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    argv = ("trace", dense_file, "--plot", "x.png")
    assert_one_line_error(
        *run(capsys, *argv, "--method", "exact"), "method 'exact' has nothing to show"
    )
    assert_one_line_error(
        *run(capsys, *argv, "--method", "hutchinson"), "--plot needs matplotlib", ".[cli]"
    )


def test_bad_output_targets(capsys, tmp_path, dense_file):
    assert_one_line_error(
        *run(capsys, "diagonal", dense_file, "--output", tmp_path / "d.txt"),
        "expected .npy or .csv",
    )
    missing = tmp_path / "no" / "d.npy"
    assert_one_line_error(
        *run(capsys, "diagonal", dense_file, "--output", missing), "does not exist"
    )


def test_complex_file_with_a_real_dtype(capsys, tmp_path):
    path = write(tmp_path / "c.npy", np.eye(3) * 1j)
    assert_one_line_error(*run(capsys, "trace", path, "--dtype", "float64"), "is complex")


def test_no_command_prints_help_and_fails(capsys):
    code, out, err = run(capsys)
    assert code == 2 and "usage: linop-trace" in err


# -------------------------------------------------------------------- methods, demo


def test_methods_lists_every_registered_name(capsys):
    code, out, err = run(capsys, "methods")
    assert code == 0 and err == ""
    names = [line.split()[0] for line in out.splitlines()]
    assert names == available_methods()
    listed = json.loads(run(capsys, "methods", "--json")[1])
    assert {entry["name"] for entry in listed} == set(available_methods())
    assert next(e for e in listed if e["name"] == "hutchinson") == {
        "name": "hutchinson",
        "trace": True,
        "diagonal": True,
    }


def test_user_registered_method_is_usable_from_the_command_line(capsys, diagonal_file):
    from linop_trace.estimators import Hutchinson
    from linop_trace.estimators._registry import _REGISTRY

    linop_trace.register_estimator("cli-gauss", Hutchinson(probe="gaussian"))
    try:
        assert "cli-gauss" in run(capsys, "methods")[1]
        result = run_json(
            capsys,
            "trace",
            diagonal_file,
            "--method",
            "cli-gauss",
            "--matvecs",
            "10",
            "--seed",
            "0",
        )
        direct = linop_trace.trace(
            np.load(diagonal_file), method="cli-gauss", num_matvecs=10, seed=0
        )
        assert result["value"] == float(direct.value)
    finally:
        _REGISTRY.pop("cli-gauss")


@pytest.mark.parametrize("quantity", ["trace", "diagonal"])
def test_help_names_the_methods_that_take_a_tolerance(capsys, monkeypatch, quantity):
    from linop_trace.estimators import Hutchinson, get_estimator
    from linop_trace.estimators._registry import _REGISTRY

    monkeypatch.setenv("COLUMNS", "1000")  # argparse would wrap (and hyphen-break) the list
    linop_trace.register_estimator("cli-tolerant", Hutchinson(probe="gaussian"))
    try:
        takers = [
            name
            for name in available_methods(quantity)
            if getattr(get_estimator(name, quantity), "supports_tolerance", False)
        ]
        with pytest.raises(SystemExit) as stop:
            main([quantity, "--help"])
    finally:
        _REGISTRY.pop("cli-tolerant")
    assert stop.value.code == 0
    assert "cli-tolerant" in takers and "exact" not in takers
    listed = f"the methods that take --rtol/--atol: {', '.join(takers)} (others refuse them)"
    assert listed in " ".join(capsys.readouterr().out.split())


def bundled_laplacian() -> sp.csr_array:
    return sp.csr_array(scipy.io.mmread(ROOT / "linop_trace" / "data" / _demos.DEMO_MATRIX))


def test_bundled_matrix_is_the_digits_graph_laplacian():
    laplacian = bundled_laplacian()
    assert laplacian.shape == (1797, 1797)
    assert (laplacian != laplacian.T).nnz == 0
    np.testing.assert_array_equal(laplacian.sum(axis=1), 0)  # a Laplacian: rows sum to zero
    assert (laplacian.diagonal() >= 10).all()  # at least k = 10 neighbours each
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from make_demo_matrix import build
    finally:
        sys.path.pop(0)
    assert (build() != laplacian).nnz == 0  # the committed file is what the script makes


def test_demo_on_the_sparse_matrix(capsys):
    result = run_json(capsys, "demo", "--problem", "sparse", "--matvecs", "60", "--seed", "1")
    exact = float(bundled_laplacian().diagonal().sum())
    assert result["exact"] == exact == 24770.0
    methods = [r["method"] for r in result["results"]]
    assert methods == ["exact", *TRACE_METHODS]
    for record in result["results"][1:]:
        if "error" in record:
            continue
        assert record["matvecs"] <= 60
        assert record["relative_error"] == pytest.approx(
            abs(record["value"] - exact) / exact, rel=1e-12
        )
        if record["stderr"] is not None:
            assert abs(record["value"] - exact) <= 5 * record["stderr"]


def test_demo_text_table(capsys):
    code, out, err = run(capsys, "demo", "--problem", "sparse", "--matvecs", "30")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("linop-trace demo: trace of the graph Laplacian")
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    for word in ("estimate", "interval", "rel. error", "matvecs", "time"):
        assert word in lines[header]
    rows = []
    for line in lines[header + 2 :]:
        if not line:
            break  # notes on refusing methods follow the table
        rows.append(line.split()[0])
    assert rows == ["exact", *TRACE_METHODS]
    assert lines[header + 2].split()[1] == "24770"


def test_demo_on_another_backend(capsys):
    pytest.importorskip("torch", reason="torch is not installed")
    result = run_json(capsys, "demo", "--backend", "torch", "--matvecs", "30")
    assert result["exact"] == 24770.0 and "torch" in result["problem"]


def test_demo_hessian_of_the_digits_mlp(capsys):
    pytest.importorskip("torch", reason="torch is not installed")
    pytest.importorskip("sklearn", reason="scikit-learn is not installed")
    try:
        from linop_trace.autodiff import hessian
        from linop_trace.autodiff._examples import digits_mlp_problem
    except ImportError as error:
        pytest.skip(f"the autodiff example is not available: {error}")
    result = run_json(capsys, "demo", "--problem", "hessian", "--matvecs", "50")
    model, loss_fn, data = digits_mlp_problem(batch_size=256, seed=0)
    operator = hessian(model, loss_fn, data)
    assert result["n"] == operator.shape[1] == 1480
    exact = float(linop_trace.trace(operator, method="exact").value)
    assert result["exact"] == pytest.approx(exact, rel=1e-6)
    assert "Hessian" in result["problem"]


@pytest.mark.parametrize("library", ["torch", "jax"])
def test_demo_hessian_runs_on_the_backend_asked_for(capsys, monkeypatch, library):
    pytest.importorskip(library, reason=f"{library} is not installed")
    pytest.importorskip("sklearn", reason="scikit-learn is not installed")
    # two methods are enough to see which problem ran where (JAX compiles per method)
    monkeypatch.setattr(_demos, "available_methods", lambda quantity=None: ["exact", "hutchinson"])
    result = run_json(
        capsys, "demo", "--problem", "hessian", "--backend", library, "--matvecs", "20"
    )
    assert result["n"] == 1480
    assert "Hessian" in result["problem"] and f"; {library} float32)" in result["problem"]
    assert [record["method"] for record in result["results"]] == ["exact", "hutchinson"]


@pytest.mark.parametrize("library", ["numpy", "cupy"])
def test_demo_hessian_on_a_backend_without_autodiff_is_refused(capsys, library):
    assert_one_line_error(
        *run(capsys, "demo", "--problem", "hessian", "--backend", library),
        f"demo --problem hessian cannot run on --backend {library}",
        "use --backend torch or --backend jax, or --problem sparse",
    )


def test_demo_with_a_backend_named_runs_the_sparse_matrix_there(capsys):
    result = run_json(capsys, "demo", "--backend", "numpy", "--matvecs", "30")
    assert result["exact"] == 24770.0 and result["n"] == 1797
    assert "graph Laplacian" in result["problem"] and "; numpy float64)" in result["problem"]


# ---------------------------------------------------------------------- documentation


def optional_extras() -> set[str]:
    """The extras ``pyproject.toml`` declares (read as text: no tomllib on Python 3.10)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+) = \[", section, flags=re.MULTILINE))


@pytest.mark.parametrize("document", ["README.md", "docs/getting_started.rst"])
def test_documented_installs_work_from_the_checkout(document):
    text = (ROOT / document).read_text()
    # the package is on no index: `pip install "linop-trace[cli]"` finds nothing
    assert not re.search(r"pip install [\"']?linop-trace", text)
    installs = re.findall(r'pip install -c constraints\.txt -e "\.\[([\w,-]+)\]"', text)
    assert installs
    for extras in installs:
        assert set(extras.split(",")) <= optional_extras(), extras
    assert "cli" in {extra for extras in installs for extra in extras.split(",")}


def test_documents_describe_the_demo_the_code_runs(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    guide = (ROOT / "docs" / "getting_started.rst").read_text()
    texts = {
        "demo --help": capsys.readouterr().out,
        "README.md": (ROOT / "README.md").read_text(),
        "getting_started.rst": guide[guide.index("The command line") :],
    }
    for name, text in texts.items():
        flat = " ".join(text.split()).lower()
        for needle in ("hessian", "when torch and scikit-learn are installed", "sparse"):
            assert needle in flat, (name, needle)


# ------------------------------------------------------------------------- subprocess


def test_subprocess_trace_json_matches_in_process(capsys, tmp_path, monkeypatch):
    path = write(tmp_path / "s.mtx.gz", sparse_matrix())
    argv = [
        "trace",
        path.name,
        "--method",
        "hutchinson",
        "--matvecs",
        "30",
        "--seed",
        "11",
        "--json",
    ]
    completed = run_module(*argv, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    result = json.loads(completed.stdout)
    monkeypatch.chdir(tmp_path)
    expected = run_json(capsys, *argv[:-1])
    assert {k: v for k, v in result.items() if k != "seconds"} == {
        k: v for k, v in expected.items() if k != "seconds"
    }


def test_subprocess_bad_input_is_one_line_with_status_2(tmp_path):
    completed = run_module("diagonal", "missing.mtx", "--output", "d.npy", cwd=tmp_path)
    assert completed.returncode == 2
    assert completed.stdout == ""
    assert completed.stderr == "linop-trace: error: missing.mtx: no such file\n"
    assert list(tmp_path.iterdir()) == []


def test_subprocess_demo_without_torch_import(tmp_path):
    code = (
        "import sys, runpy; sys.argv = ['linop-trace', 'demo', '--problem', 'sparse', '--matvecs', '30'];"
        "import linop_trace.cli as c; status = c.main(sys.argv[1:]);"
        "print('torch' in sys.modules, 'jax' in sys.modules); sys.exit(status)"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=subprocess_env(),
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    assert "exact" in completed.stdout and "24770" in completed.stdout
    assert completed.stdout.splitlines()[-1] == "False False"
