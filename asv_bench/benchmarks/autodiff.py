"""Autodiff operators on BackPACK's digits MLP: Hessian products, traces, divergences.

The problem is ``linop_trace.autodiff._examples.digits_mlp_problem``: Flatten ->
Linear(64, 20, bias=False) -> Sigmoid -> Linear(20, 10, bias=False), cross-entropy, a
256-digit batch, 1,480 parameters, float32, one thread. The unit of work is H @ V for a
block V of 100 Rademacher columns, as in a 100-matvec trace estimate.

* ``TorchHessianProduct``: the ways to get H @ V in torch - the dense product with H
  already materialized (the floor), a Python loop of double-backward HVPs (what
  BackPACK's example and AdaHessian do), ``autograd.grad(..., is_grads_batched=True)``,
  this package's operator (forward-over-reverse, reverse-over-reverse, compiled), and
  curvlinops' ``HessianLinearOperator`` where it is installed.
* ``JaxHessianProduct``: a hand-written ``jit(vmap(jvp(grad)))`` against this package's
  operator (same compiled program, cached across calls).
* ``HessianTrace``: trace estimates at 100 matvecs on both libraries.
* ``Divergence``: per-sample Jacobian traces of a batched flow field (CNF case).
* ``TrackHessianSpeedRatios``: the issue's speed claims as ratios, all products timed
  side by side, interleaved, in one process (medians of 20 rounds).
* ``TrackAutoRoute``: ``mode="auto"`` (which times the vectorized product against a loop
  of single products on its first block and keeps the faster) against the faster of the
  two, for the Hessian and the GGN of the digits MLP and of a wide MLP (784-256-256-10,
  ReLU, 269,322 parameters, 512 random samples), where the loop wins on a CPU.

Skipped (``NotImplementedError``) where torch or JAX is missing. Run
``python -m benchmarks.autodiff`` from ``asv_bench/`` to print the ratios directly
(``--routes`` for those of ``TrackAutoRoute``).
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

NUM_COLUMNS = 100
BATCH_SIZE = 256
WIDE_LAYERS = (784, 256, 256, 10)
WIDE_BATCH_SIZE = 512

TORCH_IMPLEMENTATIONS = [
    "dense",
    "loop_double_backward",
    "is_grads_batched",
    "ours_forward_over_reverse",
    "ours_reverse_over_reverse",
    "ours_compiled",
    "curvlinops",
]
JAX_IMPLEMENTATIONS = ["hand_jit_vmap_jvp_grad", "ours"]


def _require(library: str) -> None:
    if importlib.util.find_spec(library) is None:
        raise NotImplementedError(f"{library} is not installed")


def _pin_threads() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
    try:
        from ._common import pin_threads
    except ImportError:  # run as a script outside the benchmark package
        pin_threads = None
    if pin_threads is not None:
        pin_threads()
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def _rademacher_block(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (2.0 * rng.integers(0, 2, size=(n, NUM_COLUMNS)) - 1.0).astype(np.float32)


# ----------------------------------------------------------------------- builders


def torch_products() -> dict[str, Callable[[], Any]]:
    """H @ V on the digits MLP by every torch implementation, each a no-argument call."""
    import torch

    import linop_trace
    from linop_trace.autodiff._examples import digits_mlp_problem

    torch.set_num_threads(1)
    model, loss_fn, (X, y) = digits_mlp_problem(BATCH_SIZE, seed=0, dtype=torch.float32)
    params = list(model.parameters())
    sizes = [p.numel() for p in params]
    forward = linop_trace.hessian(model, loss_fn, (X, y), mode="forward")
    V = torch.from_numpy(_rademacher_block(forward.shape[0]))
    VT = V.T.contiguous()

    def loop_double_backward() -> Any:
        loss = loss_fn(model(X), y)
        gradients = torch.autograd.grad(loss, params, create_graph=True)
        columns = []
        for j in range(V.shape[1]):
            pieces = torch.split(V[:, j], sizes)
            tangent = [piece.view_as(p) for piece, p in zip(pieces, params)]
            hv = torch.autograd.grad(gradients, params, tangent, retain_graph=True)
            columns.append(torch.cat([h.reshape(-1) for h in hv]))
        return torch.stack(columns, dim=1)

    def is_grads_batched() -> Any:
        loss = loss_fn(model(X), y)
        gradients = torch.autograd.grad(loss, params, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in gradients])
        return torch.autograd.grad(flat, params, VT, is_grads_batched=True)

    implementations: dict[str, Callable[[], Any]] = {
        "loop_double_backward": loop_double_backward,
        "is_grads_batched": is_grads_batched,
        "ours_forward_over_reverse": lambda: forward @ V,
    }
    reverse = linop_trace.hessian(model, loss_fn, (X, y), mode="reverse")
    implementations["ours_reverse_over_reverse"] = lambda: reverse @ V
    dense = forward.to_dense()
    implementations["dense"] = lambda: dense @ V
    return implementations


def torch_compiled_product() -> Callable[[], Any]:
    """H @ V through torch.compile (compiled on the first call, here)."""
    import torch

    import linop_trace
    from linop_trace.autodiff._examples import digits_mlp_problem

    model, loss_fn, data = digits_mlp_problem(BATCH_SIZE, seed=0, dtype=torch.float32)
    H = linop_trace.hessian(model, loss_fn, data, compile=True)
    V = torch.from_numpy(_rademacher_block(H.shape[0]))
    H @ V  # compile
    return lambda: H @ V


def curvlinops_product() -> Callable[[], Any]:
    """H @ V with curvlinops' HessianLinearOperator (where curvlinops is installed)."""
    _require("curvlinops")
    import torch
    from curvlinops import HessianLinearOperator

    from linop_trace.autodiff._examples import digits_mlp_problem

    model, loss_fn, (X, y) = digits_mlp_problem(BATCH_SIZE, seed=0, dtype=torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    H = HessianLinearOperator(model, loss_fn, params, [(X, y)], check_deterministic=False)
    V = torch.from_numpy(_rademacher_block(sum(p.numel() for p in params)))
    return lambda: H @ V


def jax_products() -> dict[str, Callable[[], Any]]:
    """H @ V on the same MLP in JAX: hand-written jit(vmap(jvp(grad))) and ours, compiled."""
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    import linop_trace
    from linop_trace.autodiff._examples import digits_mlp_jax_problem

    apply_fn, params, loss_fn, (X, y) = digits_mlp_jax_problem(BATCH_SIZE, 0, jnp.float32)
    theta, unravel = ravel_pytree(params)

    @jax.jit
    def hand(theta: Any, inputs: Any, targets: Any, V: Any) -> Any:
        def loss(t: Any) -> Any:
            return loss_fn(apply_fn(unravel(t), inputs), targets)

        def column(v: Any) -> Any:
            return jax.jvp(jax.grad(loss), (theta,), (v,))[1]

        return jax.vmap(column, in_axes=1, out_axes=1)(V)

    H = linop_trace.hessian(apply_fn, params, loss_fn, (X, y))
    V = jnp.asarray(_rademacher_block(H.shape[0]))
    implementations = {
        "hand_jit_vmap_jvp_grad": lambda: hand(theta, X, y, V).block_until_ready(),
        "ours": lambda: (H @ V).block_until_ready(),
    }
    for run in implementations.values():  # compile outside the timings
        run()
    return implementations


def _interleaved_medians(
    implementations: dict[str, Callable[[], Any]], rounds: int = 20
) -> dict[str, float]:
    """Median seconds of each call, measured round-robin so load drifts hit all alike."""
    for run in implementations.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in implementations}
    for _ in range(rounds):
        for name, run in implementations.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(values)) for name, values in times.items()}


