"""Whole compact ICM inference forward in one persistent launch (``mtlface_fast::icm_forward``).

One program owns a tile of ``SPT`` samples of one target group g (``BLOCK_M = SPT * HWP`` rows, HWP =
the pixel count padded to a power of two) and runs every layer of the ICM on them, keeping the compact
state (``BLOCK_M x UP`` values, UP = the window width padded to a power of two) in a per-program scratch
tile that stays in L1/L2 between layers:

1. ``conv1`` (1x1, C_in -> window): x rows (sample, pixel) @ the group's block ``W1[S_g, :]^T``;
2. ``2 * repeat`` 3x3 window convolutions, an implicit GEMM over (tap, channel chunk): the rows shifted
   by the tap are gathered from the scratch tile (channel-contiguous, so 16-byte / cp.async loads) and
   multiplied by the group's block ``W[S_g, S_g]`` of the tap; the second convolution of a block adds
   the block input (the residual) before its activation;
3. ``conv2`` (1x1, window -> C_out) by output-channel chunks, written to the (B, C_out, H, W) output.

Every epilogue is ``act(norm(acc + shift) [+ residual])`` in fp32: eval BatchNorm and the bias folded into
the packed weights and ``shift`` (:func:`mtlface_fast.layers.fold.fold_bn`), InstanceNorm per sample and
channel over the valid pixels (``NORM_IN``, TPAMI), PReLU / LeakyReLU slopes per channel. A CTA barrier
separates a layer's stores from the next layer's shifted loads.

Grouping is on the device: every program counts the groups of the batch (``groups``, any integer dtype),
finds its (group, tile) from the prefix sum of the per-group tile counts and its samples from their rank
within the group. The grid, ``cdiv(B, SPT) + G + 1``, bounds the tile count from above; the last program
writes NaN over the output of every sample whose group is outside ``[0, G)`` (the host does not read the
groups). No host synchronization, one launch.

Packed operands (built once per weights version by :mod:`mtlface_fast.layers.icm_triton`, zero padded):

* ``w1``: (G, CINP, UP) ``conv1`` block of each group, input-channel major;
* ``w3``: (L3, G, 9, UP, UP) 3x3 blocks of each layer, group and tap, (in, out);
* ``w2``: (G, UP, COUTP) ``conv2`` block of each group;
* ``v1`` (G, 4, UP), ``v3`` (L3, G, 4, UP), ``v2`` (4, COUTP): per-channel rows shift, slope, gamma, beta
  (fp32, fp64 for fp64 models).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .configs import pick
from .utils import check_same_device, register_decomposition, use_kernel


def _forward_configs():
    # BLOCK_K: channel chunk of the window GEMMs; the conv1 chunk and the conv2 output chunk are host-picked.
    # 8 warps first: no spills in either variant (sm_90 SASS, bench/README_icm.md).
    return [triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bk, w, s in ((64, 8, 3), (32, 8, 4), (64, 4, 3), (32, 4, 3), (64, 4, 2))]


def _prune_configs(configs, named_args, **kwargs):
    """InstanceNorm's per-sample reductions over the rows cost registers: 4 warps spill there, 8 do not."""
    if kwargs.get("NORM_IN", named_args.get("NORM_IN")):
        return [c for c in configs if c.num_warps >= 8] or configs[:1]
    return configs


@triton.jit
def _epilogue(acc, vec_ptr, n, row_ok, slot, eps, HW, res, NORM_IN: tl.constexpr, HAS_ACT: tl.constexpr,
              SPT: tl.constexpr, NP: tl.constexpr):
    """act(norm(acc + shift) + res) for one (BLOCK_M, NP) tile; vec_ptr -> (4, NP) rows shift, slope, gamma,
    beta (columns n)."""
    acc = acc + tl.load(vec_ptr + n)[None, :]
    if NORM_IN:
        # InstanceNorm: statistics of each sample (slot) and channel over its valid pixels, two-pass variance.
        for s in tl.static_range(SPT):
            sel = (row_ok & (slot == s))[:, None]
            mean = tl.sum(tl.where(sel, acc, 0.0), axis=0) / HW
            d = acc - mean[None, :]
            var = tl.sum(tl.where(sel, d * d, 0.0), axis=0) / HW
            acc = tl.where(sel, d * tl.rsqrt(var + eps)[None, :], acc)
        acc = acc * tl.load(vec_ptr + 2 * NP + n)[None, :] + tl.load(vec_ptr + 3 * NP + n)[None, :]
    acc = acc + res
    if HAS_ACT:
        acc = tl.where(acc > 0, acc, acc * tl.load(vec_ptr + NP + n)[None, :])
    return acc


