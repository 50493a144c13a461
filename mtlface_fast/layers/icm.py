"""Compact ICM: the identity conditional module computed on each sample's own channel window.

The reference ICM (:mod:`mtlface_fast.reference.icm`) runs every convolution over all ``conv_dim``
channels and then multiplies by a 0/1 mask that keeps the ``unit_count`` channels
``S_g = [s_g, s_g + unit_count)`` of the sample's target group g. Because the masked input of a layer
is zero outside ``S_g`` and its output is masked to ``S_g``, each layer equals a convolution with the
weight block ``W[S_g, S_g]`` (``W[S_g, :]`` for the 512 -> conv_dim ``conv1``, ``W[:, S_g]`` for the
conv_dim -> 512 ``conv2``). The compact state is ``(B, unit_count, h, w)``; the per-channel BN
parameters, PReLU slopes and biases are sliced to the window. PReLU/LeakyReLU of a zero is zero, so the
reference's ``act(residual + x)`` over the full width stays zero outside the window and the compact
state is exact.

Normalization statistics in training mode (``bn_stats``):

* ``"reference"`` (default, exact): the reference BatchNorm statistics run over every sample and every
  channel, including channels outside a sample's window, where the pre-mask convolution output is *not*
  zero (``conv1`` reads the full 512-channel input; the 3x3 convolutions have a bias and cross-window
  weights). This mode therefore computes the full-width pre-mask output ``conv(x_window, W[:, S_g])``
  (``unit_count`` input channels instead of ``conv_dim``: still ~6x cheaper than the reference) for the
  statistics and the running-stat update, then keeps the window. Forward and gradients equal the
  reference's.
* ``"active"``: the statistics of channel c run only over the samples whose window holds c (the
  outputs that survive the mask). Running statistics of a channel that no sample in the batch holds are
  left unchanged; the others are updated as ``nn.BatchNorm2d`` does (unbiased variance, momentum or
  cumulative average, ``num_batches_tracked`` + 1).

Eval mode folds BN into the window's weights. InstanceNorm (TPAMI variant) is per sample and per
channel, so it is exact in compact form in both modes.

Which implementation runs follows :mod:`mtlface_fast.backend`: the Triton kernels
(:mod:`mtlface_fast.kernels.icm_conv`, one launch per layer for the whole batch) or the per-group
PyTorch path below (the batch is sorted by group; one ``F.conv2d`` per present group and layer).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..backend import use_triton_for
from ..reference.icm import AgingModule, ICMBase
from .fold import acc_dtype, bn_scale_shift

BN_STATS = ("reference", "active")


def check_bn_stats(bn_stats: str) -> str:
    if bn_stats not in BN_STATS:
        raise ValueError(f"bn_stats must be one of {BN_STATS}, got {bn_stats!r}")
    return bn_stats


def check_icm_inputs(module: ICMBase, x_id: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
    """Validate ``icm`` arguments; returns the groups as a 1-D int64 tensor on ``x_id``'s device."""
    if not isinstance(x_id, torch.Tensor) or x_id.dim() != 4:
        raise ValueError(f"x_id must be a (B, C, h, w) tensor, got "
                         f"{tuple(x_id.shape) if isinstance(x_id, torch.Tensor) else type(x_id).__name__}")
    if x_id.size(1) != module.in_channels:
        raise ValueError(f"x_id must have {module.in_channels} channels, got {x_id.size(1)}")
    if not isinstance(condition, torch.Tensor):
        raise TypeError(f"condition must be an integer tensor of target groups, got {type(condition).__name__}")
    if condition.dtype.is_floating_point or condition.dtype.is_complex or condition.dtype == torch.bool:
        raise TypeError(f"condition must have an integer dtype, got {condition.dtype}")
    if condition.dim() != 1 or condition.numel() != x_id.size(0):
        raise ValueError(f"condition must have shape ({x_id.size(0)},) (one group per sample), "
                         f"got {tuple(condition.shape)}")
    groups = condition.to(device=x_id.device, dtype=torch.long)
    capturing = x_id.is_cuda and torch.cuda.is_current_stream_capturing()
    if not torch.compiler.is_compiling() and not capturing and groups.numel() > 0:
        lo, hi = int(groups.min()), int(groups.max())
        if lo < 0 or hi >= module.age_group:
            raise ValueError(f"condition values must be age groups in [0, {module.age_group}), "
                             f"got values in [{lo}, {hi}]")
    return groups


