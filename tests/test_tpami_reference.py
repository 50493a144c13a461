"""The TPAMI reference against hand-checkable formulations: FIR resampling, modulated conv, routers, flip TTA, noise."""
import math

import pytest
import torch
import torch.nn.functional as F

from mtlface_fast import reference as ref
from mtlface_fast.reference import stylegan2 as sg
from mtlface_fast.reference.tpami import TPAMIAgingModule, n_styles
from tests.tpami_utils import SMALL, randomize_tpami_
from tests.utils import assert_close


def _direct_upfirdn2d(x, k, up, down, p0, p1):
    """Zero insertion, padding (negative crops), then
    out[y, x] = sum_ij pad[y*down + i, x*down + j] * k[kh-1-i, kw-1-j]."""
    b, c, h, w = x.shape
    u = torch.zeros(b, c, h * up, w * up, dtype=x.dtype)
    u[:, :, ::up, ::up] = x
    u = F.pad(u, [max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)])
    u = u[:, :, max(-p0, 0):u.shape[2] - max(-p1, 0), max(-p0, 0):u.shape[3] - max(-p1, 0)]
    kh, kw = k.shape
    oh, ow = (u.shape[2] - kh) // down + 1, (u.shape[3] - kw) // down + 1
    out = torch.zeros(b, c, oh, ow, dtype=x.dtype)
    for oy in range(oh):
        for ox in range(ow):
            for i in range(kh):
                for j in range(kw):
                    out[:, :, oy, ox] += u[:, :, oy * down + i, ox * down + j] * k[kh - 1 - i, kw - 1 - j]
    return out


@pytest.mark.parametrize("up,down,pad,kshape", [(1, 1, (1, 1), (4, 4)), (2, 1, (2, 1), (4, 4)), (1, 2, (1, 1), (4, 4)),
                                                (2, 2, (0, -1), (3, 3)), (3, 1, (1, 2), (3, 4))])
def test_upfirdn2d_against_direct_sum(up, down, pad, kshape):
    g = torch.Generator().manual_seed(up * 10 + down)
    x = torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64)
    k = torch.randn(*kshape, generator=g, dtype=torch.float64)
    out = sg.upfirdn2d(x, k, up, down, pad)
    torch.testing.assert_close(out, _direct_upfirdn2d(x, k, up, down, *pad), rtol=1e-12, atol=1e-12)


def test_fir_layers_preserve_constants_and_sizes():
    up = sg.Upsample()
    assert up.pad == (2, 1) and torch.allclose(up.kernel.sum(), torch.tensor(4.0))
    y = up(torch.ones(1, 2, 6, 6))
    assert y.shape == (1, 2, 12, 12)
    torch.testing.assert_close(y[:, :, 2:-2, 2:-2], torch.ones(1, 2, 8, 8))  # DC gain 1 away from the borders
    conv = sg.ModulatedConv2d(4, 5, 3, 8, upsample=True)
    assert conv.blur.pad == (1, 1)
    assert conv(torch.randn(2, 4, 6, 6), torch.randn(2, 8)).shape == (2, 5, 12, 12)


def test_fused_leaky_relu_values():
    x = torch.tensor([[[[-1.0]], [[2.0]]]])
    b = torch.tensor([0.5, -0.5])
    expected = torch.tensor([[[[-0.5 * 0.2 * math.sqrt(2)]], [[1.5 * math.sqrt(2)]]]])
    torch.testing.assert_close(sg.fused_leaky_relu(x, b), expected)


