"""CPU inference against what a user has without us: eager reference, torch.compile(reference), ONNX Runtime.

``python bench/cpu_peers.py [--arch cvpr tpami] [--batch 1 8] [--calls encode synthesize] [--rounds 5]
[--profile] [--out PATH]``

Per (architecture, call, batch), fp32, eval, ``torch.inference_mode()``, seeded random weights (the tests'
randomization, never the default init; run from a checkout), IR-50 / 112 px / 7 groups:

* ``reference``: the reference model, eager (NCHW);
* ``reference_compiled``: ``torch.compile`` of the reference's method (default mode, ``dynamic=False``: one
  graph per batch size, Inductor's layout choices, channels_last convolutions on CPU);
* ``onnxruntime``: our ONNX export (``mtlface_fast.export.export_onnx``: ``recognition`` = encode's embedding
  and age, ``synthesis``) in ONNX Runtime's CPU provider with every graph optimization on (its default,
  ``ORT_ENABLE_ALL``) and its default thread pool;
* ``ours_nchw``: the fast model with ``channels_last=False``: the CPU path of the previous release (NCHW,
  BatchNorm folded, ``F.conv2d``), kept selectable; the "before" of the profiler tables;
* ``ours``: ``MTLFace().eval()``, the default (channels_last, oneDNN weights packed once per weights version);
* ``ours_compiled``: ``MTLFace().eval().compile(dynamic=False)``.

The variants of one case are timed interleaved (each round calls every variant once, the order rotating), so a
machine whose speed drifts slows them alike; medians over ``--rounds`` rounds. Error: each variant's output
against the float64 reference (relative L2 per sample; the median sample): the embedding for encode, the image
for synthesize. The fp32 rule: a fast path is within 2x the larger of ``reference`` and ``reference_compiled``.
Roofline: the model's FLOPs per case (``torch.utils.flop_counter`` on the reference call; our compact ICM does
fewer in synthesize) over the machine's attainable fp32 rate, measured in the same run as the best of a 4096^3
``torch.mm`` and a 64-channel 3x3 convolution at 56 px, B=8 (oneDNN, channels_last, packed weights): ``floor_ms``,
the time of the FLOPs alone at that rate, against ``target_ms`` (the best peer / 1.2).
``--profile``: a torch.profiler table (top ops by self CPU time) of ``ours_nchw`` (before) and ``ours``
(after) per case. The JSON is rewritten after every case.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtlface_fast import MTLFace  # noqa: E402
from mtlface_fast.benchmark import environment, time_interleaved, write_results  # noqa: E402
from mtlface_fast.reference import MTLFace as Reference  # noqa: E402

VARIANTS = ("reference", "reference_compiled", "onnxruntime", "ours_nchw", "ours", "ours_compiled")
PEERS = ("reference_compiled", "onnxruntime")
TARGET = 1.2


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded non-default weights, as the tests draw them (``tests/utils.py``, ``tests/tpami_utils.py``: every
    convolution, BatchNorm statistic and affine term, PReLU slope, and for TPAMI every StyleGAN2 parameter and
    stored noise map, with images mostly inside the generator's clamp range)."""
    from tests.tpami_utils import randomize_tpami_
    from tests.utils import randomize_

    return randomize_tpami_(model, seed) if model.config["arch"] == "tpami" else randomize_(model, seed)


def rel_err(out: torch.Tensor, truth: torch.Tensor) -> float:
    """Median over samples of ||out - truth|| / ||truth||."""
    o, t = out.double().flatten(1), truth.double().flatten(1)
    return float(((o - t).norm(dim=1) / t.norm(dim=1).clamp_min(1e-300)).median())


