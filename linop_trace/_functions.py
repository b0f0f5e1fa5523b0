"""The everyday face: ``trace``, ``diagonal``, ``row_sums``, ``col_sums``."""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from . import _backend as backend
from ._blocks import probe_block_size
from ._decompose import decompose as decompose_expression
from ._estimate import Estimate, EstimateInterrupted
from ._operators import LinearOperator, aslinearoperator, widened
from ._plan import running
from ._probes import ProbeSampler
from ._stats import sample_mean
from ._validation import check_num_matvecs, check_positive_int, check_square, check_tolerance
from .estimators._auto import Auto
from .estimators._base import CountingMatmat, EstimationRequest, Estimator
from .estimators._exact import Exact
from .estimators._registry import get_estimator, registered

__all__ = [
    "DEFAULT_MAX_MATVECS",
    "DEFAULT_NUM_MATVECS",
    "col_sums",
    "computes_exactly",
    "diagonal",
    "frobenius_norm_squared",
    "row_sums",
    "trace",
]

#: Budget of :func:`trace` and :func:`diagonal` when neither ``num_matvecs`` nor a
#: tolerance is given: this many operator applications.
DEFAULT_NUM_MATVECS = 100
#: Products of an adaptive estimate's first round when ``num_matvecs`` is not given (at
#: least twice the method's minimum). A run that may stop after any round stops more
#: often where its spread happens to read low: from a first round of 4 probes,
#: Hutchinson's 95% intervals covered 0.925 - 0.930 over 1500 seeds at rtol 0.02 - 0.05
#: (those that stopped at 4 probes covered 0.35 at 90%); a first round of 32 leaves too
#: few samples for that to matter (measured in docs/estimators/adaptive.rst).
ADAPTIVE_FIRST_ROUND = 32
#: Most operator applications an estimate with ``rtol``/``atol`` spends when
#: ``max_matvecs`` is not given.
DEFAULT_MAX_MATVECS = 1000
#: A randomized estimate may spend at most max(BUDGET_CAP_FACTOR * n, BUDGET_CAP_FLOOR)
#: products: n of them compute the trace or diagonal exactly, and a budget far beyond
#: that is a typo that would run for hours before running out of memory.
BUDGET_CAP_FACTOR = 100
BUDGET_CAP_FLOOR = 10**6


def _check_budget_cap(operator: LinearOperator, name: str, budget: int) -> None:
    """Refuse a randomized budget beyond the cap (``"exact"`` spends n products whatever
    the budget, and ``"auto"`` computes exactly when n <= its budget)."""
    n = operator.shape[1]
    cap = max(BUDGET_CAP_FACTOR * n, BUDGET_CAP_FLOOR)
    if name not in ("exact", "auto") and budget > cap:
        raise ValueError(
            f"a budget of {budget} products exceeds the cap for method {name!r} on an "
            f"operator of size n = {n}: max({BUDGET_CAP_FACTOR} n, {BUDGET_CAP_FLOOR}) = "
            f"{cap}; method='exact' computes the value with n = {n} products"
        )


@dataclass(frozen=True)
class _Settings:
    """The validated options of one estimate (hashable: a compiled program's key)."""

    num_matvecs: int
    block_size: int
    probe: str
    rtol: float | None
    atol: float | None
    confidence: float
    max_matvecs: int
    check_finite: bool
    product_precision: str | None = None
    unit_scale: bool = False
    #: Whether the caller gave ``block_size`` (else a refine sizes its blocks anew for its
    #: own budget: one inherited from a first run of 8 columns cut 248 more into 31 calls)
    block_size_given: bool = False

    @property
    def adaptive(self) -> bool:
        return self.rtol is not None or self.atol is not None

    def request(self, operator: LinearOperator, random: Any, method: str) -> EstimationRequest:
        n = operator.shape[1]
        sampler = ProbeSampler(self.probe, n, operator.xp, operator.dtype, operator.device, random)
        return EstimationRequest(
            matmat=CountingMatmat(
                operator,
                self.check_finite,
                self.block_size,
                self.product_precision,
                unit_scale=self.unit_scale,
            ),
            probes=sampler,
            num_matvecs=self.num_matvecs,
            block_size=self.block_size,
            rtol=self.rtol,
            atol=self.atol,
            confidence=self.confidence,
            max_matvecs=self.max_matvecs,
            method=method,
        )


def _settings(
    operator: LinearOperator,
    estimator: Any,
    quantity: str,
    *,
    num_matvecs: int | None,
    probe: str | None,
    rtol: float | None,
    atol: float | None,
    confidence: float,
    max_matvecs: int | None,
    block_size: int | None,
    check_finite: bool,
) -> _Settings:
    check_tolerance(rtol, atol, confidence)
    adaptive = rtol is not None or atol is not None
    minimum = getattr(estimator, "min_matvecs", 1)
    name = getattr(estimator, "name", repr(estimator))
    if adaptive and not getattr(estimator, "supports_tolerance", False):
        raise ValueError(f"method {name!r} does not support rtol/atol (adaptive stopping)")
    if max_matvecs is not None:
        max_matvecs = check_num_matvecs(max_matvecs, name, minimum)
    if num_matvecs is None:
        if adaptive:  # a first round of ADAPTIVE_FIRST_ROUND, within a smaller cap
            first = max(2 * minimum, ADAPTIVE_FIRST_ROUND)
            num_matvecs = first if max_matvecs is None else min(first, max_matvecs)
        else:  # without a tolerance, a cap alone is the budget
            num_matvecs = DEFAULT_NUM_MATVECS if max_matvecs is None else max_matvecs
    num_matvecs = check_num_matvecs(num_matvecs, name, minimum)
    if max_matvecs is None:
        max_matvecs = max(num_matvecs, DEFAULT_MAX_MATVECS) if adaptive else num_matvecs
    elif max_matvecs < num_matvecs:
        raise ValueError(f"`max_matvecs`={max_matvecs} is smaller than `num_matvecs`={num_matvecs}")
    _check_budget_cap(operator, name, max(num_matvecs, max_matvecs))
    given_block_size = block_size is not None
    if block_size is None:
        block_size = probe_block_size(operator, limit=max(max_matvecs, 1))
    else:
        block_size = check_positive_int(block_size, "block_size")
    if isinstance(estimator, Estimator):
        kind = estimator.probe_kind(quantity, probe)
    else:  # a duck-typed plug-in
        default = getattr(estimator, "default_probe", "rademacher")
        if isinstance(default, dict):
            default = default.get(quantity, "rademacher")
        kind = probe if probe is not None else default
    ProbeSampler.check_kind(kind)
    return _Settings(
        num_matvecs,
        block_size,
        kind,
        None if rtol is None else float(rtol),
        None if atol is None else float(atol),
        float(confidence),
        max_matvecs,
        bool(check_finite),
        backend.caller_precision(operator.xp),
        # (an atol is in the caller's units: the stopping rule scales it with the products)
        quantity in getattr(estimator, "unit_scaled", ()),
        given_block_size,
    )


