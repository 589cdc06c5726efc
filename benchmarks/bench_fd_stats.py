"""FD from statistics: fdpipe against pytorch-fid, torch-fidelity and two
re-implemented paths of the FD-loss reference code, in one process.

Usage (pinned, one thread; see BENCHMARKS.md):
    taskset -c 0 .venv/bin/python benchmarks/bench_fd_stats.py --dims 768 1024 2048
    .venv/bin/python benchmarks/bench_fd_stats.py --device cuda --dtype float32
"""

from __future__ import annotations

import common  # noqa: F401  (sets thread variables before numpy/torch load)

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

from fdpipe.frechet import CovarianceFactor, frechet_distance, psd_sqrt

INPUT_KINDS = ("wishart", "powerlaw")


def make_inputs(d: int, kind: str, seed: int = 0):
    """Return (mu1, S1, mu2, S2) in float64 for a covariance family.

    wishart: S = X^T X / (2d), X Gaussian (condition number about 30).
    powerlaw: eigenvalues k^-1.5 in a random basis (condition number about
    d^1.5, closer to image-feature spectra).
    """
    rng = np.random.default_rng(seed)
    mu1 = rng.standard_normal(d)
    mu2 = mu1 + 0.1 * rng.standard_normal(d)
    if kind == "wishart":
        x1 = rng.standard_normal((2 * d, d))
        x2 = rng.standard_normal((2 * d, d)) * 1.1
        return mu1, x1.T @ x1 / (2 * d), mu2, x2.T @ x2 / (2 * d)
    covs = []
    for scale in (1.0, 1.2):
        q, _ = np.linalg.qr(rng.standard_normal((d, d)))
        w = scale * np.arange(1, d + 1, dtype=np.float64) ** -1.5
        s = (q * w) @ q.T
        covs.append(0.5 * (s + s.T))
    return mu1, covs[0], mu2, covs[1]


