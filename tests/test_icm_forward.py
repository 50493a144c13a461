"""The one-launch compact ICM inference forward (kernels/icm_forward.py): exactness against the reference ICM,
device-side grouping, launch and host-sync budgets."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from mtlface_fast import use_backend
from mtlface_fast.layers.icm import CompactICM, forward_supported, pack_forward
from mtlface_fast.reference.icm import ICMBase
from tests.launch_count import check_budget, count_launches
from tests.test_icm_kernels import _only_config, _program_order
from tests.utils import assert_close, max_rel_err, randomize_

KF = pytest.importorskip("mtlface_fast.kernels.icm_forward", reason="triton is not installed")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
_runs_kernels = DEV == "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
triton_only = pytest.mark.skipif(not _runs_kernels, reason="needs CUDA or the Triton interpreter (TRITON_INTERPRET=1)")


class CompactBase(CompactICM, ICMBase):
    """An ICM of either variant with the compact implementation."""


def _pair(variant="cvpr", G=7, sigma=0.1, unit=16, cin=12, repeat=1, seed=0, affine_in=False):
    ref = ICMBase(cin, G, unit, sigma, repeat, variant)
    if affine_in:  # InstanceNorm with affine parameters (an ICMBase variant the TPAMI code could build)
        for parent in [ref.conv1] + [b.conv1 for b in ref.transform] + [b.conv2 for b in ref.transform]:
            parent[1] = nn.InstanceNorm2d(ref.conv_dim, affine=True)
    randomize_(ref, seed=seed)
    fast = copy.deepcopy(ref)
    fast.__class__ = CompactBase
    return ref.eval(), fast.eval()


def _groups(B, G, seed):
    return torch.randint(0, G, (B,), generator=torch.Generator().manual_seed(seed))


# (variant, sigma, G, unit, B, H, W): SPT > 1 (small images: several samples per program, empty slots), one
# sample per program (7x7), sigma 1 (every window the same), prime batch, a single group, unit not a power of 2.
CASES = [("cvpr", 0.1, 7, 8, 5, 3, 3), ("tpami", 0.125, 7, 16, 6, 3, 4), ("cvpr", 1.0, 3, 16, 9, 2, 2),
         ("tpami", 0.3, 4, 12, 7, 7, 7), ("cvpr", 0.25, 1, 16, 3, 4, 5), ("cvpr", 0.5, 5, 20, 1, 7, 7)]


@triton_only
@pytest.mark.parametrize("variant,sigma,G,unit,B,H,W", CASES)
def test_one_launch_forward_matches_reference(variant, sigma, G, unit, B, H, W):
    ref, fast = _pair(variant, G, sigma, unit, seed=B)
    ref, fast = ref.to(DEV), fast.to(DEV)
    x = torch.randn(B, 12, H, W, device=DEV)
    g = _groups(B, G, seed=H).to(DEV)
    with use_backend("triton"), torch.no_grad():
        assert forward_supported(fast, x)
        got = fast.icm(x, g)
        expected = ref.icm(x, g)
    assert_close(got, expected, name="icm_forward")


@triton_only
def test_affine_instance_norm_and_strided_input():
    ref, fast = _pair("tpami", 4, 0.25, 16, seed=3, affine_in=True)
    x = torch.randn(4, 12, 5, 6, device=DEV).permute(0, 1, 3, 2)  # non-contiguous (B, C, 6, 5)
    g = torch.tensor([3, 0, 3, 1], device=DEV)
    with use_backend("triton"), torch.no_grad():
        assert_close(fast.to(DEV).icm(x, g), ref.to(DEV).icm(x, g), name="affine IN, strided x")


@triton_only
def test_out_of_range_groups_give_nan_without_host_check():
    # A device tensor's groups are not read back; the kernel writes NaN for a sample whose group is invalid.
    ref, fast = _pair("cvpr", 4, 0.25, 8, seed=4)
    x = torch.randn(5, 12, 3, 3, device=DEV)
    g = torch.tensor([1, 4, 0, -1, 1], device=DEV)
    with use_backend("triton"), torch.no_grad():
        out = KF.icm_forward(x, g, *pack_forward(fast, torch.float32), 8, 12, False, True, 0.0)
        ok = torch.tensor([0, 2, 4])
        expected = ref.icm(x[ok], g[ok])
        twin = KF._ref_forward(x, g, *pack_forward(fast, torch.float32), 8, 12, False, True, 0.0)
    assert torch.isnan(out[1]).all() and torch.isnan(out[3]).all()
    assert_close(out[ok], expected, name="valid samples")
    assert torch.isnan(twin[1]).all() and torch.isnan(twin[3]).all()
    assert_close(twin[ok], expected, name="aten twin")


@triton_only
def test_every_autotune_config_and_program_order():
    ref, fast = _pair("tpami", 7, 0.125, 64, seed=5)  # UP = 64: BLOCK_K 32 and 64 differ
    x = torch.randn(6, 12, 3, 3, device=DEV)
    g = torch.tensor([6, 0, 3, 3, 1, 3], device=DEV)
    with torch.no_grad():
        expected = ref.to(DEV).icm(x, g)
        packed = pack_forward(fast.to(DEV), torch.float32)
        for cfg in KF._forward_configs():
            with _only_config(KF._icm_fwd_kernel, cfg):
                got = KF.icm_forward(x, g, *packed, 64, 12, True, False, 1e-5)
            assert_close(got, expected, name=f"config {cfg}")
        if DEV == "cpu":
            with _program_order("reversed"):
                assert torch.equal(KF.icm_forward(x, g, *packed, 64, 12, True, False, 1e-5),
                                   KF.icm_forward(x, g, *packed, 64, 12, True, False, 1e-5))


@triton_only
def test_bf16_within_twice_the_reference_error():
    ref, fast = _pair("cvpr", 7, 0.1, 32, cin=32, repeat=2, seed=6)
    ref, fast = ref.to(DEV), fast.to(DEV)
    x, g = torch.randn(9, 32, 7, 7, device=DEV), _groups(9, 7, seed=6).to(DEV)
    with torch.no_grad():
        expected = ref.icm(x, g)
        with torch.autocast(DEV, dtype=torch.bfloat16):
            ref16 = ref.icm(x, g)
            with use_backend("triton"):
                got = fast.icm(x, g)
    assert got.dtype == torch.bfloat16
    assert_close(got.float(), expected, torch.bfloat16, name="bf16",
                 rtol=max(2e-2, 2 * max_rel_err(ref16.float(), expected)))


def test_aten_twin_is_exact_in_float64():
    # The op's aten body (torch.compile / export / CPU without the interpreter) in float64 equals the reference.
    for variant in ("cvpr", "tpami"):
        ref, fast = _pair(variant, 5, 0.3, 8, seed=7)
        ref, fast = ref.double(), fast.double()
        x, g = torch.randn(6, 12, 3, 4, dtype=torch.float64), _groups(6, 5, seed=7)
        with torch.no_grad():
            got = KF._ref_forward(x, g, *pack_forward(fast, torch.float64), 8, 12, variant == "tpami",
                                  variant == "cvpr", 1e-5)
            assert_close(got, ref.icm(x, g), torch.float64, name=f"{variant} twin fp64")


@triton_only
def test_opcheck():
    _, fast = _pair("cvpr", 3, 0.5, 8, seed=8)
    x, g = torch.randn(3, 12, 2, 3, device=DEV), torch.tensor([2, 0, 2], device=DEV)
    with torch.no_grad():  # an inference op: no autograd formula
        packed = pack_forward(fast.to(DEV), torch.float32)
    torch.library.opcheck(torch.ops.mtlface_fast.icm_forward.default, (x, g, *packed, 8, 12, False, True, 0.0))


def test_supported_calls():
    _, fast = _pair("cvpr", 4, 0.25, 8, seed=9)
    x = torch.randn(2, 12, 3, 3)
    with torch.no_grad():
        assert forward_supported(fast, x)
        assert not forward_supported(fast, torch.randn(2, 12, 23, 23))  # 1024 rows x 16 channels: too large
        fast.train()
        assert not forward_supported(fast, x)  # batch statistics
        fast.eval()
    assert not forward_supported(fast, x)  # gradients (parameters require them) take the op path


# -- launch and sync budgets (kernels stubbed: full sizes at host cost) -----------------------------

@pytest.fixture(scope="module")
def full_size():
    torch.manual_seed(0)
    return {v: CompactBase(512, 7, 128, 0.1 if v == "cvpr" else 0.125, 4, v).eval() for v in ("cvpr", "tpami")}


@pytest.mark.parametrize("variant", ["cvpr", "tpami"])
@pytest.mark.parametrize("B", [1, 64])
def test_eval_forward_is_one_launch_without_host_syncs(full_size, variant, B):
    m = full_size[variant]
    x, g = torch.randn(B, 512, 7, 7), torch.randint(0, 7, (B,))
    with use_backend("triton"), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with count_launches() as first:  # packs the operands: aten ops, still no sync
            m.icm(x, g)
        check_budget(first, None, 0, "first call")
        with count_launches() as rec:
            m.icm(x, g)
    check_budget(rec, 1, 0, f"{variant} B={B} eval forward")
    assert [name for name, _ in rec.triton] == ["_icm_fwd_kernel"] and not rec.aten
    assert rec.triton[0][1] == (B + 7 + 1,)  # one program per sample (7x7), + one per group, + the NaN writer


def test_packed_operands_rebuilt_when_weights_change(full_size):
    m = full_size["cvpr"]
    x, g = torch.randn(2, 512, 7, 7), torch.tensor([0, 6])
    with use_backend("triton"), torch.no_grad():
        m.icm(x, g)
        with count_launches() as rec:
            m.icm(x, g)
        assert not rec.aten
        m.transform[2].conv2[1].running_var.mul_(1.5)  # an in-place update of one statistic, by hand:
        m.weights_changed()  # announced (loading, .to(), train/eval and optimizer steps need no call)
        with count_launches() as rec:
            m.icm(x, g)
        assert rec.aten, "the packed operands were not rebuilt"
        check_budget(rec, None, 0, "rebuild")


def test_training_forward_backward_has_no_host_sync(full_size):
    m = copy.deepcopy(full_size["cvpr"]).train()
    x = torch.randn(8, 512, 7, 7, requires_grad=True)
    g = torch.randint(0, 7, (8,))
    with use_backend("triton"), count_launches() as rec:
        m.icm(x, g).sum().backward()
    check_budget(rec, None, 0, "training forward + backward")


@triton_only
def test_poisoned_output_and_scratch(monkeypatch):
    # NaN in every buffer the launcher allocates (output and scratch): the kernel writes every valid output and
    # never reads a scratch value it has not written (padded pixels, empty sample slots, both variants).
    real_empty = torch.empty
    monkeypatch.setattr(KF.torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    for variant in ("cvpr", "tpami"):
        ref, fast = _pair(variant, 4, 0.25, 16, seed=10)
        x = torch.randn(5, 12, 3, 3, device=DEV)  # SPT = 4: two tiles of group 1, one with three empty slots
        g = torch.tensor([1, 1, 1, 1, 1], device=DEV)
        with use_backend("triton"), torch.no_grad():
            got = fast.to(DEV).icm(x, g)
            assert torch.isfinite(got).all()
            assert_close(got, ref.to(DEV).icm(x, g), name=f"{variant} poisoned buffers")


def test_counter_sees_launches_and_syncs():
    # The budget tests above are only as good as the counter: it must see aten launches, host reads and
    # (stubbed) Triton launches, and check_budget must fail with the record.
    with count_launches(as_cuda=False) as rec:
        t = torch.arange(6.0) + 1
        if t.sum() > 0:  # Tensor.__bool__
            t.max().item()
        torch.bincount(torch.tensor([0, 2, 2]))
        _, fast = _pair("cvpr", 4, 0.25, 8, seed=11)
        with use_backend("triton"), torch.no_grad():
            KF.icm_forward(torch.randn(2, 12, 3, 3), torch.tensor([0, 3]), *pack_forward(fast, torch.float32),
                           8, 12, False, True, 0.0)
    assert {"add", "sum", "max"} <= set(rec.aten)
    assert [name for name, _ in rec.syncs][:3] == ["Tensor.__bool__", "Tensor.item", "torch.bincount"]
    assert [name for name, _ in rec.triton] == ["_icm_fwd_kernel"]
    with pytest.raises(AssertionError, match="budget 1 launches / 0 syncs exceeded"):
        check_budget(rec, 1, 0, "counter")