class _Plan:
    """An estimate's plan: its settings, the estimator that runs and, under JAX, its
    compiled launches (one per seed kind and operator structure, made when first run)."""

    __slots__ = ("estimator", "launches", "settings")

    #: Launches a plan keeps (a plan keyed by structure sees one operator structure).
    LAUNCHES_KEPT = 8

    def __init__(self, settings: _Settings, estimator: Any) -> None:
        self.settings = settings
        self.estimator = estimator
        self.launches: dict[Any, _Launch] = {}

    def launch(
        self, quantity: str, operator: LinearOperator, is_key: bool, structure: Any
    ) -> _Launch:
        """The compiled run of this plan on operators of ``structure`` (that of the tuple
        ``(operator, seed)``) with a key (``is_key``) or an integer seed."""
        key = (is_key, structure)
        launch = self.launches.get(key)
        if launch is None:
            if len(self.launches) >= self.LAUNCHES_KEPT:
                self.launches.clear()
            static = (self.estimator, quantity, self.settings, is_key)
            program = backend.flat_program(_compiled_run, static, structure)
            launch = self.launches[key] = _Launch(program, is_key, static, operator)
        return launch


class _Launch:
    """One compiled fixed-budget estimate: called with the operator's arrays and the
    seed, it runs the program and gives the Estimate, refinable where its method says."""

    __slots__ = (
        "copies",
        "device",
        "estimator",
        "facts",
        "is_key",
        "program",
        "quantity",
        "settings",
        "xp",
    )

    def __init__(
        self, program: Any, is_key: bool, static: tuple[Any, ...], operator: LinearOperator
    ) -> None:
        self.program, self.is_key = program, is_key
        self.estimator, self.quantity, self.settings, _ = static
        self.facts = _facts(operator)
        self.xp, self.device = operator.xp, operator.device
        # the flags' host copies are started on accelerators only (see start_host_copies):
        # on the CPU the per-call test of every flag's device would cost microseconds
        self.copies = self.device is None or backend.is_accelerator(self.device)

    def __call__(self, leaves: list[Any], seed_argument: Any) -> Estimate:
        try:
            estimate: Estimate = self.program(*leaves)
        except EstimateInterrupted:
            raise
        except KeyboardInterrupt as interrupt:  # one program: nothing partial to give
            raise EstimateInterrupted(None) from interrupt
        # its value's first read reads these flags: their copies start now, behind the work
        if self.copies:
            flags = [check.failed for check in estimate._checks]
            if estimate._choice is not None:  # (a choice made on the device is read too)
                flags.append(estimate._choice.first_chosen)
            backend.start_host_copies(flags)
        if estimate._state is None:
            return estimate
        xp, device, is_key = self.xp, self.device, self.is_key

        def start() -> Any:  # made when refine is called: no dispatch per estimate
            key = seed_argument if is_key else backend.jax_key_of(seed_argument)
            return backend.make_random_source(xp, device, key)

        estimate._resume = _Continuation(
            self.estimator, self.quantity, self.settings, self.facts, start, estimate
        )
        return estimate


def _estimator_state(estimator: Any) -> Any:
    """What an estimator's plan depends on, as a value: its class and settings
    (``Estimator._config``), so that an estimator whose settings were changed in place
    (``est.probe = "gaussian"`` between two calls) is not taken for the one the plan was
    made for (its repeat kept Rademacher probes; found by a review). A plug-in without
    hashable settings stands for itself."""
    config = getattr(estimator, "_config", None)
    if config is None:
        return estimator
    try:
        state = config()
        hash(state)
    except (TypeError, ValueError):
        return estimator
    return state


