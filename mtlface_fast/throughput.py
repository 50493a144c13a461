"""Whole-model throughput: ``python bench/throughput.py`` / ``mtlface-fast bench``.

Tasks: ``encode`` (embedding + age), ``synthesize`` (one target group), ``synthesize_all`` (every group)
and ``train_step`` (one step of the training loop's AIFR recipe: CosFace + age + GRL domain-adaptation
losses, SGD with the recipe's defaults). Variants, all in one process on the same weights and inputs:

* ``reference``           -- the reference model, eager, fp32
* ``reference_autocast``  -- the reference under ``torch.autocast`` (``--dtype``)
* ``reference_compile``   -- ``torch.compile`` of the reference (with autocast when ``--dtype`` is not fp32)
* ``ours``                -- ``mtlface_fast.MTLFace`` (``--dtype`` via autocast)
* ``ours_compile``        -- ``torch.compile`` of ours
* ``ours_cudagraphs``     -- ours compiled with CUDA graphs (``mode="reduce-overhead"``; CUDA only)
* ``ours_tensorrt``       -- (``encode``/``synthesize``) a TensorRT engine of ours in ``--dtype``, built for the
                            batch (``mtlface_fast.export``); skipped when torch_tensorrt or a GPU is absent
* ``reference_x7``        -- (``synthesize_all`` only) seven ``synthesize`` calls of the reference

``--arch tpami`` times the TPAMI model instead (encode with flip TTA, StyleGAN2 decoder with the stored
noise maps); results go to ``throughput-<device>-<dtype>-tpami-*.json``.

Each is warmed up, then the variants of a task and batch are timed in interleaved rounds (one call of
each per round; CUDA events on GPU, wall clock on CPU), so that a drifting machine slows them alike. The
JSON (under ``--out``: bench/results in a checkout, ./bench_results when run from an install) holds medians
and quantiles, images/s, ratios to the reference variants and peak memory (taken during the warm-up), and a
PNG bar chart is written beside it.

The JSON and PNG are rewritten as each task and batch completes (``"complete": false`` until the last), and
each row is printed then, so an interrupted run keeps what it measured; the progress bar counts calls.
The CPU default (batch 1, 1 warm-up and 3 timed calls per variant, ir50 at 112x112; train_step needs
``--batch 2`` and is skipped at batch 1) took 21.5 s of wall time on an idle 2-core machine and 146 s under
a load average of 5-6 (both measured at an earlier commit): its duration follows the machine's load.
``--batch 8 --iters 5`` gives steadier figures in several times that.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
from typing import Dict, List

import torch

from .benchmark import RESULTS_DIR, environment, results_path, time_interleaved, write_results
from .precision import DTYPES, autocast, dtype_name

TASKS = ("encode", "synthesize", "synthesize_all", "train_step")
VARIANTS = ("reference", "reference_autocast", "reference_compile", "reference_x7", "ours", "ours_compile",
            "ours_cudagraphs", "ours_tensorrt")
CPU_DEFAULT_VARIANTS = ("reference", "reference_x7", "ours")
TRAIN_CLASSES = 1000  # identities of train_step's CosFace head


def train_batch(x: torch.Tensor, num_classes: int = TRAIN_CLASSES, seed: int = 0) -> Dict[str, torch.Tensor]:
    """The training batch of ``train_step`` for images ``x``: identity labels in ``[0, num_classes)`` and ages
    in years in ``[5, 85)``, drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (x.size(0),), generator=g)
    ages = torch.rand(x.size(0), generator=g) * 80 + 5
    return dict(image=x, label=labels.to(x.device), age=ages.to(x.device))


def train_step_case(model, x: torch.Tensor, dtype: torch.dtype, device: str):
    """``train_step``: the training loop's own AIFR step (``mtlface_fast.train.recipes``: the recipe that
    ``mtlface-fast train aifr`` builds with its defaults, ``dtype`` as ``--amp``) on ``model`` and :func:`train_batch`
    of ``x``. Each call is one step of the loop: forward, losses, backward, SGD and schedule step, and the
    logged values (read to the host, as the loop does)."""
    import itertools

    from .train.config import AIFRConfig
    from .train.recipes import build_recipe
    amp = "none" if dtype == torch.float32 else dtype_name(dtype)
    cfg = AIFRConfig(input_size=model.input_size, age_group=model.age_group, amp=amp)
    recipe = build_recipe(cfg, model, TRAIN_CLASSES, torch.device(device))
    batch = train_batch(x)
    steps = itertools.count()
    return lambda: recipe.step(batch, next(steps))