def measure_ratios(rounds: int = 20, compiled: bool = True) -> dict[str, float]:
    """All H @ V timings (ms) and the issue's ratios, side by side in one process."""
    _pin_threads()
    implementations = {}
    _require("torch")
    implementations.update({f"torch {k}": v for k, v in torch_products().items()})
    if compiled:
        implementations["torch ours_compiled"] = torch_compiled_product()
    if importlib.util.find_spec("curvlinops") is not None:
        implementations["torch curvlinops"] = curvlinops_product()
    if importlib.util.find_spec("jax") is not None:
        implementations.update({f"jax {k}": v for k, v in jax_products().items()})
    medians = _interleaved_medians(implementations, rounds)
    results = {f"{name} [ms]": 1e3 * value for name, value in medians.items()}
    ours = medians["torch ours_forward_over_reverse"]
    results["loop / ours (torch, >= 2.5 wanted)"] = medians["torch loop_double_backward"] / ours
    if "jax ours" in medians:
        hand = medians["jax hand_jit_vmap_jvp_grad"]
        results["ours torch / hand jax (<= 1.5 wanted)"] = ours / hand
        results["ours jax / hand jax (<= 1.2 wanted)"] = medians["jax ours"] / hand
        if "torch ours_compiled" in medians:
            results["ours torch compiled / hand jax"] = medians["torch ours_compiled"] / hand
    if "torch ours_compiled" in medians:
        results["loop / ours compiled (torch)"] = (
            medians["torch loop_double_backward"] / medians["torch ours_compiled"]
        )
    if "torch curvlinops" in medians:
        results["curvlinops / ours (torch, >= 1 wanted)"] = medians["torch curvlinops"] / ours
    results["ours reverse / ours forward (torch)"] = (
        medians["torch ours_reverse_over_reverse"] / ours
    )
    return results


