"""How much memory this process may still allocate (the host's, a container's cgroup
limit, ``ulimit -v``), and the check that refuses a run needing more."""

from __future__ import annotations

import contextlib
from pathlib import Path

from .. import _backend as backend
from ._errors import CliError

__all__ = ["available_memory", "check_memory", "format_bytes"]


def format_bytes(count: float) -> str:
    """``count`` bytes as ``"512 bytes"``, ``"1.5 GiB"``."""
    units = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB")
    unit = 0
    while count >= 1024 and unit < len(units) - 1:
        count, unit = count / 1024, unit + 1
    return f"{int(count)} bytes" if unit == 0 else f"{count:.4g} {units[unit]}"


def _cgroup_memory_left() -> int | None:
    """Bytes left under the memory limits of this process's cgroup and those above it (a
    container's limit: cgroup v2 or v1), counting reclaimable page cache as free; ``None``
    where no limit is set or none can be read."""
    root = Path("/sys/fs/cgroup")
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    left = []
    for line in lines:
        number, controllers, own = (line.split(":", 2) + ["", ""])[:3]
        if number == "0" and not controllers:  # v2: one hierarchy
            base, names = root, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):  # v1: the memory controller's hierarchy
            base = root / "memory"
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        folder = base / own.strip().lstrip("/")
        for directory in (folder, *folder.parents):
            if not directory.is_relative_to(base):
                break
            figure = _cgroup_left(directory, *names)
            if figure is not None:
                left.append(figure)
    return min(left) if left else None


def _cgroup_left(directory: Path, limit_name: str, usage_name: str, cache_key: str) -> int | None:
    try:
        text = (directory / limit_name).read_text().strip()
        if text == "max":
            return None
        limit, usage = int(text), int((directory / usage_name).read_text().strip())
    except (OSError, ValueError):
        return None
    if limit >= 1 << 60:  # v1 writes "no limit" as a huge number
        return None
    cache = 0
    with contextlib.suppress(OSError, ValueError):
        for line in (directory / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == cache_key:
                cache = int(value)
    return max(0, limit - usage + cache)


def _address_space_left() -> int | None:
    """Bytes of address space left under ``ulimit -v`` (RLIMIT_AS); ``None`` without one."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY or soft < 0:
            return None
    except (ImportError, OSError, ValueError):
        return None
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith("VmSize:"):
                    return max(0, soft - int(line.split()[1]) * 1024)
    return int(soft)


def available_memory() -> int | None:
    """Bytes this process may still allocate: the host's available memory, or less where a
    container's cgroup limit or an address-space limit leaves less; ``None`` if unknown."""
    known = [
        figure
        for figure in (backend.host_free_memory(), _cgroup_memory_left(), _address_space_left())
        if figure is not None
    ]
    return min(known) if known else None


def check_memory(path: Path, description: str, need: int) -> None:
    """Refuse (CliError) a run on the file ``path``, which declares ``description``, that
    would need ``need`` bytes, more memory than is available."""
    available = available_memory()
    if available is not None and need > available:
        raise CliError(
            f"{path}: the file declares {description}; this run would need about "
            f"{format_bytes(need)} of memory and {format_bytes(available)} is available"
        )
