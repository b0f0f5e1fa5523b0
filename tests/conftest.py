"""The backend fixture: every test runs on every installed array library and device.

``LINOP_TRACE_BACKENDS`` (comma separated) restricts the set; nox sets it per session.
A backend whose library is missing, or that needs a device the machine lacks (CuPy,
``torch-cuda`` and ``jax-gpu`` without a CUDA device), is reported as a skip with the
reason. Tests marked ``gpu`` are the subset ``nox -s gpu`` runs on a machine with one.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ALL_BACKENDS = ("numpy", "scipy", "torch", "jax", "strict", "cupy", "torch-cuda", "jax-gpu")
#: Backends whose arrays live on a GPU.
GPU_BACKENDS = ("cupy", "torch-cuda", "jax-gpu")


def _selected() -> tuple[str, ...]:
    chosen = os.environ.get("LINOP_TRACE_BACKENDS")
    if not chosen:
        return ALL_BACKENDS
    names = tuple(name.strip() for name in chosen.split(",") if name.strip())
    unknown = set(names) - set(ALL_BACKENDS)
    if unknown:
        raise pytest.UsageError(f"LINOP_TRACE_BACKENDS names unknown backends {sorted(unknown)}")
    return names


@dataclass
class Backend:
    """How one array library enters the tests."""

    name: str
    xp: Any
    device: Any
    convert: Callable[[np.ndarray], Any]
    sparse: Callable[[np.ndarray], Any] | None = None

    def asarray(self, values: Any, dtype: Any = None) -> Any:
        """A dense array of this library on this device, holding NumPy ``values``."""
        values = np.asarray(values)
        if dtype is not None:
            values = values.astype(dtype)
        return self.convert(values)

    def matrix(self, values: np.ndarray, dtype: Any = None) -> Any:
        """The matrix the way this backend's users hold it (sparse for ``scipy``)."""
        values = np.asarray(values) if dtype is None else np.asarray(values).astype(dtype)
        if self.sparse is not None:
            return self.sparse(values)
        return self.convert(values)

    @property
    def library(self) -> str:
        """The array library (``"torch"`` for both ``torch`` and ``torch-cuda``)."""
        return self.name.split("-")[0]

    def dtype(self, numpy_dtype: Any) -> Any:
        """This library's dtype of the same name as ``numpy_dtype``."""
        return getattr(self.xp, np.dtype(numpy_dtype).name)

    @property
    def float64_supported(self) -> bool:
        return True


def numpy_of(x: Any) -> np.ndarray:
    from linop_trace._backend import to_numpy

    return to_numpy(x)


def _make(name: str) -> Backend:
    if name in ("numpy", "scipy"):
        import array_api_compat.numpy as xp
        import scipy.sparse as sp

        sparse = (lambda a: sp.csr_array(a)) if name == "scipy" else None
        return Backend(name, xp, "cpu", lambda a: a, sparse)
    if name == "torch":
        torch = pytest.importorskip("torch", reason="torch is not installed")
        import array_api_compat.torch as xp

        return Backend(
            name, xp, torch.device("cpu"), lambda a: torch.from_numpy(np.array(a, order="C"))
        )
    if name == "jax":
        jax = pytest.importorskip("jax", reason="jax is not installed")
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        return Backend(name, jnp, jax.devices("cpu")[0], lambda a: jnp.asarray(a))
    if name == "strict":
        strict = pytest.importorskip("array_api_strict", reason="array_api_strict is not installed")
        return Backend(name, strict, strict.Device("CPU_DEVICE"), lambda a: strict.asarray(a))
    if name == "torch-cuda":
        torch = pytest.importorskip("torch", reason="torch is not installed")
        if not torch.cuda.is_available():
            pytest.skip("torch-cuda needs a CUDA device and torch sees none")
        import array_api_compat.torch as xp  # pragma: no cover - needs a GPU

        cuda = torch.device("cuda", 0)  # pragma: no cover
        return Backend(  # pragma: no cover
            name, xp, cuda, lambda a: torch.from_numpy(np.array(a, order="C")).to(cuda)
        )
    if name == "jax-gpu":
        jax = pytest.importorskip("jax", reason="jax is not installed")
        try:
            gpus = jax.devices("gpu")
        except RuntimeError:
            gpus = []
        if not gpus:
            pytest.skip("jax-gpu needs a GPU device and jax sees none")
        jax.config.update("jax_enable_x64", True)  # pragma: no cover - needs a GPU
        import jax.numpy as jnp  # pragma: no cover

        gpu = gpus[0]  # pragma: no cover
        return Backend(
            name, jnp, gpu, lambda a: jax.device_put(jnp.asarray(a), gpu)
        )  # pragma: no cover
    if name == "cupy":
        try:
            cupy = importlib.import_module("cupy")
        except ImportError:
            pytest.skip("cupy is not installed (it needs a CUDA device)")
        try:
            if cupy.cuda.runtime.getDeviceCount() < 1:
                pytest.skip("cupy is installed but no CUDA device is present")
        except Exception as error:  # pragma: no cover - depends on the machine
            pytest.skip(f"cupy is installed but CUDA is unusable: {error}")
        import array_api_compat.cupy as xp  # pragma: no cover - needs a GPU

        return Backend(name, xp, cupy.cuda.Device(0), cupy.asarray)  # pragma: no cover
    raise AssertionError(name)  # pragma: no cover