def _uses_batch_stats(norm: nn.Module) -> bool:
    return isinstance(norm, nn.modules.batchnorm._BatchNorm) and (norm.training or norm.running_mean is None)


def _act(act: nn.Module, x: torch.Tensor, window: slice) -> torch.Tensor:
    if isinstance(act, nn.PReLU):
        w = act.weight
        return F.prelu(x, w[window] if w.numel() > 1 else w)
    if isinstance(act, nn.LeakyReLU):
        return F.leaky_relu(x, act.negative_slope)
    raise TypeError(f"unsupported ICM activation {type(act).__name__}")


def _instance_norm(norm: nn.InstanceNorm2d, x: torch.Tensor, window: slice) -> torch.Tensor:
    if norm.track_running_stats and not norm.training:
        raise NotImplementedError("compact ICM supports InstanceNorm2d without running statistics only")
    w = norm.weight[window] if norm.affine else None
    b = norm.bias[window] if norm.affine else None
    return F.instance_norm(x, weight=w, bias=b, use_input_stats=True, eps=norm.eps)


def _update_running_stats(bn, counts: torch.Tensor, mean: torch.Tensor, sq: torch.Tensor) -> None:
    """nn.BatchNorm2d's running-stat update for channels held by some sample (``counts`` > 0 values each);
    channels no sample holds keep their statistics."""
    if not (bn.training and bn.track_running_stats and bn.running_mean is not None):
        return
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        m = _bn_momentum(bn)
        held = counts > 0
        unbiased = sq / (counts - 1.0).clamp_min(1.0)
        bn.running_mean.copy_(torch.where(held, (1 - m) * bn.running_mean + m * mean, bn.running_mean))
        bn.running_var.copy_(torch.where(held, (1 - m) * bn.running_var + m * unbiased, bn.running_var))


