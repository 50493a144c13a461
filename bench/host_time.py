"""Host time per eager call with the Triton kernels stubbed: fused layers (AFD, ICM) and whole public model calls.

``python bench/host_time.py [--batch 4] [--rounds 20] [--iters 50]``: layer cases (the default suite)
``python bench/host_time.py --suite model [--repo PATH]``: ``encode`` / ``synthesize`` of the full model
``python bench/host_time.py --suite breakdown [--repo PATH] [--cases ...]``: cProfile of those calls
``python bench/host_time.py --compare OLD_CHECKOUT [--rounds 3] [--iters 2] [--host-iters 12]``: model cases,
old vs this tree

What a GPU host spends per call before the kernels run (argument checks, dispatch, operand caches,
allocations, the stubbed launch); Triton's own launch path (binding, cubin lookup, cuLaunchKernel: a few
microseconds on a GPU host) is not in it. Every ``@triton.jit`` / autotuned launch is replaced by a no-op that
counts it, and ``Tensor.is_cuda`` is made True so the host code takes its GPU branch (CPU tensors; no CUDA API
is called), backend "triton", 1 torch thread, eval mode, ``torch.no_grad()``.

Layer suite: ``FusedAttentionModule(512)`` on (B, 512, 7, 7) bf16 (CVPR and TPAMI variants) and the compact ICM
(512 channels, 7 groups, unit 128, 4 blocks) under bf16 autocast. The aten ops of these layers are cheap, so
host time is the wall time of the call. The cases run in interleaved rounds (each round: ``--iters`` calls of
every case in turn); per case the median over all calls and the spread of the round medians.
Targets (issue 15): AFD eval <= 100 us, ICM eval <= 300 us. Writes bench/results/host-time-<stamp>.json.

Model suite: ``MTLFace(backbone="ir50", input_size=112, age_group=7, arch=...)`` (CVPR and TPAMI, seeded
random weights), B=1, fp32: ``model.encode(x)`` and ``model.synthesize(x, torch.tensor([3]))``. Here the aten
ops (convolutions) really run on the CPU and dominate the wall time, so host time is the time of the call NOT
spent inside aten ops, read from ``torch.profiler``: the call is split at its top-level aten ops (events named
``aten::*`` with no ``aten::*`` ancestor; those inside a custom op's body count too) into aten intervals and
the host gaps before, between and after them. Each gap and each aten interval is the same program point in
every call, so a per-position median over the calls of a round drops the gaps that the shared machine's
scheduler preempted (one preemption adds milliseconds to one gap); host = the sum of the per-position median
gaps. ``host_us`` is taken over ``--host-iters`` calls with the aten computation elided
(:func:`elide_compute_mode`: a CPU-computed op inflates the Python that follows it, which a GPU host does not
see); ``host_us_real_compute`` is the same split over ``--iters`` calls that compute.
  In host: Python of the model and layers (checks, precision/NVTX context, module calls, implementation
  choice, cache lookups of folded/packed weights), the Python-to-C++ argument parsing of each aten call,
  custom-op dispatch (``torch.library``) and their Python bodies with the launch stubbed (plus one
  pass-through frame of the dispatch mode per custom op), tensor attribute reads (``.shape``,
  ``.data_ptr()``, ``._version``), and the profiler's own bookkeeping at each op boundary
  (``profiler_overhead_us_per_aten_op``, measured in the same run: ~0.3 us per op).
  Not in host: the dispatcher and kernel of each aten op (a few us each on a GPU host as well, inside the aten
  event; ``aten_ops_per_call`` says how many) and Triton's launch path.
Also reported per call: wall time and thread CPU time without the profiler (``--iters`` calls), the aten time
with real compute, the number of top-level aten ops (and of all aten events), of Triton launches, and the
largest host gaps with the ops around them (``top_gaps``). ``same_aten_ops_elided`` says whether the elided
run saw the same top-level op sequence (a ``contiguous`` on an already contiguous tensor may drop out).
``--compare`` runs the same measuring code (this file) against two code versions: each round starts one
worker subprocess per version (``--suite model --repo PATH``: PATH first on sys.path before mtlface_fast is
imported), old/new order alternating between rounds, so machine-load drift hits both alike; per case the
median over rounds and the spread of the round figures, before, after and after/before (target <= 0.5).
Writes bench/results/host-time-model-<stamp>.json. The 1-minute load average is recorded.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # kernels are stubbed; the interpreter only avoids a GPU
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

TARGET_US = {"afd": 100.0, "icm": 300.0}
MODEL_TARGET_RATIO = 0.5  # the issue "One MTLFace": model host cost at most half of commit 87918d7's
LAYER_CASES = ("afd-cvpr", "icm-cvpr", "afd-tpami", "icm-tpami")
MODEL_CASES = ("cvpr-encode", "cvpr-synthesize", "tpami-encode", "tpami-synthesize")


def results_dir() -> str:
    return os.environ.get("MTLFACE_FAST_RESULTS_DIR") or os.path.join(HERE, "results")


def git_commit(path: str) -> str:
    try:
        return subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def git_dirty(path: str) -> bool:
    try:
        out = subprocess.run(["git", "-C", path, "status", "--porcelain", "--untracked-files=no"],
                             capture_output=True, text=True, check=True).stdout
        return bool(out.strip())
    except (OSError, subprocess.CalledProcessError):
        return False


def versions() -> dict:
    import torch
    from importlib.metadata import version
    try:
        triton = version("triton")
    except Exception:
        triton = "not installed"
    return dict(torch=torch.__version__, triton=triton, python=platform.python_version(),
                device=f"cpu ({platform.machine()}, {os.cpu_count()} cores)", torch_threads=torch.get_num_threads())


def stub_kernels() -> list:
    """Replace every Triton launch by a no-op that counts it; make host code take its GPU branch."""
    import torch
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launches = []

    def stub(self, *a, **k):  # record, do not run
        if not k.get("warmup", False):
            launches.append(1)

    for cls in (Autotuner, JITFunction, InterpretedFunction):
        cls.run = stub
    torch.Tensor.is_cuda = property(lambda self: True)
    torch.cuda.is_current_stream_capturing = lambda: False
    return launches


# -- layer suite -----------------------------------------------------------------------------------------
def _layer_cases(batch: int, names):
    import torch
    from mtlface_fast.layers import FusedAttentionModule
    from mtlface_fast.layers.icm import CompactICM
    from mtlface_fast.reference.icm import ICMBase

    class CompactICMBase(CompactICM, ICMBase):
        """ICMBase with the compact implementation."""

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
    return {name: cases[name] for name in LAYER_CASES if name in names}


def run_layers(args) -> None:
    import torch
    sys.path.insert(0, REPO)
    from mtlface_fast import use_backend
    launches = stub_kernels()
    load_before = os.getloadavg()
    cases = _layer_cases(args.batch, args.cases or LAYER_CASES)
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
    env = dict(versions(), git_commit=git_commit(REPO), git_dirty=git_dirty(REPO))
    out = _write(f"host-time-{_stamp()}.json",
                 dict(suite="layers", environment=env, rounds=args.rounds, iters=args.iters,
                      loadavg_before=load_before, loadavg_after=load_after, results=results))
    print("wrote", out)


# -- model suite -----------------------------------------------------------------------------------------
def _model_cases(names):
    """The public calls, B=1 fp32, both architectures at full size (seeded random weights)."""
    import torch
    from mtlface_fast import MTLFace
    cases = {}
    for arch in ("cvpr", "tpami"):
        if not any(n.startswith(arch + "-") for n in names):
            continue
        torch.manual_seed(0)
        model = MTLFace(backbone="ir50", input_size=112, age_group=7, arch=arch).eval()
        x = torch.randn(1, 3, 112, 112)
        g = torch.tensor([3])
        cases[f"{arch}-encode"] = lambda m=model, x=x: m.encode(x)
        cases[f"{arch}-synthesize"] = lambda m=model, x=x, g=g: m.synthesize(x, g)
    return {name: cases[name] for name in MODEL_CASES if name in names}


MARK = "host_time::call"
#: an aten op whose output has at least this many elements has its computation elided in the host run
BIG_NUMEL = 1 << 14


def elide_compute_mode():
    """A dispatch mode under which every aten op with a large output (``BIG_NUMEL`` elements or more; not a view)
    returns, instead of computing, a preallocated tensor of ones of the right shape, strides and dtype (the
    shape inferred on the meta device; one tensor per (shape, strides, dtype), kept for the process), like a
    GPU host that only enqueues work and whose caching allocator reuses blocks. In-place and ``out=`` ops
    with a large output return their destination. Views, small ops and ops that meta cannot infer compute
    for real. Ones are finite and within every range check, so the input checks pass as with real data.
    Why: a CPU-computed op slows the Python after it (most likely by evicting the interpreter's working set)
    after each large op (the gap after a convolution grows with its size), a cost a GPU host does not have. The
    mode's own Python runs inside the aten event (the profiler opens the event at the dispatcher, before the
    mode), so it is not host; for a custom op (``torch.library``, whose body is host)
    it adds one pass-through frame per op."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map

    pool = {}

    def meta(x):
        return x.to("meta") if isinstance(x, torch.Tensor) else x

    def ones(m):
        if not (isinstance(m, torch.Tensor) and m.device.type == "meta"):
            return m
        key = (tuple(m.shape), tuple(m.stride()), m.dtype)
        if key not in pool:
            pool[key] = torch.ones(m.shape, dtype=m.dtype).as_strided(m.shape, m.stride()) \
                if m.is_contiguous() else torch.empty_strided(m.shape, m.stride(), dtype=m.dtype).fill_(1)
        return pool[key]

    class ElideCompute(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            returns = func._schema.returns
            if func.namespace != "aten" or any(r.alias_info is not None and not r.alias_info.is_write
                                               for r in returns):
                return func(*args, **kwargs)
            try:
                out = func(*tree_map(meta, args), **tree_map(meta, kwargs))
            except Exception:  # data-dependent shapes, no meta kernel, device-specific ops
                return func(*args, **kwargs)
            flat = out if isinstance(out, (list, tuple)) else (out,)
            if not any(isinstance(t, torch.Tensor) and t.numel() >= BIG_NUMEL for t in flat):
                return func(*args, **kwargs)
            if any(r.alias_info is not None for r in returns):  # in-place / out=: the destination, unchanged
                return kwargs["out"] if "out" in kwargs else args[0]
            return tree_map(ones, out)

    return ElideCompute()


def _split_call(prof):
    """(host gaps, aten intervals, top-level aten names, all aten events) of the one marked call, in us."""
    events = prof.events()
    call = [e for e in events if e.name == MARK]
    if len(call) != 1:
        raise RuntimeError(f"expected one '{MARK}' event, found {len(call)}")
    call = call[0]
    t0, t1 = call.time_range.start, call.time_range.end
    top, n_aten = [], 0
    for e in events:
        if not e.name.startswith("aten::") or e.thread != call.thread:
            continue
        if not (t0 <= e.time_range.start and e.time_range.end <= t1):
            continue
        n_aten += 1
        p = e.cpu_parent
        while p is not None and not p.name.startswith("aten::"):
            p = p.cpu_parent
        if p is None:
            top.append(e)
    top.sort(key=lambda e: e.time_range.start)
    gaps, aten, prev = [], [], t0
    for e in top:
        gaps.append(e.time_range.start - prev)
        aten.append(e.time_range.end - e.time_range.start)
        prev = e.time_range.end
    gaps.append(t1 - prev)
    return gaps, aten, tuple(e.name for e in top), n_aten


def _profiler_overhead_us(reps: int = 5, n: int = 2000) -> float:
    """What the profiler adds per tiny aten op (median of ``reps`` loops of ``n`` ops, with minus without)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    t = torch.ones(1)
    off, on = [], []
    for _ in range(reps):
        c0 = time.thread_time()
        for _ in range(n):
            torch.neg(t)
        off.append(time.thread_time() - c0)
        with profile(activities=[ProfilerActivity.CPU]):
            c0 = time.thread_time()
            for _ in range(n):
                torch.neg(t)
            on.append(time.thread_time() - c0)
    return max(0.0, 1e6 * (statistics.median(on) - statistics.median(off)) / n)


def _profiled(fn, iters: int, ctx=contextlib.nullcontext):
    """Host gaps and aten intervals of ``iters`` profiled calls, summed per-position medians."""
    from torch.profiler import ProfilerActivity, profile, record_function
    gaps, aten, seqs, n_all, wall = [], [], [], [], []
    for _ in range(iters):
        with ctx(), profile(activities=[ProfilerActivity.CPU]) as prof:
            w0 = time.perf_counter()
            with record_function(MARK):
                fn()
            wall.append(time.perf_counter() - w0)
        g, a, names, n = _split_call(prof)
        gaps.append(g)
        aten.append(a)
        seqs.append(names)
        n_all.append(n)
    aligned = all(s == seqs[0] for s in seqs)
    if aligned:  # per program point: a preempted gap is an outlier in its own column
        host = sum(statistics.median(col) for col in zip(*gaps))
        aten_us = sum(statistics.median(col) for col in zip(*aten))
    else:
        host = statistics.median(sum(g) for g in gaps)
        aten_us = statistics.median(sum(a) for a in aten)
    return dict(host=host, aten=aten_us, per_call_sum=statistics.median(sum(g) for g in gaps),
                wall=1e6 * statistics.median(wall), n_top=len(seqs[0]), n_all=n_all[0], aligned=aligned,
                gaps=[statistics.median(col) for col in zip(*gaps)] if aligned else None, names=seqs[0])


def measure_model_round(cases: dict, launches: list, iters: int, host_iters: int) -> dict:
    """One round per case: ``iters`` plain calls (wall, thread CPU), ``iters`` profiled calls (aten time, host
    with real compute) and ``host_iters`` profiled calls with the aten computation elided (host)."""
    out = {}
    for name, fn in cases.items():
        wall, cpu = [], []
        for _ in range(iters):
            w0, c0 = time.perf_counter(), time.thread_time()
            fn()
            cpu.append(time.thread_time() - c0)
            wall.append(time.perf_counter() - w0)
        full = _profiled(fn, iters)
        mode = elide_compute_mode()
        with mode:  # fill the mode's pool
            fn()
        elided = _profiled(fn, host_iters, lambda: mode)
        launches.clear()
        fn()
        out[name] = dict(host_us=elided["host"], host_us_per_call_sum_median=elided["per_call_sum"],
                         elided_wall_us=elided["wall"], elided_aten_us=elided["aten"],
                         host_us_real_compute=full["host"], aten_us=full["aten"],
                         wall_us=1e6 * statistics.median(wall), thread_cpu_us=1e6 * statistics.median(cpu),
                         profiled_wall_us=full["wall"], aten_ops_per_call=full["n_top"],
                         aten_events_per_call=full["n_all"], triton_launches_per_call=len(launches),
                         same_aten_ops_elided=elided["names"] == full["names"],
                         aligned=full["aligned"] and elided["aligned"], iters=iters, host_iters=host_iters,
                         top_gaps=_top_gaps(elided))
    return out


def _top_gaps(res: dict, k: int = 8) -> list:
    """The ``k`` largest host gaps (median us) with the aten ops around them."""
    if res["gaps"] is None:
        return []
    names = ("START",) + tuple(res["names"]) + ("END",)
    idx = sorted(range(len(res["gaps"])), key=lambda i: -res["gaps"][i])[:k]
    return [dict(us=res["gaps"][i], after=names[i], before=names[i + 1], position=i) for i in idx]


def worker(args) -> dict:
    """Measure the model cases of the code at ``args.repo`` (this process imports mtlface_fast from there)."""
    repo = os.path.abspath(args.repo or REPO)
    sys.path.insert(0, repo)
    import torch
    torch.set_num_threads(1)
    launches = stub_kernels()
    import mtlface_fast
    if not os.path.abspath(mtlface_fast.__file__).startswith(repo + os.sep):
        raise RuntimeError(f"mtlface_fast imported from {mtlface_fast.__file__}, not from {repo}")
    from mtlface_fast import use_backend
    load_before = os.getloadavg()
    rounds = []
    with use_backend("triton"), torch.no_grad():
        cases = _model_cases(args.cases or MODEL_CASES)
        for fn in cases.values():  # build the cached operands
            fn()
            fn()
        overhead = _profiler_overhead_us()
        for _ in range(args.rounds):
            rounds.append(measure_model_round(cases, launches, args.iters, args.host_iters))
    return dict(repo=repo, git_commit=git_commit(repo), git_dirty=git_dirty(repo), versions=versions(),
                loadavg_before=load_before, loadavg_after=os.getloadavg(),
                profiler_overhead_us_per_aten_op=overhead, rounds=rounds)


def _summary(rounds: list, case: str) -> dict:
    rows = [r[case] for r in rounds]
    host = sorted(r["host_us"] for r in rows)
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    return dict(host_us_median=statistics.median(host), host_us_round_min=host[0], host_us_round_max=host[-1],
                host_us_per_call_sum_median=med("host_us_per_call_sum_median"),
                host_us_real_compute_median=med("host_us_real_compute"), aten_us_median=med("aten_us"),
                wall_us_median=med("wall_us"), thread_cpu_us_median=med("thread_cpu_us"),
                profiled_wall_us_median=med("profiled_wall_us"), elided_wall_us_median=med("elided_wall_us"),
                aten_ops_per_call=rows[0]["aten_ops_per_call"], aten_events_per_call=rows[0]["aten_events_per_call"],
                triton_launches_per_call=rows[0]["triton_launches_per_call"],
                same_aten_ops_elided=all(r["same_aten_ops_elided"] for r in rows),
                aligned=all(r["aligned"] for r in rows), rounds=len(rows), iters_per_round=rows[0]["iters"],
                host_iters_per_round=rows[0]["host_iters"])


SETUP = dict(backbone="ir50", input_size=112, age_group=7, batch=1, dtype="fp32", shape=[1, 3, 112, 112],
             synthesize_target_group=3, seed=0, backend="triton (launches stubbed)", torch_threads=1,
             mode="eval, torch.no_grad()")


def run_model(args) -> None:
    res = worker(args)
    cases = list(res["rounds"][0])
    summary = {c: _summary(res["rounds"], c) for c in cases}
    for c in cases:
        s = summary[c]
        print(f"{c:17s} host {s['host_us_median']:9.1f} us ({s['host_us_round_min']:.1f}..{s['host_us_round_max']:.1f})"
              f"  aten {s['aten_us_median']:9.1f} us  wall {s['wall_us_median']:9.1f} us  "
              f"aten ops {s['aten_ops_per_call']}  launches {s['triton_launches_per_call']}  "
              f"host with compute {s['host_us_real_compute_median']:.1f} us")
    print(f"load average (1 min) before {res['loadavg_before'][0]:.2f}, after {res['loadavg_after'][0]:.2f}")
    if args.worker_json:
        with open(args.worker_json, "w") as fh:
            json.dump(res, fh)
        return
    out = _write(f"host-time-model-{_stamp()}.json",
                 dict(suite="model", setup=SETUP, environment=res["versions"], measured=dict(
                     git_commit=res["git_commit"], git_dirty=res["git_dirty"], repo=res["repo"]),
                      loadavg_before=res["loadavg_before"], loadavg_after=res["loadavg_after"],
                      profiler_overhead_us_per_aten_op=res["profiler_overhead_us_per_aten_op"],
                      results=summary, raw_rounds=res["rounds"]))
    print("wrote", out)


def run_compare(args) -> None:
    """Alternate worker subprocesses old/new for ``--rounds`` rounds; before/after per model case."""
    versions_ = {"before": os.path.abspath(args.compare), "after": os.path.abspath(args.repo or REPO)}
    load = [os.getloadavg()]
    got = {k: [] for k in versions_}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = ("before", "after") if r % 2 == 0 else ("after", "before")
            for which in order:
                path = os.path.join(tmp, f"{which}-{r}.json")
                cmd = [sys.executable, os.path.abspath(__file__), "--suite", "model", "--repo", versions_[which],
                       "--rounds", "1", "--iters", str(args.iters), "--host-iters", str(args.host_iters),
                       "--worker-json", path]
                if args.cases:
                    cmd += ["--cases", ",".join(args.cases)]
                print(f"round {r + 1}/{args.rounds} {which}: {versions_[which]}", flush=True)
                subprocess.run(cmd, check=True)
                with open(path) as fh:
                    got[which].append(json.load(fh))
                load.append(os.getloadavg())
    cases = list(got["after"][0]["rounds"][0])
    results = {}
    for c in cases:
        row = {}
        for which in versions_:
            row[which] = _summary([w["rounds"][0] for w in got[which]], c)
        ratio = row["after"]["host_us_median"] / row["before"]["host_us_median"]
        ratios = sorted(a["rounds"][0][c]["host_us"] / b["rounds"][0][c]["host_us"]
                        for a, b in zip(got["after"], got["before"]))
        row.update(ratio_after_before=ratio, ratio_per_round_min=ratios[0], ratio_per_round_max=ratios[-1],
                   target_ratio=MODEL_TARGET_RATIO, meets_target=ratio <= MODEL_TARGET_RATIO)
        results[c] = row
        b, a = row["before"], row["after"]
        print(f"{c:17s} host before {b['host_us_median']:9.1f} us  after {a['host_us_median']:9.1f} us  "
              f"after/before {ratio:.3f} (rounds {ratios[0]:.3f}..{ratios[-1]:.3f})  "
              f"{'meets' if row['meets_target'] else 'MISSES'} <= {MODEL_TARGET_RATIO}")
    ones = [x[0] for x in load]
    print(f"load average (1 min) {min(ones):.2f}..{max(ones):.2f} over the run, cores {os.cpu_count()}")
    payload = dict(
        suite="model-compare", setup=SETUP, environment=got["after"][0]["versions"],
        versions={k: dict(repo=v, git_commit=got[k][0]["git_commit"], git_dirty=got[k][0]["git_dirty"])
                  for k, v in versions_.items()},
        rounds=args.rounds, iters_per_round=args.iters, host_iters_per_round=args.host_iters, loadavg_samples=load,
        profiler_overhead_us_per_aten_op={k: [w["profiler_overhead_us_per_aten_op"] for w in got[k]]
                                          for k in versions_},
        results=results, raw={k: [w["rounds"][0] for w in got[k]] for k in versions_},
        worker_loadavg={k: [(w["loadavg_before"], w["loadavg_after"]) for w in got[k]] for k in versions_})
    print("wrote", _write(f"host-time-model-{_stamp()}.json", payload))


# -- breakdown -------------------------------------------------------------------------------------------
def run_breakdown(args) -> None:
    """Where the host time of the model cases goes: ``--iters`` calls per case under cProfile (thread CPU clock)
    with the aten computation elided as in the host run; rows are functions of the measured checkout and of
    ``torch.nn`` (module call overhead), by own time per call, the mode's and the meta inference's frames
    (inside aten events, not host) left out."""
    import cProfile
    import pstats
    repo = os.path.abspath(args.repo or REPO)
    sys.path.insert(0, repo)
    import torch
    torch.set_num_threads(1)
    stub_kernels()
    from mtlface_fast import use_backend
    nn_dir = os.path.join(os.path.dirname(torch.__file__), "nn")
    report = {}
    with use_backend("triton"), torch.no_grad():
        cases = _model_cases(args.cases or MODEL_CASES)
        for name, fn in cases.items():
            fn()
            mode = elide_compute_mode()
            with mode:
                fn()
                pr = cProfile.Profile(time.thread_time)
                pr.enable()
                for _ in range(args.iters):
                    fn()
                pr.disable()
            rows, total = [], 0.0
            for (file, line, func), (cc, nc, tt, ct, _) in pstats.Stats(pr).stats.items():
                ours = file.startswith(repo + os.sep) and os.path.basename(file) != "host_time.py"
                if ours or file.startswith(nn_dir):
                    where = os.path.relpath(file, repo if ours else os.path.dirname(nn_dir))
                    rows.append((tt / args.iters, ct / args.iters, nc // args.iters, f"{where}:{line}({func})"))
                    total += tt / args.iters
            rows.sort(reverse=True)
            print(f"== {name} ({git_commit(repo)[:9]}): own / cumulative us per call (thread CPU, under cProfile), "
                  f"calls per call; own time of these functions {1e6 * total:.0f} us")
            for tt, ct, nc, where in rows[:args.top]:
                print(f"{1e6 * tt:9.1f} {1e6 * ct:10.1f} {nc:6d}  {where}")
            report[name] = dict(own_us_total=1e6 * total, rows=[
                dict(own_us=1e6 * tt, cumulative_us=1e6 * ct, calls=nc, function=where)
                for tt, ct, nc, where in rows[:args.top]])
    out = _write(f"host-time-breakdown-{git_commit(repo)[:7]}-{_stamp()}.json",
                 dict(suite="breakdown", setup=SETUP, environment=versions(), git_commit=git_commit(repo),
                      repo=repo, iters=args.iters, loadavg=os.getloadavg(),
                      note="cProfile (thread CPU clock) own time per call of the measured checkout's functions and "
                           "torch.nn's, with the aten computation elided; cProfile inflates every figure",
                      results=report))
    print("wrote", out)


def _stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def _write(name: str, payload: dict) -> str:
    os.makedirs(results_dir(), exist_ok=True)
    out = os.path.join(results_dir(), name)
    with open(out, "w") as fh:
        json.dump(payload, fh, indent=2)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", choices=("layers", "model", "breakdown"), default="layers",
                    help="layers: fused AFD/ICM (default); model: whole public calls; breakdown: cProfile of "
                         "the model calls")
    ap.add_argument("--cases", type=lambda s: [c for c in s.split(",") if c], default=None,
                    help=f"comma-separated subset of {','.join(LAYER_CASES)} (layers) or {','.join(MODEL_CASES)}")
    ap.add_argument("--batch", type=int, default=4, help="layer suite batch (the model suite is B=1)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default: 20 layers, 3 model/compare)")
    ap.add_argument("--iters", type=int, default=None, help="calls per case per round (default: 50 layers, "
                                                            "2 model/compare: plain and profiled with compute)")
    ap.add_argument("--host-iters", type=int, default=12,
                    help="model suite: profiled calls per case per round with the aten computation elided")
    ap.add_argument("--repo", default=None, help="checkout whose mtlface_fast is measured (model suite; default: "
                                                 "this one); with --compare, the 'after' version")
    ap.add_argument("--compare", metavar="OLD_CHECKOUT", default=None,
                    help="model suite before (OLD_CHECKOUT) vs after (--repo or this checkout), alternating "
                         "subprocesses per round")
    ap.add_argument("--top", type=int, default=25, help="breakdown: rows per case")
    ap.add_argument("--worker-json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    layers = args.suite == "layers" and not args.compare
    args.rounds = args.rounds or (20 if layers else 3)
    args.iters = args.iters or (50 if layers else 2)
    if args.cases:
        valid = LAYER_CASES if layers else MODEL_CASES
        bad = [c for c in args.cases if c not in valid]
        if bad:
            ap.error(f"unknown case(s) {bad}; choose from {','.join(valid)}")
    if args.compare:
        run_compare(args)
    elif args.suite == "model":
        run_model(args)
    elif args.suite == "breakdown":
        run_breakdown(args)
    else:
        import torch
        torch.set_num_threads(1)
        run_layers(args)


if __name__ == "__main__":
    main()
