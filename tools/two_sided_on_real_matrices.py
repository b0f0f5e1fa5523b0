"""One-sided against two-sided XDiag and Diag++ on symmetric matrices built from data.

The two-sided deflation wins on the XTrace paper's test matrices (Haar eigenvectors, so
no dominant diagonal). These are other kinds: kernel matrices and a resolvent (decaying
spectra), graph Laplacians with constant diagonal, combinatorial Laplacians D - W
whose diagonal (the degrees) varies and dominates each row, and the loss Hessian of a
small MLP on the digits (the gallery's; needs torch). Rademacher probes see no
diagonal, so the one-sided residual (I - P) A keeps its diagonal for free, while the
right projection of (I - P) A (I - P) spreads A_kk over row k (about A_kk^2 ||P e_k||^2
of extra variance): high-degree vertices get larger errors.

Prints, per matrix and budget, the mean over seeds of max|err| / max|d| and of the
root-mean-square error over the root-mean-square of d, one-sided / two-sided.

    python tools/two_sided_on_real_matrices.py [--seeds 20]
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from importlib import resources
from typing import Any

import networkx as nx
import numpy as np
import scipy.io
import scipy.sparse as sp
from sklearn.datasets import load_breast_cancer, load_digits

import linop_trace
from linop_trace.estimators import DiagPlusPlus, XDiag


def _rbf_kernel(features: np.ndarray) -> np.ndarray:
    """exp(-|x - y|^2 / median |x - y|^2) of standardized features."""
    spread = features.std(axis=0)
    features = (features - features.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    squares = np.sum(features**2, axis=1)
    distances = np.maximum(squares[:, None] + squares[None, :] - 2 * features @ features.T, 0)
    return np.exp(-distances / np.median(distances))


def matrices() -> Iterator[tuple[str, Any]]:
    source = resources.files("linop_trace") / "data" / "digits_knn_laplacian.mtx"
    with resources.as_file(source) as path:
        laplacian = sp.csr_array(scipy.io.mmread(path)).astype(float)
    yield "digits kNN Laplacian D - W", laplacian
    scale = sp.diags_array(1 / np.sqrt(laplacian.diagonal()))
    yield "its normalized Laplacian", sp.csr_array(scale @ laplacian @ scale)
    yield "resolvent (L + I)^-1", np.linalg.inv(laplacian.toarray() + np.eye(laplacian.shape[0]))
    yield "digits RBF kernel", _rbf_kernel(load_digits().data)
    yield "breast-cancer RBF kernel", _rbf_kernel(load_breast_cancer().data)
    hubs = nx.barabasi_albert_graph(2000, 3, seed=0)
    yield "Barabasi-Albert Laplacian", sp.csr_array(nx.laplacian_matrix(hubs).astype(float))
    grid = nx.grid_2d_graph(40, 50)
    yield "40 x 50 grid Laplacian", sp.csr_array(nx.laplacian_matrix(grid).astype(float))
    yield "digits MLP loss Hessian", _mlp_hessian()


def _mlp_hessian() -> np.ndarray:
    """The loss Hessian of the gallery's digits MLP (1,480 weights, batch 256), dense,
    from 1,480 Hessian-vector products: indefinite, without a dominant diagonal."""
    import torch

    from linop_trace.autodiff._examples import digits_mlp_problem

    torch.set_num_threads(1)
    model, loss_fn, data = digits_mlp_problem(batch_size=256, dtype=torch.float64)
    hessian = linop_trace.hessian(model, loss_fn, data)
    return hessian.matmat(torch.eye(hessian.shape[0], dtype=torch.float64)).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    args = parser.parse_args()
    print(f"{'matrix':28s} {'n':>5s} {'method':7s} {'m':>4s}  max err one / two    rms one / two")
    for name, matrix in matrices():
        matrix = (matrix + matrix.T) / 2  # exactly symmetric
        truth = np.asarray(matrix.diagonal())
        operator = linop_trace.aslinearoperator(matrix, tags=("symmetric",))
        for label, estimator in (("xdiag", XDiag), ("diag++", DiagPlusPlus)):
            for budget in (100, 300):
                worst = {False: [], True: []}
                rms = {False: [], True: []}
                for two_sided in (False, True):
                    for seed in range(args.seeds):
                        method = estimator(two_sided=two_sided)
                        value = linop_trace.diagonal(
                            operator, method=method, num_matvecs=budget, seed=seed
                        ).value
                        error = np.asarray(value) - truth
                        worst[two_sided].append(np.abs(error).max() / np.abs(truth).max())
                        rms[two_sided].append(np.sqrt(np.mean(error**2) / np.mean(truth**2)))
                print(
                    f"{name:28s} {matrix.shape[0]:5d} {label:7s} {budget:4d}  "
                    f"{np.mean(worst[False]):.2e} / {np.mean(worst[True]):.2e}   "
                    f"{np.mean(rms[False]):.2e} / {np.mean(rms[True]):.2e}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
