"""The reference against small hand-computed cases of each formula, and invariants."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtlface_fast import reference as ref
from mtlface_fast.reference.heads import AGE_GROUP_THRESHOLDS
from tests.utils import randomize_


# -- adaptive pooling windows (PyTorch's: start = floor(i*H/s), end = ceil((i+1)*H/s)) -----------------------
def test_spp_windows_on_7x7_by_hand():
    x = torch.arange(49, dtype=torch.float32).view(1, 1, 7, 7)  # x[r, c] = 7r + c
    avg = ref.SPPModule("avg")(x).flatten()
    mx = ref.SPPModule("max")(x).flatten()
    # size 1: whole map; mean of 0..48 = 24, max 48
    assert avg[0] == 24 and mx[0] == 48
    # size 2: rows/cols [0,4) and [3,7); window (0,0) = rows 0..3, cols 0..3 -> mean 7*1.5 + 1.5 = 12
    assert avg[1:5].tolist() == [12.0, 15.0, 33.0, 36.0]
    assert mx[1:5].tolist() == [24.0, 27.0, 48.0 - 3, 48.0]
    # size 3: [0,3), [2,5), [4,7): window (1,2) = rows 2..4, cols 4..6 -> mean 7*3 + 5 = 26, max 7*4 + 6 = 34
    assert avg[5 + 1 * 3 + 2] == 26 and mx[5 + 1 * 3 + 2] == 34
    assert avg.numel() == 14


def _afd_numpy(x, m):
    """An independent NumPy AFD (eval mode): explicit windows, MLP, BN formula, 7x7 conv by loops."""
    B, C, H, W = x.shape
    pools = {"avg": [], "max": []}
    for s in (1, 2, 3):
        for kind, fn in (("avg", np.mean), ("max", np.max)):
            out = np.zeros((B, C, s, s))
            for i in range(s):
                for j in range(s):
                    r0, r1 = (i * H) // s, -((-(i + 1) * H) // s)
                    c0, c1 = (j * W) // s, -((-(j + 1) * W) // s)
                    out[:, :, i, j] = fn(x[:, :, r0:r1, c0:c1], axis=(2, 3))
            pools[kind].append(out.reshape(B, -1))
    avg, mx = np.concatenate(pools["avg"], 1), np.concatenate(pools["max"], 1)
    v = avg + mx if m.variant == "cvpr" else np.concatenate([avg, mx], 1)
    w1 = m.channel[0].weight.detach().double().numpy()[:, :, 0, 0]
    w2 = m.channel[2].weight.detach().double().numpy()[:, :, 0, 0]
    h = np.maximum(v @ w1.T, 0) @ w2.T
    bn = m.channel[3]

    def bn_eval(z, bn_mod, axis_shape):
        mean = bn_mod.running_mean.double().numpy().reshape(axis_shape)
        var = bn_mod.running_var.double().numpy().reshape(axis_shape)
        g = bn_mod.weight.detach().double().numpy().reshape(axis_shape)
        b = bn_mod.bias.detach().double().numpy().reshape(axis_shape)
        return (z - mean) / np.sqrt(var + bn_mod.eps) * g + b

    cs = 1 / (1 + np.exp(-bn_eval(h, bn, (1, -1))))
    sp_in = np.stack([x.max(1), x.mean(1)], 1)
    k = m.spatial[0].weight.detach().double().numpy()[0]
    pad = np.pad(sp_in, ((0, 0), (0, 0), (3, 3), (3, 3)))
    conv = np.zeros((B, H, W))
    for r in range(H):
        for c in range(W):
            conv[:, r, c] = (pad[:, :, r:r + 7, c:c + 7] * k).sum(axis=(1, 2, 3))
    ss = 1 / (1 + np.exp(-bn_eval(conv, m.spatial[1], (1, 1, 1))))
    scale = (cs[:, :, None, None] + ss[:, None]) / 2
    if m.variant == "cvpr":
        x_age = x * scale
        return x - x_age, x_age
    x_id = x * scale
    return x_id, x - x_id


@pytest.mark.parametrize("variant", ["cvpr", "tpami"])
def test_afd_matches_independent_numpy(variant):
    m = randomize_(ref.AttentionModule(channels=32, reduction=16, variant=variant), seed=3).double().eval()
    x = torch.randn(2, 32, 7, 7, dtype=torch.float64)
    x_id, x_age = m(x)
    e_id, e_age = _afd_numpy(x.numpy(), m)
    np.testing.assert_allclose(x_id.detach().numpy(), e_id, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(x_age.detach().numpy(), e_age, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", ["cvpr", "tpami"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_afd_decomposition_sums_to_input(variant, mode):
    m = getattr(randomize_(ref.AttentionModule(variant=variant), seed=1), mode)()
    x = torch.randn(3, 512, 7, 7)
    x_id, x_age = m(x)
    torch.testing.assert_close(x_id + x_age, x, rtol=1e-6, atol=1e-6)


def test_afd_weight_shapes_per_variant():
    cvpr, tpami = ref.AttentionModule(variant="cvpr"), ref.AttentionModule(variant="tpami")
    assert cvpr.channel[0].weight.shape == (448, 7168, 1, 1) and cvpr.channel[2].weight.shape == (512, 448, 1, 1)
    assert tpami.channel[0].weight.shape == (896, 14336, 1, 1) and tpami.channel[2].weight.shape == (512, 896, 1, 1)
    assert len(cvpr.state_dict()) == len(tpami.state_dict()) == 13
    assert cvpr.spatial[1].momentum == 0.01 and cvpr.channel[3].momentum == 0.01


# -- routers -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("unit,groups,sigma,dim,starts", [
    (128, 7, 0.1, 819, [0, 115, 230, 345, 460, 575, 690]),
    (128, 7, 1 / 8, 800, [0, 112, 224, 336, 448, 560, 672]),
    (64, 7, 1 / 8, 400, [0, 56, 112, 168, 224, 280, 336]),
    (32, 7, 1 / 8, 200, [0, 28, 56, 84, 112, 140, 168]),
    (128, 4, 0.1, 473, [0, 115, 230, 345]),
    (128, 8, 0.1, 934, [0, 115, 230, 345, 460, 575, 690, 805]),
    (10, 3, 0.3, 24, [0, 7, 14]),
    (128, 5, 1.0, 128, [0, 0, 0, 0, 0]),
])
def test_router_windows_by_hand(unit, groups, sigma, dim, starts):
    assert ref.router_windows(unit, groups, sigma) == (dim, starts)
    r = ref.TaskRouter(unit, groups, sigma)
    assert r._unit_mapping.shape == (groups, dim)
    for g, s in enumerate(starts):
        row = r._unit_mapping[g]
        assert row.sum() == unit and row[s:s + unit].all()


@pytest.mark.parametrize("sigma", [0.1, 0.125, 0.3, 0.5])
def test_router_windows_overlap_as_specified(sigma):
    dim, starts = ref.router_windows(128, 7, sigma)
    for a, b in zip(starts, starts[1:]):
        overlap = a + 128 - b
        # the shared part is sigma*U up to the int() truncation of the starts
        assert abs(overlap - sigma * 128) < 1 + 1e-9
    assert starts[-1] + 128 <= dim


def test_router_masks_inputs():
    r = ref.TaskRouter(4, 3, 0.5)  # dim 8, starts 0, 2, 4
    x = torch.ones(3, 8, 1, 1)
    out = r(x, torch.tensor([0, 1, 2]))[:, :, 0, 0]
    assert out.tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1]]


@pytest.mark.parametrize("sigma", [0.0, -0.1, 1.01, float("nan"), "0.1", True])
def test_sigma_out_of_range(sigma):
    with pytest.raises(ValueError, match="sigma"):
        ref.router_windows(128, 7, sigma)


# -- DEX age and groups ----------------------------------------------------------------------------------------
def test_dex_age_by_hand():
    logits = torch.full((3, 101), -1e4)
    logits[0, 37] = 0.0                          # all mass on bin 37
    logits[1, 20] = logits[1, 30] = 0.0          # half on 20, half on 30
    logits[2] = 0.0                              # uniform over 0..100
    assert torch.allclose(ref.dex_age(logits), torch.tensor([37.0, 25.0, 50.0]))


@pytest.mark.parametrize("groups", sorted(AGE_GROUP_THRESHOLDS))
def test_age2group_tables(groups):
    t = AGE_GROUP_THRESHOLDS[groups]
    ages = np.array([0, t[0], t[0] + 0.5, t[0] + 1, t[-1], t[-1] + 1, 100.0])
    expected = [0, 0, 1, 1, len(t) - 1, len(t), len(t)]
    assert ref.age2group(ages, groups).tolist() == expected
    assert ref.age2group(torch.tensor(ages), groups).tolist() == expected
    assert ref.age2group(float(t[0] + 1), groups) == 1


def test_age2group_official_table_g7():
    ages = [5, 10, 11, 20, 21, 30, 31, 40, 41, 50, 51, 60, 61, 99]
    assert ref.age2group(np.array(ages), 7).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]


@pytest.mark.parametrize("groups", [3, 9, 0])
def test_age2group_rejects_unknown_group_counts(groups):
    with pytest.raises(ValueError, match="age_group"):
        ref.age2group(np.array([10.0]), groups)


# -- CosFace and GRL ---------------------------------------------------------------------------------------------
def test_cosface_by_hand():
    head = ref.CosFace(2, 3, s=10.0, m=0.5)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]]))
    logits = head(torch.tensor([[2.0, 0.0]]), torch.tensor([0]))
    assert torch.allclose(logits, torch.tensor([[10 * (1 - 0.5), 0.0, -10.0]]))


def test_gradient_reversal():
    x = torch.randn(4, 3, requires_grad=True)
    y = ref.grad_reverse(x, 0.5)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, -0.5))


# -- generator and discriminator shapes ----------------------------------------------------------------------------
def test_generator_is_residual_on_the_image_and_masks_dead_channel():
    g = ref.AgingModule(7, 4, 0.1).eval()
    assert g.conv_dim == 819
    img = torch.randn(2, 3, 112, 112)
    feats = [None, torch.randn(2, 64, 56, 56), torch.randn(2, 128, 28, 28), torch.randn(2, 256, 14, 14), None,
             torch.randn(2, 512, 7, 7), None]
    out = g(img, *feats, torch.tensor([0, 6]))
    assert out.shape == img.shape
    # with the official N(0, 0.01) init the generator is close to the identity mapping
    assert (out - img).abs().mean() < 0.1 * img.abs().mean()
    # channel 818 is never routed for any group when G=7, sigma=0.1
    assert g.router._unit_mapping[:, 818].sum() == 0


def test_patch_discriminator_shapes_and_keys():
    d = ref.PatchDiscriminator(7, repeat_num=4)
    out = d(torch.randn(2, 3, 112, 112), torch.tensor([1, 5]))
    assert out.shape == (2, 1, 5, 5)
    keys = d.state_dict().keys()
    assert "main.0.weight_orig" in keys and "main.0.weight_u" in keys and "main.8.weight" in keys
    assert d.state_dict()["main.0.weight_v"].shape == (1136,)
    assert len(keys) == 20
