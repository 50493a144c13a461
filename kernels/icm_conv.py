"""ICM convolutions on compact per-group channel windows (implicit GEMM), one launch per layer.

The batch is sorted by target group. Sample b of group g reads and writes only its window
``S_g = [starts[g], starts[g] + unit)`` of the ``conv_dim`` channels (see
:mod:`mtlface_fast.layers.icm`): a layer is the convolution with the weight block ``W[S_g, S_g]``
(``in_win`` and ``out_win``), ``W[S_g, :]`` (``out_win`` only, the 1x1 ``conv1``) or ``W[:, S_g]``
(``in_win`` only, the 1x1 ``conv2``). A program owns a tile of rows (sample, pixel) of one group and a
tile of output channels, so it reads one weight block straight from the full weight tensor (no copies).

Ops (``torch.ops.mtlface_fast.*``; each has an aten decomposition in ``kernels.utils.DECOMPOSITIONS``):

* ``icm_conv(x, weight, bias, offsets, starts, unit, in_win, out_win)``: windowed convolution + bias,
  differentiable (input, weight and bias gradients by the two ops below);
* ``icm_conv_grad_input`` / ``icm_conv_grad_weight``: the backward convolutions. The weight gradient is
  reduced per output tile over the groups in ascending order and their rows in order, in fp32: the blocks
  of overlapping windows add up deterministically, without atomics;
* ``icm_conv_fused(...)``: inference layer, convolution with the epilogue ``act(acc * scale + shift +
  residual)`` (eval BatchNorm and bias folded into scale/shift, PReLU slopes or a LeakyReLU slope).

``offsets`` is the (G + 1,) int32 prefix sum of the group counts of the sorted batch, ``starts`` the
(G,) int32 window starts (``router_windows``). Off CUDA and without the Triton interpreter the ops run
their aten reference.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .configs import pick
from .utils import check_same_device, register_decomposition, use_kernel

ACT_NONE, ACT_PRELU, ACT_LEAKY = 0, 1, 2


def _conv_configs():
    # BLOCK_M (rows of one group) is chosen by the host with the tile table; these tune the rest. The operands
    # are strided gathers (channel stride H * W), so the pipeline prefetches into registers, not cp.async:
    # two stages at most, and 8 warps for 64-wide tiles, or the prefetched tiles and their pointers spill
    # (sm_90 SASS, bench/README_icm.md).
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk, w, s in ((64, 32, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2), (32, 32, 4, 2))]


def _wgrad_configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in ((32, 64, 64, 4, 3), (64, 64, 64, 4, 3), (32, 32, 32, 2, 3),
                                     (64, 128, 64, 8, 3), (32, 128, 32, 4, 3))]


@triton.autotune(configs=pick(_conv_configs()), key=["CIN", "N_OUT", "H", "W", "KS", "IN_WIN", "OUT_WIN"])
@triton.jit
def _icm_conv_fwd_kernel(
    x_ptr,           # (B, CIN, H, W) input, group-sorted samples, any strides
    w_ptr,           # (C_OUT_FULL, C_IN_FULL, KS, KS) weight, read through w_off and the sw* strides
    scale_ptr,       # (C_OUT_FULL,) fp32 per-output-channel scale                 [HAS_SCALE]
    shift_ptr,       # (C_OUT_FULL,) fp32 per-output-channel shift (bias)          [HAS_SHIFT]
    res_ptr,         # (B, N_OUT, H, W) contiguous residual, added before the act  [HAS_RES]
    slope_ptr,       # (C_OUT_FULL,) fp32 PReLU slopes                             [ACT == 1]
    y_ptr,           # (B, N_OUT, H, W) contiguous output
    offsets_ptr,     # (G + 1,) int32 first sorted sample of each group
    starts_ptr,      # (G,) int32 first channel of each group's window
    G, CIN, N_OUT, H, W, w_off,
    sxb, sxc, sxh, sxw, swo, swi, swh, sww, neg_slope,
    IN_WIN: tl.constexpr, OUT_WIN: tl.constexpr, KS: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    HW = H * W
    # Row tile -> (group, first row): each group's rows are cut into BLOCK_M tiles, groups in order; the
    # grid has cdiv(B * HW, BLOCK_M) + G tiles, the unused ones find no group (g == G) and exit.
    zero = tl.zeros([], dtype=tl.int32)  # loop-carried scalars start as int32 tensors
    g = zero + G
    row0 = zero
    row_end = zero
    tile0 = zero
    for gg in range(0, G):
        lo = tl.load(offsets_ptr + gg) * HW
        hi = tl.load(offsets_ptr + gg + 1) * HW
        nt = (hi - lo + BLOCK_M - 1) // BLOCK_M
        inside = (pid_t >= tile0) & (pid_t < tile0 + nt)
        g = tl.where(inside, gg, g)
        row0 = tl.where(inside, lo + (pid_t - tile0) * BLOCK_M, row0)
        row_end = tl.where(inside, hi, row_end)
        tile0 += nt
    if g < G:
        s = tl.load(starts_ptr + g)
        rows = row0 + tl.arange(0, BLOCK_M)
        m_ok = rows < row_end
        b = rows // HW
        p = rows % HW
        ph = p // W
        pw = p % W
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N_OUT
        if OUT_WIN:
            co = n + s
        else:
            co = n
        if IN_WIN:
            ci0 = s
        else:
            ci0 = 0
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # One loop over (tap, channel chunk) rather than a loop per unrolled tap: one software pipeline, and
        # no per-tap address vectors held live across the taps (those spilled).
        n_k = (CIN + BLOCK_K - 1) // BLOCK_K
        for it in range(0, KS * KS * n_k):
            tap = it // n_k
            kh = tap // KS
            kw = tap % KS
            k = (it % n_k) * BLOCK_K + tl.arange(0, BLOCK_K)
            ih = ph + (kh - KS // 2)
            iw = pw + (kw - KS // 2)
            pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            k_ok = k < CIN
            a = tl.load((x_ptr + b * sxb + ih * sxh + iw * sxw)[:, None] + k[None, :] * sxc,
                        mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load((w_ptr + w_off + kh * swh + kw * sww + co * swo)[None, :] + (ci0 + k)[:, None] * swi,
                         mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if DOT_F32:
                a, wt = a.to(tl.float32), wt.to(tl.float32)
            acc = tl.dot(a, wt, acc, input_precision=DOT_PREC)
        # Epilogue in fp32: folded BN / bias, residual, activation; one rounding to the output dtype.
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + co, mask=n_ok, other=0.0)[None, :]
        if HAS_SHIFT:
            acc = acc + tl.load(shift_ptr + co, mask=n_ok, other=0.0)[None, :]
        out_off = b[:, None] * (N_OUT * HW) + n[None, :] * HW + p[:, None]
        ok = m_ok[:, None] & n_ok[None, :]
        if HAS_RES:
            acc = acc + tl.load(res_ptr + out_off, mask=ok, other=0.0).to(tl.float32)
        if ACT == 1:
            acc = tl.where(acc > 0, acc, acc * tl.load(slope_ptr + co, mask=n_ok, other=0.0)[None, :])
        if ACT == 2:
            acc = tl.where(acc > 0, acc, acc * neg_slope)
        tl.store(y_ptr + out_off, acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.autotune(configs=pick(_wgrad_configs()), key=["CIN", "N_OUT", "C_OUT_FULL", "C_IN_FULL", "H", "W", "KS"])
@triton.jit
def _icm_conv_wgrad_kernel(
    dy_ptr,       # (B, N_OUT, H, W) contiguous output gradient, group-sorted samples
    x_ptr,        # (B, CIN, H, W) forward input, any strides
    dw_ptr,       # (C_OUT_FULL, C_IN_FULL, KS, KS) contiguous fp32 weight gradient
    offsets_ptr,  # (G + 1,) int32 first sorted sample of each group
    starts_ptr,   # (G,) int32 first channel of each group's window
    G, CIN, N_OUT, C_OUT_FULL, C_IN_FULL, H, W,
    sxb, sxc, sxh, sxw,
    IN_WIN: tl.constexpr, OUT_WIN: tl.constexpr, KS: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_o = tl.program_id(0)
    pid_i = tl.program_id(1)
    tap = tl.program_id(2)
    kh = tap // KS
    kw = tap % KS
    HW = H * W
    co = pid_o * BLOCK_N + tl.arange(0, BLOCK_N)
    ci = pid_i * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    # Fixed order (groups ascending, rows ascending): overlapping windows sum deterministically.
    for g in range(0, G):
        s = tl.load(starts_ptr + g)
        if OUT_WIN:
            n = co - s
            n_ok = (n >= 0) & (n < N_OUT)
        else:
            n = co
            n_ok = co < C_OUT_FULL
        if IN_WIN:
            k = ci - s
            k_ok = (k >= 0) & (k < CIN)
        else:
            k = ci
            k_ok = ci < C_IN_FULL
        r0 = tl.load(offsets_ptr + g) * HW
        r1 = tl.load(offsets_ptr + g + 1) * HW
        overlap = (tl.max(n_ok.to(tl.int32), axis=0) > 0) & (tl.max(k_ok.to(tl.int32), axis=0) > 0)
        if overlap:
            for r in range(r0, r1, BLOCK_M):
                rows = r + tl.arange(0, BLOCK_M)
                m_ok = rows < r1
                b = rows // HW
                p = rows % HW
                ih = p // W + (kh - KS // 2)
                iw = p % W + (kw - KS // 2)
                pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                dy = tl.load(dy_ptr + b[:, None] * (N_OUT * HW) + n[None, :] * HW + p[:, None],
                             mask=m_ok[:, None] & n_ok[None, :], other=0.0)
                xa = tl.load(x_ptr + (b * sxb + ih * sxh + iw * sxw)[:, None] + k[None, :] * sxc,
                             mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
                if DOT_F32:
                    dy, xa = dy.to(tl.float32), xa.to(tl.float32)
                acc += tl.dot(tl.trans(dy), xa, input_precision=DOT_PREC)
    ok = (co < C_OUT_FULL)[:, None] & (ci < C_IN_FULL)[None, :]
    tl.store(dw_ptr + (co[:, None] * C_IN_FULL + ci[None, :]) * (KS * KS) + tap, acc, mask=ok)


# -- host side ---------------------------------------------------------------------------------------

# The one launch-or-twin rule (kernels/utils.py), bound here so that tests can force the aten bodies.
_use_kernels = use_kernel


def _dot_f32(x: torch.Tensor) -> bool:
    """bf16/fp16 tiles are multiplied as fp32 in the Triton interpreter, whose low-precision ``tl.dot`` is
    wrong (triton 3.9); on GPUs they go to the tensor cores as they are."""
    return not x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def _dot_precision(x: torch.Tensor) -> str:
    """fp32 products follow PyTorch's convolution setting: TF32 on CUDA when ``cudnn.allow_tf32`` (its
    default, what the reference's convolutions use), IEEE fp32 otherwise. bf16/fp16 ignore it."""
    if x.is_cuda and x.dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def _block_m(rows_per_group: float) -> int:
    return 32 if rows_per_group < 256 else 64


