"""The fused AFD eval forward (``afd_eval``: pool, branches, apply in three launches) and the launch budget.

The exactness tests in tests/test_afd_kernels.py run the differentiable path (their inputs need gradients);
these run inference (``torch.no_grad``), where the module takes ``afd_eval``.
"""
import copy

import pytest
import torch

from mtlface_fast import use_backend
from mtlface_fast.kernels import afd as ops
from mtlface_fast.layers import FusedAttentionModule
from mtlface_fast.reference.afd import AttentionModule
from tests.launch_count import count_launches
from tests.test_afd_kernels import _poisoned_allocations, _x
from tests.utils import assert_close, max_rel_err, randomize_, tol

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _pair(variant, channels=32, seed=5, dtype=torch.float32):
    ref = randomize_(AttentionModule(channels, 16, variant), seed=seed).to(DEVICE, dtype).eval()
    fast = FusedAttentionModule(channels, 16, variant).to(DEVICE, dtype).eval()
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _infer(module, x, backend):
    with torch.no_grad(), use_backend(backend), _poisoned_allocations():
        return module(x)


# (variant, dtype, B, C, (H, W), channels_last, GPU tiles): B above 16 spans two sample tiles of the branch
# kernel and several apply programs; the GPU pooling tile (16 channels) on C=96 makes six pooling partials
# per sample that the branch kernel merges.
CASES = [
    ("cvpr", torch.float64, 3, 32, (7, 7), False, False), ("tpami", torch.float64, 2, 32, (5, 6), True, False),
    ("cvpr", torch.float32, 17, 32, (7, 7), True, False), ("tpami", torch.float32, 1, 32, (7, 7), False, False),
    ("cvpr", torch.float32, 3, 96, (7, 7), False, True), ("tpami", torch.float32, 3, 96, (5, 6), True, True),
]


@pytest.mark.parametrize("variant,dtype,b,channels,hw,channels_last,gpu_tiles", CASES)
def test_eval_matches_reference(variant, dtype, b, channels, hw, channels_last, gpu_tiles, monkeypatch):
    """fp64: equal to the reference to round-off (1e-12 relative); fp32: the fp32 tolerance."""
    if gpu_tiles:
        pool_tile = ops._pool_tile
        monkeypatch.setattr(ops, "_pool_tile", lambda c, h, w, on_gpu: pool_tile(c, h, w, True))
    ref, fast = _pair(variant, channels, dtype=dtype)
    x = _x(b, channels=channels, hw=hw, channels_last=channels_last, seed=b, dtype=dtype)
    want = _infer(ref, x, "torch")
    got = _infer(fast, x, "triton")
    for name, u, v in zip(("x_id", "x_age"), got, want):
        assert u.dtype == dtype
        assert_close(u, v, rtol=1e-12 if dtype == torch.float64 else None, name=name)
        if channels_last:
            assert u.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_eval_low_precision(dtype):
    """bf16/fp16 module and input against the fp32 reference on the same rounded values: within the dtype's
    tolerance or twice the error of the reference run in that dtype."""
    ref, fast = _pair("cvpr")
    ref.load_state_dict({k: (v.to(dtype).float() if v.is_floating_point() else v) for k, v in ref.state_dict().items()})
    low_ref = copy.deepcopy(ref).to(dtype)
    fast.load_state_dict(ref.state_dict())
    fast.to(dtype)
    x = _x(5, seed=2, dtype=dtype)
    want = _infer(ref, x.float(), "torch")
    low = _infer(low_ref, x, "torch")
    got = _infer(fast, x, "triton")
    for name, u, v, w in zip(("x_id", "x_age"), got, want, low):
        assert u.dtype == dtype
        assert_close(u, v, rtol=max(tol(dtype)[0], 2 * max_rel_err(w, v)), name=name)


