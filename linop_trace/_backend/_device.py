"""Device-resident execution: values read only where reads are free, decisions on the device.

Estimators never read a value of a device library (torch, CuPy, JAX) on the host while
they run: a read waits for the device. They ask here instead whether a value can be read
for free (NumPy and array_api_strict compute on the host, so their values are there
already) and take a path that needs no value otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import array_api_compat
import numpy as np

from ._compiled import jit
from ._identity import _module_loaded, namespace_name
from ._transfer import to_numpy

__all__ = [
    "all_finite",
    "can_branch",
    "concrete_float",
    "copied",
    "mutation_stamp",
    "owned",
    "placed",
    "concrete_floats",
    "device_cond",
    "finite_flag",
    "is_accelerator",
    "is_concrete",
    "is_tracer",
    "known_value",
    "prefers_whole_arrays",
    "product_into",
    "read_bool",
    "read_float",
    "read_floats",
    "reads_are_free",
    "start_host_copies",
    "stop_gradient",
    "writes_in_place",
]


def stop_gradient(x: Any) -> Any:
    """``x`` cut from automatic differentiation (torch ``detach``, JAX ``stop_gradient``).

    For statistics that only steer the computation (interval shape, stopping tests):
    they may then be turned into Python numbers without touching the gradient of the
    estimate. Other libraries: ``x`` itself.
    """
    if array_api_compat.is_torch_array(x):
        return x.detach()
    if array_api_compat.is_jax_array(x):
        import jax

        if not isinstance(x, jax.core.Tracer):  # a concrete array carries no gradient
            return x  # (and eagerly stop_gradient is a 15 us dispatch)
        return jax.lax.stop_gradient(x)
    return x


def is_concrete(x: Any) -> bool:
    """Whether ``x`` has a value now (False for an abstract JAX tracer, e.g. under ``jit``)."""
    if not _TRACER:  # (JAX's tracer class, looked up once JAX is loaded)
        if not _module_loaded("jax"):
            return True
        import jax

        _TRACER.append(jax.core.Tracer)
    return not isinstance(x, _TRACER[0])


_TRACER: list[type] = []


def all_finite(xp: Any, x: Any) -> bool | None:
    """Whether every entry of ``x`` is finite; ``None`` when ``x`` has no value yet (JAX
    jit).

    The sum first: one pass with no boolean ``(n, k)`` temporary (torch's entrywise test
    takes 1.4 ms for 4000 x 100 entries, its sum 0.3 ms). A finite sum proves every entry
    finite (a NaN or an infinity makes the sum NaN or infinite); only a sum that is not
    finite, which finite entries can also give by overflowing, runs the entrywise test."""
    with np.errstate(over="ignore", invalid="ignore"):  # NumPy's warnings: not the user's
        total = stop_gradient(xp.sum(x))
    if not is_concrete(total):
        return None
    if bool(xp.isfinite(total)):
        return True
    return bool(xp.all(xp.isfinite(stop_gradient(x))))


def concrete_float(x: Any) -> float | None:
    """``float(x)`` of a real scalar without its gradient; ``None`` when it has no value yet
    (an abstract JAX tracer), so callers can take a path that needs no concrete number."""
    x = stop_gradient(x)
    if not is_concrete(x):
        return None
    return float(x)


def concrete_floats(x: Any) -> list[float] | None:
    """The entries of a real vector as Python floats in one transfer (no gradient);
    ``None`` when it has no value yet (an abstract JAX tracer)."""
    x = stop_gradient(x)
    if not is_concrete(x):
        return None
    return [float(value) for value in to_numpy(x).tolist()]


def reads_are_free(xp: Any) -> bool:
    """Whether reading a value of this library costs no wait for a device (NumPy,
    array_api_strict: host libraries whose operations have finished when they return)."""
    return array_api_compat.is_numpy_namespace(
        xp
    ) or array_api_compat.is_array_api_strict_namespace(xp)


def known_value(xp: Any, x: Any) -> Any:
    """``x`` as a Python number when reading it costs nothing (:func:`reads_are_free`), else
    ``None``: the caller then takes the path that works without the value."""
    if not reads_are_free(xp):
        return None
    x = stop_gradient(x)
    if xp.isdtype(x.dtype, "bool"):
        return bool(x)
    return float(x)


def read_float(x: Any) -> float | None:
    """``float(x)`` of a real scalar without its gradient, waiting for the device if it must
    (adaptive runs, once per round; estimates read lazily); ``None`` for a tracer."""
    return concrete_float(x)


def start_host_copies(arrays: Any) -> None:
    """Start copying accelerator arrays that the host will read soon (an estimate's
    finiteness flags) as soon as they are computed: JAX's ``copy_to_host_async``, so that
    the read finds the copy done instead of waiting for a transfer after the program.

    A no-op for other libraries, for tracers and for arrays on JAX's CPU, which the host
    reads in place: there the call queues work of its own beside the program (JAX 0.10:
    a Hutchinson estimate at n = 512, m = 20 took 1.32-1.35 of a 512 x 20 product with
    it, 1.26 without; at n = 200, 2.05-2.49 against 1.89-2.13)."""
    for x in arrays:
        if array_api_compat.is_jax_array(x) and is_concrete(x) and not _on_host(x):
            x.copy_to_host_async()


def _on_host(x: Any) -> bool:
    """Whether a concrete JAX array lives on a CPU device (the host's memory)."""
    return all(device.platform == "cpu" for device in x.devices())


def read_bool(x: Any) -> bool:
    """A 0-d boolean array read on the host (waiting for the device). JAX's NumPy view is
    read faster than its ``bool`` (which adds tens of microseconds per call), and after
    ``block_until_ready``: the view of an array not computed yet waits longer (every
    estimate reads its checks so: 4-5 us of a 512 x 20 product's 256 on the CPU)."""
    if array_api_compat.is_jax_array(x):
        if is_concrete(x):  # (a tracer raises JAX's own error below)
            x.block_until_ready()
        return bool(np.asarray(x))
    return bool(x)


def read_floats(xp: Any, scalars: list[Any]) -> list[float] | None:
    """Real 0-d arrays read on the host in one transfer (one device wait); ``None`` under
    a JAX trace. ``None`` entries stay ``None``."""
    present = [x for x in scalars if x is not None]
    if not present:
        return [None] * len(scalars)  # type: ignore[list-item]
    dtype = present[0].dtype
    stacked = xp.stack(
        [stop_gradient(x if x.dtype == dtype else xp.astype(x, dtype)) for x in present]
    )
    numbers = concrete_floats(stacked)
    if numbers is None:
        return None
    values = iter(numbers)
    return [None if x is None else next(values) for x in scalars]  # type: ignore[misc]


def is_tracer(x: Any) -> bool:
    """Whether ``x`` is an abstract JAX value (inside ``jit``, ``grad``, ``vmap``)."""
    return not is_concrete(x)


def is_lazy(x: Any) -> bool:
    """Whether ``x`` is a value not computed yet: a JAX tracer, or a Dask array (a graph).
    A lazy product's finiteness is best read from what it flows into (one pass, fused
    with the work), not from a pass of its own."""
    if is_tracer(x):
        return True
    if not _module_loaded("dask"):
        return False
    return bool(array_api_compat.is_dask_array(x))


#: Entries up to which :func:`finite_flag` tests ``all(0 * x == 0)`` on torch and CuPy
#: (its temporaries are small): fewer operations than the large arrays' passes.
SMALL_FINITE_CHECK = 2**12


def finite_flag(xp: Any, x: Any) -> Any:
    """A 0-d boolean array: whether every entry of ``x`` is finite, computed where ``x``
    lives (no read). ``sum(x - x)`` is 0 for finite entries and NaN otherwise, and never
    overflows, unlike ``sum(x)`` (``sum(0 * x)`` too, but XLA's CPU compiler makes that a
    product with a block of zeros it writes out: XDiag at n = 512 under JAX went from 1.96
    to 1.92 of its floor with the difference); on NumPy the plain sum (one pass, no temporary) decides
    when it is finite; under JAX one compiled program. On torch and CuPy, arrays of up to
    :data:`SMALL_FINITE_CHECK` entries (the samples or row sums that carry a product's
    check) are tested as ``all(0 * x == 0)``, and larger ones on torch's CPU by their least
    and largest entries (``aminmax``: no temporary). (On torch's CPU ``all(isfinite(x))``
    takes 3.5x as long as ``sum(0 * x)``: 4.4 ms against 1.3 ms for a (10^5, 20) block.)"""
    x = stop_gradient(x)
    if array_api_compat.is_numpy_namespace(xp):
        return np.bool_(all_finite(xp, x))
    if array_api_compat.is_jax_namespace(xp):  # eagerly one program, not three operations
        return jit(xp, _zero_sum_finite)(xp, x)
    if math.prod(x.shape) <= SMALL_FINITE_CHECK:
        # a small result (samples, row sums) on torch or CuPy: 0 * x is 0 where x is
        # finite and NaN elsewhere, in three operations, each a kernel launch on a GPU
        # (torch's isfinite is four: abs, two comparisons and a product; aminmax, seven)
        return xp.all(x * 0 == 0)
    if array_api_compat.is_torch_array(x) and x.device.type == "cpu":
        import torch

        # the least and largest entries, in one pass with no (n, k) temporary: 0.43 ms
        # against 1.4 ms for sum(0 * x) on a (10^5, 20) block, whose fresh temporary is
        # faulted in page by page where the allocator returned it to the system (SLQ on
        # a sparse Laplacian: 12 000 page faults a step). Both finite, or a NaN or an
        # infinity among the entries; the halves' sum cannot overflow.
        low, high = torch.aminmax(torch.view_as_real(x) if x.is_complex() else x)
        return torch.isfinite(torch.add(low * 0.5, high, alpha=0.5))
    return _zero_sum_finite(xp, x)


def _zero_sum_finite(xp: Any, x: Any) -> Any:
    # x - x is 0 where x is finite and NaN elsewhere; x * 0 is too, but XLA's CPU compiler
    # turns the sum of x * 0 into a product with a block of zeros that it writes out
    return xp.isfinite(xp.sum(x - x))


def prefers_whole_arrays(xp: Any, device: Any) -> bool:
    """Whether row-block loops (sized for a CPU cache) should process the whole array at
    once: under JAX (one fused program) and on accelerators (one kernel per operation, each
    launch costs more than the cache saves)."""
    if array_api_compat.is_jax_namespace(xp):
        return True
    return not str(device).lower().startswith("cpu") and str(device) not in ("", "None")


def product_into(matrix: Any, block: Any, out: Any) -> Any:
    """``matrix @ block`` written into ``out`` (an array of the product's shape and dtype,
    distinct from both factors) and returned, where the library can: a NumPy array, a
    torch CPU matrix (dense or CSR) with no gradient through it or the block. ``None``
    where it cannot (the caller makes a fresh product).

    For loops that multiply a block of one shape again and again (Lanczos): a fresh
    (n, k) result at every step is faulted in page by page wherever the allocator gave the
    last one back to the system. torch's CSR product of a 2-d Laplacian at n = 10^5 with
    20 columns took 18 ms instead of 5 ms that way, and SLQ's 30 steps faulted in 1.4 GB."""
    if not (writes_in_place(block) and writes_in_place(out)):
        return None
    if type(matrix) is np.ndarray and type(block) is np.ndarray:
        return np.matmul(matrix, block, out=out)
    if array_api_compat.is_torch_array(matrix) and array_api_compat.is_torch_array(block):
        import torch

        usable = matrix.layout in (torch.strided, torch.sparse_csr) and matrix.ndim == 2
        # (no out= where torch differentiates in any mode: forward-mode AD and torch.func
        # refuse it, and their tensors need not require a gradient)
        if usable and matrix.device == out.device and not _torch_differentiating((matrix,)):
            return torch.mm(matrix, block, out=out)
    return None


def _torch_differentiating(arrays: Any) -> bool:
    """Whether torch may differentiate through ``arrays``: reverse mode (an array that
    requires a gradient, with grad mode on), a forward-mode dual level, or a torch.func
    transform. Elsewhere the Function is skipped: always on, an NA-Hutch++ estimate at
    n = 200 took 736 - 748 us against 616 - 634 on the parent. Where torch lacks the
    private flags read here, assume so."""
    import torch

    if torch.is_grad_enabled() and any(x.requires_grad for x in arrays):
        return True
    from torch.autograd import forward_ad

    if getattr(forward_ad, "_current_level", 0) >= 0:
        return True
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return True if active is None else bool(active())


def writes_in_place(x: Any) -> bool:
    """Whether results may be written into existing arrays like ``x`` (``out=``): NumPy
    arrays, and torch tensors on the CPU that no gradient flows through. A fresh large
    result there is faulted in page by page, which costs more than the arithmetic of a
    cheap elementwise pass; GPU allocators reuse their memory, JAX arrays are immutable,
    and autograd refuses ``out=`` on tensors it records."""
    if type(x) is np.ndarray:
        return True
    if array_api_compat.is_torch_array(x):
        return x.device.type == "cpu" and not _torch_differentiating((x,))
    return False


def is_accelerator(device: Any) -> bool:
    """Whether ``device`` is a GPU (or another accelerator) rather than the CPU."""
    text = str(device).lower()
    platform = getattr(device, "platform", None)
    if platform is not None:
        return str(platform).lower() != "cpu"
    return not (text.startswith("cpu") or text in ("", "none"))


def device_cond(
    xp: Any,
    flag: Any,
    if_true: Callable[..., Any],
    if_false: Callable[..., Any],
    *operands: Any,
) -> Any:
    """``if_true(*operands)`` where ``flag`` holds, else ``if_false(*operands)``, decided
    without a host read: ``jax.lax.cond`` under JAX (only the taken branch runs), a host
    ``if`` where reads are free. Other libraries cannot branch on the device:
    ``NotImplementedError`` (callers check :func:`can_branch` first)."""
    known = known_value(xp, flag)
    if known is None and array_api_compat.is_jax_namespace(xp) and not is_tracer(flag):
        # eager JAX (operators of user functions, adaptive rounds) runs op by op anyway:
        # read the flag rather than trace both branches anew at every call
        known = bool(np.asarray(flag))
    if known is not None:
        return if_true(*operands) if known else if_false(*operands)
    if array_api_compat.is_jax_namespace(xp):
        import jax

        return jax.lax.cond(flag, if_true, if_false, *operands)
    raise NotImplementedError(f"{namespace_name(xp)} cannot branch on a device value")


def can_branch(xp: Any) -> bool:
    """Whether :func:`device_cond` works for this library (host libraries and JAX)."""
    return reads_are_free(xp) or array_api_compat.is_jax_namespace(xp)


def placed(x: Any, device: Any) -> Any:
    """A JAX array made by a compiled program, on ``device`` (a JAX device or sharding;
    ``None``: where it is). Inside ``jax.jit`` an array made from nothing lands on the
    default device whatever ``device`` it was made with, and an operator on another
    device refuses it; moved there (an explicit copy between devices, which the transfer
    guard allows), or as it is where it is there already (``device_put`` would cost 16 us
    and a new array)."""
    if device is None or not array_api_compat.is_jax_array(x) or is_tracer(x):
        return x  # (other libraries' arrays are made where they are asked to be)
    import jax

    if isinstance(device, jax.sharding.Sharding):
        if x.sharding == device:
            return x
    elif x.sharding.device_set == {device}:  # (uncommitted there: it goes with any)
        return x
    return jax.device_put(x, device)


def copied(xp: Any, x: Any) -> Any:
    """A copy of ``x`` that keeps its autograd graph: torch's ``clone`` (its ``asarray``
    with ``copy=True`` warns that it will follow the input's ``requires_grad`` only from
    torch 2.13 on, and dropped the graph before), ``xp.asarray(x, copy=True)`` elsewhere."""
    if array_api_compat.is_torch_array(x):
        return x.clone()
    return xp.asarray(x, copy=True)


def owned(xp: Any, x: Any) -> Any:
    """``x`` as an array that shares no memory with the caller's: a copy (:func:`copied`)
    where arrays can be written in place, ``x`` itself where they cannot (JAX arrays and
    tracers, Dask's lazy arrays: no copy to dispatch). For results that are views of the
    caller's data, such as a stored matrix's diagonal."""
    if array_api_compat.is_jax_array(x) or array_api_compat.is_dask_array(x):
        return x
    return copied(xp, x)


def mutation_stamp(x: Any) -> Any:
    """What changes when ``x`` is written in place, so that a value derived from it (a
    cast copy, an adjoint) can be kept while the stamp is the same: torch's version
    counter; a constant for arrays that cannot be written (JAX, Dask); ``None`` (keep
    nothing derived) for the others, whose writes leave no trace (NumPy, SciPy, CuPy)."""
    if array_api_compat.is_torch_array(x):
        try:
            return x._version
        except RuntimeError:  # (tensors made under inference_mode count no versions)
            return None
    if array_api_compat.is_jax_array(x) or array_api_compat.is_dask_array(x):
        return 0
    module = type(x).__module__
    if module.startswith(("jax", "dask")):  # (sparse: BCOO, Dask arrays of sparse chunks)
        return 0
    return None