def _check(x, weight, offsets, starts, unit, in_win, out_win):
    check_same_device(x=x, weight=weight, offsets=offsets, starts=starts)
    if x.dim() != 4 or weight.dim() != 4 or weight.size(2) != weight.size(3) or weight.size(2) % 2 != 1:
        raise ValueError(f"x must be (B, C, H, W) and weight (O, I, k, k) with odd k, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    cin = unit if in_win else weight.size(1)
    if x.size(1) != cin:
        raise ValueError(f"x must have {cin} channels (in_win={in_win}, unit={unit}), got {x.size(1)}")
    if offsets.dim() != 1 or starts.dim() != 1 or offsets.numel() != starts.numel() + 1:
        raise ValueError(f"offsets must be (G + 1,) and starts (G,), got {tuple(offsets.shape)} and "
                         f"{tuple(starts.shape)}")
    if offsets.dtype != torch.int32 or starts.dtype != torch.int32:
        raise TypeError(f"offsets and starts must be int32, got {offsets.dtype} and {starts.dtype}")


def _launch_conv(x, weight, offsets, starts, unit, in_win, out_win, n_out, *, scale=None, shift=None,
                 residual=None, slope=None, act=ACT_NONE, neg_slope=0.0, transpose=False):
    """Launch the forward kernel. ``transpose`` runs the input-gradient convolution (flipped, transposed
    weight, window flags swapped by the caller)."""
    B, cin, H, W = x.shape
    G = starts.numel()
    ks = weight.size(2)
    y = torch.empty((B, n_out, H, W), device=x.device, dtype=x.dtype)
    if B == 0:
        return y
    w = weight.to(x.dtype)
    swo, swi, swh, sww = w.stride()
    w_off = 0
    if transpose:
        swo, swi = swi, swo
        w_off = (ks - 1) * (swh + sww)
        swh, sww = -swh, -sww
    bm = _block_m(B * H * W / max(G, 1))
    dummy = y
    res = residual.contiguous() if residual is not None else None
    n_tiles = triton.cdiv(B * H * W, bm) + G
    grid = lambda meta: (n_tiles, triton.cdiv(n_out, meta["BLOCK_N"]))  # noqa: E731
    wrap_triton(_icm_conv_fwd_kernel)[grid](
        x, w, scale if scale is not None else dummy, shift if shift is not None else dummy,
        res if res is not None else dummy, slope if slope is not None else dummy, y,
        offsets, starts,
        G, cin, n_out, H, W, w_off, *x.stride(), swo, swi, swh, sww, float(neg_slope),
        IN_WIN=bool(in_win), OUT_WIN=bool(out_win), KS=ks, HAS_SCALE=scale is not None,
        HAS_SHIFT=shift is not None, HAS_RES=res is not None, ACT=int(act), DOT_PREC=_dot_precision(x),
        DOT_F32=_dot_f32(x),
        BLOCK_M=bm)
    return y


def _sample_groups(offsets: torch.Tensor, batch: int) -> torch.Tensor:
    """(B,) group of each sorted sample from the (G + 1,) offsets."""
    # searchsorted(offsets[1:], i, right=True) as a comparison count: G is small, and it exports to ONNX.
    rows = torch.arange(batch, device=offsets.device)
    return (rows[:, None] >= offsets[1:].long()[None, :]).sum(1)


def _window_index(offsets, starts, batch, unit):
    """(B, unit) full-width channel of each compact channel of each sorted sample."""
    grp = _sample_groups(offsets, batch).clamp(max=starts.numel() - 1)
    return starts.long()[grp][:, None] + torch.arange(unit, device=starts.device)


def _block(weight, starts, g, unit, in_win, out_win):
    w = weight
    idx = starts[g].long() + torch.arange(unit, device=weight.device)
    if out_win:
        w = w.index_select(0, idx)
    if in_win:
        w = w.index_select(1, idx)
    return w


def _ref_conv(x, weight, bias, offsets, starts, unit, in_win, out_win):
    """aten reference of ``icm_conv``: every group's block applied to the whole batch, then selected."""
    B = x.size(0)
    grp = _sample_groups(offsets, B).view(-1, 1, 1, 1)
    pad = weight.size(2) // 2
    y = None
    for g in range(starts.numel()):
        wb = _block(weight, starts, g, unit, in_win, out_win).to(x.dtype)
        bb = None
        if bias is not None:
            bb = bias.index_select(0, starts[g].long() + torch.arange(unit, device=bias.device)) if out_win else bias
            bb = bb.to(x.dtype)
        yg = F.conv2d(x, wb, bb, 1, pad)
        y = yg if y is None else torch.where(grp == g, yg, y)
    return y


def _ref_grad_input(dy, weight, offsets, starts, unit, in_win, out_win, cin):
    B = dy.size(0)
    grp = _sample_groups(offsets, B).view(-1, 1, 1, 1)
    pad = weight.size(2) // 2
    dx = None
    for g in range(starts.numel()):
        wb = _block(weight, starts, g, unit, in_win, out_win).to(dy.dtype)
        dg = F.conv_transpose2d(dy, wb, None, 1, pad)
        dx = dg if dx is None else torch.where(grp == g, dg, dx)
    return dx


def _ref_grad_weight(dy, x, weight, offsets, starts, unit, in_win, out_win):
    B = dy.size(0)
    grp = _sample_groups(offsets, B).view(-1, 1, 1, 1)
    pad = weight.size(2) // 2
    dw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
    ar = torch.arange(unit, device=weight.device)
    for g in range(starts.numel()):
        sel = (grp == g).to(dy.dtype)
        wb = _block(weight, starts, g, unit, in_win, out_win)
        dwg = torch.ops.aten.convolution_backward(
            (dy * sel).float(), x.float(), wb.float(), [wb.size(0)], [1, 1], [pad, pad], [1, 1], False, [0, 0], 1,
            [False, True, False])[1]
        idx = starts[g].long() + ar
        if in_win:
            dwg = torch.zeros((dwg.size(0), weight.size(1)) + dwg.shape[2:], device=dw.device,
                              dtype=dw.dtype).index_add(1, idx, dwg)
        dw = dw.index_add(0, idx, dwg) if out_win else dw + dwg
    return dw.to(weight.dtype)


def _bias_grad(dy, offsets, starts, unit, out_win, c_out):
    s = dy.float().sum((2, 3))
    if out_win:
        s = torch.zeros((dy.size(0), c_out), device=dy.device, dtype=s.dtype).scatter(
            1, _window_index(offsets, starts, dy.size(0), unit), s)
    return s.sum(0)


def _ref_fused(x, weight, scale, shift, residual, slope, offsets, starts, unit, in_win, out_win, act, neg_slope):
    y = _ref_conv(x, weight, None, offsets, starts, unit, in_win, out_win).float()
    if out_win:
        idx = _window_index(offsets, starts, x.size(0), unit)
        per = lambda v: v.float()[idx][:, :, None, None]  # noqa: E731
    else:
        per = lambda v: v.float().view(1, -1, 1, 1)  # noqa: E731
    if scale is not None:
        y = y * per(scale)
    if shift is not None:
        y = y + per(shift)
    if residual is not None:
        y = y + residual.float()
    if act == ACT_PRELU:
        y = torch.where(y > 0, y, y * per(slope))
    elif act == ACT_LEAKY:
        y = torch.where(y > 0, y, y * neg_slope)
    return y.to(x.dtype)


# -- torch.library ops -------------------------------------------------------------------------------

@triton_op("mtlface_fast::icm_conv", mutates_args=())
def icm_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], offsets: torch.Tensor,
             starts: torch.Tensor, unit: int, in_win: bool, out_win: bool) -> torch.Tensor:
    """Windowed convolution + bias on a group-sorted batch.

    Args:
        x: (B, unit or C_in, H, W) input, samples sorted by group.
        weight: (C_out, C_in, k, k) full weight (k odd, stride 1, padding k // 2).
        bias: (C_out,) or None.
        offsets: (G + 1,) int32 group offsets of the sorted batch; starts: (G,) int32 window starts.
        unit: window width; in_win / out_win: whether input / output channels are windowed.

    Returns:
        (B, unit or C_out, H, W) in x's dtype.
    """
    _check(x, weight, offsets, starts, unit, in_win, out_win)
    n_out = unit if out_win else weight.size(0)
    if not _use_kernels(x):
        return _ref_conv(x, weight, bias, offsets, starts, unit, in_win, out_win)
    return _launch_conv(x, weight, offsets, starts, unit, in_win, out_win, n_out,
                        shift=None if bias is None else bias.float())


