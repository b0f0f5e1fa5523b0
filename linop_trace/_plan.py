"""What the running estimate asked for, for operators whose products are collectives.

The ranks of a data-parallel operator (``process_group=``) must all run the same
estimate: the same method, quantity and budget. A rank given another budget would make a
product the others never join, and wait for them until the process group's timeout. So
the estimate functions name their plan here while they run (:func:`running`), and such
an operator compares :func:`plan_code` across its ranks on every block.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["plan_code", "running"]

_PLAN: ContextVar[str | None] = ContextVar("linop_trace_plan", default=None)


@contextmanager
def running(plan: str) -> Iterator[None]:
    """Name ``plan`` (a text that two ranks running the same estimate write alike) while
    the block runs."""
    token = _PLAN.set(plan)
    try:
        yield
    finally:
        _PLAN.reset(token)


def plan_code() -> int:
    """A 32-bit code of the running plan (0 outside an estimate): equal on ranks that run
    the same plan, and exactly representable in a float64."""
    plan = _PLAN.get()
    return 0 if plan is None else zlib.crc32(plan.encode())
