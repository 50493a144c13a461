"""Fused AFD passes over the (B, C, H, W) feature map: pooling, the two branches, decomposition, backward.

Ops (``torch.ops.mtlface_fast.*``), each a ``triton_op`` whose PyTorch twin in :mod:`kernels.afd_torch`
is also its export decomposition:

* ``afd_pool(x, concat, with_idx) -> (feat, feat_idx, sp, sp_idx)``: reads x once; SPP avg/max at sizes 1, 2, 3
  with PyTorch's adaptive windows (start = floor(i*H/s), end = ceil((i+1)*H/s)) in (size, c, i, j) order,
  summed (CVPR) or concatenated avg-then-max (TPAMI), plus max and mean over channels per pixel. The
  argmax of every max (first in window order, as PyTorch) is returned for backward.
* ``afd_apply(x, cs, ss, att_is_age) -> (x_id, x_age)``: reads x once, writes both outputs.
* ``afd_pool_backward`` / ``afd_apply_backward``: their gradients, one pass each; the reductions over
  pixels and channels are per-program fp32 partials summed on the host (deterministic, no atomics).
* ``afd_eval(x, w1, w2, b2, ts, bs, concat, att_is_age) -> (x_id, x_age)``: the whole eval forward in three
  launches (pool, branches, apply) with the BatchNorms folded: ``cs = sigmoid(relu(feat @ w1^T) @ w2^T + b2)``,
  ``ss = sigmoid([max, mean] @ ts + bs)`` (``ts``: the 7x7 convolution as a (2, HW, HW) matrix).

How the passes stay memory-bound (x is read with 16-byte vector loads, outputs written with them):

* A program's channel block of a NCHW sample is one contiguous run of BLOCK_C*H*W elements: it is loaded
  flat (no ``// W``, ``% W`` in the address, so the loads vectorize) and rearranged in shared memory by
  ``tl.gather`` into a (channel, pixel) tile; channels_last tiles are (pixel, channel) loads, contiguous
  along channels. Average bins are one ``tl.dot`` of the tile with a constant (pixels x 16) 0/1 window
  matrix; max bins are per-thread maxima over a gathered (channel, bin, window pixel) tensor (windows of
  size 1 from the four size-2 maxima, which cover the map); the per-pixel channel max/mean are per-program
  partials, merged by the consumer.
* The branches run as GEMMs over tiles of samples (``tl.dot``); the eval apply computes its tile of
  ``cs`` from ``h`` and ``w2`` itself, so no (B, C) round trip and no extra launch.

:func:`pool`, :func:`apply` and :func:`eval_forward` are what the module calls: the registered op, or in
eager inference its body run directly (no dispatcher; the same code the op's eager kernel runs).

Every statistic is fp32 (fp64 for fp64 inputs) whatever the input dtype. NCHW-contiguous and
channels_last inputs are read as they are; other strides are copied to NCHW first. The batch is always
grid axis 0 (no 65535 limit) and sample offsets are int64.
"""
from __future__ import annotations

import functools
from typing import Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .afd_torch import (SPP_BINS, apply_backward_torch, apply_torch, eval_torch, pool_backward_torch,
                        pool_torch, stats_dtype)
from .utils import check_same_device, proxy_tracing, register_decomposition, shapes_only, use_kernel

