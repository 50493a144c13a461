"""bench/throughput.py on a tiny CPU config: every task and CPU variant runs, rows and ratios are complete,
the JSON and PNG are written, and the variants of a case are timed in interleaved rounds."""
import argparse
import json
import os

import pytest

from mtlface_fast import benchmark, throughput


def test_time_interleaved_rotates_the_order():
    calls = []
    fns = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    stats = benchmark.time_interleaved(fns, "cpu", iters=3)
    assert calls == list("abc" "bca" "cab")
    assert set(stats) == set("abc") and all(s["iters"] == 3 and s["median_ms"] >= 0 for s in stats.values())


def test_throughput_runs_every_cpu_task_and_writes_results(tmp_path):
    args = argparse.Namespace(device="cpu", dtype="fp32", tasks=",".join(throughput.TASKS), batch="2",
                              variants="reference,reference_autocast,reference_x7,ours", arch="cvpr",
                              backbone="ir34", input_size=32, age_group=4, warmup=1, iters=2, seed=0,
                              out=str(tmp_path), no_save=False)
    assert throughput.execute(args) == 0
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".png"), files
    payload = json.load(open(tmp_path / files[0]))
    rows = payload["results"]
    # reference_x7 only for synthesize_all: 4 tasks x 3 variants + 1
    assert len(rows) == 13 and not [r for r in rows if "error" in r], rows
    for r in rows:
        assert r["median_ms"] > 0 and r["iters"] == 2 and r["images_per_s"] > 0, r
        assert r["speedup_vs_reference"] == pytest.approx(
            next(o for o in rows if o["task"] == r["task"] and o["variant"] == "reference")["median_ms"]
            / r["median_ms"], rel=1e-2)
    sa = {r["variant"]: r for r in rows if r["task"] == "synthesize_all"}
    assert sa["ours"]["images_per_s"] == pytest.approx(2 * 4 / (sa["ours"]["median_ms"] / 1e3))
    assert "speedup_vs_reference_x7" in sa["ours"]
    assert payload["settings"]["iters"] == 2 and payload["env"]["device"].startswith("cpu")
