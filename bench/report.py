"""Rebuild the results tables of bench/README.md from bench/results/*.json.

``python bench/report.py`` rewrites the part of bench/README.md between the ``results:begin`` and
``results:end`` markers: one table per JSON file (newest first within each benchmark), with the
device, versions and commit the file records. Every figure in the README therefore comes from a file
in bench/results/.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
# Columns never shown (quantiles stay in the JSON); preferred order for the rest.
HIDDEN = {"iters", "p20_ms", "p80_ms", "min_ms"}
FIRST = ("task", "op", "pass", "mode", "variant", "batch", "dtype", "shape", "median_ms", "images_per_s", "gbps")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return str(v).replace("|", "/")


KEEP_LEAVES = ("median_ms", "GBps", "fraction_of_clone_GBps")


def flatten(row: Dict, prefix: str = "") -> Dict:
    """Nested per-variant stats become ``forward.fused.median_ms``-style columns (medians, bandwidths and
    speed-ups only; quantiles stay in the JSON)."""
    out: Dict = {}
    for k, v in row.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif not prefix or k in KEEP_LEAVES or "speedup" in key:
            out[key] = v
    return out


def table(rows: List[Dict]) -> str:
    rows = [flatten(r) for r in rows]
    cols: List[str] = []
    for r in rows:
        for k in r:
            if k not in HIDDEN and k not in cols and not isinstance(r[k], dict):
                cols.append(k)
    cols.sort(key=lambda c: (FIRST.index(c) if c in FIRST else len(FIRST), c.startswith("speedup"), c))
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out)


def section(path: str) -> str:
    with open(path) as fh:
        data = json.load(fh)
    env = data.get("env") or data.get("environment") or {}
    settings = data.get("settings") or {k: v for k, v in data.items()
                                         if not isinstance(v, (dict, list)) or k in ("shape",)}
    title = f"### {data.get('benchmark') or 'kernels-' + str(data.get('op', '?'))} — {env.get('device', '?')}"
    if settings.get("dtype"):
        title += f", {settings['dtype']}"
    meta = (f"`{os.path.relpath(path, HERE)}` · torch {env.get('torch', '?')} · triton {env.get('triton', '?')}"
            f" · commit {env.get('git_commit', '?')}")
    if settings:
        meta += " · settings: " + ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(settings.items()))
    return f"{title}\n\n{meta}\n\n{table(data.get('results') or data.get('rows') or [])}\n"


def render(results_dir: str) -> str:
    paths = sorted(glob.glob(os.path.join(results_dir, "*.json")),
                   key=lambda p: (os.path.basename(p).rsplit("-", 1)[0], os.path.basename(p)), reverse=True)
    return "\n".join(section(p) for p in paths) or "_no results yet_\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    p.add_argument("--readme", default=os.path.join(HERE, "README.md"))
    args = p.parse_args(argv)
    with open(args.readme) as fh:
        text = fh.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{args.readme} lacks the {BEGIN} / {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(args.readme, "w") as fh:
        fh.write(head + BEGIN + "\n" + render(args.results) + END + tail)
    print("updated", args.readme)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
