"""One MTLFace for every architecture: class identity, pickling and copying, compile, the implementation
chosen once (and listed), and caches of derived weights that are never served stale after a tracked event.

Both architectures: the CVPR model and a checkpoint in the TPAMI release layout (``mtlface_checkpoints.tar``,
small configuration, randomized weights) loaded with ``from_official``.
"""
import copy
import io

import pytest
import torch

import mtlface_fast
from mtlface_fast import backend, reference
from mtlface_fast.layers import FastBottleneckIR, FusedLayer
from mtlface_fast.layers.decoder import FastUpsample
from tests.tpami_utils import SMALL as TPAMI_SMALL
from tests.tpami_utils import randomize_tpami_
from tests.utils import assert_close, randomize_

CVPR_SMALL = dict(arch="cvpr", backbone="ir34", input_size=32, age_group=7)
ARCHS = ("cvpr", "tpami")


def _reference(arch: str, seed: int = 5) -> reference.MTLFace:
    if arch == "tpami":
        return randomize_tpami_(reference.MTLFace(**TPAMI_SMALL), seed=seed)
    return randomize_(reference.MTLFace(**CVPR_SMALL), seed=seed)


@pytest.fixture(scope="module", params=ARCHS)
def loaded(request, tmp_path_factory):
    """(arch, fast model, reference model), the TPAMI pair loaded from a file in the release layout."""
    arch = request.param
    src = _reference(arch)
    if arch == "tpami":
        path = str(tmp_path_factory.mktemp("release") / "mtlface_checkpoints.tar")
        torch.save(src.state_dict(), path)
        fast, ref = mtlface_fast.MTLFace.from_official(path), reference.MTLFace.from_official(path)
    else:
        fast, ref = mtlface_fast.MTLFace(**CVPR_SMALL), reference.MTLFace(**CVPR_SMALL)
        fast.load_state_dict(src.state_dict())
        ref.load_state_dict(src.state_dict())
    return arch, fast.eval(), ref.eval()


def _x(b=2, seed=1):
    return torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _outputs(model, x):
    with torch.no_grad():
        res = model.encode(x)
        return dict(embedding=res.embedding, age=res.age, forward=model(x), synthesize=model.synthesize(x, 3),
                    all_ages=model.synthesize_all_ages(x))


def _assert_same(got, want, what):
    for k in want:
        assert_close(got[k], want[k], name=f"{what}: {k}")


# -- one class ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_is_an_mtlface(arch):
    cfg = TPAMI_SMALL if arch == "tpami" else CVPR_SMALL
    fast, ref = mtlface_fast.MTLFace(**cfg), reference.MTLFace(**cfg)
    assert type(fast) is mtlface_fast.MTLFace and type(ref) is reference.MTLFace
    assert isinstance(fast, reference.MTLFace) and isinstance(ref, reference.MTLFace)
    assert fast.config["arch"] == ref.config["arch"] == arch
    assert fast.architecture is reference.ARCHITECTURES[arch]
    assert set(fast.state_dict()) == set(ref.state_dict())
    # the recognition network and the age head have one name whatever the state-dict keys
    assert fast.backbone is getattr(fast, fast.architecture.recognition)
    assert fast.estimation_network is getattr(fast, fast.architecture.estimator)


def test_no_class_switching_in_new():
    for cls in (mtlface_fast.MTLFace, reference.MTLFace):
        assert "__new__" not in vars(cls)
        assert type(cls).__call__ is type.__call__


def test_architecture_arguments_are_checked():
    with pytest.raises(ValueError, match="arch must be one of"):
        mtlface_fast.MTLFace(arch="iccv")
    with pytest.raises(ValueError, match="leave afd unset"):
        mtlface_fast.MTLFace(arch="tpami", afd="cvpr")
    with pytest.raises(ValueError, match="leave sigma unset"):
        reference.MTLFace(arch="tpami", sigma=0.1)
    with pytest.raises(TypeError, match="the cvpr architecture takes the layer arguments"):
        reference.MTLFace(**CVPR_SMALL, icm_layer=torch.nn.Identity)
    with pytest.raises(ValueError, match="renders without generator noise"):
        reference.MTLFace(**CVPR_SMALL).eval().synthesize(_x(), 1, noise="random")


# -- the same outputs through every path ---------------------------------------------------------------------------
def test_fast_matches_reference(loaded):
    arch, fast, ref = loaded
    x = _x()
    _assert_same(_outputs(fast, x), _outputs(ref, x), f"{arch} fast vs reference")


def test_flip_default_follows_the_architecture(loaded):
    arch, fast, _ = loaded
    x = _x()
    with torch.no_grad():
        default, on, off = fast.encode(x), fast.encode(x, flip=True), fast.encode(x, flip=False)
    same_as = on if arch == "tpami" else off
    assert torch.equal(default.embedding, same_as.embedding)
    assert torch.allclose(on.embedding.norm(dim=1), torch.ones(2), atol=1e-5)  # flip TTA: normalized
    with pytest.raises(TypeError, match="flip must be True or False"):
        fast.encode(x, flip="yes")


def test_torch_save_load_and_deepcopy(loaded):
    arch, fast, _ = loaded
    x = _x()
    want = _outputs(fast, x)
    buf = io.BytesIO()
    torch.save(fast, buf)
    buf.seek(0)
    restored = torch.load(buf, weights_only=False)
    assert type(restored) is mtlface_fast.MTLFace and restored.config == fast.config
    _assert_same(_outputs(restored, x), want, f"{arch} after torch.save/torch.load")
    _assert_same(_outputs(copy.deepcopy(fast), x), want, f"{arch} deepcopy")


