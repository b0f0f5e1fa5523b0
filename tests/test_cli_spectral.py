"""The spectral commands of ``linop-trace``: ``logdet``, ``spectrum`` and ``eigs`` on Matrix
Market and SciPy ``.npz`` files, their reports, and every bad input ending in status 2.

As in ``test_cli.py``, the tests call ``main([...])`` in process and read stdout/stderr
with ``capsys``; one runs ``python -m linop_trace`` in a subprocess. References are dense
NumPy results (``slogdet``, ``eigvalsh``) on matrices with known eigenvalues.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp
from test_cli import assert_one_line_error, run, run_json

from linop_trace import _spectral as spectral_sums
from linop_trace.cli import _run, build_parser
from linop_trace.cli._spectral import check_symmetric

ROOT = pathlib.Path(__file__).resolve().parents[1]
N = 40
SEED = 20261
#: Why a test of --plot skips (each one imports matplotlib first).
NO_MATPLOTLIB = "--plot needs matplotlib, which is not installed"


# ------------------------------------------------------------------------- helpers


def dense_spd() -> tuple[np.ndarray, np.ndarray]:
    """A dense symmetric positive definite matrix with eigenvalues 1, ..., 10 (evenly
    spaced), symmetrised exactly, and those eigenvalues."""
    rng = np.random.default_rng(SEED)
    basis, _ = np.linalg.qr(rng.standard_normal((N, N)))
    eigenvalues = np.linspace(1.0, 10.0, N)
    matrix = (basis * eigenvalues) @ basis.T
    return (matrix + matrix.T) / 2, eigenvalues


def sparse_spd() -> tuple[sp.csr_array, np.ndarray]:
    """The shifted 1-d Laplacian tridiag(-1, 2.5, -1): eigenvalues
    0.5 + 2 - 2 cos(j pi / (N + 1)), j = 1..N, in (0.5, 4.5)."""
    # (sp.diags, not diags_array: SciPy 1.11, the oldest supported, lacks the latter)
    matrix = sp.csr_array(sp.diags([-1.0, 2.5, -1.0], offsets=[-1, 0, 1], shape=(N, N)))
    j = np.arange(1, N + 1)
    return matrix, np.sort(2.5 - 2 * np.cos(j * np.pi / (N + 1)))


# (file name, matrix): Matrix Market (dense, array layout) and SciPy sparse .npz; the
# sparse matrix also as a symmetric coordinate .mtx (one triangle stored)
FILES = ["dense.mtx", "sparse.npz", "sparse.mtx"]


def write(path: pathlib.Path, matrix) -> pathlib.Path:
    if path.suffix == ".npz":
        sp.save_npz(path, sp.csr_array(matrix))
    elif path.suffix == ".npy":
        np.save(path, matrix.toarray() if sp.issparse(matrix) else matrix)
    else:
        scipy.io.mmwrite(path, matrix)
    return path


@pytest.fixture
def files(tmp_path: pathlib.Path) -> dict[str, tuple[pathlib.Path, np.ndarray, np.ndarray]]:
    """Each file with its dense matrix and its eigenvalues (ascending)."""
    dense, dense_values = dense_spd()
    sparse, sparse_values = sparse_spd()
    return {
        "dense.mtx": (write(tmp_path / "dense.mtx", dense), dense, dense_values),
        "sparse.npz": (write(tmp_path / "sparse.npz", sparse), sparse.toarray(), sparse_values),
        "sparse.mtx": (write(tmp_path / "sparse.mtx", sparse), sparse.toarray(), sparse_values),
    }


@pytest.fixture
def spd_file(tmp_path: pathlib.Path) -> pathlib.Path:
    return write(tmp_path / "spd.npy", dense_spd()[0])


# ------------------------------------------------------------------------- logdet


@pytest.mark.parametrize("name", FILES)
def test_logdet_interval_covers_slogdet(capsys, files, name):
    path, matrix, eigenvalues = files[name]
    sign, expected = np.linalg.slogdet(matrix)
    assert sign == 1 and expected == pytest.approx(np.log(eigenvalues).sum(), rel=1e-12)
    result = run_json(capsys, "logdet", path, "--seed", "1", "--lanczos-steps", "10")
    low, high = result["interval"]
    assert low <= expected <= high
    assert result["quantity"] == "logdet" and result["method"] == "slq"
    assert result["matvecs"] == 20 * 10 and result["probes"] == 20
    assert result["lanczos_steps"] == 10 and result["seed"] == 1
    # the interval is the t-interval of the probes widened by the quadrature error
    assert 0 <= result["systematic_error"] < result["stderr"]
    assert (high - low) / 2 > 1.96 * result["stderr"]


@pytest.mark.parametrize("name", FILES)
def test_logdet_exact_is_slogdet(capsys, files, name):
    path, matrix, _ = files[name]
    result = run_json(capsys, "logdet", path, "--method", "exact")
    assert result["value"] == pytest.approx(np.linalg.slogdet(matrix)[1], rel=1e-12)
    assert result["matvecs"] == N and result["seed"] is None and result["stderr"] == 0


@pytest.mark.parametrize("method", spectral_sums.METHODS)
def test_logdet_runs_every_method_the_library_lists(capsys, spd_file, method):
    result = run_json(capsys, "logdet", spd_file, "--method", method, "--seed", "1")
    expected = np.log(dense_spd()[1]).sum()
    assert result["method"] == method
    low, high = result["interval"]
    assert low - 1e-9 <= expected <= high + 1e-9


def test_method_choices_are_read_from_the_library_when_the_parser_is_built(monkeypatch):
    monkeypatch.setattr(spectral_sums, "METHODS", (*spectral_sums.METHODS, "slq-new"))
    args = build_parser().parse_args(["logdet", "A.npz", "--method", "slq-new"])
    assert args.method == "slq-new"


def test_logdet_text_names_value_interval_errors_and_budget(capsys, spd_file):
    code, out, err = run(capsys, "logdet", spd_file, "--seed", "3", "--matvecs", "200")
    assert code == 0 and err == ""
    labels = [line.split()[0] for line in out.splitlines()]
    assert labels == ["file", "logdet", "stderr", "95%", "quadrature", "method", "lanczos", "time"]
    assert "slq (200 matvecs, seed 3)" in out
    assert "10 probes x 20 steps" in out


def test_logdet_seed_reproduces_and_a_fresh_one_is_reported(capsys, spd_file):
    first = run_json(capsys, "logdet", spd_file, "--lanczos-steps", "8")
    again = run_json(capsys, "logdet", spd_file, "--lanczos-steps", "8", "--seed", first["seed"])
    assert isinstance(first["seed"], int)
    assert again["value"] == first["value"] and again["interval"] == first["interval"]


def test_logdet_exact_names_the_options_it_leaves_unused(capsys, spd_file):
    code, out, _ = run(capsys, "logdet", spd_file, "--method", "exact", "--matvecs", "50")
    assert code == 0
    assert "exact: eigenvalues of the formed matrix (--matvecs unused)" in out


def test_logdet_confidence_and_threads(capsys, spd_file):
    narrow = run_json(capsys, "logdet", spd_file, "--seed", "0", "--confidence", "0.5")
    wide = run_json(capsys, "logdet", spd_file, "--seed", "0", "--threads", "1")
    assert narrow["value"] == wide["value"] and wide["threads"] == 1
    assert narrow["interval"][1] - narrow["interval"][0] < wide["interval"][1] - wide["interval"][0]


# ----------------------------------------------------------------------- spectrum


@pytest.mark.parametrize("name", FILES)
def test_spectrum_json_describes_the_eigenvalue_distribution(capsys, files, name):
    path, _, eigenvalues = files[name]
    result = run_json(capsys, "spectrum", path, "--seed", "0", "--lanczos-steps", "15")
    assert result["quantity"] == "spectrum" and result["n"] == N
    nodes, weights = np.array(result["nodes"]), np.array(result["weights"])
    assert nodes.shape == weights.shape == (20, 15)
    np.testing.assert_allclose(weights.sum(axis=1), 1, rtol=1e-10)
    low, high = result["range"]
    # Ritz values lie inside the spectrum; at 15 steps the extreme ones are near its ends
    spread = eigenvalues[-1] - eigenvalues[0]
    assert eigenvalues[0] - 1e-8 <= low < eigenvalues[0] + 0.01 * spread
    assert eigenvalues[-1] - 0.01 * spread < high <= eigenvalues[-1] + 1e-8
    assert sum(result["histogram"]["counts"]) == pytest.approx(N, rel=1e-10)
    median = result["quantiles"]["0.5"]
    assert abs(np.mean(eigenvalues <= median) - 0.5) < 0.15
    grid, density = np.array(result["grid"]), np.array(result["density"])
    assert grid.shape == density.shape == (512,)
    assert np.sum(density) * (grid[1] - grid[0]) == pytest.approx(1, abs=1e-3)


def test_spectrum_text_shows_range_quantiles_and_histogram(capsys, files):
    path, _, eigenvalues = files["sparse.npz"]
    code, out, err = run(capsys, "spectrum", path, "--seed", "0")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[1].startswith("range") and "(extreme Ritz values)" in lines[1]
    assert lines[2].startswith("quantiles") and "50%:" in lines[2]
    assert f"eigenvalues per interval (estimated count of {N}):" in out
    bars = [line for line in lines if line.startswith("  [")]
    assert len(bars) == 10 and bars[-1].split("]")[0].count(",") == 1
    assert sum(float(line.split()[2]) for line in bars) == pytest.approx(N, abs=0.1)


def is_png(path: pathlib.Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("log", [False, True])
def test_spectrum_plot_writes_a_png(capsys, tmp_path, files, log):
    pytest.importorskip("matplotlib", reason=NO_MATPLOTLIB)
    plot = tmp_path / "density.png"
    argv = ["spectrum", files["sparse.mtx"][0], "--seed", "0", "--plot", plot]
    result = run_json(capsys, *argv, *(["--log"] if log else []))
    assert result["plot"] == str(plot) and is_png(plot)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_spectrum_plot_without_matplotlib(capsys, monkeypatch, spd_file):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert_one_line_error(
        *run(capsys, "spectrum", spd_file, "--plot", "x.png"), "--plot needs matplotlib", ".[cli]"
    )


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--log"], "--log sets the density axis of the plot; it needs --plot"),
        (["--plot", "x.gif"], "--plot x.gif: unknown format (.gif)"),
        (["--width", "0"], "--width: expected a positive number"),
        (["--lanczos-steps", "1"], "lanczos_steps"),
        (["--matvecs", "20"], "at least 2 probes"),
    ],
)
def test_spectrum_bad_options(capsys, spd_file, argv, needle):
    assert_one_line_error(*run(capsys, "spectrum", spd_file, *argv), needle)


# --------------------------------------------------------------------------- eigs


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("which", ["largest", "smallest", "both_ends"])
def test_eigs_match_eigvalsh_to_the_tolerance(capsys, files, name, which):
    path, matrix, eigenvalues = files[name]
    np.testing.assert_allclose(np.linalg.eigvalsh(matrix), eigenvalues, atol=1e-12)
    tol = 1e-6
    result = run_json(capsys, "eigs", path, "-k", "5", "--which", which, "--seed", "0")
    expected = {
        "largest": eigenvalues[::-1][:5],
        "smallest": eigenvalues[:5],
        "both_ends": np.concatenate([eigenvalues[:2], eigenvalues[-3:]]),
    }[which]
    assert result["converged"] is True and result["which"] == which
    residuals = np.array(result["residual_norms"])
    assert residuals.max() <= tol * np.abs(eigenvalues).max()
    # each value lies within its residual norm of an eigenvalue
    np.testing.assert_allclose(result["values"], expected, rtol=0, atol=tol * eigenvalues.max())
    assert result["matvecs"] > 0 and result["cycles"] >= 1


def test_eigs_text_lists_values_with_residuals(capsys, files):
    code, out, err = run(capsys, "eigs", files["sparse.npz"][0], "-k", "3", "--seed", "0")
    assert code == 0 and err == ""
    assert "largest (k = 3)" in out and "restarted block Lanczos (" in out
    assert "converged  yes" in out
    rows = out.splitlines()[-3:]
    values = [float(row.split()[1]) for row in rows]
    np.testing.assert_allclose(values, sparse_spd()[1][::-1][:3], atol=1e-5)


def test_eigs_unconverged_warns_on_stderr_and_exits_0(capsys, spd_file):
    argv = ["eigs", spd_file, "-k", "4", "--max-matvecs", "8", "--seed", "0", "--json"]
    code, out, err = run(capsys, *argv)
    assert code == 0
    result = json.loads(out)
    assert result["converged"] is False and result["matvecs"] <= 8
    (line,) = err.splitlines()
    assert line.startswith("linop-trace: warning: not converged")
    assert "--max-matvecs" in line and "--tol" in line and "RuntimeWarning" not in err
    code, out, err = run(capsys, *argv[:-1], "--quiet")
    assert code == 0 and err == "" and "converged  no (budget spent first)" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["-k", "41"], "k = 41 eigenvalues asked of an operator of size n = 40"),
        (["-k", "0"], "-k: expected a positive integer"),
        (["--which", "middle"], "argument --which: invalid choice: 'middle'"),
        (["--tol", "0"], "--tol: expected a positive number"),
        (["--tol", "nan"], "--tol: expected a positive number"),
    ],
)
def test_eigs_bad_options(capsys, spd_file, argv, needle):
    assert_one_line_error(*run(capsys, "eigs", spd_file, *argv), needle)


# --------------------------------------------------------- bad input, every command

COMMANDS = ["logdet", "spectrum", "eigs"]


@pytest.mark.parametrize("command", COMMANDS)
def test_missing_file(capsys, tmp_path, command):
    path = tmp_path / "nowhere.mtx"
    assert_one_line_error(*run(capsys, command, path), str(path), "no such file")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("suffix", [".npy", ".mtx"])
def test_non_square_matrix(capsys, tmp_path, command, suffix):
    path = write(tmp_path / f"rect{suffix}", dense_spd()[0][:, :7])
    assert_one_line_error(
        *run(capsys, command, path), f"{command} needs a square matrix", f"({N}, 7)"
    )


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("suffix", [".npy", ".npz", ".mtx"])
def test_non_symmetric_matrix(capsys, tmp_path, command, suffix):
    matrix = sparse_spd()[0].tolil()
    matrix[3, 17] = 0.25  # one entry without its mirror
    path = write(tmp_path / f"skew{suffix}", matrix.tocsr())
    code, out, err = run(capsys, command, path)
    assert_one_line_error(
        code, out, err, str(path), f"{command} needs a symmetric matrix", "at entry (3, 17)"
    )


def test_symmetry_is_checked_to_a_relative_tolerance(tmp_path):
    matrix, _ = dense_spd()
    nearly = matrix + 1e-12 * np.triu(np.ones((N, N)), 1)  # rounding-level asymmetry passes
    check_symmetric(tmp_path / "a.npy", nearly, "logdet")
    check_symmetric(tmp_path / "a.npz", sp.csr_array(nearly), "logdet")
    check_symmetric(tmp_path / "i.npy", np.array([[2, 1], [1, 2]]), "eigs")  # integers
    hermitian = np.array([[2.0, 1j], [-1j, 2.0]])
    check_symmetric(tmp_path / "h.npy", hermitian, "eigs")
    with pytest.raises(Exception, match=r"needs a Hermitian matrix, but \|A - A\^H\|"):
        check_symmetric(tmp_path / "h.npy", hermitian.T.copy() + np.diag([0, 1j]), "eigs")


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_logdet_of_an_indefinite_matrix_is_refused(capsys, tmp_path, suffix):
    matrix, _ = sparse_spd()
    indefinite = matrix - 2.5 * sp.csr_array(sp.identity(N))  # eigenvalues in (-2, 2)
    path = write(tmp_path / f"indefinite{suffix}", indefinite)
    code, out, err = run(capsys, "logdet", path, "--seed", "0")
    assert_one_line_error(code, out, err, "needs a positive definite operator", "indefinite")
    # the spectrum and the eigenvalues of the same matrix are fine
    assert run_json(capsys, "eigs", path, "-k", "2", "--which", "smallest")["values"][0] < 0
    assert run_json(capsys, "spectrum", path, "--seed", "0")["range"][0] < 0


def test_unknown_method_lists_the_librarys(capsys, spd_file):
    code, out, err = run(capsys, "logdet", spd_file, "--method", "hutchinson")
    assert_one_line_error(code, out, err, "invalid choice: 'hutchinson'", "'slq'", "'exact'")


# --------------------------------------------------------- progress, subprocess


def test_a_shown_progress_bar_counts_lanczos_matvecs(capsys, monkeypatch, spd_file):
    pytest.importorskip("tqdm")
    argv = ["logdet", spd_file, "--seed", "5", "--matvecs", "100", "--json"]
    plain = json.loads(run(capsys, *argv)[1])
    monkeypatch.setattr(_run, "progress_wanted", lambda quiet, stream=None: not quiet)
    monkeypatch.setattr(_run, "PROGRESS_DELAY", 0)
    code, out, err = run(capsys, *argv)
    assert code == 0 and "logdet" in err and "/100" in err and "matvec" in err
    assert json.loads(out)["value"] == plain["value"]  # the bar does not change the estimate
    code, out, err = run(capsys, "eigs", spd_file, "-k", "2", "--seed", "0")
    assert code == 0 and "eigs" in err and "matvec" in err


def test_subprocess_indefinite_logdet_is_one_line_with_status_2(tmp_path):
    path = write(tmp_path / "indefinite.mtx", np.diag([1.0, -1.0, 2.0, 3.0]))
    completed = subprocess.run(
        [sys.executable, "-m", "linop_trace", "logdet", str(path), "--seed", "0"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert completed.returncode == 2 and completed.stdout == ""
    assert completed.stderr.startswith("linop-trace: error: f = 'log' needs a positive definite")
    assert len(completed.stderr.splitlines()) == 1
