"""Dtype questions the array API leaves open: complex or real, the float a dtype promotes to."""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as np

from ._identity import namespace_name

__all__ = [
    "abs2",
    "python_number",
    "complex_dtype_for",
    "conj",
    "default_float_dtype",
    "dtype_of_library",
    "is_complex_dtype",
    "is_float_dtype",
    "is_half_precision",
    "promote_to_float",
    "real_dtype_for",
    "real_part",
]


def is_complex_dtype(xp: Any, dtype: Any) -> bool:
    return xp.isdtype(dtype, "complex floating")


def conj(xp: Any, x: Any) -> Any:
    """``conj(x)`` for complex arrays, ``x`` itself for real ones (no copy)."""
    return xp.conj(x) if is_complex_dtype(xp, x.dtype) else x


def real_part(xp: Any, x: Any) -> Any:
    """``Re(x)`` for complex arrays, ``x`` itself for real ones."""
    return xp.real(x) if is_complex_dtype(xp, x.dtype) else x


def abs2(xp: Any, x: Any) -> Any:
    """``|x|^2`` entrywise, real."""
    return xp.real(xp.conj(x) * x) if is_complex_dtype(xp, x.dtype) else x * x


def is_float_dtype(xp: Any, dtype: Any) -> bool:
    return xp.isdtype(dtype, ("real floating", "complex floating"))


def default_float_dtype(xp: Any, device: Any = None) -> Any:
    """The library's default real floating dtype (float64 in NumPy, float32 in torch)."""
    info = xp.__array_namespace_info__()
    try:
        return info.default_dtypes(device=device)["real floating"]
    except TypeError:  # pragma: no cover - older namespaces without ``device=``
        return info.default_dtypes()["real floating"]


def promote_to_float(xp: Any, dtype: Any, device: Any = None) -> Any:
    """Integer and bool dtypes become the default float; float and complex stay as they are;
    any other (dates, times, strings, objects) is refused: it was taken as float64."""
    try:  # (NumPy's kinds: older array-API layers take dates for numbers)
        kind = np.dtype(dtype).kind
    except TypeError:
        kind = None
    if kind is not None and kind in "mMOSU":
        numeric = False
    elif is_float_dtype(xp, dtype):
        return dtype
    else:
        try:
            numeric = bool(xp.isdtype(dtype, ("integral", "bool")))
        except (TypeError, ValueError):
            numeric = False
    if not numeric:
        raise TypeError(
            f"expected a numeric matrix (float, complex, integer or bool), got dtype {dtype}"
        )
    return default_float_dtype(xp, device)


def complex_dtype_for(xp: Any, dtype: Any) -> Any:
    """The complex dtype with the precision of a real floating ``dtype``: complex64 for
    float32 and the half precisions (whose complex products the libraries lack, and
    which are estimated in single precision), complex128 for float64."""
    if xp.isdtype(dtype, "complex floating"):
        return dtype
    return xp.complex64 if dtype == xp.float32 or is_half_precision(xp, dtype) else xp.complex128


def dtype_of_library(xp: Any, dtype: Any) -> Any:
    """``dtype`` as a dtype of the library ``xp`` (NumPy and JAX take what ``np.dtype``
    takes: names, NumPy types), or ``TypeError`` naming it (torch's ``isdtype`` failed on a
    NumPy dtype with an ``AttributeError`` about ``is_floating_point``)."""
    kinds = ("bool", "integral", "real floating", "complex floating")
    try:
        if array_api_compat.is_numpy_namespace(xp) or array_api_compat.is_jax_namespace(xp):
            dtype = np.dtype(dtype)
        if xp.isdtype(dtype, kinds):
            return dtype
    except Exception:
        pass
    raise TypeError(
        f"`dtype`={dtype!r} is not a dtype of {namespace_name(xp)}, the library of `like`; "
        f"pass one of its dtypes (such as like.dtype)"
    )


def real_dtype_for(xp: Any, dtype: Any) -> Any:
    """The real dtype with the precision of ``dtype`` (complex128 -> float64)."""
    if xp.isdtype(dtype, "complex floating"):
        return xp.float32 if dtype == xp.complex64 else xp.float64
    return dtype


def is_half_precision(xp: Any, dtype: Any) -> bool:
    """Whether ``dtype`` is a 16-bit float (float16, bfloat16) or torch's 32-bit complex."""
    try:
        if xp.isdtype(dtype, "real floating"):
            return int(xp.finfo(dtype).bits) == 16
        if xp.isdtype(dtype, "complex floating"):
            return int(xp.finfo(dtype).bits) <= 16  # finfo of complex32: its parts' bits
    except (TypeError, ValueError):
        return False
    return False


def python_number(x: Any) -> Any:
    """A NumPy scalar as the Python number it holds (others as they are): np.complex64 is
    no ``complex``, and NumPy scalars are not weakly typed (np.float64(2) times a float32
    array of any library is float64, and times an array_api_strict array is NumPy's)."""
    return x.item() if isinstance(x, np.generic) else x
