"""CUDA graphs per batch bucket (``MTLFace.cuda_graphs``): bucket choice, padding, slicing, chunking, cloned
outputs, invalidation on every weights-version event, errors, memory bookkeeping; both architectures.

On CPU the capture step is :class:`~mtlface_fast.cuda_graphs.EagerRecorder` (replay runs the method again on the
static buffers and writes into the static outputs, as a graph replay does); the real ``torch.cuda.CUDAGraph``
capture is tested where CUDA is available. Models: the CVPR model with randomized weights, and a checkpoint in
the TPAMI release layout (small configuration, randomized weights) loaded with ``from_official``.
"""
import copy

import pytest
import torch

import mtlface_fast
from mtlface_fast import reference
from mtlface_fast.cuda_graphs import CaptureKey, CaptureMemory, EagerRecorder, GraphedMTLFace, check_batch_sizes
from mtlface_fast.errors import UsageError
from mtlface_fast.reference.common import EncodeResult
from tests.tpami_utils import SMALL as TPAMI_SMALL
from tests.tpami_utils import randomize_tpami_
from tests.utils import TOLERANCES, assert_close, randomize_

CVPR_SMALL = dict(arch="cvpr", backbone="ir34", input_size=32, age_group=7)
ARCHS = ("cvpr", "tpami")
BUCKETS = (1, 2, 4)
RTOL = 1e-5  # eval-mode results are per sample: padding rows change the real rows by round-off at most


@pytest.fixture(scope="module", params=ARCHS)
def model(request, tmp_path_factory):
    """The fast model in eval mode: CVPR randomized, TPAMI loaded from a file in the release layout."""
    if request.param == "tpami":
        src = randomize_tpami_(reference.MTLFace(**TPAMI_SMALL), seed=7)
        path = str(tmp_path_factory.mktemp("release") / "mtlface_checkpoints.tar")
        torch.save(src.state_dict(), path)
        fast = mtlface_fast.MTLFace.from_official(path)
    else:
        fast = randomize_(mtlface_fast.MTLFace(**CVPR_SMALL), seed=7)
    return fast.eval()


def _x(b, seed=1):
    return torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _graphs(model, batch_sizes=BUCKETS, **kwargs):
    recorder = EagerRecorder()
    return model.cuda_graphs(batch_sizes, _recorder=recorder, **kwargs), recorder


def _same(got, want, name, rtol=RTOL):
    assert type(got) is type(want), f"{name}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, tuple):
        for field, g, w in zip(want._fields, got, want):
            assert_close(g, w, name=f"{name}.{field}", rtol=rtol)
    else:
        assert_close(got, want, name=name, rtol=rtol)


def _keys(graphs):
    return {(k.entry, k.batch) for k in graphs.captured()}


# -- results, buckets, padding ------------------------------------------------------------------------------------
def test_forward_and_encode_match_eager_in_their_buckets(model):
    graphs, rec = _graphs(model)
    assert isinstance(graphs, GraphedMTLFace) and graphs.batch_sizes == BUCKETS
    with torch.no_grad():
        for b in (1, 3):  # 1: its own bucket; 3: padded to 4
            x = _x(b)
            _same(graphs.forward(x), model(x), f"forward B={b}")
            _same(graphs(x), model(x), f"__call__ B={b}")
            for flip in (None, not model.architecture.default_flip):
                _same(graphs.encode(x, flip=flip), model.encode(x, flip=flip), f"encode B={b} flip={flip}")
    default = model.architecture.default_flip
    assert set(graphs.captured()) == {
        CaptureKey("forward", 1), CaptureKey("forward", 4),
        CaptureKey("encode", 1, (("flip", default),)), CaptureKey("encode", 1, (("flip", not default),)),
        CaptureKey("encode", 4, (("flip", default),)), CaptureKey("encode", 4, (("flip", not default),))}
    assert graphs.capture_count == len(rec.captures) == 6
    assert rec.replays == 2 * 2 + 2 * 2  # forward twice and encode twice per batch, each call one replay
    # the padding rows of the bucket-4 buffer are zero images
    assert torch.equal(graphs._buffers[4].images[3], torch.zeros(3, 32, 32))


