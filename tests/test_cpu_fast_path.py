"""The CPU fast path and compiled calls, both architectures (the CVPR model and a TPAMI release-layout file).

* oneDNN packed convolutions (trunk units, CVPR decoder steps): taken by default for fp32 inference on CPU,
  never where they would not compute what the PyTorch path computes (gradients, autocast, float64, training,
  ``channels_last=False``); packed once per weights version; within the fp32 rule against the float64 truth.
* ``model.compile()``: one graph per entry point (fullgraph), no BatchNorm fold inside it (the folded operands
  are prepared once per weights version, outside the graph), no recompilation when the weights change, and never
  a stale answer.
"""
import copy

import pytest
import torch

import mtlface_fast
from mtlface_fast import reference
from mtlface_fast.layers import onednn
from mtlface_fast.layers.decoder import FastUpsample
from mtlface_fast.layers.trunk import FastBottleneckIR
from tests.test_one_model import loaded  # noqa: F401  (the fixture: both architectures, TPAMI from a release file)
from tests.tpami_utils import randomize_tpami_
from tests.utils import assert_close, check_low_precision, randomize_

ARCHS = ("cvpr", "tpami")

pytestmark = pytest.mark.skipif(not onednn.AVAILABLE, reason="this torch build has no oneDNN (mkldnn) CPU backend")


def _x(b=3, seed=2):
    return torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _outputs(model, x, groups):
    return dict(embedding=model.encode(x).embedding, synthesize=model.synthesize(x, groups))


@pytest.fixture
def packed_calls(monkeypatch):
    """Counts the packed convolutions that run."""
    calls = []
    original = onednn.PackedConv.__call__

    def counted(self, x, other=None):
        calls.append(other is not None)
        return original(self, x, other)

    monkeypatch.setattr(onednn.PackedConv, "__call__", counted)
    return calls


def _rel(out, truth):
    o, t = out.double().flatten(1), truth.double().flatten(1)
    return ((o - t).norm(dim=1) / t.norm(dim=1)).median().item()


# -- packed convolutions -----------------------------------------------------------------------------------------

def test_packed_path_runs_by_default_and_matches_the_reference(loaded, packed_calls):
    """Default eval inference on CPU takes the packed convolutions (residual adds fused) and equals the
    reference within the fp32 tolerance."""
    arch, fast, ref = loaded
    x, groups = _x(), torch.tensor([0, 3, 6])
    with torch.no_grad():
        got = _outputs(fast, x, groups)
        assert packed_calls and any(packed_calls), "the packed convolutions (with fused adds) did not run"
        want = _outputs(ref, x, groups)
    for k in want:
        assert_close(got[k], want[k], name=f"{arch} {k}")


@pytest.mark.parametrize("arch", ARCHS)
def test_default_cpu_path_within_the_fp32_rule_at_full_size(arch, packed_calls):
    """IR-50 at 112 px (the released models' size), randomized weights: the default path's error against the
    float64 truth (median sample) is within 2x the larger of the reference's eager errors in NCHW and in
    channels_last (the layout of torch.compile(reference)'s CPU convolutions; the compiled reference's own
    error is in bench/results/cpu-peers-*.json). Outputs: the embedding, the expected age, a synthesized image."""
    src = (randomize_tpami_(reference.MTLFace(arch="tpami"), seed=3) if arch == "tpami"
           else randomize_(reference.MTLFace(), seed=3)).eval()
    fast = mtlface_fast.MTLFace(arch=arch).eval()
    fast.load_state_dict(src.state_dict())
    ref_cl = copy.deepcopy(src)
    ref_cl.channels_last = True
    truth_model = copy.deepcopy(src).double()
    x = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(1)) * 2 - 1
    groups = torch.tensor([1, 5])
    calls = dict(embedding=lambda m, x: m.encode(x).embedding, age=lambda m, x: m.encode(x).age[:, None],
                 synthesize=lambda m, x: m.synthesize(x, groups))
    with torch.no_grad():
        for name, call in calls.items():
            truth = call(truth_model, x.double())
            got = _rel(call(fast, x), truth)
            budget = 2 * max(_rel(call(src, x), truth), _rel(call(ref_cl, x), truth))
            print(f"{arch} {name}: {got:.2e} (budget {budget:.2e})")
            assert got <= budget, f"{arch} {name}: {got:.2e} > 2x the reference's {budget / 2:.2e}"
    assert packed_calls


def test_cvpr_decoder_steps_are_packed(loaded, packed_calls):
    arch, fast, _ = loaded
    if arch != "cvpr":
        pytest.skip("the TPAMI decoder is StyleGAN2 (its own fast layers)")
    assert all(isinstance(getattr(fast.generator, f"up_{i}"), FastUpsample) for i in range(1, 5))
    with torch.no_grad():
        fast.encode(_x())
        n_encode = len(packed_calls)
        fast.synthesize(_x(), 2)
    # every decoder step: 1x1 shortcut + two conv pairs = 5 packed convolutions
    assert len(packed_calls) - n_encode >= n_encode + 4 * 5