@pytest.mark.parametrize("upsample", [False, True])
@pytest.mark.parametrize("demodulate", [True, False])
def test_modulated_conv_against_per_sample_conv(upsample, demodulate):
    torch.manual_seed(3)
    conv = sg.ModulatedConv2d(6, 5, 3, 16, demodulate=demodulate, upsample=upsample).double()
    with torch.no_grad():
        conv.modulation.bias.uniform_(0.5, 1.5)
    x, style = torch.randn(3, 6, 7, 7, dtype=torch.float64), torch.randn(3, 16, dtype=torch.float64)
    out = conv(x, style)
    for b in range(3):
        s = F.linear(style[b], conv.modulation.weight / math.sqrt(16), conv.modulation.bias)
        w = conv.weight[0] / math.sqrt(6 * 9) * s.view(1, 6, 1, 1)
        if demodulate:
            w = w / torch.sqrt((w ** 2).sum([1, 2, 3], keepdim=True) + 1e-8)
        if upsample:
            y = F.conv_transpose2d(x[b:b + 1], w.transpose(0, 1), stride=2)
            y = sg.upfirdn2d(y, conv.blur.kernel.double(), pad=(1, 1))
        else:
            y = F.conv2d(x[b:b + 1], w, padding=1)
        torch.testing.assert_close(out[b:b + 1], y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("channels,dim,step", [(512, 800, 112), (256, 400, 56), (128, 200, 28)])
def test_router_windows(channels, dim, step):
    with torch.device("meta"):
        icm = TPAMIAgingModule(channels, 7)
    mapping = ref.TaskRouter(channels // 4, 7, 1 / 8)._unit_mapping
    assert icm.conv_dim == dim and icm.router._unit_mapping.shape == (7, dim)
    expected = torch.zeros(7, dim)
    for g in range(7):
        expected[g, g * step:g * step + channels // 4] = 1
    assert torch.equal(mapping, expected)
    assert bool((expected.sum(0) > 0).all())  # no dead channels with sigma 1/8


def test_generator_layout():
    assert n_styles(112) == 12 and n_styles(32) == 8
    with torch.device("meta"):
        g = sg.Generator(128)
    assert g.n_latent == 12 and g.num_layers == 11
    assert [s[-1] for s in g.noise_shapes()] == [4, 8, 8, 16, 16, 32, 32, 64, 64, 128, 128]
    with pytest.raises(ValueError, match="power of two"):
        sg.Generator(112)


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return randomize_tpami_(ref.MTLFace(**SMALL), seed=5).eval()


def _x(b=2, seed=1):
    return torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@torch.no_grad()
def test_flip_tta_encode(small):
    x = _x()
    r = small.encode(x)
    v1, v2 = small(x), small(torch.flip(x, dims=(3,)))
    torch.testing.assert_close(r.embedding, F.normalize(v1 + v2, dim=1))
    torch.testing.assert_close(r.embedding.norm(dim=1), torch.ones(2))
    a1, a2 = small.encode(x, flip=False), small.encode(torch.flip(x, dims=(3,)), flip=False)
    torch.testing.assert_close(a1.embedding, v1)
    torch.testing.assert_close(r.age, (a1.age + a2.age) / 2)
    torch.testing.assert_close(r.group_logits, (a1.group_logits + a2.group_logits) / 2)
    probs = F.softmax(a1.age_logits, dim=1)
    torch.testing.assert_close(a1.age, (probs * torch.arange(101.0)).sum(1))


@torch.no_grad()
def test_synthesize_pieces_and_noise(small):
    x, cond = _x(), torch.tensor([2, 6])
    f = small.features(x)
    lat = small.encoder.get_conditions(f.x_2, f.x_3, f.x_4, f.x_id, cond)
    assert lat.shape == (2, 8, 512)
    torch.testing.assert_close(lat[:, :3], small.encoder.unconditioned_latents(f.x_id))
    gen = small.decoder.decoder
    raw = gen(lat + small.decoder.latent_avg, noise=gen.stored_noise())
    expected = F.interpolate(raw, size=32, mode="bilinear", align_corners=True).clamp(-1, 1)
    out = small.synthesize(x, cond)  # default: the stored noise maps, deterministic
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert out.shape == (2, 3, 32, 32) and float(out.abs().max()) <= 1.0

    def decode(**kw):
        return small.decoder(lat, noise=small.make_noise(2, **kw)).clamp(-1, 1)

    a = decode(noise="random", generator=torch.Generator().manual_seed(4))
    b = decode(noise="random", generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - out).abs().max() > 1e-3  # the noise strengths are non-zero here
    torch.manual_seed(9)
    c = decode(noise="random")  # the official behaviour: fresh maps from the global RNG, per sample
    assert (decode(noise="random") - c).abs().max() > 1e-3
    torch.manual_seed(9)
    maps = [torch.randn(s) for s in gen.noise_shapes(2)]  # drawn in layer order, as the layers draw them
    torch.testing.assert_close(decode(noise=maps), c, rtol=0, atol=0)
    with pytest.raises(ValueError, match="noise must be one of"):
        small.make_noise(2, "fixed")
    with pytest.raises(ValueError, match="generator= is only used"):
        small.make_noise(2, "stored", torch.Generator())
    with pytest.raises(ValueError, match="noise must hold 7"):
        small.make_noise(2, [torch.zeros(1, 1, 4, 4)])
    with pytest.raises(ValueError, match="target_group"):
        small.synthesize(x, 7)
    with pytest.raises(ValueError, match="32x32"):
        small.synthesize(torch.zeros(1, 3, 40, 40), 0)


@torch.no_grad()
def test_synthesize_all_ages_equals_per_group_calls(small):
    x = _x(1)
    every = small.synthesize_all_ages(x)
    assert every.shape == (1, 7, 3, 32, 32)
    assert_close(every[:, 6], small.synthesize(x, 6), name="group 6")
    rnd = small.synthesize_all_ages(x, noise="random", generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(2)
    for g in (0, 1):  # one draw per group, in group order
        assert_close(rnd[:, g], small.synthesize(x, g, noise="random", generator=gen), name=f"random, group {g}")


def test_backward_reaches_every_trainable_parameter(small):
    small.zero_grad(set_to_none=True)
    x = _x(1)
    out = small.synthesize(x, torch.tensor([5]))
    e = small.encode(x)
    (out.square().mean() + e.embedding.sum() + e.age.mean() * 1e-3 + e.group_logits.mean()).backward()
    missing = [n for n, p in small.named_parameters() if p.requires_grad and p.grad is None
               and not n.startswith("decoder.decoder.style.")]  # the mapping MLP is unused by design
    small.zero_grad(set_to_none=True)
    assert not missing, missing[:5]