def test_eval_direct_call_equals_the_op():
    """Eager inference runs the op's body directly; the registered op gives the same bits."""
    _, fast = _pair("tpami")
    x = _x(3, seed=4)
    with torch.no_grad(), use_backend("triton"):
        p = fast._eval_operands(x.dtype, (7, 7))
        args = (x, p["w1"], p["w2"], p["b2"], p["ts"], p["bs"], True, False)
        assert ops._direct_call_ok(*args[:6])
        for u, v in zip(ops.eval_forward(*args), ops.afd_eval(*args)):
            assert torch.equal(u, v)


def test_eval_operands_keyed_by_map_size():
    """The spatial matrix ``ts`` is the folded 7x7 convolution on the given map: applying it to [max, mean]
    equals the convolution; a second map size gets its own operands."""
    _, fast = _pair("cvpr")
    with torch.no_grad():
        a = fast._eval_operands(torch.float64, (5, 6))
        assert fast._eval_operands(torch.float64, (5, 6)) is a
        assert fast._eval_operands(torch.float64, (7, 7)) is not a
        sp = torch.randn(3, 2, 5, 6, dtype=torch.float64, device=DEVICE)
        conv = torch.nn.functional.conv2d(sp, a["ws"], a["bs"], padding=3)
        mat = (sp.reshape(3, 2, 30, 1) * a["ts"]).sum((1, 2)) + a["bs"]
        assert_close(mat, conv.reshape(3, 30), rtol=1e-14)


def test_afd_eval_opcheck():
    """Schema, fake kernel, autograd registration. ``afd_eval`` is inference-only (no autograd formula: the
    module takes the differentiable ops when anything needs a gradient), so opcheck's AOT-dispatch test,
    which differentiates through the op, does not apply."""
    _, fast = _pair("cvpr", channels=4)
    x = _x(2, channels=4, hw=(3, 3), seed=1)
    with torch.no_grad():
        p = fast._eval_operands(x.dtype, (3, 3))
    torch.library.opcheck(ops.afd_eval, (x, p["w1"], p["w2"], p["b2"], p["ts"], p["bs"], False, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("variant", ["cvpr", "tpami"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_eval_launch_budget(variant, dtype):
    """Eval forward at the real channel count: at most 3 launches (here exactly the three kernels), no host
    sync, no aten op that launches a device kernel (the folded operands are cached after the first call)."""
    _, fast = _pair(variant, channels=512, dtype=dtype)
    x = _x(4, channels=512, seed=3, dtype=dtype)
    with torch.no_grad(), use_backend("triton"):
        fast(x)  # builds the cached operands
        with count_launches() as rec:
            fast(x)
    rec.check(max_launches=3, max_syncs=0)
    assert [t.split()[0] for t in rec.triton] == ["_afd_pool_fwd_kernel", "_afd_branch_fwd_kernel",
                                                 "_afd_apply_fwd_kernel"], rec.report()
    assert not rec.aten, rec.report()


def test_launch_counter_counts_what_it_should():
    """The counter itself: innermost compute aten ops (not views or allocations), stubbed Triton launches
    and host syncs, each exactly once."""
    import triton
    import triton.language as tl

    @triton.jit
    def _fill(o_ptr, BLOCK: tl.constexpr):
        tl.store(o_ptr + tl.arange(0, BLOCK), tl.full((BLOCK,), 1.0, tl.float32))

    x = torch.randn(4, 8)
    with count_launches() as rec:
        y = torch.nn.functional.linear(x, torch.ones(3, 8))  # ones: a fill; linear: one mm
        z = y.view(-1).relu()  # view: none; relu: one
        if torch.cuda.is_available() or ops.use_kernel(x):
            _fill[(1,)](torch.empty(16, device=x.device), BLOCK=16)
        n = int(z.sum())  # sum: one; int(): one sync
    assert n == int(torch.relu(x @ torch.ones(8, 3)).sum())
    assert len(rec.triton) == 1 and rec.triton[0].startswith("_fill"), rec.report()
    assert len(rec.aten) == 4, rec.report()
    assert len(rec.syncs) == 1 and "__int__" in rec.syncs[0], rec.report()
    with pytest.raises(AssertionError, match="_fill"):
        rec.check(max_launches=4)
