"""Whole-model throughput of mtlface_fast vs the reference; see ``mtlface_fast/throughput.py``.

CPU (default: batch 1, sized for 2 minutes on 2 idle cores):  python bench/throughput.py
GPU:  python bench/throughput.py --device cuda --batch 1,64,256 --dtype bf16
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtlface_fast.throughput import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
