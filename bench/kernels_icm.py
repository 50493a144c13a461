"""ICM benchmark: reference ICM (eager, torch.compile) vs compact PyTorch vs Triton window convolutions.

``python bench/kernels.py --op icm [--device cuda] [--batch 1,8,64,256] [--dtype fp32,bf16]
[--mode fwd,fwdbwd] [--variants ref,ref_compile,torch,triton] [--train-steps 20]``

* ``fwd``: eval mode under ``no_grad`` (BN from running statistics).
* ``fwdbwd``: train mode (``bn_stats="reference"``, batch statistics exactly as the reference), forward
  and backward of a weighted sum, gradients for the input and every ICM parameter.
* bf16 runs the fp32 modules under ``torch.autocast``.

The full-size CVPR ICM (512 -> 819 channels, 7 groups, sigma 0.1, 4 residual blocks) on (B, 512, 7, 7)
inputs with all groups mixed. Each variant's output is checked against the reference (IEEE fp32, no
TF32) before timing. ``--train-steps`` also runs a short training comparison of ``bn_stats`` reference
vs active (Adam, MSE to a fixed random target) and reports both loss curves.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtlface_fast import use_backend  # noqa: E402
from mtlface_fast.benchmark import environment, time_fn  # noqa: E402
from mtlface_fast.layers.icm import CompactICM  # noqa: E402
from mtlface_fast.precision import DTYPES, autocast  # noqa: E402
from mtlface_fast.reference.icm import ICMBase  # noqa: E402

ICM_DTYPES = ("fp32", "bf16")


class CompactICMBase(CompactICM, ICMBase):
    """ICMBase with the compact implementation (same state dict)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", default=None, help="comma-separated batch sizes (default 1,8,64,256 on "
                                                      "CUDA, 1,8 on CPU)")
    parser.add_argument("--dtype", default="fp32,bf16")
    parser.add_argument("--mode", default="fwd,fwdbwd")
    parser.add_argument("--variants", default=None, help="subset of ref,ref_compile,torch,triton,triton_graph "
                                                         "(default: all on CUDA; ref,torch on CPU). triton_graph: "
                                                         "the Triton forward replayed from a CUDA graph (fwd only)")
    parser.add_argument("--size", type=int, default=7, help="spatial size h = w of x_id")
    parser.add_argument("--age-group", type=int, default=7)
    parser.add_argument("--sigma", type=float, default=0.1)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--train-steps", type=int, default=20, help="bn_stats comparison steps (0: skip)")
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU runs)")


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.weight[0].numel()))
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.4 - 0.2)
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
            elif isinstance(m, torch.nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.4 + 0.05)
    return module


def _modules(args, device):
    ref = _randomize(ICMBase(512, args.age_group, 128, args.sigma, 4, "cvpr")).to(device)
    fast = CompactICMBase(512, args.age_group, 128, args.sigma, 4, "cvpr").to(device)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _step_fn(fn, x, g, w, mode, dtype, device, params):
    amp = autocast(device, dtype)
    if mode == "fwd":
        def run():
            with torch.no_grad(), amp:
                return fn(x, g)
    else:
        xg = x.detach().requires_grad_()

        def run():
            for p in params:
                p.grad = None
            with amp:
                y = fn(xg, g)
            (y.float() * w).sum().backward()
            return y
    return run


