"""Free memory of the host and of devices, for block sizes."""

from __future__ import annotations

from typing import Any

import array_api_compat

__all__ = ["free_memory", "host_free_memory"]


def free_memory(xp: Any, device: Any) -> int | None:
    """Bytes free on ``device`` for new arrays (``None`` when the library does not say).

    CUDA devices report their own free memory (torch, CuPy, JAX's memory statistics); on
    the CPU it is the memory the operating system reports available."""
    try:
        if (xp, device) in _HOST_FIGURE:
            return host_free_memory()
    except TypeError:  # (an unhashable device)
        pass
    text = str(device).lower()
    try:
        if array_api_compat.is_torch_namespace(xp) and text.startswith("cuda"):
            import torch

            free, _ = torch.cuda.mem_get_info(device)
            return int(free)
        if array_api_compat.is_cupy_namespace(xp):
            import cupy

            with cupy.cuda.Device(getattr(device, "id", 0)):
                free, _ = cupy.cuda.runtime.memGetInfo()
            pool = cupy.get_default_memory_pool()
            return int(free + pool.free_bytes())  # blocks the pool holds are reusable
        if array_api_compat.is_jax_namespace(xp) and device is not None:
            stats = device.memory_stats() if hasattr(device, "memory_stats") else None
            if stats and "bytes_limit" in stats:
                return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    except Exception:  # a device that cannot say: fall back to the host's figure
        return host_free_memory()
    try:
        _HOST_FIGURE.add((xp, device))
    except TypeError:
        pass
    return host_free_memory()


#: (library, device) pairs whose free memory is the host's (CPU devices): known after
#: the first question, so that later ones (at every repeated estimate) skip the tests.
_HOST_FIGURE: set[tuple[Any, Any]] = set()


_HOST_MEMORY: list[float] = []


#: Seconds a reading of the host's free memory is reused (block sizes need no more).
HOST_MEMORY_SECONDS = 1.0


def host_free_memory() -> int | None:
    """``MemAvailable`` of /proc/meminfo (Linux), else free physical pages, else None;
    read at most once per ``HOST_MEMORY_SECONDS``."""
    import time

    now = time.monotonic()
    if _HOST_MEMORY and now - _HOST_MEMORY[0] < HOST_MEMORY_SECONDS:
        return int(_HOST_MEMORY[1]) if _HOST_MEMORY[1] >= 0 else None
    value = _read_host_free_memory()
    _HOST_MEMORY[:] = [now, -1 if value is None else value]
    return value


def _read_host_free_memory() -> int | None:
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import os

        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None