class _LastCall:
    """The last estimate of a quantity: what the call gave and the plan (and, compiled,
    the launch) it ran. The same call again (the same object, method and options: a loop
    over seeds, a benchmark; or, compiled, a JAX array of the same layout: a training
    step's new matrix) goes straight to its run.

    Everything before a run starts delays it, and after the wait for the previous result
    that Python runs several times slower than when timed alone: under JAX on the CPU
    the full path (operator, settings key, plan) cost 0.15 of a 512 x 20 product, and on
    torch at n = 200 a tenth of a Hutchinson estimate. The checks here are what that
    path's key holds for the same object: the estimator the method names now, JAX's
    product precision and the device's free memory (block sizes)."""

    __slots__ = (
        "decompose",
        "estimator",
        "free",
        "given",
        "is_operator",
        "launch",
        "layout",
        "leaves",
        "method",
        "options",
        "plan",
        "precision",
        "quantity",
        "state",
        "xp_device",
    )

    def __init__(
        self,
        quantity: str,
        given: Any,
        method: Any,
        decompose: bool,
        options: dict[str, Any],
        operator: LinearOperator,
        plan: _Plan,
        launch: _Launch | None,
        leaves: list[Any] | None = None,
    ) -> None:
        self.quantity = quantity
        self.is_operator = given is operator  # else an array the operator was made from
        # a compiled operator's arrays, kept while it lives (flattening it again at every
        # call was 0.07 of a 512 x 20 product); the caller's objects are held weakly
        self.leaves = leaves if self.is_operator else None
        self.given = weakref.ref(given, self._forget)
        # a compiled call on a JAX array: another array of its layout is the same call
        # (the next matrix of a training loop; the full path cost it 0.5 of a 512 x 20
        # product); the program takes the array as its one argument
        self.layout = (
            backend.jax_array_layout(given) if launch is not None and not self.is_operator else None
        )
        self.method, self.decompose = method, decompose
        self.estimator = get_estimator(method, quantity)
        self.state = _estimator_state(self.estimator)
        self.options = dict(options)
        self.xp_device = (operator.xp, operator.device)
        self.free = (
            backend.free_memory(operator.xp, operator.device)
            if options.get("block_size") is None
            else None
        )
        self.precision = backend.caller_precision(operator.xp)
        self.plan, self.launch = plan, launch

    def _forget(self, _: Any) -> None:
        self.leaves = None  # (the operator is gone: its arrays go with it)

    def repeats(
        self, quantity: str, A: Any, method: Any, decompose: bool, options: dict[str, Any]
    ) -> bool:
        """Whether ``A`` with these arguments repeats the call (the full path would find
        the same plan)."""
        if (
            (
                self.given() is not A
                and (self.layout is None or backend.jax_array_layout(A) != self.layout)
            )
            or not (method is self.method or method == self.method)
            or decompose != self.decompose
            or options != self.options
            or (registered(method) if isinstance(method, str) else get_estimator(method, quantity))
            is not self.estimator
            or _estimator_state(self.estimator) != self.state
        ):
            return False
        xp, device = self.xp_device
        if backend.caller_precision(xp) != self.precision:
            return False
        return self.free is None or backend.free_memory(xp, device) == self.free

    def run(self, A: Any, seed: Any) -> Estimate | None:
        """The estimate of the repeated call with ``seed``; ``None`` where this seed
        needs another compiled program (a key where an integer was given, or back)."""
        launch = self.launch
        if launch is None:
            operator = A if self.is_operator else aslinearoperator(A)
            return _eager(self.quantity, operator, self.plan, seed)
        seed_argument, is_key = backend.jax_seed(seed)
        if is_key != launch.is_key:
            return None
        if not self.is_operator:
            leaves = [A]
        elif self.leaves is not None:
            leaves = list(self.leaves)
        else:
            leaves = backend.flatten(A)[0]
        leaves.append(seed_argument)
        return launch(leaves, seed_argument)


#: The last estimate of each quantity (see :class:`_LastCall`).
_LAST_CALLS: dict[str, _LastCall] = {}


#: The last estimates' plans: (key, weak reference to the operator, plan).
_RECENT_SETTINGS: list[tuple[Any, Any, _Plan]] = []
_RECENT_LIMIT = 8


def _settings_key(
    operator: LinearOperator, estimator: Any, quantity: str, split: bool, options: dict[str, Any]
) -> tuple[Any, Any] | None:
    """What an estimate's plan (whether it splits off exact terms, and its settings)
    depends on, as a hashable key, with the operator's structure (``None`` for this
    object only); ``None`` when some part cannot be hashed (no reuse). The device's free
    memory and JAX's matrix-product precision are part of it, so that a call sees the
    block size and precision that a fresh one would."""
    free = None
    if options.get("block_size") is None:
        free = backend.free_memory(operator.xp, operator.device)
    structure = operator.settings_identity()  # None: this object only
    key = (
        id(operator) if structure is None else structure,
        _estimator_state(estimator),
        quantity,
        split,
        tuple(options.items()),
        free,
        backend.caller_precision(operator.xp),
    )
    try:
        hash(key)
    except TypeError:  # an unhashable plug-in or option: no reuse
        return None
    return key, structure


def _recalled_settings(key: tuple[Any, Any] | None, operator: LinearOperator) -> _Plan | None:
    """The plan (settings, and the estimator that runs) of an earlier estimate with this
    key (and this operator object where the key names it by ``id``), or ``None``."""
    if key is None:
        return None
    known_key, structure = key
    for known, reference, settings in _RECENT_SETTINGS:
        if known == known_key and (structure is not None or reference() is operator):
            return settings
    return None


def _remember_settings(
    key: tuple[Any, Any] | None, operator: LinearOperator, settings: _Plan
) -> None:
    if key is None:
        return
    try:
        reference = weakref.ref(operator)
    except TypeError:  # pragma: no cover - operators are weakly referenceable
        return
    _RECENT_SETTINGS.insert(0, (key[0], reference, settings))
    del _RECENT_SETTINGS[_RECENT_LIMIT:]