def _cpu_time(fn, warmup: int, iters: int) -> float:
    """Median process CPU time per call in ms (robust to other processes sharing the cores)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.process_time()
        fn()
        times.append((time.process_time() - t0) * 1e3)
    return statistics.median(times)


def _graphed(fast, x, g, dtype, device):
    """Replay of the Triton eval forward captured in a CUDA graph (static x and g)."""
    amp = autocast("cuda", dtype)

    def call():
        with use_backend("triton"), torch.no_grad(), amp:
            return fast.icm(x, g)

    call()  # autotune and fill the parameter caches outside the capture
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            call()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    holder = {"graph": graph, "out": out}

    def replay():
        holder["graph"].replay()
        return holder["out"]
    return replay


def _max_rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _check_outputs(variants, ref, args, device, B):
    """Max relative error of each variant vs the eval reference in IEEE fp32 (and bf16 autocast)."""
    errs = {}
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        x = torch.randn(B, 512, args.size, args.size, device=device)
        g = torch.arange(B, device=device) % args.age_group
        with torch.no_grad():
            expected = ref.icm(x, g)
            for name, fn in variants.items():
                for dname in args.dtypes:
                    dt = DTYPES[dname]
                    with autocast(device, dt):
                        errs[f"{name}/{dname}"] = _max_rel(fn(x, g).float(), expected)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
    return errs


def _train_comparison(args, device):
    """``bn_stats`` reference vs active: same init, same data, Adam on the ICM, MSE to a fixed target."""
    torch.manual_seed(0)
    curves = {}
    x = torch.randn(args.train_batch, 512, args.size, args.size, device=device)
    g = torch.randint(0, args.age_group, (args.train_batch,), device=device)
    target = torch.randn(args.train_batch, 512, args.size, args.size, device=device) * 0.5
    for stats in ("reference", "active"):
        _, fast = _modules(args, device)
        fast.set_bn_stats(stats).train()
        opt = torch.optim.Adam(fast.parameters(), lr=1e-4, betas=(0.5, 0.99))
        losses = []
        for _ in range(args.train_steps):
            loss = torch.nn.functional.mse_loss(fast.icm(x, g), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        fast.eval()
        with torch.no_grad():
            eval_loss = float(torch.nn.functional.mse_loss(fast.icm(x, g), target))
        curves[stats] = {"train_loss": losses, "eval_loss_after": eval_loss}
    ref_l, act_l = curves["reference"]["train_loss"], curves["active"]["train_loss"]
    curves["summary"] = {
        "steps": args.train_steps, "batch": args.train_batch,
        "final_train_loss_reference": ref_l[-1], "final_train_loss_active": act_l[-1],
        "max_abs_train_loss_diff": max(abs(a - b) for a, b in zip(ref_l, act_l)),
        "eval_loss_reference": curves["reference"]["eval_loss_after"],
        "eval_loss_active": curves["active"]["eval_loss_after"],
    }
    return curves


def run(args) -> dict:
    device = args.device
    cuda = device.startswith("cuda")
    batches = [int(b) for b in (args.batch or ("1,8,64,256" if cuda else "1,8")).split(",")]
    args.dtypes = [d for d in args.dtype.split(",") if d]
    bad = [d for d in args.dtypes if d not in ICM_DTYPES]
    if bad:
        raise ValueError(f"--dtype entries must be among {list(ICM_DTYPES)}, got {bad}")
    modes = [m for m in args.mode.split(",") if m]
    names = (args.variants or ("ref,ref_compile,torch,triton,triton_graph" if cuda else "ref,torch")).split(",")
    iters = args.iters or (50 if cuda else 5)
    warmup = args.warmup or (10 if cuda else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    ref, fast = _modules(args, device)
    backends = {"torch": "torch", "triton": "triton"}

    def variant(name, mode):
        if name == "ref":
            return ref.icm
        if name == "ref_compile":
            return compiled[mode]
        backend = backends["triton" if name == "triton_graph" else name]

        def fn(x, g):
            with use_backend(backend):
                return fast.icm(x, g)
        return fn

    compiled = {m: torch.compile(ref.icm) for m in modes} if "ref_compile" in names else {}
    ref.eval(), fast.eval()
    check = _check_outputs({n: variant(n, "fwd") for n in names if n != "triton_graph"}, ref, args, device,
                           min(16, max(batches)))
    print("max relative error vs reference (eval):", {k: f"{v:.2e}" for k, v in check.items()})

    rows = []
    for mode in modes:
        ref.train(mode != "fwd"), fast.train(mode != "fwd")
        for dname in args.dtypes:
            dt = DTYPES[dname]
            for B in batches:
                x = torch.randn(B, 512, args.size, args.size, device=device)
                g = torch.randperm(B, device=device) % args.age_group
                w = torch.randn(B, 512, args.size, args.size, device=device)
                base = {}
                run_names = [n for n in names if n != "triton_graph" or (mode == "fwd" and cuda)]
                for name in run_names:
                    mod = fast if name in backends or name == "triton_graph" else ref
                    if name == "triton_graph":
                        fn = _graphed(fast, x, g, dt, device)
                    else:
                        fn = _step_fn(variant(name, mode), x, g, w, mode, dt, device, list(mod.parameters()))
                    t = time_fn(fn, device, warmup=warmup, iters=iters)
                    row = dict(variant=name, mode=mode, dtype=dname, batch=B, **t,
                               images_per_s=B / (t["median_ms"] / 1e3))
                    if not cuda:
                        row["cpu_time_ms"] = _cpu_time(fn, 1, iters)
                    base[name] = t["median_ms"]
                    rows.append(row)
                for row in rows[-len(run_names):]:
                    if "cpu_time_ms" in row and "ref" in run_names:
                        ref_row = rows[-len(run_names) + run_names.index("ref")]
                        row["cpu_time_speedup_vs_ref"] = ref_row["cpu_time_ms"] / row["cpu_time_ms"]
                    if "ref" in base:
                        row["speedup_vs_ref"] = base["ref"] / row["median_ms"]
                    if "ref_compile" in base:
                        row["speedup_vs_ref_compile"] = base["ref_compile"] / row["median_ms"]
                print(f"{mode:7s} {dname} B={B:4d} " + "  ".join(
                    f"{r['variant']}={r['median_ms']:.3f}ms"
                    + (f" ({r['speedup_vs_ref']:.1f}x)" if "speedup_vs_ref" in r else "")
                    + (f" cpu={r['cpu_time_ms']:.1f}ms ({r['cpu_time_speedup_vs_ref']:.1f}x)"
                       if "cpu_time_speedup_vs_ref" in r else "") for r in rows[-len(run_names):]))
    payload = {"op": "icm", "env": environment(device), "shape": [None, 512, args.size, args.size],
               "age_group": args.age_group, "sigma": args.sigma, "unit_count": 128, "repeat_num": 4,
               "max_rel_err_eval": check, "rows": rows}
    if args.train_steps > 0:
        payload["bn_stats_training"] = _train_comparison(args, device)
        print("bn_stats training comparison:", payload["bn_stats_training"]["summary"])
    return payload
