"""bench/throughput.py on a tiny CPU config: every task and CPU variant runs, rows and ratios are complete,
the JSON and PNG are written, and the variants of a case are timed in interleaved rounds."""
import argparse
import json
import os

import pytest
import torch

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


def _tiny_args(tmp_path, **kw):
    base = dict(device="cpu", dtype="fp32", tasks="encode,synthesize", batch="1", variants="reference,ours",
                arch="cvpr", backbone="ir34", input_size=32, age_group=4, warmup=0, iters=1, seed=0,
                out=str(tmp_path), no_save=False)
    base.update(kw)
    return argparse.Namespace(**base)


def test_results_are_written_as_each_case_completes(tmp_path, monkeypatch, capsys):
    """The JSON is rewritten after every task and batch: an interrupted run keeps the cases it finished."""
    real = throughput.build_cases

    def interrupt_on_synthesize(task, *a, **k):
        if task == "synthesize":
            raise KeyboardInterrupt
        return real(task, *a, **k)

    monkeypatch.setattr(throughput, "build_cases", interrupt_on_synthesize)
    with pytest.raises(KeyboardInterrupt):
        throughput.execute(_tiny_args(tmp_path))
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".png"), files
    payload = json.load(open(tmp_path / files[0]))
    assert payload["complete"] is False and payload["cases_done"] == 2 and payload["cases_total"] == 4
    assert [(r["task"], r["variant"]) for r in payload["results"]] == [("encode", "reference"), ("encode", "ours")]
    assert all(r["median_ms"] > 0 for r in payload["results"])
    out = capsys.readouterr().out
    assert "encode" in out and "ours" in out  # the finished rows were printed as they completed


def test_progress_counts_every_call(tmp_path):
    updates = []
    payload = throughput.run(_tiny_args(tmp_path, tasks="encode", batch="1,2", warmup=1, iters=2),
                             on_update=lambda p: updates.append((p["complete"], p["cases_done"])))
    assert updates == [(False, 2), (False, 4)] and payload["complete"] is True
    calls = []
    benchmark.time_interleaved({"a": lambda: None, "b": lambda: None}, "cpu", iters=3, on_call=calls.append)
    assert calls == list("ab" "ba" "ab")


@pytest.mark.parametrize("flags", [["--iters", "0"], ["--batch", "0"], ["--batch=-4"], ["--batch", "2,-1"],
                                   ["--batch", "2,x"], ["--warmup", "-1"], ["--iters", "-3"]])
def test_bad_counts_are_usage_errors(flags, capsys):
    from mtlface_fast.cli import main

    for entry in (lambda: main(["bench", *flags]), lambda: throughput.main(flags)):
        with pytest.raises(SystemExit) as exit_:
            entry()
        assert exit_.value.code == 2
        assert "error: argument --" in capsys.readouterr().err


@pytest.mark.parametrize("field,value", [("iters", 0), ("batch", "0"), ("batch", "-2"), ("warmup", -1)])
def test_bad_counts_in_code_raise(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        throughput.run(_tiny_args(tmp_path, **{field: value}))
    with pytest.raises(ValueError, match="iters"):
        benchmark.time_interleaved({"a": lambda: None}, "cpu", iters=0)


def test_cpu_defaults_are_the_short_run(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(throughput, "run", lambda args, on_update=None: seen.update(vars(args)) or
                        {"results": [], "env": {"device": "cpu"}, "settings": {"dtype": "fp32"}})
    args = throughput.argparse.ArgumentParser()
    throughput.add_arguments(args)
    assert throughput.execute(args.parse_args(["--no-save"])) == 0
    assert (seen["batch"], seen["warmup"], seen["iters"]) == ([1], 1, 3)


def test_train_step_is_skipped_at_batch_1_and_error_rows_do_not_break_the_plot(tmp_path):
    payload = throughput.run(_tiny_args(tmp_path, tasks="encode,train_step", batch="1", variants="ours"))
    assert [(r["task"], r["batch"]) for r in payload["results"]] == [("encode", 1)]
    assert "train_step at batch 1" in payload["settings"]["skipped_variants"]
    payload["results"].append(dict(task="encode", batch=1, variant="reference", error="ValueError: x"))
    assert throughput.plot(payload, str(tmp_path / "p.png")).endswith("p.png")


@pytest.mark.parametrize("arch", ["cvpr", "tpami"])
def test_train_step_is_the_training_loops_step(arch):
    """The timed train_step is the training loop's AIFR step: from the same weights and batch, two benchmark
    steps and two steps of the recipe that ``mtlface-fast train aifr`` builds give the same losses and weights.
    The loop trains the CVPR model (build_model); the recipe runs the TPAMI model's recognition networks alike."""
    import copy

    from mtlface_fast import MTLFace
    from mtlface_fast.train.config import make_config
    from mtlface_fast.train.loop import build_model
    from mtlface_fast.train.recipes import build_recipe

    cfg = make_config("aifr", dict(data="unused.txt", backbone="ir34", input_size=32, age_group=4))
    if arch == "cvpr":
        model = build_model(cfg)
    else:
        torch.manual_seed(0)
        model = MTLFace(backbone="ir34", input_size=32, age_group=4, arch="tpami")
    timed = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)

    step = throughput.build_cases("train_step", "ours", {"ours": timed}, x, torch.float32, "cpu", 4)
    bench_logs = [step() for _ in range(2)]
    recipe = build_recipe(cfg, model, throughput.TRAIN_CLASSES, torch.device("cpu"))
    batch = throughput.train_batch(x)
    loop_logs = [recipe.step(batch, s) for s in range(2)]

    for b, l in zip(bench_logs, loop_logs):
        assert set(b) == set(l) and {"loss", "id_loss", "age_loss", "da_loss", "lr"} <= set(b), (b, l)
        assert all(b[k] == l[k] for k in b), (b, l)
    assert bench_logs[1]["loss"] != bench_logs[0]["loss"]  # the first step moved the weights
    moved = 0
    for k, v in model.state_dict().items():
        assert torch.equal(timed.state_dict()[k], v), k
        moved += not torch.equal(v, before[k])
    assert moved > 50, moved