def wide_mlp_problem(seed: int = 0) -> tuple[Any, Any, tuple[Any, Any]]:
    """``(model, loss_fn, (X, y))``: a 784-256-256-10 ReLU MLP (269,322 parameters),
    cross-entropy, 512 standard normal inputs with random labels, float32."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[Any] = []
        for fan_in, fan_out in zip(WIDE_LAYERS[:-1], WIDE_LAYERS[1:]):
            layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.ReLU()]
        model = torch.nn.Sequential(*layers[:-1])
    X = torch.randn(WIDE_BATCH_SIZE, WIDE_LAYERS[0], generator=generator)
    y = torch.randint(0, WIDE_LAYERS[-1], (WIDE_BATCH_SIZE,), generator=generator)
    return model, torch.nn.CrossEntropyLoss(), (X, y)


def route_products(operator: str, mlp: str) -> tuple[dict[str, Callable[[], Any]], Any]:
    """H @ V (or G @ V), 100 columns, by the loop, the vectorized product and ``"auto"``,
    and the ``"auto"`` operator.

    ``"auto"`` is one operator, timed on its first call (the warm-up of the measurement)
    and on its chosen route from then on; ``"auto first block"`` builds a new operator for
    every call after forgetting the routes chosen so far, so each call is the timed block
    itself; ``"auto built again"`` builds a new operator for every call as a training loop
    does, which takes the route chosen for the same problem without timing.
    """
    import torch

    import linop_trace
    from linop_trace.autodiff._examples import digits_mlp_problem

    torch.set_num_threads(1)
    if mlp == "wide":
        model, loss_fn, data = wide_mlp_problem()
    else:
        model, loss_fn, data = digits_mlp_problem(BATCH_SIZE, seed=0, dtype=torch.float32)
    build = linop_trace.hessian if operator == "hessian" else linop_trace.ggn
    loop = build(model, loss_fn, data, mode="loop")
    vectorized = build(model, loss_fn, data, mode="forward")
    auto = build(model, loss_fn, data, mode="auto")
    V = torch.from_numpy(_rademacher_block(loop.shape[1]))
    products = {
        "loop": lambda: loop @ V,
        "vectorized": lambda: vectorized @ V,
        "auto": lambda: auto @ V,
        "auto first block": lambda: _forgetting_routes(build)(model, loss_fn, data) @ V,
        "auto built again": lambda: build(model, loss_fn, data, mode="auto") @ V,
    }
    return products, auto


def _forgetting_routes(build: Callable[..., Any]) -> Callable[..., Any]:
    """``build(..., mode="auto")`` after the routes chosen so far are forgotten (as in a
    process where no operator over the problem was built): its first block is timed."""
    from linop_trace.autodiff import _common

    def built(*args: Any) -> Any:
        _common._CHOSEN_ROUTES.clear()
        return build(*args, mode="auto")

    return built


def _interleaved_best(
    implementations: dict[str, Callable[[], Any]], rounds: int = 5
) -> tuple[dict[str, float], dict[str, float]]:
    """Best wall and best thread-CPU seconds of each call over ``rounds`` round-robin
    rounds, after one warm-up. The rounds alternate the order and its reverse, so that no
    call always follows the same one (on the digits MLP, a product right after the loop
    took up to 30% longer than after another product). With one torch thread the CPU
    time of this thread is the products' own work, which other processes on a loaded
    machine inflate less than the wall time."""
    for run in implementations.values():
        run()
    names = list(implementations)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        for name in names if round_index % 2 == 0 else names[::-1]:
            run = implementations[name]
            start, start_cpu = time.perf_counter(), time.thread_time()
            run()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.thread_time() - start_cpu)
    return (
        {name: min(values) for name, values in wall.items()},
        {name: min(values) for name, values in cpu.items()},
    )


def measure_route_ratios(rounds: int = 5) -> dict[str, dict[str, Any]]:
    """For each operator and MLP: ms of each route, ``auto``'s choice and its ratios
    (wall time; "[cpu]": CPU time of this thread)."""
    _pin_threads()
    results: dict[str, dict[str, Any]] = {}
    for operator in ("hessian", "ggn"):
        for mlp in ("digits", "wide"):
            products, auto = route_products(operator, mlp)
            wall, cpu = _interleaved_best(products, rounds)
            case: dict[str, Any] = {f"{name} [ms]": 1e3 * seconds for name, seconds in wall.items()}
            case["auto chose"] = auto.mode
            for label, best in (("", wall), (" [cpu]", cpu)):
                faster = min(best["loop"], best["vectorized"])
                case[f"auto / faster{label}"] = best["auto"] / faster
                case[f"auto first block / faster{label}"] = best["auto first block"] / faster
                case[f"auto built again / faster{label}"] = best["auto built again"] / faster
            results[f"{operator} {mlp}"] = case
    return results


# --------------------------------------------------------------------- benchmarks


class TorchHessianProduct:
    """H @ V, 100 columns, digits MLP, float32, one thread."""

    params = [TORCH_IMPLEMENTATIONS]
    param_names = ["implementation"]
    timeout = 900

    def setup(self, implementation: str) -> None:
        _require("torch")
        _pin_threads()
        if implementation == "ours_compiled":
            self.run = torch_compiled_product()
        elif implementation == "curvlinops":
            self.run = curvlinops_product()
        else:
            self.run = torch_products()[implementation]
        self.run()

    def time_matmat(self, implementation: str) -> None:
        self.run()

    def peakmem_matmat(self, implementation: str) -> None:
        self.run()


class JaxHessianProduct:
    """H @ V, 100 columns, digits MLP, float32, one thread, compiled before timing."""

    params = [JAX_IMPLEMENTATIONS]
    param_names = ["implementation"]
    timeout = 600

    def setup(self, implementation: str) -> None:
        _require("jax")
        _pin_threads()
        self.run = jax_products()[implementation]

    def time_matmat(self, implementation: str) -> None:
        self.run()


class HessianTrace:
    """trace(H) of the digits MLP at 100 matvecs (JAX programs compiled in setup)."""

    params = [["torch", "jax"], ["hutchinson", "hutch++", "xtrace"]]
    param_names = ["library", "method"]
    timeout = 900

    def setup(self, library: str, method: str) -> None:
        _require(library)
        _pin_threads()
        import linop_trace

        if method not in linop_trace.available_methods("trace"):
            raise NotImplementedError(f"method {method!r} is not registered")
        if library == "torch":
            from linop_trace.autodiff._examples import digits_mlp_problem

            model, loss_fn, data = digits_mlp_problem(BATCH_SIZE)
            self.H = linop_trace.hessian(model, loss_fn, data)
        else:
            from linop_trace.autodiff._examples import digits_mlp_jax_problem

            apply_fn, params, loss_fn, data = digits_mlp_jax_problem(BATCH_SIZE)
            self.H = linop_trace.hessian(apply_fn, params, loss_fn, data)
        self.method = method
        self.time_trace(library, method)  # compiles the block widths the method uses

    def time_trace(self, library: str, method: str) -> None:
        import linop_trace

        float(linop_trace.trace(self.H, method=self.method, num_matvecs=NUM_COLUMNS, seed=0))


class Divergence:
    """Per-sample divergence of a flow field on a (512, 16) batch: exact (16 JVPs) and
    Hutchinson with 8 probes, each one vectorized pass."""

    params = [["torch", "jax"], ["exact", "hutchinson"]]
    param_names = ["library", "method"]
    timeout = 600

    def setup(self, library: str, method: str) -> None:
        _require(library)
        _pin_threads()
        rng = np.random.default_rng(0)
        W = rng.standard_normal((16, 16)).astype(np.float32) / 4
        x = rng.standard_normal((512, 16)).astype(np.float32)
        if library == "torch":
            import torch

            W_, self.x = torch.from_numpy(W), torch.from_numpy(x)
            self.f = lambda z: torch.tanh(z @ W_) + 0.1 * z
        else:
            import jax.numpy as jnp

            W_, self.x = jnp.asarray(W), jnp.asarray(x)
            self.f = lambda z: jnp.tanh(z @ W_) + 0.1 * z
        self.time_divergence(library, method)

    def time_divergence(self, library: str, method: str) -> None:
        import linop_trace

        est = linop_trace.divergence(self.f, self.x, method=method, num_matvecs=8, seed=0)
        float(est.value[0])


class TrackHessianSpeedRatios:
    """The speed claims of the autodiff issue as ratios of medians, one process."""

    unit = "ratio"
    timeout = 1800

    def setup_cache(self) -> dict[str, float]:
        if importlib.util.find_spec("torch") is None or importlib.util.find_spec("jax") is None:
            return {}
        return measure_ratios(rounds=20, compiled=False)

    def _get(self, ratios: dict[str, float], key: str) -> float:
        if key not in ratios:
            raise NotImplementedError("torch and JAX are both needed for these ratios")
        return ratios[key]

    def track_loop_over_ours_torch(self, ratios: dict[str, float]) -> float:
        return self._get(ratios, "loop / ours (torch, >= 2.5 wanted)")

    def track_ours_torch_over_hand_jax(self, ratios: dict[str, float]) -> float:
        return self._get(ratios, "ours torch / hand jax (<= 1.5 wanted)")

    def track_ours_jax_over_hand_jax(self, ratios: dict[str, float]) -> float:
        return self._get(ratios, "ours jax / hand jax (<= 1.2 wanted)")

    def track_reverse_over_forward_torch(self, ratios: dict[str, float]) -> float:
        return self._get(ratios, "ours reverse / ours forward (torch)")


class TrackAutoRoute:
    """mode="auto" over the faster of its routes (loop of single products, vectorized),
    H @ V and G @ V with 100 columns, best of 5 interleaved rounds, one thread (the
    issue's target: <= 1.1). ``first_block``: a new operator's first product, the block it
    times both routes on (in a process where both have run before), over the same faster
    route. ``built_again``: a new operator's first product where one over the same problem
    was timed before (it takes that choice), over the faster route. ``cpu_time``: the same ratio in CPU time of the benchmark's one thread, which
    other processes on a shared machine do not inflate."""

    params = [["hessian", "ggn"], ["digits", "wide"]]
    param_names = ["operator", "mlp"]
    unit = "ratio"
    timeout = 1800

    def setup_cache(self) -> dict[str, dict[str, Any]]:
        if importlib.util.find_spec("torch") is None:
            return {}
        return measure_route_ratios(rounds=5)

    def _get(self, results: dict[str, dict[str, Any]], key: str, operator: str, mlp: str) -> float:
        if not results:
            raise NotImplementedError("torch is not installed")
        return float(results[f"{operator} {mlp}"][key])

    def track_auto_over_faster(self, results: dict, operator: str, mlp: str) -> float:
        return self._get(results, "auto / faster", operator, mlp)

    def track_first_block_over_faster(self, results: dict, operator: str, mlp: str) -> float:
        return self._get(results, "auto first block / faster", operator, mlp)

    def track_built_again_over_faster(self, results: dict, operator: str, mlp: str) -> float:
        return self._get(results, "auto built again / faster", operator, mlp)

    def track_auto_over_faster_cpu_time(self, results: dict, operator: str, mlp: str) -> float:
        return self._get(results, "auto / faster [cpu]", operator, mlp)


if __name__ == "__main__":  # pragma: no cover - manual measurement
    import sys

    if "--routes" in sys.argv:
        for case, numbers in measure_route_ratios().items():
            print(case)
            for key, value in numbers.items():
                print(f"    {key:30s} {value if isinstance(value, str) else f'{value:10.3f}'}")
        sys.exit()
    compiled = "--no-compile" not in sys.argv
    for key, value in measure_ratios(rounds=20, compiled=compiled).items():
        print(f"{key:45s} {value:8.3f}")