@triton_op("mtlface_fast::icm_conv_grad_input", mutates_args=())
def icm_conv_grad_input(dy: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, starts: torch.Tensor,
                        unit: int, in_win: bool, out_win: bool, cin: int) -> torch.Tensor:
    """Input gradient of ``icm_conv``: (B, unit or C_out, H, W) -> (B, cin, H, W)."""
    if not _use_kernels(dy):
        return _ref_grad_input(dy, weight, offsets, starts, unit, in_win, out_win, cin)
    # The transposed convolution is the forward kernel on the flipped, transposed block: windows swap.
    return _launch_conv(dy.contiguous(), weight, offsets, starts, unit, out_win, in_win, cin, transpose=True)


@triton_op("mtlface_fast::icm_conv_grad_weight", mutates_args=())
def icm_conv_grad_weight(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
                         starts: torch.Tensor, unit: int, in_win: bool, out_win: bool) -> torch.Tensor:
    """Weight gradient of ``icm_conv`` (full weight shape, weight's dtype; fp32 accumulation)."""
    if not _use_kernels(dy):
        return _ref_grad_weight(dy, x, weight, offsets, starts, unit, in_win, out_win)
    c_out, c_in, ks, _ = weight.shape
    B, cin, H, W = x.shape
    dw = torch.empty((c_out, c_in, ks, ks), device=x.device, dtype=torch.float32)
    dy = dy.contiguous().to(x.dtype)
    grid = lambda meta: (triton.cdiv(c_out, meta["BLOCK_N"]), triton.cdiv(c_in, meta["BLOCK_K"]), ks * ks)  # noqa
    wrap_triton(_icm_conv_wgrad_kernel)[grid](
        dy, x, dw, offsets, starts, starts.numel(), cin, dy.size(1), c_out, c_in, H, W, *x.stride(),
        IN_WIN=bool(in_win), OUT_WIN=bool(out_win), KS=ks, DOT_PREC=_dot_precision(x), DOT_F32=_dot_f32(x))
    return dw.to(weight.dtype)


