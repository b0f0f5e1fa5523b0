"""Reliability of ``linop-trace`` (issue 18, item 10).

A tiny file declaring a huge matrix is refused before anything of its declared size is
allocated; outputs appear only when the whole run succeeded; an output that is the input
is refused; an unwritable output directory is reported, by the user's path, before the
computation. Tests call the in-process ``main([...])`` and read stdout/stderr with
``capsys``; one runs ``python -m linop_trace`` under an address-space limit.
"""

from __future__ import annotations

import gzip
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp

from linop_trace import _backend
from linop_trace.cli import _commands, main

ROOT = pathlib.Path(__file__).resolve().parents[1]
HUGE = 3_000_000_000
GIB = 2**30
#: Why a test of --plot skips (each one imports matplotlib first).
NO_MATPLOTLIB = "--plot needs matplotlib, which is not installed"


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(code: int, out: str, err: str) -> str:
    """The one stderr line of a bad-input exit (status 2)."""
    assert code == 2, (code, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("linop-trace: error: ")
    assert "Traceback" not in err
    return lines[0]


def mtx(
    path: pathlib.Path,
    size: str,
    *entries: str,
    kind: str = "coordinate real general",
) -> pathlib.Path:
    """A Matrix Market file with the size line ``size`` and the entry lines ``entries``."""
    text = f"%%MatrixMarket matrix {kind}\n{size}\n" + "".join(f"{e}\n" for e in entries)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def matrix() -> np.ndarray:
    rng = np.random.default_rng(18)
    return rng.standard_normal((12, 12)) + 4 * np.eye(12)


@pytest.fixture
def matrix_file(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "a.npy"
    np.save(path, matrix())
    return path


@pytest.fixture
def no_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parsing the matrix (which allocates for its declared size) fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the matrix file was parsed")

    monkeypatch.setattr(scipy.io, "mmread", refuse)
    monkeypatch.setattr(sp, "load_npz", refuse)


@pytest.fixture
def memory(monkeypatch: pytest.MonkeyPatch):
    """Set the host memory the command line sees as available (bytes)."""

    def set_available(free: int | None) -> None:
        monkeypatch.setattr(_backend, "host_free_memory", lambda: free)

    return set_available


# ------------------------------------------------------------ declared sizes (1)


@pytest.mark.parametrize("quantity", ["trace", "diagonal", "rowsums"])
def test_huge_declared_matrix_is_refused_before_reading(
    capsys, tmp_path, no_reading, memory, quantity
):
    path = mtx(tmp_path / "huge.mtx", f"{HUGE} {HUGE} 1", "1 1 1.5")
    assert path.stat().st_size == 78  # the file of the audit
    memory(64 * GIB)
    line = error_line(*run(capsys, quantity, path))
    for needle in (str(path), f"{HUGE} x {HUGE}", "would need", "available", "64 GiB"):
        assert needle in line, (needle, line)


def test_huge_declared_matrix_in_a_subprocess_under_a_memory_limit(tmp_path):
    """The audit's file, for real: refused (status 2), not a crash on allocating it."""
    pytest.importorskip("resource")
    path = mtx(tmp_path / "huge.mtx", f"{HUGE} {HUGE} 1", "1 1 1.5")
    limit = 6 * GIB  # room for the interpreter and its libraries, not for 3e9 rows
    # the child limits its own address space (no preexec_fn: a fork of this process)
    child = (
        "import resource, runpy, sys; "
        f"resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit})); "
        "sys.argv = ['linop-trace', *sys.argv[1:]]; "
        "runpy.run_module('linop_trace', run_name='__main__')"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", child, "diagonal", str(path), "--quiet"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    line = error_line(done.returncode, done.stdout, done.stderr)
    assert f"{HUGE} x {HUGE}" in line and "available" in line, line


@pytest.mark.parametrize("quantity", ["trace", "diagonal", "rowsums"])
def test_sparse_matrix_with_a_million_rows_still_works(capsys, tmp_path, quantity):
    n = 10**6
    path = mtx(tmp_path / "big.mtx", f"{n} {n} 3", "1 1 2.5", f"{n} {n} -1", "7 3 4")
    out = tmp_path / "v.npy"
    argv = [quantity, path, "--quiet"] + ([] if quantity == "trace" else ["--output", out])
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    if quantity == "trace":
        assert "1.5" in stdout
        return
    value = np.load(out)
    assert value.shape == (n,)
    expected = np.zeros(n)
    if quantity == "diagonal":
        expected[[0, n - 1]] = [2.5, -1.0]
    else:
        expected[[0, n - 1, 6]] = [2.5, -1.0, 4.0]
    np.testing.assert_array_equal(value, expected)


def test_million_rows_are_refused_when_memory_is_short(capsys, tmp_path, memory):
    n = 10**6
    path = mtx(tmp_path / "big.mtx", f"{n} {n} 1", "1 1 2.5")
    memory(16 * 2**20)
    line = error_line(*run(capsys, "diagonal", path, "--quiet"))
    assert f"{n} x {n}" in line and "available" in line and "16 MiB" in line, line


def test_header_claiming_more_entries_than_the_file_holds(capsys, tmp_path):
    path = mtx(tmp_path / "short.mtx", "3 3 1000", "1 1 1.5")
    line = error_line(*run(capsys, "trace", path))
    assert "corrupt" in line and "1000 entries" in line and f"{path.stat().st_size} bytes" in line


@pytest.mark.parametrize(
    ("name", "size", "kind"),
    [
        ("huge.mtx.gz", f"3 3 {10**12}", "coordinate real general"),  # 10^12 entries, gzip
        ("dense.mtx", f"{HUGE} {HUGE}", "array real general"),  # 9e18 dense entries
        ("sym.mtx", f"{HUGE} {HUGE} {HUGE}", "coordinate pattern symmetric"),
    ],
)
def test_declared_entries_beyond_the_file_are_refused_unread(
    capsys, tmp_path, no_reading, name, size, kind
):
    path = mtx(tmp_path / name, size, "1 1", kind=kind)
    line = error_line(*run(capsys, "trace", path))
    assert str(path) in line and "corrupt" in line, line


def test_sparse_npz_declaring_a_huge_shape_is_refused_unread(capsys, tmp_path, no_reading, memory):
    path = tmp_path / "huge.npz"
    sp.save_npz(path, sp.coo_array(([1.5], ([0], [0])), shape=(HUGE, HUGE)))
    memory(64 * GIB)
    line = error_line(*run(capsys, "trace", path))
    assert f"{HUGE} x {HUGE}" in line and "available" in line, line


@pytest.mark.parametrize("index", [5, 100_000_000, -7])
@pytest.mark.parametrize("command", ["rowsums", "trace", "diagonal"])
def test_a_sparse_npz_with_an_index_out_of_range_is_refused(capsys, tmp_path, command, index):
    """scipy.sparse.load_npz does not check the indices of the file it reads: a CSR file
    with a column index out of range made the products read outside the arrays (a
    segmentation fault, or uninitialised memory printed with exit 0)."""
    path = tmp_path / "bad.npz"
    np.savez(
        path,
        format=np.array(b"csr"),
        shape=np.array([2, 2]),
        data=np.ones(2),
        indices=np.array([0, index]),
        indptr=np.array([0, 1, 2]),
    )
    extra = ["--method", "hutchinson"] if command != "rowsums" else []
    line = error_line(*run(capsys, command, path, *extra))
    # (SciPy's wording: "indices must be < 2"; before 1.12 "column index values must be")
    assert str(path) in line and "not a readable .npz file" in line, line
    assert re.search(r"ind(ices|ex values) must be", line), line


# ------------------------------------------------- outputs committed together (2)


@pytest.mark.parametrize("existing", [True, False])
def test_a_failed_plot_leaves_the_output_untouched(
    capsys, tmp_path, monkeypatch, matrix_file, existing
):
    pytest.importorskip("matplotlib", reason=NO_MATPLOTLIB)
    from matplotlib.figure import Figure

    def full_disk(self, *args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    keep = tmp_path / "keep.csv"
    if existing:
        keep.write_bytes(b"keep")
    argv = ["diagonal", matrix_file, "--method", "hutchinson", "--matvecs", "8", "--seed", "0"]
    code, out, err = run(capsys, *argv, "--output", keep, "--plot", tmp_path / "p.png")
    if existing:
        assert keep.read_bytes() == b"keep"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == (["a.npy", "keep.csv"] if existing else ["a.npy"])
    line = error_line(code, out, err)
    assert "No space left on device" in line and str(tmp_path / "p.png") in line, line
    assert ".part" not in line


def test_outputs_appear_together_when_the_run_succeeds(capsys, tmp_path, matrix_file):
    pytest.importorskip("matplotlib", reason=NO_MATPLOTLIB)
    keep, plot = tmp_path / "keep.csv", tmp_path / "p.png"
    keep.write_bytes(b"old")
    argv = ["diagonal", matrix_file, "--method", "hutchinson", "--matvecs", "8", "--seed", "0"]
    code, out, err = run(capsys, *argv, "--output", keep, "--plot", plot, "--quiet")
    assert code == 0, err
    assert keep.read_text().startswith("index,value,")
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "keep.csv", "p.png"]


# ------------------------------------------------------ output is the input (3)


def same_file_spellings(tmp_path: pathlib.Path, matrix_file: pathlib.Path) -> list[str]:
    (tmp_path / "sub").mkdir()
    os.symlink(matrix_file, tmp_path / "link.npy")
    os.link(matrix_file, tmp_path / "hard.npy")
    return [
        str(matrix_file),
        str(tmp_path / "sub" / ".." / "a.npy"),
        "a.npy",  # relative to the working directory
        str(tmp_path / "link.npy"),
        str(tmp_path / "hard.npy"),
    ]


@pytest.mark.parametrize("index", range(5))
def test_output_that_is_the_input_is_refused(capsys, tmp_path, monkeypatch, matrix_file, index):
    monkeypatch.chdir(tmp_path)
    target = same_file_spellings(tmp_path, matrix_file)[index]
    before = matrix_file.read_bytes()
    line = error_line(*run(capsys, "diagonal", matrix_file, "--output", target))
    assert f"--output {target}" in line and "input" in line, line
    assert matrix_file.read_bytes() == before
    assert os.path.samefile(tmp_path / target, matrix_file)
    assert not any(p.name.endswith(".part") for p in tmp_path.iterdir())


def test_plot_that_is_the_input_is_refused(capsys, tmp_path, matrix_file):
    pytest.importorskip("matplotlib", reason=NO_MATPLOTLIB)
    link = tmp_path / "p.png"
    os.symlink(matrix_file, link)
    argv = ["trace", matrix_file, "--method", "hutchinson", "--matvecs", "8", "--plot", link]
    line = error_line(*run(capsys, *argv))
    assert f"--plot {link}" in line and "input" in line, line
    assert link.is_symlink()


# ---------------------------------------------- unwritable output directories (4)


@pytest.fixture
def read_only(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> pathlib.Path:
    """A directory mode 0o555 that ``os.access`` reports unwritable (even to root)."""
    directory = tmp_path / "rodir"
    directory.mkdir()
    directory.chmod(0o555)
    real_access = os.access

    def access(path: object, mode: int, *args: object, **kwargs: object) -> bool:
        if mode & os.W_OK and pathlib.Path(os.fspath(path)).resolve() == directory.resolve():
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    yield directory
    directory.chmod(0o755)


@pytest.fixture
def no_computing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading the matrix fails the test (the checks come first)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the matrix was read before the outputs were checked")

    monkeypatch.setattr(_commands, "load_matrix", refuse)


@pytest.mark.parametrize(("option", "name"), [("--output", "d.csv"), ("--plot", "p.png")])
def test_unwritable_directory_is_refused_before_computing(
    capsys, tmp_path, read_only, no_computing, matrix_file, option, name
):
    if option == "--plot":
        pytest.importorskip("matplotlib", reason=NO_MATPLOTLIB)
    target = read_only / name
    argv = ["diagonal", matrix_file, "--method", "hutchinson", "--matvecs", "8"]
    line = error_line(*run(capsys, *argv, option, target))
    assert f"{option} {target}" in line and "not writable" in line, line
    assert ".part" not in line
    assert list(read_only.iterdir()) == []


def test_audit_case_plot_into_read_only_directory_keeps_the_output(
    capsys, tmp_path, read_only, matrix_file
):
    pytest.importorskip("matplotlib", reason=NO_MATPLOTLIB)
    keep = tmp_path / "keep.csv"
    keep.write_bytes(b"keep")
    argv = ["diagonal", matrix_file, "--method", "hutchinson", "--matvecs", "8"]
    line = error_line(*run(capsys, *argv, "--output", keep, "--plot", read_only / "p.png"))
    assert f"--plot {read_only / 'p.png'}" in line and "not writable" in line, line
    assert keep.read_bytes() == b"keep"


def test_output_under_a_regular_file_is_refused(capsys, tmp_path, no_computing, matrix_file):
    parent = tmp_path / "afile"
    parent.write_bytes(b"")
    line = error_line(*run(capsys, "diagonal", matrix_file, "--output", parent / "d.npy"))
    assert f"--output {parent / 'd.npy'}" in line and "not a directory" in line, line


def test_failure_to_create_the_output_names_the_users_path(
    capsys, tmp_path, monkeypatch, matrix_file
):
    """Where creating a file fails anyway (root on a read-only mount), the message names
    the user's path, not a hidden temporary."""
    import tempfile

    def denied(*args: object, dir: object = None, prefix: str = "", **kwargs: object) -> None:
        hidden = os.path.join(str(dir), f"{prefix}x1y2z3.part")
        raise PermissionError(13, "Permission denied", hidden)

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", denied)
    target = tmp_path / "d.npy"
    line = error_line(*run(capsys, "diagonal", matrix_file, "--output", target))
    assert f"--output {target}" in line and "Permission denied" in line, line
    assert ".part" not in line and "x1y2z3" not in line


# ------------------------------------------------- interrupted runs (issue 18, item 12)
def test_an_interrupted_trace_prints_its_partial_estimate_and_exits_130(
    capsys, tmp_path, monkeypatch
):
    """Ctrl-C during the estimate: exit 130 with the partial estimate of the completed
    probe blocks on stderr (before: "interrupted" alone)."""
    import numpy as np

    import linop_trace as lt
    from linop_trace.cli import _commands, main

    path = tmp_path / "m.npy"
    np.save(path, np.diag(np.arange(1.0, 41.0)))
    real_trace = _commands.trace

    def interrupted_trace(A, **options):
        partial = real_trace(A, method="hutchinson", num_matvecs=8, seed=0)
        partial.converged = False
        raise lt.EstimateInterrupted(partial)

    monkeypatch.setattr(_commands, "trace", interrupted_trace)
    code = main(["trace", str(path), "--method", "hutchinson", "--seed", "0"])
    err = capsys.readouterr().err
    assert code == 130
    assert "interrupted; partial estimate from 8 products: 820" in err
    assert "95% interval" in err

    def interrupted_at_its_level(A, **options):  # (as trace gives it: at the call's level)
        partial = real_trace(A, method="hutchinson", num_matvecs=8, seed=0)
        partial.confidence = options["confidence"]
        raise lt.EstimateInterrupted(partial)

    monkeypatch.setattr(_commands, "trace", interrupted_at_its_level)
    code = main(["trace", str(path), "--method", "hutchinson", "--confidence", "0.99"])
    assert code == 130 and "99% interval" in capsys.readouterr().err

    def interrupted_complex(A, **options):  # (no interval for a complex value: the
        # summary raised "a confidence interval needs a real value" instead)
        partial = real_trace(A * (1 + 1j), method="hutchinson", num_matvecs=8, seed=0)
        raise lt.EstimateInterrupted(partial)

    monkeypatch.setattr(_commands, "trace", interrupted_complex)
    code = main(["trace", str(path), "--method", "hutchinson"])
    err = capsys.readouterr().err
    assert code == 130 and "partial estimate from 8 products: 820+820j" in err


_STOP_CHILD = """
import os, signal, sys, threading, time
import linop_trace as lt
from linop_trace.cli import _run, main

# a child of a background job inherits SIGINT ignored (POSIX shells without job control),
# and Python then installs no KeyboardInterrupt handler: give it the one a terminal has
signal.signal(signal.SIGINT, signal.default_int_handler)

sent = []
products = []
two_products_done = threading.Event()
run_estimate = _run.interruptible
matmat = lt.LinearOperator.matmat

def counted_matmat(self, X):
    out = matmat(self, X)
    products.append(X.shape[1])
    if len(products) >= 2:  # the first block's samples are kept by now
        two_products_done.set()
    return out

def interrupt(keeps_partial):
    # Ctrl-C one second into the estimate (and, for a partial estimate, once there is
    # one), however long the import, the read and the first blocks took
    if keeps_partial:
        two_products_done.wait()
    sent.append(time.perf_counter())
    os.kill(os.getpid(), signal.SIGINT)

def interruptible_then_interrupted(compute, keeps_partial):
    threading.Timer(1.0, interrupt, (keeps_partial,)).start()
    return run_estimate(compute, keeps_partial)

lt.LinearOperator.matmat = counted_matmat
_run.interruptible = interruptible_then_interrupted
code = main(sys.argv[1:])
print(f"stopped {time.perf_counter() - sent[0]:.3f}", flush=True)
sys.exit(code)
"""


@pytest.mark.parametrize("method", ["xtrace", "hutchinson"])
def test_ctrl_c_stops_the_cli_at_once(tmp_path, method):
    """Ctrl-C one second into a run that would take minutes (n = 250,000, 4000
    products): exit 130 within a second. The estimate runs in a worker thread and the
    main thread waits, so the signal is seen during a long library call; XTrace (no
    partial estimate) stops at once, Hutchinson after its block in progress, with the
    partial estimate. Before, XTrace took 4.0 s to stop, the length of the LAPACK call
    in progress."""
    side = 500
    T = sp.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(side, side))
    laplacian = (sp.kron(T, sp.eye(side)) + sp.kron(sp.eye(side), T)).tocsr()
    path = tmp_path / "laplacian.npz"
    sp.save_npz(path, laplacian)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    arguments = ["trace", str(path), "--method", method, "--matvecs", "4000", "--seed", "0"]
    done = subprocess.run(
        [sys.executable, "-c", _STOP_CHILD, *arguments, "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 130, done.stderr
    stopped = float(done.stdout.split("stopped")[-1])
    assert stopped < 1.0, stopped
    if method == "hutchinson":
        assert "partial estimate from" in done.stderr
    else:
        assert done.stderr.strip().endswith("interrupted")
