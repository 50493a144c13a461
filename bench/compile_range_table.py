"""Per-kernel table of ``bench/compile_range.py --dump DIR`` folders, one column per triton release.

    python bench/compile_range_table.py --specs afd_eval,afd_train,icm_eval 3.9=/tmp/cr39 3.6=/tmp/cr36

For each SPEC and kernel: compiled specializations x autotune configs, registers (min-max, from
``cuobjdump -res-usage`` of each cubin), how many spill (local-memory STL/LDL instructions in the SASS) and how
many use HGMMA (wgmma) / HMMA (mma.sync). Reads the files gpu_proxy.py left; compiles nothing.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import subprocess


def main(argv=None) -> int:
    import triton
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dumps", nargs="+", help="LABEL=DIR: a --dump folder of compile_range.py")
    p.add_argument("--specs", required=True, help="comma-separated SPEC names (sub-folders of each dump)")
    a = p.parse_args(argv)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    dumps = [d.split("=", 1) for d in a.dumps]
    rows = collections.OrderedDict()
    for spec in a.specs.split(","):
        for label, folder in dumps:
            for f in sorted(glob.glob(os.path.join(folder, spec, "*.cubin"))):
                kernel = re.sub(r"^\d+_", "", os.path.basename(f)[:-len(".cubin")])
                res = subprocess.run([cuobjdump, "-res-usage", f], capture_output=True, text=True, check=True).stdout
                with open(f[:-len(".cubin")] + ".sass") as fh:
                    sass = fh.read()
                r = rows.setdefault((spec, kernel), {}).setdefault(label, dict(n=0, regs=[], spill=0, hgmma=0, hmma=0))
                r["n"] += 1
                r["regs"].append(int(re.search(r"REG:(\d+)", res).group(1)))
                r["spill"] += bool(re.search(r"\b(?:STL|LDL)\b", sass))
                r["hgmma"] += bool(re.search(r"\bHGMMA\b", sass))
                r["hmma"] += bool(re.search(r"\bHMMA\b", sass)) and not re.search(r"\bHGMMA\b", sass)
    print("| SPEC | kernel | " + " | ".join(f"triton {lb}: configs, regs, spilling, HGMMA / HMMA" for lb, _ in dumps)
          + " |")
    print("|---|---|" + "---|" * len(dumps))
    for (spec, kernel), d in rows.items():
        cells = [f"{r['n']}, {min(r['regs'])}-{max(r['regs'])}, {r['spill']}, {r['hgmma']} / {r['hmma']}"
                 if (r := d.get(lb)) else "-" for lb, _ in dumps]
        print(f"| {spec} | `{kernel}` | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