def test_synthesize_int_and_tensor_groups(model):
    graphs, _ = _graphs(model)
    x = _x(3, seed=2)
    groups = torch.tensor([6, 0, 3])
    with torch.no_grad():
        _same(graphs.synthesize(x, groups), model.synthesize(x, groups), "synthesize tensor groups")
        assert torch.equal(graphs._buffers[4].groups, torch.tensor([6, 0, 3, 0]))  # padded with group 0
        _same(graphs.synthesize(x, 5), model.synthesize(x, 5), "synthesize int group")
        _same(graphs.synthesize(x[:1], torch.tensor(2)), model.synthesize(x[:1], 2), "synthesize 0-d group")
    assert _keys(graphs) == {("synthesize", 4), ("synthesize", 1)}


def test_synthesize_all_ages(model):
    graphs, _ = _graphs(model, batch_sizes=(2,))
    x = _x(1, seed=3)  # padded to 2
    with torch.no_grad():
        got = graphs.synthesize_all_ages(x)
        want = model.synthesize_all_ages(x)
        assert got.shape == (1, model.age_group, 3, 32, 32)
        _same(got, want, "synthesize_all_ages")
        if model.config["arch"] == "cvpr":  # (the TPAMI decoder on CPU: one option is enough)
            _same(graphs.synthesize_all_ages(x, groups_per_call=7), model.synthesize_all_ages(x, groups_per_call=7),
                  "synthesize_all_ages groups_per_call=7")
    # the default is the eager one: one group per call on CPU
    options = {k.options for k in graphs.captured()}
    assert (("groups_per_call", 1),) in options


def test_batches_above_the_largest_bucket_run_in_chunks(model):
    graphs, rec = _graphs(model)
    x = _x(9, seed=4)
    with torch.no_grad():
        _same(graphs.forward(x), model(x), "forward B=9")  # 4 + 4 + 1
        assert _keys(graphs) == {("forward", 4), ("forward", 1)} and rec.replays == 3
        groups = torch.arange(6) % model.age_group
        _same(graphs.synthesize(x[:6], groups), model.synthesize(x[:6], groups), "synthesize B=6")  # 4 + 2
        assert ("synthesize", 4) in _keys(graphs) and ("synthesize", 2) in _keys(graphs)
        assert not any(k.batch == 3 for k in graphs.captured())


def test_outputs_are_clones_that_later_replays_leave_alone(model):
    graphs, _ = _graphs(model)
    with torch.no_grad():
        first = graphs.encode(_x(2, seed=5))
        kept = copy.deepcopy(first)
        graphs.encode(_x(2, seed=6))  # same capture, new inputs: the static outputs are overwritten
        static = graphs._captures[graphs.captured()[0]].outputs
    for field, a, b, s in zip(EncodeResult._fields, first, kept, static):
        assert torch.equal(a, b), f"{field} changed under a later replay"
        assert a.untyped_storage().data_ptr() != s.untyped_storage().data_ptr(), field


# -- invalidation -------------------------------------------------------------------------------------------------
def test_every_weights_version_event_captures_again():
    model = randomize_(mtlface_fast.MTLFace(**CVPR_SMALL), seed=3).eval()
    graphs, rec = _graphs(model)
    x = _x(2)
    other = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([other], lr=0.1)
    state = copy.deepcopy(model.state_dict())

    def step():
        other.grad = torch.ones(1)
        optimizer.step()

    events = {"load_state_dict": lambda: model.load_state_dict(state), "to": lambda: model.to(torch.float32),
              "train/eval": lambda: model.train().eval(), "optimizer step": step,
              "weights_changed": model.weights_changed}
    with torch.no_grad():
        graphs.forward(x)
        graphs.forward(x)
        assert graphs.capture_count == 1 and graphs.captured() == [CaptureKey("forward", 2)]
        for name, event in events.items():
            before = graphs.capture_count
            event()
            assert graphs.captured() == [CaptureKey("forward", 2)], name  # dropped lazily, at the next call
            _same(graphs.forward(x), model(x), f"forward after {name}")
            assert graphs.capture_count == before + 1, f"{name} did not capture again"
            graphs.forward(x)
            assert graphs.capture_count == before + 1, f"{name}: captured twice"
    assert graphs.invalidations == len(events)
    # every invalidation took a new pool; the captures between two invalidations share one
    assert rec.captures == [("eager pool", i + 1) for i in range(len(events) + 1)]


