"""``--plot``: a randomized estimate converging, drawn against the matvecs it spent, with
the interval the library reports at each point and the exact value where it is cheap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .. import _backend as backend
from .._estimate import Estimate
from .._functions import computes_exactly, diagonal, trace
from .._operators import LinearOperator
from .._stats import sample_mean
from ..estimators import get_estimator
from ._errors import CliError
from ._report import format_number, interval_of, level_text
from ._writing import Staged

__all__ = ["budget_curve", "plot", "require_matplotlib", "sample_curve"]

#: Below this size the plot computes the exact value even without a stored diagonal.
PLOT_EXACT_LIMIT = 4096
#: Points of a running-mean curve at most: sample counts spaced geometrically (the axis
#: is logarithmic), every count while they are few.
CURVE_POINTS = 200


def require_matplotlib() -> None:
    """CliError naming the fix when matplotlib is missing (checked before computing)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CliError(
            "--plot needs matplotlib, which is not installed (pip install matplotlib, or "
            'pip install -c constraints.txt -e ".[cli]" in the checkout)'
        ) from None


def sample_curve(estimate: Estimate, confidence: float) -> Any:
    """The running mean of the per-probe samples whose mean is the estimate, with the
    interval the library reports for the first m of them.

    Each point is the estimate those m samples make (:func:`linop_trace._stats.sample_mean`,
    as Hutchinson's): Student-t with m - 1 degrees of freedom, shape-corrected for the
    samples' skewness and kurtosis, so the last point is the reported interval. Returns
    ``(m, mean, low, high)`` for up to CURVE_POINTS counts m from 2 to all the samples, or
    ``None`` when the estimate carries no such samples (``info["samples"]``).
    """
    samples = estimate.info.get("samples") if isinstance(estimate.info, dict) else None
    if samples is None:
        return None
    s = backend.to_numpy(samples).ravel()
    value = backend.to_numpy(estimate.value)
    if s.size < 2 or s.size != estimate.num_matvecs or np.iscomplexobj(s) or value.ndim != 0:
        return None
    if abs(s.mean() - float(value)) > 1e-8 * max(1.0, abs(float(value))):
        return None  # the samples are not what the estimate averages (e.g. a residual)
    xp = backend.array_namespace(s)
    counts = np.unique(np.rint(np.geomspace(2, s.size, CURVE_POINTS)).astype(int))
    means, lows, highs = [], [], []
    for count in counts:
        first = sample_mean(s[:count], xp).estimate(int(count), estimate.method)
        low, high = first.ci(confidence)
        means.append(float(first.value))
        lows.append(low)
        highs.append(high)
    return counts, np.array(means), np.array(lows), np.array(highs)


def budget_curve(
    quantity: str, operator: LinearOperator, options: dict[str, Any], estimate: Estimate
) -> tuple[list[int], list[Any], list[Any]]:
    """Estimates at geometrically growing budgets with the same seed, ending at the run's
    own, each with its reported interval."""
    estimator = get_estimator(options["method"], quantity)
    lowest = max(int(getattr(estimator, "min_matvecs", 1)), 2)
    final = int(estimate.num_matvecs)
    budgets = (
        sorted({int(b) for b in np.geomspace(lowest, final, 12)} - {final})
        if final > lowest
        else []
    )
    function = trace if quantity == "trace" else diagonal
    points, values, intervals = [], [], []
    fixed = {**options, "rtol": None, "atol": None, "max_matvecs": None}
    for budget in budgets:
        try:
            at_budget = function(operator, **{**fixed, "num_matvecs": budget})
            at_budget.value  # noqa: B018 - its checks run when first read (torch, JAX)
        except ValueError:
            continue  # a budget the method cannot work with
        points.append(at_budget.num_matvecs)
        values.append(backend.to_numpy(at_budget.value))
        intervals.append(interval_of(at_budget, options["confidence"]))
    points.append(final)
    values.append(backend.to_numpy(estimate.value))
    intervals.append(interval_of(estimate, options["confidence"]))
    return points, values, intervals


def _exact_for_plot(quantity: str, operator: LinearOperator) -> Any:
    """The exact value to draw, where it is cheap: read from a stored diagonal, or
    computed with at most PLOT_EXACT_LIMIT products; else ``None``."""
    if not computes_exactly(operator, quantity, num_matvecs=PLOT_EXACT_LIMIT):
        return None
    function = trace if quantity == "trace" else diagonal
    return backend.to_numpy(function(operator, method="exact").value)


