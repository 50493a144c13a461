"""bench/host_time.py runs: --help, and a one-call layer run writes its JSON with the fields the README reads.
(No timing is judged here; the script patches Triton and torch globals, so it runs in a subprocess.)"""
import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "host_time.py")


def _run(args, env=None, timeout=300):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_help_lists_the_model_options():
    res = _run(["--help"], timeout=120)
    assert res.returncode == 0, res.stderr
    for option in ("--suite", "--compare", "--repo", "--host-iters", "--cases"):
        assert option in res.stdout


def test_unknown_case_is_a_usage_error():
    res = _run(["--cases", "afd-nope"], timeout=120)
    assert res.returncode == 2 and "unknown case" in res.stderr


def test_tiny_layer_run_writes_json(tmp_path):
    pytest.importorskip("triton")
    env = dict(os.environ, MTLFACE_FAST_RESULTS_DIR=str(tmp_path))
    res = _run(["--cases", "afd-cvpr", "--iters", "1", "--rounds", "1"], env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].startswith("host-time-") and files[0].endswith(".json"), files
    payload = json.load(open(tmp_path / files[0]))
    assert payload["suite"] == "layers" and payload["environment"]["git_commit"]
    assert len(payload["loadavg_before"]) == 3
    (row,) = payload["results"]
    assert row["case"] == "afd-cvpr" and row["triton_launches_per_call"] >= 1
    assert row["host_us_median"] > 0 and row["round_median_us_min"] <= row["round_median_us_max"]