def attainable_gflops(repeats: int = 5) -> Dict[str, float]:
    """Best fp32 GFLOP/s of a large GEMM and of a large 3x3 convolution on this machine (all threads)."""
    def best(fn, flop):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return flop / min(times) / 1e9

    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    gemm = best(lambda: a @ b, 2 * 4096 ** 3)
    x = torch.randn(8, 64, 56, 56).contiguous(memory_format=torch.channels_last)
    w = torch.ops.mkldnn._reorder_convolution_weight(torch.randn(64, 64, 3, 3), [1, 1], [1, 1], [1, 1], 1, None)
    conv = best(lambda: torch.ops.mkldnn._convolution_pointwise(x, w, None, [1, 1], [1, 1], [1, 1], 1, "none", [], ""),
                2 * 8 * 56 * 56 * 64 * 64 * 9)
    return dict(gemm_4096=round(gemm, 1), conv3x3_64ch_56px_b8=round(conv, 1), attainable=round(max(gemm, conv), 1))


def reference_gflop(fn: Callable[[], object]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def profile_table(fn: Callable[[], object], rows: int = 12) -> List[Dict]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [dict(op=e.key, self_ms=round(e.self_cpu_time_total / 1e3, 3), share=round(e.self_cpu_time_total / total, 4),
                 calls=e.count) for e in events[:rows]]


def format_table(rows: List[Dict]) -> str:
    lines = [f"    {'op':40s} {'self ms':>9s} {'share':>6s} {'calls':>6s}"]
    lines += [f"    {r['op'][:40]:40s} {r['self_ms']:9.2f} {100 * r['share']:5.1f}% {r['calls']:6d}" for r in rows]
    return "\n".join(lines)


class Case:
    """One (arch, call): the models, the ONNX sessions (one file, dynamic batch) and the compiled callables."""

    def __init__(self, arch: str, call: str, seed: int, max_batch: int, variants, tmpdir: str):
        self.arch, self.call, self.variants = arch, call, variants
        torch.manual_seed(seed)
        self.ref = randomize(Reference(arch=arch), seed).eval()
        state = self.ref.state_dict()
        self.ref64 = copy.deepcopy(self.ref).double().eval()
        self.nchw = MTLFace(arch=arch, channels_last=False).eval()
        self.nchw.load_state_dict(state)
        self.ours = MTLFace(arch=arch).eval()
        self.ours.load_state_dict(state)
        self.fns: Dict[str, Callable] = {}
        if "reference_compiled" in variants:
            self.ref_compiled = torch.compile(getattr(self.ref, self._method), dynamic=False)
        if "ours_compiled" in variants:
            self.ours_compiled_model = MTLFace(arch=arch).eval()
            self.ours_compiled_model.load_state_dict(state)
            self.ours_compiled_model.compile(dynamic=False)
        if "onnxruntime" in variants:
            from mtlface_fast.export.onnx import export_onnx, load_onnx
            path = os.path.join(tmpdir, f"{arch}-{call}.onnx")
            t0 = time.perf_counter()
            export_onnx(self.ours, path, "recognition" if call == "encode" else "synthesis", min_batch=1,
                        max_batch=max_batch)
            self.export_s = time.perf_counter() - t0
            self.ort = load_onnx(path)

    @property
    def _method(self) -> str:
        return "encode" if self.call == "encode" else "synthesize"

    def callables(self, x: torch.Tensor, groups: torch.Tensor) -> Dict[str, Callable[[], torch.Tensor]]:
        """variant -> a call returning the compared output (embedding or image)."""
        if self.call == "encode":
            out = {"reference": lambda: self.ref.encode(x).embedding,
                   "reference_compiled": lambda: self.ref_compiled(x).embedding,
                   "onnxruntime": lambda: self.ort(x)[0],
                   "ours_nchw": lambda: self.nchw.encode(x).embedding,
                   "ours": lambda: self.ours.encode(x).embedding,
                   "ours_compiled": lambda: self.ours_compiled_model.encode(x).embedding}
        else:
            out = {"reference": lambda: self.ref.synthesize(x, groups),
                   "reference_compiled": lambda: self.ref_compiled(x, groups),
                   "onnxruntime": lambda: self.ort(x, groups),
                   "ours_nchw": lambda: self.nchw.synthesize(x, groups),
                   "ours": lambda: self.ours.synthesize(x, groups),
                   "ours_compiled": lambda: self.ours_compiled_model.synthesize(x, groups)}
        return {k: v for k, v in out.items() if k in self.variants}

    def truth(self, x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        if self.call == "encode":
            return self.ref64.encode(x.double()).embedding
        return self.ref64.synthesize(x.double(), groups)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="+", default=["cvpr", "tpami"], choices=["cvpr", "tpami"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--calls", nargs="+", default=["encode", "synthesize"], choices=["encode", "synthesize"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="profiler tables of ours_nchw (before) and ours (after)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/cpu-peers-<stamp>.json)")
    args = p.parse_args(argv)

    out_path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                        time.strftime("cpu-peers-%Y%m%dT%H%M%SZ.json", time.gmtime()))
    payload = dict(benchmark="cpu-peers", environment=environment("cpu"), dtype="fp32", model="ir50, 112 px, 7 groups",
                   rounds=args.rounds, target=f"ours and ours_compiled >= {TARGET}x the faster of {PEERS}",
                   variants=list(args.variants), cases=[], complete=False)
    with tempfile.TemporaryDirectory() as tmpdir, torch.inference_mode():
        peak = payload["machine_fp32_gflops"] = attainable_gflops()
        print(f"attainable fp32 GFLOP/s on this machine: {peak}")
        for arch in args.arch:
            for call in args.calls:
                case = Case(arch, call, args.seed, max(args.batch), args.variants, tmpdir)
                for batch in args.batch:
                    gen = torch.Generator().manual_seed(args.seed + batch)
                    x = torch.randn(batch, 3, 112, 112, generator=gen)
                    groups = torch.randint(0, 7, (batch,), generator=gen)
                    fns = case.callables(x, groups)
                    truth = case.truth(x, groups)
                    errors, warm_s = {}, {}
                    for name, fn in fns.items():
                        t0 = time.perf_counter()
                        out = fn()
                        for _ in range(args.warmup - 1):
                            fn()
                        warm_s[name] = round(time.perf_counter() - t0, 2)
                        errors[name] = rel_err(out, truth)
                    timings = time_interleaved(fns, "cpu", iters=args.rounds)
                    med = {k: v["median_ms"] for k, v in timings.items()}
                    peers = [med[k] for k in PEERS if k in med]
                    best_peer = min(peers) if peers else None
                    budget = 2 * max(errors.get("reference", 0.0), errors.get("reference_compiled", 0.0))
                    gflop = reference_gflop(fns["reference"]) if "reference" in fns else None
                    entry = dict(arch=arch, call=call, batch=batch, median_ms=med, timings=timings, error=errors,
                                 fp32_error_budget=budget, warmup_s=warm_s,
                                 speedup_vs_best_peer={k: round(best_peer / med[k], 3) for k in med}
                                 if best_peer else {},
                                 within_fp32_rule={k: errors[k] <= budget for k in errors if k.startswith("ours")},
                                 reference_gflop=gflop,
                                 floor_ms=round(1e3 * gflop / peak["attainable"], 1) if gflop else None,
                                 target_ms=round(best_peer / TARGET, 1) if best_peer else None)
                    if args.profile:
                        entry["profile"] = {k: profile_table(fns[k]) for k in ("ours_nchw", "ours") if k in fns}
                    payload["cases"].append(entry)
                    write_results(out_path, payload)
                    print(f"\n{arch} {call} B={batch} (median ms over {args.rounds} interleaved rounds; error vs fp64)")
                    for k in fns:
                        sp = entry["speedup_vs_best_peer"].get(k)
                        print(f"  {k:20s} {med[k]:9.1f} ms  x{sp if sp is not None else float('nan'):.2f} vs best peer"
                              f"  err {errors[k]:.2e}")
                    print(f"  fp32 budget {budget:.2e}; reference {gflop or float('nan'):.1f} GFLOP: floor "
                          f"{entry['floor_ms']} ms at the attainable rate, target {entry['target_ms']} ms")
                    for k, rows in entry.get("profile", {}).items():
                        print(f"  profile {k}:\n{format_table(rows)}")
                    sys.stdout.flush()
                del case
    payload["complete"] = True
    path = write_results(out_path, payload)
    print(f"\nwrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
