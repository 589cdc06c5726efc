"""FD-loss training-step overhead (statistics, FD, backward, update; no
networks): fdpipe's FDLoss against a straightforward implementation that
forms R S R and back-propagates through torch.linalg.eigvalsh, in one process.

Usage (pinned, one thread; see BENCHMARKS.md):
    taskset -c 0 .venv/bin/python benchmarks/bench_train_step.py --methods ema queue
"""

from __future__ import annotations

import common  # noqa: F401  (sets thread variables before numpy/torch load)

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fdpipe.eigen import resolve_eigensolver
from fdpipe.loss import FDLoss
from fdpipe.stats import GaussianStats


class StraightforwardEMA:
    """Raw-moment EMA; each step forms R S R and calls eigvalsh under autograd."""

    def __init__(self, ref: GaussianStats, beta: float, device):
        self.beta = beta
        self.root = torch.tensor(ref.sqrt_sigma, device=device)
        self.ref_mu = torch.tensor(ref.mu, device=device)
        self.ref_trace = float(np.trace(ref.sigma))
        self.mu = self.m2 = None

    def fill(self, x):
        self.mu = x.mean(0)
        self.m2 = x.T @ x / x.shape[0]

    def population(self, x):
        b = self.beta
        mu = b * self.mu + (1 - b) * x.mean(0)
        m2 = b * self.m2 + (1 - b) * x.T @ x / x.shape[0]
        return mu, m2 - torch.outer(mu, mu)

    def loss(self, x):
        mu, sigma = self.population(x)
        product = self.root @ sigma @ self.root
        eigenvalues = torch.linalg.eigvalsh(0.5 * (product + product.T))
        floor = 1e-10 * eigenvalues.detach().max()
        trace_sqrt = eigenvalues.clamp_min(floor).sqrt().sum()
        diff = mu - self.ref_mu
        return diff @ diff + torch.diagonal(sigma).sum() + self.ref_trace - 2 * trace_sqrt

    @torch.no_grad()
    def update(self, x):
        b = self.beta
        self.mu = b * self.mu + (1 - b) * x.mean(0)
        self.m2 = b * self.m2 + (1 - b) * x.T @ x / x.shape[0]


class StraightforwardQueue(StraightforwardEMA):
    """FIFO with running raw sums; same R S R + eigvalsh step as the EMA."""

    def __init__(self, ref, size, device):
        super().__init__(ref, 0.0, device)
        self.size = size
        self.pointer = 0

    def fill(self, x):
        self.buffer = x[-self.size:].clone()
        self.sum1 = self.buffer.sum(0)
        self.sum2 = self.buffer.T @ self.buffer

    def population(self, x):
        b = x.shape[0]
        old = self.buffer[self.pointer:self.pointer + b]
        mu = (self.sum1 - old.sum(0) + x.sum(0)) / self.size
        m2 = (self.sum2 - old.T @ old + x.T @ x) / self.size
        return mu, m2 - torch.outer(mu, mu)

    @torch.no_grad()
    def update(self, x):
        b = x.shape[0]
        old = self.buffer[self.pointer:self.pointer + b]
        self.sum1 += x.sum(0) - old.sum(0)
        self.sum2 += x.T @ x - old.T @ old
        self.buffer[self.pointer:self.pointer + b] = x
        self.pointer = (self.pointer + b) % self.size


def setup(method: str, impl: str, d: int, pool_size: int, queue_size: int, beta: float, device,
          eigensolver: str = "auto"):
    gen = torch.Generator().manual_seed(0)
    mixing = torch.randn(d, d, generator=gen, dtype=torch.float64) / d**0.5
    ref_features = (torch.randn(2 * d, d, generator=gen, dtype=torch.float64) @ mixing).numpy()
    ref = GaussianStats.from_features(ref_features, space="bench")
    ref.sqrt_sigma  # computed once, as a statistics file would provide it
    count = queue_size if method == "queue" else pool_size
    pool = (torch.randn(count, d, generator=gen, dtype=torch.float64) @ mixing + 0.1).to(device)
    if impl == "fdpipe":
        loss = FDLoss({"bench": ref}, method=method, beta=beta, queue_size=queue_size,
                      eigensolver=eigensolver)
        loss.to(device)
        loss.fill({"bench": pool})
    elif method == "ema":
        loss = StraightforwardEMA(ref, beta, device)
        loss.fill(pool)
    else:
        loss = StraightforwardQueue(ref, queue_size, device)
        loss.fill(pool)
    del pool
    return loss, mixing.to(device)


