"""The evidence matrix of linop_trace: tests per backend and Python, oldest deps, lint, docs, bench, gpu.

``nox`` runs the default sessions (every ``tests`` variant, ``stats``, ``oldest``,
``distributed``, ``peers`` and ``lint``);
``nox -l`` lists them all; ``nox -s docs`` and ``nox -s bench`` build the docs and run
the benchmarks; ``nox -s distributed`` runs the scale-out tests (Dask, torchrun, sharded JAX).
Arguments after ``--`` go to pytest, e.g. ``nox -s "tests(numpy-3.11)" -- -x -k trace``.

Every install passes ``-c constraints.txt`` (the exact torch release; any other pulls a
multi-GB CUDA build), and each test session installs only its backend's extra, so a
missing optional dependency is caught by the session of the backend that does not have it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
CONSTRAINTS = str(ROOT / "constraints.txt")

nox.needs_version = ">=2024.3.2"
# uv installs a session's packages in ~3 s where pip takes ~22 s (14 sessions: about 4
# minutes of the matrix); without uv on PATH nox falls back to virtualenv and pip.
nox.options.default_venv_backend = "uv|virtualenv"
nox.options.error_on_missing_interpreters = True
# Never fetch an interpreter: the matrix runs on the Pythons the machine has.
if hasattr(nox.options, "download_python"):
    nox.options.download_python = "never"
# What plain `nox` (the README's test command and .ci/run) runs: the whole test matrix,
# the statistical tests once, the oldest supported dependencies and lint. docs and bench
# are asked for by name.
nox.options.sessions = ["tests", "stats", "oldest", "distributed", "peers", "lint"]

#: (backend, Pythons with wheels for it here, extra that brings its library)
MATRIX = {
    "numpy": (("3.10", "3.11", "3.12", "3.13"), None),
    "scipy": (("3.11",), None),
    "torch": (("3.11",), "torch"),  # the pinned torch==2.13.0 CPU wheel exists for 3.11 only
    # JAX on 3.10 (0.6.2, the newest release with wheels for it on 2026-12-07) and 3.13
    # (the newest, 0.12.1): the oldest and newest JAX the package meets. 3.11's JAX
    # (0.10.2) runs in the `distributed` and `peers` sessions and the benchmarks; a
    # jax-3.11 session took 4 - 6 of the matrix's 20 minutes on the 2-core machine, and a
    # jax-3.12 session would repeat jax-3.13 (the same JAX and NumPy).
    "jax": (("3.10", "3.13"), "jax"),
    "strict": (("3.11",), "strict"),
    "cupy": (("3.11",), "cupy"),
    # on a machine with a CUDA device (else skipped with the reason): torch's PyPI wheel
    # of the pinned release is its CUDA build there, JAX needs its CUDA plugin
    "torch-cuda": (("3.11",), "torch"),
    "jax-gpu": (("3.11",), "jax-cuda"),
}
#: Backends that need a CUDA device.
GPU_BACKENDS = ("cupy", "torch-cuda", "jax-gpu")

#: Threads for BLAS/OpenMP in test sessions: small matrices gain nothing from more, and
#: two sessions' worth of threads on a 2-core CI machine only contend.
TEST_THREADS = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}

#: pytest-xdist workers per test session. The sessions run one after another, and each
#: test is single-threaded (TEST_THREADS), so two workers use a 2-core machine's cores.
WORKERS = "2"

#: XLA flags of the JAX test sessions. Their problems are tiny, so compiling is most of
#: their time (about 75% of a session: ~520 programs of ~90 ms each per 80 tests); LLVM at
#: optimisation level 0 compiles the same programs to the same operations, without the
#: expensive passes (measured: 61 s -> 36 s for tests/test_refine.py and
#: tests/test_reliability.py). Benchmarks, docs and the GPU session keep XLA's defaults.
JAX_TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _use_pyenv_interpreters() -> None:
    """Let ``python3.10`` ... ``python3.13`` resolve through pyenv shims.

    With pyenv, only the selected versions' ``python3.X`` answer on PATH; the others say
    "command not found" until they are listed in PYENV_VERSION (which ``pyenv exec``, and
    so a shimmed ``nox``, sets to the current version). For each of 3.10-3.13 that does
    not run but is installed under pyenv, append it to PYENV_VERSION; what was selected
    stays first, so ``python`` keeps meaning what it meant.
    """
    if shutil.which("pyenv") is None:
        return

    def runs(command: str) -> bool:
        try:
            return subprocess.run([command, "-V"], capture_output=True).returncode == 0
        except OSError:
            return False

    missing = [f"3.{minor}" for minor in range(10, 14) if not runs(f"python3.{minor}")]
    if not missing:
        return
    try:
        installed = subprocess.run(
            ["pyenv", "versions", "--bare", "--skip-aliases"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        selected = (
            os.environ.get("PYENV_VERSION")
            or subprocess.run(
                ["pyenv", "version-name"], capture_output=True, text=True, check=True
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        return
    chosen = [v for v in selected.split(":") if v]
    for version in missing:
        matches = [v for v in installed if re.fullmatch(re.escape(version) + r"\.\d+", v)]
        if matches:
            chosen.append(max(matches, key=lambda v: int(v.rsplit(".", 1)[1])))
    os.environ["PYENV_VERSION"] = ":".join(chosen)


_use_pyenv_interpreters()


#: pip's configuration keys and the uv environment variables that say the same (uv reads
#: no pip.conf), with the separator each variable takes between values.
_PIP_TO_UV = {
    "index-url": ("UV_INDEX_URL", " "),
    "extra-index-url": ("UV_EXTRA_INDEX_URL", " "),
    "find-links": ("UV_FIND_LINKS", ","),
    "constraint": ("UV_CONSTRAINT", " "),
    # a CA bundle pip trusts (a proxy's, say): uv reads it from SSL_CERT_FILE
    "cert": ("SSL_CERT_FILE", " "),
}


def _uv_follows_pip_configuration() -> None:
    """Give uv the indexes, local wheel folders, constraints and CA bundle pip is
    configured with.

    A machine's pip.conf may point at local wheels (here: the CPU build of the pinned
    torch) and cap releases; uv would otherwise resolve against PyPI alone. Variables the
    user set win. uv's "unsafe-best-match" strategy picks the best release over all
    indexes, as pip does (uv's default takes the first index that has the package).
    """
    if shutil.which("uv") is None:
        return
    try:
        listing = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return
    found: dict[str, list[str]] = {}
    for line in listing.splitlines():
        match = re.match(r"^[^.]*\.([a-z-]+)='(.*)'$", line.strip())
        if match and match.group(1) in _PIP_TO_UV:
            for value in match.group(2).split():
                values = found.setdefault(match.group(1), [])
                if value not in values:
                    values.append(value)
    for key, values in found.items():
        variable, separator = _PIP_TO_UV[key]
        os.environ.setdefault(variable, separator.join(values))
    if found.get("extra-index-url") or found.get("find-links"):
        os.environ.setdefault("UV_INDEX_STRATEGY", "unsafe-best-match")


_uv_follows_pip_configuration()


def _test_params() -> list:
    params = []
    for backend, (pythons, _) in MATRIX.items():
        for python in pythons:
            params.append(nox.param(python, backend, id=f"{backend}-{python}", tags=[backend]))
    return params


def _cuda_device_present() -> tuple[bool, str]:
    """Whether a CUDA device is visible, and what was seen (for the skip message)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False, "nvidia-smi is not on PATH"
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return False, f"nvidia-smi failed: {error}"
    gpus = [line for line in out.stdout.splitlines() if line.startswith("GPU ")]
    if out.returncode != 0 or not gpus:
        return False, f"nvidia-smi lists no GPU (exit code {out.returncode})"
    return True, "; ".join(gpus)


def _pytest(session: nox.Session, *default_args: str) -> None:
    """Run pytest with the session's arguments added after the defaults.

    With ``LINOP_TRACE_JUNIT_DIR`` set (``.ci/run`` does), each run also writes a JUnit
    report there, so CI can print one pass/fail line for the whole matrix.
    """
    report = []
    junit_dir = os.environ.get("LINOP_TRACE_JUNIT_DIR")
    if junit_dir:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", session.name).strip("_")
        report = [f"--junitxml={Path(junit_dir) / safe}.xml"]
    session.run("python", "-m", "pytest", *default_args, *report, *session.posargs)


@nox.session
@nox.parametrize(["python", "backend"], _test_params())
def tests(session: nox.Session, backend: str) -> None:
    """Run the test suite on one array backend (GPU backends skip without a CUDA device).

    Backends: numpy, scipy, torch, jax, strict; on a machine with a CUDA device also
    cupy, torch-cuda and jax-gpu.

    Installs ``.[test]`` plus only that backend's extra and sets
    ``LINOP_TRACE_BACKENDS=<backend>`` so tests/conftest.py's ``backend`` fixture runs
    that library alone. The GPU backends skip with the reason when no CUDA device is
    present.
    """
    extra = MATRIX[backend][1]
    if backend in GPU_BACKENDS:
        present, seen = _cuda_device_present()
        if not present:
            session.skip(f"{backend} needs a CUDA device and none is present ({seen})")
    extras = "test" if extra is None else f"test,{extra}"
    session.install("-c", CONSTRAINTS, "-e", f".[{extras}]")
    session.env.update(TEST_THREADS)
    session.env["LINOP_TRACE_BACKENDS"] = backend
    if backend == "jax":
        session.env["XLA_FLAGS"] = JAX_TEST_XLA_FLAGS
    ignored = [f"--ignore={path}" for path in DISTRIBUTED_TESTS]  # (the distributed session's)
    _pytest(session, "-q", "-n", WORKERS, "-m", "not stats", *ignored)


@nox.session(python="3.11")
def stats(session: nox.Session) -> None:
    """The statistical tests, once, on NumPy: coverage of every interval and unbiasedness,
    each over hundreds of seeds (the tests marked ``stats``).

    A backend computes what NumPy computes from the same input and probes
    (tests/test_backend_agreement.py, in every ``tests`` session), so these need not run
    per backend and Python.
    """
    session.install("-c", CONSTRAINTS, "-e", ".[test]")
    session.env.update(TEST_THREADS)
    session.env["LINOP_TRACE_BACKENDS"] = "numpy"
    _pytest(session, "-q", "-n", WORKERS, "-m", "stats")


def _lower_bounds(requirements: list[str]) -> list[str]:
    """``name>=X`` -> ``name==X`` for every requirement that states a lower bound."""
    pins = []
    for requirement in requirements:
        match = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*>=\s*([^,;\s]+)", requirement)
        if match:
            pins.append(f"{match.group(1)}=={match.group(2)}")
    return pins


def _tomllib():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # nox itself may run on 3.10
        import tomli as tomllib
    return tomllib


@nox.session(python="3.10")
def oldest(session: nox.Session) -> None:
    """Run the tests on the oldest Python with the lowest numpy, scipy, array-api-compat.

    Builds a constraints file from the lower bounds of pyproject.toml's core
    dependencies (``numpy>=X`` becomes ``numpy==X``) and installs exactly those, so the
    stated minimums are tested, not assumed. Backends: numpy, scipy, strict.
    """
    project = _tomllib().loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _lower_bounds(project["dependencies"])
    oldest_constraints = Path(session.create_tmp()) / "oldest-constraints.txt"
    oldest_constraints.write_text("\n".join(pins) + "\n")
    session.log("pinned to the lower bounds: " + ", ".join(pins))
    session.install("-c", CONSTRAINTS, "-c", str(oldest_constraints), "-e", ".[test]")
    session.run(  # what was installed (uv's environments have no pip to ask)
        "python",
        "-c",
        "import importlib.metadata as m; "
        "print(', '.join(f'{n}=={m.version(n)}' for n in ('numpy', 'scipy', 'array-api-compat')))",
        silent=False,
    )
    session.env.update(TEST_THREADS)
    session.env["LINOP_TRACE_BACKENDS"] = "numpy,scipy,strict"
    _pytest(session, "-q", "-n", WORKERS, "-m", "not stats")


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff check, ruff format --check, and mypy on the linop_trace package."""
    session.install("-c", CONSTRAINTS, "-e", ".[lint]")
    session.run("ruff", "check", *(session.posargs or ["."]))
    session.run("ruff", "format", "--check", *(session.posargs or ["."]))
    session.run("mypy", "linop_trace")


#: The tests of the scale-out engines, which start their own clusters and process groups.
DISTRIBUTED_TESTS = (
    "tests/test_dask.py",
    "tests/test_dask_faults.py",
    "tests/test_distributed_torch.py",
    "tests/test_sharded_jax.py",
    "tests/test_recipes_distributed.py",
)


@nox.session(python="3.11")
def distributed(session: nox.Session) -> None:
    """The scale-out engines, each started by its tests: Dask arrays on a
    ``dask.distributed.LocalCluster`` (two worker processes of one thread each; one test
    kills a worker mid-estimate), data-parallel Hessians under ``torchrun`` (two gloo
    ranks), JAX arrays sharded over four host devices, and the recipes of
    docs/distributed.rst run as the page launches them. Installs
    ``.[test,dask,torch,jax]``; a default session (about three minutes with its install).
    Arguments go to pytest.
    """
    session.install("-c", CONSTRAINTS, "-e", ".[test,dask,torch,jax]")
    session.env.update(TEST_THREADS)
    session.env["LINOP_TRACE_BACKENDS"] = "numpy,scipy,torch,jax"
    _pytest(session, "-q", "-p", "no:cacheprovider", *DISTRIBUTED_TESTS)


#: The peer libraries whose operators ``aslinearoperator`` adapts (tests/test_adapters.py).
PEER_OPERATOR_LIBRARIES = (
    "curvlinops-for-pytorch>=3.0",
    "lineax>=0.0.5",
    "pylops>=2",
    "linear_operator",
)


@nox.session(python="3.11")
def peers(session: nox.Session) -> None:
    """Operators of curvlinops, lineax, PyLops and GPyTorch's linear_operator through
    ``aslinearoperator`` (tests/test_adapters.py), with those libraries installed (torch
    pinned by the constraints, as everywhere). Arguments go to pytest."""
    session.install("-c", CONSTRAINTS, "-e", ".[test,torch,jax]", *PEER_OPERATOR_LIBRARIES)
    session.env.update(TEST_THREADS)
    session.env["LINOP_TRACE_BACKENDS"] = "numpy"
    _pytest(session, "-q", "-p", "no:cacheprovider", "tests/test_adapters.py")


@nox.session(python=False, default=False)
def gpu(session: nox.Session) -> None:
    """The GPU check, in the environment nox runs in (which must hold torch with CUDA,
    JAX with its CUDA plugin and CuPy; nothing is installed, so it runs on machines without
    a package index): the tests marked ``gpu`` (every method on every GPU backend, no host
    synchronization, CUDA's own sync detector) on torch-cuda, jax-gpu and CuPy, then the
    overhead of every estimator over its products (``tools/gpu_overhead.py``). About
    3 minutes on one GPU; skipped without a CUDA device. Arguments go to pytest.
    """
    present, seen = _cuda_device_present()
    if not present:
        session.skip(f"the GPU check needs a CUDA device and none is present ({seen})")
    session.env["LINOP_TRACE_BACKENDS"] = ",".join(GPU_BACKENDS)
    session.env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # JAX and torch share the GPU
    _pytest(session, "-q", "-m", "gpu", "-p", "no:cacheprovider")
    session.run("python", str(ROOT / "tools" / "gpu_overhead.py"), external=True)


@nox.session(python="3.11", default=False)
def docs(session: nox.Session) -> None:
    """Build the Sphinx site with warnings as errors and run every public docstring's doctest.

    The gallery (docs/examples/plot_*.py) executes during the build, so torch and jax are
    installed. ``nox -s docs -- -b linkcheck`` etc. pass extra options to sphinx-build.
    """
    session.install("-c", CONSTRAINTS, "-e", ".[docs,test,torch,jax]")
    session.env.update(TEST_THREADS)
    session.env["MPLBACKEND"] = "Agg"
    session.run(
        "python",
        "-m",
        "pytest",
        "-q",
        "--doctest-modules",
        "-p",
        "no:cacheprovider",
        "linop_trace",
    )
    build = ROOT / "docs" / "_build" / "html"
    # Start clean: sphinx-gallery reuses an example's output while the example's file is
    # unchanged, which would hide a failure caused by a change in the library.
    for stale in ("_build", "auto_examples", "generated"):
        shutil.rmtree(ROOT / "docs" / stale, ignore_errors=True)
    session.run(
        "sphinx-build",
        "-W",
        "--keep-going",
        "-b",
        "html",
        *session.posargs,
        "docs",
        str(build),
    )
    session.log(f"docs built in {build}")


@nox.session(python="3.11", default=False)
def bench(session: nox.Session) -> None:
    """``asv check`` and ``asv run --quick --python=same`` over the whole benchmark suite.

    Runs in this session's environment (asv's "existing" environment), so no per-commit
    builds; fails if any benchmark errors. Extra arguments go to ``asv run``
    (e.g. ``nox -s bench -- --bench track_``).
    """
    session.install("-c", CONSTRAINTS, "-e", ".[bench,torch,jax]")
    # Single-threaded kernels make timings comparable run to run (also set in asv.conf.json).
    session.env.update(TEST_THREADS)
    session.env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false"
    session.env["MPLBACKEND"] = "Agg"
    session.chdir(ROOT / "asv_bench")
    session.run("asv", "machine", "--yes")
    session.run("asv", "check", "--python=same")
    session.run(
        "asv",
        "run",
        "--quick",
        "--python=same",
        "--show-stderr",
        *session.posargs,
    )
