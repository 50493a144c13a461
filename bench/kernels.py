"""Per-op benchmarks: ``python bench/kernels.py --op afd`` / ``--op icm`` / ``--op stylegan2`` (see each op's module).

Each op lives in ``bench/kernels_<op>.py`` and exposes ``add_arguments(parser)`` and
``run(args) -> dict`` (the JSON payload); this script times them and writes bench/results/.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import write_results  # noqa: E402

OPS = ("afd", "icm", "trunk", "stylegan2")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--op", choices=OPS, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    args, rest = parser.parse_known_args(argv)
    module = importlib.import_module(f"kernels_{args.op}")
    sub = argparse.ArgumentParser(prog=f"kernels.py --op {args.op}")
    module.add_arguments(sub)
    sub_args = sub.parse_args(rest)
    sub_args.device = args.device
    payload = module.run(sub_args)
    if not args.no_save:
        tag = "cuda" if args.device.startswith("cuda") else "cpu"
        print("wrote", write_results(f"kernels-{args.op}-{tag}", payload))


if __name__ == "__main__":
    main()
