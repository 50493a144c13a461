"""Fused AFD passes over the (B, C, H, W) feature map: pooling, decomposition, and their backward.

Ops (``torch.ops.mtlface_fast.*``), each a ``triton_op`` whose PyTorch twin in
:mod:`mtlface_fast.layers.afd` is also its export decomposition:

* ``afd_pool(x, concat, with_idx) -> (feat, feat_idx, sp, sp_idx)``: reads x once; SPP avg/max at sizes 1, 2, 3
  with PyTorch's adaptive windows (start = floor(i*H/s), end = ceil((i+1)*H/s)) in (size, c, i, j) order,
  summed (CVPR) or concatenated avg-then-max (TPAMI), plus max and mean over channels per pixel. The
  argmax of every max (first in window order, as PyTorch) is returned for backward.
* ``afd_apply(x, cs, ss, att_is_age) -> (x_id, x_age)``: reads x once, writes both outputs.
* ``afd_pool_backward`` / ``afd_apply_backward``: their gradients, one pass each; the reductions over
  pixels and channels are per-program fp32 partials summed on the host (deterministic, no atomics).

:func:`pool` and :func:`apply` are what the module calls: the registered op, or in eager inference its
body run directly (no dispatcher; the same code the op's eager kernel runs).

Every statistic is fp32 (fp64 for fp64 inputs) whatever the input dtype; any input strides
(contiguous, channels_last, sliced) are read as they are. ``afd_pool`` runs one program per sample (the
channel max/mean reduce over all channels, so no cross-program reduction is needed); the other kernels run
one program per (sample, block of channels). The batch is always grid axis 0 (no 65535 limit) and
sample offsets are int64.
"""
from __future__ import annotations

import functools
from typing import Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from mtlface_fast.backend import interpreter_enabled
from mtlface_fast.layers.afd import (SPP_BINS, apply_backward_torch, apply_torch, pool_backward_torch,
                                     pool_torch, stats_dtype)