#: The library a session's backend brings beyond NumPy and SciPy (as its modules are named
#: in test sources); ``None``: none.
_LIBRARY_OF = {
    "numpy": None,
    "scipy": None,
    "torch": "torch",
    "torch-cuda": "torch",
    "jax": "jax",
    "jax-gpu": "jax",
    "strict": "array_api_strict",
    "cupy": "cupy",
}


def _uses_a_backend_fixture(item: pytest.Item) -> bool:
    names = getattr(item, "fixturenames", ())
    return "backend" in names or "dense_backend" in names


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run each test where it tells something: in a session restricted to backends
    without ``numpy`` (nox's ``tests(torch-3.11)``, ...), a test that takes no backend
    fixture and whose module never names the session's library is deselected. It runs
    the same NumPy code as in the ``numpy`` sessions (one per Python), which run every
    test; a test that needs the session's library (``pytest.importorskip("torch")``)
    sits in a module that names it, and stays. Tests marked ``every_session`` (what an
    installation with this session's extras must show, e.g. that importing the package
    imports no optional library) always stay."""
    selected = _selected()
    if "numpy" in selected:
        return
    libraries = {_LIBRARY_OF[name] for name in selected} - {None}
    patterns = [re.compile(rf"\b{re.escape(library)}\b") for library in libraries]
    texts: dict[str, str] = {}
    kept, dropped = [], []
    for item in items:
        path = str(getattr(item, "path", "") or "")
        if _uses_a_backend_fixture(item) or not path or item.get_closest_marker("every_session"):
            kept.append(item)
            continue
        if path not in texts:
            texts[path] = Path(path).read_text(encoding="utf-8")
        names_library = any(pattern.search(texts[path]) for pattern in patterns)
        (kept if names_library else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_report_header(config: pytest.Config) -> str | None:
    if "numpy" in _selected():
        return None
    return (
        "tests without a backend fixture whose module does not name this session's "
        "library are deselected: the numpy sessions run them"
    )


@pytest.fixture(autouse=True)
def _restore_estimator_registry():
    """Estimators a test registers are gone after it: no test sees another's names."""
    from linop_trace.estimators import _registry

    saved = dict(_registry._REGISTRY)
    yield
    _registry._REGISTRY.clear()
    _registry._REGISTRY.update(saved)


@pytest.fixture(params=_selected())
def backend(request: pytest.FixtureRequest) -> Backend:
    """One installed array library (with its device); skipped with a reason otherwise."""
    return _make(request.param)


@pytest.fixture(params=[b for b in _selected() if b != "scipy"])
def dense_backend(request: pytest.FixtureRequest) -> Backend:
    """Like ``backend`` but only libraries with dense arrays of their own."""
    return _make(request.param)


def rtol_for(dtype: Any) -> float:
    """Relative tolerance for comparisons with a float64 NumPy reference."""
    name = np.dtype(dtype).name
    return {"float32": 2e-5, "complex64": 2e-5}.get(name, 1e-12)