def _estimate(
    quantity: str, A: Any, method: Any, seed: Any, decompose: bool, options: dict[str, Any]
) -> Estimate:
    last = _LAST_CALLS.get(quantity)
    if last is not None and last.repeats(quantity, A, method, decompose, options):
        repeated = last.run(A, seed)  # the same estimate again: straight to its run
        if repeated is not None:
            return repeated
    given = aslinearoperator(A)
    operator = widened(given)  # half precisions are estimated in float32
    n = check_square(operator, quantity)
    estimator = get_estimator(method, quantity)
    split = decompose and not isinstance(estimator, Exact)
    # the same operator (or a dense array of one structure) with the same call again:
    # its plan is known (walking the expression took 12 us of an estimate at n = 512
    # under JAX, 5% of its product, and validating the options more)
    key = _settings_key(operator, estimator, quantity, split, options)
    plan = _recalled_settings(key, operator)
    if plan is None:
        if split:
            parts = decompose_expression(given)
            if parts is not None:  # exact terms computed, only the implicit rest estimated
                return parts.estimate(
                    quantity,
                    lambda implicit: _estimate(quantity, implicit, method, seed, False, options),
                    options["check_finite"],
                )
        if n == 0:
            xp = operator.xp
            shape = () if quantity == "trace" else (0,)
            zero = xp.zeros(shape, dtype=operator.dtype, device=operator.device)
            return Estimate(
                zero,
                xp.zeros(
                    shape, dtype=backend.real_dtype_for(xp, operator.dtype), device=operator.device
                ),
                0,
                "exact",
            )
        settings = _settings(operator, estimator, quantity, **options)
        plan = _Plan(settings, _runner(estimator, quantity, settings, operator))
        _remember_settings(key, operator, plan)
    settings, estimator = plan.settings, plan.estimator
    backend.check_dask_support(operator.xp, getattr(estimator, "name", "custom"), settings.adaptive)
    if (
        backend.compiles_estimates(operator.xp)
        and not settings.adaptive
        and getattr(estimator, "jit_compatible", False)
        and operator.compilable()
    ):
        # one compiled program; an integer seed becomes its key inside (no extra dispatch)
        seed_argument, is_key = backend.jax_seed(seed)
        leaves, structure = backend.flatten((operator, seed_argument))
        launch = plan.launch(quantity, operator, is_key, structure)
        estimate = launch(leaves, seed_argument)
        if not (A is given or (len(leaves) == 2 and leaves[0] is A)):
            return estimate  # (a repeat passes the array as the operator's one array)
        leaves.pop()  # (the seed)
    else:
        launch, leaves = None, None
        estimate = _eager(quantity, operator, plan, seed)
    if operator is given:  # (a widened operator is made anew at every call)
        try:
            _LAST_CALLS[quantity] = _LastCall(
                quantity, A, method, decompose, options, operator, plan, launch, leaves
            )
        except TypeError:  # not weakly referenceable: no repeat shortcut
            _LAST_CALLS.pop(quantity, None)
    return estimate


def _eager(quantity: str, operator: LinearOperator, plan: _Plan, seed: Any) -> Estimate:
    """The plan's estimate run eagerly (operation by operation) on ``operator``."""
    settings, estimator = plan.settings, plan.estimator
    stored = getattr(operator, "matrix", None)  # (a Dask matrix's chunks shape the probes)
    random = backend.make_random_source(operator.xp, operator.device, seed, like=stored)
    estimate = _run(estimator, quantity, settings, operator, random)
    if estimate._state is not None and not isinstance(seed, (int, np.integer, type(None))):
        # the caller's own generator goes on drawing: keep where the run left it now
        random = random.snapshot()
    return _resumable(estimate, estimator, quantity, settings, operator, lambda: random)


def _runner(estimator: Any, quantity: str, settings: _Settings, operator: LinearOperator) -> Any:
    """The estimator that runs: ``auto``'s exact branch is taken here, ahead of the run,
    where its rule (the budget covers n columns, or the operator stores its diagonal)
    holds. What decides it is fixed by the plan's key (the operator's structure and the
    options), so it is decided once per plan; and the exact estimate of a stored JAX
    matrix is then one compiled program, not ``auto``'s eager run (250 against 60 us at
    n = 512 on the CPU). The estimate is the same either way: ``auto`` runs ``exact``
    there. (The built-in class only: a subclass may run what it likes.)"""
    if type(estimator) is Auto:
        request = settings.request(operator, None, estimator.name)
        if estimator.uses_exact(request):
            return get_estimator("exact", quantity)
    return estimator


def _resumable(
    estimate: Estimate,
    estimator: Any,
    quantity: str,
    settings: _Settings,
    operator: LinearOperator,
    source: Callable[[], Any],
) -> Estimate:
    """``estimate`` with its continuation when its estimator left a refinement state.
    ``source()`` gives the run's random source where the run left it (no one else draws
    from it), or for a compiled JAX run one at the start of its stream (made only if
    refine is called)."""
    if estimate._state is not None:
        estimate._resume = _Continuation(
            estimator, quantity, settings, _facts(operator), source, estimate
        )
    return estimate


def _facts(operator: LinearOperator) -> tuple[Any, ...]:
    """What an operator given to ``refine`` must share with the first run's."""
    return (
        tuple(operator.shape),
        backend.namespace_name(operator.xp),
        operator.dtype,
        str(operator.device),
    )


