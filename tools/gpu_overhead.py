"""Every estimator's time over the time of its products, on the GPU libraries.

The floor of a cell is one ``A @ Z`` with the same m columns in the same library on the
same device; each time is the best of a few synchronized runs after a warm-up (the
estimate is waited for by reading nothing but its arrays: ``synchronize`` /
``block_until_ready``). Also: a hand-written Hutchinson (one product, one reduction), the
trace of an MLP's Hessian against one ``H @ V`` of the same columns, and Hutchinson on a
sparse tridiagonal matrix against its product.

Prints one table per library and setup, and writes every row to ``$OUT/gpu_overhead.json``
(``OUT`` defaults to the current folder). ``GPU_OVERHEAD_SMALL=1`` runs a tiny version on
whatever devices exist (the CPU included), to try the script before a GPU run.

    python tools/gpu_overhead.py            # run by ``nox -s gpu``
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import linop_trace as lt  # noqa: E402

SMALL = os.environ.get("GPU_OVERHEAD_SMALL") == "1"
TRACE = ["hutchinson", "hutch++", "na-hutch++", "xtrace", "xnystrace"]
DIAGONAL = ["hutchinson", "diag++", "xdiag"]
SETUPS = (
    [(512, 20, "float64")]
    if SMALL
    else [(16384, 100, "float32"), (16384, 1000, "float32"), (8192, 200, "float64")]
)
ROWS: list[dict[str, Any]] = []


def emit(**row: Any) -> None:
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def best(run: Callable[[], Any], wait: Callable[[Any], Any], repeats: int = 3) -> float:
    wait(run())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        wait(run())
        times.append(time.perf_counter() - start)
    return min(times)


# ----------------------------------------------------------------------- libraries
def libraries() -> list[tuple[str, Any, Callable[[Any], Any]]]:
    """(name, make(numpy array, dtype name) -> device array, wait(x) -> x)."""
    found = []
    try:
        import torch

        device = "cuda" if torch.cuda.is_available() else ("cpu" if SMALL else None)
        if device is not None:

            def torch_wait(x: Any) -> Any:
                if device == "cuda":
                    torch.cuda.synchronize()
                return x

            found.append(
                (
                    f"torch-{device}",
                    lambda a, dtype: torch.as_tensor(a, dtype=getattr(torch, dtype), device=device),
                    torch_wait,
                )
            )
    except ImportError:
        pass
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()

        def cupy_wait(x: Any) -> Any:
            cupy.cuda.Device().synchronize()
            return x

        found.append(("cupy", lambda a, dtype: cupy.asarray(a, dtype=dtype), cupy_wait))
    except Exception:  # no CuPy, or no CUDA device for it
        pass
    try:
        import jax

        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        platform = jax.default_backend()
        if platform != "cpu" or SMALL:

            def jax_wait(x: Any) -> Any:
                for leaf in jax.tree_util.tree_leaves(x):
                    if hasattr(leaf, "block_until_ready"):
                        leaf.block_until_ready()
                return x

            found.append(
                (f"jax-{platform}", lambda a, dtype: jnp.asarray(a, dtype=dtype), jax_wait)
            )
    except ImportError:
        pass
    return found


def arrays_of(estimate: Any) -> list[Any]:
    return [x for x in (estimate._value, estimate._stderr) if x is not None]


# ------------------------------------------------------------------ dense tables
def psd_matrix(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    G = rng.standard_normal((n, n // 4)).astype(np.float32)
    return (G @ G.T) / (n // 4) + 0.1 * np.eye(n, dtype=np.float32)


def dense_table(name: str, make: Any, wait: Any, n: int, m: int, dtype: str, A_np: Any) -> None:
    A = make(A_np, dtype)
    Z = make(np.random.default_rng(1).standard_normal((n, m)), dtype)
    floor = best(lambda: A @ Z, wait, repeats=5)
    emit(kind="floor", library=name, n=n, m=m, dtype=dtype, seconds=floor)
    R = make(np.random.default_rng(2).choice([-1.0, 1.0], size=(n, m)), dtype)
    hand = best(lambda: (R * (A @ R)).sum() / m, wait)
    emit(kind="hand_hutchinson", library=name, n=n, m=m, dtype=dtype, ratio=hand / floor)
    operator = lt.aslinearoperator(A, tags=("symmetric", "positive_semidefinite"))
    plain = lt.aslinearoperator(A)
    cells = [("trace", method) for method in TRACE] + [("diagonal", m_) for m_ in DIAGONAL]
    for quantity, method in cells:
        function = getattr(lt, quantity)
        target = operator if method == "xnystrace" else plain
        try:
            seconds = best(
                lambda f=function, t=target, k=method: arrays_of(
                    f(t, method=k, num_matvecs=m, seed=0)
                ),
                wait,
            )
            estimate = function(target, method=method, num_matvecs=m, seed=0)
            emit(
                kind=quantity,
                library=name,
                method=estimate.method if method == "auto" else method,
                asked=method,
                n=n,
                m=m,
                dtype=dtype,
                seconds=seconds,
                ratio=seconds / floor,
            )
        except Exception as error:  # a failure is a result too
            emit(kind="error", library=name, method=method, quantity=quantity, error=repr(error))


# ----------------------------------------------------------------------- autodiff
def torch_hessian() -> None:
    import torch
    from torch import nn

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    width = 64 if SMALL else 1024
    model = nn.Sequential(
        nn.Linear(784, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10)
    ).to(device)
    X = torch.randn(512, 784, device=device)
    y = torch.randint(0, 10, (512,), device=device)
    H = lt.hessian(model, nn.CrossEntropyLoss(), (X, y))
    V = torch.randn(H.shape[0], 100, device=device)

    def wait(x: Any) -> Any:
        if device == "cuda":
            torch.cuda.synchronize()
        return x

    product = best(lambda: H @ V, wait)
    for method in ("hutchinson", "xtrace"):
        seconds = best(
            lambda k=method: arrays_of(lt.trace(H, method=k, num_matvecs=100, seed=0)), wait
        )
        emit(
            kind="hessian_trace",
            library=f"torch-{device}",
            method=method,
            parameters=H.shape[0],
            ratio=seconds / product,
            product_seconds=product,
            route=H.mode,
        )


def jax_hessian() -> None:
    import jax
    import jax.numpy as jnp

    width = 64 if SMALL else 1024
    keys = jax.random.split(jax.random.key(0), 4)
    params = {
        "W1": jax.random.normal(keys[0], (784, width), dtype=jnp.float32) / 28.0,
        "W2": jax.random.normal(keys[1], (width, width), dtype=jnp.float32) / width**0.5,
        "W3": jax.random.normal(keys[2], (width, 10), dtype=jnp.float32) / width**0.5,
    }
    X = jax.random.normal(keys[3], (512, 784), dtype=jnp.float32)
    y = jnp.arange(512) % 10

    def loss(p: Any) -> Any:
        h = jnp.tanh(jnp.tanh(X @ p["W1"]) @ p["W2"]) @ p["W3"]
        return -jnp.mean(jax.nn.log_softmax(h)[jnp.arange(512), y])

    H = lt.hessian(loss, params)
    V = jax.random.normal(keys[0], (H.shape[0], 100), dtype=jnp.float32)

    def wait(x: Any) -> Any:
        for leaf in jax.tree_util.tree_leaves(x):
            leaf.block_until_ready()
        return x

    product = best(lambda: H @ V, wait)
    seconds = best(
        lambda: arrays_of(lt.trace(H, method="hutchinson", num_matvecs=100, seed=0)), wait
    )
    emit(
        kind="hessian_trace",
        library=f"jax-{jax.default_backend()}",
        method="hutchinson",
        parameters=H.shape[0],
        ratio=seconds / product,
        product_seconds=product,
    )


# ------------------------------------------------------------------------- sparse
def sparse_rows() -> None:
    import scipy.sparse as sp

    n = 2000 if SMALL else 1_000_000
    L = sp.diags([-np.ones(n - 1), 2 * np.ones(n), -np.ones(n - 1)], [-1, 0, 1], format="csr")
    candidates = []
    try:
        import torch

        if torch.cuda.is_available() or SMALL:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            coo = L.tocoo()
            T = torch.sparse_coo_tensor(
                np.vstack([coo.row, coo.col]), coo.data, coo.shape, device=device
            ).to_sparse_csr()
            sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
            candidates.append((f"torch-{device}-csr", T, lambda x: (sync(), x)[1]))
    except ImportError:
        pass
    try:
        import cupy
        import cupyx.scipy.sparse as csp

        C = csp.csr_matrix(L)
        candidates.append(("cupyx-csr", C, lambda x: (cupy.cuda.Device().synchronize(), x)[1]))
    except Exception:
        pass
    for name, matrix, wait in candidates:
        try:
            operator = lt.aslinearoperator(matrix)
            Z = lt.rademacher(operator, 100, seed=0)
            product = best(lambda o=operator, z=Z: o.matmat(z), wait)
            seconds = best(
                lambda o=operator: arrays_of(
                    lt.trace(o, method="hutchinson", num_matvecs=100, seed=0)
                ),
                wait,
            )
            emit(
                kind="sparse_hutchinson",
                library=name,
                n=n,
                ratio=seconds / product,
                product_seconds=product,
                hutchinson_seconds=seconds,
            )
            if name == "cupyx-csr":  # does the block's memory order decide the product's time?
                import cupy

                # cupyx returns the product in F order (cuSPARSE's column-major SpMM, after
                # a transposing copy of a C-ordered block): the column reduction then
                # reads a C-ordered probe block beside an F-ordered product
                image = matrix @ cupy.asarray(Z, order="F")
                for order in ("C", "F"):
                    block = cupy.asarray(Z, order=order)
                    for kind, work in (
                        ("sparse_product_order", lambda b=block, c=matrix: c @ b),
                        (
                            "sparse_reduction_order",
                            lambda b=block, y=image: cupy.sum(b * y, axis=0),
                        ),
                    ):
                        emit(kind=kind, library=name, order=order, seconds=best(work, wait))
        except Exception as error:
            emit(kind="error", library=name, what="sparse", error=repr(error))


def main() -> None:
    out = Path(os.environ.get("OUT", "."))
    for name, make, wait in libraries():
        for n, m, dtype in SETUPS:
            try:
                dense_table(name, make, wait, n, m, dtype, psd_matrix(n))
                print_setup(name, n, m, dtype)  # at once: a run cut short keeps its tables
            except Exception as error:
                emit(
                    kind="error",
                    library=name,
                    n=n,
                    error=repr(error),
                    trace=traceback.format_exc()[-600:],
                )
    for part in (torch_hessian, jax_hessian, sparse_rows):
        try:
            part()
        except Exception as error:
            emit(
                kind="error",
                what=part.__name__,
                error=repr(error),
                trace=traceback.format_exc()[-600:],
            )
    (out / "gpu_overhead.json").write_text(json.dumps(ROWS, indent=1))
    print_tables()


def print_setup(library: str, n: int, m: int, dtype: str) -> None:
    """The table of one library and setup: each method's time over one ``A @ Z``."""
    print(f"\n{library}: n = {n}, m = {m}, {dtype} (time / one A @ Z)", flush=True)
    for r in ROWS:
        if (r.get("library"), r.get("n"), r.get("m"), r.get("dtype")) != (library, n, m, dtype):
            continue
        if r["kind"] == "hand_hutchinson":
            print(f"  {'hand-written hutchinson':28s} {r['ratio']:5.2f}")
        if r["kind"] in ("trace", "diagonal"):
            print(f"  {r['kind'] + ' ' + r['asked']:28s} {r['ratio']:5.2f}", flush=True)


def print_tables() -> None:
    for r in ROWS:
        if r["kind"] in ("hessian_trace", "sparse_hutchinson"):
            print(
                f"{r['kind']} {r['library']} {r.get('method', '')}: {r['ratio']:.2f} x the product"
            )
        if r["kind"] == "sparse_product_order":
            print(f"cupyx CSR @ {r['order']}-ordered block: {1e3 * r['seconds']:.2f} ms")
        if r["kind"] == "sparse_reduction_order":
            print(
                f"column sums of a {r['order']}-ordered block times cupyx's F-ordered "
                f"product: {1e3 * r['seconds']:.2f} ms"
            )
        if r["kind"] == "error":
            print("error:", r)


if __name__ == "__main__":
    main()