def _bn_momentum(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """The momentum ``nn.BatchNorm2d.forward`` would use (after incrementing num_batches_tracked)."""
    if bn.momentum is None:
        return 1.0 / float(bn.num_batches_tracked)
    return bn.momentum


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
    _update_running_stats(bn, counts, mean, sq)
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
    if _uses_batch_stats(norm) and (bn_stats == "reference" or not win_out):
        # Exact reference statistics: full-width pre-mask outputs, one BatchNorm over the whole batch.
        blocks = _weight_blocks(W, windows, win_in, False)
        ys = [F.conv2d(x, wb, b, 1, pad) for x, wb in zip(xs, blocks)]
        sizes = [y.size(0) for y in ys]
        y = torch.cat(ys) if len(ys) > 1 else ys[0]
        y = F.batch_norm(y, norm.running_mean, norm.running_var, norm.weight, norm.bias, True,
                         _bn_momentum_for_call(norm), norm.eps)
        parts = torch.split(y, sizes) if len(ys) > 1 else [y]
        return [p[:, w] if win_out else p for p, w in zip(parts, windows)]
    out_ws = windows if win_out else [full] * len(windows)
    blocks = _weight_blocks(W, windows, win_in, win_out)
    if isinstance(norm, nn.modules.batchnorm._BatchNorm) and not _uses_batch_stats(norm):
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
        return [_instance_norm(norm, y, ow) for y, ow in zip(ys, out_ws)]
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


def _bn_momentum_for_call(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """Update ``num_batches_tracked`` as ``nn.BatchNorm2d.forward`` does and return the momentum to use."""
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        return _bn_momentum(bn)
    return 0.0 if bn.momentum is None else bn.momentum


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


def _layers(module: ICMBase):
    """(conv, norm, act, win_in, win_out, takes_residual) of every ICM layer, in order."""
    c1, c2 = module.conv1, module.conv2
    out = [(c1[0], c1[1], c1[2], False, True, False)]
    for block in module.transform:
        out.append((block.conv1[0], block.conv1[1], block.relu1, True, True, False))
        out.append((block.conv2[0], block.conv2[1], block.relu2, True, True, True))
    out.append((c2[0], c2[1] if len(c2) > 1 else None, c2[2] if len(c2) > 2 else None, True, False, False))
    return out


def _group_params(module: ICMBase, windows: Sequence[slice], dtype: torch.dtype):
    """Per layer: grouped-conv weight (P * O, I, k, k) and bias (P * O,) with eval BatchNorm folded in
    (fp32 fold, then ``dtype``), and the PReLU slopes (P * O,) (or None), for the windows in order."""
    P = len(windows)
    params = []
    for conv, norm, act, win_in, win_out, _ in _layers(module):
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


class _EvalCache:
    """Folded inference parameters of a module, rebuilt when a parameter or statistic changes."""

    def __init__(self, build=_all_group_params):
        self.build, self.key, self.params = build, None, None

    def get(self, module: ICMBase, dtype: torch.dtype):
        key = (dtype,) + tuple((t.data_ptr(), t._version, t.device) for t in
                               list(module.parameters()) + list(module.buffers()))
        if key != self.key:
            with torch.no_grad():
                self.params = self.build(module, dtype)
            self.key = key
        return self.params


def _compact_icm_grouped(module: ICMBase, x_sorted: torch.Tensor, segs, windows) -> torch.Tensor:
    """ICM without batch statistics (eval BatchNorm, InstanceNorm): every layer is one grouped convolution
    over the present groups. The sorted batch is laid out (n_max, P * C, h, w): slot (j, p) holds the j-th
    sample of the p-th present group (zero padding where a group has fewer samples). Without gradients
    the folded parameters of all groups are cached on the module."""
    P = len(segs)
    n_max = max(n for _, _, n in segs)
    dev = x_sorted.device
    dtype = _autocast_dtype(x_sorted)
    wants_grad = torch.is_grad_enabled() and (x_sorted.requires_grad or
                                              any(p.requires_grad for p in module.parameters()))
    if wants_grad or torch.compiler.is_compiling():
        params = _group_params(module, windows, dtype)
    else:
        cache = module.__dict__.setdefault("_icm_eval_cache", _EvalCache())
        params = cache.get(module, dtype)
        present = [g for g, _, _ in segs]
        if present != list(range(module.age_group)):  # the blocks of the slots' groups, in slot order
            params = [_select_groups(p, present, module.age_group) for p in params]
    slot = torch.zeros(n_max, P, dtype=torch.long, device=dev)
    valid = torch.zeros(n_max, P, dtype=torch.bool, device=dev)
    for p, (_, off, n) in enumerate(segs):
        slot[:n, p] = torch.arange(off, off + n, device=dev)
        valid[:n, p] = True
    x = x_sorted.to(dtype).index_select(0, slot.flatten())
    if not bool(valid.all()):
        x = x * valid.flatten().view(-1, 1, 1, 1).to(dtype)
    h = x.reshape(n_max, -1, *x.shape[2:])
    block_in = h
    for (conv, norm, act, win_in, win_out, takes_res), (w, b, slope) in zip(_layers(module), params):
        if win_in and win_out and not takes_res:
            block_in = h  # the residual of this block's second convolution
        y = F.conv2d(h, w, b, 1, conv.padding, 1, P)
        if isinstance(norm, nn.InstanceNorm2d):
            y = _instance_norm(norm, y, slice(None))
        elif norm is not None and not isinstance(norm, (nn.modules.batchnorm._BatchNorm, nn.Identity)):
            raise TypeError(f"unsupported ICM normalization {type(norm).__name__}")
        if takes_res:
            y = block_in + y
        if slope is not None:
            y = F.prelu(y, slope)
        elif act is not None:
            y = _act(act, y, slice(None))
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
    if not any(_uses_batch_stats(m) or (isinstance(m, nn.InstanceNorm2d) and m.affine) for m in module.modules()):
        n_max, B = max(n for _, _, n in segs), x_id.size(0)
        if n_max * len(segs) > 1.25 * B and B <= 12:
            # Unbalanced small batch: one slot per sample (weights gathered per sample) beats zero padding.
            segs = [(g, off + i, 1) for g, off, n in segs for i in range(n)]
            windows = [slice(module.starts[g], module.starts[g] + U) for g, _, _ in segs]
        return _compact_icm_grouped(module, xs_sorted, segs, windows).index_select(0, inverse)
    xs = [xs_sorted[off:off + n] for _, off, n in segs]

    conv, norm, act = module.conv1[0], module.conv1[1], module.conv1[2]
    hs = _conv_norm(conv, norm, xs, windows, False, True, bn_stats)
    hs = [_act(act, h, w) for h, w in zip(hs, windows)]
    for block in module.transform:
        ys = _conv_norm(block.conv1[0], block.conv1[1], hs, windows, True, True, bn_stats)
        ys = [_act(block.relu1, y, w) for y, w in zip(ys, windows)]
        ys = _conv_norm(block.conv2[0], block.conv2[1], ys, windows, True, True, bn_stats)
        hs = [_act(block.relu2, h + y, w) for h, y, w in zip(hs, ys, windows)]
    c2 = module.conv2
    outs = _conv_norm(c2[0], c2[1] if len(c2) > 1 else None, hs, windows, True, False, bn_stats)
    if len(c2) > 2:
        outs = [_act(c2[2], o, slice(None)) for o in outs]
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    return out.index_select(0, inverse)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def compact_icm_triton(module: ICMBase, x_id: torch.Tensor, groups: torch.Tensor, bn_stats: str = "reference"):
    """The ICM of ``module`` with the Triton window convolutions: one launch per layer for the whole batch.

    Same contract as :func:`compact_icm_torch`. Without gradients in eval mode (CVPR variant) each layer
    is one fused kernel (BN folded, bias, residual and PReLU in the epilogue); otherwise the
    differentiable ``icm_conv`` op runs the convolution and the norms and activations follow in
    PyTorch on the compact state (per-sample parameter windows gathered by index). No host
    synchronization: group counts and tiles are computed on the device.
    """
    from ..kernels import icm_conv as K

    G, U, C = module.age_group, module.unit_count, module.conv_dim
    dev = x_id.device
    # Group-major order that keeps the batch order within a group. Unique keys make a plain sort stable, and
    # a plain sort (unlike sort(stable=True)) exports to ONNX.
    B0 = x_id.size(0)
    order = torch.argsort(groups.long() * B0 + torch.arange(B0, device=dev))
    counts = (groups[:, None] == torch.arange(G, device=dev)).sum(0)  # static (G,) shape, unlike bincount
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(torch.int32)
    starts = _starts_tensor(module, dev)
    B = x_id.size(0)
    idx = starts.long()[groups.index_select(0, order)][:, None] + torch.arange(U, device=dev)  # (B, U)
    dtype = _autocast_dtype(x_id)
    x = x_id.index_select(0, order).to(dtype)

    def per_sample(v: torch.Tensor, win: bool) -> torch.Tensor:
        return (v[idx] if win else v.view(1, -1).expand(B, -1))[:, :, None, None]

    def act_of(act: nn.Module, v: torch.Tensor, win: bool) -> torch.Tensor:
        if isinstance(act, nn.PReLU):
            slope = act.weight if act.weight.numel() > 1 else act.weight.expand(v.size(1) if not win else C)
            sl = per_sample(slope, win).to(v.dtype)
            return torch.where(v > 0, v, v * sl)
        if isinstance(act, nn.LeakyReLU):
            return F.leaky_relu(v, act.negative_slope)
        raise TypeError(f"unsupported ICM activation {type(act).__name__}")

    wants_grad = torch.is_grad_enabled() and (x_id.requires_grad or any(p.requires_grad for p in module.parameters()))
    fused = (not wants_grad and module.icm_variant == "cvpr"
             and not any(_uses_batch_stats(m) for m in module.modules())
             and all(isinstance(a, nn.PReLU) and isinstance(n, nn.modules.batchnorm._BatchNorm)
                     for _, n, a, _, _, _ in _layers(module)))

    if fused:
        # Inference: one fused kernel per layer; folded parameters cached on the module.
        if torch.compiler.is_compiling() or (x_id.is_cuda and torch.cuda.is_current_stream_capturing()
                                              and "_icm_fused_cache" not in module.__dict__):
            params = _fused_params(module, dtype)
        else:
            params = module.__dict__.setdefault("_icm_fused_cache", _EvalCache(_fused_params)).get(module, dtype)
        h = block_in = x
        for (conv, _, _, in_win, out_win, takes_res), (w, scale, shift, slope) in zip(_layers(module), params):
            if in_win and out_win and not takes_res:
                block_in = h
            h = K.icm_conv_fused(h, w, scale, shift, block_in if takes_res else None, slope, offsets, starts, U,
                                 in_win, out_win, K.ACT_PRELU, 0.0)
        return h.index_select(0, torch.argsort(order))

    def layer(h, conv, norm, act, in_win, out_win, residual=None):
        W, b = conv.weight, conv.bias
        if _uses_batch_stats(norm) and (bn_stats == "reference" or not out_win):
            # Exact reference statistics: the full-width pre-mask output, then the window.
            if in_win:
                y = K.icm_conv(h, W.to(h.dtype), None if b is None else b.to(h.dtype), offsets, starts, U,
                               True, False)
            else:
                y = F.conv2d(h, W.to(h.dtype), None if b is None else b.to(h.dtype), 1, conv.padding)
            y = F.batch_norm(y, norm.running_mean, norm.running_var, norm.weight, norm.bias, True,
                             _bn_momentum_for_call(norm), norm.eps)
            if out_win:
                y = torch.gather(y, 1, idx[:, :, None, None].expand(-1, -1, y.size(2), y.size(3)))
        else:
            y = K.icm_conv(h, W.to(h.dtype), None if b is None else b.to(h.dtype), offsets, starts, U,
                           in_win, out_win)
            if isinstance(norm, nn.modules.batchnorm._BatchNorm):
                y = _active_batch_norm_windows(norm, y, idx, out_win) if _uses_batch_stats(norm) else \
                    _eval_batch_norm_windows(norm, y, per_sample, out_win)
            elif isinstance(norm, nn.InstanceNorm2d):
                y = _instance_norm(norm, y, slice(None)) if not norm.affine else \
                    F.instance_norm(y, eps=norm.eps) * per_sample(norm.weight, out_win).to(y.dtype) + \
                    per_sample(norm.bias, out_win).to(y.dtype)
            elif norm is not None and not isinstance(norm, nn.Identity):
                raise TypeError(f"unsupported ICM normalization {type(norm).__name__}")
        if residual is not None:
            y = residual + y
        return act_of(act, y, out_win) if act is not None else y

    h = layer(x, module.conv1[0], module.conv1[1], module.conv1[2], False, True)
    for block in module.transform:
        y = layer(h, block.conv1[0], block.conv1[1], block.relu1, True, True)
        h = layer(y, block.conv2[0], block.conv2[1], block.relu2, True, True, residual=h)
    c2 = module.conv2
    out = layer(h, c2[0], c2[1] if len(c2) > 1 else None, c2[2] if len(c2) > 2 else None, True, False)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(B, device=dev)
    return out.index_select(0, inverse)


def _starts_tensor(module: ICMBase, device: torch.device) -> torch.Tensor:
    """The (G,) int32 window starts on ``device``, made once per device (no copy per call)."""
    cache = module.__dict__.setdefault("_icm_starts", {})
    if device not in cache:
        cache[device] = torch.tensor(module.starts, dtype=torch.int32, device=device)
    return cache[device]


def _fused_params(module: ICMBase, dtype: torch.dtype):
    """Per layer (weight in ``dtype``, fp32 scale, fp32 shift, fp32 slopes): eval BN and bias folded."""
    out = []
    for conv, norm, act, _, _, _ in _layers(module):
        scale, shift = bn_scale_shift(norm, acc_dtype(conv.weight))
        if conv.bias is not None:
            shift = shift + conv.bias.to(scale.dtype) * scale
        slope = act.weight.to(scale.dtype).expand(conv.out_channels).contiguous()
        out.append((conv.weight.to(dtype).contiguous(), scale, shift, slope))
    return out


def _eval_batch_norm_windows(bn, y, per_sample, win):
    scale, shift = bn_scale_shift(bn, acc_dtype(y))
    return (y.to(scale.dtype) * per_sample(scale, win) + per_sample(shift, win)).to(y.dtype)


def _active_batch_norm_windows(bn, y, idx, win):
    """``bn_stats="active"`` BatchNorm on a batched compact state (B, U, h, w) with window index (B, U)."""
    if not win:
        return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, True,
                            _bn_momentum_for_call(bn), bn.eps)
    C = bn.num_features
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    B, U = idx.shape
    hw = y.size(2) * y.size(3)
    spread = lambda v: torch.zeros((B, C), device=y.device, dtype=acc).scatter(1, idx, v).sum(0)  # noqa: E731
    counts = spread(torch.full((B, U), float(hw), device=y.device, dtype=acc))
    mean = spread(y.to(acc).sum((2, 3))) / counts.clamp_min(1.0)
    centered = y.to(acc) - mean[idx][:, :, None, None]
    sq = spread(centered.square().sum((2, 3)))
    var = sq / counts.clamp_min(1.0)
    _update_running_stats(bn, counts, mean, sq)
    rstd = torch.rsqrt(var + bn.eps)
    out = centered * rstd[idx][:, :, None, None]
    if bn.affine:
        out = out * bn.weight[idx][:, :, None, None] + bn.bias[idx][:, :, None, None]
    return out.to(y.dtype)


class CompactICM:
    """Mixin for any :class:`ICMBase` subclass: replaces :meth:`icm` by the compact implementation.

    Use as ``class Fast(CompactICM, SomeICM)``; set ``bn_stats`` (``"reference"`` or ``"active"``) as
    an attribute or through :meth:`set_bn_stats`. The state dict and the module tree are unchanged.
    """

    bn_stats: str = "reference"

    def set_bn_stats(self, bn_stats: str):
        self.bn_stats = check_bn_stats(bn_stats)
        return self

    def icm(self, x_id: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        groups = check_icm_inputs(self, x_id, condition)
        bn_stats = check_bn_stats(self.bn_stats)
        if x_id.size(0) == 0:
            return ICMBase.icm(self, x_id, groups)
        if x_id.dtype == torch.float64 and not torch.compiler.is_compiling():
            # The window-convolution kernels accumulate in fp32: fp64 takes the PyTorch twin (fp64 throughout).
            return compact_icm_torch(self, x_id, groups, bn_stats)
        if use_triton_for(x_id) or torch.compiler.is_compiling():
            # Traced CPU graphs take the op path too (the ops' aten bodies): the per-group PyTorch loop
            # needs the group counts on the host.
            return compact_icm_triton(self, x_id, groups, bn_stats)
        return compact_icm_torch(self, x_id, groups, bn_stats)


class CompactAgingModule(CompactICM, AgingModule):
    """The CVPR generator with the compact ICM; same constructor arguments and state dict as AgingModule."""

    def __init__(self, age_group: int = 7, repeat_num: int = 4, sigma: float = 0.1, unit_count: int = 128, *,
                 bn_stats: str = "reference"):
        super().__init__(age_group, repeat_num, sigma, unit_count)
        self.bn_stats = check_bn_stats(bn_stats)