class _Continuation:
    """:meth:`Estimate.refine` of one estimate: the run's method, quantity, settings and
    the random source where the run left it."""

    def __init__(
        self,
        estimator: Any,
        quantity: str,
        settings: _Settings,
        facts: tuple[Any, ...],
        source: Callable[[], Any],
        estimate: Estimate,
    ) -> None:
        self.estimator = estimator
        self.quantity = quantity
        self.settings = settings
        self.facts = facts
        self.source = source
        # the estimate's counted columns and checks (not the estimate: no cycle)
        self.num_matvecs = estimate.num_matvecs
        self.checks = estimate._checks

    def __call__(
        self,
        A: Any,
        num_matvecs: int | None,
        rtol: float | None,
        atol: float | None,
        max_matvecs: int | None,
        state: Any,
    ) -> Estimate:
        operator = widened(aslinearoperator(A))
        facts = _facts(operator)
        if facts != self.facts:
            raise ValueError(
                "refine needs the operator of the first run: it had shape, library, dtype "
                f"and device {self.facts}, this one has {facts}"
            )
        refiner = get_estimator(state.method, self.quantity)
        name = getattr(refiner, "name", state.method)
        check_tolerance(rtol, atol, self.settings.confidence)
        adaptive = rtol is not None or atol is not None
        # (a tolerance on Dask is refused here as in the first run: it computed the
        # graph of every earlier round again, hundreds of computes for one refine)
        backend.check_dask_support(operator.xp, name, adaptive)
        if adaptive == (num_matvecs is not None):
            raise ValueError(
                "refine takes num_matvecs (that many more products) or a tolerance "
                "(rtol/atol, with max_matvecs), one of the two"
            )
        if adaptive:
            total = (
                max(DEFAULT_MAX_MATVECS, 2 * self.num_matvecs)
                if max_matvecs is None
                else check_num_matvecs(max_matvecs, name, 1)
            )
            more = 0
        else:
            if max_matvecs is not None:
                raise ValueError("max_matvecs goes with a tolerance (rtol/atol)")
            more = check_num_matvecs(num_matvecs, name, 1)
            total = self.num_matvecs + more
        _check_budget_cap(operator, name, total)
        settings = replace(
            self.settings,
            num_matvecs=more,
            rtol=None if rtol is None else float(rtol),
            atol=None if atol is None else float(atol),
            max_matvecs=max(total - self.num_matvecs, 0),
            unit_scale=False,
        )
        if not settings.block_size_given:  # (blocks for this run's budget; same columns)
            limit = max(settings.max_matvecs, more, 1)
            settings = replace(settings, block_size=probe_block_size(operator, limit=limit))
        random = self.source()
        if random.columns < state.drawn:  # compiled JAX: the stream's start; skip ahead
            random = random.skipped(state.drawn - random.columns)
        random = random.snapshot()  # this estimate refines alike every time
        request = settings.request(operator, random, name)
        if state.scale is not None:  # the first run's products were scaled: so are these
            request.matmat._tally.scale = state.scale

        def finished(estimate: Estimate) -> Estimate:
            """The run's scale undone, its checks and columns added to the first run's."""
            estimate = _finished(estimate, request)
            estimate = estimate.with_checks((), self.num_matvecs + request.columns)
            estimate._checks = self.checks + estimate._checks
            return estimate

        try:
            with running(f"refine {self.quantity} {name} {settings!r}"):
                estimate = refiner.refine(self.quantity, request, state)
        except EstimateInterrupted as interrupted:  # as in _run: the partial, finished
            partial = interrupted.partial
            if partial is not None:
                request.matmat.cover_all(partial.value)
                partial = finished(partial)
            raise EstimateInterrupted(partial) from interrupted
        except KeyboardInterrupt as interrupt:
            raise EstimateInterrupted(None) from interrupt
        estimate._state = replace(estimate._state, scale=state.scale, drawn=random.columns)
        estimate = finished(estimate)
        return _resumable(
            estimate, self.estimator, self.quantity, self.settings, operator, lambda: random
        )


def _run(
    estimator: Any, quantity: str, settings: _Settings, operator: LinearOperator, random: Any
) -> Estimate:
    """The estimator on its request; the result carries the counted columns and the
    deferred finiteness check of every product."""
    name = getattr(estimator, "name", "custom")
    request = settings.request(operator, random, name)
    try:
        with running(f"{quantity} {name} {settings!r}"):  # (for data-parallel ranks)
            estimate = getattr(estimator, quantity)(request)
    except EstimateInterrupted as interrupted:
        partial = interrupted.partial
        if partial is not None:
            # a product taken to be checked through a result the interruption cut off:
            # checked through the partial value (which holds it if the run had used it)
            request.matmat.cover_all(partial.value)
            partial = _finished(partial, request)
        raise EstimateInterrupted(partial) from interrupted
    except KeyboardInterrupt as interrupt:  # a method without a partial result
        raise EstimateInterrupted(None) from interrupt
    if estimate._state is not None:  # what refine needs: the products' scale, the stream
        estimate._state = replace(estimate._state, scale=request.matmat.scale, drawn=random.columns)
    return _finished(estimate, request)


def _finished(estimate: Estimate, request: EstimationRequest) -> Estimate:
    """An estimator's result with what the whole run says: the block sizes after an out
    of memory, the scale of the products undone, the deferred checks and the columns."""
    if request.real_valued:  # (a Hermitian operator: its trace and diagonal are real)
        estimate = estimate.real_part()
    retried = request.matmat.retried_widths
    if retried:  # a product ran out of memory: the narrower blocks that followed
        estimate.info["block_sizes"] = sorted(set(retried), reverse=True)
    if request.matmat.scale is not None:  # products were scaled: scale the result back
        estimate = estimate.divided_by(request.matmat.scale)
    # (the products' checks first: a non-finite product is named as such, not by what it
    # made of XNysTrace's sketch, "overflowed")
    estimate = estimate.with_checks(request.matmat.deferred_checks(), request.columns, first=True)
    return _computed_once(estimate) if backend.is_dask_namespace(request.xp) else estimate


def _computed_once(estimate: Estimate) -> Estimate:
    """A Dask estimate with its value, stderr, checks and refinement state computed in
    one ``dask.compute``: each probe block's product runs once, not once per read. The
    checks are then run at once (as on NumPy); the values stay Dask arrays."""
    children, aux = estimate._tree_flatten()
    *head, checks, state, choice = children
    parts = {} if state is None else {f.name: getattr(state, f.name) for f in fields(state)}
    sums = parts.get("sums")
    kept = [head, parts, {} if sums is None else dict(vars(sums))]
    leaves: list[Any] = []
    backend.substitute([kept, checks], leaves.append)
    try:
        computed = iter(backend.compute_together(leaves))
    except (ValueError, ArithmeticError) as error:
        _name_failed_check(estimate, error)
        raise
    kept = backend.substitute(kept, lambda _: backend.in_memory(next(computed)))
    checks = backend.substitute(checks, lambda _: next(computed))  # NumPy: read for free
    head, parts, sums_arrays = kept
    if sums is not None:
        parts["sums"] = copy.copy(sums)
        vars(parts["sums"]).update(sums_arrays)
    settled = type(estimate)._tree_unflatten(
        aux, (*head, checks, None if state is None else replace(state, **parts), choice)
    )
    settled._verify()
    settled._resume = estimate._resume
    return settled


