"""Static per-element instruction estimate of a kernel's SASS (as dumped by gpu_proxy.py sass).

    python bench/sass_loops.py OUT/NN_kernel.sass --threads 128 --elements 3136 --trips 2

Counts the non-NOP instructions outside and inside each loop (a backward branch delimits one), and
prints ``(outside + inside * trips) * threads / elements``: thread-instructions per element of x of one
program that runs each loop ``trips`` times over ``elements`` elements. Nested loops are not modelled
(the AFD kernels have at most one loop over x).
"""
from __future__ import annotations

import argparse
import re

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def parse(path):
    out = []
    for line in open(path):
        m = _LINE.search(line)
        if m:
            op = m.group(2).strip()
            out.append((int(m.group(1), 16), op))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sass")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--elements", type=int, required=True, help="elements of x one program reads")
    ap.add_argument("--trips", type=int, nargs="+", default=[1],
                    help="iterations per program of each loop, in code order (the last repeats)")
    a = ap.parse_args()
    ins = [(addr, op) for addr, op in parse(a.sass) if not op.startswith("NOP")]
    loops = []
    for addr, op in ins:
        m = re.search(r"\bBRA\s+(?:`\()?0x([0-9a-f]+)", op)
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    sizes = [sum(1 for addr, _ in ins if lo <= addr <= hi) for lo, hi in loops]
    outside = len(ins) - sum(sizes)
    trips = [a.trips[min(i, len(a.trips) - 1)] for i in range(len(loops))]
    dynamic = outside + sum(n * t for n, t in zip(sizes, trips))
    per = dynamic * a.threads / a.elements
    print(f"{a.sass.split('/')[-1]}: {len(ins)} instructions, {outside} outside loops, loops of {sizes} run "
          f"{trips} times: {dynamic} per thread x {a.threads} threads / {a.elements} elements = {per:.1f} per element")


if __name__ == "__main__":
    main()