def build_cases(task: str, variant: str, models: Dict[str, torch.nn.Module], x: torch.Tensor, dtype: torch.dtype,
                device: str, age_group: int):
    """A zero-argument callable that runs one iteration of ``task`` with ``variant``."""
    base = "reference" if variant.startswith("reference") else "ours"
    model = models[base]
    amp = dtype if variant not in ("reference",) else torch.float32
    target = torch.arange(x.size(0), device=x.device) % age_group
    if task == "train_step":
        return train_step_case(model, x, amp, device)
    model.eval()
    if variant == "ours_tensorrt":
        return _tensorrt_case(task, model, x, dtype, target)
    if task == "encode":
        fn = lambda inp: model.encode(inp)  # noqa: E731
    elif task == "synthesize":
        fn = lambda inp: model.synthesize(inp, target)  # noqa: E731
    elif variant == "reference_x7":
        fn = lambda inp: [model.synthesize(inp, g) for g in range(age_group)]  # noqa: E731
    else:
        fn = lambda inp: model.synthesize_all_ages(inp)  # noqa: E731
    if variant.endswith("_compile"):
        fn = torch.compile(fn)
    elif variant == "ours_cudagraphs":
        fn = torch.compile(fn, mode="reduce-overhead")

    def run():
        with torch.inference_mode(), autocast(device, amp):
            return fn(x)
    return run


def _tensorrt_case(task: str, model, x: torch.Tensor, dtype: torch.dtype, target: torch.Tensor):
    """A TensorRT engine of ``model`` for this batch (built in a temporary folder), run on ``x``."""
    import tempfile

    from .export import export_tensorrt, load_engine
    entry = {"encode": "recognition", "synthesize": "synthesis"}[task]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{entry}.engine")
        export_tensorrt(model, path, entry, min_batch=1, opt_batch=x.size(0), max_batch=x.size(0), dtype=dtype)
        engine = load_engine(path)
    inputs = (x.to(dtype),) if entry == "recognition" else (x.to(dtype), target)

    def run():
        with torch.inference_mode():
            return engine(*inputs)
    return run


def _peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # process peak RSS (Linux: KiB)


def plot(payload: Dict, path: str) -> str:
    """Horizontal bars of images/s per task and variant, drawn with Pillow."""
    from PIL import Image, ImageDraw
    rows = [(r["task"], r["batch"], r["variant"], r["images_per_s"]) for r in payload["results"]
            if "images_per_s" in r]  # rows that errored have no figure
    if not rows:
        return ""
    width, bar_h, left = 900, 16, 300
    img = Image.new("RGB", (width, 40 + bar_h * len(rows) + 8 * len({(t, b) for t, b, _, _ in rows})), "white")
    d = ImageDraw.Draw(img)
    d.text((8, 8), f"mtlface_fast throughput, {payload['env']['device']}, {payload['settings']['dtype']}",
           fill="black")
    y, last, best = 32, None, {}
    for t, b, _, ips in rows:
        best[(t, b)] = max(best.get((t, b), 0.0), ips)
    for t, b, v, ips in rows:
        if (t, b) != last:
            y += 8
            last = (t, b)
        frac = ips / best[(t, b)] if best[(t, b)] else 0
        d.text((8, y + 2), f"{t} B={b} {v}", fill="black")
        d.rectangle([left, y + 2, left + int(frac * (width - left - 120)), y + bar_h - 2],
                    fill=(40, 110, 200) if v.startswith("ours") else (160, 160, 160))
        d.text((left + int(frac * (width - left - 120)) + 6, y + 2), f"{ips:.1f} img/s", fill="black")
        y += bar_h
    img.save(path)
    return path


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def batch_list(text) -> List[int]:
    """argparse type: comma-separated batch sizes, each >= 1 (``"1,64,256"``)."""
    if isinstance(text, (list, tuple)):
        text = ",".join(map(str, text))
    parts = [b.strip() for b in str(text).split(",")]
    try:
        values = [int(b) for b in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return values


def check_settings(args) -> None:
    """The checks argparse applies, for a Namespace built in code: ValueError on a bad count or batch."""
    for name, low in (("iters", 1), ("warmup", 0)):
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"--{name} must be an integer >= {low}, got {value!r}")
    try:
        args.batch = batch_list(args.batch)
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"--batch: {exc}") from None