def _name_failed_check(estimate: Estimate, error: BaseException) -> None:
    """Raise the first of a Dask ``estimate``'s checks that fails, from ``error`` (what
    computing the whole estimate raised): a non-finite product reaches SciPy's solvers in
    the same graph as its check, and SciPy refuses it first ("array must not contain infs
    or NaNs"). Each check is computed on its own; one whose graph fails too is passed
    over. Returns where no check fails (the caller re-raises ``error``)."""
    for check in estimate._checks:
        try:
            check.run()
        except FloatingPointError as failed:
            raise failed from error
        except Exception:  # (its graph failed too: the original error stands)
            continue


def _compiled_run(
    estimator: Any,
    quantity: str,
    settings: _Settings,
    is_key: bool,
    operator: LinearOperator,
    seed: Any,
) -> Estimate:
    """:func:`_run` inside one compiled JAX program (operator and seed are its arguments:
    a key, or with ``is_key=False`` an integer that becomes one)."""
    key = seed if is_key else backend.jax_key_of(seed)
    random = backend.make_random_source(operator.xp, operator.device, key)
    return _run(estimator, quantity, settings, operator, random)


def _call_options(*values: Any) -> dict[str, Any]:
    """The options of a :func:`trace` or :func:`diagonal` call, by name (one dict, passed on
    as it is: the keyword round trips cost a repeated estimate's path microseconds)."""
    return dict(zip(_OPTION_NAMES, values))


#: The options of :func:`trace` and :func:`diagonal`, in :func:`_call_options`'s order.
_OPTION_NAMES = (
    "num_matvecs",
    "probe",
    "rtol",
    "atol",
    "confidence",
    "max_matvecs",
    "block_size",
    "check_finite",
)


def _at_confidence(
    quantity: str, A: Any, method: Any, seed: Any, decompose: bool, options: dict[str, Any]
) -> Estimate:
    """:func:`_estimate` with the call's ``confidence`` as the level of the estimate's
    intervals (:attr:`Estimate.confidence`), the partial one of an interrupt included."""
    confidence = options["confidence"]
    check_tolerance(options["rtol"], options["atol"], confidence)  # (empty, exact runs too)
    try:
        estimate = _estimate(quantity, A, method, seed, decompose, options)
    except EstimateInterrupted as interrupted:
        if interrupted.partial is not None:
            interrupted.partial.confidence = float(confidence)
        raise
    estimate.confidence = float(confidence)
    return estimate


def trace(
    A: Any,
    method: Any = "auto",
    num_matvecs: int | None = None,
    seed: Any = None,
    probe: str | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    confidence: float = 0.95,
    max_matvecs: int | None = None,
    block_size: int | None = None,
    check_finite: bool = True,
    decompose: bool = True,
) -> Estimate:
    """Estimate (or compute) the trace of a square operator.

    Parameters
    ----------
    A : LinearOperator or matrix
        Anything :func:`aslinearoperator` accepts.
    method : str or Estimator
        A registered name (see :func:`available_methods`) or an estimator object.
        ``"auto"`` computes exactly when n <= ``num_matvecs``.
    num_matvecs : int, optional
        Budget of operator applications (columns through the operator); 100 if not
        given. With ``rtol``/``atol`` it is the number to start with
        (``ADAPTIVE_FIRST_ROUND`` = 32, or ``max_matvecs`` if smaller, when not given:
        a run that may stop after a first round of a few probes stops too often where
        their spread reads low, and its interval then covers less than its level).
    seed : int, None, or the library's generator/key
    probe : {"rademacher", "gaussian", "sphere", "steinhaus"}, optional
        Probe distribution for the randomized methods; by default the method's own
        (``"sphere"`` for XTrace and XNysTrace, ``"rademacher"`` for the others).
    rtol, atol : float, optional
        Keep adding probe blocks until the half-width of the ``confidence`` interval is
        at most ``max(atol, rtol * |estimate|)``, or ``max_matvecs`` are spent.
    confidence : float
        Level of that interval.
    max_matvecs : int, optional
        Budget cap with a tolerance (default 1000).
    block_size : int, optional
        Most columns per operator call; by default as many as fit in a quarter of the
        memory the operator's device has free (at the operator's own bytes per column),
        so that on a GPU a budget that fits goes through in one call; on a CPU a block
        also stays under 64 MiB (larger ones gain nothing there and cost page faults).
    check_finite : bool
        Raise ``FloatingPointError`` when a product is NaN or infinite (some methods
        check a product through the sums they form from it, which then also raise
        when those sums overflow, where the estimate would be NaN).
    decompose : bool
        Walk the expression first (sums, differences, scalar multiples, Kronecker and
        block-diagonal operators): the terms known exactly (identities, diagonal
        operators, stored matrices next to implicit terms, Kronecker products and blocks
        of such) are computed exactly, and only the sum of the implicit terms is
        estimated, with the budget, probes, seed and tolerances applying to it alone.
        ``stderr`` is then the implicit part's, ``info["exact_terms"]`` names the exact
        terms and ``info["exact_part"]`` holds their value; with nothing implicit the
        result is exact with 0 products. ``method="exact"`` does not decompose, nor does
        an expression of stored matrices alone. ``False``: the operator as a black box.

    Returns
    -------
    Estimate
        ``value`` is a 0-d array of the operator's library. For a half-precision operator
        (float16, bfloat16) it is float32: such operators are estimated in float32, each
        product cast to the operator's dtype and back (the estimators' linear algebra has
        no half-precision kernels, and a float16 trace overflows at 65504); the products'
        own rounding bounds the accuracy.

    Raises
    ------
    ValueError
        Non-square operator, unknown method, budget below the method's minimum.
    FloatingPointError
        A non-finite product (with ``check_finite=True``).

    Examples
    --------
    >>> import numpy as np
    >>> from linop_trace import trace
    >>> A = np.diag(np.arange(1.0, 201.0))
    >>> float(trace(A, method="exact"))
    20100.0
    >>> est = trace(A, method="hutchinson", num_matvecs=20, seed=0)
    >>> float(est)  # Rademacher probes are exact on a diagonal matrix
    20100.0
    """
    options = _call_options(
        num_matvecs, probe, rtol, atol, confidence, max_matvecs, block_size, check_finite
    )
    return _at_confidence("trace", A, method, seed, decompose, options)