def test_compiled_model_matches_and_still_pickles(loaded):
    arch, fast, _ = loaded
    model = copy.deepcopy(fast)
    x = _x()
    want = _outputs(model, x)
    assert model.compile(backend="aot_eager") is model
    _assert_same(_outputs(model, x), want, f"{arch} compiled")
    buf = io.BytesIO()
    torch.save(model, buf)  # the compiled callables stay behind; the copy runs eagerly
    buf.seek(0)
    restored = torch.load(buf, weights_only=False)
    assert "encode" not in restored.__dict__
    _assert_same(_outputs(restored, x), want, f"{arch} compiled, pickled")


# -- the implementation, chosen once ------------------------------------------------------------------------------
def test_implementation_is_chosen_once_and_listed(loaded, monkeypatch):
    arch, fast, _ = loaded
    model = copy.deepcopy(fast)
    impls = model.implementations()
    kinds = {"FastBottleneckIR", "FusedAttentionModule"} | (
        {"CompactTPAMIAgingModule", "FastStyledConv"} if arch == "tpami" else {"CompactAgingModule"})
    assert kinds <= set(impls), impls
    assert impls["FusedAttentionModule"] == "torch"  # CPU tensors under the auto backend
    assert "implementations={" in repr(model)
    calls = []
    real = backend.choose
    monkeypatch.setattr(backend, "choose", lambda device: calls.append(device) or real(device))
    _outputs(model, _x())
    _outputs(model, _x())
    assert calls == [], "a call chose an implementation again"
    model.train().eval()  # a mode change: chosen again, once per layer, at the next call
    _outputs(model, _x())
    # layers whose implementation depends on the backend (the folded trunk unit and the CVPR decoder step are
    # PyTorch on every one)
    n_fused = sum(1 for _, m in model.fused_layers() if not isinstance(m, (FastBottleneckIR, FastUpsample)))
    assert len(calls) == n_fused
    _outputs(model, _x())
    assert len(calls) == n_fused
    with mtlface_fast.use_backend("torch"):  # a backend switch: chosen again
        _outputs(model, _x())
    assert len(calls) == 2 * n_fused


@pytest.mark.skipif(not backend.interpreter_enabled() and not torch.cuda.is_available(),
                    reason="the triton backend on CPU needs the Triton interpreter (TRITON_INTERPRET=1)")
def test_backend_switch_changes_what_runs(loaded):
    _, fast, _ = loaded
    model = copy.deepcopy(fast)
    assert model.implementations()["FusedAttentionModule"] == "torch"
    with mtlface_fast.use_backend("triton"):
        impls = model.implementations()
        assert impls["FusedAttentionModule"] == "triton" and impls["FastBottleneckIR"].startswith("torch")
    assert model.implementations()["FusedAttentionModule"] == "torch"


# -- caches of derived weights are never stale ---------------------------------------------------------------------
FIXED_BUFFERS = ("_unit_mapping", "kernel", "expectation")  # structure (router windows, FIR taps, age bins)


def _perturbed_state(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: (v * (1 + 0.2 * torch.rand(v.shape, generator=g, dtype=v.dtype))
                if v.is_floating_point() and not k.endswith(FIXED_BUFFERS) else v)
            for k, v in model.state_dict().items()}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_changed_weights_are_never_served_stale(loaded, compiled):
    """After each tracked event (load_state_dict, .to(), train()/eval(), an optimizer step, weights_changed()
    for an edit by hand) the model's outputs equal the reference's with the same weights. Compiled: every
    entry point compiled (aot_eager); the dtype round trip is left to the eager run (a recompilation)."""
    arch, fast, ref = loaded
    model, oracle = copy.deepcopy(fast), copy.deepcopy(ref)
    if compiled:
        # the entry points were compiled for other models earlier in the session: start from empty caches
        # (new weights do not recompile: the folded operands enter the graph as inputs)
        torch.compiler.reset()
        model.compile(backend="aot_eager")
    x = _x()

    def outputs(m):
        with torch.no_grad():
            return dict(embedding=m.encode(x).embedding, synthesize=m.synthesize(x, 3))

    def check(what):
        oracle.load_state_dict(model.state_dict())
        _assert_same(outputs(model), outputs(oracle), f"{arch} {'compiled' if compiled else 'eager'}: {what}")

    check("first call")  # builds the caches
    model.load_state_dict(_perturbed_state(model, 1))
    check("load_state_dict")
    if not compiled:
        model.to(torch.float64)
        oracle.to(torch.float64)
        x = x.double()
        check(".to(float64)")
        model.to(torch.float32)
        oracle.to(torch.float32)
        x = x.float()
        check(".to(float32)")
    # an optimizer step while the model stays in eval mode (frozen statistics, fine-tuning)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    type(model).encode(model, x, flip=False).embedding.tanh().mean().backward()  # eager backward, bounded
    opt.step()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    check("optimizer step in eval mode")
    # one optimizer step in train mode, then back to eval: mode change and step move the version
    model.train()
    opt.zero_grad()
    type(model).encode(model, torch.cat([x, x.flip(3)]), flip=False).embedding.tanh().mean().backward()
    opt.step()
    model.eval()
    check("optimizer step + eval()")
    with torch.no_grad():  # an edit by hand, announced
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.mul_(1.5)
    model.weights_changed()
    check("edit by hand + weights_changed()")


def test_fused_layers_are_the_fast_ones(loaded):
    _, fast, ref = loaded
    assert all(isinstance(m, FusedLayer) for _, m in fast.fused_layers()) and fast.fused_layers()
    assert not any(isinstance(m, FusedLayer) for m in ref.modules())