def test_new_weights_are_replayed_after_loading(model):
    graphs, _ = _graphs(model)
    x = _x(3, seed=8)
    state = copy.deepcopy(model.state_dict())
    changed = {k: (v * 1.5 if v.is_floating_point() and "output_layer" in k else v) for k, v in state.items()}
    try:
        with torch.no_grad():
            before = graphs.forward(x)
            model.load_state_dict(changed)
            after, want = graphs.forward(x), model(x)
        _same(after, want, "forward after load_state_dict")
        assert not torch.allclose(after, before), "the old capture was replayed"
    finally:
        model.load_state_dict(state)


def test_a_model_in_training_mode_is_refused(model):
    graphs, rec = _graphs(model)
    model.train()
    try:
        with pytest.raises(RuntimeError, match="training mode.*model.eval"):
            graphs.forward(_x(2))
    finally:
        model.eval()
    assert rec.captures == []


def test_clear_and_memory(model):
    graphs, rec = _graphs(model)
    with torch.no_grad():
        graphs.forward(_x(1))
        graphs.forward(_x(4))
    memory = graphs.memory()
    assert list(memory) == graphs.captured() == [CaptureKey("forward", 1), CaptureKey("forward", 4)]
    assert all(isinstance(m, CaptureMemory) and m.reserved > 0 and m.allocated > 0 for m in memory.values())
    assert memory[CaptureKey("forward", 4)].allocated > memory[CaptureKey("forward", 1)].allocated
    assert len(set(rec.captures)) == 1  # one pool for every capture
    assert "captured=2" in repr(graphs)
    graphs.clear()
    assert graphs.captured() == [] and graphs.memory() == {}


# -- precision ----------------------------------------------------------------------------------------------------
def test_low_precision_runs_under_the_models_autocast(model):
    graphs, _ = _graphs(model, batch_sizes=(4,), dtype="bf16")
    assert graphs.dtype == torch.bfloat16
    x = _x(3, seed=9)
    with torch.no_grad():
        got, want = graphs.encode(x, flip=False), model.encode(x, flip=False, dtype=torch.bfloat16)
    _same(got, want, "encode bf16", rtol=TOLERANCES[torch.bfloat16][0])
    assert model.cuda_graphs(_recorder=EagerRecorder(), dtype=torch.float16).dtype == torch.float16
    assert model.cuda_graphs(_recorder=EagerRecorder(), dtype="fp32").dtype == torch.float32
    with pytest.raises(ValueError, match="dtype must be one of"):
        model.cuda_graphs(_recorder=EagerRecorder(), dtype="int8")


# -- errors -------------------------------------------------------------------------------------------------------
def test_batch_sizes_are_checked():
    assert check_batch_sizes((64, 1, 8, 8, 256)) == (1, 8, 64, 256)
    assert check_batch_sizes(16) == (16,)
    for bad in ((), [0], [4, -1], [1.5], ["8"], "8", [True], None):
        with pytest.raises(ValueError, match="batch_sizes"):
            check_batch_sizes(bad)


def test_a_cpu_model_is_refused_at_once(model):
    assert next(model.parameters()).device.type == "cpu"
    with pytest.raises(UsageError, match="needs the model on a CUDA device.*model.cuda"):
        model.cuda_graphs()
    with pytest.raises(ValueError, match="batch_sizes"):
        model.cuda_graphs(batch_sizes=[], _recorder=EagerRecorder())
    with pytest.raises(TypeError, match="must be an mtlface_fast.MTLFace"):
        GraphedMTLFace(torch.nn.Linear(2, 2), _recorder=EagerRecorder())