def diagonal(
    A: Any,
    method: Any = "auto",
    num_matvecs: int | None = None,
    seed: Any = None,
    probe: str | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    confidence: float = 0.95,
    max_matvecs: int | None = None,
    block_size: int | None = None,
    check_finite: bool = True,
    decompose: bool = True,
) -> Estimate:
    """Estimate (or compute) the main diagonal of a square operator.

    Parameters are those of :func:`trace` (``decompose`` included); ``value`` and
    ``stderr`` are vectors.

    Examples
    --------
    >>> import numpy as np
    >>> from linop_trace import diagonal
    >>> diagonal(np.array([[1.0, 2.0], [3.0, 4.0]]), method="exact").value
    array([1., 4.])
    """
    options = _call_options(
        num_matvecs, probe, rtol, atol, confidence, max_matvecs, block_size, check_finite
    )
    return _at_confidence("diagonal", A, method, seed, decompose, options)


def computes_exactly(
    A: Any,
    quantity: str = "trace",
    method: Any = "auto",
    num_matvecs: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_matvecs: int | None = None,
) -> bool:
    """Whether :func:`trace` or :func:`diagonal` with these arguments computes the exact
    value rather than an estimate, answered before any product is made.

    ``method="exact"`` always does; so does any method on an expression whose terms are
    all known exactly (see ``decompose`` in :func:`trace`), and for a mixed one the
    answer is that for the sum of its implicit terms. ``"auto"`` does when the operator
    stores its diagonal (a dense or sparse matrix: it is read, with no product) or when
    n is at most the budget (``max_matvecs`` with a tolerance, else ``num_matvecs``; the
    defaults are :data:`DEFAULT_MAX_MATVECS` and :data:`DEFAULT_NUM_MATVECS`), and
    ``"xnystrace"`` and ``"na-hutch++"`` when n is at most ``num_matvecs``. The other
    methods estimate. The answer is the estimator's own decision
    (:meth:`~linop_trace.Estimator.uses_exact`), taken on the options as the estimate
    would validate them.

    Parameters
    ----------
    A : LinearOperator or matrix
        Anything :func:`aslinearoperator` accepts; square.
    quantity : {"trace", "diagonal"}
    method, num_matvecs, rtol, atol, max_matvecs
        As for :func:`trace`.

    Returns
    -------
    bool

    Raises
    ------
    ValueError
        As :func:`trace` would for these arguments: a non-square operator, an unknown
        method, a budget the method cannot work with.

    Examples
    --------
    >>> import numpy as np
    >>> from linop_trace import LinearOperator, computes_exactly
    >>> computes_exactly(np.eye(500))  # a stored matrix: its diagonal is read
    True
    >>> A = LinearOperator.from_callable(matvec=lambda x: 2 * x, shape=(500, 500))
    >>> computes_exactly(A, num_matvecs=100), computes_exactly(A, num_matvecs=500)
    (False, True)
    >>> computes_exactly(A, method="hutchinson", num_matvecs=500)
    False
    >>> computes_exactly(A, method="xnystrace", num_matvecs=500)
    True
    """
    if quantity not in ("trace", "diagonal"):
        raise ValueError(f"quantity must be 'trace' or 'diagonal', got {quantity!r}")
    operator = widened(aslinearoperator(A))
    n = check_square(operator, quantity)
    estimator = get_estimator(method, quantity)
    if n == 0 or isinstance(estimator, Exact):
        return True
    split = decompose_expression(aslinearoperator(A))
    if split is not None:  # the exact terms are computed; the decision is the rest's
        if split.implicit is None:
            return True
        operator = widened(split.implicit)
    if not estimator.supports(quantity):
        return False  # (trace or diagonal refuses it below, with its own message)
    settings = _settings(
        operator,
        estimator,
        quantity,
        num_matvecs=num_matvecs,
        probe=None,
        rtol=rtol,
        atol=atol,
        confidence=0.95,
        max_matvecs=max_matvecs,
        block_size=1,  # plays no part in the decision (and skips asking for free memory)
        check_finite=True,
    )
    request = settings.request(operator, None, estimator.name)
    return bool(estimator.uses_exact(request))  # the estimator's own rule, not a copy


def _sums(A: Any, adjoint: bool, check_finite: bool, decompose: bool = False) -> Estimate:
    if decompose:
        split = decompose_expression(aslinearoperator(A))
        if split is not None:  # exact terms read, one product through the implicit rest
            return split.estimate(
                "row_sums", lambda implicit: _sums(implicit, False, check_finite), check_finite
            )
    operator = widened(aslinearoperator(A))
    xp = operator.xp
    if backend.compiles_estimates(xp) and operator.compilable():
        # one compiled program, as an estimate's: the column of ones is made on the device
        # (made eagerly, JAX shipped its fill value from the host), beside the product
        program = backend.compiled(_sums_of, num_static=3)
        precision = backend.caller_precision(xp)
        return program(adjoint, check_finite, precision, operator)  # type: ignore[no-any-return]
    estimate = _sums_of(adjoint, check_finite, None, operator)
    return _computed_once(estimate) if backend.is_dask_namespace(xp) else estimate