def _plain_log_ticks(axis: Any) -> None:
    """Budgets as 3, 10, 30 rather than 3x10^0 on a log axis."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    formatter = ScalarFormatter()
    formatter.set_scientific(False)
    axis.set_major_formatter(formatter)
    axis.set_minor_formatter(NullFormatter())


def plot(
    path: Path,
    quantity: str,
    operator: LinearOperator,
    options: dict[str, Any],
    estimate: Estimate,
    label: str,
    staged: Staged,
) -> None:
    """The figure of the run on ``operator`` (from the file ``label``) to ``path``, staged:
    a trace as the running mean of its samples (or estimates at growing budgets) in the
    reported interval's band, a diagonal as its error and interval width against budget,
    an exact result as its value."""
    # a bare Figure (no pyplot): no GUI backend, no global state in the caller's process
    from matplotlib.figure import Figure

    level = level_text(options["confidence"])
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    exact = None if estimate.method == "exact" else _exact_for_plot(quantity, operator)
    if quantity == "trace" and estimate.method == "exact":
        # nothing converges (auto on a stored matrix): the value as a line, not a dot at 0
        spent = (
            "read from the stored diagonal, 0 matvecs"
            if estimate.num_matvecs == 0
            else f"{estimate.num_matvecs} matvecs"
        )
        axes.axhline(
            float(np.real(backend.to_numpy(estimate.value))),
            color="k",
            label=f"exact trace = {format_number(backend.to_numpy(estimate.value), 8)} ({spent})",
        )
        axes.set_xticks([])
        axes.set_xlabel("no estimate converging to show: the trace is exact")
        axes.set_ylabel("trace")
    elif quantity == "trace":
        curve = sample_curve(estimate, options["confidence"])
        if curve is None:
            points, values, intervals = budget_curve(quantity, operator, options, estimate)
            x = np.array(points)
            y = np.array([float(np.real(v)) for v in values])
            ok = [i for i, iv in enumerate(intervals) if iv is not None]
            axes.plot(x, y, "o-", label=f"{estimate.method} estimate")
            if ok:
                low = np.array([float(intervals[i][0]) for i in ok])
                high = np.array([float(intervals[i][1]) for i in ok])
                axes.fill_between(x[ok], low, high, alpha=0.25, label=f"{level} interval")
            axes.set_xscale("log")
            _plain_log_ticks(axes.xaxis)
        else:
            x, y, low, high = curve
            axes.plot(x, y, label=f"{estimate.method}: mean of the first m samples")
            axes.fill_between(x, low, high, alpha=0.25, label=f"{level} interval of those")
            axes.set_xscale("log")
            _plain_log_ticks(axes.xaxis)
            # the first few samples give huge intervals: frame the rest (and the truth)
            first = max(1, len(x) // 10)
            bottom, top = float(np.min(low[first:])), float(np.max(high[first:]))
            if exact is not None:
                bottom, top = (
                    min(bottom, float(np.real(exact))),
                    max(top, float(np.real(exact))),
                )
            pad = 0.1 * (top - bottom) or 1.0
            axes.set_ylim(bottom - pad, top + pad)
            interval = interval_of(estimate, options["confidence"])
            if interval is not None:  # the band's last point, marked as the reported result
                centre = float(estimate.value)
                axes.errorbar(
                    [x[-1]],
                    [centre],
                    yerr=[[centre - float(interval[0])], [float(interval[1]) - centre]],
                    fmt="o",
                    color="C3",
                    capsize=4,
                    label=f"reported estimate and {level} interval",
                )
        if exact is not None:
            axes.axhline(
                float(np.real(exact)),
                color="k",
                linestyle="--",
                label=f"exact = {format_number(np.real(exact), 8)}",
            )
        axes.set_ylabel("trace")
    elif estimate.method == "exact":  # nothing converges: show the diagonal itself
        axes.plot(backend.to_numpy(estimate.value).real, ".", markersize=3, label="exact")
        axes.set_ylabel(quantity)
        axes.set_xlabel("index")
    else:
        points, values, intervals = budget_curve(quantity, operator, options, estimate)
        reference = exact if exact is not None else values[-1]
        scale = float(np.linalg.norm(reference)) or 1.0
        curves: list[tuple[list[int], list[float], str, str]] = []
        if exact is not None:
            errors = [float(np.linalg.norm(v - exact)) / scale for v in values]
            curves.append((points, errors, "o-", "relative error ||d_est - d|| / ||d||"))
        widths = [
            (points[i], float(np.linalg.norm((iv[1] - iv[0]) / 2)) / scale)
            for i, iv in enumerate(intervals)
            if iv is not None
        ]
        if widths:
            curves.append(
                (
                    [budget for budget, _ in widths],
                    [width for _, width in widths],
                    "s--",
                    f"{level} half-width (norm, relative)",
                )
            )
        logarithmic = all(v > 0 for _, ys, _, _ in curves for v in ys)
        for xs, ys, style, text in curves:
            axes.plot(xs, ys, style, label=text)
        axes.set_xscale("log")
        _plain_log_ticks(axes.xaxis)
        if logarithmic:  # an exact estimate (zero error) has no place on a log axis
            axes.set_yscale("log")
        axes.set_ylabel("relative size")
    if estimate.method != "exact":
        axes.set_xlabel("matvecs (operator applications)")
    axes.set_title(f"{quantity} of {Path(label).name}: {estimate.method}")
    axes.legend(loc="best")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    with staged.open(path, "--plot") as handle:
        figure.savefig(handle, format=path.suffix.lower().lstrip("."))
