"""Which library an array, a sparse matrix or a namespace belongs to, and its device."""

from __future__ import annotations

import sys
from typing import Any

import array_api_compat

from ._dask_sparse import is_dask_sparse

__all__ = [
    "array_namespace",
    "describe",
    "device_of",
    "dtype_name",
    "is_sparse",
    "library_name",
    "namespace_name",
    "same_device",
    "is_numpy_namespace",
    "is_scipy_linear_operator",
    "jax_array_layout",
    "numpy_namespace",
]


def _module_loaded(name: str) -> bool:
    return name in sys.modules


def _is_scipy_sparse(x: Any) -> bool:
    if not _module_loaded("scipy.sparse"):
        return False
    import scipy.sparse

    return scipy.sparse.issparse(x)


def _is_torch_sparse(x: Any) -> bool:
    if not _module_loaded("torch"):
        return False
    import torch

    return isinstance(x, torch.Tensor) and x.layout != torch.strided


def _is_jax_sparse(x: Any) -> bool:
    if not _module_loaded("jax.experimental.sparse"):
        return False
    from jax.experimental import sparse as jsparse

    return isinstance(x, jsparse.JAXSparse)


def _is_cupy_sparse(x: Any) -> bool:
    if not _module_loaded("cupyx.scipy.sparse"):
        return False
    import cupyx.scipy.sparse

    return cupyx.scipy.sparse.issparse(x)


def is_sparse(x: Any) -> bool:
    """Whether ``x`` is a sparse matrix of a supported library."""
    return (
        _is_scipy_sparse(x)
        or _is_torch_sparse(x)
        or _is_jax_sparse(x)
        or _is_cupy_sparse(x)
        or is_dask_sparse(x)
    )


def library_name(x: Any) -> str:
    """A short human name for the library that owns ``x`` (used in error messages)."""
    if _is_scipy_sparse(x):
        return "scipy.sparse"
    if _is_cupy_sparse(x):
        return "cupyx.scipy.sparse"
    if _is_jax_sparse(x):
        return "jax"
    if array_api_compat.is_numpy_array(x):
        return "numpy"
    if array_api_compat.is_torch_array(x):
        return "torch"
    if array_api_compat.is_jax_array(x):
        return "jax"
    if array_api_compat.is_cupy_array(x):
        return "cupy"
    namespace_of = getattr(x, "__array_namespace__", None)
    if namespace_of is not None and array_api_compat.is_array_api_strict_namespace(namespace_of()):
        return "array_api_strict"
    module = type(x).__module__.split(".")[0]
    return module or type(x).__name__


def namespace_name(xp: Any) -> str:
    """The library behind an array namespace, for messages."""
    if array_api_compat.is_numpy_namespace(xp):
        return "numpy"
    if array_api_compat.is_torch_namespace(xp):
        return "torch"
    if array_api_compat.is_jax_namespace(xp):
        return "jax"
    if array_api_compat.is_cupy_namespace(xp):
        return "cupy"
    if array_api_compat.is_array_api_strict_namespace(xp):
        return "array_api_strict"
    return getattr(xp, "__name__", repr(xp))


def array_namespace(*arrays: Any) -> Any:
    """The array-api-compat namespace shared by ``arrays`` (sparse matrices included).

    Raises
    ------
    TypeError
        If the arrays come from different libraries (both are named).
    """
    spaces = []
    for a in arrays:
        if _is_scipy_sparse(a):
            import array_api_compat.numpy as np_compat

            spaces.append((np_compat, a))
        elif _is_jax_sparse(a):
            import jax.numpy as jnp

            spaces.append((jnp, a))
        elif _is_cupy_sparse(a):
            import array_api_compat.cupy as cp_compat

            spaces.append((cp_compat, a))
        else:
            try:
                spaces.append((array_api_compat.array_namespace(a), a))
            except TypeError:
                raise TypeError(
                    f"expected an array of a supported library (numpy, scipy.sparse, torch, "
                    f"jax, cupy or any array API library), got {type(a).__module__}."
                    f"{type(a).__name__}"
                ) from None
    first_xp, first = spaces[0]
    for xp, a in spaces[1:]:
        if xp is not first_xp:
            raise TypeError(
                f"arrays of two libraries are mixed: {describe(first)} and {describe(a)}"
            )
    return first_xp


