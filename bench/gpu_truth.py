"""The GPU truth run, one stage per call; ``bench/gpu_truth.sh`` runs the stages in order, each under its own
time limit, and ``bench/gpu_truth.sh --dry-run`` runs the same harness on CPU at tiny sizes (CI).

    python bench/gpu_truth.py init  --out RUN.json [--dry-run]
    python bench/gpu_truth.py run   STAGE --out RUN.json [--dry-run] [--size full|small|tiny]
    python bench/gpu_truth.py close STAGE --out RUN.json --rc RC --limit S
    python bench/gpu_truth.py check --out RUN.json        # exit 1 unless every stage is ok

Stages (in order):

- ``env``: device, driver, torch / triton / CUDA versions, git commit.
- ``parity``: every fused op against the reference, forward and backward, both architectures: AFD (eval
  no-grad forward and train forward + backward, fp32 and bf16), compact ICM (eval forward, fp32 and bf16
  autocast; train forward + backward at an input away from the activation kinks), the TPAMI decoder's fused
  noise + bias + leaky ReLU (forward + backward). GPU: full size (AFD B=256 x 512 x 7 x 7, ICM B=64 eval).
- ``sanitize``: ``compute-sanitizer --tool memcheck`` over one small call of each op (the ``parity`` stage at
  ``--size small`` in a child process); without compute-sanitizer (CPU dry run) the child runs plainly.
- ``ops``: per-op benchmarks: AFD bf16 B=256 / 1024 forward (and forward + backward at 256) with the
  ``x.clone()`` yardstick, reference eager and torch.compile, fused, fused in a CUDA graph; ICM bf16 B=64 /
  256 forward: reference, torch.compile(reference), Triton, Triton in a CUDA graph.
- ``model``: the whole model, encode B=1 / 64 / 256 and synthesize B=1 / 64, both architectures: reference (fp32),
  reference under autocast, ours, ours in CUDA graphs (``model.cuda_graphs``); then torch.compile(reference)
  (default and mode="reduce-overhead") and ``ours.compile()`` for the CVPR targets (encode 1 and 256,
  synthesize 64). Each variant's output is compared
  with the fp32 reference.

In ``ops`` and ``model`` the torch.compile variants run after every eager one (cases named "... compiled"):
compiling takes tens of seconds per graph, and a stage cut off by its limit then loses only those.

Every case is written to the JSON as soon as it finishes (the file is replaced atomically), so a stage cut
off by its time limit keeps what it measured; ``close`` records the stage's exit status. A case holds
``name``, ``shape``, ``dtype``, ``ok`` and, as they apply, ``errors`` (relative L2 errors against the
reference) with ``tol``, and ``variants`` (median / quantile ms per variant, or the variant's error).

Error measure: ``||a - b|| / ||b||`` over the whole tensor in float64 (parameter gradients: over all
parameters' gradients together), robust to the few activation-kink flips that a max-norm would magnify.
Tolerances: fp32 2e-4 (TF32 off); bf16: 2x the reference's own error in bf16 (the reference run in bf16
against the fp32 reference), at least the project's bf16 tolerance 2e-2 (tests/utils.py; flash-attn's rule,
see CONVENTIONS.md).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("env", "parity", "sanitize", "ops", "model")
FP32_TOL, LOWP_FLOOR = 2e-4, 2e-2  # LOWP_FLOOR: the bf16 tolerance of tests/utils.py


# ------------------------------------------------------------------------------------------ the JSON file
def _load(path):
    with open(path) as fh:
        return json.load(fh)


def _save(path, data):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, default=str)
    os.replace(tmp, path)


class Recorder:
    """One stage of the run file: every case appended and the file rewritten at once."""

    def __init__(self, path, stage):
        self.path, self.stage, self.t0 = path, stage, time.time()
        data = _load(path)
        data["stages"][stage] = dict(data["stages"].get(stage, {}), status="running", started=time.time(),
                                     cases=[])
        _save(path, data)

    def update(self, **fields):
        data = _load(self.path)
        data["stages"][self.stage].update(fields)
        _save(self.path, data)

    def case(self, name, **fields):
        fields = dict(name=name, **fields)
        fields["seconds"], self.t0 = round(time.time() - self.t0, 2), time.time()  # since the previous case
        fields.setdefault("ok", all(e <= fields["tol"] for e in fields.get("errors", {}).values())
                          if "tol" in fields else True)
        data = _load(self.path)
        data["stages"][self.stage]["cases"].append(fields)
        _save(self.path, data)
        errs = " ".join(f"{k}={v:.2e}" for k, v in fields.get("errors", {}).items())
        times = " ".join(f"{k}={v['median_ms']:.3f}ms" if "median_ms" in v else f"{k}=FAILED"
                         for k, v in fields.get("variants", {}).items())
        print(f"{'ok  ' if fields['ok'] else 'FAIL'} {self.stage}: {name} {errs} {times}", flush=True)
        return fields


def cmd_init(a):
    data = dict(kind="gpu-truth", dry_run=a.dry_run, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                stages={s: {"status": "pending", "cases": []} for s in STAGES})
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    _save(a.out, data)
    print("run file", a.out)
    return 0


def cmd_close(a):
    data = _load(a.out)
    st = data["stages"].setdefault(a.stage, {"cases": []})
    rc = a.rc
    st["rc"], st["limit_s"] = rc, a.limit
    if "started" in st:
        st["seconds"] = round(time.time() - st["started"], 1)
    failed = [c["name"] for c in st.get("cases", []) if not c.get("ok", False)]
    st["status"] = ("timeout" if rc in (124, 137) else "failed" if rc != 0 or failed else
                    "ok" if st.get("cases") else "empty")
    st["failed_cases"] = failed
    _save(a.out, data)
    print(f"=== stage {a.stage}: {st['status']} (rc {rc}, {st.get('seconds', '?')} s of {a.limit} s)"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 0


def cmd_check(a):
    data = _load(a.out)
    bad = {s: st.get("status") for s, st in data["stages"].items() if st.get("status") != "ok"}
    print("every stage ok" if not bad else f"stages not ok: {bad}")
    return 1 if bad else 0


# ------------------------------------------------------------------------------------------ helpers
def _torch():
    import torch
    return torch


def _device(a):
    return "cpu" if a.dry_run else "cuda"


def rel_err(a, b):
    """||a - b|| / ||b|| in float64 (a list of tensors counts as one concatenated vector)."""
    torch = _torch()
    if isinstance(a, (list, tuple)):
        num = sum(float((x.double() - y.double()).square().sum()) for x, y in zip(a, b))
        den = sum(float(y.double().square().sum()) for y in b)
    else:
        num, den = float((a.double() - b.double()).square().sum()), float(b.double().square().sum())
    if not all(bool(torch.isfinite(x).all()) for x in (a if isinstance(a, (list, tuple)) else [a])):
        return float("inf")
    return (num / max(den, 1e-300)) ** 0.5


def lowp_tol(ref_lowp_err):
    return max(2 * ref_lowp_err, LOWP_FLOOR)


def _sync(dev):
    if dev.startswith("cuda"):
        _torch().cuda.synchronize()


def _autocast(dev, dtype):
    torch = _torch()
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(dev.split(":")[0], dtype=dtype)


DTYPE_NAMES = ("fp32", "bf16")


def _dtypes(a=None):
    torch = _torch()
    names = a.dtypes.split(",") if a is not None and a.dtypes else DTYPE_NAMES
    return {n: {"fp32": torch.float32, "bf16": torch.bfloat16}[n] for n in names}


def _versions(dev):
    from mtlface_fast.benchmark import environment
    return environment(dev)


# ------------------------------------------------------------------------------------------ stage: env
def stage_env(a, rec):
    torch = _torch()
    env = _versions(_device(a))
    env["dry_run"] = a.dry_run
    env["compute_sanitizer"] = shutil.which("compute-sanitizer") or "not found"
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(sm=f"{p.major}.{p.minor}", sms=p.multi_processor_count, memory_gb=round(p.total_memory / 2**30, 1))
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception as e:  # noqa: BLE001
            env["driver"] = f"unknown ({type(e).__name__})"
    data = _load(a.out)
    data["environment"] = env
    _save(a.out, data)
    ok = a.dry_run or torch.cuda.is_available()
    rec.case("environment", shape=[], dtype="-", ok=ok, **{k: env[k] for k in ("device", "torch", "triton")})


# ------------------------------------------------------------------------------------------ stage: parity
SIZES = {  # AFD (B, C, S), ICM eval (B, C, unit, repeat), ICM train B, stylegan2 (B, C, S)
    "full": dict(afd=(256, 512, 7), icm=(64, 512, 128, 4), icm_train=5, sg=(64, 128, 56)),
    "small": dict(afd=(3, 512, 7), icm=(5, 512, 128, 4), icm_train=5, sg=(2, 64, 8)),
    "tiny": dict(afd=(4, 32, 7), icm=(3, 12, 8, 2), icm_train=3, sg=(2, 8, 8)),  # AFD train BN: B > 2
}


def _size(a):
    return SIZES[a.size or ("tiny" if a.dry_run else "full")]


def _afd_pair(arch, channels, seed):
    from mtlface_fast import layers, reference
    from tests.utils import randomize_
    ref = randomize_(reference.AttentionModule(channels, 16, arch), seed=seed)
    fast = layers.FusedAttentionModule(channels, 16, arch)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def parity_afd(a, rec, dev):
    torch = _torch()
    B, C, S = _size(a)["afd"]
    for arch in ("cvpr", "tpami"):
        ref, fast = _afd_pair(arch, C, seed=1)
        ref, fast = ref.to(dev), fast.to(dev)
        gen = torch.Generator().manual_seed(2)
        x = torch.randn(B, C, S, S, generator=gen).to(dev)
        with torch.no_grad():
            want = [t.double() for t in ref.eval()(x)]
            for dname, dtype in _dtypes(a).items():  # copies in the dtype: the fp32 weights stay unrounded
                got = copy.deepcopy(fast).eval().to(dtype)(x.to(dtype))
                errs = {f"{n}": rel_err(g, w) for n, g, w in zip(("x_id", "x_age"), got, want)}
                tol = FP32_TOL
                if dtype != torch.float32:
                    lowp = copy.deepcopy(ref).to(dtype)(x.to(dtype))
                    tol = lowp_tol(max(rel_err(g, w) for g, w in zip(lowp, want)))
                _sync(dev)
                rec.case(f"afd {arch} eval fwd {dname}", shape=[B, C, S, S], dtype=dname, errors=errs, tol=tol)
        # train: forward + backward of a composite loss, every gradient
        for dname, dtype in _dtypes(a).items():
            outs = {}
            for tag, m in (("ref", ref), ("fast", fast), ("ref_lowp", ref)):
                if tag == "ref_lowp" and dtype == torch.float32:
                    continue
                mm = copy.deepcopy(m).train().to(torch.float32 if tag == "ref" else dtype)
                xx = x.to(torch.float32 if tag == "ref" else dtype).detach().requires_grad_()
                x_id, x_age = mm(xx)
                w = torch.randn(x_id.shape, generator=torch.Generator().manual_seed(3)).to(dev)
                ((x_id.float() * w).sum() + (x_age.float() * w.flip(0)).sum()).backward()
                outs[tag] = ([x_id.detach(), x_age.detach()], xx.grad, [p.grad for p in mm.parameters()])
            r, f = outs["ref"], outs["fast"]
            errs = {"out": rel_err(f[0], r[0]), "grad_x": rel_err(f[1], r[1]), "grad_params": rel_err(f[2], r[2])}
            tol = FP32_TOL if dtype == torch.float32 else lowp_tol(max(
                rel_err(outs["ref_lowp"][0], r[0]), rel_err(outs["ref_lowp"][1], r[1]),
                rel_err(outs["ref_lowp"][2], r[2])))
            _sync(dev)
            rec.case(f"afd {arch} train fwd+bwd {dname}", shape=[B, C, S, S], dtype=dname, errors=errs, tol=tol)


def _icm_pair(arch, C, unit, repeat, seed):
    from mtlface_fast.layers.icm import CompactICM
    from mtlface_fast.reference.icm import ICMBase
    from tests.utils import randomize_

    class Compact(CompactICM, ICMBase):
        pass

    sigma = 0.1 if arch == "cvpr" else 0.125
    ref = randomize_(ICMBase(C, 7, unit, sigma, repeat, arch), seed=seed)
    fast = Compact(C, 7, unit, sigma, repeat, arch)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def kink_free_input(module, groups, shape, margin=5e-6, tries=512):
    """An input (on the module's device; probed there in float64) at which no PReLU / LeakyReLU of the ICM sees an input within ``margin`` (relative to the
    RMS of that activation's input) of its kink, in a float64 forward (see bench/gpu_smoke.py: two correct
    fp32 computations can put an input within round-off of zero on opposite sides, and the gradients of a
    piecewise-linear network then differ by far more than round-off)."""
    torch = _torch()
    from torch import nn
    probe = copy.deepcopy(module).double()
    dev = next(probe.parameters()).device
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
             for m in probe.modules() if isinstance(m, (nn.PReLU, nn.LeakyReLU))]
    try:
        for seed in range(tries):
            x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dev)
            seen.clear()
            with torch.no_grad():
                probe.icm(x.double(), groups)
            gap = min((float(v[v != 0].abs().min() / v.square().mean().sqrt()) for v in seen if (v != 0).any()),
                      default=float("inf"))
            if gap >= margin:
                return x
    finally:
        for h in hooks:
            h.remove()
    raise RuntimeError(f"no input in {tries} seeds keeps every activation {margin} away from its kink")


def parity_icm(a, rec, dev):
    torch = _torch()
    B, C, unit, repeat = _size(a)["icm"]
    Bt = _size(a)["icm_train"]
    for arch in ("cvpr", "tpami"):
        ref, fast = _icm_pair(arch, C, unit, repeat, seed=2)
        ref, fast = ref.to(dev).eval(), fast.to(dev).eval()
        gen = torch.Generator().manual_seed(4)
        x = torch.randn(B, C, 7, 7, generator=gen).to(dev)
        g = (torch.arange(B) * 5 % 7).to(dev)
        with torch.no_grad():
            want = ref.icm(x, g).double()
            for dname, dtype in _dtypes(a).items():
                with _autocast(dev, dtype):
                    got = fast.icm(x, g)
                    tol = FP32_TOL
                    if dtype != torch.float32:
                        tol = lowp_tol(rel_err(ref.icm(x, g), want))
                _sync(dev)
                rec.case(f"icm {arch} eval fwd {dname}", shape=[B, C, 7, 7], dtype=dname,
                         errors={"out": rel_err(got, want)}, tol=tol)
        # train: fp32, an input away from the kinks (training-mode BatchNorm / InstanceNorm, reference stats)
        ref.train(), fast.train()
        gt = torch.tensor([6, 0, 3, 3, 1, 5, 2, 4][:Bt]).to(dev)
        xt = kink_free_input(ref, gt, (Bt, C, 7, 7))
        grads = {}
        for tag, m in (("ref", ref), ("fast", fast)):
            m.zero_grad(set_to_none=True)
            xx = xt.detach().clone().requires_grad_()
            y = m.icm(xx, gt)
            w = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(dev)
            (y * w).sum().backward()
            grads[tag] = (y.detach(), xx.grad, [p.grad if p.grad is not None else torch.zeros_like(p)
                                                for p in m.parameters()])
        r, f = grads["ref"], grads["fast"]
        _sync(dev)
        rec.case(f"icm {arch} train fwd+bwd fp32", shape=[Bt, C, 7, 7], dtype="fp32", tol=FP32_TOL,
                 errors={"out": rel_err(f[0], r[0]), "grad_x": rel_err(f[1], r[1]),
                         "grad_params": rel_err(f[2], r[2])})


def parity_stylegan2(a, rec, dev):
    torch = _torch()
    from mtlface_fast import use_backend
    from mtlface_fast.layers.stylegan2 import noise_bias_lrelu
    B, C, S = _size(a)["sg"]
    gen = torch.Generator().manual_seed(6)
    base = [torch.randn(B, C, S, S, generator=gen), torch.randn(1, 1, S, S, generator=gen),
            torch.randn(1, generator=gen), torch.randn(C, generator=gen)]
    for dname, dtype in _dtypes(a).items():
        res = {}
        for tag, backend, dt in (("ref", "torch", torch.float32), ("fast", "triton", dtype), ("lowp", "torch", dtype)):
            if tag == "lowp" and dtype == torch.float32:
                continue
            t = [v.detach().to(dev, dt, copy=True) for v in base]
            t[0] = t[0].contiguous(memory_format=torch.channels_last)
            t = [v.requires_grad_() for v in t]
            with use_backend(backend):
                y = noise_bias_lrelu(*t)
            w = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(dev)
            (y.float() * w).sum().backward()
            res[tag] = (y.detach(), [v.grad for v in t])
        r, f = res["ref"], res["fast"]
        tol = FP32_TOL if dtype == torch.float32 else lowp_tol(max(rel_err(res["lowp"][0], r[0]),
                                                                   rel_err(res["lowp"][1], r[1])))
        _sync(dev)
        rec.case(f"stylegan2 noise_bias_lrelu fwd+bwd {dname}", shape=[B, C, S, S], dtype=dname, tol=tol,
                 errors={"out": rel_err(f[0], r[0]), "grads": rel_err(f[1], r[1])})


def stage_parity(a, rec):
    torch = _torch()
    from mtlface_fast import use_backend
    dev = _device(a)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    rec.update(size=a.size or ("tiny" if a.dry_run else "full"))
    with use_backend("triton"):  # CUDA: the kernels; CPU: the kernels in the interpreter (TRITON_INTERPRET=1)
        parity_afd(a, rec, dev)
        parity_icm(a, rec, dev)
        parity_stylegan2(a, rec, dev)


# ------------------------------------------------------------------------------------------ stage: sanitize
def stage_sanitize(a, rec):
    child = a.out + ".sanitize-child.json"
    base = [sys.executable, os.path.abspath(__file__)]
    subprocess.run(base + ["init", "--out", child] + (["--dry-run"] if a.dry_run else []), check=True)
    # GPU: both dtypes (their specializations differ); the dry run checks the harness with fp32 only
    cmd = base + ["run", "parity", "--out", child, "--size", "tiny" if a.dry_run else "small"] + \
        (["--dry-run", "--dtypes", "fp32"] if a.dry_run else [])
    san = shutil.which("compute-sanitizer")
    if san and not a.dry_run:
        cmd = [san, "--tool", "memcheck", "--error-exitcode", "1", "--target-processes", "all",
               "--print-limit", "20"] + cmd
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    with open(a.out + ".sanitize.log", "w") as fh:
        fh.write(log)
    summary = [ln.strip() for ln in log.splitlines() if "ERROR SUMMARY" in ln]
    cases = _load(child)["stages"]["parity"]["cases"]
    for c in cases:  # each op's small call, as the child checked it
        rec.case("sanitized " + c["name"], shape=c["shape"], dtype=c["dtype"], errors=c.get("errors", {}),
                 tol=c.get("tol", FP32_TOL), ok=c["ok"])
    rec.case("compute-sanitizer memcheck" if san and not a.dry_run else "child run (no compute-sanitizer)",
             shape=[], dtype="-", ok=proc.returncode == 0 and bool(cases), rc=proc.returncode,
             sanitizer=san or "not found", summary=summary, child_seconds=round(time.time() - t0, 1),
             log_tail=log[-2000:] if proc.returncode else "")


# ------------------------------------------------------------------------------------------ stage: ops
def _time(fn, dev, a):
    from mtlface_fast.benchmark import time_fn
    warmup, iters = (0, 1) if a.dry_run else (3, 20)
    try:
        return time_fn(fn, dev, warmup, iters)
    except Exception as e:  # noqa: BLE001 -- one failing variant leaves the others' figures
        return {"error": f"{type(e).__name__}: {e}"[:400]}


def _graph(fn, dev):
    """A CUDA-graph replay of ``fn`` (warmed up on a side stream, captured once; fixed input buffers)."""
    torch = _torch()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _compile(fn, a):
    torch = _torch()
    # The dry run traces with the eager backend (no C++ build on CPU): it checks the harness, not Inductor.
    return torch.compile(fn, backend="eager") if a.dry_run else torch.compile(fn)


def ops_afd(a, rec, dev, compiled):
    """Eager variants of every batch, then (``compiled``) torch.compile(reference) at the target batch."""
    torch = _torch()
    from mtlface_fast import use_backend
    B0, C, S = _size(a)["afd"]
    batches = (B0,) if a.dry_run else (256, 1024)
    ref, fast = _afd_pair("cvpr", C, seed=1)
    ref32 = copy.deepcopy(ref).to(dev).eval()
    ref, fast = ref.to(dev, torch.bfloat16).eval(), fast.to(dev, torch.bfloat16).eval()
    for B in batches[:1] if compiled else batches:
        x = torch.randn(B, C, S, S, device=dev, dtype=torch.bfloat16)
        nbytes = x.numel() * x.element_size()

        def nograd(m):
            def f():
                with torch.no_grad():
                    return m(x)
            return f
        with torch.no_grad(), use_backend("triton"):
            want = [t.double() for t in ref32(x.float())]
            errs = {"reference_eager": max(rel_err(g, w) for g, w in zip(ref(x), want))}
            if compiled:
                ref_c = _compile(ref, a)
                errs["reference_compile"] = max(rel_err(g, w) for g, w in zip(ref_c(x), want))
                v = {"fused": _time(nograd(fast), dev, a), "reference_compile": _time(nograd(ref_c), dev, a)}
            else:
                errs["fused"] = max(rel_err(g, w) for g, w in zip(fast(x), want))
                v = {"clone": _time(lambda: x.clone(), dev, a), "reference_eager": _time(nograd(ref), dev, a),
                     "fused": _time(nograd(fast), dev, a)}
                if dev.startswith("cuda"):
                    try:
                        v["fused_cudagraph"] = _time(_graph(nograd(fast), dev), dev, a)
                    except Exception as e:  # noqa: BLE001
                        v["fused_cudagraph"] = {"error": f"{type(e).__name__}: {e}"[:400]}
        for k, t in v.items():
            if "median_ms" in t:
                t["GBps"] = (2 if k == "clone" else 3) * nbytes / t["median_ms"] / 1e6
        rec.case(f"afd cvpr eval fwd bf16 B={B}" + (" compiled" if compiled else ""), shape=[B, C, S, S],
                 dtype="bf16", variants=v, errors=errs, tol=lowp_tol(errs["reference_eager"]),
                 speedup=_speedups(v, "fused"))
    if compiled:
        return
    # forward + backward (train), B = the first batch
    B = batches[0]
    x = torch.randn(B, C, S, S, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g_id, g_age = torch.randn_like(x), torch.randn_like(x)
    v = {}
    with use_backend("triton"):
        for name, m in (("reference_eager", ref), ("fused", fast)):
            m.train()

            def step(m=m):
                m.zero_grad(set_to_none=True)
                x.grad = None
                torch.autograd.backward(m(x), (g_id, g_age))
            v[name] = _time(step, dev, a)
    rec.case(f"afd cvpr train fwd+bwd bf16 B={B}", shape=[B, C, S, S], dtype="bf16", variants=v,
             speedup=_speedups(v, "fused"), ok=all("median_ms" in t for t in v.values()))


def _speedups(v, ours):
    t = v.get(ours, {}).get("median_ms")
    return {k: r["median_ms"] / t for k, r in v.items() if t and k != ours and "median_ms" in r}


def ops_icm(a, rec, dev, compiled):
    """Eager variants of every batch, then (``compiled``) torch.compile(reference) at the target batch."""
    torch = _torch()
    from mtlface_fast import use_backend
    _, C, unit, repeat = _size(a)["icm"]
    batches = (_size(a)["icm"][0],) if a.dry_run else (64, 256)
    ref, fast = _icm_pair("cvpr", C, unit, repeat, seed=2)
    ref, fast = ref.to(dev).eval(), fast.to(dev).eval()
    for B in batches[:1] if compiled else batches:
        x = torch.randn(B, C, 7, 7, device=dev)
        g = torch.randint(0, 7, (B,), generator=torch.Generator().manual_seed(B)).to(dev)

        def call(fn):
            def f():
                with torch.no_grad(), _autocast(dev, torch.bfloat16):
                    return fn(x, g)
            return f
        with use_backend("triton"):
            with torch.no_grad():
                want = ref.icm(x, g).double()
            errs = {"reference": rel_err(call(ref.icm)(), want)}
            if compiled:
                ref_c = _compile(ref.icm, a)
                errs["reference_compile"] = rel_err(call(ref_c)(), want)
                v = {"ours": _time(call(fast.icm), dev, a), "reference_compile": _time(call(ref_c), dev, a)}
            else:
                errs["ours"] = rel_err(call(fast.icm)(), want)
                v = {"reference": _time(call(ref.icm), dev, a), "ours": _time(call(fast.icm), dev, a)}
                if dev.startswith("cuda"):
                    try:
                        v["ours_cudagraph"] = _time(_graph(call(fast.icm), dev), dev, a)
                    except Exception as e:  # noqa: BLE001
                        v["ours_cudagraph"] = {"error": f"{type(e).__name__}: {e}"[:400]}
        rec.case(f"icm cvpr eval fwd bf16 B={B}" + (" compiled" if compiled else ""), shape=[B, C, 7, 7],
                 dtype="bf16", variants=v, errors=errs, tol=lowp_tol(errs["reference"]), speedup=_speedups(v, "ours"))


def stage_ops(a, rec):
    torch = _torch()
    dev = _device(a)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    for compiled in (False, True):  # torch.compile last: its compile time must not starve the eager figures
        ops_afd(a, rec, dev, compiled)
        ops_icm(a, rec, dev, compiled)


# ------------------------------------------------------------------------------------------ stage: model
def _model_pair(arch, a, dev):
    import mtlface_fast
    from mtlface_fast import reference
    from tests.utils import randomize_
    backbone = "ir34" if a.dry_run else "ir50"
    kw = {} if arch == "cvpr" else {"arch": "tpami"}
    ref = randomize_(reference.MTLFace(backbone, 112, **kw), seed=3)
    fast = mtlface_fast.MTLFace(backbone, 112, **kw)
    fast.load_state_dict(ref.state_dict())
    return ref.to(dev).eval(), fast.to(dev).eval()


def stage_model(a, rec):
    """Eager variants of both architectures first, then the compiled ones (CVPR targets): a compile that
    runs long costs only the cases after it."""
    torch = _torch()
    dev = _device(a)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    bf16 = torch.bfloat16
    plan = ([("encode", 1), ("synthesize", 1)] if a.dry_run else
            [("encode", 1), ("encode", 64), ("encode", 256), ("synthesize", 1), ("synthesize", 64)])
    heavy = [("encode", 1)] if a.dry_run else [("encode", 1), ("encode", 256), ("synthesize", 64)]
    models = {arch: _model_pair(arch, a, dev) for arch in ("cvpr", "tpami")}
    eager = [(arch, task, B, False) for arch in ("cvpr", "tpami") for task, B in plan]
    compiled = [("cvpr", task, B, True) for task, B in heavy]
    for arch, task, B, comp in eager + compiled:
        ref, fast = models[arch]
        gen = torch.Generator().manual_seed(B)
        x = (torch.rand(B, 3, 112, 112, generator=gen) * 2 - 1).to(dev)
        target = torch.arange(B, device=dev) % 7

        def fn(model, amp):
            def f():
                with torch.inference_mode(), _autocast(dev, bf16 if amp else torch.float32):
                    out = model.encode(x) if task == "encode" else model.synthesize(x, target)
                return out.embedding if task == "encode" else out
            return f
        if comp:
            variants = {"reference_compile": ("compile", ref, True),
                        "reference_compile_reduce_overhead": ("compile_ro", ref, True),
                        "ours_compiled": ("ours_compile", fast, True)}
        else:
            variants = {"reference": ("eager", ref, False), "reference_autocast": ("eager", ref, True),
                        "ours": ("eager", fast, True)}
            if dev.startswith("cuda"):
                variants["ours_cuda_graphs"] = ("graphs", fast, True)
        t0 = time.perf_counter()
        want = fn(ref, False)().double()
        t_ref = (time.perf_counter() - t0) * 1e3
        lowp = fn(ref, True)().double() if comp else None
        v, errs = {}, {}
        for name, (how, m, amp) in variants.items():
            try:
                if how == "compile":
                    f = _compile(fn(m, amp), a)
                elif how == "compile_ro":
                    f = torch.compile(fn(m, amp), mode="reduce-overhead")
                elif how == "ours_compile":
                    import copy
                    f = fn(copy.deepcopy(m).compile(), amp)
                elif how == "graphs":  # model.cuda_graphs: one capture of this batch, bf16
                    g = m.cuda_graphs((B,), dtype="bf16")

                    def f(g=g):
                        with torch.inference_mode():
                            return g.encode(x).embedding if task == "encode" else g.synthesize(x, target)
                else:
                    f = fn(m, amp)
                if a.dry_run:  # one call each, timed and compared: the harness is checked, nothing is measured
                    from mtlface_fast.benchmark import summarize
                    if name == "reference":
                        errs[name], v[name] = 0.0, summarize([t_ref])
                        continue
                    t0 = time.perf_counter()
                    out = f()
                    v[name] = summarize([(time.perf_counter() - t0) * 1e3])
                    errs[name] = rel_err(out, want)
                    continue
                errs[name] = rel_err(f(), want)
                v[name] = _time(f, dev, a)
            except Exception as e:  # noqa: BLE001 -- recorded; the other variants go on
                v[name] = {"error": f"{type(e).__name__}: {e}"[:400]}
        for t in v.values():
            if "median_ms" in t:
                t["images_per_s"] = B / t["median_ms"] * 1e3
        base = rel_err(lowp, want) if comp else errs.get("reference_autocast", 0.0)
        tol = lowp_tol(base)
        lowp_errs = {k: e for k, e in errs.items() if k != "reference"}
        rec.case(f"model {arch} {task} B={B}" + (" compiled" if comp else ""), shape=[B, 3, 112, 112],
                 dtype="bf16 autocast (reference: fp32)", variants=v, errors=lowp_errs, tol=tol,
                 reference_autocast_err=base, speedup=_speedups(v, "ours") if not comp else {},
                 ok=all(e <= tol for e in lowp_errs.values()) and all("median_ms" in t for t in v.values()))


# ------------------------------------------------------------------------------------------ main
def cmd_run(a):
    if a.dry_run:
        os.environ.setdefault("MTLFACE_FAST_AUTOTUNE", "0")
    sys.path.insert(0, ROOT)
    rec = Recorder(a.out, a.stage)
    fn = {"env": stage_env, "parity": stage_parity, "sanitize": stage_sanitize, "ops": stage_ops,
          "model": stage_model}[a.stage]
    fn(a, rec)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cmd", choices=("init", "run", "close", "check"))
    p.add_argument("stage", nargs="?", choices=STAGES)
    p.add_argument("--out", required=True, help="the run's JSON file")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, kernels in the Triton interpreter")
    p.add_argument("--size", choices=tuple(SIZES), help="parity sizes (default: full on GPU, tiny in a dry run)")
    p.add_argument("--dtypes", help="parity: comma-separated subset of fp32,bf16 (default both)")
    p.add_argument("--rc", type=int, default=0, help="close: the stage's exit status")
    p.add_argument("--limit", type=int, default=0, help="close: the stage's time limit in s")
    a = p.parse_args(argv)
    if a.cmd in ("run", "close") and not a.stage:
        p.error(f"{a.cmd} needs a STAGE")
    return {"init": cmd_init, "run": cmd_run, "close": cmd_close, "check": cmd_check}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
