"""Reporting a result: the text table or the JSON object of a trace, diagonal or row sums,
with its interval, and the notes that say why something is missing or unused."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from typing import Any

import numpy as np

from .. import _backend as backend
from .._estimate import Estimate, EstimateInterrupted
from .._operators import LinearOperator

__all__ = [
    "Result",
    "describe_operator",
    "format_number",
    "interval_of",
    "partial_summary",
    "plain",
    "stored_diagonal_note",
]

#: Vector entries shown on the terminal (the rest goes to --output).
SHOWN_ENTRIES = 10
#: The fields of a result that hold the vector (or the scalar) itself.
VALUE_FIELDS = ("value", "stderr", "interval")
#: Estimation options a result read from the stored diagonal leaves unused: (attribute, flag).
EXACT_UNUSED = (
    ("matvecs", "--matvecs"),
    ("max_matvecs", "--max-matvecs"),
    ("rtol", "--rtol"),
    ("atol", "--atol"),
    ("seed", "--seed"),
    ("probe", "--probe"),
    ("block_size", "--block-size"),
)


def interval_of(estimate: Estimate, confidence: float) -> Any:
    """The estimate's own ``confidence`` interval as NumPy ``(low, high)``; ``None`` for a
    method without an error estimate or a complex value."""
    if estimate.stderr is None or np.iscomplexobj(backend.to_numpy(estimate.value)):
        return None
    low, high = estimate.ci(confidence)
    return backend.to_numpy(low), backend.to_numpy(high)


def plain(x: Any) -> Any:
    """A NumPy scalar/array as JSON-ready Python (complex as {"real", "imag"})."""
    if x is None:
        return None
    a = np.asarray(x)
    if np.iscomplexobj(a):
        return {"real": plain(a.real), "imag": plain(a.imag)}
    if a.ndim == 0:
        value = float(a)
        return value if math.isfinite(value) else None
    return [v if math.isfinite(v) else None for v in a.astype(float).tolist()]


def format_number(x: Any, digits: int = 10) -> str:
    value = complex(x) if np.iscomplexobj(np.asarray(x)) else float(x)
    if isinstance(value, complex):
        return f"{value.real:.{digits}g}{value.imag:+.{digits}g}j"
    return f"{value:.{digits}g}"


def _no_interval_reason(value: np.ndarray) -> str | None:
    """Why a value that has a stderr shows no interval (``Estimate.ci`` refuses complex
    values: their stderr is of the modulus of the error, not of each part)."""
    if not np.iscomplexobj(value):
        return None
    what = "value" if value.ndim == 0 else "values"
    return f"none for complex {what}: stderr is of the modulus |error|, not of each part"


@dataclasses.dataclass
class Result:
    """One computed quantity, ready to print.

    ``fields`` are the JSON object's, in order, with ``value``, ``stderr`` and
    ``interval`` left ``None``: those are kept as NumPy here and become n Python floats
    only for JSON.
    """

    fields: dict[str, Any]
    value: np.ndarray
    stderr: np.ndarray | None
    interval: tuple[np.ndarray, np.ndarray] | None

    @classmethod
    def of(
        cls,
        quantity: str,
        estimate: Estimate,
        seconds: float,
        confidence: float,
        extra: dict[str, Any],
    ) -> Result:
        fields = {
            "quantity": quantity,
            **extra,
            "method": estimate.method,
            "value": None,
            "stderr": None,
            "interval": None,
            "confidence": confidence,
            "matvecs": int(estimate.num_matvecs),
            "converged": estimate.converged,
            "seconds": seconds,
        }
        stderr = None if estimate.stderr is None else backend.to_numpy(estimate.stderr)
        return cls(
            fields, backend.to_numpy(estimate.value), stderr, interval_of(estimate, confidence)
        )

    def json(self) -> str:
        """One line of JSON; with ``--output`` it names the file instead of the vector."""
        if self.fields.get("output"):
            return json.dumps({k: v for k, v in self.fields.items() if k not in VALUE_FIELDS})
        interval = self.interval
        return json.dumps(
            {
                **self.fields,
                "value": plain(self.value),
                "stderr": plain(self.stderr),
                "interval": None if interval is None else [plain(interval[0]), plain(interval[1])],
            }
        )

    def text(self) -> str:
        """The table a person reads: value, stderr, interval, method, notes, outputs, and
        the first SHOWN_ENTRIES entries of a vector not written to a file."""
        fields, value, stderr, interval = self.fields, self.value, self.stderr, self.interval
        rows = [("file", f"{fields['file']} ({fields['description']})")]
        level = level_text(fields["confidence"])
        if value.ndim == 0:
            rows.append((fields["quantity"], format_number(value)))
            rows.append(("stderr", "n/a" if stderr is None else format_number(stderr, 4)))
            if interval is not None:
                rows.append(
                    (f"{level} CI", f"[{format_number(interval[0])}, {format_number(interval[1])}]")
                )
        if fields.get("systematic_error") is not None:  # SLQ's bound, inside the interval
            rows.append(
                (
                    "quadrature",
                    f"{format_number(fields['systematic_error'], 4)} (estimated quadrature "
                    "error, included in the CI)",
                )
            )
        reason = None if stderr is None or interval is not None else _no_interval_reason(value)
        if reason is not None:
            rows.append((f"{level} CI", reason))
        seed = (
            ""
            if fields.get("seed") is None or fields["method"] == "exact"
            else f", seed {fields['seed']}"
        )
        matvecs = f"{fields['matvecs']} matvec{'' if fields['matvecs'] == 1 else 's'}"
        rows.append(("method", f"{fields['method']} ({matvecs}{seed})"))
        if fields.get("lanczos_steps") is not None:
            rows.append(("lanczos", f"{fields['probes']} probes x {fields['lanczos_steps']} steps"))
        if fields.get("note"):
            rows.append(("note", fields["note"]))
        if fields["converged"] is not None:
            rows.append(("converged", "yes" if fields["converged"] else "no (budget spent first)"))
        if fields.get("threads") is not None:
            rows.append(("threads", str(fields["threads"])))
        rows.append(("time", f"{fields['seconds']:.3g} s"))
        if fields.get("output"):
            rows.append(("output", f"{fields['output']} ({value.shape[0]} entries)"))
        if fields.get("plot"):
            rows.append(("plot", fields["plot"]))
        width = max(len(key) for key, _ in rows)
        lines = [f"{key:<{width}}  {text}" for key, text in rows]
        if value.ndim == 1 and not fields.get("output"):
            shown = min(SHOWN_ENTRIES, value.shape[0])
            span_name = "" if interval is None else f", {level} interval"
            lines.append(f"{fields['quantity']} (entry, value{span_name}):")
            for i in range(shown):
                span = ""
                if interval is not None:
                    low, high = format_number(interval[0][i], 6), format_number(interval[1][i], 6)
                    span = f"  [{low}, {high}]"
                lines.append(f"  {i:>6}  {format_number(value[i])}{span}")
            if value.shape[0] > shown:
                lines.append(
                    f"  ... {value.shape[0] - shown} more; --output FILE.npy or FILE.csv writes all"
                )
        return "\n".join(lines)


def stored_diagonal_note(args: argparse.Namespace, estimate: Estimate) -> str | None:
    """A note naming the estimation options given that an exact result read from the
    stored diagonal (0 matvecs: ``auto`` or ``exact`` on a file) did not use."""
    if estimate.method != "exact" or estimate.num_matvecs != 0:
        return None
    unused = [flag for name, flag in EXACT_UNUSED if getattr(args, name, None) is not None]
    if not unused:
        return None
    return f"exact: the stored diagonal was read ({', '.join(unused)} unused)"


def describe_operator(matrix: Any, operator: LinearOperator, library: str) -> str:
    """``"n x n sparse, k nonzeros; numpy float64 on cpu"``."""
    import scipy.sparse as sp

    kind = f"sparse, {matrix.nnz} nonzeros" if sp.issparse(matrix) else "dense"
    rows, cols = operator.shape
    where = f"{library} {backend.dtype_name(operator.dtype)} on {operator.device}"
    return f"{rows} x {cols} {kind}; {where}"


def level_text(confidence: float) -> str:
    """A confidence level as a percentage, with the digits it has (``:g`` printed
    0.999999999 as "100%"; 15 significant digits drop only the product's round-off)."""
    return f"{100 * confidence:.15g}%"


def partial_summary(interrupt: BaseException) -> str:
    """What an interrupted estimate had: the partial value with its interval for a trace,
    the size of a partial diagonal (not written: its outputs are not committed)."""
    partial = interrupt.partial if isinstance(interrupt, EstimateInterrupted) else None
    if partial is None:
        return ""
    value = partial.value
    if getattr(value, "ndim", 0) == 0 and backend.is_complex_dtype(
        backend.array_namespace(value), value.dtype
    ):  # (no interval for a complex value)
        return (
            f"; partial estimate from {partial.num_matvecs} products: "
            f"{complex(partial):.8g} +- {float(partial.stderr):.3g}"
        )
    if getattr(value, "ndim", 0) == 0:
        low, high = partial.ci()  # (at the run's --confidence)
        return (
            f"; partial estimate from {partial.num_matvecs} products: {float(value):.8g} "
            f"+- {float(partial.stderr):.3g} ({level_text(partial.confidence)} interval "
            f"{low:.8g} to {high:.8g})"
        )
    return (
        f"; a partial {partial.method} estimate of {int(value.shape[0])} entries from "
        f"{partial.num_matvecs} products was not written"
    )