def run(args, on_update=None) -> Dict:
    """Time every case; ``on_update(payload)`` is called with the results so far after each task and batch."""
    from . import reference
    from .model import MTLFace

    check_settings(args)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available")
    dtype = DTYPES[args.dtype]
    tasks = [t.strip() for t in args.tasks.split(",")]
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; choose from {TASKS}")
    variants = [v.strip() for v in args.variants.split(",")] if args.variants else list(
        CPU_DEFAULT_VARIANTS if not device.startswith("cuda") else
        ("reference", "reference_autocast", "reference_compile", "reference_x7", "ours", "ours_compile",
         "ours_cudagraphs", "ours_tensorrt"))
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r}; choose from {VARIANTS}")
    skipped = {}
    if "ours_tensorrt" in variants:
        from .export import tensorrt_available
        ok, reason = tensorrt_available()
        if not ok:
            skipped["ours_tensorrt"] = reason
            variants = [v for v in variants if v != "ours_tensorrt"]
            print(f"throughput: skipping ours_tensorrt: {reason}", file=sys.stderr)
    batches = list(args.batch)
    torch.manual_seed(args.seed)
    weights = getattr(args, "weights", None)
    if weights:  # a saved folder or the official files: the architecture and sizes come from them
        from .loading import load_model
        ours, _ = load_model(weights)
        cfg = ours.config
        args.arch, args.backbone, args.input_size, args.age_group = (cfg["arch"], cfg["backbone"], cfg["input_size"],
                                                                    cfg["age_group"])
        ref_model = reference.MTLFace(**cfg)
        ref_model.load_state_dict(ours.state_dict())
    else:
        ref_model = reference.MTLFace(backbone=args.backbone, input_size=args.input_size, age_group=args.age_group,
                                      arch=getattr(args, "arch", "cvpr"))
        ours = MTLFace(**ref_model.config)
        ours.load_state_dict(ref_model.state_dict())
    arch = ours.config["arch"]
    models = {"reference": ref_model.to(device), "ours": ours.to(device)}
    initial = {k: v.detach().clone() for k, v in ref_model.state_dict().items()}

    if "train_step" in tasks and min(batches) < 2:  # BatchNorm in training mode needs two samples
        skipped["train_step at batch 1"] = "BatchNorm in training mode needs a batch of at least 2 (--batch 2)"
        print("throughput: skipping train_step at batch 1: BatchNorm in training mode needs a batch >= 2",
              file=sys.stderr)
    cases = [(t, b, v) for t in tasks for b in batches for v in variants
             if not (t == "train_step" and b < 2)
             if not (v == "reference_x7" and t != "synthesize_all")
             and not (v == "ours_cudagraphs" and not device.startswith("cuda"))
             and not (v == "ours_tensorrt" and t not in ("encode", "synthesize"))]
    # Per (task, batch): every variant is built from the same weights and warmed up (its peak memory is taken
    # there), then all are timed in interleaved rounds, so that drift of the machine's speed hits them alike.
    groups: Dict[tuple, List[str]] = {}
    for task, batch, variant in cases:
        groups.setdefault((task, batch), []).append(variant)
    results: List[Dict] = []
    settings = dict(device=device, dtype=args.dtype, arch=arch, backbone=args.backbone, input_size=args.input_size,
                    age_group=args.age_group, batches=batches, tasks=tasks, variants=variants, warmup=args.warmup,
                    iters=args.iters, skipped_variants=skipped,
                    backend=os.environ.get("MTLFACE_FAST_BACKEND", "auto"))
    env = environment(device)

    def payload(complete: bool) -> Dict:
        _add_speedups(results)
        return {"benchmark": "throughput", "env": env, "settings": settings, "complete": complete,
                "cases_done": len(results), "cases_total": len(cases), "results": results}

    calls_per_variant = args.warmup + args.iters
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(cases) * calls_per_variant, desc="throughput", unit="call", file=sys.stderr)
    except ImportError:  # pragma: no cover
        bar = None

    def tick():
        if bar is not None:
            bar.update(1)

    for (task, batch), names in groups.items():
        g = torch.Generator().manual_seed(args.seed + batch)
        x = torch.randn(batch, 3, args.input_size, args.input_size, generator=g).clamp_(-1, 1).to(device)
        fns, rows = {}, {}
        for variant in names:
            if bar is not None:
                bar.set_postfix_str(f"{task} B={batch} {variant} (warm-up)")
            for m in models.values():  # every variant starts from the same weights
                m.load_state_dict(initial)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            done = 0
            try:
                fn = build_cases(task, variant, models, x, dtype, device, args.age_group)
                for _ in range(args.warmup):
                    fn()
                    done += 1
                    tick()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
            except Exception as exc:  # a variant that cannot run here is recorded, not fatal
                rows[variant] = dict(task=task, batch=batch, variant=variant, error=f"{type(exc).__name__}: {exc}")
                if bar is not None:
                    bar.update(calls_per_variant - done)
                continue
            fns[variant] = fn
            rows[variant] = dict(task=task, batch=batch, variant=variant,
                                 peak_memory_mb=round(_peak_memory_mb(device), 1))
        if bar is not None:
            bar.set_postfix_str(f"{task} B={batch} timing {len(fns)} variants")
        try:
            timed = time_interleaved(fns, device, iters=args.iters, on_call=lambda name: tick())
        except Exception as exc:  # pragma: no cover - a variant that fails only after its warm-up
            timed = {}
            for v in fns:
                rows[v] = dict(task=task, batch=batch, variant=v, error=f"{type(exc).__name__}: {exc}")
        per = batch * (args.age_group if task == "synthesize_all" else 1)
        group_rows = []
        for variant in names:
            row = rows[variant]
            if variant in timed:
                stats = timed[variant]
                row = dict(task=task, batch=batch, variant=variant, images_per_s=per / (stats["median_ms"] / 1e3),
                           peak_memory_mb=row["peak_memory_mb"], **stats)
            results.append(row)
            group_rows.append(row)
        _add_speedups(results)
        for row in group_rows:
            (bar.write if bar is not None else print)(format_row(row))
        if on_update is not None:
            on_update(payload(complete=False))
    if bar is not None:
        bar.close()
    return payload(complete=True)