from .utils import check_same_device, register_decomposition


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _afd_pool_fwd_kernel(
    x_ptr,  # (B, C, H, W) input, any strides
    feat_ptr,  # (B, K) pooled features, K = 14C (CONCAT=False: avg + max) or 28C (avg then max)
    fidx_ptr,  # (B, 14C) int32 flat pixel index (h*W + w) of the max of every max-SPP bin (WITH_IDX)
    sp_ptr,  # (B, 2, H, W) [max over channels, mean over channels]
    spidx_ptr,  # (B, H, W) int32 channel index of the max over channels (WITH_IDX)
    C, stride_xb, stride_xc, stride_xh, stride_xw,
    H: tl.constexpr, W: tl.constexpr, CONCAT: tl.constexpr, WITH_IDX: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    acc_ty = feat_ptr.dtype.element_ty
    offs_h = tl.arange(0, BLOCK_H)
    offs_w = tl.arange(0, BLOCK_W)
    hw_mask = (offs_h < H)[:, None] & (offs_w < W)[None, :]
    pix = offs_h[:, None] * stride_xh + offs_w[None, :] * stride_xw  # (BLOCK_H, BLOCK_W)
    nbins = 14 * C
    if CONCAT:
        feat_base = feat_ptr + b * (2 * nbins)
    else:
        feat_base = feat_ptr + b * nbins
    fidx_base = fidx_ptr + b * nbins
    x_base = x_ptr + b * stride_xb
    cmax = tl.full((BLOCK_H, BLOCK_W), float("-inf"), acc_ty)
    cidx = tl.zeros((BLOCK_H, BLOCK_W), tl.int32)
    csum = tl.zeros((BLOCK_H, BLOCK_W), acc_ty)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        mask = c_mask[:, None, None] & hw_mask[None, :, :]
        v = tl.load(x_base + offs_c[:, None, None] * stride_xc + pix[None, :, :], mask=mask,
                    other=float("-inf")).to(acc_ty)
        vz = tl.where(mask, v, 0.0)
        # Max over channels; ties go to the lowest channel (strict > across blocks, min index within).
        bmax = tl.max(v, axis=0)
        if WITH_IDX:
            bidx = tl.min(tl.where(v == bmax[None, :, :], offs_c[:, None, None], C), axis=0)
            cidx = tl.where(bmax > cmax, bidx, cidx)
        cmax = tl.maximum(cmax, bmax)
        csum += tl.sum(vz, axis=0)
        # SPP bins, separable: reduce each column window over w, then each row window over h. Window
        # bounds are compile-time constants for a given (H, W).
        for s in tl.static_range(1, 4):
            for j in tl.static_range(0, s):
                w0 = (j * W) // s
                w1 = ((j + 1) * W + s - 1) // s
                cwin = ((offs_w >= w0) & (offs_w < w1))[None, None, :]
                vw = tl.where(cwin, v, float("-inf"))
                colmax = tl.max(vw, axis=2)  # (BLOCK_C, BLOCK_H)
                colsum = tl.sum(tl.where(cwin, vz, 0.0), axis=2)
                if WITH_IDX:  # first max column of each row
                    colarg = tl.min(tl.where(vw == colmax[:, :, None], offs_w[None, None, :], BLOCK_W), axis=2)
                for i in tl.static_range(0, s):
                    h0 = (i * H) // s
                    h1 = ((i + 1) * H + s - 1) // s
                    rwin = ((offs_h >= h0) & (offs_h < h1))[None, :]
                    cm = tl.where(rwin, colmax, float("-inf"))
                    wmax = tl.max(cm, axis=1)
                    wavg = tl.sum(tl.where(rwin, colsum, 0.0), axis=1) / ((h1 - h0) * (w1 - w0))
                    k = ((s - 1) * s * (2 * s - 1) // 6) * C + offs_c * (s * s) + (i * s + j)
                    if CONCAT:
                        tl.store(feat_base + k, wavg, mask=c_mask)
                        tl.store(feat_base + nbins + k, wmax, mask=c_mask)
                    else:
                        tl.store(feat_base + k, wavg + wmax, mask=c_mask)
                    if WITH_IDX:  # first max in row-major window order, like PyTorch's adaptive max pool
                        row = tl.min(tl.where(cm == wmax[:, None], offs_h[None, :], BLOCK_H), axis=1)
                        col = tl.sum(tl.where(offs_h[None, :] == row[:, None], colarg, 0), axis=1)
                        tl.store(fidx_base + k, row * W + col, mask=c_mask)
    sp_off = offs_h[:, None] * W + offs_w[None, :]
    sp_base = sp_ptr + b * (2 * H * W)
    tl.store(sp_base + sp_off, cmax, mask=hw_mask)
    tl.store(sp_base + H * W + sp_off, csum / C, mask=hw_mask)
    if WITH_IDX:
        tl.store(spidx_ptr + b * (H * W) + sp_off, cidx, mask=hw_mask)


@triton.jit
def _afd_pool_bwd_kernel(
    dfeat_ptr,  # (B, K) gradient of feat (layout as in the forward)
    fidx_ptr,  # (B, 14C) int32 argmax pixels of the max-SPP bins
    dsp_ptr,  # (B, 2, H*W) gradient of sp
    spidx_ptr,  # (B, H*W) int32 argmax channels of the max over channels
    dx_ptr,  # (B, C, H, W) output, any strides
    C, stride_db, stride_dc, stride_dh, stride_dw,
    H: tl.constexpr, W: tl.constexpr, CONCAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    acc_ty = dfeat_ptr.dtype.element_ty
    offs_p = tl.arange(0, BLOCK_P)
    ph = offs_p // W
    pw = offs_p % W
    p_mask = offs_p < H * W
    c_mask = offs_c < C
    nbins = 14 * C
    if CONCAT:
        dfeat_base = dfeat_ptr + b * (2 * nbins)
    else:
        dfeat_base = dfeat_ptr + b * nbins
    fidx_base = fidx_ptr + b * nbins
    dsp_base = dsp_ptr + b * (2 * H * W)
    dmax_c = tl.load(dsp_base + offs_p, mask=p_mask, other=0.0)
    dmean_c = tl.load(dsp_base + H * W + offs_p, mask=p_mask, other=0.0)
    sidx = tl.load(spidx_ptr + b * (H * W) + offs_p, mask=p_mask, other=-1)
    acc = tl.zeros((BLOCK_C, BLOCK_P), acc_ty) + (dmean_c / C)[None, :]
    acc += tl.where(offs_c[:, None] == sidx[None, :], dmax_c[None, :], 0.0)
    for s in tl.static_range(1, 4):
        for i in tl.static_range(0, s):
            for j in tl.static_range(0, s):
                h0 = (i * H) // s
                h1 = ((i + 1) * H + s - 1) // s
                w0 = (j * W) // s
                w1 = ((j + 1) * W + s - 1) // s
                win = (ph >= h0) & (ph < h1) & (pw >= w0) & (pw < w1)
                k = ((s - 1) * s * (2 * s - 1) // 6) * C + offs_c * (s * s) + (i * s + j)
                da = tl.load(dfeat_base + k, mask=c_mask, other=0.0)
                if CONCAT:
                    dm = tl.load(dfeat_base + nbins + k, mask=c_mask, other=0.0)
                else:
                    dm = da
                widx = tl.load(fidx_base + k, mask=c_mask, other=-1)
                acc += tl.where(win[None, :], (da / ((h1 - h0) * (w1 - w0)))[:, None], 0.0)
                acc += tl.where(offs_p[None, :] == widx[:, None], dm[:, None], 0.0)
    mask = c_mask[:, None] & p_mask[None, :]
    ptrs = dx_ptr + b * stride_db + offs_c[:, None] * stride_dc + (ph * stride_dh + pw * stride_dw)[None, :]
    tl.store(ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _afd_apply_fwd_kernel(
    x_ptr,  # (B, C, H, W) input, any strides
    cs_ptr,  # (B, C) channel scale (stats dtype)
    ss_ptr,  # (B, H*W) spatial scale (stats dtype)
    id_ptr,  # (B, C, H, W) x_id output, strides stride_o*
    age_ptr,  # (B, C, H, W) x_age output, same strides as x_id
    C, stride_xb, stride_xc, stride_xh, stride_xw, stride_ob, stride_oc, stride_oh, stride_ow,
    H: tl.constexpr, W: tl.constexpr, ATT_IS_AGE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    acc_ty = cs_ptr.dtype.element_ty
    offs_p = tl.arange(0, BLOCK_P)
    ph = offs_p // W
    pw = offs_p % W
    mask = (offs_c < C)[:, None] & (offs_p < H * W)[None, :]
    x = tl.load(x_ptr + b * stride_xb + offs_c[:, None] * stride_xc + (ph * stride_xh + pw * stride_xw)[None, :],
                mask=mask, other=0.0).to(acc_ty)
    cs = tl.load(cs_ptr + b * C + offs_c, mask=offs_c < C, other=0.0)
    ss = tl.load(ss_ptr + b * (H * W) + offs_p, mask=offs_p < H * W, other=0.0)
    att = x * ((cs[:, None] + ss[None, :]) * 0.5)
    res = x - att
    o = b * stride_ob + offs_c[:, None] * stride_oc + (ph * stride_oh + pw * stride_ow)[None, :]
    out_ty = id_ptr.dtype.element_ty
    if ATT_IS_AGE:
        tl.store(age_ptr + o, att.to(out_ty), mask=mask)
        tl.store(id_ptr + o, res.to(out_ty), mask=mask)
    else:
        tl.store(id_ptr + o, att.to(out_ty), mask=mask)
        tl.store(age_ptr + o, res.to(out_ty), mask=mask)


@triton.jit
def _afd_apply_bwd_kernel(
    x_ptr,  # (B, C, H, W) forward input, strides stride_x*
    cs_ptr,  # (B, C) channel scale
    ss_ptr,  # (B, H*W) spatial scale
    gid_ptr,  # (B, C, H, W) gradient of x_id, strides stride_i*
    gage_ptr,  # (B, C, H, W) gradient of x_age, strides stride_a*
    dx_ptr,  # (B, C, H, W) output, strides stride_d*
    dcs_ptr,  # (B, C) output: gradient of cs (complete: one program holds all pixels of a channel)
    dss_ptr,  # (B, NBLK, H*W) output: per-channel-block partial gradients of ss, summed on the host
    C, NBLK,
    stride_xb, stride_xc, stride_xh, stride_xw, stride_ib, stride_ic, stride_ih, stride_iw,
    stride_ab, stride_ac, stride_ah, stride_aw, stride_db, stride_dc, stride_dh, stride_dw,
    H: tl.constexpr, W: tl.constexpr, ATT_IS_AGE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    acc_ty = cs_ptr.dtype.element_ty
    offs_p = tl.arange(0, BLOCK_P)
    ph = offs_p // W
    pw = offs_p % W
    c_mask = offs_c < C
    p_mask = offs_p < H * W
    mask = c_mask[:, None] & p_mask[None, :]
    pix = ph * stride_xh + pw * stride_xw
    x = tl.load(x_ptr + b * stride_xb + offs_c[:, None] * stride_xc + pix[None, :], mask=mask, other=0.0).to(acc_ty)
    g_id = tl.load(gid_ptr + b * stride_ib + offs_c[:, None] * stride_ic + (ph * stride_ih + pw * stride_iw)[None, :],
                   mask=mask, other=0.0).to(acc_ty)
    g_age = tl.load(gage_ptr + b * stride_ab + offs_c[:, None] * stride_ac + (ph * stride_ah + pw * stride_aw)[None, :],
                    mask=mask, other=0.0).to(acc_ty)
    if ATT_IS_AGE:
        g_att = g_age
        g_res = g_id
    else:
        g_att = g_id
        g_res = g_age
    cs = tl.load(cs_ptr + b * C + offs_c, mask=c_mask, other=0.0)
    ss = tl.load(ss_ptr + b * (H * W) + offs_p, mask=p_mask, other=0.0)
    d = g_att - g_res
    dx = g_res + d * ((cs[:, None] + ss[None, :]) * 0.5)
    tl.store(dx_ptr + b * stride_db + offs_c[:, None] * stride_dc + (ph * stride_dh + pw * stride_dw)[None, :],
             dx.to(dx_ptr.dtype.element_ty), mask=mask)
    dm = d * x * 0.5  # masked lanes are 0 (x and grads loaded as 0)
    tl.store(dcs_ptr + b * C + offs_c, tl.sum(dm, axis=1), mask=c_mask)
    tl.store(dss_ptr + (b * NBLK + cb) * (H * W) + offs_p, tl.sum(dm, axis=0), mask=p_mask)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------

try:  # private helpers, present in every torch that has triton_op (2.6+); guarded all the same
    from torch._subclasses.fake_tensor import FakeTensor, is_fake
except ImportError:  # pragma: no cover
    FakeTensor = ()

    def is_fake(x) -> bool:
        return False


def _proxy_tracing() -> bool:
    try:
        return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None
    except AttributeError:  # pragma: no cover
        return False


def _launch_kernels(x: torch.Tensor) -> bool:
    """Kernels on CUDA, and on CPU when the Triton interpreter is on; else the PyTorch twin.

    Tracing CPU tensors (torch.compile, export, fake shape propagation) takes the twin as well: the
    interpreter cannot run on fake tensors and Inductor does not emit user Triton kernels for CPU.
    """
    if x.is_cuda:
        return True
    return interpreter_enabled() and not is_fake(x)


def _shapes_only(x: torch.Tensor) -> bool:
    """A bare fake tensor outside graph tracing (fake shape propagation, e.g. the fake half of opcheck):
    allocate the outputs, launch nothing. Graph tracing (torch.compile's functional tensors, make_fx's proxy
    mode) goes on to ``wrap_triton``, which records the launch in the graph."""
    return isinstance(x, FakeTensor) and not _proxy_tracing()


# Host-side launch geometry in plain Python: triton.next_power_of_2 / triton.cdiv are JIT-aware helpers
# that cost microseconds per call on the host, and these run on every launch.
def _pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length() if n > 1 else 1


def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


@functools.lru_cache(maxsize=None)
def _tile(C: int, H: int, W: int, target: int = 4096):
    """(BLOCK_C, BLOCK_P, num_warps): a (BLOCK_C, BLOCK_P) tile of about ``target`` elements."""
    block_p = _pow2(H * W)
    block_c = max(1, min(_pow2(C), target // block_p))
    return block_c, block_p, (4 if block_c * block_p <= 2048 else 8)


try:  # how the ops' eager CUDA/CPU kernel runs the body (torch/_library/triton.py: backend_fn)
    from torch._library.triton import set_wrap_triton_enabled as _wrap_triton_enabled
except ImportError:  # pragma: no cover
    _wrap_triton_enabled = None


def _direct_call_ok(*tensors: torch.Tensor) -> bool:
    """Whether an eager call may run an op's body itself rather than through the dispatcher (~15 us of
    host time per op on CPU, more than the kernels take at small batches): real tensors only (no
    fake, functional or functorch-wrapped ones), nothing to differentiate, no compile, tracing or
    dispatch mode that has to see the op. The body then runs exactly as the op's eager kernel runs it."""
    if _wrap_triton_enabled is None or torch.compiler.is_compiling() or _proxy_tracing():
        return False
    if getattr(torch._C, "_len_torch_dispatch_stack", lambda: 1)() > 0:
        return False
    wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    grad = torch.is_grad_enabled()
    for t in tensors:
        if type(t) is not torch.Tensor or (grad and t.requires_grad) or wrapped is None or wrapped(t):
            return False
    return True


def pool(x: torch.Tensor, concat: bool, with_idx: bool = True
         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`afd_pool`, called directly in eager inference (see :func:`_direct_call_ok`)."""
    if _direct_call_ok(x):
        with _wrap_triton_enabled(False):
            return _afd_pool(x, concat, with_idx)
    return afd_pool(x, concat, with_idx)


def apply(x: torch.Tensor, cs: torch.Tensor, ss: torch.Tensor, att_is_age: bool
          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`afd_apply`, called directly in eager inference (see :func:`_direct_call_ok`)."""
    if _direct_call_ok(x, cs, ss):
        with _wrap_triton_enabled(False):
            return _afd_apply(x, cs, ss, att_is_age)
    return afd_apply(x, cs, ss, att_is_age)


@functools.lru_cache(maxsize=None)
def _pool_tile(C: int, H: int, W: int, on_gpu: bool):
    """(BLOCK_C, BLOCK_H, BLOCK_W) of the pooling kernel: a tile of ~2048 elements on GPU; the interpreter
    prefers few big tiles (8192). Tests force the GPU choice on CPU to cover its channel-block loop."""
    block_h, block_w = _pow2(H), _pow2(W)
    target = 2048 if on_gpu else 8192
    return max(1, min(_pow2(C), target // (block_h * block_w))), block_h, block_w


def _check_x(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D (B, C, H, W) tensor, got {getattr(x, 'shape', type(x))}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")


def _afd_pool(x: torch.Tensor, concat: bool, with_idx: bool = True
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pooled inputs of both AFD branches in one pass over ``x``; see :func:`mtlface_fast.layers.afd.pool_torch`.

    ``with_idx=False`` (inference) skips the argmax bookkeeping; the index outputs are then empty.
    """
    _check_x(x)
    if not _launch_kernels(x):
        return pool_torch(x, concat, with_idx)
    B, C, H, W = x.shape
    acc = stats_dtype(x.dtype)
    nbins = SPP_BINS * C
    feat = torch.empty((B, nbins * (2 if concat else 1)), device=x.device, dtype=acc)
    feat_idx = torch.empty((B, nbins if with_idx else 0), device=x.device, dtype=torch.int32)
    sp = torch.empty((B, 2, H, W), device=x.device, dtype=acc)
    sp_idx = torch.empty((B, H, W) if with_idx else (B, 0, 0), device=x.device, dtype=torch.int32)
    if _shapes_only(x):
        return feat, feat_idx, sp, sp_idx
    block_c, block_h, block_w = _pool_tile(int(C), int(H), int(W), x.is_cuda)
    wrap_triton(_afd_pool_fwd_kernel)[(B,)](
        x, feat, feat_idx, sp, sp_idx, C, *x.stride(),
        H=int(H), W=int(W), CONCAT=concat, WITH_IDX=with_idx, BLOCK_C=block_c, BLOCK_H=block_h,
        BLOCK_W=block_w, num_warps=4)
    return feat, feat_idx, sp, sp_idx


afd_pool = triton_op("mtlface_fast::afd_pool", mutates_args=())(_afd_pool)


@triton_op("mtlface_fast::afd_pool_backward", mutates_args=())
def afd_pool_backward(x: torch.Tensor, dfeat: torch.Tensor, feat_idx: torch.Tensor, dsp: torch.Tensor,
                      sp_idx: torch.Tensor, concat: bool) -> torch.Tensor:
    """dx of :func:`afd_pool` (``x`` gives shape, dtype and layout only)."""
    if not _launch_kernels(x):
        return pool_backward_torch(x, dfeat, feat_idx, dsp, sp_idx, concat)
    B, C, H, W = x.shape
    dfeat, feat_idx, dsp, sp_idx = dfeat.contiguous(), feat_idx.contiguous(), dsp.contiguous(), sp_idx.contiguous()
    dx = torch.empty_like(x)
    block_c, block_p, warps = _tile(int(C), int(H), int(W))
    if _shapes_only(x):
        return dx
    wrap_triton(_afd_pool_bwd_kernel)[(B, _cdiv(C, block_c))](
        dfeat, feat_idx, dsp, sp_idx, dx, C, *dx.stride(),
        H=int(H), W=int(W), CONCAT=concat, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=warps)
    return dx


def _check_scales(x: torch.Tensor, cs: torch.Tensor, ss: torch.Tensor) -> None:
    _check_x(x)
    B, C, H, W = x.shape
    if tuple(cs.shape) != (B, C):
        raise ValueError(f"cs must have shape (B, C) = {(B, C)}, got {tuple(cs.shape)}")
    if tuple(ss.shape) != (B, H, W):
        raise ValueError(f"ss must have shape (B, H, W) = {(B, H, W)}, got {tuple(ss.shape)}")
    if cs.dtype != stats_dtype(x.dtype) or ss.dtype != cs.dtype:
        raise TypeError(f"cs and ss must be {stats_dtype(x.dtype)} for x of {x.dtype}, got {cs.dtype} and {ss.dtype}")
    if cs.device != x.device or ss.device != x.device:
        check_same_device(x=x, cs=cs, ss=ss)


def _afd_apply(x: torch.Tensor, cs: torch.Tensor, ss: torch.Tensor, att_is_age: bool
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x_id, x_age) in one pass over ``x``; see :func:`mtlface_fast.layers.afd.apply_torch`."""
    _check_scales(x, cs, ss)
    if not _launch_kernels(x):
        return apply_torch(x, cs, ss, att_is_age)
    B, C, H, W = x.shape
    cs, ss = cs.contiguous(), ss.contiguous()
    x_id = torch.empty_like(x)
    x_age = torch.empty_like(x)
    block_c, block_p, warps = _tile(int(C), int(H), int(W))
    if _shapes_only(x):
        return x_id, x_age
    wrap_triton(_afd_apply_fwd_kernel)[(B, _cdiv(C, block_c))](
        x, cs, ss, x_id, x_age, C, *x.stride(), *x_id.stride(),
        H=int(H), W=int(W), ATT_IS_AGE=att_is_age, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=warps)
    return x_id, x_age


afd_apply = triton_op("mtlface_fast::afd_apply", mutates_args=())(_afd_apply)


@triton_op("mtlface_fast::afd_apply_backward", mutates_args=())
def afd_apply_backward(x: torch.Tensor, cs: torch.Tensor, ss: torch.Tensor, g_id: torch.Tensor,
                       g_age: torch.Tensor, att_is_age: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dcs, dss) of :func:`afd_apply` given the gradients of x_id and x_age."""
    if not _launch_kernels(x):
        return apply_backward_torch(x, cs, ss, g_id, g_age, att_is_age)
    B, C, H, W = x.shape
    cs, ss = cs.contiguous(), ss.contiguous()
    block_c, block_p, warps = _tile(int(C), int(H), int(W))
    nblk = _cdiv(C, block_c)
    dx = torch.empty_like(x)
    dcs = torch.empty((B, C), device=x.device, dtype=cs.dtype)
    dss_part = torch.empty((B, nblk, H, W), device=x.device, dtype=cs.dtype)
    if _shapes_only(x):
        return dx, dcs, dss_part.sum(1)
    wrap_triton(_afd_apply_bwd_kernel)[(B, nblk)](
        x, cs, ss, g_id, g_age, dx, dcs, dss_part, C, nblk,
        *x.stride(), *g_id.stride(), *g_age.stride(), *dx.stride(),
        H=int(H), W=int(W), ATT_IS_AGE=att_is_age, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=warps)
    return dx, dcs, dss_part.sum(1)


# ----------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------

def _pool_setup_context(ctx, inputs, output):
    x, concat, with_idx = inputs
    if not with_idx and x.requires_grad:
        raise ValueError("afd_pool(with_idx=False) has no backward; pass with_idx=True when x needs a gradient")
    _, feat_idx, _, sp_idx = output
    ctx.save_for_backward(x, feat_idx, sp_idx)
    ctx.concat = concat


def _pool_backward(ctx, dfeat, dfeat_idx, dsp, dsp_idx):
    x, feat_idx, sp_idx = ctx.saved_tensors
    B, C, H, W = x.shape
    acc = stats_dtype(x.dtype)
    if dfeat is None:
        dfeat = torch.zeros((B, SPP_BINS * C * (2 if ctx.concat else 1)), device=x.device, dtype=acc)
    if dsp is None:
        dsp = torch.zeros((B, 2, H, W), device=x.device, dtype=acc)
    return afd_pool_backward(x, dfeat, feat_idx, dsp, sp_idx, ctx.concat), None, None


def _apply_setup_context(ctx, inputs, output):
    x, cs, ss, att_is_age = inputs
    ctx.save_for_backward(x, cs, ss)
    ctx.att_is_age = att_is_age


def _apply_backward(ctx, g_id, g_age):
    x, cs, ss = ctx.saved_tensors
    if g_id is None:
        g_id = torch.zeros_like(x)
    if g_age is None:
        g_age = torch.zeros_like(x)
    dx, dcs, dss = afd_apply_backward(x, cs, ss, g_id, g_age, ctx.att_is_age)
    return dx, dcs, dss, None


afd_pool.register_autograd(_pool_backward, setup_context=_pool_setup_context)
afd_apply.register_autograd(_apply_backward, setup_context=_apply_setup_context)

register_decomposition(torch.ops.mtlface_fast.afd_pool.default, pool_torch)
register_decomposition(torch.ops.mtlface_fast.afd_pool_backward.default, pool_backward_torch)
register_decomposition(torch.ops.mtlface_fast.afd_apply.default, apply_torch)
register_decomposition(torch.ops.mtlface_fast.afd_apply_backward.default, apply_backward_torch)