def paper_eigvals_product(mu1, s1, mu2, s2) -> float:
    """FD-loss reference path (a): eigenvalues of the non-symmetric S1 S2."""
    w = np.linalg.eigvals(s1 @ s2)
    trace_sqrt = np.sqrt(np.clip(w.real, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt)


def symmetric_root(s: np.ndarray) -> np.ndarray:
    w, v = scipy.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def paper_eigvalsh(mu1, s1, mu2, s2, root2=None) -> float:
    """FD-loss reference path (b): eigvalsh(R S1 R), R = S2^{1/2} (numpy/scipy)."""
    if root2 is None:
        root2 = symmetric_root(s2)
    w = scipy.linalg.eigvalsh(root2 @ s1 @ root2)
    trace_sqrt = np.sqrt(np.clip(w, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt)


BASE = "fdpipe (cached factor)"


def methods(mu1, s1, mu2, s2, root2, factor2):
    from pytorch_fid.fid_score import calculate_frechet_distance
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    return {
        BASE: lambda: frechet_distance(
            mu1=mu1, sigma1=s1, mu2=mu2, sigma2=s2, factor2=factor2
        ),
        "fdpipe (cached root R)": lambda: frechet_distance(
            mu1=mu1, sigma1=s1, mu2=mu2, sigma2=s2, sqrt_sigma2=root2
        ),
        "fdpipe (nothing cached)": lambda: frechet_distance(
            mu1=mu1, sigma1=s1, mu2=mu2, sigma2=s2
        ),
        "pytorch-fid calculate_frechet_distance": lambda: calculate_frechet_distance(
            mu1, s1, mu2, s2
        ),
        "torch-fidelity fid_statistics_to_metric": lambda: fid_statistics_to_metric(
            {"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False
        )["frechet_inception_distance"],
        "paper (a) eigvals(S1 S2)": lambda: paper_eigvals_product(mu1, s1, mu2, s2),
        "paper (b) eigvalsh, R every call": lambda: paper_eigvalsh(mu1, s1, mu2, s2),
        "paper (b) eigvalsh, cached R": lambda: paper_eigvalsh(mu1, s1, mu2, s2, root2),
    }


class _PathCounter(logging.Handler):
    """Count fdpipe's switches to the singular-value path."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record):
        if "using singular values" in record.getMessage():
            self.count += 1


def run_cpu(args) -> None:
    common.print_machine_info()
    counter = _PathCounter()
    frechet_log = logging.getLogger("fdpipe.frechet")
    frechet_log.setLevel(logging.DEBUG)
    frechet_log.addHandler(counter)
    for kind in args.kinds:
        for d in args.dims:
            mu1, s1, mu2, s2 = make_inputs(d, kind)
            root2 = psd_sqrt(s2)
            factor2 = CovarianceFactor.from_covariance(s2)
            print(f"\n== {kind}, d = {d} ==")
            counter.count = 0
            exact = frechet_distance(mu1=mu1, sigma1=s1, mu2=mu2, sigma2=s2, factor2=factor2)
            path = "singular values" if counter.count else "eigvalsh"
            print(f"fdpipe FD = {exact:.12g} (trace term via {path}; factor rank "
                  f"{factor2.rank}, {'triangular' if factor2.triangular else 'root'})")
            fns = methods(mu1, s1, mu2, s2, root2, factor2)
            repeats = {
                name: args.repeats if ("fdpipe" in name or "eigvalsh" in name) else args.slow_repeats
                for name in fns
            }
            errors = {name: abs(float(fn()) - exact) / abs(exact) for name, fn in fns.items()}
            results = common.time_interleaved(fns, repeats, warmup=False)
            base = results[BASE]
            for name, timing in results.items():
                print(common.format_timing(name, timing, None if "fdpipe" in name else base)
                      + f"  |FD - fdpipe| / FD = {errors[name]:.1e}")
            print(f"load average (1, 5, 15 min): {common.load_average()}")
            if args.memory:
                print("peak extra RSS per call (fresh process each, resource: /proc VmHWM):")
                for name in results:
                    mem = common.measure_in_subprocess(
                        Path(__file__), ["--memory-only", name, "--dims", str(d), "--kinds", kind]
                    )
                    print(f"  {name:34s} {mem['peak_extra_mib']:8.1f} MiB")


def run_memory_only(args) -> None:
    d, kind = args.dims[0], args.kinds[0]
    mu1, s1, mu2, s2 = make_inputs(d, kind)
    root2 = psd_sqrt(s2)
    factor2 = CovarianceFactor.from_covariance(s2)
    fn = methods(mu1, s1, mu2, s2, root2, factor2)[args.memory_only]
    before = common.reset_peak_rss()
    fn()
    print(json.dumps({"peak_extra_mib": (common.peak_rss() - before) / 2**20}))


def run_cuda(args) -> None:
    if not torch.cuda.is_available():
        print("CUDA is not available on this machine; skipping the --device cuda run")
        return
    dtype = getattr(torch, args.dtype)
    print(f"device {torch.cuda.get_device_name()}, dtype {args.dtype}")
    for d in args.dims:
        _, s1, _, s2 = make_inputs(d, args.kinds[0])
        s1_t = torch.tensor(s1, dtype=dtype, device="cuda")
        root = torch.tensor(psd_sqrt(s2), dtype=dtype, device="cuda")
        factor = CovarianceFactor(torch.linalg.cholesky(torch.tensor(s2, dtype=dtype, device="cuda")))

        def fdpipe_path():
            w = torch.linalg.eigvalsh(factor.sandwich_lower(s1_t), UPLO="L")
            return w.clamp_min(0).sqrt().sum().item()

        def cached_root_path():
            w = torch.linalg.eigvalsh(root @ s1_t @ root)
            return w.clamp_min(0).sqrt().sum().item()

        base = common.time_call(fdpipe_path, repeats=args.repeats)
        peer = common.time_call(cached_root_path, repeats=args.repeats)
        print(f"\n== d = {d} ==")
        print(common.format_timing("fdpipe trace term, cached factor (cuda)", base))
        print(common.format_timing("eigvalsh(R S1 R), cached R (cuda)", peer, base))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[768, 1024, 2048])
    parser.add_argument("--kinds", nargs="+", choices=INPUT_KINDS, default=list(INPUT_KINDS))
    parser.add_argument("--repeats", type=int, default=7, help="timed calls of the fast methods")
    parser.add_argument("--slow-repeats", type=int, default=3,
                        help="timed calls of the sqrtm/eigvals peers")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                        help="dtype of the --device cuda run (the CPU run is float64)")
    parser.add_argument("--memory", action="store_true",
                        help="also measure peak extra RSS of each method in a fresh process")
    parser.add_argument("--memory-only", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_only:
        run_memory_only(args)
    elif args.device == "cuda":
        run_cuda(args)
    else:
        run_cpu(args)


if __name__ == "__main__":
    sys.exit(main())
