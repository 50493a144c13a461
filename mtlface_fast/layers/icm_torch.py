"""The compact ICM in PyTorch: the batch sorted by group, one convolution per present group and layer.

Eval mode (no batch statistics): every layer is one grouped ``F.conv2d`` over the present groups, with the
folded parameters of all groups cached per weights version. Training: each layer runs per group segment on
its window (:func:`_conv_norm`), with the training-mode BatchNorm statistics of ``bn_stats`` (see
:mod:`mtlface_fast.layers.icm`). In float64 everything (folds, statistics) is float64. The group counts are
read on the host (this path serves CPU tensors; CUDA tensors take the Triton path under ``auto``).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..reference.icm import ICMBase
from .fold import acc_dtype, bn_scale_shift
from .icm_common import (apply_act, autocast_dtype, bn_momentum_for_call, icm_layers, instance_norm, module_cache,
                         update_running_stats, uses_batch_stats, wants_grad)


def _active_batch_norm(bn: nn.BatchNorm2d, ys: Sequence[torch.Tensor], windows: Sequence[slice]) -> List[torch.Tensor]:
    """BatchNorm over compact outputs with per-channel statistics over the samples that hold the channel."""
    C = bn.num_features
    dev = ys[0].device
    acc = torch.float64 if ys[0].dtype == torch.float64 else torch.float32  # fp32 statistics at least
    sums = torch.zeros(C, device=dev, dtype=acc)
    counts = torch.zeros(C, device=dev, dtype=acc)
    for y, w in zip(ys, windows):
        idx = torch.arange(w.start, w.stop, device=dev)
        sums = sums.index_add(0, idx, y.to(acc).sum((0, 2, 3)))
        counts = counts.index_add(0, idx, torch.full((w.stop - w.start,), float(y[:, 0].numel()), device=dev,
                                                     dtype=acc))
    mean = sums / counts.clamp_min(1.0)
    sq = torch.zeros(C, device=dev, dtype=acc)
    for y, w in zip(ys, windows):
        idx = torch.arange(w.start, w.stop, device=dev)
        sq = sq.index_add(0, idx, (y.to(acc) - mean[w].view(1, -1, 1, 1)).square().sum((0, 2, 3)))
    var = sq / counts.clamp_min(1.0)
    update_running_stats(bn, counts, mean, sq)
    rstd = torch.rsqrt(var + bn.eps)
    out = []
    for y, w in zip(ys, windows):
        scale = rstd[w] * (bn.weight[w] if bn.affine else 1.0)
        shift = -mean[w] * scale + (bn.bias[w] if bn.affine else 0.0)
        out.append((y.to(acc) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(y.dtype))
    return out


def _conv_norm(conv: nn.Conv2d, norm: nn.Module, xs: Sequence[torch.Tensor], windows: Sequence[slice],
               win_in: bool, win_out: bool, bn_stats: str) -> List[torch.Tensor]:
    """``norm(conv(x))`` on each segment, restricted to the window: the compact state of one layer.

    ``xs[i]`` holds the samples of one group (window ``windows[i]``); ``win_in`` / ``win_out`` say
    whether the convolution's input / output channels are windowed.
    """
    W, b = conv.weight, conv.bias
    pad = conv.padding
    full = slice(None)
    if uses_batch_stats(norm) and (bn_stats == "reference" or not win_out):
        # Exact reference statistics: full-width pre-mask outputs, one BatchNorm over the whole batch.
        blocks = _weight_blocks(W, windows, win_in, False)
        ys = [F.conv2d(x, wb, b, 1, pad) for x, wb in zip(xs, blocks)]
        sizes = [y.size(0) for y in ys]
        y = torch.cat(ys) if len(ys) > 1 else ys[0]
        y = F.batch_norm(y, norm.running_mean, norm.running_var, norm.weight, norm.bias, True,
                         bn_momentum_for_call(norm), norm.eps)
        parts = torch.split(y, sizes) if len(ys) > 1 else [y]
        return [p[:, w] if win_out else p for p, w in zip(parts, windows)]
    out_ws = windows if win_out else [full] * len(windows)
    blocks = _weight_blocks(W, windows, win_in, win_out)
    if isinstance(norm, nn.modules.batchnorm._BatchNorm) and not uses_batch_stats(norm):
        # Eval BatchNorm folded into the window's weights (fp32 fold, fp64 for fp64; cast to the input's dtype).
        scale, shift = bn_scale_shift(norm, acc_dtype(W, norm.weight))
        if b is not None:
            shift = shift + b.to(scale.dtype) * scale
        ys = []
        for x, wb, ow in zip(xs, blocks, out_ws):
            wb = wb.to(scale.dtype) * scale[ow].view(-1, 1, 1, 1)
            ys.append(F.conv2d(x, wb.to(x.dtype), shift[ow].to(x.dtype), 1, pad))
        return ys
    ys = [F.conv2d(x, wb, None if b is None else b[ow], 1, pad) for x, wb, ow in zip(xs, blocks, out_ws)]
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        return _active_batch_norm(norm, ys, out_ws)
    if isinstance(norm, nn.InstanceNorm2d):
        return [instance_norm(norm, y, ow) for y, ow in zip(ys, out_ws)]
    if norm is None or isinstance(norm, nn.Identity):
        return ys
    raise TypeError(f"unsupported ICM normalization {type(norm).__name__}")


class _WindowBlocks(torch.autograd.Function):
    """Stack of the weight blocks of several windows. Backward accumulates each block's gradient into one
    zero weight gradient in window order (deterministic), instead of one full-size zero tensor per slice."""

    @staticmethod
    def forward(ctx, W, windows, win_in, win_out):
        ctx.windows, ctx.win_in, ctx.win_out, ctx.shape = windows, win_in, win_out, W.shape
        return torch.stack([W[_block_index(w, win_in, win_out)] for w in windows])

    @staticmethod
    def backward(ctx, grad):
        dW = grad.new_zeros(ctx.shape)
        for gb, w in zip(grad.unbind(0), ctx.windows):
            dW[_block_index(w, ctx.win_in, ctx.win_out)] += gb
        return dW, None, None, None


def _block_index(w: slice, win_in: bool, win_out: bool):
    full = slice(None)
    return (w if win_out else full, w if win_in else full)


def _weight_blocks(W: torch.Tensor, windows: Sequence[slice], win_in: bool, win_out: bool) -> List[torch.Tensor]:
    """The weight block of every window (see :class:`_WindowBlocks`)."""
    if not (win_in or win_out):
        return [W] * len(windows)
    return list(_WindowBlocks.apply(W, tuple(windows), win_in, win_out).unbind(0))


def group_segments(groups: torch.Tensor, age_group: int) -> Tuple[torch.Tensor, List[Tuple[int, int, int]]]:
    """Stable sort order of the batch by group and the ``(group, offset, count)`` of each present group."""
    order = torch.argsort(groups, stable=True)
    counts = torch.bincount(groups, minlength=age_group).tolist()
    segs, off = [], 0
    for g, n in enumerate(counts):
        if n:
            segs.append((g, off, n))
            off += n
    return order, segs


def _group_params(module: ICMBase, windows: Sequence[slice], dtype: torch.dtype):
    """Per layer: grouped-conv weight (P * O, I, k, k) and bias (P * O,) with eval BatchNorm folded in
    (fp32 fold, then ``dtype``), and the PReLU slopes (P * O,) (or None), for the windows in order."""
    P = len(windows)
    params = []
    for conv, norm, act, win_in, win_out, _ in icm_layers(module):
        out_ws = windows if win_out else [slice(None)] * P
        W, b = conv.weight, conv.bias
        w = torch.stack(_weight_blocks(W, windows, win_in, win_out)) if win_in or win_out else \
            W.unsqueeze(0).expand(P, *W.shape)
        w = w.reshape(-1, *w.shape[2:])
        vec = lambda v: torch.cat([v[ow] for ow in out_ws])  # noqa: E731
        acc = acc_dtype(W)
        bias = None if b is None else vec(b).to(acc)
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            scale, shift = bn_scale_shift(norm, acc)
            scale, shift = vec(scale), vec(shift)
            w = w.to(acc) * scale.view(-1, 1, 1, 1)
            bias = shift if bias is None else shift + bias * scale
        slope = None
        if isinstance(act, nn.PReLU):
            slope = vec(act.weight) if act.weight.numel() > 1 else act.weight
        params.append((w.to(dtype), None if bias is None else bias.to(dtype),
                       None if slope is None else slope.to(dtype)))
    return params


def _all_group_params(module: ICMBase, dtype: torch.dtype):
    return _group_params(module, [slice(s, s + module.unit_count) for s in module.starts], dtype)


def _compact_icm_grouped(module: ICMBase, x_sorted: torch.Tensor, segs, windows) -> torch.Tensor:
    """ICM without batch statistics (eval BatchNorm, InstanceNorm): every layer is one grouped convolution
    over the present groups. The sorted batch is laid out (n_max, P * C, h, w): slot (j, p) holds the j-th
    sample of the p-th present group (zero padding where a group has fewer samples). Without gradients
    the folded parameters of all groups are cached on the module."""
    P = len(segs)
    n_max = max(n for _, _, n in segs)
    dev = x_sorted.device
    dtype = autocast_dtype(x_sorted)
    if wants_grad(module, x_sorted) or torch.compiler.is_compiling():
        params = _group_params(module, windows, dtype)
    else:
        params = module_cache(module, "_icm_eval_cache", _all_group_params).get(module, dtype)
        present = [g for g, _, _ in segs]
        if present != list(range(module.age_group)):  # the blocks of the slots' groups, in slot order
            params = [_select_groups(p, present, module.age_group) for p in params]
    slot = torch.zeros(n_max, P, dtype=torch.long, device=dev)
    valid = torch.zeros(n_max, P, dtype=torch.bool, device=dev)
    for p, (_, off, n) in enumerate(segs):
        slot[:n, p] = torch.arange(off, off + n, device=dev)
        valid[:n, p] = True
    x = x_sorted.to(dtype).index_select(0, slot.flatten())
    if any(n < n_max for _, _, n in segs):  # zero the padding slots (known on the host: no device read)
        x = x * valid.flatten().view(-1, 1, 1, 1).to(dtype)
    h = x.reshape(n_max, -1, *x.shape[2:])
    block_in = h
    for (conv, norm, act, win_in, win_out, takes_res), (w, b, slope) in zip(icm_layers(module), params):
        if win_in and win_out and not takes_res:
            block_in = h  # the residual of this block's second convolution
        y = F.conv2d(h, w, b, 1, conv.padding, 1, P)
        if isinstance(norm, nn.InstanceNorm2d):
            y = instance_norm(norm, y, slice(None))
        elif norm is not None and not isinstance(norm, (nn.modules.batchnorm._BatchNorm, nn.Identity)):
            raise TypeError(f"unsupported ICM normalization {type(norm).__name__}")
        if takes_res:
            y = block_in + y
        if slope is not None:
            y = F.prelu(y, slope)
        elif act is not None:
            y = apply_act(act, y, slice(None))
        h = y
    out = h.reshape(n_max * P, -1, *h.shape[2:])
    # Slot row of each sorted sample: sample j of present group p sits at row j * P + p.
    rows = torch.cat([torch.arange(n, device=dev) * P + p for p, (_, _, n) in enumerate(segs)])
    return out.index_select(0, rows)


def _select_groups(param, present: List[int], G: int):
    w, b, slope = param
    pick = lambda t: None if t is None or t.numel() == 1 else \
        t.view(G, -1, *t.shape[1:])[present].reshape(-1, *t.shape[1:])  # noqa: E731
    return pick(w), pick(b), (slope if slope is not None and slope.numel() == 1 else pick(slope))


def compact_icm_torch(module: ICMBase, x_id: torch.Tensor, groups: torch.Tensor, bn_stats: str = "reference"):
    """The ICM of ``module`` (any :class:`ICMBase`) on compact per-group windows, in PyTorch.

    Args:
        module: an ICMBase (CVPR or TPAMI variant); its parameters and buffers are used as they are.
        x_id: (B, in_channels, h, w) identity features.
        groups: (B,) int64 target groups, already validated.
        bn_stats: ``"reference"`` or ``"active"`` (training-mode BatchNorm statistics, see module doc).

    Returns:
        (B, in_channels, h, w), equal to ``ICMBase.icm(module, x_id, groups)``.
    """
    U = module.unit_count
    order, segs = group_segments(groups, module.age_group)
    windows = [slice(module.starts[g], module.starts[g] + U) for g, _, _ in segs]
    xs_sorted = x_id.index_select(0, order)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    if not any(uses_batch_stats(m) or (isinstance(m, nn.InstanceNorm2d) and m.affine) for m in module.modules()):
        n_max, B = max(n for _, _, n in segs), x_id.size(0)
        if n_max * len(segs) > 1.25 * B and B <= 12:
            # Unbalanced small batch: one slot per sample (weights gathered per sample) beats zero padding.
            segs = [(g, off + i, 1) for g, off, n in segs for i in range(n)]
            windows = [slice(module.starts[g], module.starts[g] + U) for g, _, _ in segs]
        return _compact_icm_grouped(module, xs_sorted, segs, windows).index_select(0, inverse)
    xs = [xs_sorted[off:off + n] for _, off, n in segs]

    hs, block_in = xs, None
    for layer in icm_layers(module):
        if layer.win_in and layer.win_out and not layer.takes_residual:
            block_in = hs  # the residual of this block's second convolution
        ys = _conv_norm(layer.conv, layer.norm, hs, windows, layer.win_in, layer.win_out, bn_stats)
        if layer.takes_residual:
            ys = [r + y for r, y in zip(block_in, ys)]
        out_ws = windows if layer.win_out else [slice(None)] * len(windows)
        hs = [apply_act(layer.act, y, w) for y, w in zip(ys, out_ws)]
    outs = hs
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    return out.index_select(0, inverse)
