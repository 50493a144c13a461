"""PyTorch twins of the fused AFD ops in :mod:`kernels.afd` (no triton needed).

Each function computes what its kernel computes, with standard aten ops: the ``torch`` backend runs them,
the ops fall back to them where no kernel can launch (see :func:`kernels.utils.use_kernel`), and export
uses them as the ops' decompositions. Statistics are fp32, fp64 for fp64 inputs (gradcheck).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

SPP_SIZES = (1, 2, 3)  # pyramid sizes of both AFD variants (the reference's SPPModule sizes)
SPP_BINS = sum(s * s for s in SPP_SIZES)  # 14 pooled values per channel and pooling kind


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of pooled features, scales and statistics: fp32 (fp64 for fp64 inputs, for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------
# PyTorch implementation of the two passes over x (torch backend, and the kernels' decompositions)
# ----------------------------------------------------------------------------------------------------

def pool_torch(x: torch.Tensor, concat: bool, with_idx: bool = True
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pooled inputs of both AFD branches.

    Args:
        x: (B, C, H, W) feature map.
        concat: TPAMI layout (avg then max, concatenated) when True, CVPR (avg + max) when False.
        with_idx: return the argmax indices (needed for backward); when False they are empty tensors.

    Returns:
        feat: (B, 14C) or (B, 28C) channel-MLP input in (size, c, i, j) order, fp32.
        feat_idx: (B, 14C) int32, flat pixel index (h*W + w) of every max-SPP bin ((B, 0) without idx).
        sp: (B, 2, H, W) fp32, [max over channels, mean over channels].
        sp_idx: (B, H, W) int32, channel of the max of every pixel ((B, 0, 0) without idx).
    """
    xs = x.to(stats_dtype(x.dtype))
    avg, mx, idx = [], [], []
    for s in SPP_SIZES:
        avg.append(F.adaptive_avg_pool2d(xs, s).flatten(1))
        m, i = F.adaptive_max_pool2d(xs, s, return_indices=True)
        mx.append(m.flatten(1))
        idx.append(i.flatten(1))
    avg, mx = torch.cat(avg, 1), torch.cat(mx, 1)
    feat = torch.cat([avg, mx], 1) if concat else avg + mx
    cmax, cidx = xs.max(1)
    sp = torch.stack([cmax, xs.mean(1)], 1).contiguous()
    if not with_idx:
        B = x.shape[0]
        return feat, x.new_empty((B, 0), dtype=torch.int32), sp, x.new_empty((B, 0, 0), dtype=torch.int32)
    return feat, torch.cat(idx, 1).to(torch.int32), sp, cidx.to(torch.int32).contiguous()


