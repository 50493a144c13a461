"""Benchmark plumbing, shared with the installed package (``mtlface_fast.benchmark``)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtlface_fast.benchmark import RESULTS_DIR, environment, git_commit, time_fn, write_results  # noqa: E402,F401
