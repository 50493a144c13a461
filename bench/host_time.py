"""Host time per eager call with the Triton kernels stubbed: fused AFD eval forward and compact ICM eval forward.

``python bench/host_time.py [--batch 4] [--rounds 20] [--iters 50]``

What a GPU host spends per call before the kernels run (argument checks, dispatch, operand caches,
allocations, the stubbed launch); Triton's own launch path (binding, cubin lookup, cuLaunchKernel: a few
microseconds on a GPU host) is not in it. Every ``@triton.jit`` / autotuned launch is replaced by a no-op that
counts it, and ``Tensor.is_cuda`` is made True so the host code takes its GPU branch (CPU tensors; no CUDA API
is called). Full-size layers: ``FusedAttentionModule(512)`` on (B, 512, 7, 7) bf16 (CVPR and TPAMI variants)
and the compact ICM (512 channels, 7 groups, unit 128, 4 blocks) under bf16 autocast, 1 torch thread.
The cases run in interleaved rounds (each round: ``--iters`` calls of every case in turn), so machine-load
drift hits all of them alike; per case the median over all calls and the spread of the round medians.
The 1-minute load average before and after is recorded: the figures are only comparable at low load.
Targets (issue 15): AFD eval <= 100 us, ICM eval <= 300 us. Writes bench/results/host-time-<stamp>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # kernels are stubbed; the interpreter only avoids a GPU
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from mtlface_fast import use_backend  # noqa: E402
from mtlface_fast.benchmark import environment  # noqa: E402
from mtlface_fast.layers import FusedAttentionModule  # noqa: E402
from mtlface_fast.layers.icm import CompactICM  # noqa: E402
from mtlface_fast.reference.icm import ICMBase  # noqa: E402

TARGET_US = {"afd": 100.0, "icm": 300.0}


class CompactICMBase(CompactICM, ICMBase):
    """ICMBase with the compact implementation."""


def _cases(batch: int):
    torch.manual_seed(0)
    cases = {}
    for variant in ("cvpr", "tpami"):
        afd = FusedAttentionModule(512, variant=variant).eval().bfloat16()
        x = torch.randn(batch, 512, 7, 7, dtype=torch.bfloat16)
        cases[f"afd-{variant}"] = (lambda afd=afd, x=x: afd(x), contextlib.nullcontext)
        icm = CompactICMBase(512, 7, 128, 0.1 if variant == "cvpr" else 0.125, 4, variant).eval()
        xi, g = torch.randn(batch, 512, 7, 7), torch.randint(0, 7, (batch,))
        cases[f"icm-{variant}"] = (lambda icm=icm, xi=xi, g=g: icm.icm(xi, g),
                                   lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    return cases


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    launches = []

    def stub(self, *a, **k):  # record, do not run
        if not k.get("warmup", False):
            launches.append(1)

    for cls in (Autotuner, JITFunction, InterpretedFunction):
        cls.run = stub
    torch.Tensor.is_cuda = property(lambda self: True)
    torch.cuda.is_current_stream_capturing = lambda: False
    load_before = os.getloadavg()
    cases = _cases(args.batch)
    times = {name: [] for name in cases}
    rounds = {name: [] for name in cases}
    counts = {}
    with use_backend("triton"), torch.no_grad():
        for name, (fn, ctx) in cases.items():  # build the cached operands, count the launches of one call
            with ctx():
                fn()
                launches.clear()
                fn()
                counts[name] = len(launches)
        for _ in range(args.rounds):
            for name, (fn, ctx) in cases.items():
                ts = []
                with ctx():
                    for _ in range(args.iters):
                        t0 = time.perf_counter()
                        fn()
                        ts.append(time.perf_counter() - t0)
                times[name] += ts
                rounds[name].append(statistics.median(ts))
    load_after = os.getloadavg()
    results = []
    for name in cases:
        kind = name.split("-")[0]
        med = 1e6 * statistics.median(times[name])
        r = sorted(1e6 * v for v in rounds[name])
        row = dict(case=name, batch=args.batch, triton_launches_per_call=counts[name], host_us_median=med,
                   round_median_us_min=r[0], round_median_us_max=r[-1], target_us=TARGET_US[kind],
                   meets_target=med <= TARGET_US[kind])
        results.append(row)
        print(f"{name:10s} B={args.batch}  host {med:7.1f} us median (round medians {r[0]:.1f}..{r[-1]:.1f}) "
              f"target {TARGET_US[kind]:.0f} us  launches/call {counts[name]}")
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}, cores {os.cpu_count()}")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"host-time-{stamp}.json")
    with open(out, "w") as fh:
        json.dump(dict(environment=environment("cpu"), rounds=args.rounds, iters=args.iters,
                       loadavg_before=load_before, loadavg_after=load_after, results=results), fh, indent=2)
    print("wrote", out)


if __name__ == "__main__":
    main()
