"""Compact ICM (per-group windows) against the reference ICM: PyTorch path and Triton kernels."""
from __future__ import annotations

import contextlib
import copy
import os

import pytest
import torch
from torch import nn

from mtlface_fast import use_backend
from mtlface_fast.layers import CompactAgingModule, CompactICM
from mtlface_fast.reference.icm import AgingModule, ICMBase, router_windows
from tests.utils import assert_close, max_rel_err, randomize_


class CompactBase(CompactICM, ICMBase):
    """A tiny ICM of either variant with the compact implementation."""


def _pair(variant="cvpr", G=7, sigma=0.1, unit=16, cin=24, repeat=2, seed=0):
    ref = ICMBase(cin, G, unit, sigma, repeat, variant)
    randomize_(ref, seed=seed)
    fast = CompactBase(cin, G, unit, sigma, repeat, variant)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _groups(kind, B, G, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "one":
        return torch.full((B,), G // 2, dtype=torch.long)
    if kind == "all":  # every group present, unsorted
        base = torch.arange(B) % G
        return base[torch.randperm(B, generator=g)]
    return torch.randint(0, G, (B,), generator=g)


def _grads_match(fast, ref, dtype=torch.float32, zero_tol=1e-4):
    """Every parameter's gradient equals the reference's. Biases feeding a training-mode BatchNorm have a
    zero gradient in exact arithmetic; both must then be zero up to rounding."""
    pr = dict(ref.named_parameters())
    checked = 0
    for name, p in fast.named_parameters():
        q = pr[name]
        if q.grad is None:
            assert p.grad is None or p.grad.abs().max() == 0, name
            continue
        assert p.grad is not None, f"{name}: no gradient"
        scale = max(float(q.grad.abs().max()), 1e-30)
        gmax = max((float(t.grad.abs().max()) for t in ref.parameters() if t.grad is not None), default=1.0)
        if scale < zero_tol * gmax:
            assert float(p.grad.abs().max()) < zero_tol * gmax, f"{name}: expected ~0 gradient"
        else:
            assert_close(p.grad, q.grad, dtype, name=f"grad {name}")
        checked += 1
    assert checked > 0


def _buffers_match(fast, ref):
    sr = ref.state_dict()
    for k, v in fast.state_dict().items():
        if v.is_floating_point():
            assert_close(v, sr[k], name=k)
        else:
            assert torch.equal(v, sr[k]), k


# -- PyTorch path -----------------------------------------------------------------------------------

CASES = [(s, G, B, kind) for s in (0.1, 0.125, 0.3) for G in (4, 7)
         for B, kind in ((1, "mixed"), (5, "mixed"), (16, "all"), (5, "one"))]


@pytest.mark.parametrize("sigma,G,B,kind", CASES)
def test_torch_eval_and_train_match_reference(sigma, G, B, kind):
    ref, fast = _pair("cvpr", G, sigma, repeat=1, seed=B)
    x = torch.randn(B, 24, 4, 3)
    g = _groups(kind, B, G, seed=B)
    with use_backend("torch"):
        ref.eval(), fast.eval()
        with torch.no_grad():
            assert_close(fast.icm(x, g), ref.icm(x, g), name="eval")
        ref.train(), fast.train()
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, yf = ref.icm(xr, g), fast.icm(xf, g)
        assert_close(yf, yr, name="train")
        w = torch.randn_like(yr)
        (yr * w).sum().backward()
        (yf * w).sum().backward()
    assert_close(xf.grad, xr.grad, name="grad x_id")
    _grads_match(fast, ref)
    _buffers_match(fast, ref)


@pytest.mark.parametrize("train", [False, True])
def test_torch_tpami_variant(train):
    ref, fast = _pair("tpami", 7, 0.125, unit=16)
    ref.train(train), fast.train(train)
    x = torch.randn(6, 24, 5, 5)
    g = torch.tensor([6, 0, 3, 3, 1, 5])
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    with use_backend("torch"):
        yr, yf = ref.icm(xr, g), fast.icm(xf, g)
    assert_close(yf, yr, name="tpami")
    w = torch.randn_like(yr)
    (yr * w).sum().backward()
    (yf * w).sum().backward()
    assert_close(xf.grad, xr.grad, name="grad x_id")
    _grads_match(fast, ref)


def test_full_size_generator_matches_reference():
    ref = randomize_(AgingModule(7, 4, 0.1), seed=3).eval()
    fast = CompactAgingModule(7, 4, 0.1).eval()
    fast.load_state_dict(ref.state_dict())
    torch.manual_seed(1)
    B = 3
    img = torch.randn(B, 3, 32, 32)
    x2, x3, x4 = torch.randn(B, 64, 16, 16), torch.randn(B, 128, 8, 8), torch.randn(B, 256, 4, 4)
    x_id = torch.randn(B, 512, 2, 2)
    g = torch.tensor([5, 0, 5])
    with use_backend("torch"), torch.no_grad():
        assert_close(fast.icm(x_id, g), ref.icm(x_id, g), name="icm")
        out_r = ref(img, None, x2, x3, x4, None, x_id, None, g)
        out_f = fast(img, None, x2, x3, x4, None, x_id, None, g)
        assert_close(out_f, out_r, name="generator")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = fast.icm(x_id, g)
        assert_close(low.float(), ref.icm(x_id, g), torch.bfloat16, name="icm bf16")


def test_full_size_train_step_matches_reference():
    ref = randomize_(ICMBase(512, 7, 128, 0.1, 2), seed=4)
    fast = CompactBase(512, 7, 128, 0.1, 2)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(4, 512, 2, 2)
    g = torch.tensor([6, 1, 1, 0])
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    with use_backend("torch"):
        yr, yf = ref.icm(xr, g), fast.icm(xf, g)
    assert_close(yf, yr, name="train icm")
    w = torch.randn_like(yr)
    (yr * w).sum().backward()
    (yf * w).sum().backward()
    assert_close(xf.grad, xr.grad, name="grad x_id")
    _grads_match(fast, ref)
    _buffers_match(fast, ref)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_eval_cache_follows_parameter_changes(backend, ieee_fp32):
    if backend == "triton" and not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") != "0"):
        pytest.skip("needs CUDA or the Triton interpreter (TRITON_INTERPRET=1)")
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    ref, fast = _pair("cvpr", 4, 0.25, unit=8, cin=12, repeat=1, seed=11)
    ref, fast = ref.to(dev).eval(), fast.to(dev).eval()
    x, g = torch.randn(3, 12, 3, 3, device=dev), torch.tensor([1, 3, 1], device=dev)
    with use_backend(backend), torch.no_grad():
        assert_close(fast.icm(x, g), ref.icm(x, g), name="first call")
        for m in (ref, fast):
            m.transform[0].conv1[1].running_var.mul_(3.0)
            m.conv1[0].weight.add_(0.05)
        fast.weights_changed()  # edits by hand are announced (tracked events need no call)
        assert_close(fast.icm(x, g), ref.icm(x, g), name="after in-place updates")
        fast.load_state_dict(randomize_(copy.deepcopy(ref), seed=12).state_dict())
        ref.load_state_dict(fast.state_dict())
        assert_close(fast.icm(x, g), ref.icm(x, g), name="after load_state_dict")


def _active_oracle(module: ICMBase, x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Full-width ICM whose training BatchNorms take statistics over the samples holding each channel."""
    mask = module.router._unit_mapping[groups][:, :, None, None]

    def bn(y, m, norm):
        cnt = (m.expand_as(y)).sum((0, 2, 3))
        mean = (y * m).sum((0, 2, 3)) / cnt.clamp_min(1)
        var = (((y - mean.view(1, -1, 1, 1)) * m) ** 2).sum((0, 2, 3)) / cnt.clamp_min(1)
        with torch.no_grad():
            held = cnt > 0
            norm.num_batches_tracked += 1
            unb = var * cnt / (cnt - 1).clamp_min(1)
            norm.running_mean.copy_(torch.where(held, 0.9 * norm.running_mean + 0.1 * mean, norm.running_mean))
            norm.running_var.copy_(torch.where(held, 0.9 * norm.running_var + 0.1 * unb, norm.running_var))
        y = (y - mean.view(1, -1, 1, 1)) * torch.rsqrt(var + norm.eps).view(1, -1, 1, 1)
        return y * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)

    h = module.conv1[2](bn(module.conv1[0](x), mask, module.conv1[1])) * mask
    for blk in module.transform:
        y = blk.relu1(bn(blk.conv1[0](h), mask, blk.conv1[1]) * mask)
        y = bn(blk.conv2[0](y), mask, blk.conv2[1]) * mask
        h = blk.relu2(h + y)
    return module.conv2(h)


def test_torch_active_bn_stats_match_masked_oracle():
    ref, fast = _pair("cvpr", 4, 0.3, unit=8, cin=12)
    fast.set_bn_stats("active")
    x = torch.randn(7, 12, 4, 4)
    g = torch.tensor([2, 0, 2, 3, 0, 0, 2])  # group 1 absent: its private channels keep their running stats
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr = _active_oracle(ref, xr, g)
    with use_backend("torch"):
        yf = fast.icm(xf, g)
    assert_close(yf, yr, name="active")
    w = torch.randn_like(yr)
    (yr * w).sum().backward()
    (yf * w).sum().backward()
    assert_close(xf.grad, xr.grad, name="grad x_id")
    _grads_match(fast, ref)
    _buffers_match(fast, ref)


@pytest.mark.parametrize("bn_stats", ["reference", "active"])
def test_torch_gradcheck_float64(bn_stats):
    _, fast = _pair("cvpr", 3, 0.25, unit=4, cin=3, repeat=1)
    fast = fast.double().set_bn_stats(bn_stats)
    x = torch.randn(4, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    g = torch.tensor([2, 0, 2, 1])
    with use_backend("torch"):
        assert torch.autograd.gradcheck(lambda t: fast.icm(t, g), (x,), eps=1e-6, atol=1e-6, fast_mode=True)


def test_bad_inputs_raise_clear_errors():
    _, fast = _pair("cvpr", 4, 0.1, unit=4, cin=6, repeat=1)
    x = torch.randn(2, 6, 3, 3)
    with pytest.raises(ValueError, match=r"condition values must be age groups in \[0, 4\)"):
        fast.icm(x, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="condition values"):
        fast.icm(x, torch.tensor([-1, 0]))
    with pytest.raises(TypeError, match="integer dtype"):
        fast.icm(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="integer tensor"):
        fast.icm(x, [0, 1])
    with pytest.raises(ValueError, match="x_id must have 6 channels"):
        fast.icm(torch.randn(2, 5, 3, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"condition must have shape \(2,\)"):
        fast.icm(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="bn_stats"):
        fast.set_bn_stats("batch")
    with pytest.raises(ValueError, match="bn_stats"):
        CompactAgingModule(7, 1, 0.1, 8, bn_stats="none")


@pytest.mark.parametrize("train", [False, True])
def test_training_and_inference_follow_the_backend_switch(monkeypatch, train):
    # Where the switch picks the Triton kernels (auto on CUDA), training takes them as inference does, under
    # the auto backend too (on CUDA this runs with CUDA tensors).
    from mtlface_fast import backend
    from mtlface_fast.layers import icm as icm_layer

    _, fast = _pair("cvpr", 4, 0.25, unit=8, cin=12, repeat=1, seed=16)
    fast.to(DEV).train(train)
    calls = []
    monkeypatch.setattr(backend, "choose", lambda device: "triton")  # what the switch picks on CUDA
    monkeypatch.setattr(icm_layer, "compact_icm_triton", lambda m, x, g, s: calls.append(s) or x)
    x = torch.randn(3, 12, 3, 3, device=DEV, requires_grad=True)
    with use_backend("auto"):
        fast.icm(x, torch.tensor([0, 3, 3], device=DEV))
    assert calls == ["reference"]


def test_state_dict_and_windows_unchanged():
    ref = AgingModule(7, 4, 0.1)
    fast = CompactAgingModule(7, 4, 0.1)
    assert list(fast.state_dict()) == list(ref.state_dict())
    assert (fast.conv_dim, fast.starts) == router_windows(128, 7, 0.1)


# -- Triton kernels (interpreter on CPU; tiny shapes) ------------------------------------------------

K = pytest.importorskip("mtlface_fast.kernels.icm_conv", reason="triton is not installed")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
_runs_kernels = DEV == "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
triton_only = pytest.mark.skipif(not _runs_kernels, reason="needs CUDA or the Triton interpreter (TRITON_INTERPRET=1)")


@pytest.fixture(autouse=False)
def ieee_fp32():
    """fp32 convolutions without TF32 on GPU, for the reference and the kernels alike."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _plan(groups, G, unit, sigma):
    _, starts = router_windows(unit, G, sigma)
    order = torch.argsort(groups, stable=True)
    counts = torch.bincount(groups, minlength=G)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    return order, offsets, torch.tensor(starts, dtype=torch.int32)


# (C_in full, kernel, in_win, out_win): 3x3 block, conv1 (512-like -> window), conv2 (window -> full), and the
# 3x3 block with full-width output (training with reference BatchNorm statistics)
LAYERS = [(None, 3, True, True), (10, 1, False, True), (None, 1, True, False), (None, 3, True, False)]


def _layer_args(layer, G=4, unit=8, sigma=0.25, B=5, dtype=torch.float32, seed=0):
    cin_full, ks, iw, ow = layer
    gen = torch.Generator().manual_seed(seed)
    C, _ = router_windows(unit, G, sigma)
    cin_full = cin_full or C
    cout = C if ow or ks == 3 else 10  # a 3x3 layer maps conv_dim to conv_dim, windowed or not
    groups = torch.randint(0, G, (B,), generator=gen)
    _, offsets, starts = _plan(groups, G, unit, sigma)
    x = torch.randn(B, unit if iw else cin_full, 3, 4, generator=gen, dtype=dtype)
    w = torch.randn(cout, cin_full, ks, ks, generator=gen, dtype=dtype) / (cin_full * ks * ks) ** 0.5
    b = torch.randn(cout, generator=gen, dtype=dtype)
    return x.to(DEV), w.to(DEV), b.to(DEV), offsets.to(DEV), starts.to(DEV), unit, iw, ow


@triton_only
@pytest.mark.parametrize("layer", LAYERS)
def test_triton_icm_conv_matches_reference_fwd_bwd(layer, ieee_fp32):
    x, w, b, offsets, starts, unit, iw, ow = _layer_args(layer)
    x1, w1, b1 = (t.clone().requires_grad_() for t in (x, w, b))
    x2, w2, b2 = (t.clone().requires_grad_() for t in (x, w, b))
    y = K.icm_conv(x1, w1, b1, offsets, starts, unit, iw, ow)
    yr = K._ref_conv(x2, w2, b2, offsets, starts, unit, iw, ow)
    assert_close(y, yr, name="icm_conv")
    dy = torch.randn_like(y)
    for a, e, n in zip(torch.autograd.grad(y, (x1, w1, b1), dy), torch.autograd.grad(yr, (x2, w2, b2), dy),
                       ("x", "weight", "bias")):
        assert_close(a, e, name=f"grad {n}")


@triton_only
@pytest.mark.parametrize("layer", LAYERS)
def test_triton_fused_layer_matches_reference(layer, ieee_fp32):
    x, w, b, offsets, starts, unit, iw, ow = _layer_args(layer, B=6, seed=2)
    C = w.size(0)
    n_out = unit if ow else C
    scale, shift, slope = torch.rand(C, device=DEV) + 0.5, torch.randn(C, device=DEV), torch.rand(C, device=DEV) * 0.4
    res = torch.randn(x.size(0), n_out, 3, 4, device=DEV)
    for act, extra in ((K.ACT_PRELU, dict(residual=res)), (K.ACT_LEAKY, dict(residual=None)),
                       (K.ACT_NONE, dict(residual=None))):
        args = (x, w, scale, shift, extra["residual"], slope, offsets, starts, unit, iw, ow, act, 0.2)
        got = K.icm_conv_fused(*args)
        assert_close(got, K._ref_fused(*args), name=f"fused act={act}")


@triton_only
def test_triton_weight_grad_is_deterministic_and_poison_free(ieee_fp32):
    x, w, b, offsets, starts, unit, iw, ow = _layer_args(LAYERS[0], B=7, seed=3)
    dy = torch.randn(x.size(0), unit, 3, 4, device=DEV)
    a = K.icm_conv_grad_weight(dy, x, w, offsets, starts, unit, iw, ow)
    bb = K.icm_conv_grad_weight(dy, x, w, offsets, starts, unit, iw, ow)
    assert torch.equal(a, bb)
    assert_close(a, K._ref_grad_weight(dy, x, w, offsets, starts, unit, iw, ow), name="grad weight")


@triton_only
@pytest.mark.parametrize("layer", LAYERS[:3])  # the op schema and fake kernel do not depend on the window flags
def test_triton_ops_opcheck(layer):
    x, w, b, offsets, starts, unit, iw, ow = _layer_args(layer, G=3, unit=4, sigma=0.5, B=3, seed=4)
    torch.library.opcheck(torch.ops.mtlface_fast.icm_conv.default,
                          (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), offsets, starts, unit, iw, ow))
    C = w.size(0)
    dy = torch.randn(x.size(0), unit if ow else C, 3, 4, device=DEV)
    torch.library.opcheck(torch.ops.mtlface_fast.icm_conv_grad_input.default,
                          (dy, w.detach(), offsets, starts, unit, iw, ow, x.size(1)))
    torch.library.opcheck(torch.ops.mtlface_fast.icm_conv_grad_weight.default,
                          (dy, x.detach(), w.detach(), offsets, starts, unit, iw, ow))
    torch.library.opcheck(torch.ops.mtlface_fast.icm_conv_fused.default,
                          (x.detach(), w.detach(), torch.rand(C, device=DEV), torch.randn(C, device=DEV), None,
                           torch.rand(C, device=DEV), offsets, starts,
                           unit, iw, ow, K.ACT_PRELU, 0.0))


@pytest.mark.parametrize("layer", LAYERS)
def test_icm_conv_autograd_formula_gradcheck_float64(layer, monkeypatch):
    # The registered backward (grad ops + bias reduction) in float64 through the ops' aten bodies (the
    # interpreter's tl.dot is not float64-exact; the kernels' gradients are compared in fp32 above).
    monkeypatch.setattr(K, "_use_kernels", lambda x: False)
    x, w, b, offsets, starts, unit, iw, ow = _layer_args(layer, G=3, unit=4, sigma=0.5, B=3,
                                                         dtype=torch.float64, seed=5)
    x = x[:, :, :2, :2].contiguous()
    assert torch.autograd.gradcheck(lambda *t: K.icm_conv(*t, offsets, starts, unit, iw, ow),
                                    (x.requires_grad_(), w.requires_grad_(), b.requires_grad_()), fast_mode=True)


@triton_only
def test_triton_poisoned_output_is_fully_written(monkeypatch, ieee_fp32):
    x, w, b, offsets, starts, unit, iw, ow = _layer_args(LAYERS[0], B=9, seed=6)
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        return real_empty(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(K.torch, "empty", poisoned_empty)
    y = K.icm_conv(x, w, b, offsets, starts, unit, iw, ow)
    dw = K.icm_conv_grad_weight(torch.randn_like(y), x, w, offsets, starts, unit, iw, ow)
    assert torch.isfinite(y).all() and torch.isfinite(dw).all()
    assert_close(y, K._ref_conv(x, w, b, offsets, starts, unit, iw, ow), name="icm_conv")


@contextlib.contextmanager
def _program_order(order):
    """Run the interpreter's programs in another order: "reversed" maps program id (x, y, z) of a grid to
    (X-1-x, Y-1-y, Z-1-z). On a GPU programs run concurrently and in any order; a kernel whose result
    depends on the order (one program reading what another writes, a read-modify-write of a shared buffer)
    changes its result here."""
    from triton.runtime import interpreter

    builder_type = type(interpreter.interpreter_builder)
    original = builder_type.set_grid_idx

    def set_grid_idx(self, x, y, z):
        gx, gy, gz = self.grid_dim
        if order == "reversed":
            x, y, z = gx - 1 - x, gy - 1 - y, gz - 1 - z
        original(self, x, y, z)

    builder_type.set_grid_idx = set_grid_idx
    try:
        yield
    finally:
        builder_type.set_grid_idx = original


@contextlib.contextmanager
def _only_config(kernel, config):
    """Autotune ``kernel`` over ``config`` alone (the interpreter otherwise runs only the first config)."""
    saved = kernel.configs, kernel.cache
    kernel.configs, kernel.cache = [config], {}
    try:
        yield
    finally:
        kernel.configs, kernel.cache = saved


def _kernel_results(x, w, b, offsets, starts, unit, iw, ow, dy):
    return (K.icm_conv(x, w, b, offsets, starts, unit, iw, ow),
            K.icm_conv_grad_input(dy, w, offsets, starts, unit, iw, ow, x.size(1)),
            K.icm_conv_grad_weight(dy, x, w, offsets, starts, unit, iw, ow))


needs_interpreter = pytest.mark.skipif(DEV == "cuda" or not _runs_kernels,
                                       reason="reorders the Triton interpreter's programs (CPU, TRITON_INTERPRET=1)")


@needs_interpreter
@pytest.mark.parametrize("layer", LAYERS)
def test_triton_kernels_do_not_depend_on_program_order(layer):
    x, w, b, offsets, starts, unit, iw, ow = _layer_args(layer, G=7, unit=8, sigma=0.1, B=5, seed=11)
    offsets = torch.tensor([0, 1, 2, 2, 4, 4, 4, 5], dtype=torch.int32)  # groups 0, 1, 3, 3, 6 (one sample each but 3)
    dy = torch.randn(x.size(0), unit if ow else w.size(0), 3, 4)
    in_order = _kernel_results(x, w, b, offsets, starts, unit, iw, ow, dy)
    with _program_order("reversed"):
        reordered = _kernel_results(x, w, b, offsets, starts, unit, iw, ow, dy)
    for a, e, name in zip(reordered, in_order, ("icm_conv", "grad input", "grad weight")):
        assert torch.equal(a, e), f"{name}: result depends on the order of the programs"


@triton_only
def test_triton_train_layer_every_autotune_config(ieee_fp32):
    # The GPU autotunes over every config; the interpreter otherwise runs only the first. The 3x3 block with
    # full-width output (training) at a width that no block size divides, with a group held by one sample.
    x, w, b, offsets, starts, unit, iw, ow = _layer_args(LAYERS[3], G=7, unit=8, sigma=0.1, B=5, seed=12)
    offsets = torch.tensor([0, 1, 2, 2, 4, 4, 4, 5], dtype=torch.int32, device=DEV)
    dy = torch.randn(x.size(0), w.size(0), 3, 4, device=DEV)
    expected = (K._ref_conv(x, w, b, offsets, starts, unit, iw, ow),
                K._ref_grad_input(dy, w, offsets, starts, unit, iw, ow, x.size(1)),
                K._ref_grad_weight(dy, x, w, offsets, starts, unit, iw, ow))
    fwd, wgrad = K._icm_conv_fwd_kernel, K._icm_conv_wgrad_kernel
    tiles = {}
    for cfg in K._conv_configs():  # warps and stages do not change what the interpreter computes
        tiles.setdefault((cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]), cfg)
    for cfg in tiles.values():
        with _only_config(fwd, cfg):
            y = K.icm_conv(x, w, b, offsets, starts, unit, iw, ow)
            dx = K.icm_conv_grad_input(dy, w, offsets, starts, unit, iw, ow, x.size(1))
        assert_close(y, expected[0], name=f"icm_conv, config {cfg}")
        assert_close(dx, expected[1], name=f"grad input, config {cfg}")
    for cfg in K._wgrad_configs():
        with _only_config(wgrad, cfg):
            got = K.icm_conv_grad_weight(dy, x, w, offsets, starts, unit, iw, ow)
        assert_close(got, expected[2], name=f"grad weight, config {cfg}")


TRITON_MODULE_CASES = [("cvpr", "reference", 0.1, 7, 5, "all"), ("cvpr", "reference", 0.3, 4, 6, "one"),
                       ("cvpr", "active", 0.125, 4, 5, "mixed"), ("tpami", "reference", 0.125, 7, 1, "mixed")]


@triton_only
@pytest.mark.parametrize("variant,bn_stats,sigma,G,B,kind", TRITON_MODULE_CASES)
def test_triton_module_matches_reference(variant, bn_stats, sigma, G, B, kind, ieee_fp32):
    ref, fast = _pair(variant, G, sigma, unit=8, cin=12, repeat=1, seed=7)
    ref, fast = ref.to(DEV), fast.to(DEV).set_bn_stats(bn_stats)
    x = torch.randn(B, 12, 3, 3, device=DEV)
    g = _groups(kind, B, G, seed=3).to(DEV)
    with use_backend("triton"):
        ref.eval(), fast.eval()
        with torch.no_grad():
            assert_close(fast.icm(x, g), ref.icm(x, g), name="eval (fused layers)")
        ref.train(), fast.train()
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr = ref.icm(xr, g) if bn_stats == "reference" else _active_oracle(ref, xr, g)
        yf = fast.icm(xf, g)
    assert_close(yf, yr, name="train")
    w = torch.randn_like(yr)
    (yr * w).sum().backward()
    (yf * w).sum().backward()
    assert_close(xf.grad, xr.grad, name="grad x_id")
    _grads_match(fast, ref)
    _buffers_match(fast, ref)


@triton_only
@pytest.mark.parametrize("order", ["reversed"] if DEV == "cpu" else ["launch"])
def test_triton_deep_train_icm_matches_reference(order, ieee_fp32):
    # The GPU smoke configuration in miniature: stacked residual blocks, training-mode BatchNorm with reference
    # statistics, groups 6, 0, 3, 3, 1 (sigma 0.1: channels held by one sample only, the last channel by none),
    # and on CPU the interpreter's programs in reversed order.
    ref = randomize_(ICMBase(12, 7, 8, 0.1, 2), seed=15)
    fast = CompactBase(12, 7, 8, 0.1, 2)
    fast.load_state_dict(ref.state_dict())
    ref, fast = ref.to(DEV).train(), fast.to(DEV).train()
    x = torch.randn(5, 12, 3, 3, device=DEV)
    g = torch.tensor([6, 0, 3, 3, 1], device=DEV)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr = ref.icm(xr, g)
    w = torch.randn_like(yr)
    (yr * w).sum().backward()
    with use_backend("triton"), (_program_order(order) if order == "reversed" else contextlib.nullcontext()):
        yf = fast.icm(xf, g)
        (yf * w).sum().backward()
    assert_close(yf, yr, name="train")
    assert_close(xf.grad, xr.grad, name="grad x_id")
    _grads_match(fast, ref)
    _buffers_match(fast, ref)


@triton_only
def test_triton_eval_with_input_grad_matches_reference(ieee_fp32):
    ref, fast = _pair("cvpr", 4, 0.25, unit=8, cin=12, repeat=1, seed=8)
    ref, fast = ref.to(DEV).eval(), fast.to(DEV).eval()
    x = torch.randn(4, 12, 3, 3, device=DEV)
    g = torch.tensor([3, 1, 1, 0], device=DEV)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    with use_backend("triton"):
        yr, yf = ref.icm(xr, g), fast.icm(xf, g)
    assert_close(yf, yr, name="eval with grad")
    yr.square().sum().backward()
    yf.square().sum().backward()
    assert_close(xf.grad, xr.grad, name="grad x_id")
    _grads_match(fast, ref)


def test_ops_decompose_to_aten_for_export():
    from mtlface_fast.kernels.utils import DECOMPOSITIONS

    _, fast = _pair("cvpr", 4, 0.25, unit=8, cin=12, repeat=1, seed=9)
    fast.eval()

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.icm_module = fast

        def forward(self, x, g):
            return self.icm_module.icm(x, g)

    x, g = torch.randn(3, 12, 3, 3), torch.tensor([0, 3, 3])
    with torch.no_grad():
        expected = fast.icm(x, g)
        ep = torch.export.export(Wrap(), (x, g), strict=False)
    assert any("mtlface_fast" in str(n.target) for n in ep.graph.nodes)
    ep = ep.run_decompositions(DECOMPOSITIONS)
    assert not any("mtlface_fast" in str(n.target) for n in ep.graph.nodes)
    assert_close(ep.module()(x, g), expected, name="decomposed")


def test_compiles_without_graph_breaks():
    ref, fast = _pair("cvpr", 4, 0.25, unit=8, cin=12, repeat=1, seed=10)
    ref.eval(), fast.eval()
    x, g = torch.randn(3, 12, 3, 3), torch.tensor([2, 0, 2])
    compiled = torch.compile(fast.icm, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert_close(compiled(x, g), ref.icm(x, g), name="compiled icm")


@triton_only
@pytest.mark.parametrize("train", [False, True])
def test_triton_module_bf16_autocast(train):
    ref, fast = _pair("cvpr", 4, 0.25, unit=16, cin=16, repeat=1, seed=13)
    ref, fast = ref.to(DEV).train(train), fast.to(DEV).train(train)
    x, g = torch.randn(5, 16, 3, 3, device=DEV), torch.tensor([2, 0, 2, 3, 0], device=DEV)
    with torch.no_grad():
        expected = copy.deepcopy(ref).icm(x, g)
        with torch.autocast(DEV, dtype=torch.bfloat16):
            ref16 = copy.deepcopy(ref).icm(x, g)
            with use_backend("triton"):
                got = fast.icm(x, g)
    assert got.dtype == torch.bfloat16
    assert_close(got.float(), expected, torch.bfloat16, name="bf16 icm",
                 rtol=max(2e-2, 2 * max_rel_err(ref16.float(), expected)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_triton_eval_is_cuda_graph_capturable(ieee_fp32):
    ref, fast = _pair("cvpr", 7, 0.1, unit=16, cin=32, repeat=2, seed=14)
    ref, fast = ref.cuda().eval(), fast.cuda().eval()
    x, g = torch.randn(9, 32, 7, 7, device="cuda"), torch.tensor([6, 0, 3, 3, 1, 5, 2, 4, 0], device="cuda")
    with use_backend("triton"), torch.no_grad():
        fast.icm(x, g)  # autotune and parameter caches outside the capture
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fast.icm(x, g)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fast.icm(x, g)
        x.copy_(torch.randn_like(x))
        g.copy_(torch.tensor([1, 1, 1, 2, 6, 6, 0, 3, 5], device="cuda"))
        graph.replay()
        assert_close(out, ref.icm(x, g), name="graph replay")
