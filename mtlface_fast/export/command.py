"""``mtlface-fast export``: write an ONNX file, an AOTInductor package or a TensorRT engine.

Examples:
  mtlface-fast export --target onnx --entry recognition --weights my_model/ --out recognition.onnx --verify
  mtlface-fast export --target aoti --entry synthesis --weights my_model/ --out synthesis.pt2
  mtlface-fast export --target tensorrt --device cuda --dtype fp16 --max-batch 256 --opt-batch 64 \\
      --weights my_model/ --out recognition.engine --program recognition_trt.pt2 --verify

--verify loads the artifact back and prints its largest error relative to the PyTorch model
(fast model, eager, fp32) on random images at the smallest and the optimal batch.
"""
from __future__ import annotations

import argparse
import time

import torch

TARGET_SUFFIX = {"onnx": ".onnx", "aoti": ".pt2", "tensorrt": ".engine", "triton-repo": ""}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..loading import add_model_arguments
    from .program import DTYPES, ENTRIES
    from .tensorrt import OP_MODES
    p.add_argument("--target", required=True, choices=sorted(TARGET_SUFFIX),
                   help="onnx, aoti, tensorrt, or triton-repo (a Triton Inference Server model repository folder "
                        "with both entries)")
    p.add_argument("--entry", default="recognition", choices=ENTRIES,
                   help="recognition (images -> embedding, age) or synthesis (images, target_group -> image)")
    p.add_argument("--out", required=True, help="artifact path (.onnx / .pt2 / .engine)")
    add_model_arguments(p, title=None)
    p.add_argument("--min-batch", type=int, default=1)
    p.add_argument("--opt-batch", type=int, default=None, help="batch TensorRT optimizes for (default: max)")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="fp32 (onnx, aoti cpu), fp16/bf16 (tensorrt, aoti cuda); default fp32, fp16 for tensorrt")
    p.add_argument("--device", default="cpu", help="cpu or cuda (aoti; tensorrt always builds on cuda)")
    p.add_argument("--ops", default="decompose", choices=OP_MODES,
                   help="tensorrt: fused ops as aten decompositions (default) or as TensorRT plugins")
    p.add_argument("--program", help="tensorrt: also save the compiled exported program here (.pt2)")
    p.add_argument("--verify", action="store_true", help="load the artifact and compare it with PyTorch")
    g = p.add_argument_group("triton-repo")
    g.add_argument("--instance-kind", default="gpu", choices=("gpu", "cpu"), help="instance_group kind (gpu)")
    g.add_argument("--instance-count", type=int, default=1, help="instances per device (1)")
    g.add_argument("--queue-delay-us", type=int, default=2000, help="dynamic batching's longest queue delay (2000)")


def _load(target: str, path: str):
    from . import load_aoti, load_engine, load_onnx
    return {"onnx": load_onnx, "aoti": load_aoti, "tensorrt": load_engine}[target](path)


def verify(model, target: str, path: str, spec) -> float:
    """Largest relative error of the artifact vs ``model`` (fp32, eager) over two batch sizes; printed."""
    from .program import WRAPPERS, example_inputs
    runner = _load(target, path)
    device = "cuda" if spec.device == "cuda" else "cpu"
    reference = WRAPPERS[spec.entry](model.float().to(device).eval())
    worst = 0.0
    for batch in sorted({spec.min_batch, spec.opt_batch}):
        inputs = example_inputs(spec, device, batch=batch, seed=batch)
        outs = runner(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        with torch.no_grad():
            want = reference(inputs[0].float(), *inputs[1:])
        want = want if isinstance(want, tuple) else (want,)
        for name, got, exp in zip(spec.output_names, outs, want):
            got, exp = got.detach().double().cpu(), exp.detach().double().cpu()
            err = float((got - exp).abs().max() / exp.abs().max().clamp_min(1e-30))
            worst = max(worst, err)
            print(f"verify: batch {batch} {name}: max relative error {err:.3e}")
    return worst


def execute(args) -> int:
    from ..loading import load_model_from_args
    from . import export_aoti, export_onnx, export_tensorrt
    suffix = TARGET_SUFFIX[args.target]
    if not args.out.endswith(suffix):
        raise ValueError(f"--out for --target {args.target} must end in {suffix}, got {args.out!r}")
    if args.program and args.target != "tensorrt":
        raise ValueError("--program is for --target tensorrt")
    dtype = args.dtype or ("fp16" if args.target == "tensorrt" else "fp32")
    model, what = load_model_from_args(args)
    print(f"model: {what}")
    if args.target == "triton-repo":
        from ..scale.triton_repo import export_triton_repo
        done = export_triton_repo(model, args.out, max_batch=args.max_batch, kind=args.instance_kind,
                                  count=args.instance_count, queue_delay_us=args.queue_delay_us)
        print(f"wrote {args.out}: {', '.join(done['models'])}"
              + (f" (no TensorRT plans: {done['tensorrt']})" if done["tensorrt"] else ""))
        return 0
    batches = dict(min_batch=args.min_batch, opt_batch=args.opt_batch, max_batch=args.max_batch)
    start = time.perf_counter()
    if args.target == "onnx":
        spec = export_onnx(model, args.out, args.entry, dtype=dtype, **batches)
    elif args.target == "aoti":
        spec = export_aoti(model, args.out, args.entry, dtype=dtype, device=args.device, **batches)
    else:
        spec = export_tensorrt(model.to("cuda") if torch.cuda.is_available() else model, args.out, args.entry,
                               dtype=dtype, ops=args.ops, program_path=args.program, **batches)
    print(f"wrote {args.out} ({args.target}, {spec.entry}, {spec.dtype}, batch {spec.min_batch}..{spec.max_batch}) "
          f"in {time.perf_counter() - start:.1f} s")
    if args.verify:
        verify(model, args.target, args.out, spec)
    return 0