@pytest.mark.parametrize("case", ["channels_last=False", "grad", "bf16", "float64", "train"])
def test_packed_path_is_not_taken_where_it_would_differ(loaded, packed_calls, case):
    """Where the packed path would not compute what the PyTorch path computes, it is not taken; results still
    equal the reference's."""
    arch, fast, ref = loaded
    model, oracle = copy.deepcopy(fast), copy.deepcopy(ref)
    x = _x(b=2)
    if case == "channels_last=False":
        model.channels_last = False
    elif case == "float64":
        model, oracle, x = model.double(), oracle.double(), x.double()
    elif case == "train":
        model.train()
        oracle.train()
    if case == "grad":
        got, want = model.encode(x).embedding, oracle.encode(x).embedding
        got.sum().backward()
        assert model.backbone.input_layer[0].weight.grad is not None
    elif case == "bf16":
        with torch.no_grad():
            got, want = model.encode(x, dtype="bf16").embedding, oracle.encode(x, dtype="bf16").embedding
            want32 = oracle.encode(x).embedding
    else:
        with torch.no_grad():
            got, want = model.encode(x).embedding, oracle.encode(x).embedding
            if case != "train":  # the decoder too (CVPR: its steps are packed layers)
                assert_close(model.synthesize(x, 4), oracle.synthesize(x, 4), dtype=got.dtype,
                             name=f"{arch} {case} synthesize")
    assert packed_calls == [], f"{case}: the packed path ran"
    if case == "bf16":
        check_low_precision(got, want32, want, torch.bfloat16, f"{arch} {case}")
    elif case != "train":  # (training: dropout draws differ between the two models' calls)
        assert_close(got, want, dtype=got.dtype, name=f"{arch} {case}")


def test_weights_are_packed_once_per_weights_version(loaded):
    arch, fast, ref = loaded
    model = copy.deepcopy(fast)
    unit = next(m for m in model.modules() if isinstance(m, FastBottleneckIR))
    with torch.no_grad():
        model.encode(_x())
        first = unit._packed
        model.encode(_x(seed=3))
        assert unit._packed is first, "packed again without a weights change"
        assert first[0] == unit.weights_version()
        state = {k: v * 1.01 if v.is_floating_point() and "running_var" in k else v
                 for k, v in model.state_dict().items()}
        model.load_state_dict(state)
        oracle = copy.deepcopy(ref)
        oracle.load_state_dict(state)
        got = model.encode(_x()).embedding
        assert unit._packed is not first
        assert_close(got, oracle.encode(_x()).embedding, name=f"{arch} after load_state_dict")


# -- compiled calls ----------------------------------------------------------------------------------------------

class GraphRecorder:
    """A dynamo backend that keeps every graph it is given and runs it eagerly."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def fold_ops(self):
        """Graph nodes that read a BatchNorm's running variance other than a batch_norm call: the folds (a
        BatchNorm folded into a convolution scales its weight by gamma / sqrt(running_var + eps))."""
        count = 0
        for gm in self.graphs:
            for node in gm.graph.nodes:
                if node.op in ("placeholder", "get_attr") and "running_var" in node.name:
                    count += sum(1 for user in node.users if "batch_norm" not in str(user.target))
        return count


def test_compiled_calls_read_folds_prepared_outside_the_graph(loaded):
    arch, fast, ref = loaded
    torch.compiler.reset()
    x = _x(b=2)
    # a plain torch.compile of the eager method folds inside its graph (what the check below detects)
    plain = GraphRecorder()
    with torch.no_grad():
        torch.compile(copy.deepcopy(fast).encode, backend=plain, fullgraph=True)(x)
    assert plain.fold_ops() > 0
    model, rec = copy.deepcopy(fast), GraphRecorder()
    model.compile(backend=rec)
    with torch.no_grad():
        got = _outputs(model, x, 3)
        want = _outputs(ref, x, 3)
    for k in want:
        assert_close(got[k], want[k], name=f"{arch} compiled {k}")
    assert len(rec.graphs) == 2, f"{len(rec.graphs)} graphs for two entry points (graph breaks or recompiles)"
    assert rec.fold_ops() == 0, f"{arch}: {rec.fold_ops()} BatchNorm folds inside the compiled graphs"


def test_compiled_calls_follow_weight_changes_without_recompiling(loaded):
    arch, fast, ref = loaded
    torch.compiler.reset()
    model, oracle, rec = copy.deepcopy(fast), copy.deepcopy(ref), GraphRecorder()
    model.compile(backend=rec)
    x = _x(b=2)

    def check(what):
        oracle.load_state_dict(model.state_dict())
        with torch.no_grad():
            got, want = _outputs(model, x, 5), _outputs(oracle, x, 5)
        for k in want:
            assert_close(got[k], want[k], name=f"{arch} compiled, {what}: {k}")

    check("first call")
    n = len(rec.graphs)
    state = {k: v * 1.02 if v.is_floating_point() and ("running_var" in k or "weight" in k) else v
             for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    check("load_state_dict")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    type(model).encode(model, x).embedding.tanh().mean().backward()  # eager, eval mode
    opt.step()
    check("optimizer step")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.add_(0.05)
    model.weights_changed()
    check("edit by hand + weights_changed()")
    assert len(rec.graphs) == n, f"{arch}: weight changes recompiled ({len(rec.graphs) - n} new graphs)"


@pytest.mark.parametrize("mode", [None, "reduce-overhead"], ids=["default", "reduce-overhead"])
def test_inductor_compile_modes_on_cpu(loaded, mode):
    """Both compile modes build one Inductor graph for ``forward`` on CPU (reduce-overhead's CUDA graphs do not
    apply there) and match the reference."""
    arch, fast, ref = loaded
    torch.compiler.reset()
    model = copy.deepcopy(fast).compile(**({} if mode is None else {"mode": mode}))
    x = _x(b=2)
    with torch.no_grad():
        assert_close(model(x), ref(x), name=f"{arch} inductor {mode or 'default'}")
