"""The compact ICM on the Triton kernels.

Inference (no gradients, eval BatchNorm or InstanceNorm, PReLU / LeakyReLU, a sample's compact state small
enough for one program): the whole ICM is ONE launch of ``mtlface_fast::icm_forward``
(:mod:`mtlface_fast.kernels.icm_forward`), a persistent kernel that groups the batch on the device and
runs every layer of a tile of samples on chip. Its operands, the per-group weight blocks with eval BatchNorm
folded (:func:`~mtlface_fast.layers.fold.fold_bn`) and the per-channel vectors, are packed once per weights
version (:class:`~mtlface_fast.layers.icm_common.WeightsCache`).

Otherwise (training, gradients, large spatial sizes) each layer is one ``icm_conv`` launch for the whole
group-sorted batch (:mod:`mtlface_fast.kernels.icm_conv`), with the norms and activations in PyTorch on the
compact state. Both read the layers from the one walk :func:`~mtlface_fast.layers.icm_common.icm_layers`;
neither reads a device value on the host.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..reference.icm import ICMBase
from .fold import acc_dtype, bn_scale_shift, fold_bn
from .icm_common import (IcmLayer, autocast_dtype, bn_momentum_for_call, icm_layers, instance_norm, is_batch_norm,
                         module_cache, update_running_stats, uses_batch_stats, wants_grad)


# -- inference: one persistent launch ----------------------------------------------------------------

def forward_supported(module: ICMBase, x_id: torch.Tensor) -> bool:
    """Whether the one-launch forward computes this call: no gradients, no batch statistics, InstanceNorm
    (without running statistics) on conv1 and every 3x3 layer or on none, eval BatchNorm or nothing on conv2,
    PReLU / LeakyReLU activations, and a compact state that fits one program."""
    from ..kernels import icm_forward as KF

    layers = icm_layers(module)
    if wants_grad(module, x_id) or not KF.fits(x_id.size(2), x_id.size(3), module.unit_count):
        return False
    norm_in = isinstance(layers[0].norm, nn.InstanceNorm2d)
    for i, layer in enumerate(layers):
        last = i == len(layers) - 1
        norm, act = layer.norm, layer.act
        if isinstance(norm, nn.InstanceNorm2d):
            if last or not norm_in or (norm.track_running_stats and not norm.training):
                return False
        elif is_batch_norm(norm):
            if norm_in and not last or uses_batch_stats(norm):
                return False
        elif not (last and (norm is None or isinstance(norm, nn.Identity))):
            return False
        if not (isinstance(act, (nn.PReLU, nn.LeakyReLU)) or (last and act is None)):
            return False
    return True


def _folded(layer: IcmLayer, acc: torch.dtype):
    """(weight, shift) of ``norm(conv(x))`` without the InstanceNorm: eval BatchNorm folded (fold.py)."""
    conv, norm = layer.conv, layer.norm
    if is_batch_norm(norm):
        w, b = fold_bn(conv.weight, norm, conv.bias)
        return w.to(acc), b.to(acc)
    b = conv.bias if conv.bias is not None else conv.weight.new_zeros(conv.out_channels)
    return conv.weight.to(acc), b.to(acc)


def _vectors(layer: IcmLayer, shift: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """(4, C_out) rows shift, activation slope, InstanceNorm gamma, beta."""
    C = layer.conv.out_channels
    act, norm = layer.act, layer.norm
    if isinstance(act, nn.PReLU):
        slope = act.weight.to(acc).expand(C)
    elif isinstance(act, nn.LeakyReLU):
        slope = shift.new_full((C,), act.negative_slope)
    else:
        slope = shift.new_zeros(C)
    affine = isinstance(norm, nn.InstanceNorm2d) and norm.affine
    gamma = norm.weight.to(acc) if affine else shift.new_ones(C)
    beta = norm.bias.to(acc) if affine else shift.new_zeros(C)
    return torch.stack([shift, slope, gamma, beta])


def pack_forward(module: ICMBase, dtype: torch.dtype):
    """The packed operands (w1, w3, w2, v1, v3, v2) of ``icm_forward`` for ``module`` in compute ``dtype``.

    Per group g with window S_g: ``w1[g]`` = W1[S_g, :]^T, ``w3[l, g, tap]`` = W_l[S_g, S_g, tap]^T,
    ``w2[g]`` = W2[:, S_g]^T (eval BatchNorm folded, zero padded to the kernel's widths), and the vectors of
    :func:`_vectors` on each window. Plain slicing and stacking (traceable: torch.compile / export run it).
    """
    from ..kernels.icm_forward import padded_sizes

    layers = icm_layers(module)
    U = module.unit_count
    cin, cout = module.in_channels, layers[-1].conv.out_channels
    cinp, up, coutp, _, _ = padded_sizes(cin, U, cout)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    wins = [slice(s, s + U) for s in module.starts]
    pad = lambda t, *sizes: F.pad(t, [p for n, size in zip(reversed(t.shape), reversed(sizes))  # noqa: E731
                                      for p in (0, size - n)])

    w, b = _folded(layers[0], acc)
    vec = _vectors(layers[0], b, acc)
    w1 = torch.stack([pad(w[s, :, 0, 0].t(), cinp, up) for s in wins])
    v1 = torch.stack([pad(vec[:, s], 4, up) for s in wins])
    w3, v3 = [], []
    for layer in layers[1:-1]:
        w, b = _folded(layer, acc)
        vec = _vectors(layer, b, acc)
        w3.append(torch.stack([pad(w[s, s].permute(2, 3, 1, 0).reshape(9, U, U), 9, up, up) for s in wins]))
        v3.append(torch.stack([pad(vec[:, s], 4, up) for s in wins]))
    G = len(wins)
    w3 = torch.stack(w3) if w3 else w1.new_zeros((0, G, 9, up, up))
    v3 = torch.stack(v3) if v3 else v1.new_zeros((0, G, 4, up))
    w, b = _folded(layers[-1], acc)
    w2 = torch.stack([pad(w[:, s, 0, 0].t(), up, coutp) for s in wins])
    v2 = pad(_vectors(layers[-1], b, acc), 4, coutp)
    return (w1.to(dtype).contiguous(), w3.to(dtype).contiguous(), w2.to(dtype).contiguous(),
            v1.contiguous(), v3.contiguous(), v2.contiguous())


def icm_forward_triton(module: ICMBase, x_id: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """The ICM inference forward of ``module`` in one ``icm_forward`` launch (see :func:`forward_supported`)."""
    from ..kernels.icm_forward import icm_forward

    dtype = autocast_dtype(x_id)
    capturing = x_id.is_cuda and torch.cuda.is_current_stream_capturing()
    if torch.compiler.is_compiling():
        packed = module.graph_operands(("icm_packed", dtype), lambda: pack_forward(module, dtype))
    elif capturing and "_icm_packed" not in module.__dict__:
        packed = pack_forward(module, dtype)
    else:
        packed = module_cache(module, "_icm_packed", pack_forward).get(module, dtype)
    layers = icm_layers(module)
    norm = layers[0].norm
    norm_in = isinstance(norm, nn.InstanceNorm2d)
    return icm_forward(x_id, groups, *packed, module.unit_count, layers[-1].conv.out_channels, norm_in,
                       layers[-1].act is not None, float(norm.eps) if norm_in else 0.0)


# -- training and differentiable calls: one icm_conv launch per layer -------------------------------

def compact_icm_triton(module: ICMBase, x_id: torch.Tensor, groups: torch.Tensor, bn_stats: str = "reference"):
    """The ICM of ``module`` on the Triton kernels; same contract as
    :func:`~mtlface_fast.layers.icm_torch.compact_icm_torch`.

    Inference that :func:`forward_supported` accepts is one ``icm_forward`` launch. Otherwise (training,
    gradients) the differentiable ``icm_conv`` op runs each convolution on the group-sorted batch and the
    norms and activations follow in PyTorch on the compact state (per-sample parameter windows gathered by
    index). No host synchronization: group counts and tiles are computed on the device.
    """
    if forward_supported(module, x_id):
        return icm_forward_triton(module, x_id, groups)
    return _compact_icm_ops(module, x_id, groups, bn_stats)


def _compact_icm_ops(module: ICMBase, x_id: torch.Tensor, groups: torch.Tensor, bn_stats: str) -> torch.Tensor:
    """Training / differentiable path: one ``icm_conv`` launch (+ PyTorch epilogue) per layer."""
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
    dtype = autocast_dtype(x_id)
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

    def layer(h, conv, norm, act, in_win, out_win, residual=None):
        W, b = conv.weight, conv.bias
        if uses_batch_stats(norm) and (bn_stats == "reference" or not out_win):
            # Exact reference statistics: the full-width pre-mask output, then the window.
            if in_win:
                y = K.icm_conv(h, W.to(h.dtype), None if b is None else b.to(h.dtype), offsets, starts, U,
                               True, False)
            else:
                y = F.conv2d(h, W.to(h.dtype), None if b is None else b.to(h.dtype), 1, conv.padding)
            y = F.batch_norm(y, norm.running_mean, norm.running_var, norm.weight, norm.bias, True,
                             bn_momentum_for_call(norm), norm.eps)
            if out_win:
                y = torch.gather(y, 1, idx[:, :, None, None].expand(-1, -1, y.size(2), y.size(3)))
        else:
            y = K.icm_conv(h, W.to(h.dtype), None if b is None else b.to(h.dtype), offsets, starts, U,
                           in_win, out_win)
            if isinstance(norm, nn.modules.batchnorm._BatchNorm):
                y = _active_batch_norm_windows(norm, y, idx, out_win) if uses_batch_stats(norm) else \
                    _eval_batch_norm_windows(norm, y, per_sample, out_win)
            elif isinstance(norm, nn.InstanceNorm2d):
                y = instance_norm(norm, y, slice(None)) if not norm.affine else \
                    F.instance_norm(y, eps=norm.eps) * per_sample(norm.weight, out_win).to(y.dtype) + \
                    per_sample(norm.bias, out_win).to(y.dtype)
            elif norm is not None and not isinstance(norm, nn.Identity):
                raise TypeError(f"unsupported ICM normalization {type(norm).__name__}")
        if residual is not None:
            y = residual + y
        return act_of(act, y, out_win) if act is not None else y

    h, block_in = x, None
    for lay in icm_layers(module):
        if lay.win_in and lay.win_out and not lay.takes_residual:
            block_in = h  # the residual of this block's second convolution
        h = layer(h, lay.conv, lay.norm, lay.act, lay.win_in, lay.win_out,
                  residual=block_in if lay.takes_residual else None)
    out = h
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(B, device=dev)
    return out.index_select(0, inverse)


def _starts_tensor(module: ICMBase, device: torch.device) -> torch.Tensor:
    """The (G,) int32 window starts on ``device``, made once per device (no copy per call)."""
    cache = module.__dict__.setdefault("_icm_starts", {})
    if device not in cache:
        cache[device] = torch.tensor(module.starts, dtype=torch.int32, device=device)
    return cache[device]


def _eval_batch_norm_windows(bn, y, per_sample, win):
    scale, shift = bn_scale_shift(bn, acc_dtype(y))
    return (y.to(scale.dtype) * per_sample(scale, win) + per_sample(shift, win)).to(y.dtype)


def _active_batch_norm_windows(bn, y, idx, win):
    """``bn_stats="active"`` BatchNorm on a batched compact state (B, U, h, w) with window index (B, U)."""
    if not win:
        return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, True,
                            bn_momentum_for_call(bn), bn.eps)
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
    update_running_stats(bn, counts, mean, sq)
    rstd = torch.rsqrt(var + bn.eps)
    out = centered * rstd[idx][:, :, None, None]
    if bn.affine:
        out = out * bn.weight[idx][:, :, None, None] + bn.bias[idx][:, :, None, None]
    return out.to(y.dtype)