@triton_op("mtlface_fast::icm_conv_fused", mutates_args=())
def icm_conv_fused(x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor],
                   shift: Optional[torch.Tensor], residual: Optional[torch.Tensor], slope: Optional[torch.Tensor],
                   offsets: torch.Tensor, starts: torch.Tensor, unit: int, in_win: bool, out_win: bool,
                   act: int, neg_slope: float) -> torch.Tensor:
    """Inference layer ``act(conv(x) * scale + shift + residual)`` on a group-sorted batch.

    scale / shift / slope are full-width (C_out,) vectors (indexed by each sample's window); residual is
    (B, unit or C_out, H, W); act is 0 (none), 1 (PReLU with ``slope``) or 2 (LeakyReLU ``neg_slope``).
    """
    _check(x, weight, offsets, starts, unit, in_win, out_win)
    if act not in (ACT_NONE, ACT_PRELU, ACT_LEAKY) or (act == ACT_PRELU and slope is None):
        raise ValueError(f"act must be 0, 1 (with slope) or 2, got {act}")
    n_out = unit if out_win else weight.size(0)
    if not _use_kernels(x):
        return _ref_fused(x, weight, scale, shift, residual, slope, offsets, starts, unit, in_win, out_win, act,
                          neg_slope)
    f32 = lambda v: None if v is None else v.float().contiguous()  # noqa: E731
    return _launch_conv(x, weight, offsets, starts, unit, in_win, out_win, n_out, scale=f32(scale),
                        shift=f32(shift), residual=residual, slope=f32(slope), act=act, neg_slope=neg_slope)