def _add_speedups(results: List[Dict]) -> None:
    """Ratios against the reference variants of the same task and batch, in place."""
    for r in results:
        for base in ("reference", "reference_autocast", "reference_compile", "reference_x7"):
            other = next((o for o in results if o["task"] == r["task"] and o["batch"] == r["batch"]
                          and o["variant"] == base and "median_ms" in o), None)
            if other and "median_ms" in r:
                r[f"speedup_vs_{base}"] = round(other["median_ms"] / r["median_ms"], 3)


TABLE_HEADER = f"{'task':15s} {'B':>4s} {'variant':20s} {'median ms':>10s} {'img/s':>9s}  speedup vs reference"


def format_row(r: Dict) -> str:
    """One line of the printed table."""
    if "error" in r:
        return f"{r['task']:15s} {r['batch']:4d} {r['variant']:20s} error: {r['error'][:80]}"
    sp = r.get("speedup_vs_reference", r.get("speedup_vs_reference_x7", ""))
    return f"{r['task']:15s} {r['batch']:4d} {r['variant']:20s} {r['median_ms']:10.1f} {r['images_per_s']:9.2f}  {sp}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda (cpu)")
    p.add_argument("--batch", default=None, type=batch_list,
                   help="comma-separated batch sizes, each >= 1 (cpu: 1; cuda: 1,64,256)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="autocast dtype of the fast/autocast "
                   "variants (fp32)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {TASKS}")
    p.add_argument("--variants", default=None, help=f"comma-separated subset of {VARIANTS} (cpu default: "
                   f"{','.join(CPU_DEFAULT_VARIANTS)}; cuda: all)")
    p.add_argument("--weights", default=None, help="time a trained model: a folder written by save_pretrained or "
                   "the authors' TPAMI release file (mtlface_checkpoints.tar); its architecture and sizes replace "
                   "--arch/--backbone/--input-size/--age-group (default: seeded random weights)")
    p.add_argument("--arch", default="cvpr", choices=("cvpr", "tpami"), help="model architecture (cvpr); tpami "
                   "is the released model (encode with flip TTA, StyleGAN2 decoder, stored noise)")
    p.add_argument("--backbone", default="ir50", help="backbone (ir50)")
    p.add_argument("--input-size", type=positive_int, default=112, help="input side, a multiple of 16 (112)")
    p.add_argument("--age-group", type=positive_int, default=7, help="number of age groups, 4..8 (7)")
    p.add_argument("--warmup", type=non_negative_int, default=None, help="warm-up calls per variant (cpu 1, cuda 5)")
    p.add_argument("--iters", type=positive_int, default=None, help="timed calls per variant, >= 1 (cpu 3, cuda 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs (0)")
    p.add_argument("--out", default=RESULTS_DIR, help=f"folder for the JSON and PNG (here: {RESULTS_DIR}; "
                   f"bench/results in a checkout, ./bench_results from an install, $MTLFACE_FAST_RESULTS_DIR "
                   f"when set)")
    p.add_argument("--no-save", action="store_true", help="print only")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="throughput", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_arguments(p)
    return execute(p.parse_args(argv))


def execute(args) -> int:
    """Run the benchmark for parsed arguments (see :func:`add_arguments`): rows are printed and the JSON + PNG
    rewritten as each task and batch completes."""
    cuda = args.device.startswith("cuda")
    args.batch = args.batch or ("1,64,256" if cuda else "1")
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.iters = args.iters if args.iters is not None else (20 if cuda else 3)
    check_settings(args)
    path = None
    if not args.no_save:
        tag = "cuda" if cuda else "cpu"
        arch = "" if getattr(args, "arch", "cvpr") == "cvpr" else f"-{args.arch}"
        path = results_path(f"throughput-{tag}-{args.dtype}{arch}", args.out)

    def save(payload):
        if path is not None:
            write_results(path, payload)
            plot(payload, path[:-5] + ".png")

    print(TABLE_HEADER)
    payload = run(args, on_update=save)
    save(payload)
    if path is not None:
        print("wrote", path, path[:-5] + ".png")
    return 0
