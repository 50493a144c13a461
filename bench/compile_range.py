"""Compile every Triton specialization of the public calls for sm_90 under the installed triton, no GPU needed.

    python bench/compile_range.py [--specs afd_eval,icm_train] [--out bench/results]

Runs ``../shared/tools/gpu_proxy.py sass bench.compile_specs:<SPEC>`` for each SPEC of bench/compile_specs.py (the
calls run on CPU with the launches recorded, then every launched specialization and every autotune config is
compiled for sm_90a by triton's own compiler and ptxas), parses its table and writes
``compile-range-triton<version>-<stamp>.json`` (rewritten after every SPEC): per SPEC and kernel the registers, spill bytes, shared memory,
CTAs/SM and tensor-core instructions (HGMMA = wgmma, HMMA = mma.sync), or the compile error. Run it once per
triton release, each in its own virtual environment (README_compile_range.md). Exit status 1 if any kernel
failed to compile or any SPEC failed to run.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mtlface_fast.benchmark import environment, results_path, write_results  # noqa: E402

COLS = "LDG STG LDGSTS UTMALDG HGMMA HMMA SHFL BAR LDL STL".split()
ROW = re.compile(r"^\s*(\d+) (\S+?)(\*?)\s+(\d+)\s+(\d+)\s+(-?\d+)\s+(-?\d+)\s+(-?\d+)/(-?\d+)\s+(\d+)\s+(\d+)\s+(\S+)"
                 r"\s+(\d+)%\s+(\S+)\s+(\d+)\s+" + r"\s+".join([r"(\d+)"] * len(COLS)) + r"\s*$")
FAILED = re.compile(r"^\s*(\d+) (\S+?)(\*?)\s+COMPILE FAILED: (.*)$")


def parse(text: str):
    rows = []
    for line in text.splitlines():
        m = ROW.match(line)
        if m:
            g = m.groups()
            rows.append(dict(kernel=g[1], launched=bool(g[2]), num_warps=int(g[3]), num_stages=int(g[4]),
                             regs=int(g[5]), stack=int(g[6]), spill_stores=int(g[7]), spill_loads=int(g[8]),
                             smem=int(g[9]), ctas_per_sm=int(g[10]), limiter=g[11], occupancy_pct=int(g[12]),
                             instructions=int(g[14]), **{c: int(v) for c, v in zip(COLS, g[15:])}))
            continue
        m = FAILED.match(line)
        if m:
            rows.append(dict(kernel=m.group(2), launched=bool(m.group(3)), error=m.group(4)))
    return rows


def summarize(rows):
    ok = [r for r in rows if "error" not in r]
    return dict(kernels=len(rows), failed=len(rows) - len(ok),
                max_regs=max((r["regs"] for r in ok), default=0),
                spilling=sum(1 for r in ok if r["spill_stores"] or r["spill_loads"] or r["LDL"] or r["STL"]),
                tensor_core_kernels=sum(1 for r in ok if r["HGMMA"] or r["HMMA"]),
                hgmma_kernels=sum(1 for r in ok if r["HGMMA"]))


def main(argv=None) -> int:
    from compile_specs import ALL
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--specs", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}")
    p.add_argument("--proxy", default=os.path.join(ROOT, "..", "shared", "tools", "gpu_proxy.py"))
    p.add_argument("--jobs", type=int, default=2, help="parallel compiles")
    p.add_argument("--dump", default=None, help="folder for the .ttgir/.ptx/.sass files (default: a temp dir)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per SPEC")
    a = p.parse_args(argv)
    import tempfile

    import triton
    dump = a.dump or tempfile.mkdtemp(prefix=f"compile-range-{triton.__version__}-")
    results, status = {}, 0
    path = results_path(f"compile-range-triton{triton.__version__}")
    payload = dict(kind="compile-range", target="sm_90a", environment=environment("cpu"),
                   triton=triton.__version__, specs=results)
    for spec in [s for s in a.specs.split(",") if s]:
        t0 = time.time()
        cmd = [sys.executable, a.proxy, "sass", f"bench.compile_specs:{spec}", "--out", os.path.join(dump, spec),
               "--jobs", str(a.jobs)]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=a.timeout,
                                  env=dict(os.environ, PYTHONPATH=ROOT))
            out, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            out, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
        rows = parse(out)
        entry = dict(rc=rc, seconds=round(time.time() - t0, 1), summary=summarize(rows), kernels=rows)
        if rc != 0 or not rows:
            entry["log_tail"] = out[-3000:]
            status = 1
        results[spec] = entry
        s = entry["summary"]
        print(f"{spec:10s} rc={rc} {s['kernels']:3d} kernels, {s['failed']} failed, max regs {s['max_regs']}, "
              f"{s['spilling']} spilling, {s['tensor_core_kernels']} with tensor-core instructions "
              f"({s['hgmma_kernels']} HGMMA), {entry['seconds']} s", flush=True)
        write_results(path, payload)  # after every SPEC: a run cut short keeps what it compiled
    print("wrote", path)
    return status


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