def device_of(x: Any) -> Any:
    """The device that holds ``x``."""
    if _is_scipy_sparse(x) or is_dask_sparse(x):  # (Dask's sparse chunks: host memory)
        return "cpu"
    if _is_jax_sparse(x):
        return array_api_compat.device(x.data)
    if _is_cupy_sparse(x):
        return array_api_compat.device(x.data)
    return _mesh_placement(array_api_compat.device(x))


def _mesh_placement(device: Any) -> Any:
    """A JAX array sharded over a mesh reports its ``NamedSharding``, whose partition
    spec has the array's rank: arrays of other ranks made ``device=`` it (a 0-d value,
    a vector) would be refused. Its device is the mesh, replicated (``P()`` fits every
    rank); other devices are returned as they are."""
    if not _module_loaded("jax"):
        return device
    from jax.sharding import NamedSharding, PartitionSpec

    if isinstance(device, NamedSharding) and len(device.device_set) > 1:
        return NamedSharding(device.mesh, PartitionSpec(), memory_kind=device.memory_kind)
    return device


def same_device(a: Any, b: Any) -> bool:
    """Whether two device objects name the same device."""
    return a == b or str(a) == str(b)


def dtype_name(dtype: Any) -> str:
    """``float64`` rather than ``torch.float64`` or ``dtype('float64')``."""
    text = str(dtype)
    for prefix in ("torch.", "array_api_strict.", "dtype("):
        text = text.replace(prefix, "")
    return text.strip("')\"")


def describe(x: Any) -> str:
    """``'a torch array on cpu (float32, shape (3, 4))'`` for error messages."""
    shape = tuple(getattr(x, "shape", ()))
    dtype = getattr(x, "dtype", None)
    kind = "sparse matrix" if is_sparse(x) else "array"
    try:
        dev = device_of(x)
    except Exception:  # pragma: no cover - exotic objects
        dev = "?"
    return f"a {library_name(x)} {kind} on {dev} ({dtype_name(dtype)}, shape {shape})"


def is_scipy_linear_operator(obj: Any) -> bool:
    """Whether ``obj`` is a :class:`scipy.sparse.linalg.LinearOperator` (without importing
    SciPy's linalg when the caller has not)."""
    if "scipy.sparse.linalg" not in sys.modules:
        return False
    import scipy.sparse.linalg as spla

    return isinstance(obj, spla.LinearOperator)


def numpy_namespace() -> Any:
    """array-api-compat's NumPy namespace: the library of operators built from NumPy
    functions and of SciPy's operators."""
    import array_api_compat.numpy as np_compat

    return np_compat


def is_jax_array(x: Any) -> bool:
    """Whether ``x`` is a JAX array, a tracer under a JAX transformation included. Concrete
    JAX arrays are immutable: what is derived from one stays valid while it lives."""
    return array_api_compat.is_jax_array(x)


def jax_array_layout(x: Any) -> tuple[Any, ...] | None:
    """What a compiled program and an operator of the concrete JAX array ``x`` see of it
    but its values (its type, shape, dtype, weak typing and sharding), as a tuple that
    compares equal for arrays that one program serves alike; ``None`` for anything
    else (a tracer, another library's array)."""
    if not _module_loaded("jax"):
        return None
    import jax

    if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
        return None
    return (type(x), x.shape, x.dtype, x.weak_type, x.sharding)


def is_numpy_namespace(xp: Any) -> bool:
    """Whether ``xp`` is NumPy's namespace (array-api-compat's or NumPy itself)."""
    return array_api_compat.is_numpy_namespace(xp)