def _setup(ctx, inputs, output):
    x, weight, bias, offsets, starts, unit, in_win, out_win = inputs
    ctx.save_for_backward(x, weight, offsets, starts)
    ctx.unit, ctx.in_win, ctx.out_win, ctx.has_bias = unit, in_win, out_win, bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, dy):
    x, weight, offsets, starts = ctx.saved_tensors
    u, iw, ow = ctx.unit, ctx.in_win, ctx.out_win
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = icm_conv_grad_input(dy, weight, offsets, starts, u, iw, ow, x.size(1))
    if ctx.needs_input_grad[1]:
        dw = icm_conv_grad_weight(dy, x, weight, offsets, starts, u, iw, ow)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        db = _bias_grad(dy, offsets, starts, u, ow, weight.size(0)).to(ctx.bias_dtype)
    return dx, dw, db, None, None, None, None, None


icm_conv.register_autograd(_backward, setup_context=_setup)

register_decomposition(torch.ops.mtlface_fast.icm_conv.default, _ref_conv)
register_decomposition(torch.ops.mtlface_fast.icm_conv_grad_input.default, _ref_grad_input)
register_decomposition(torch.ops.mtlface_fast.icm_conv_grad_weight.default, _ref_grad_weight)
register_decomposition(torch.ops.mtlface_fast.icm_conv_fused.default, _ref_fused)
