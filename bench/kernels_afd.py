"""AFD benchmark: reference (eager, torch.compile) vs the fused module, forward and forward+backward.

``python bench/kernels.py --op afd [--device cuda] [--batch 1,32,256,1024] [--dtype fp32,bf16]``

Every variant runs in the same process on the same inputs and weights (the module and the input in the
benchmark dtype). Forward is eval mode under no_grad, with two more forward-only variants of the fused
module that take the host out of the loop: ``fused_compile`` (unless --no-compile) and, on CUDA,
``fused_cudagraph`` (the eager forward replayed from a CUDA graph); forward+backward is train mode with random
gradients for x_id and x_age. ``x.clone()`` of the input is the bandwidth yardstick. Figures: median ms,
GB/s counted as the compulsory traffic (forward: read x, write x_id and x_age; clone: read + write),
and the speed-ups of the fused module over each baseline.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtlface_fast.benchmark import environment, time_fn  # noqa: E402
from mtlface_fast.layers import FusedAttentionModule  # noqa: E402
from mtlface_fast.precision import DTYPES  # noqa: E402
from mtlface_fast.reference.afd import AttentionModule  # noqa: E402



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", default="1,32,256,1024", help="comma-separated batch sizes")
    parser.add_argument("--dtype", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    parser.add_argument("--variant", default="cvpr", choices=("cvpr", "tpami"))
    parser.add_argument("--size", type=int, default=7, help="feature map H = W (7 at 112x112 input)")
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--no-backward", action="store_true", help="forward only")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--channels-last", action="store_true", help="channels_last input")


def _modules(args, dtype, device):
    torch.manual_seed(0)
    ref = AttentionModule(args.channels, 16, args.variant)
    with torch.no_grad():  # weights and statistics away from their initial values
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for bn in (ref.spatial[1], ref.channel[3]):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    fused = FusedAttentionModule(args.channels, 16, args.variant)
    fused.load_state_dict(ref.state_dict())
    return ref.to(device, dtype), fused.to(device, dtype)


def run(args) -> dict:
    device = args.device
    batches = [int(b) for b in str(args.batch).split(",") if b]
    dtypes = [d.strip() for d in str(args.dtype).split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"--dtype entries must be among {sorted(DTYPES)}, got {d!r}")
    results = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        ref, fused = _modules(args, dtype, device)
        variants = {"reference_eager": ref, "fused": fused}
        if not args.no_compile:
            variants["reference_compile"] = torch.compile(ref)
        for b in batches:
            x = torch.randn(b, args.channels, args.size, args.size, device=device, dtype=dtype)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            nbytes = x.numel() * x.element_size()
            row = {"batch": b, "dtype": dname, "shape": list(x.shape), "channels_last": args.channels_last,
                   "variant": args.variant, "forward": {}, "forward_backward": {}}
            row["clone"] = time_fn(lambda: x.clone(), device, args.warmup, args.iters)
            row["clone"]["GBps"] = 2 * nbytes / row["clone"]["median_ms"] / 1e6
            for name, m in variants.items():
                m.eval()

                def fwd(m=m):
                    with torch.no_grad():
                        return m(x)
                t = time_fn(fwd, device, args.warmup, args.iters)
                t["GBps"] = 3 * nbytes / t["median_ms"] / 1e6
                row["forward"][name] = t
            for name, make in _forward_only_variants(args, fused, x).items():
                try:
                    t = time_fn(make(), device, args.warmup, args.iters)
                except Exception as e:  # recorded, so that one failing variant leaves the others' figures
                    row["forward"][name] = {"error": f"{type(e).__name__}: {e}"[:500]}
                    print(f"    fwd {name} failed: {row['forward'][name]['error']}")
                    continue
                t["GBps"] = 3 * nbytes / t["median_ms"] / 1e6
                row["forward"][name] = t
            if not args.no_backward and b > 1:
                xg = x.detach().clone().requires_grad_()
                g_id, g_age = torch.randn_like(x), torch.randn_like(x)
                for name, m in variants.items():
                    m.train()

                    def fwd_bwd(m=m):
                        m.zero_grad(set_to_none=True)
                        xg.grad = None
                        out = m(xg)
                        torch.autograd.backward(out, (g_id, g_age))
                    row["forward_backward"][name] = time_fn(fwd_bwd, device, args.warmup, args.iters)
            for phase in ("forward", "forward_backward"):
                times = row[phase]
                if "fused" in times:
                    times["speedup"] = {k: v["median_ms"] / times["fused"]["median_ms"]
                                        for k, v in times.items() if k != "fused" and "median_ms" in v}
                eager = times.get("reference_eager", {}).get("median_ms")
                if eager:
                    times["vs_reference_eager"] = {k: eager / v["median_ms"] for k, v in times.items()
                                                   if k.startswith("fused") and "median_ms" in v}
            if "fused" in row["forward"]:
                row["forward"]["fused"]["fraction_of_clone_GBps"] = \
                    row["forward"]["fused"]["GBps"] / row["clone"]["GBps"]
            results.append(row)
            _print_row(row)
    return {"op": "afd", "environment": environment(device), "device": device, "results": results}


def _forward_only_variants(args, fused, x):
    """Eval-forward variants of the fused module that take the host out of the loop, each a factory of
    the timed callable: ``fused_compile`` (torch.compile, one graph with the Triton kernels inlined) and,
    on CUDA, ``fused_cudagraph`` (the eager forward captured once in a CUDA graph and replayed; the
    input buffer is fixed, as in a serving loop that copies each batch into it)."""
    out = {}
    if not args.no_compile:
        compiled = torch.compile(fused)

        def compiled_fwd():
            def fwd():
                with torch.no_grad():
                    return compiled(x)
            return fwd
        out["fused_compile"] = compiled_fwd
    if str(args.device).startswith("cuda"):
        def graphed():
            fused.eval()
            with torch.no_grad():
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up off the capture: kernels compiled, operands folded
                    for _ in range(3):
                        fused(x)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fused(x)
            return graph.replay
        out["fused_cudagraph"] = graphed
    return out


def _print_row(row) -> None:
    def fmt(phase):
        times = row[phase]
        parts = [f"{k} {v['median_ms']:.3f} ms" for k, v in times.items() if isinstance(v, dict) and "median_ms" in v]
        ups = times.get("speedup", {})
        if ups:
            parts.append("fused speed-up " + ", ".join(f"x{v:.2f} vs {k}" for k, v in ups.items()))
        vs = {k: v for k, v in times.get("vs_reference_eager", {}).items() if k != "fused"}
        if vs:
            parts.append("vs reference eager " + ", ".join(f"{k} x{v:.2f}" for k, v in vs.items()))
        return "; ".join(parts)

    print(f"B={row['batch']:5d} {row['dtype']:4s} clone {row['clone']['median_ms']:.3f} ms "
          f"({row['clone']['GBps']:.1f} GB/s)")
    print(f"    fwd: {fmt('forward')}")
    if "fused" in row["forward"]:
        f = row["forward"]["fused"]
        print(f"    fwd fused {f['GBps']:.1f} GB/s = {100 * f['fraction_of_clone_GBps']:.0f}% of clone")
    if row["forward_backward"]:
        print(f"    fwd+bwd: {fmt('forward_backward')}")
