"""Host time of one eager compact-ICM forward with the Triton kernels stubbed (they do not run).

``python bench/icm_host.py [--batch 1,64,256] [--iters 300] [--variant cvpr,tpami]``

What a GPU host spends per call before the kernels run: argument checks, the dispatch, the weights-version
check of the packed-operand cache, allocations and the (stubbed) launch. Triton's own launch path (argument
binding, cubin lookup, cuLaunchKernel: a few microseconds on a GPU host) is not in it. ``Tensor.is_cuda`` is
made True so the host code takes its GPU branch (on CPU tensors: no CUDA API is called). Full-size ICMs
(512 channels, 7 groups, unit 128, 4 blocks) on (B, 512, 7, 7), bf16 autocast, 1 torch thread; median of
--iters calls, wall and process CPU time. Writes bench/results/icm-host-<stamp>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # kernels are stubbed; the interpreter only avoids a GPU
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402

from mtlface_fast import use_backend  # noqa: E402
from mtlface_fast.benchmark import environment  # noqa: E402
from mtlface_fast.layers.icm import CompactICM  # noqa: E402
from mtlface_fast.reference.icm import ICMBase  # noqa: E402


class CompactICMBase(CompactICM, ICMBase):
    """ICMBase with the compact implementation."""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", default="1,64,256")
    ap.add_argument("--variant", default="cvpr,tpami")
    ap.add_argument("--iters", type=int, default=300)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    launches = []
    Autotuner.run = lambda self, *a, **k: launches.append(1)  # stub: record, do not run
    torch.Tensor.is_cuda = property(lambda self: True)
    torch.cuda.is_current_stream_capturing = lambda: False
    results = []
    for variant in args.variant.split(","):
        torch.manual_seed(0)
        m = CompactICMBase(512, 7, 128, 0.1 if variant == "cvpr" else 0.125, 4, variant).eval()
        for B in (int(b) for b in args.batch.split(",")):
            x, g = torch.randn(B, 512, 7, 7), torch.randint(0, 7, (B,))
            with use_backend("triton"), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                m.icm(x, g)  # packs the operands once
                launches.clear()
                wall, cpu = [], []
                for _ in range(args.iters):
                    t0, c0 = time.perf_counter(), time.process_time()
                    m.icm(x, g)
                    wall.append(time.perf_counter() - t0)
                    cpu.append(time.process_time() - c0)
            row = dict(variant=variant, batch=B, launches_per_call=len(launches) / args.iters,
                       host_us_median=1e6 * statistics.median(wall), host_us_p10=1e6 * sorted(wall)[len(wall) // 10],
                       host_us_p90=1e6 * sorted(wall)[9 * len(wall) // 10],
                       cpu_us_mean=1e6 * statistics.fmean(cpu))
            results.append(row)
            print(f"{variant:6s} B={B:4d}  host {row['host_us_median']:7.1f} us median "
                  f"(p10 {row['host_us_p10']:.1f}, p90 {row['host_us_p90']:.1f})  cpu {row['cpu_us_mean']:.1f} us  "
                  f"launches/call {row['launches_per_call']:.0f}")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"icm-host-{stamp}.json")
    with open(out, "w") as fh:
        json.dump(dict(environment=environment("cpu"), iters=args.iters, dtype="bf16 autocast", results=results), fh,
                  indent=2)
    print("wrote", out)


if __name__ == "__main__":
    main()
