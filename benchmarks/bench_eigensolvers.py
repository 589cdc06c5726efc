"""The loss's eigensolvers side by side: torch.linalg.eigh against fdpipe's
tridiagonal path (LAPACK dsytrd + dstemr through scipy) and scipy's own
eigh drivers, in one process.

Each call decomposes a d x d symmetric matrix and applies
Q diag(s) Q^T to 257 rows, which is what one FD-loss step needs with a
batch of 256.

Usage (pinned, one thread; see BENCHMARKS.md):
    taskset -c 0 .venv/bin/python benchmarks/bench_eigensolvers.py --dims 768 1024 2048
"""

from __future__ import annotations

import common  # noqa: F401  (sets thread variables before numpy/torch load)

import argparse
import sys

import numpy as np
import scipy.linalg
import torch

from fdpipe.eigen import symmetric_eigen

ROWS = 257


def make_matrix(d: int, kind: str) -> torch.Tensor:
    """Wishart (2 d samples) or power-law (eigenvalues k^-1.5) test matrix."""
    rng = np.random.default_rng(d)
    if kind == "wishart":
        x = rng.standard_normal((2 * d, d))
        return torch.tensor(x.T @ x / (2 * d))
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    matrix = (q * np.arange(1, d + 1, dtype=np.float64) ** -1.5) @ q.T
    return torch.tensor(0.5 * (matrix + matrix.T))


def methods(matrix: torch.Tensor, rows: torch.Tensor):
    scale = torch.ones(matrix.shape[0], dtype=torch.float64)
    array = matrix.numpy()

    def fdpipe_solver(name):
        return lambda: symmetric_eigen(matrix.clone(), name, "bench").apply(rows, scale)

    def scipy_driver(driver):
        def run():
            values, q = scipy.linalg.eigh(array, driver=driver, check_finite=False)
            return ((rows.numpy() @ q) * scale.numpy()) @ q.T

        return run

    return {
        "torch eigh": fdpipe_solver("torch"),
        "fdpipe tridiagonal": fdpipe_solver("tridiagonal"),
        "scipy eigh evd": scipy_driver("evd"),
        "scipy eigh evr": scipy_driver("evr"),
    }


def agreement(matrix: torch.Tensor, rows: torch.Tensor) -> tuple[float, float]:
    """Largest relative difference of eigenvalues and applied rows, tridiagonal vs torch."""
    results = {}
    for solver in ("torch", "tridiagonal"):
        eigen = symmetric_eigen(matrix.clone(), solver, "bench")
        weights = 0.5 / eigen.values.clamp_min(1e-10 * float(eigen.values[-1])).sqrt()
        results[solver] = (eigen.values, eigen.apply(rows, weights))
    values = float((results["torch"][0] - results["tridiagonal"][0]).abs().max())
    values /= float(results["torch"][0].abs().max())
    applied = float((results["torch"][1] - results["tridiagonal"][1]).norm())
    applied /= float(results["torch"][1].norm())
    return values, applied


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", nargs="+", type=int, default=[768, 1024, 2048])
    parser.add_argument("--kinds", nargs="+", choices=("wishart", "powerlaw"),
                        default=["wishart", "powerlaw"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    common.print_machine_info()
    for kind in args.kinds:
        for d in args.dims:
            matrix = make_matrix(d, kind)
            rows = torch.tensor(np.random.default_rng(0).standard_normal((ROWS, d)))
            values, applied = agreement(matrix, rows)
            print(f"\n== {kind}, d = {d}: tridiagonal vs torch eigh, eigenvalues "
                  f"{values:.1e}, applied rows {applied:.1e} (relative) ==")
            fns = methods(matrix, rows)
            timings = common.time_interleaved(fns, {name: args.repeats for name in fns})
            base = timings["torch eigh"]
            for name, timing in timings.items():
                print(common.format_timing(name, timing, None))
                if name != "torch eigh":
                    print(f"    torch eigh / {name}: {base['median'] / timing['median']:.2f}")
            print(f"load average (1, 5, 15 min): {common.load_average()}")


if __name__ == "__main__":
    sys.exit(main())