def make_step(impl: str, loss, mixing, batch: int, d: int, device):
    gen = torch.Generator().manual_seed(1)

    def step():
        x = (torch.randn(batch, d, generator=gen, dtype=torch.float64).to(device) @ mixing)
        x.requires_grad_(True)
        if impl == "fdpipe":
            value, _ = loss({"bench": x})
        else:
            value = loss.loss(x)
        value.backward()
        if impl == "fdpipe":
            loss.update({"bench": x.detach()})
        else:
            loss.update(x.detach())
        if device.type == "cuda":
            torch.cuda.synchronize()
        return float(value.detach())

    return step


def run(args) -> None:
    common.print_machine_info()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available on this machine; skipping the --device cuda run")
        return
    for method in args.methods:
        print(f"\n== {method}, d = {args.dim}, B = {args.batch}"
              + (f", queue {args.queue_size}" if method == "queue" else f", beta {args.beta}")
              + " ==")
        steps = {}
        for impl in ("fdpipe", "straightforward"):
            start = time.perf_counter()
            loss, mixing = setup(method, impl, args.dim, args.pool, args.queue_size, args.beta,
                                 device, args.eigensolver)
            print(f"{impl} set-up {time.perf_counter() - start:.1f} s")
            steps[impl] = make_step(impl, loss, mixing, args.batch, args.dim, device)
            if impl == "fdpipe":
                fdpipe_loss = loss
        timings = common.time_interleaved(steps, {impl: args.repeats for impl in steps})
        print(f"fdpipe eigensolver: {fdpipe_loss.solvers['bench']} (requested {args.eigensolver})")
        del steps, loss
        for impl, timing in timings.items():
            print(common.format_timing(
                f"{impl} step", timing, timings["fdpipe"] if impl != "fdpipe" else None
            ))
        print(f"load average (1, 5, 15 min): {common.load_average()}")
        ratio = timings["fdpipe"]["median"] / timings["straightforward"]["median"]
        print(f"fdpipe / straightforward step time: {ratio:.2f}")
        if method == "queue":
            print(f"fdpipe queue refresh once per {args.queue_size // args.batch} steps "
                  f"(O(N d^2) recompute of the sums), not in the per-step numbers")
        if args.memory:
            print("memory (fresh process each): peak extra RSS over 2 steps after set-up and one "
                  "warm-up step (/proc VmHWM); RSS growth in set-up; peak live torch tensor "
                  "bytes in one step (torch.profiler)")
            for impl in ("fdpipe", "straightforward"):
                mem = common.measure_in_subprocess(Path(__file__), [
                    "--memory-only", impl, "--methods", method, "--dim", str(args.dim),
                    "--batch", str(args.batch), "--queue-size", str(args.queue_size),
                    "--pool", str(args.pool), "--eigensolver", args.eigensolver,
                ])
                print(f"  {impl:16s} step RSS {mem['peak_extra_mib']:8.1f} MiB   "
                      f"set-up RSS {mem['state_mib']:8.1f} MiB   "
                      f"step torch peak {mem['torch_peak_mib']:8.1f} MiB")


def run_memory_only(args) -> None:
    device = torch.device(args.device)
    method = args.methods[0]
    # "auto" times both eigensolvers once; do that before measuring so its
    # temporaries do not count as set-up or step memory.
    if args.memory_only == "fdpipe":
        resolve_eigensolver(args.eigensolver, args.dim, device)
    before_setup = common.reset_peak_rss()
    loss, mixing = setup(method, args.memory_only, args.dim, args.pool, args.queue_size,
                         args.beta, device, args.eigensolver)
    step = make_step(args.memory_only, loss, mixing, args.batch, args.dim, device)
    step()
    before = common.reset_peak_rss()
    step()
    step()
    rss_peak = common.peak_rss() - before
    print(json.dumps({
        "peak_extra_mib": rss_peak / 2**20,
        "state_mib": (before - before_setup) / 2**20,
        "torch_peak_mib": common.torch_peak_bytes(step) / 2**20,
    }))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=("ema", "queue"), default=["ema", "queue"])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--beta", type=float, default=0.999)
    parser.add_argument("--queue-size", type=int, default=50_000)
    parser.add_argument("--pool", type=int, default=4096, help="features used to fill the EMA")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--eigensolver", choices=("auto", "torch", "tridiagonal"), default="auto",
                        help="fdpipe's eigensolver (auto times both once and keeps the faster)")
    parser.add_argument("--memory", action="store_true",
                        help="also measure peak extra RSS of a step in a fresh process")
    parser.add_argument("--memory-only", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_only:
        run_memory_only(args)
    else:
        run(args)


if __name__ == "__main__":
    sys.exit(main())
