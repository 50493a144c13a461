"""Compact ICM (per-group windows) against the reference ICM: PyTorch path and Triton kernels."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
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
    ref, fast = _pair("cvpr", G, sigma, seed=B)
    x = torch.randn(B, 24, 5, 4)
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


def test_state_dict_and_windows_unchanged():
    ref = AgingModule(7, 4, 0.1)
    fast = CompactAgingModule(7, 4, 0.1)
    assert list(fast.state_dict()) == list(ref.state_dict())
    assert (fast.conv_dim, fast.starts) == router_windows(128, 7, 0.1)