def _like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` in x's dtype and memory format (the layout the kernels write: that of ``empty_like(x)``)."""
    fmt = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
           else torch.contiguous_format)
    return t.to(x.dtype).contiguous(memory_format=fmt)


def _mask(cs: torch.Tensor, ss: torch.Tensor) -> torch.Tensor:
    return (cs[:, :, None, None] + ss[:, None]) * 0.5


def apply_torch(x: torch.Tensor, cs: torch.Tensor, ss: torch.Tensor, att_is_age: bool
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x_id, x_age) from x (B, C, H, W), channel scale cs (B, C) and spatial scale ss (B, H, W).

    The attended part is ``x * (cs + ss) / 2`` and the residual part ``x - attended``; CVPR
    (``att_is_age``) calls the attended part x_age, TPAMI calls it x_id. Computed in fp32.
    """
    xs = x.to(cs.dtype)
    att = xs * _mask(cs, ss)
    res = xs - att
    att, res = _like(att, x), _like(res, x)
    return (res, att) if att_is_age else (att, res)


def apply_backward_torch(x: torch.Tensor, cs: torch.Tensor, ss: torch.Tensor, g_id: torch.Tensor,
                         g_age: torch.Tensor, att_is_age: bool
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dx, dcs, dss) of :func:`apply_torch` given the gradients of x_id and x_age."""
    acc = cs.dtype
    g_att, g_res = (g_age, g_id) if att_is_age else (g_id, g_age)
    g_res = g_res.to(acc)
    d = g_att.to(acc) - g_res
    dx = _like(g_res + d * _mask(cs, ss), x)
    dm = d * x.to(acc) * 0.5
    return dx, dm.sum((2, 3)), dm.sum(1)


def _windows(size: int, s: int, device, dtype) -> torch.Tensor:
    """(s, size) 0/1 matrix of PyTorch's adaptive windows [floor(i*size/s), ceil((i+1)*size/s)) on one axis."""
    m = torch.zeros(s, size, device=device, dtype=dtype)
    for i in range(s):
        m[i, (i * size) // s: -(-((i + 1) * size) // s)] = 1
    return m


def pool_backward_torch(x: torch.Tensor, dfeat: torch.Tensor, feat_idx: torch.Tensor, dsp: torch.Tensor,
                        sp_idx: torch.Tensor, concat: bool) -> torch.Tensor:
    """dx of :func:`pool_torch` given d(feat) and d(sp); max gradients go to the saved argmax."""
    B, C, H, W = x.shape
    acc = dfeat.dtype
    nb = SPP_BINS * C
    davg, dmax = (dfeat[:, :nb], dfeat[:, nb:]) if concat else (dfeat, dfeat)
    dx = torch.zeros(B, C, H * W, device=x.device, dtype=acc)
    off = 0
    for s in SPP_SIZES:
        n = C * s * s
        da = davg[:, off:off + n].reshape(B, C, s, s)
        rh, rw = _windows(H, s, x.device, acc), _windows(W, s, x.device, acc)
        count = rh.sum(1)[:, None] * rw.sum(1)[None, :]
        dx += torch.einsum("bcij,ih,jw->bchw", da / count, rh, rw).reshape(B, C, H * W)
        dx.scatter_add_(2, feat_idx[:, off:off + n].reshape(B, C, s * s).long(),
                        dmax[:, off:off + n].reshape(B, C, s * s))
        off += n
    dx += dsp[:, 1].reshape(B, 1, H * W) / C
    dx.scatter_add_(1, sp_idx.reshape(B, 1, H * W).long(), dsp[:, 0].reshape(B, 1, H * W))
    return _like(dx.view(B, C, H, W), x)


def eval_torch(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, ts: torch.Tensor,
               bs: torch.Tensor, concat: bool, att_is_age: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The eval forward with the BatchNorms folded, as ``afd_eval`` computes it.

    Args:
        x: (B, C, H, W) feature map.
        w1: (hidden, 14C or 28C) first channel-MLP weight in x's dtype.
        w2: (C, hidden) second channel-MLP weight with its BatchNorm folded, x's dtype.
        b2: (C,) the folded bias, stats dtype.
        ts: (2, HW, HW) the 7x7 spatial convolution with its BatchNorm folded, as a matrix from the
            [max, mean] maps to the output map (stats dtype); bs: (1,) its bias.
        concat, att_is_age: the variant (TPAMI: True, False; CVPR: False, True).

    Returns:
        (x_id, x_age) in x's dtype and layout. ``h = relu(feat @ w1^T)`` is rounded to x's dtype (the
        GEMM's output dtype); ``h @ w2^T`` is accumulated in the stats dtype and not rounded before the bias.
    """
    acc = stats_dtype(x.dtype)
    B = x.shape[0]
    feat, _, sp, _ = pool_torch(x, concat, False)
    h = F.linear(feat.to(w1.dtype), w1).relu()
    cs = torch.sigmoid(F.linear(h.to(acc), w2.to(acc)) + b2)
    s = (sp.reshape(B, 2, -1, 1) * ts).sum((1, 2)) + bs
    ss = torch.sigmoid(s).reshape(B, *x.shape[2:])
    return apply_torch(x, cs, ss, att_is_age)
