"""The loaded NumPy/SciPy matrix in the array library and on the device the user asked
for (``--backend``, ``--device``, ``--dtype``): the only conversions the command line
needs, kept here rather than in the library, whose operators keep the user's own arrays."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._errors import CliError

__all__ = [
    "DTYPES",
    "LIBRARIES",
    "default_dtype",
    "enable_float64",
    "from_numpy",
    "import_library",
    "resolve_device",
    "sparse_from_scipy",
    "to_library",
]

#: Compute dtypes ``--dtype`` offers.
DTYPES = ("float32", "float64", "complex64", "complex128")


#: Libraries a matrix can be moved to with :func:`from_numpy` / :func:`sparse_from_scipy`.
LIBRARIES = ("numpy", "torch", "jax", "cupy")


def import_library(library: str) -> Any:
    """Import and return ``library`` (one of :data:`LIBRARIES`).

    Raises
    ------
    ValueError
        For a name that is not one of :data:`LIBRARIES`.
    ImportError
        When the library is not installed (the message names it).
    """
    if library not in LIBRARIES:
        raise ValueError(f"unknown backend {library!r}; known backends are {', '.join(LIBRARIES)}")
    try:
        if library == "jax":
            import jax
            import jax.numpy  # noqa: F401

            return jax
        import importlib

        return importlib.import_module(library)
    except ImportError:
        raise ImportError(f"backend {library!r} needs {library}, which is not installed") from None


def resolve_device(library: str, device: str | None) -> Any:
    """The device object of ``library`` named by ``device`` (``"cpu"``, ``"cuda:0"``, ...).

    ``None`` means the library's default (the CPU for NumPy and torch).

    Raises
    ------
    ValueError
        If the name is malformed or the device is not present on this machine.
    """
    lib = import_library(library)
    if library == "numpy":
        if device not in (None, "cpu"):
            raise ValueError(f"device {device!r} is not available to numpy (only 'cpu')")
        return "cpu"
    if library == "torch":
        if device is None:
            return lib.device("cpu")
        try:
            parsed = lib.device(device)
        except (RuntimeError, ValueError, TypeError):
            raise ValueError(f"{device!r} is not a torch device name") from None
        if parsed.type == "cuda":
            if not lib.cuda.is_available():
                raise ValueError(
                    f"device {device!r} is not available to torch: CUDA is not available here"
                )
            count = lib.cuda.device_count()
            if parsed.index is not None and parsed.index >= count:
                raise ValueError(
                    f"device {device!r} is not available to torch: {count} CUDA devices"
                )
        elif parsed.type != "cpu":
            try:
                lib.empty(0, device=parsed)
            except Exception:
                raise ValueError(f"device {device!r} is not available to torch here") from None
        return parsed
    if library == "jax":
        if device is None:
            return lib.devices()[0]
        platform, _, index_text = str(device).partition(":")
        try:
            index = int(index_text) if index_text else 0
        except ValueError:
            raise ValueError(f"{device!r} is not a jax device name (e.g. 'cpu', 'gpu:0')") from None
        try:
            devices = lib.devices(platform)
        except RuntimeError:
            present = sorted({d.platform for d in lib.devices()})
            raise ValueError(
                f"device {device!r} is not available to jax: platforms present are "
                f"{', '.join(present)}"
            ) from None
        if not 0 <= index < len(devices):
            raise ValueError(
                f"device {device!r} is not available to jax: {len(devices)} {platform} devices"
            )
        return devices[index]
    # cupy
    try:
        count = lib.cuda.runtime.getDeviceCount()
    except Exception as error:  # pragma: no cover - needs cupy without a driver
        raise ValueError(f"cupy is installed but CUDA is unusable: {error}") from None
    platform, _, index_text = str(device or "cuda").partition(":")  # pragma: no cover
    if platform not in ("cuda", "gpu"):  # pragma: no cover
        raise ValueError(f"device {device!r} is not available to cupy (CUDA devices only)")
    index = int(index_text) if index_text else 0  # pragma: no cover
    if not 0 <= index < count:  # pragma: no cover
        raise ValueError(f"device {device!r} is not available to cupy: {count} CUDA devices")
    return lib.cuda.Device(index)  # pragma: no cover


def enable_float64(library: str) -> None:
    """Let ``library`` hold 64-bit floats (JAX keeps them off unless asked; a global switch)."""
    if library == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)


def _native_dtype(lib: Any, library: str, dtype: Any) -> Any:
    name = np.dtype(dtype).name
    if library == "jax":
        import jax.numpy as jnp

        return getattr(jnp, name)
    return getattr(lib, name)


def from_numpy(array: np.ndarray, library: str, device: Any = None, dtype: Any = None) -> Any:
    """A dense array of ``library`` on ``device`` holding the NumPy ``array``.

    Parameters
    ----------
    array : numpy.ndarray
    library : {"numpy", "torch", "jax", "cupy"}
    device : device object or str, optional
        As returned by :func:`resolve_device` (strings are resolved with it).
    dtype : numpy dtype or name, optional
        Cast to this dtype first (default: keep the array's dtype).

    Examples
    --------
    >>> import numpy as np
    >>> from linop_trace.cli._libraries import from_numpy
    >>> from_numpy(np.eye(2), "numpy", dtype="float32").dtype
    dtype('float32')
    """
    array = np.asarray(array)
    if dtype is not None:
        array = array.astype(np.dtype(dtype), copy=False)
    if device is None or isinstance(device, str):
        device = resolve_device(library, device)
    lib = import_library(library)
    if library == "numpy":
        return array
    if library == "torch":
        return lib.from_numpy(np.ascontiguousarray(array)).to(device)
    if library == "jax":
        native = _native_dtype(lib, library, array.dtype)
        return lib.device_put(lib.numpy.asarray(array, dtype=native), device)
    with device:  # pragma: no cover - needs a GPU
        return lib.asarray(array)


def sparse_from_scipy(matrix: Any, library: str, device: Any = None, dtype: Any = None) -> Any:
    """A sparse matrix of ``library`` on ``device`` holding the SciPy sparse ``matrix``.

    SciPy stays SciPy (CSR); torch gets a CSR tensor, JAX a ``BCOO``, CuPy a cupyx CSR.

    Examples
    --------
    >>> import scipy.sparse as sp
    >>> from linop_trace.cli._libraries import sparse_from_scipy
    >>> sparse_from_scipy(sp.eye(3), "numpy").format
    'csr'
    """
    import warnings

    import scipy.sparse as sp

    matrix = sp.csr_array(matrix)
    if dtype is not None:
        matrix = matrix.astype(np.dtype(dtype))
    matrix.sum_duplicates()
    if device is None or isinstance(device, str):
        device = resolve_device(library, device)
    lib = import_library(library)
    if library == "numpy":
        return matrix
    if library == "torch":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return lib.sparse_csr_tensor(
                lib.from_numpy(matrix.indptr.astype(np.int64)),
                lib.from_numpy(matrix.indices.astype(np.int64)),
                lib.from_numpy(np.ascontiguousarray(matrix.data)),
                size=matrix.shape,
                check_invariants=False,  # SciPy's sum_duplicates above made it canonical
            ).to(device)
    if library == "jax":
        from jax.experimental import sparse as jsparse

        coo = matrix.tocoo()
        native = _native_dtype(lib, library, coo.dtype)
        indices = np.stack([coo.row, coo.col], axis=1).astype(np.int32)
        data = lib.numpy.asarray(coo.data, dtype=native)
        bcoo = jsparse.BCOO((data, lib.numpy.asarray(indices)), shape=coo.shape)
        return lib.device_put(bcoo, device)
    import cupyx.scipy.sparse as csp  # pragma: no cover - needs a GPU

    with device:  # pragma: no cover
        return csp.csr_matrix(matrix)


def default_dtype(matrix: Any) -> str:
    """The compute dtype of ``matrix`` without ``--dtype``: its own where it is one of
    :data:`DTYPES`, else complex128 for complex entries and float64 for the rest."""
    dtype = np.dtype(matrix.dtype)
    if dtype.kind in "fc" and dtype.name in DTYPES:
        return dtype.name
    if dtype.kind == "c":
        return "complex128"
    return "float64"  # integer, bool, float16: the estimates need a float


def to_library(matrix: Any, library: str, device: str | None, dtype: str) -> Any:
    """The NumPy/SciPy ``matrix`` in ``library`` on ``device`` as ``dtype`` (sparse stays
    sparse); CliError when the library is not installed."""
    import scipy.sparse as sp

    try:
        resolved = resolve_device(library, device)
    except ImportError as error:
        raise CliError(str(error)) from None
    if dtype in ("float64", "complex128"):
        enable_float64(library)
    if sp.issparse(matrix):
        return sparse_from_scipy(matrix, library, resolved, dtype)
    return from_numpy(matrix, library, resolved, dtype)
