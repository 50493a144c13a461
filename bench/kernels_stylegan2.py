"""TPAMI decoder layers: ``python bench/kernels.py --op stylegan2 [--device cuda] [--batch 64] [--dtype bf16]``.

Variants per StyledConv shape of the 128 px generator, same weights and inputs:

* ``reference``    -- grouped convolution over per-sample weights + five elementwise passes (official);
* ``dense_torch``  -- :class:`FastStyledConv` on the PyTorch backend (modulate activations, dense conv);
* ``dense_triton`` -- the same with the fused noise + bias + leaky ReLU Triton op (CUDA only);
* ``act_eager`` / ``act_triton`` -- the activation alone (x + s*noise + b, leaky ReLU, gain).

Reports median ms, the ratio to ``reference`` (``act_eager`` for the activation rows) and the
activation's effective GB/s (read x, write y).
"""
from __future__ import annotations

import torch

from common import environment, time_fn
from mtlface_fast.precision import DTYPES, autocast

# (in, out, resolution of the output, upsample) of the TPAMI generator's StyledConvs (128 px, multiplier 2)
SHAPES = [(512, 512, 8, True), (512, 512, 32, False), (512, 512, 64, True), (512, 256, 128, True),
          (256, 256, 128, False)]


def add_arguments(p):
    p.add_argument("--batch", type=int, default=None, help="batch (cpu 2, cuda 64)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="autocast dtype (fp32)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)


def run(args):
    from mtlface_fast import use_backend
    from mtlface_fast.layers.stylegan2 import FastStyledConv, noise_bias_lrelu
    from mtlface_fast.reference.stylegan2 import StyledConv

    cuda = args.device.startswith("cuda")
    batch = args.batch or (64 if cuda else 2)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    iters = args.iters if args.iters is not None else (20 if cuda else 3)
    dtype = DTYPES[args.dtype]

    results = []
    for cin, cout, res, up in SHAPES:
        torch.manual_seed(0)
        ref = StyledConv(cin, cout, 3, 512, upsample=up).to(args.device)
        fast = FastStyledConv(cin, cout, 3, 512, upsample=up).to(args.device)
        fast.load_state_dict(ref.state_dict())
        side = res // 2 if up else res
        x = torch.randn(batch, cin, side, side, device=args.device)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        style = torch.randn(batch, 512, device=args.device)
        noise = torch.randn(1, 1, res, res, device=args.device)
        y = torch.randn(batch, cout, res, res, device=args.device, dtype=dtype)
        strength, bias = torch.full((1,), 0.1, device=args.device), torch.zeros(cout, device=args.device)
        cases = {
            "reference": lambda: ref(x, style, noise=noise),
            "dense_torch": lambda: fast(x, style, noise=noise),
            "act_eager": lambda: torch.nn.functional.leaky_relu(y + strength * noise + bias.view(1, -1, 1, 1), 0.2)
            * 2 ** 0.5,
        }
        if cuda:
            cases["dense_triton"] = lambda: fast(x, style, noise=noise)
            cases["act_triton"] = lambda: noise_bias_lrelu(y, noise, strength, bias)
        row = dict(cin=cin, cout=cout, resolution=res, upsample=up, batch=batch)
        for name, fn in cases.items():
            backend = "triton" if name.endswith("triton") else "torch"
            with torch.inference_mode(), autocast(args.device, dtype), use_backend(backend):
                stats = time_fn(fn, args.device, warmup=warmup, iters=iters)
            row[name] = stats
        for name in cases:
            base = row["act_eager" if name.startswith("act_") else "reference"]["median_ms"]
            row[name]["speedup_vs_" + ("act_eager" if name.startswith("act_") else "reference")] = round(
                base / row[name]["median_ms"], 3)
        act_bytes = 2 * y.numel() * y.element_size()
        for name in ("act_eager", "act_triton"):
            if name in row:
                row[name]["gb_per_s"] = round(act_bytes / (row[name]["median_ms"] * 1e-3) / 1e9, 1)
        print(f"{cin:4d}->{cout:4d} @{res:3d} up={int(up)} B={batch}: " + ", ".join(
            f"{n} {row[n]['median_ms']:.3f} ms" for n in cases))
        results.append(row)
    return {"benchmark": "kernels-stylegan2", "env": environment(args.device),
            "settings": dict(device=args.device, batch=batch, dtype=args.dtype, warmup=warmup, iters=iters),
            "results": results}