def test_bad_inputs_fail_as_the_eager_methods(model):
    graphs, rec = _graphs(model)
    x = _x(2)
    cases = [
        (ValueError, "32x32", lambda m: m.forward(_x(2)[:, :, :16, :16])),
        (TypeError, "must be a torch.Tensor", lambda m: m.encode("face.jpg")),
        (TypeError, "flip must be True or False", lambda m: m.encode(x, flip=1)),
        (ValueError, r"target_group must be in \[0, 7\)", lambda m: m.synthesize(x, 7)),
        (ValueError, r"shape \(2,\)", lambda m: m.synthesize(x, torch.tensor([1, 2, 3]))),
        (TypeError, "integer tensor", lambda m: m.synthesize(x, torch.tensor([1.0, 2.0]))),
        (ValueError, "groups_per_call must be a positive int", lambda m: m.synthesize_all_ages(x, groups_per_call=0)),
        (ValueError, "normalized", lambda m: m.forward(x * 255)),
    ]
    for exc, match, call in cases:
        with pytest.raises(exc, match=match):
            call(graphs)
        with pytest.raises(exc, match=match):
            call(model)
    assert rec.captures == []


def test_generator_noise_other_than_the_stored_maps_is_refused(model):
    graphs, rec = _graphs(model)
    x = _x(1)
    if model.config["arch"] == "tpami":
        for kwargs in (dict(noise="random"), dict(noise="random", generator=torch.Generator().manual_seed(0)),
                       dict(generator=torch.Generator()), dict(noise=[None] * 14)):
            with pytest.raises(ValueError, match="stored noise maps only.*call the model itself"):
                graphs.synthesize(x, 3, **kwargs)
            with pytest.raises(ValueError, match="stored noise maps only"):
                graphs.synthesize_all_ages(x, **kwargs)
    else:  # the eager model's own error: the CVPR generator has no noise
        with pytest.raises(ValueError, match="renders without generator noise"):
            graphs.synthesize(x, 3, noise="random")
    assert rec.captures == []


# -- the real capture ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs CUDA: captures real torch.cuda.CUDAGraph replays (the CPU tests above use the "
                           "eager recorder for everything else)")
def test_cuda_graph_replays_match_eager_on_cuda(model):
    cuda = copy.deepcopy(model).cuda().eval()
    graphs = cuda.cuda_graphs(BUCKETS)
    rtol = TOLERANCES[torch.float32][0]  # cuDNN picks its algorithms per batch size: round-off, not 1e-5
    x = _x(5, seed=11).cuda()
    groups = torch.tensor([0, 6, 3, 1, 2], device="cuda")
    with torch.no_grad():
        for b in (1, 3, 5):  # its own bucket, padded, chunked (4 + 1)
            xb = x[:b]
            _same(graphs.forward(xb), cuda(xb), f"forward B={b}", rtol)
            _same(graphs.encode(xb), cuda.encode(xb), f"encode B={b}", rtol)
            _same(graphs.synthesize(xb, groups[:b]), cuda.synthesize(xb, groups[:b]), f"synthesize B={b}", rtol)
        _same(graphs.synthesize_all_ages(x[:3]), cuda.synthesize_all_ages(x[:3]), "synthesize_all_ages", rtol)
        memory = graphs.memory()
        assert set(memory) == set(graphs.captured()) and len(memory) >= 7
        assert all(m.reserved >= 0 for m in memory.values())
        assert sum(m.allocated for m in memory.values()) > 0
        count = graphs.capture_count
        cuda.weights_changed()
        _same(graphs.forward(x[:3]), cuda(x[:3]), "forward after weights_changed", rtol)
        assert graphs.capture_count == count + 1 and graphs.captured() == [CaptureKey("forward", 4)]
        low = cuda.cuda_graphs((4,), dtype=torch.bfloat16)
        _same(low.forward(x[:3]), cuda(x[:3], dtype=torch.bfloat16), "forward bf16", TOLERANCES[torch.bfloat16][0])
