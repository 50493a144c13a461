"""Benchmark plumbing shared by bench/throughput.py, bench/kernels.py and ``mtlface-fast bench``:
timing, environment, JSON."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Dict, List, Optional

import torch

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# $MTLFACE_FAST_RESULTS_DIR if set; else bench/results in a checkout; ./bench_results when run from an install.
RESULTS_DIR = os.environ.get("MTLFACE_FAST_RESULTS_DIR") or (
    os.path.join(_REPO, "bench", "results") if os.path.isdir(os.path.join(_REPO, "bench"))
    else os.path.join(os.getcwd(), "bench_results"))


def git_commit() -> str:
    """Short commit of the checkout ($MTLFACE_FAST_GIT_COMMIT when the tree was copied without .git)."""
    if os.environ.get("MTLFACE_FAST_GIT_COMMIT"):
        return os.environ["MTLFACE_FAST_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def environment(device: str) -> Dict[str, str]:
    env = {"torch": torch.__version__, "python": platform.python_version(), "git_commit": git_commit(),
           "host_cpu": platform.processor() or platform.machine(), "threads": str(torch.get_num_threads())}
    try:  # the installed version, without importing triton (CPU runs never load it)
        from importlib.metadata import version
        env["triton"] = version("triton")
    except Exception:
        env["triton"] = "not installed"
    if device.startswith("cuda") and torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(torch.device(device))
        env["cuda"] = torch.version.cuda or ""
    else:
        env["device"] = f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    return env


def time_fn(fn: Callable[[], object], device: str, warmup: int = 3, iters: int = 10,
            min_time_s: float = 0.0) -> Dict[str, float]:
    """Median and quantiles of ``fn``'s wall time in ms (CUDA events on GPU, perf_counter on CPU)."""
    cuda = device.startswith("cuda")
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times: List[float] = []
    start_all = time.perf_counter()
    while len(times) < iters or (time.perf_counter() - start_all) < min_time_s:
        times.append(time_once(fn, device))
        if len(times) >= 10 * iters:
            break
    return summarize(times)


def summarize(times: List[float]) -> Dict[str, float]:
    """Median, 20/80% quantiles and minimum of a list of times in ms."""
    times = sorted(times)
    q = lambda p: times[min(len(times) - 1, int(p * (len(times) - 1) + 0.5))]  # noqa: E731
    return {"median_ms": statistics.median(times), "p20_ms": q(0.2), "p80_ms": q(0.8), "min_ms": times[0],
            "iters": len(times)}


def time_once(fn: Callable[[], object], device: str) -> float:
    """One call of ``fn`` in ms (CUDA events on GPU, perf_counter on CPU)."""
    if device.startswith("cuda"):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(fns: Dict[str, Callable[[], object]], device: str, iters: int = 10,
                     on_call: Optional[Callable[[str], None]] = None) -> Dict[str, Dict]:
    """Time already warmed-up callables in rounds, one call of each per round (the order rotating from round
    to round), so that a machine whose speed drifts (shared CPUs, clocks) slows every variant alike and
    their ratios stay meaningful. ``on_call(name)`` runs after each timed call (progress). Returns
    :func:`summarize` of each."""
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an integer >= 1, got {iters!r}")
    names = list(fns)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(iters):
        for i in range(len(names)):
            n = names[(i + r) % len(names)]
            times[n].append(time_once(fns[n], device))
            if on_call is not None:
                on_call(n)
    return {n: summarize(t) for n, t in times.items()}


def results_path(name: str, results_dir: str = RESULTS_DIR) -> str:
    """``<results_dir>/<name>-<utc stamp>.json`` (the folder is created)."""
    os.makedirs(results_dir, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return os.path.join(results_dir, f"{name}-{stamp}.json")


def write_results(name: str, payload: Dict, results_dir: str = RESULTS_DIR) -> str:
    """Write ``payload`` as JSON (atomically) and return the path: ``name`` is a ``.json`` path, or a name for
    :func:`results_path` under ``results_dir``."""
    from .checkpoint import atomic_write

    path = name if name.endswith(".json") else results_path(name, results_dir)
    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda tmp: open(tmp, "w").write(text))
