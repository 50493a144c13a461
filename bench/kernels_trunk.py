"""Trunk unit benchmark (``python bench/kernels.py --op trunk``): where does a fused kernel pay?

One IResNet unit at each stage's shape (inference, eval mode), variants in the same process on the
same weights and inputs:

* ``reference``         -- reference ``BottleneckIR`` (conv -> BN kernels, eager)
* ``folded``            -- ``FastBottleneckIR``: BN folded into the convolutions (cached), strided-view shortcut
* ``reference_compile`` -- ``torch.compile`` of the reference unit (Inductor fuses the pointwise tail)
* ``folded_compile``    -- ``torch.compile`` of the folded unit
* ``convs_only``        -- the two 3x3 convolutions alone (folded weights): the floor any fusion of the
  pointwise work around them can reach, since the convolutions themselves stay cuDNN's

The gap between ``folded`` and ``convs_only`` bounds what a hand-written fused pointwise/epilogue
kernel could still win.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtlface_fast.benchmark import environment, time_fn  # noqa: E402
from mtlface_fast.layers import FastBottleneckIR  # noqa: E402
from mtlface_fast.precision import DTYPES, autocast  # noqa: E402
from mtlface_fast.reference.backbone import BottleneckIR  # noqa: E402

# (in_channels, depth, stride, input side) of a non-first unit of each stage at 112x112 input, plus the
# first (strided, projecting) unit of stage 3.
SHAPES = {"stage1": (64, 64, 1, 56), "stage2": (128, 128, 1, 28), "stage3": (256, 256, 1, 14),
          "stage4": (512, 512, 1, 7), "stage3_first": (128, 256, 2, 28)}


def add_arguments(p):
    p.add_argument("--batch", default=None, help="comma-separated batch sizes (cpu: 8; cuda: 64,256)")
    p.add_argument("--dtype", default=None, help="comma-separated of fp32,bf16,fp16 (cpu: fp32; cuda: bf16)")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {list(SHAPES)}")
    p.add_argument("--variants", default=None,
                   help="comma-separated subset of reference,folded,reference_compile,folded_compile,convs_only "
                        "(cpu default: reference,folded,convs_only)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)


def _randomize(unit: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in unit.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight[0].numel() ** 0.5)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
                m.running_mean.uniform_(-0.2, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
            elif isinstance(m, torch.nn.PReLU):
                m.weight.uniform_(0.05, 0.45, generator=g)


def run(args) -> dict:
    device = args.device
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available")
    batches = [int(b) for b in (args.batch or ("64,256" if cuda else "8")).split(",")]
    dtypes = (args.dtype or ("bf16" if cuda else "fp32")).split(",")
    variants = (args.variants or ("reference,folded,reference_compile,folded_compile,convs_only" if cuda
                                  else "reference,folded,convs_only")).split(",")
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    iters = args.iters if args.iters is not None else (50 if cuda else 5)
    results = []
    for shape_name in args.shapes.split(","):
        cin, depth, stride, side = SHAPES[shape_name]
        ref = BottleneckIR(cin, depth, stride)
        _randomize(ref, 0)
        fast = FastBottleneckIR(cin, depth, stride)
        fast.load_state_dict(ref.state_dict())
        ref.eval().to(device)
        fast.eval().to(device)
        for dname in dtypes:
            dtype = DTYPES[dname]
            for batch in batches:
                x = torch.randn(batch, cin, side, side, device=device).contiguous(memory_format=torch.channels_last)
                amp = autocast(device, dtype)
                with torch.no_grad():
                    p = fast._build()
                fns = {
                    "reference": ref, "folded": fast,
                    "reference_compile": torch.compile(ref), "folded_compile": torch.compile(fast),
                    "convs_only": lambda t: F.conv2d(F.conv2d(t, p["w1"], None, 1, 1), p["w2"], None, stride, 1),
                }
                base = None
                for v in variants:
                    fn = fns[v]

                    def call(fn=fn):
                        with torch.inference_mode(), amp:
                            return fn(x)
                    try:
                        stats = time_fn(call, device, warmup=warmup, iters=iters)
                    except Exception as exc:  # recorded, not fatal (e.g. no compiler toolchain on this host)
                        results.append(dict(shape=shape_name, dtype=dname, batch=batch, variant=v,
                                            error=f"{type(exc).__name__}: {exc}"[:300]))
                        continue
                    base = stats["median_ms"] if v == "reference" else base
                    row = dict(shape=shape_name, dtype=dname, batch=batch, variant=v, **stats)
                    if base:
                        row["speedup_vs_reference"] = round(base / stats["median_ms"], 3)
                    results.append(row)
                    print(f"{shape_name:13s} {dname} B={batch:<4d} {v:18s} {stats['median_ms']:9.3f} ms "
                          f"{row.get('speedup_vs_reference', '')}")
    return {"benchmark": "kernels-trunk", "env": environment(device),
            "settings": dict(device=device, batches=batches, dtypes=dtypes, variants=variants,
                             shapes={k: SHAPES[k] for k in args.shapes.split(",")}, warmup=warmup, iters=iters),
            "results": results}