__all__ = ["afd_apply", "afd_apply_backward", "afd_eval", "afd_pool", "afd_pool_backward", "apply",
           "eval_forward", "pool"]


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _bin_window(t, H: tl.constexpr, W: tl.constexpr):
    """Window [h0, h1) x [w0, w1) of SPP bin ``t`` in feat order (0: size 1; 1-4: size 2; 5-13: size 3,
    row-major), PyTorch's adaptive bounds. ``t`` must be in [0, 14): no negative operand reaches ``//``."""
    is1 = t == 0
    is2 = (t >= 1) & (t < 5)
    q2 = tl.where(is2, t - 1, 0)
    q3 = tl.where(t >= 5, t - 5, 0)
    i = tl.where(is1, 0, tl.where(is2, q2 // 2, q3 // 3))
    j = tl.where(is1, 0, tl.where(is2, q2 % 2, q3 % 3))
    h0 = tl.where(is1, 0, tl.where(is2, (i * H) // 2, (i * H) // 3))
    h1 = tl.where(is1, H, tl.where(is2, ((i + 1) * H + 1) // 2, ((i + 1) * H + 2) // 3))
    w0 = tl.where(is1, 0, tl.where(is2, (j * W) // 2, (j * W) // 3))
    w1 = tl.where(is1, W, tl.where(is2, ((j + 1) * W + 1) // 2, ((j + 1) * W + 2) // 3))
    return h0, h1, w0, w1


@triton.jit
def _afd_pool_fwd_kernel(
    x_ptr,  # (B, C, H, W) input: NCHW-contiguous, or channels_last-contiguous when CHANNELS_LAST
    feat_ptr,  # (B, K) pooled features (its own dtype), K = 14C (CONCAT=False: avg + max) or 28C (avg then max)
    fidx_ptr,  # (B, 14C) int32 flat pixel index (h*W + w) of the max of every max-SPP bin (WITH_IDX)
    sp_ptr,  # (B, NPROG, 2, H*W) per program over its channels: [max, sum / sum_div] (stats dtype)
    spidx_ptr,  # (B, NPROG, H*W) int32 channel index of that max (WITH_IDX)
    C, NPROG, BLOCKS_PER_PROG, sum_div, stride_xb,
    H: tl.constexpr, W: tl.constexpr, CONCAT: tl.constexpr, WITH_IDX: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, HWP: tl.constexpr, FLAT: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, DOT_F32: tl.constexpr,
):
    HW: tl.constexpr = H * W
    b = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    acc_ty = sp_ptr.dtype.element_ty
    x_ty = x_ptr.dtype.element_ty
    # -- per-program constant tables (independent of the channel block) --
    p = tl.arange(0, HWP)
    p_ok = p < HW
    t = tl.arange(0, 16)
    t_ok = t < 14
    tb = tl.where(t_ok, t, 0)
    h0, h1, w0, w1 = _bin_window(tb, H, W)
    ph = p // W
    pw = p - ph * W
    inwin = ((ph[None, :] >= h0[:, None]) & (ph[None, :] < h1[:, None]) & (pw[None, :] >= w0[:, None])
             & (pw[None, :] < w1[:, None]) & p_ok[None, :] & t_ok[:, None])
    dot_ty = tl.float32 if DOT_F32 else x_ty
    pool_mat = inwin.to(dot_ty)  # (16, HWP) 0/1: exact in every dtype, so the dot sums exact products
    count = ((h1 - h0) * (w1 - w0)).to(acc_ty)
    # Max windows: (KH*KW, 16) pixel of every window slot, the window's last row/column repeated to fill
    # (a repeat changes no max, and its pixel index equals the original's). Bin 0 is merged from bins 1-4.
    # The slot is the slowest axis of the gathered (slot, bin, channel) tensor, so that its reduction
    # stays within each thread (no warp shuffles).
    tm = tl.where(t_ok & (t > 0), t, 1)
    g0, g1, v0, v1 = _bin_window(tm, H, W)
    k = tl.arange(0, KH * KW)
    kh = k // KW
    kw = k % KW
    win_pix = ((g0[None, :] + tl.minimum(kh[:, None], (g1 - g0 - 1)[None, :])) * W
               + v0[None, :] + tl.minimum(kw[:, None], (v1 - v0 - 1)[None, :]))
    is2 = (t >= 1) & (t < 5)
    # feat position of bin t of channel c: (size offset) * C + c * size^2 + (i * size + j)
    sz_off = tl.where(t == 0, 0, tl.where(t < 5, 1, 5))
    sz_sq = tl.where(t == 0, 1, tl.where(t < 5, 4, 9))
    q = tl.where(t == 0, 0, tl.where(t < 5, t - 1, tl.where(t_ok, t - 5, 0)))
    nbins = 14 * C
    if CONCAT:
        feat_base = feat_ptr + b * (2 * nbins)
    else:
        feat_base = feat_ptr + b * nbins
    fidx_base = fidx_ptr + b * nbins
    x_base = x_ptr + b * stride_xb
    feat_ty = feat_ptr.dtype.element_ty
    cl = tl.arange(0, BLOCK_C)
    cmax = tl.full((HWP,), float("-inf"), acc_ty)
    cidx = tl.zeros((HWP,), tl.int32)
    csum = tl.zeros((HWP,), acc_ty)
    for blk in range(0, BLOCKS_PER_PROG):
        c0 = (pid_c * BLOCKS_PER_PROG + blk) * BLOCK_C
        c = c0 + cl
        c_ok = c < C
        # the block as a (channel, pixel) tile, and flat (the source of the window gathers)
        if CHANNELS_LAST:  # (pixel, channel) loads, contiguous along channels
            v2 = tl.load(x_base + p[:, None] * C + c[None, :], mask=p_ok[:, None] & c_ok[None, :], other=0.0)
            tile = tl.trans(v2)
            src = tl.reshape(tile, (BLOCK_C * HWP,))
            row_len: tl.constexpr = HWP
        else:  # one flat run of BLOCK_C*HW elements, rearranged to (channel, pixel) in shared memory
            f = tl.arange(0, FLAT)
            src = tl.load(x_base + c0 * HW + f, mask=(f < BLOCK_C * HW) & (c0 * HW + f < C * HW), other=0.0)
            j = tl.arange(0, BLOCK_C * HWP)
            gi = (j // HWP) * HW + tl.minimum(j % HWP, HW - 1)
            tile = tl.reshape(tl.gather(src, gi, 0), (BLOCK_C, HWP))
            row_len: tl.constexpr = HW
        tile_ok = c_ok[:, None] & p_ok[None, :]
        # average bins: window sums as one dot (exact products, accumulated in the stats dtype), (bin, channel)
        sums = tl.dot(pool_mat, tl.trans(tl.where(tile_ok, tile, 0.0).to(dot_ty)), out_dtype=acc_ty,
                      input_precision="ieee")
        avg = sums / count[:, None]
        # max bins: every window slot gathered, (slot, bin, channel), reduced over the slot per thread
        # (in x's dtype: a max is exact in any dtype, and bf16/fp16 pairs reduce with one instruction)
        widx = win_pix[:, :, None] + cl[None, None, :] * row_len
        wv = tl.reshape(tl.gather(src, tl.reshape(widx, (KH * KW * 16 * BLOCK_C,)), 0), (KH * KW, 16, BLOCK_C))
        wmax_x = tl.max(wv, axis=0)  # (16, BLOCK_C)
        wmax = wmax_x.to(acc_ty)
        m0 = tl.max(tl.where(is2[:, None], wmax, float("-inf")), axis=0)
        if WITH_IDX:  # first max in row-major window order = smallest flat pixel index among the maxima
            warg = tl.min(tl.where(wv == wmax_x[None, :, :], win_pix[:, :, None], HW), axis=0)
            a0 = tl.min(tl.where(is2[:, None] & (wmax == m0[None, :]), warg, HW), axis=0)
            warg = tl.where((t == 0)[:, None], a0[None, :], warg)
        wmax = tl.where((t == 0)[:, None], m0[None, :], wmax)
        kk = sz_off[:, None] * C + c[None, :] * sz_sq[:, None] + q[:, None]
        st_ok = t_ok[:, None] & c_ok[None, :]
        if CONCAT:
            tl.store(feat_base + kk, avg.to(feat_ty), mask=st_ok)
            tl.store(feat_base + nbins + kk, wmax.to(feat_ty), mask=st_ok)
        else:
            tl.store(feat_base + kk, (avg + wmax).to(feat_ty), mask=st_ok)
        if WITH_IDX:
            tl.store(fidx_base + kk, warg, mask=st_ok)
        # max and sum over channels per pixel; ties go to the lowest channel (strict > across blocks)
        # -inf built in fp32 and cast: the triton 3.8 interpreter has no bf16 scalar constant (get_bf16)
        tmx = tl.where(tile_ok, tile, tl.full((1, 1), float("-inf"), tl.float32).to(tile.dtype))
        bmax_x = tl.max(tmx, axis=0)
        bmax = bmax_x.to(acc_ty)
        if WITH_IDX:
            bidx = tl.min(tl.where(tmx == bmax_x[None, :], c[:, None], C), axis=0)
            cidx = tl.where(bmax > cmax, bidx, cidx)
        cmax = tl.maximum(cmax, bmax)
        csum += tl.sum(tl.where(tile_ok, tile.to(acc_ty), 0.0), axis=0)
    sp_base = sp_ptr + (b * NPROG + pid_c) * (2 * HW)
    tl.store(sp_base + p, cmax, mask=p_ok)
    tl.store(sp_base + HW + p, csum / sum_div, mask=p_ok)
    if WITH_IDX:
        tl.store(spidx_ptr + (b * NPROG + pid_c) * HW + p, cidx, mask=p_ok)


@triton.jit
def _afd_branch_fwd_kernel(
    feat_ptr,  # (B, K) pooled features, compute dtype
    w1_ptr,  # (NH, K) first channel-MLP weight, compute dtype
    h_ptr,  # (B, NH) output: relu(feat @ w1^T), compute dtype
    sp_ptr,  # (B, NPROG, 2, HW) pooling partials [max, sum] (stats dtype)
    ts_ptr,  # (2, HW, HW) BN-folded 7x7 convolution as a matrix: s[p] = sum_q max[q] ts[0,q,p] + mean[q] ts[1,q,p]
    bs_ptr,  # (1,) its bias
    ss_ptr,  # (B, HW) output: spatial scale sigmoid(s + bs) (stats dtype)
    B, K, NH, NPROG, C,
    HW: tl.constexpr, HWP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    acc_ty = ss_ptr.dtype.element_ty
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < B
    n_ok = rn < NH
    a_ptrs = feat_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :]
    w_ptrs = w1_ptr + rn[:, None] * K + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), acc_ty)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        a = tl.load(a_ptrs + k0, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT_F32:
            a, w = a.to(tl.float32), w.to(tl.float32)
        # out_dtype = the accumulator's: triton 3.6 asserts it equals acc's dtype (fp64 in float64 runs)
        acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee", out_dtype=acc_ty)
    h = tl.maximum(acc, 0.0)
    tl.store(h_ptr + rm.to(tl.int64)[:, None] * NH + rn[None, :], h.to(h_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])
    if pid_n == 0:  # the spatial branch of these samples: merge the pooling partials, one dot per map
        p = tl.arange(0, HWP)
        p_ok = p < HW
        ok = m_ok[:, None] & p_ok[None, :]
        base = sp_ptr + rm.to(tl.int64)[:, None] * (NPROG * 2 * HW) + p[None, :]
        mx = tl.full((BLOCK_M, HWP), float("-inf"), acc_ty)
        sm = tl.zeros((BLOCK_M, HWP), acc_ty)
        for j in range(0, NPROG):
            mx = tl.maximum(mx, tl.load(base + j * (2 * HW), mask=ok, other=float("-inf")))
            sm += tl.load(base + j * (2 * HW) + HW, mask=ok, other=0.0)
        mx = tl.where(ok, mx, 0.0)
        mean = sm / C
        qq = tl.arange(0, HWP)
        t_ok = (qq < HW)[:, None] & p_ok[None, :]
        t0 = tl.load(ts_ptr + qq[:, None] * HW + p[None, :], mask=t_ok, other=0.0)
        t1 = tl.load(ts_ptr + HW * HW + qq[:, None] * HW + p[None, :], mask=t_ok, other=0.0)
        s = tl.dot(mx, t0, input_precision="ieee") + tl.dot(mean, t1, input_precision="ieee")
        s += tl.load(bs_ptr)
        ss = 1.0 / (1.0 + tl.exp(-s))
        tl.store(ss_ptr + rm.to(tl.int64)[:, None] * HW + p[None, :], ss, mask=ok)


@triton.jit
def _afd_apply_fwd_kernel(
    x_ptr,  # (B, C, H, W) input: NCHW-contiguous, or channels_last-contiguous when CHANNELS_LAST
    cs_ptr,  # (B, C) channel scale (stats dtype); not read with FUSED_MLP
    ss_ptr,  # (B, H*W) spatial scale (stats dtype)
    id_ptr,  # (B, C, H, W) x_id output, x's strides
    age_ptr,  # (B, C, H, W) x_age output, x's strides
    h_ptr,  # (B, NH) hidden units (FUSED_MLP): cs = sigmoid(h @ w2^T + b2)
    w2_ptr,  # (C, NH) BN-folded second channel-MLP weight (FUSED_MLP)
    b2_ptr,  # (C,) its bias (FUSED_MLP)
    B, C, NH, stride_xb,
    HW: tl.constexpr, HWP: tl.constexpr, ATT_IS_AGE: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    FUSED_MLP: tl.constexpr, BLOCK_C: tl.constexpr, FLAT: tl.constexpr, SAMPLES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    acc_ty = ss_ptr.dtype.element_ty
    out_ty = id_ptr.dtype.element_ty
    s0 = pid_s * SAMPLES
    c0 = pid_c * BLOCK_C
    c = c0 + tl.arange(0, BLOCK_C)
    c_ok = c < C
    p = tl.arange(0, HWP)
    p_ok = p < HW
    if FUSED_MLP:  # this tile of cs from the BLOCK_M-sample row tile that holds these samples
        rm = (s0 // BLOCK_M) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.arange(0, BLOCK_N)
        z = tl.zeros((BLOCK_M, BLOCK_C), acc_ty)
        for n0 in range(0, NH, BLOCK_N):
            n_ok = (n0 + rn) < NH
            hh = tl.load(h_ptr + rm.to(tl.int64)[:, None] * NH + n0 + rn[None, :],
                         mask=(rm < B)[:, None] & n_ok[None, :], other=0.0)
            w = tl.load(w2_ptr + c[:, None] * NH + n0 + rn[None, :], mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            if DOT_F32:
                hh, w = hh.to(tl.float32), w.to(tl.float32)
            z = tl.dot(hh, tl.trans(w), z, input_precision="ieee", out_dtype=acc_ty)
        z += tl.load(b2_ptr + c, mask=c_ok, other=0.0)[None, :]
        cs_tile = 1.0 / (1.0 + tl.exp(-z))
    if not CHANNELS_LAST:
        f = tl.arange(0, FLAT)
        f_ok = (f < BLOCK_C * HW) & (c0 * HW + f < C * HW)
        f_c = tl.minimum(f // HW, BLOCK_C - 1)
        f_p = f - (f // HW) * HW
    for si in range(0, SAMPLES):
        b = s0 + si
        # (the sample test as a vector: the interpreter rejects a scalar bool in a mask)
        if FUSED_MLP:
            cs_row = tl.sum(tl.where((rm == b)[:, None], cs_tile, 0.0), axis=0)
        else:
            cs_row = tl.load(cs_ptr + b.to(tl.int64) * C + c, mask=c_ok & (c * 0 + b < B), other=0.0)
        ss_row = tl.load(ss_ptr + b.to(tl.int64) * HW + p, mask=p_ok & (p * 0 + b < B), other=0.0)
        base = b.to(tl.int64) * stride_xb
        if CHANNELS_LAST:
            offs = base + p[:, None] * C + c[None, :]
            ok = p_ok[:, None] & (c_ok & (c * 0 + b < B))[None, :]
            scale = (cs_row[None, :] + ss_row[:, None]) * 0.5
        else:
            offs = base + c0 * HW + f
            ok = f_ok & (f * 0 + b < B)
            scale = (tl.gather(cs_row, f_c, 0) + tl.gather(ss_row, f_p, 0)) * 0.5
        xv = tl.load(x_ptr + offs, mask=ok, other=0.0).to(acc_ty)
        att = xv * scale
        res = xv - att
        if ATT_IS_AGE:
            tl.store(age_ptr + offs, att.to(out_ty), mask=ok)
            tl.store(id_ptr + offs, res.to(out_ty), mask=ok)
        else:
            tl.store(id_ptr + offs, att.to(out_ty), mask=ok)
            tl.store(age_ptr + offs, res.to(out_ty), mask=ok)


@triton.jit
def _afd_apply_bwd_kernel(
    x_ptr,  # (B, C, H, W) forward input: NCHW-contiguous, or channels_last when CHANNELS_LAST
    cs_ptr,  # (B, C) channel scale
    ss_ptr,  # (B, H*W) spatial scale
    gid_ptr,  # (B, C, H, W) gradient of x_id, x's strides
    gage_ptr,  # (B, C, H, W) gradient of x_age, x's strides
    dx_ptr,  # (B, C, H, W) output, x's strides
    dcs_ptr,  # (B, C) output: gradient of cs (complete: one program holds all pixels of a channel)
    dss_ptr,  # (B, NBLK, H*W) output: per-channel-block partial gradients of ss, summed on the host
    B, C, NBLK, stride_xb,
    HW: tl.constexpr, HWP: tl.constexpr, ATT_IS_AGE: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr, FLAT: tl.constexpr, SAMPLES: tl.constexpr,
):
    s0 = tl.program_id(0) * SAMPLES
    cb = tl.program_id(1)
    acc_ty = cs_ptr.dtype.element_ty
    c0 = cb * BLOCK_C
    c = c0 + tl.arange(0, BLOCK_C)
    c_ok = c < C
    p = tl.arange(0, HWP)
    p_ok = p < HW
    # index maps of the block, shared by its samples
    if not CHANNELS_LAST:
        f = tl.arange(0, FLAT)
        f_ok = (f < BLOCK_C * HW) & (c0 * HW + f < C * HW)
        f_c = tl.minimum(f // HW, BLOCK_C - 1)
        f_p = f - (f // HW) * HW
        j = tl.arange(0, BLOCK_C * HWP)
        g_pc = (j % BLOCK_C) * HW + tl.minimum(j // BLOCK_C, HW - 1)
        g_cp = (j // HWP) * HW + tl.minimum(j % HWP, HW - 1)
    for si in range(0, SAMPLES):
        b = s0 + si
        bl = b.to(tl.int64)
        # (the sample test as a vector: the interpreter rejects a scalar bool in a mask)
        cs_row = tl.load(cs_ptr + bl * C + c, mask=c_ok & (c * 0 + b < B), other=0.0)
        ss_row = tl.load(ss_ptr + bl * HW + p, mask=p_ok & (p * 0 + b < B), other=0.0)
        base = bl * stride_xb
        if CHANNELS_LAST:
            offs = base + p[:, None] * C + c[None, :]
            ok = p_ok[:, None] & (c_ok & (c * 0 + b < B))[None, :]
            scale = (cs_row[None, :] + ss_row[:, None]) * 0.5
        else:
            offs = base + c0 * HW + f
            ok = f_ok & (f * 0 + b < B)
            scale = (tl.gather(cs_row, f_c, 0) + tl.gather(ss_row, f_p, 0)) * 0.5
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(acc_ty)
        g_id = tl.load(gid_ptr + offs, mask=ok, other=0.0).to(acc_ty)
        g_age = tl.load(gage_ptr + offs, mask=ok, other=0.0).to(acc_ty)
        if ATT_IS_AGE:
            g_att = g_age
            g_res = g_id
        else:
            g_att = g_id
            g_res = g_age
        d = g_att - g_res
        dx = g_res + d * scale
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)
        dm = d * x * 0.5  # masked lanes are 0 (x and grads loaded as 0)
        if CHANNELS_LAST:
            dcs = tl.sum(dm, axis=0)
            dss = tl.sum(dm, axis=1)
        else:  # per-channel and per-pixel sums of the flat run, each over axis 0 of a tile rearranged in
            # shared memory ((pixel, channel) for dcs, (channel, pixel) for dss): within threads, no shuffles
            t_pc = tl.reshape(tl.gather(dm, g_pc, 0), (HWP, BLOCK_C))
            dcs = tl.sum(tl.where(p_ok[:, None], t_pc, 0.0), axis=0)
            t_cp = tl.reshape(tl.gather(dm, g_cp, 0), (BLOCK_C, HWP))
            dss = tl.sum(tl.where(p_ok[None, :], t_cp, 0.0), axis=0)
        tl.store(dcs_ptr + bl * C + c, dcs, mask=c_ok & (c * 0 + b < B))
        tl.store(dss_ptr + (bl * NBLK + cb) * HW + p, dss, mask=p_ok & (p * 0 + b < B))


@triton.jit
def _afd_pool_bwd_kernel(
    dfeat_ptr,  # (B, K) gradient of feat (layout as in the forward), stats dtype
    fidx_ptr,  # (B, 14C) int32 argmax pixels of the max-SPP bins
    dsp_ptr,  # (B, 2, H*W) gradient of sp
    spidx_ptr,  # (B, H*W) int32 argmax channels of the max over channels
    dx_ptr,  # (B, C, H, W) output: NCHW-contiguous, or channels_last when CHANNELS_LAST
    B, C, stride_db,
    H: tl.constexpr, W: tl.constexpr, CONCAT: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr, HWP: tl.constexpr, FLAT: tl.constexpr, SAMPLES: tl.constexpr,
):
    HW: tl.constexpr = H * W
    s0 = tl.program_id(0) * SAMPLES
    c0 = tl.program_id(1) * BLOCK_C
    acc_ty = dfeat_ptr.dtype.element_ty
    c = c0 + tl.arange(0, BLOCK_C)
    c_ok = c < C
    p = tl.arange(0, HWP)
    p_ok = p < HW
    t = tl.arange(0, 16)
    t_ok = t < 14
    h0, h1, w0, w1 = _bin_window(tl.where(t_ok, t, 0), H, W)
    ph = p // W
    pw = p - ph * W
    inwin = ((ph[None, :] >= h0[:, None]) & (ph[None, :] < h1[:, None]) & (pw[None, :] >= w0[:, None])
             & (pw[None, :] < w1[:, None]) & p_ok[None, :] & t_ok[:, None])
    # (16, HWP) average weights: the gradient of bin t spreads as 1/count over its window (one dot)
    spread = tl.where(inwin, 1.0 / ((h1 - h0) * (w1 - w0)).to(acc_ty)[:, None], 0.0).to(acc_ty)
    sz_off = tl.where(t == 0, 0, tl.where(t < 5, 1, 5))
    sz_sq = tl.where(t == 0, 1, tl.where(t < 5, 4, 9))
    q = tl.where(t == 0, 0, tl.where(t < 5, t - 1, tl.where(t_ok, t - 5, 0)))
    kk = sz_off[None, :] * C + c[:, None] * sz_sq[None, :] + q[None, :]  # (BLOCK_C, 16) feat positions
    k_ok = c_ok[:, None] & t_ok[None, :]
    nbins = 14 * C
    if not CHANNELS_LAST:  # the (channel, pixel) tile written as one flat run: rearranged in shared memory
        f = tl.arange(0, FLAT)
        f_ok = (f < BLOCK_C * HW) & (c0 * HW + f < C * HW)
        f_src = tl.minimum(f // HW, BLOCK_C - 1) * HWP + (f - (f // HW) * HW)
    for si in range(0, SAMPLES):
        b = s0 + si
        bl = b.to(tl.int64)
        # (the sample test as a vector: the interpreter rejects a scalar bool in a mask)
        b_p = p * 0 + b < B
        if CONCAT:
            dfeat_base = dfeat_ptr + bl * (2 * nbins)
        else:
            dfeat_base = dfeat_ptr + bl * nbins
        da = tl.load(dfeat_base + kk, mask=k_ok & (kk * 0 + b < B), other=0.0)
        acc = tl.dot(da, spread, input_precision="ieee")  # (BLOCK_C, HWP)
        dsp_base = dsp_ptr + bl * (2 * HW)
        dmax_c = tl.load(dsp_base + p, mask=p_ok & b_p, other=0.0)
        dmean_c = tl.load(dsp_base + HW + p, mask=p_ok & b_p, other=0.0)
        sidx = tl.load(spidx_ptr + bl * HW + p, mask=p_ok & b_p, other=-1)
        acc += (dmean_c / C)[None, :] + tl.where(c[:, None] == sidx[None, :], dmax_c[None, :], 0.0)
        # max gradients to the saved argmax pixel of each bin
        for tb in tl.static_range(0, 14):
            if tb == 0:
                k_t = c
            elif tb < 5:
                k_t = C + c * 4 + (tb - 1)
            else:
                k_t = 5 * C + c * 9 + (tb - 5)
            m_t = c_ok & (c * 0 + b < B)
            if CONCAT:
                dm = tl.load(dfeat_base + nbins + k_t, mask=m_t, other=0.0)
            else:
                dm = tl.load(dfeat_base + k_t, mask=m_t, other=0.0)
            widx = tl.load(fidx_ptr + bl * nbins + k_t, mask=m_t, other=-1)
            acc += tl.where(p[None, :] == widx[:, None], dm[:, None], 0.0)
        out_ty = dx_ptr.dtype.element_ty
        if CHANNELS_LAST:
            tl.store(dx_ptr + bl * stride_db + p[:, None] * C + c[None, :], tl.trans(acc).to(out_ty),
                     mask=(p_ok & b_p)[:, None] & c_ok[None, :])
        else:
            flat = tl.gather(tl.reshape(acc, (BLOCK_C * HWP,)), f_src, 0)
            tl.store(dx_ptr + bl * stride_db + c0 * HW + f, flat.to(out_ty), mask=f_ok & (f * 0 + b < B))


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------

def _shapes_only(x: torch.Tensor) -> bool:
    """:func:`kernels.utils.shapes_only` (a module-level name, so a caller can stub it)."""
    return shapes_only(x)


# Host-side launch geometry in plain Python: triton.next_power_of_2 / triton.cdiv are JIT-aware helpers
# that cost microseconds per call on the host, and these run on every launch.
def _pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length() if n > 1 else 1


def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def _hwp(H: int, W: int) -> int:
    """Pixels of a (channel, pixel) tile: a power of two, at least 16 (the smallest ``tl.dot`` side)."""
    return max(16, _pow2(H * W))


def _win_sides(n: int) -> int:
    """Largest side of an adaptive window of sizes 2 and 3 on an axis of ``n``, as a power of two."""
    side = max(-(-((i + 1) * n) // s) - (i * n) // s for s in (2, 3) for i in range(s))
    return _pow2(side)


@functools.lru_cache(maxsize=None)
def _pool_tile(C: int, H: int, W: int, on_gpu: bool):
    """(BLOCK_C, num_warps) of the pooling kernel. On GPU 16 channels of a 7x7 map per step (784 elements in
    a flat range of 1024: one 16-byte vector of bf16 per thread at 4 warps; 124 registers, 4 CTAs/SM); the
    interpreter prefers few big tiles. Tests force the GPU choice on CPU to cover the channel-block loop
    and its max/argmax merge."""
    hwp = _hwp(H, W)
    target = 1024 if on_gpu else 8192
    return max(16, min(_pow2(C), target // hwp)), 4


@functools.lru_cache(maxsize=None)
def _apply_tile(C: int, H: int, W: int, on_gpu: bool):
    """(BLOCK_C, FLAT, num_warps) of the apply kernels: BLOCK_C*H*W elements per step in a power-of-two
    flat range FLAT (32 channels of 7x7: 1568 in 2048, 16 bf16 per thread at 4 warps, two 16-byte
    vectors)."""
    block_c = max(16, min(_pow2(C), (2048 if on_gpu else 8192) // _hwp(H, W)))
    return block_c, _pow2(block_c * H * W), 4


def _dot_f32(x: torch.Tensor) -> bool:
    """bf16/fp16 tiles are multiplied as fp32 in the Triton interpreter, whose low-precision ``tl.dot`` is
    wrong (triton 3.9); their products are exact in fp32, so this is what the tensor cores compute."""
    return not x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def _layout(x: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    """(x as the kernels read it, channels_last?): NCHW- or channels_last-contiguous kept, else copied."""
    if x.is_contiguous():
        return x, False
    if x.is_contiguous(memory_format=torch.channels_last):
        return x, True
    return x.contiguous(), False


try:  # how the ops' eager CUDA/CPU kernel runs the body (torch/_library/triton.py: backend_fn)
    from torch._library.triton import set_wrap_triton_enabled as _wrap_triton_enabled
except ImportError:  # pragma: no cover
    _wrap_triton_enabled = None


def _direct_call_ok(*tensors: torch.Tensor) -> bool:
    """Whether an eager call may run an op's body itself rather than through the dispatcher (~15 us of
    host time per op on CPU, more than the kernels take at small batches): real tensors only (no
    fake, functional or functorch-wrapped ones), nothing to differentiate, no compile, tracing or
    dispatch mode that has to see the op. The body then runs exactly as the op's eager kernel runs it."""
    if _wrap_triton_enabled is None or torch.compiler.is_compiling() or proxy_tracing():
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


def eval_forward(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, ts: torch.Tensor,
                 bs: torch.Tensor, concat: bool, att_is_age: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`afd_eval`, called directly in eager inference (see :func:`_direct_call_ok`)."""
    if _direct_call_ok(x, w1, w2, b2, ts, bs):
        with _wrap_triton_enabled(False):
            return _afd_eval(x, w1, w2, b2, ts, bs, concat, att_is_age)
    return afd_eval(x, w1, w2, b2, ts, bs, concat, att_is_age)


def _check_x(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D (B, C, H, W) tensor, got {getattr(x, 'shape', type(x))}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")


def _launch_pool(x, feat, feat_idx, sp, sp_idx, nprog, blocks_per_prog, block_c, warps, concat, with_idx, sum_div):
    B, C, H, W = x.shape
    x, cl = _layout(x)
    hwp = _hwp(H, W)
    wrap_triton(_afd_pool_fwd_kernel)[(B, nprog)](
        x, feat, feat_idx, sp, sp_idx, C, nprog, blocks_per_prog, float(sum_div), x.stride(0),
        H=int(H), W=int(W), CONCAT=concat, WITH_IDX=with_idx, CHANNELS_LAST=cl, BLOCK_C=block_c, HWP=hwp,
        FLAT=_pow2(block_c * H * W), KH=_win_sides(H), KW=_win_sides(W), DOT_F32=_dot_f32(x),
        num_warps=warps, num_stages=1)  # one stage: no cp.async prologue peeled out of the channel loop


def _afd_pool(x: torch.Tensor, concat: bool, with_idx: bool = True
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pooled inputs of both AFD branches in one pass over ``x``; see :func:`kernels.afd_torch.pool_torch`.

    One program per sample loops over the channel blocks, so the channel max/mean come out complete.
    ``with_idx=False`` (inference) skips the argmax bookkeeping; the index outputs are then empty.
    """
    _check_x(x)
    if not use_kernel(x):
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
    block_c, warps = _pool_tile(int(C), int(H), int(W), x.is_cuda)
    _launch_pool(x, feat, feat_idx, sp, sp_idx, 1, _cdiv(C, block_c), block_c, warps, concat, with_idx, C)  # mean
    return feat, feat_idx, sp, sp_idx


afd_pool = triton_op("mtlface_fast::afd_pool", mutates_args=())(_afd_pool)


@triton_op("mtlface_fast::afd_pool_backward", mutates_args=())
def afd_pool_backward(x: torch.Tensor, dfeat: torch.Tensor, feat_idx: torch.Tensor, dsp: torch.Tensor,
                      sp_idx: torch.Tensor, concat: bool) -> torch.Tensor:
    """dx of :func:`afd_pool` (``x`` gives shape, dtype and layout only)."""
    if not use_kernel(x):
        return pool_backward_torch(x, dfeat, feat_idx, dsp, sp_idx, concat)
    B, C, H, W = x.shape
    dfeat, feat_idx, dsp, sp_idx = dfeat.contiguous(), feat_idx.contiguous(), dsp.contiguous(), sp_idx.contiguous()
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    dx = torch.empty_like(x, memory_format=torch.channels_last if cl else torch.contiguous_format)
    if _shapes_only(x):
        return dx
    block_c, flat, warps = _apply_tile(int(C), int(H), int(W), x.is_cuda)
    samples = 4 if x.is_cuda else 1  # the block's tables serve 4 samples
    wrap_triton(_afd_pool_bwd_kernel)[(_cdiv(B, samples), _cdiv(C, block_c))](
        dfeat, feat_idx, dsp, sp_idx, dx, B, C, dx.stride(0),
        H=int(H), W=int(W), CONCAT=concat, CHANNELS_LAST=cl, BLOCK_C=block_c, HWP=_hwp(H, W), FLAT=flat,
        SAMPLES=samples, num_warps=warps)
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


def _launch_apply(x, cs, ss, x_id, x_age, att_is_age, h=None, w2=None, b2=None):
    B, C, H, W = x.shape
    x, cl = _layout(x)
    block_c, flat, warps = _apply_tile(int(C), int(H), int(W), x.is_cuda)
    fused = h is not None
    # fused: each program reuses its (16-sample x BLOCK_C) cs tile for 8 samples; else its index maps for 4
    samples = 8 if fused else (4 if x.is_cuda else 1)
    nh = int(h.shape[1]) if fused else 1
    wrap_triton(_afd_apply_fwd_kernel)[(_cdiv(B, samples), _cdiv(C, block_c))](
        x, cs, ss, x_id, x_age, h if fused else cs, w2 if fused else cs, b2 if fused else cs,
        B, C, nh, x.stride(0),
        HW=int(H * W), HWP=_hwp(H, W), ATT_IS_AGE=att_is_age, CHANNELS_LAST=cl, FUSED_MLP=fused,
        BLOCK_C=block_c, FLAT=flat, SAMPLES=samples, BLOCK_M=16, BLOCK_N=64, DOT_F32=_dot_f32(x), num_warps=warps)


def _outputs_like(x: torch.Tensor):
    """Two outputs in the layout the kernels write: channels_last for channels_last x, else NCHW."""
    fmt = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
           else torch.contiguous_format)
    return torch.empty_like(x, memory_format=fmt), torch.empty_like(x, memory_format=fmt)


def _afd_apply(x: torch.Tensor, cs: torch.Tensor, ss: torch.Tensor, att_is_age: bool
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x_id, x_age) in one pass over ``x``; see :func:`kernels.afd_torch.apply_torch`."""
    _check_scales(x, cs, ss)
    if not use_kernel(x):
        return apply_torch(x, cs, ss, att_is_age)
    cs, ss = cs.contiguous(), ss.contiguous()
    x_id, x_age = _outputs_like(x)
    if _shapes_only(x):
        return x_id, x_age
    _launch_apply(x, cs, ss, x_id, x_age, att_is_age)
    return x_id, x_age


afd_apply = triton_op("mtlface_fast::afd_apply", mutates_args=())(_afd_apply)


@triton_op("mtlface_fast::afd_apply_backward", mutates_args=())
def afd_apply_backward(x: torch.Tensor, cs: torch.Tensor, ss: torch.Tensor, g_id: torch.Tensor,
                       g_age: torch.Tensor, att_is_age: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dcs, dss) of :func:`afd_apply` given the gradients of x_id and x_age."""
    if not use_kernel(x):
        return apply_backward_torch(x, cs, ss, g_id, g_age, att_is_age)
    B, C, H, W = x.shape
    cs, ss = cs.contiguous(), ss.contiguous()
    xk, cl = _layout(x)
    fmt = torch.channels_last if cl else torch.contiguous_format
    g_id, g_age = g_id.contiguous(memory_format=fmt), g_age.contiguous(memory_format=fmt)  # x's layout
    block_c, flat, warps = _apply_tile(int(C), int(H), int(W), x.is_cuda)
    nblk = _cdiv(C, block_c)
    dx = torch.empty_like(xk, memory_format=fmt)
    dcs = torch.empty((B, C), device=x.device, dtype=cs.dtype)
    dss_part = torch.empty((B, nblk, H, W), device=x.device, dtype=cs.dtype)
    if _shapes_only(x):
        return dx, dcs, dss_part.sum(1)
    samples = 4 if x.is_cuda else 1  # the block's index maps serve 4 samples
    wrap_triton(_afd_apply_bwd_kernel)[(_cdiv(B, samples), nblk)](
        xk, cs, ss, g_id, g_age, dx, dcs, dss_part, B, C, nblk, xk.stride(0),
        HW=int(H * W), HWP=_hwp(H, W), ATT_IS_AGE=att_is_age, CHANNELS_LAST=cl, BLOCK_C=block_c, FLAT=flat,
        SAMPLES=samples, num_warps=warps)
    return dx, dcs, dss_part.sum(1)


def _check_eval(x, w1, w2, b2, ts, bs):
    _check_x(x)
    B, C, H, W = x.shape
    acc = stats_dtype(x.dtype)
    nh = w1.shape[0] if w1.dim() == 2 else -1
    if w1.dim() != 2 or w1.shape[1] not in (SPP_BINS * C, 2 * SPP_BINS * C):
        raise ValueError(f"w1 must be (hidden, 14C or 28C) for C={C}, got {tuple(w1.shape)}")
    if tuple(w2.shape) != (C, nh) or tuple(b2.shape) != (C,):
        raise ValueError(f"w2 and b2 must be ({C}, {nh}) and ({C},), got {tuple(w2.shape)} and {tuple(b2.shape)}")
    if tuple(ts.shape) != (2, H * W, H * W) or bs.numel() != 1:
        raise ValueError(f"ts must be (2, {H * W}, {H * W}) and bs one value, got {tuple(ts.shape)}, {tuple(bs.shape)}")
    if w1.dtype != x.dtype or w2.dtype != x.dtype:
        raise TypeError(f"w1 and w2 must have x's dtype {x.dtype}, got {w1.dtype} and {w2.dtype}")
    if b2.dtype != acc or ts.dtype != acc or bs.dtype != acc:
        raise TypeError(f"b2, ts and bs must be {acc} for x of {x.dtype}")
    check_same_device(x=x, w1=w1, w2=w2, b2=b2, ts=ts, bs=bs)


def _afd_eval(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, ts: torch.Tensor,
              bs: torch.Tensor, concat: bool, att_is_age: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The eval forward of the fused AFD in three launches; see :func:`kernels.afd_torch.eval_torch`.

    1. pooling, one program per (sample, 128 channels): features in the compute dtype (the dtype the
       channel MLP reads them in), per-program channel max/sum partials;
    2. branches, one program per (16 samples, 32 hidden units): ``h = relu(feat @ w1^T)``; the programs of
       the first hidden block also merge the partials and run the spatial branch as two small dots;
    3. apply, one program per (8 samples, 32 channels): the cs tile from ``h`` and ``w2``, then x_id, x_age.
    """
    _check_eval(x, w1, w2, b2, ts, bs)
    if not use_kernel(x):
        return eval_torch(x, w1, w2, b2, ts, bs, concat, att_is_age)
    B, C, H, W = x.shape
    HW = H * W
    acc = stats_dtype(x.dtype)
    nh, K = int(w1.shape[0]), int(w1.shape[1])
    x_id, x_age = _outputs_like(x)
    if _shapes_only(x):
        return x_id, x_age
    block_c, warps = _pool_tile(int(C), int(H), int(W), x.is_cuda)
    blocks = 8 if x.is_cuda else 1  # GPU: 128 channels per program (8 steps of 16)
    nprog = _cdiv(_cdiv(C, block_c), blocks)
    feat = torch.empty((B, K), device=x.device, dtype=x.dtype)
    sp = torch.empty((B, nprog, 2, HW), device=x.device, dtype=acc)
    none_i = torch.empty((0,), device=x.device, dtype=torch.int32)
    _launch_pool(x, feat, none_i, sp, none_i, nprog, blocks, block_c, warps, concat, False, 1)  # sums
    w1, w2, ts, bs = w1.contiguous(), w2.contiguous(), ts.contiguous(), bs.contiguous()
    h = torch.empty((B, nh), device=x.device, dtype=x.dtype)
    ss = torch.empty((B, HW), device=x.device, dtype=acc)
    block_m, block_n = 16, 32  # B=256: 16 x 14 programs, each streaming 0.46 MB of w1 and 0.23 MB of feat
    wrap_triton(_afd_branch_fwd_kernel)[(_cdiv(B, block_m), _cdiv(nh, block_n))](
        feat, w1, h, sp, ts, bs, ss, B, K, nh, nprog, C,
        HW=int(HW), HWP=_hwp(H, W), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64, DOT_F32=_dot_f32(x),
        num_warps=8, num_stages=2)  # 8 warps, 2 stages: no spills with the spatial branch's two 64x64 tiles
    _launch_apply(x, ss, ss, x_id, x_age, att_is_age, h=h, w2=w2, b2=b2.contiguous())
    return x_id, x_age


afd_eval = triton_op("mtlface_fast::afd_eval", mutates_args=())(_afd_eval)


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
register_decomposition(torch.ops.mtlface_fast.afd_eval.default, eval_torch)