@triton.autotune(configs=pick(_forward_configs()), key=["CIN", "COUT", "H", "W", "L3", "UP", "SPT", "NORM_IN"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _icm_fwd_kernel(
    x_ptr,       # (B, CIN, H, W) input, any strides, any float dtype (cast to the compute dtype on load)
    grp_ptr,     # (B,) integer target group of each sample
    w1_ptr,      # (G, CINP, UP) conv1 blocks, compute dtype
    w3_ptr,      # (L3, G, 9, UP, UP) 3x3 blocks (tap, in, out), compute dtype
    w2_ptr,      # (G, UP, COUTP) conv2 blocks, compute dtype
    v1_ptr,      # (G, 4, UP) conv1 shift / slope / gamma / beta, accumulator dtype
    v3_ptr,      # (L3, G, 4, UP) the same per 3x3 layer
    v2_ptr,      # (4, COUTP) the same for conv2
    scr_ptr,     # (programs, 2, BLOCK_M, UP) scratch: block input / residual and the middle activation
    y_ptr,       # (B, COUT, H, W) contiguous output, compute dtype
    B, G, CIN, COUT, H, W, L3,
    sxb, sxc, sxh, sxw, eps,
    UP: tl.constexpr, CINP: tl.constexpr, COUTP: tl.constexpr, HWP: tl.constexpr, SPT: tl.constexpr,
    GP: tl.constexpr, NORM_IN: tl.constexpr, OUT_ACT: tl.constexpr, DOT_PREC: tl.constexpr,
    DOT_F32: tl.constexpr, BLOCK_KX: tl.constexpr, BLOCK_NO: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    BLOCK_M: tl.constexpr = SPT * HWP
    BK: tl.constexpr = min(BLOCK_K, UP)
    KCH: tl.constexpr = UP // BK
    pid = tl.program_id(0)
    last = tl.num_programs(0) - 1
    HW = H * W
    ACC: tl.constexpr = v1_ptr.dtype.element_ty
    CDT: tl.constexpr = w1_ptr.dtype.element_ty
    ar_b = tl.arange(0, BLOCK_B)
    ar_g = tl.arange(0, GP)
    if pid == last:
        # Samples whose group is out of range: NaN output (the host does not read the groups to check them).
        for b0 in range(0, B, BLOCK_B):
            bb = b0 + ar_b
            gb = tl.load(grp_ptr + bb, mask=bb < B, other=0)
            bad = (bb < B) & ((gb < 0) | (gb >= G))
            if tl.sum(bad.to(tl.int32), axis=0) > 0:
                ar_e = tl.arange(0, 256)
                for e0 in range(0, COUT * HW, 256):
                    e = e0 + ar_e
                    tl.store(y_ptr + bb.to(tl.int64)[:, None] * (COUT * HW) + e[None, :],
                             tl.full((BLOCK_B, 256), float("nan"), y_ptr.dtype.element_ty),
                             mask=bad[:, None] & (e < COUT * HW)[None, :])
    else:
        # (group, tile within the group) of this program: per-group tile counts, groups in ascending order.
        counts = tl.zeros((GP,), dtype=tl.int32)
        for b0 in range(0, B, BLOCK_B):
            bb = b0 + ar_b
            gb = tl.load(grp_ptr + bb, mask=bb < B, other=-1)
            counts += tl.sum((gb[:, None] == ar_g[None, :]).to(tl.int32), axis=0)
        n_tiles = tl.where(ar_g < G, (counts + SPT - 1) // SPT, 0)
        t_end = tl.cumsum(n_tiles, axis=0)
        inside = (pid >= t_end - n_tiles) & (pid < t_end)
        found = tl.sum(inside.to(tl.int32), axis=0)
        g = tl.sum(tl.where(inside, ar_g, 0), axis=0)
        j = tl.sum(tl.where(inside, pid - (t_end - n_tiles), 0), axis=0)
        if found > 0:
            # Samples of the tile: ranks j * SPT .. j * SPT + SPT - 1 among the samples of group g (batch order).
            ar_s = tl.arange(0, SPT)
            want = j * SPT + ar_s
            samp = tl.full((SPT,), -1, tl.int32)
            base = g * 0
            for b0 in range(0, B, BLOCK_B):
                bb = b0 + ar_b
                gb = tl.load(grp_ptr + bb, mask=bb < B, other=-1)
                m = (gb == g).to(tl.int32)
                rank = base + tl.cumsum(m, axis=0) - m
                hit = (m[None, :] > 0) & (rank[None, :] == want[:, None])
                samp += tl.sum(tl.where(hit, bb[None, :] + 1, 0), axis=1)
                base += tl.sum(m, axis=0)
            r = tl.arange(0, BLOCK_M)
            slot = r // HWP
            p = r % HWP
            ph = p // W
            pw = p % W
            b_row = tl.sum(tl.where(slot[:, None] == ar_s[None, :], samp[None, :], 0), axis=1)
            row_ok = (b_row >= 0) & (p < HW)
            n = tl.arange(0, UP)
            scr_h = scr_ptr + pid.to(tl.int64) * (2 * BLOCK_M * UP)
            own = r[:, None] * UP + n[None, :]

            # conv1: (rows, CIN) @ (CIN, UP); x is read in its own layout and dtype.
            acc = tl.zeros((BLOCK_M, UP), dtype=ACC)
            x_row = x_ptr + b_row.to(tl.int64) * sxb + ph * sxh + pw * sxw
            w1 = w1_ptr + g * (CINP * UP)
            for k0 in range(0, CINP, BLOCK_KX):
                k = k0 + tl.arange(0, BLOCK_KX)
                a = tl.load(x_row[:, None] + k[None, :] * sxc, mask=row_ok[:, None] & (k < CIN)[None, :],
                            other=0.0).to(CDT)
                wt = tl.load(w1 + k[:, None] * UP + n[None, :])
                if DOT_F32:
                    a, wt = a.to(tl.float32), wt.to(tl.float32)
                acc = tl.dot(a, wt, acc, input_precision=DOT_PREC)
            acc = _epilogue(acc, v1_ptr + g * (4 * UP), n, row_ok, slot, eps, HW, 0.0, NORM_IN, True, SPT, UP)
            tl.store(scr_h + own, acc.to(CDT))
            tl.debug_barrier()

            # 3x3 window convolutions: layer l reads buffer l % 2 and writes the other; odd layers add the
            # block input (buffer 0, which they overwrite) before the activation.
            for layer in range(0, L3):
                src = scr_h + (layer % 2) * (BLOCK_M * UP)
                dst = scr_h + ((layer + 1) % 2) * (BLOCK_M * UP)
                wl = w3_ptr + (layer * G + g).to(tl.int64) * (9 * UP * UP)
                acc = tl.zeros((BLOCK_M, UP), dtype=ACC)
                for it in range(0, 9 * KCH):
                    tap = it // KCH
                    k = (it % KCH) * BK + tl.arange(0, BK)
                    ih = ph + (tap // 3 - 1)
                    iw = pw + (tap % 3 - 1)
                    ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                    a = tl.load(src + (slot * HWP + ih * W + iw)[:, None] * UP + k[None, :], mask=ok[:, None],
                                other=0.0)
                    wt = tl.load(wl + tap * (UP * UP) + k[:, None] * UP + n[None, :])
                    if DOT_F32:
                        a, wt = a.to(tl.float32), wt.to(tl.float32)
                    acc = tl.dot(a, wt, acc, input_precision=DOT_PREC)
                res = tl.load(dst + own, mask=row_ok[:, None] & (layer % 2 == 1), other=0.0).to(ACC)
                acc = _epilogue(acc, v3_ptr + (layer * G + g) * (4 * UP), n, row_ok, slot, eps, HW, res, NORM_IN,
                                True, SPT, UP)
                tl.store(dst + own, acc.to(CDT))
                tl.debug_barrier()

            # conv2: (rows, UP) @ (UP, COUT) by BLOCK_NO output channels, stored to (B, COUT, H, W).
            y_row = y_ptr + b_row.to(tl.int64) * (COUT * HW) + p
            w2 = w2_ptr + g * (UP * COUTP)
            for n0 in range(0, COUTP, BLOCK_NO):
                no = n0 + tl.arange(0, BLOCK_NO)
                acc = tl.zeros((BLOCK_M, BLOCK_NO), dtype=ACC)
                for k0 in range(0, UP, BK):
                    k = k0 + tl.arange(0, BK)
                    a = tl.load(scr_h + r[:, None] * UP + k[None, :])
                    wt = tl.load(w2 + k[:, None] * COUTP + no[None, :])
                    if DOT_F32:
                        a, wt = a.to(tl.float32), wt.to(tl.float32)
                    acc = tl.dot(a, wt, acc, input_precision=DOT_PREC)
                acc = _epilogue(acc, v2_ptr, no, row_ok, slot, eps, HW, 0.0, False, OUT_ACT, SPT, COUTP)
                tl.store(y_row[:, None] + no[None, :] * HW, acc.to(y_ptr.dtype.element_ty),
                         mask=row_ok[:, None] & (no < COUT)[None, :])


# -- host side ---------------------------------------------------------------------------------------


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (int(n) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def padded_sizes(cin: int, unit: int, cout: int):
    """(CINP, UP, COUTP, BLOCK_KX, BLOCK_NO): the packed operands' padded widths and the conv1 / conv2 chunks."""
    bkx = 64 if cin >= 64 else _pow2(cin)
    bno = 128 if cout >= 128 else _pow2(cout)
    return _cdiv(cin, bkx) * bkx, _pow2(unit), _cdiv(cout, bno) * bno, bkx, bno


def tile_rows(h: int, w: int):
    """(HWP, SPT): pixels per sample padded to a power of two, samples per program (BLOCK_M = SPT * HWP >= 64)."""
    hwp = _pow2(h * w)
    return hwp, max(1, 64 // hwp)


def fits(h: int, w: int, unit: int) -> bool:
    """Whether one program can hold a sample's compact state: BLOCK_M x UP <= 64 x 128 (accumulator registers)."""
    hwp, spt = tile_rows(h, w)
    return hwp * spt * _pow2(unit) <= 64 * 128


def _dot_f32(x: torch.Tensor) -> bool:
    # bf16/fp16 tiles are multiplied as fp32 in the Triton interpreter, whose low-precision tl.dot is wrong.
    return not x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def _dot_precision(x: torch.Tensor) -> str:
    # fp32 follows PyTorch's convolution setting (TF32 on CUDA when cudnn.allow_tf32); others ignore it.
    if x.is_cuda and x.dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def _check(x, groups, w1, w3, w2, v1, v3, v2, unit, cout):
    check_same_device(x=x, groups=groups, w1=w1, w3=w3, w2=w2, v1=v1, v3=v3, v2=v2)
    if x.dim() != 4 or groups.dim() != 1 or groups.numel() != x.size(0):
        raise ValueError(f"x must be (B, C, H, W) and groups (B,), got {tuple(x.shape)} and {tuple(groups.shape)}")
    if groups.dtype.is_floating_point or groups.dtype == torch.bool:
        raise TypeError(f"groups must be an integer tensor, got {groups.dtype}")
    G, cinp, up = w1.shape
    cinp2, up2, coutp, _, _ = padded_sizes(x.size(1), unit, cout)
    if (cinp, up) != (cinp2, up2) or w2.shape != (G, up, coutp) or w3.dim() != 5 or \
            w3.shape[1:] != (G, 9, up, up) or v1.shape != (G, 4, up) or v3.shape != (w3.size(0), G, 4, up) or \
            v2.shape != (4, coutp):
        raise ValueError(f"packed ICM operands do not match x {tuple(x.shape)}, unit {unit}, cout {cout}: w1 "
                         f"{tuple(w1.shape)}, w3 {tuple(w3.shape)}, w2 {tuple(w2.shape)}, v1 {tuple(v1.shape)}, "
                         f"v3 {tuple(v3.shape)}, v2 {tuple(v2.shape)}")
    if not (w1.dtype == w3.dtype == w2.dtype) or not (v1.dtype == v3.dtype == v2.dtype):
        raise TypeError("packed weights (w1, w3, w2) and vectors (v1, v3, v2) must each share one dtype")


def _launch(x, groups, w1, w3, w2, v1, v3, v2, unit, cout, norm_in, out_act, eps):
    B, cin, H, W = x.shape
    G, cinp, up = w1.shape
    _, _, coutp, bkx, bno = padded_sizes(cin, unit, cout)
    hwp, spt = tile_rows(H, W)
    y = torch.empty((B, cout, H, W), device=x.device, dtype=w1.dtype)
    if B == 0:
        return y
    n_prog = _cdiv(B, spt) + G + 1  # an upper bound of the tile count, + the NaN-writing program
    scratch = torch.empty((n_prog, 2, spt * hwp, up), device=x.device, dtype=w1.dtype)
    wrap_triton(_icm_fwd_kernel)[(n_prog,)](
        x, groups, w1, w3, w2, v1, v3, v2, scratch, y,
        B, G, cin, cout, H, W, w3.size(0), *x.stride(), float(eps),
        UP=up, CINP=cinp, COUTP=coutp, HWP=hwp, SPT=spt, GP=_pow2(G, 2), NORM_IN=bool(norm_in),
        OUT_ACT=bool(out_act), DOT_PREC=_dot_precision(x if x.dtype == w1.dtype else w1), DOT_F32=_dot_f32(w1),
        BLOCK_KX=bkx, BLOCK_NO=bno, BLOCK_B=128)
    return y


def _ref_forward(x, groups, w1, w3, w2, v1, v3, v2, unit, cout, norm_in, out_act, eps):
    """aten twin of ``icm_forward``: every group's blocks applied to the whole batch, each sample keeping its
    own group's result (no host read of the groups); the same per-layer roundings as the kernel."""
    G, _, up = w1.shape
    cin, U, L3 = x.size(1), unit, w3.size(0)
    cdt, acc = w1.dtype, v1.dtype
    h0 = x.to(cdt).to(acc)

    def epi(y, vec, res=None, norm=norm_in, act=True):
        n = y.size(1)
        col = lambda r: vec[r, :n].view(1, -1, 1, 1)  # noqa: E731
        y = y + col(0)
        if norm:
            y = F.instance_norm(y, eps=eps) * col(2) + col(3)
        if res is not None:
            y = y + res
        if act:
            y = torch.where(y > 0, y, y * col(1))
        return y.to(cdt).to(acc)

    out = None
    for g in range(G):
        h = epi(F.conv2d(h0, w1[g, :cin, :U].t().to(acc)[:, :, None, None]), v1[g])
        mid = h
        for layer in range(L3):
            wl = w3[layer, g].view(3, 3, up, up)[:, :, :U, :U].permute(3, 2, 0, 1).to(acc)
            if layer % 2 == 0:
                mid = epi(F.conv2d(h, wl, padding=1), v3[layer, g])
            else:
                h = epi(F.conv2d(mid, wl, padding=1), v3[layer, g], res=h)
        o = epi(F.conv2d(h, w2[g, :U, :cout].t().to(acc)[:, :, None, None]), v2, norm=False, act=out_act)
        out = o if out is None else torch.where((groups == g).view(-1, 1, 1, 1), o, out)
    bad = ((groups < 0) | (groups >= G)).view(-1, 1, 1, 1)
    return torch.where(bad, torch.full_like(out, float("nan")), out).to(cdt)


@triton_op("mtlface_fast::icm_forward", mutates_args=())
def icm_forward(x: torch.Tensor, groups: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                v1: torch.Tensor, v3: torch.Tensor, v2: torch.Tensor, unit: int, cout: int, norm_in: bool,
                out_act: bool, eps: float) -> torch.Tensor:
    """The whole compact ICM inference forward in one launch.

    Args:
        x: (B, C_in, H, W) input, any strides and float dtype.
        groups: (B,) integer target groups (out-of-range groups give NaN outputs).
        w1, w3, w2, v1, v3, v2: packed operands (see the module docstring; layers/icm_triton.py packs them).
        unit: window width; cout: output channels; norm_in: InstanceNorm after conv1 and the 3x3 layers (TPAMI);
        out_act: conv2 has an activation (CVPR); eps: the InstanceNorm epsilon.

    Returns:
        (B, cout, H, W) in the packed weights' dtype.
    """
    _check(x, groups, w1, w3, w2, v1, v3, v2, unit, cout)
    if not use_kernel(x):
        return _ref_forward(x, groups, w1, w3, w2, v1, v3, v2, unit, cout, norm_in, out_act, eps)
    return _launch(x, groups, w1, w3, w2, v1, v3, v2, unit, cout, norm_in, out_act, eps)


register_decomposition(torch.ops.mtlface_fast.icm_forward.default, _ref_forward)