def _sums_of(
    adjoint: bool, check_finite: bool, precision: str | None, operator: LinearOperator
) -> Estimate:
    """Row sums (column sums with ``adjoint``) of ``operator``: one product with ones,
    at the matrix-product ``precision`` of the caller (JAX)."""
    xp = operator.xp
    rows, cols = operator.shape
    target = operator.T if adjoint else operator
    counter = CountingMatmat(target, check_finite, precision=precision)
    length, count = (rows, cols) if adjoint else (cols, rows)
    real = backend.real_dtype_for(xp, operator.dtype)
    # (made by compiled programs under JAX: made eagerly, their fill values were
    # shipped from the host, a transfer at every call)
    ones = backend.ones(xp, (length, 1), operator.dtype, operator.device)
    stderr = backend.zeros(xp, (count,), real, operator.device)
    value = backend.jit(xp, _first_column)(xp, counter(ones))  # (JAX 0.6: eager [:, 0] ships 0)
    return Estimate(value, stderr, counter.columns, "exact", checks=counter.deferred_checks())


def _first_column(xp: Any, x: Any) -> Any:
    return x[:, 0]


def row_sums(A: Any, check_finite: bool = True, decompose: bool = True) -> Estimate:
    """Exact row sums ``A @ 1`` with one matvec.

    With ``decompose=True`` (see :func:`trace`) the terms of a sum that are known
    exactly (identities, diagonal operators, Kronecker and block-diagonal operators of
    stored factors, stored matrices next to implicit terms) give their row sums without
    a counted product, and the one product goes through the sum of the implicit terms
    (none when there are none).

    Examples
    --------
    >>> import numpy as np
    >>> from linop_trace import row_sums
    >>> row_sums(np.array([[1.0, 2.0], [3.0, 4.0]])).value
    array([3., 7.])
    """
    return _sums(A, adjoint=False, check_finite=check_finite, decompose=decompose)


def col_sums(A: Any, check_finite: bool = True) -> Estimate:
    """Exact column sums ``A^T @ 1`` with one adjoint product (rmatvec).

    Examples
    --------
    >>> import numpy as np
    >>> from linop_trace import col_sums
    >>> col_sums(np.array([[1.0, 2.0], [3.0, 4.0]])).value
    array([4., 6.])
    """
    return _sums(A, adjoint=True, check_finite=check_finite)


def frobenius_norm_squared(
    A: Any,
    method: str = "hutchinson",
    num_matvecs: int | None = None,
    seed: Any = None,
    probe: str | None = None,
    block_size: int | None = None,
    check_finite: bool = True,
) -> Estimate:
    """Estimate ``||A||_F^2 = tr(A^H A)`` by Hutchinson's estimator on ``A^H A``.

    Each probe z gives the sample ``||A z||^2`` (one operator column, no adjoint needed),
    unbiased for any probe with ``E[z z^H] = I``; ``stderr`` is the sample std over
    sqrt(num_matvecs). Works for rectangular operators. The variance bounds of the trace
    estimators are written in terms of this quantity (Gaussian: ``2 ||A||_F^2`` per probe).

    The arguments are :func:`trace`'s, in its order.

    Parameters
    ----------
    A : LinearOperator or matrix
    method : {"hutchinson"}
        The one method (``||A z||^2`` needs no other).
    num_matvecs : int, optional
        Number of probes (operator columns), in ``ceil(num_matvecs / block_size)`` calls;
        100 if not given.
    seed : int, None, or the library's generator/key
    probe : {"rademacher", "gaussian", "sphere", "steinhaus"}, optional
        Rademacher if not given (Steinhaus for complex operators).
    block_size : int, optional
        Most columns per operator call.
    check_finite : bool
        Raise ``FloatingPointError`` when a product is NaN or infinite (some methods
        check a product through the sums they form from it, which then also raise
        when those sums overflow, where the estimate would be NaN).

    Returns
    -------
    Estimate
        Real 0-d ``value`` and ``stderr``; ``method`` is ``"hutchinson"``; its interval is
        Hutchinson's shape-corrected t-interval (the samples ``||A z||^2`` are skewed).

    Examples
    --------
    >>> import numpy as np
    >>> from linop_trace import frobenius_norm_squared
    >>> A = np.diag([1.0, 2.0, 3.0]) @ np.ones((3, 4))  # rows of equal entries
    >>> est = frobenius_norm_squared(A, num_matvecs=50, seed=0)
    >>> float(est.value) > 0, round(float(np.sum(A**2)), 1)
    (True, 56.0)
    """
    if isinstance(method, (int, np.integer)) and not isinstance(method, bool):
        raise TypeError(
            f"frobenius_norm_squared takes the method second, as trace does: pass "
            f"num_matvecs={int(method)} by name"
        )
    if method != "hutchinson":
        raise ValueError(
            f"unknown method {method!r} for frobenius_norm_squared; its one method is 'hutchinson'"
        )
    operator = widened(aslinearoperator(A))
    xp = operator.xp
    num_matvecs = DEFAULT_NUM_MATVECS if num_matvecs is None else num_matvecs
    num_matvecs = check_num_matvecs(num_matvecs, "frobenius_norm_squared", 1)
    probe = "rademacher" if probe is None else probe
    cols = operator.shape[1]
    if block_size is None:
        block_size = probe_block_size(operator, limit=num_matvecs)
    else:
        block_size = check_positive_int(block_size, "block_size")
    sampler = ProbeSampler(probe, cols, xp, operator.dtype, operator.device, seed)
    counter = CountingMatmat(operator, check_finite)
    samples = []
    for start in range(0, num_matvecs, block_size):
        image = counter(sampler(min(block_size, num_matvecs - start)))
        samples.append(backend.column_inner(xp, image, image))
    drawn = samples[0] if len(samples) == 1 else xp.concat(samples)
    if backend.is_complex_dtype(xp, drawn.dtype):
        drawn = xp.real(drawn)
    # the samples |A z|^2 are skewed: the interval is Hutchinson's shape-corrected t one
    info = {"probe": sampler.kind}
    result = sample_mean(drawn, xp, terms=operator.shape[0])  # (|A z|^2 sums n squares)
    estimate = result.estimate(counter.columns, "hutchinson", info=info)
    estimate = estimate.with_checks(counter.deferred_checks(), counter.columns)
    return _computed_once(estimate) if backend.is_dask_namespace(xp) else estimate
