"""bench/gpu_truth.sh --dry-run: every stage's harness on CPU at tiny sizes (kernels in the Triton interpreter),
so that the GPU truth run cannot rot between the rare runs on a GPU."""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_truth.sh")
TRUTH = os.path.join(ROOT, "bench", "gpu_truth.py")
STAGES = ("env", "parity", "sanitize", "ops", "model")
CASE_FIELDS = ("name", "shape", "dtype", "ok", "seconds")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("truth")
    env = dict(os.environ, PYTHON=sys.executable)
    # A hang guard only (the stages have their own limits in the script), not a timing check.
    proc = subprocess.run(["bash", SCRIPT, "--dry-run", str(out)], capture_output=True, text=True, env=env,
                          timeout=3600)
    files = sorted(p for p in os.listdir(out) if re.fullmatch(r"truth-dryrun-\d{8}T\d{6}Z\.json", p))
    assert len(files) == 1, f"expected one run file in {os.listdir(out)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    with open(os.path.join(out, files[0])) as fh:
        return proc, json.load(fh)


def test_every_stage_finishes_ok(dry_run):
    proc, data = dry_run
    assert data["dry_run"] is True
    status = {s: data["stages"].get(s, {}).get("status") for s in STAGES}
    assert status == {s: "ok" for s in STAGES}, f"{status}\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0
    assert data["environment"]["device"].startswith("cpu") and data["environment"]["torch"]


def test_every_case_has_the_fields(dry_run):
    _, data = dry_run
    for stage in STAGES:
        cases = data["stages"][stage]["cases"]
        assert cases, f"stage {stage} recorded no case"
        for c in cases:
            missing = [f for f in CASE_FIELDS if f not in c]
            assert not missing, f"{stage}: {c.get('name')} lacks {missing}"
            assert c["ok"] is True, f"{stage}: {c['name']} not ok: {c}"


def test_errors_within_tolerance(dry_run):
    _, data = dry_run
    checked = 0
    for stage in ("parity", "sanitize", "ops", "model"):
        for c in data["stages"][stage]["cases"]:
            for name, err in c.get("errors", {}).items():
                assert err <= c["tol"], f"{stage}: {c['name']} {name} error {err:.3e} > {c['tol']:.1e}"
                checked += 1
    assert checked >= 40


def test_parity_covers_every_op_both_architectures_and_dtypes(dry_run):
    _, data = dry_run
    names = {c["name"] for c in data["stages"]["parity"]["cases"]}
    for arch in ("cvpr", "tpami"):
        for dt in ("fp32", "bf16"):
            assert {f"afd {arch} eval fwd {dt}", f"afd {arch} train fwd+bwd {dt}", f"icm {arch} eval fwd {dt}"} <= names
        assert f"icm {arch} train fwd+bwd fp32" in names
    assert {"stylegan2 noise_bias_lrelu fwd+bwd fp32", "stylegan2 noise_bias_lrelu fwd+bwd bf16"} <= names
    for c in data["stages"]["parity"]["cases"]:
        assert c["errors"] and c["tol"] > 0


def test_benchmarks_time_every_variant(dry_run):
    _, data = dry_run
    ops = {c["name"]: c for c in data["stages"]["ops"]["cases"]}
    assert {"clone", "reference_eager", "fused"} <= set(ops["afd cvpr eval fwd bf16 B=4"]["variants"])
    assert {"fused", "reference_compile"} <= set(ops["afd cvpr eval fwd bf16 B=4 compiled"]["variants"])
    assert {"reference_eager", "fused"} <= set(ops["afd cvpr train fwd+bwd bf16 B=4"]["variants"])
    assert {"reference", "ours"} <= set(ops["icm cvpr eval fwd bf16 B=3"]["variants"])
    assert {"ours", "reference_compile"} <= set(ops["icm cvpr eval fwd bf16 B=3 compiled"]["variants"])
    models = {c["name"]: c for c in data["stages"]["model"]["cases"]}
    for arch in ("cvpr", "tpami"):
        for task in ("encode", "synthesize"):
            assert {"reference", "reference_autocast", "ours"} <= set(models[f"model {arch} {task} B=1"]["variants"])
    assert "reference_compile" in models["model cvpr encode B=1 compiled"]["variants"]
    models = list(models.values())
    for c in data["stages"]["ops"]["cases"] + models:
        for name, t in c["variants"].items():
            assert t.get("median_ms", 0) > 0, f"{c['name']} {name}: {t}"


def test_sanitize_stage_ran_the_small_calls_in_a_child(dry_run):
    _, data = dry_run
    cases = data["stages"]["sanitize"]["cases"]
    assert cases[-1]["rc"] == 0 and cases[-1]["sanitizer"] == "not found"
    assert sum(c["name"].startswith("sanitized ") for c in cases) >= 5


def test_gpu_stage_limits_fit_eight_minutes():
    text = open(SCRIPT).read()
    gpu = re.search(r"OUT=\$RES/truth-cuda-\$STAMP\.json\n\s*declare -A LIMIT=\(([^)]*)\)", text)
    limits = dict(re.findall(r"\[(\w+)\]=(\d+)", gpu.group(1)))
    assert set(limits) == set(STAGES)
    assert sum(int(v) for v in limits.values()) <= 480


def test_a_stage_cut_off_by_its_limit_is_marked(tmp_path):
    run = str(tmp_path / "run.json")
    py = [sys.executable, TRUTH]
    subprocess.run(py + ["init", "--out", run], check=True, capture_output=True)
    subprocess.run(py + ["close", "parity", "--out", run, "--rc", "124", "--limit", "80"], check=True,
                   capture_output=True)
    with open(run) as fh:
        assert json.load(fh)["stages"]["parity"]["status"] == "timeout"
    assert subprocess.run(py + ["check", "--out", run], capture_output=True).returncode == 1
