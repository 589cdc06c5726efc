"""Shared set-up for the side-by-side benchmarks: one thread, timing, memory.

Import this module before numpy or torch: it sets the thread-count variables
that BLAS libraries read once at load time.
"""

from __future__ import annotations

import os

THREADS = os.environ.get("FDPIPE_BENCH_THREADS", "1")
for _name in (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
):
    os.environ[_name] = THREADS

import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(THREADS))

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def machine_info() -> dict:
    """Return CPU model, affinity, thread settings and BLAS libraries in use."""
    model = "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    info = {
        "cpu": model,
        "affinity": sorted(os.sched_getaffinity(0)),
        "threads": THREADS,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_blas": "MKL" if torch.backends.mkl.is_available() else "other",
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE"),
    }
    try:
        import threadpoolctl

        info["threadpools"] = [
            {k: p.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
            for p in threadpoolctl.threadpool_info()
        ]
    except ImportError:
        info["threadpools"] = "threadpoolctl not installed"
    return info


def print_machine_info() -> None:
    print(json.dumps(machine_info(), indent=1))
    if len(os.sched_getaffinity(0)) > 1:
        print("NOTE: more than one CPU is allowed; run under `taskset -c 0` for pinned numbers")


def time_call(fn: Callable[[], object], repeats: int, warmup: int = 1) -> dict:
    """Return median, min and max wall time in seconds over ``repeats`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: dict[str, int], warmup: bool = True
) -> dict[str, dict]:
    """Time several functions round-robin so that all see the same machine load.

    Round r calls every function whose repeat count exceeds r, in order.
    Returns median, min and max wall time in seconds per name.
    """
    if warmup:
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_index in range(max(repeats.values())):
        for name, fn in fns.items():
            if round_index < repeats[name]:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {
        name: {"median": statistics.median(t), "min": min(t), "max": max(t)}
        for name, t in times.items()
    }


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def format_timing(name: str, timing: dict, baseline: dict | None = None) -> str:
    text = (
        f"{name:34s} median {timing['median']:8.4f} s  "
        f"(min {timing['min']:.4f}, max {timing['max']:.4f})"
    )
    if baseline is not None:
        text += f"  fdpipe speed-up x{timing['median'] / baseline['median']:.2f}"
    return text


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS counter (VmHWM) and return the current RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    """Return the peak RSS in bytes since the last ``reset_peak_rss``."""
    return _status_kib("VmHWM") * 1024


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not found in /proc/self/status")


def torch_peak_bytes(fn: Callable[[], object]) -> int:
    """Return the approximate peak of live torch CPU tensor bytes allocated in ``fn()``.

    Sums torch.profiler's per-op self memory changes in start-time order, so
    an op's own allocations and frees count at its start. Allocations inside
    LAPACK or numpy are not seen, so this complements the RSS numbers.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        if event.name == "[memory]":
            live += event.cpu_memory_usage
        else:
            live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def measure_in_subprocess(script: Path, args: list[str]) -> dict:
    """Run ``script --memory-only ... args`` in a fresh process; return its JSON line."""
    out = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])
