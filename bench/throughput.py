"""Whole-model throughput of mtlface_fast vs the reference; see ``mtlface_fast/throughput.py``.

CPU (default: batch 1; 21.5 s on an idle 2-core machine, 146 s under a load average of 5-6):
    python bench/throughput.py
Results: bench/results in a checkout (--out to choose; ./bench_results when run from an install).
GPU:  python bench/throughput.py --device cuda --batch 1,64,256 --dtype bf16
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtlface_fast.throughput import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
