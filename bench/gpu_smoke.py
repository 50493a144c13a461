"""Every fused op once, forward and backward, on small CUDA shapes, checked against the reference.

Meant to run under ``compute-sanitizer`` (see bench/run_gpu.sh): small enough to finish under the
sanitizer's slowdown, and it launches every Triton kernel of the package at least once (AFD pooling /
decomposition and their backward, the compact ICM convolutions and their backward, the whole fast model's
inference and training step). Exits non-zero if an output is non-finite or off from the reference.
"""
from __future__ import annotations

import copy
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mtlface_fast  # noqa: E402
from mtlface_fast import layers, reference, use_backend  # noqa: E402
from tests.utils import randomize_  # noqa: E402

TOL = {torch.float32: 1e-3, torch.bfloat16: 3e-2}  # TF32 may be on for the reference's convolutions
failures = []


def check(name, actual, expected, dtype=torch.float32, floor=1e-3):
    # Error relative to the expected tensor's largest magnitude, floored at ``floor``: the gradient of a conv
    # bias that a training-mode BatchNorm follows is zero up to rounding, and relative error means nothing
    # there. Parameter gradients pass a floor scaled by the module's largest gradient (see grad_floor).
    actual, expected = actual.detach().float(), expected.detach().float()
    err = float((actual - expected).abs().max() / expected.abs().max().clamp_min(floor))
    ok = bool(torch.isfinite(actual).all()) and err <= TOL[dtype]
    print(f"{'ok  ' if ok else 'FAIL'} {name:55s} max rel err {err:.2e}")
    if not ok:
        failures.append(name)


def afd(dev):
    for variant in ("cvpr", "tpami"):
        for train in (False, True):
            ref = randomize_(reference.AttentionModule(512, 16, variant), seed=1).to(dev).train(train)
            fast = getattr(layers, "FusedAttentionModule")(512, 16, variant).to(dev).train(train)
            fast.load_state_dict(ref.state_dict())
            x = torch.randn(3, 512, 7, 7, device=dev, requires_grad=True)
            xf = x.detach().clone().requires_grad_(True)
            r_id, r_age = ref(x)
            f_id, f_age = fast(xf)
            w = torch.randn_like(r_id)
            ((r_id * w).sum() + (r_age * w.flip(0)).sum()).backward()
            ((f_id * w).sum() + (f_age * w.flip(0)).sum()).backward()
            tag = f"afd {variant} {'train' if train else 'eval'}"
            check(tag + " x_id", f_id, r_id)
            check(tag + " x_age", f_age, r_age)
            check(tag + " grad x", xf.grad, x.grad)
            for (n, p), q in zip(ref.named_parameters(), fast.parameters()):
                check(f"{tag} grad {n}", q.grad, p.grad)
        # inference (nothing to differentiate): the three-launch afd_eval path, NCHW and channels_last
        ref = randomize_(reference.AttentionModule(512, 16, variant), seed=2).to(dev).eval()
        fast = getattr(layers, "FusedAttentionModule")(512, 16, variant).to(dev).eval()
        fast.load_state_dict(ref.state_dict())
        for dtype in (torch.float32, torch.bfloat16):
            for cl in (False, True):
                x = torch.randn(37, 512, 7, 7, device=dev)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.no_grad():
                    want = ref(x)
                    got = fast.to(dtype)(x.to(dtype))
                for name, u, v in zip(("x_id", "x_age"), got, want):
                    check(f"afd {variant} eval no-grad {name} {dtype} {'NHWC' if cl else 'NCHW'}", u, v, dtype)
            fast.float()


# Smallest distance, relative to the RMS of a PReLU's input, that the checked inputs keep from the kink.
KINK_MARGIN = 5e-6


def kink_free_input(module, groups, shape, dev, margin=KINK_MARGIN, first_seed=0, tries=512):
    """A random input at which no PReLU of ``module``'s ICM sees an input within ``margin`` (relative to the
    RMS of that PReLU's input) of its kink at zero, in a float64 forward pass.

    The ICM is piecewise linear in its activations: its gradients jump where a PReLU input crosses zero.
    At full size (B=5: ~4e5 kept activation inputs, the smallest |v| typically ~1e-6) two fp32
    implementations that differ only by rounding (~1e-7..1e-6) put some such input on opposite sides of
    zero for about one input in four, and the gradients then differ by 1e-3..5e-2 relative (seen on CPU
    between the PyTorch compact path and the reference, and between the fp32 and the fp64 reference).
    Away from the kinks the gradients are smooth, and both must agree to rounding. Exact zeros (masked
    channels of the reference) are left out: their gradient is masked. Returns (x, seed, smallest gap)."""
    probe = copy.deepcopy(module).double()
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
             for m in probe.modules() if isinstance(m, nn.PReLU)]
    try:
        for seed in range(first_seed, first_seed + tries):
            gen = torch.Generator().manual_seed(seed)
            x = torch.randn(shape, generator=gen).to(dev)
            seen.clear()
            with torch.no_grad():
                probe.icm(x.double(), groups)
            gap = float("inf")
            for v in seen:
                v = v[v != 0].abs()
                if v.numel():
                    gap = min(gap, float(v.min() / v.square().mean().sqrt()))
            if gap >= margin:
                return x, seed, gap
    finally:
        for h in hooks:
            h.remove()
    raise RuntimeError(f"no input in {tries} seeds keeps every activation {margin} away from its kink")


# First input seeds that keep KINK_MARGIN in a float64 CPU forward (eval, train): the search starts there so
# that it costs one probe (it moves on if the device's float64 pass disagrees); under compute-sanitizer each
# probe is slow.
ICM_SEEDS = (65, 50)


def icm(dev, first_seed=None):
    for train in (False, True):
        ref = randomize_(reference.AgingModule(7), seed=2).to(dev).train(train)
        fast = getattr(layers, "CompactAgingModule")(7).to(dev).train(train)
        fast.load_state_dict(ref.state_dict())
        g = torch.tensor([6, 0, 3, 3, 1], device=dev)
        start = ICM_SEEDS[train] if first_seed is None else first_seed
        x, seed, gap = kink_free_input(ref, g, (5, 512, 7, 7), dev, first_seed=start)
        print(f"icm {'train' if train else 'eval'}: input seed {seed}, activations >= {gap:.1e} RMS from the kink")
        x.requires_grad_(True)
        xf = x.detach().clone().requires_grad_(True)
        r, f = ref.icm(x, g), fast.icm(xf, g)
        w = torch.randn_like(r)
        (r * w).sum().backward()
        (f * w).sum().backward()
        tag = f"icm {'train' if train else 'eval'}"
        check(tag + " out", f, r)
        check(tag + " grad x", xf.grad, x.grad)
        floor = grad_floor(ref)
        for (n, p), q in zip(ref.named_parameters(), fast.parameters()):
            if p.grad is not None:
                check(f"{tag} grad {n}", q.grad, p.grad, floor=floor)


def grad_floor(module):
    """1e-3 of the module's largest parameter gradient: the error floor of its parameter gradients. A conv
    bias that a training-mode BatchNorm follows has a zero gradient up to rounding: in fp32 its computed
    value is ~1e-5 against gradients of ~1e2 (full-size ICM), which an absolute floor of 1e-3 reads as a
    relative error of ~1e-2 for the PyTorch and the Triton path alike."""
    grads = [float(p.grad.abs().max()) for p in module.parameters() if p.grad is not None]
    return 1e-3 * max(grads, default=1.0)


def _icm_train_module(dev, triton_path, repeat_num=4, batch=5, size=7):
    """The training-mode ICM of the smoke check: out, grad x and parameter gradients of the reference and
    of the compact module on one path (Triton or PyTorch), at an input away from the activation kinks."""
    ref = randomize_(reference.AgingModule(7, repeat_num), seed=2).to(dev).train()
    fast = getattr(layers, "CompactAgingModule")(7, repeat_num).to(dev).train()
    fast.load_state_dict(ref.state_dict())
    g = torch.tensor([6, 0, 3, 3, 1, 5, 2, 4][:batch], device=dev)
    x, _, _ = kink_free_input(ref, g, (batch, 512, size, size), dev, first_seed=106)
    return _icm_pair(ref, fast, x, g, triton_path)


def _icm_pair(ref, fast, x, g, triton_path):
    """Both modules' ICM forward and backward under one random output weighting; the fast one on the Triton
    or the PyTorch compact path."""
    x = x.detach().requires_grad_(True)
    xf = x.detach().clone().requires_grad_(True)
    r = ref.icm(x, g)
    w = torch.randn_like(r)
    (r * w).sum().backward()
    with use_backend("triton" if triton_path else "torch"):
        f = fast.icm(xf, g)
        (f * w).sum().backward()
    return ref, fast, (r, f), (x.grad, xf.grad)


def icm_bisect(dev, full=True):
    """Where a training-mode gradient of the Triton ICM departs from the reference: the module on both
    compact paths, then every window-convolution op at the training shapes with every autotune config."""
    from mtlface_fast.kernels import icm_conv as K
    from mtlface_fast.reference.icm import router_windows

    print(f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32} matmul.allow_tf32="
          f"{torch.backends.cuda.matmul.allow_tf32}")
    size, unit, cin = (7, 128, 512) if full else (3, 8, 12)
    for path in ("torch", "triton"):
        if full:
            ref, fast, (r, f), (gx, gxf) = _icm_train_module(dev, path == "triton")
        else:
            ref, fast, (r, f), (gx, gxf) = _icm_train_module_small(dev, path == "triton")
        tag = f"bisect module train {path}"
        check(tag + " out", f, r)
        check(tag + " grad x", gxf, gx)
        floor = grad_floor(ref)
        for (n, p), q in zip(ref.named_parameters(), fast.parameters()):
            if p.grad is not None:
                check(f"{tag} grad {n}", q.grad, p.grad, floor=floor)

    # Op level: the sorted batch of groups 6, 0, 3, 3, 1 and each layer of the ICM (training uses the 3x3
    # layer with full-width output and the 1x1 conv2; inference with gradients the other three).
    G, sigma = 7, 0.1
    C, starts = router_windows(unit, G, sigma)
    starts = torch.tensor(starts, dtype=torch.int32, device=dev)
    offsets = torch.tensor([0, 1, 2, 2, 4, 4, 4, 5], dtype=torch.int32, device=dev)
    gen = torch.Generator().manual_seed(7)
    layers_ = {"3x3 window->full (train)": (3, True, False, C, C), "3x3 window->window": (3, True, True, C, C),
               "1x1 full->window (conv1)": (1, False, True, cin, C), "1x1 window->full (conv2)": (1, True, False, C, cin)}
    fwd, wgrad = K._icm_conv_fwd_kernel, K._icm_conv_wgrad_kernel
    for name, (ks, iw, ow, c_in, c_out) in layers_.items():
        x = torch.randn(5, unit if iw else c_in, size, size, generator=gen).to(dev)
        wt = (torch.randn(c_out, c_in, ks, ks, generator=gen) / (c_in * ks * ks) ** 0.5).to(dev)
        b = torch.randn(c_out, generator=gen).to(dev)
        dy = torch.randn(5, unit if ow else c_out, size, size, generator=gen).to(dev)
        e_y = K._ref_conv(x, wt, b, offsets, starts, unit, iw, ow)
        e_dx = K._ref_grad_input(dy, wt, offsets, starts, unit, iw, ow, x.size(1))
        e_dw = K._ref_grad_weight(dy, x, wt, offsets, starts, unit, iw, ow)
        for cfg in K._conv_configs():  # every config, also where autotuning is off
            with _only_config(fwd, cfg):
                check(f"bisect {name} icm_conv {_cfg(cfg)}", K.icm_conv(x, wt, b, offsets, starts, unit, iw, ow), e_y)
                check(f"bisect {name} grad input {_cfg(cfg)}",
                      K.icm_conv_grad_input(dy, wt, offsets, starts, unit, iw, ow, x.size(1)), e_dx)
        for cfg in K._wgrad_configs():
            with _only_config(wgrad, cfg):
                check(f"bisect {name} grad weight {_cfg(cfg)}",
                      K.icm_conv_grad_weight(dy, x, wt, offsets, starts, unit, iw, ow), e_dw)


def _icm_train_module_small(dev, triton_path):
    """The training-mode check of icm_bisect at a size the Triton interpreter runs in seconds (CPU dry run)."""
    from mtlface_fast.layers import CompactICM
    from mtlface_fast.reference.icm import ICMBase

    class Compact(CompactICM, ICMBase):
        pass

    ref = randomize_(ICMBase(12, 7, 8, 0.1, 2), seed=2).to(dev).train()
    fast = Compact(12, 7, 8, 0.1, 2).to(dev).train()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(5, 12, 3, 3, device=dev)
    g = torch.tensor([6, 0, 3, 3, 1], device=dev)
    return _icm_pair(ref, fast, x, g, triton_path)


def _cfg(cfg):
    return "[" + ",".join(f"{v}" for v in cfg.kwargs.values()) + f",w{cfg.num_warps},s{cfg.num_stages}]"


class _only_config:
    """Autotune a kernel over one config alone (restored on exit)."""

    def __init__(self, kernel, config):
        self.kernel, self.config = kernel, config

    def __enter__(self):
        self.saved = self.kernel.configs, self.kernel.cache
        self.kernel.configs, self.kernel.cache = [self.config], {}

    def __exit__(self, *exc):
        self.kernel.configs, self.kernel.cache = self.saved


def model(dev):
    ref = randomize_(reference.MTLFace("ir34", 112), seed=3).to(dev)
    fast = mtlface_fast.MTLFace("ir34", 112).to(dev)
    fast.load_state_dict(ref.state_dict())
    ref.eval(), fast.eval()
    x = torch.randn(2, 3, 112, 112, device=dev).clamp(-1, 1)
    with torch.no_grad():
        check("model embedding", fast(x), ref(x))
        check("model synthesize", fast.synthesize(x, torch.tensor([1, 5], device=dev)),
              ref.synthesize(x, torch.tensor([1, 5], device=dev)))
        check("model synthesize bf16", fast.synthesize(x, 2, dtype=torch.bfloat16), ref.synthesize(x, 2),
              torch.bfloat16)
    fast.train()
    fast.encode(x).embedding.square().mean().backward()
    grads = [p.grad for p in fast.parameters() if p.grad is not None]
    ok = grads and all(torch.isfinite(gr).all() for gr in grads)
    print(f"{'ok  ' if ok else 'FAIL'} model train step: {len(grads)} finite gradients")
    if not ok:
        failures.append("model train step")


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda", help="cuda (Triton kernels) or cpu (PyTorch paths; a dry run)")
    p.add_argument("--icm-bisect", action="store_true",
                   help="only the ICM training bisection: module on both compact paths, then every window-"
                        "convolution op at the training shapes with every autotune config (on cpu: small "
                        "shapes in the Triton interpreter, TRITON_INTERPRET=1)")
    args = p.parse_args(argv)
    dev = args.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda needs a CUDA GPU")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    if args.icm_bisect:
        icm_bisect(dev, full=dev.startswith("cuda"))
        print("failures:", failures or "none")
        return 1 if failures else 0
    with use_backend("triton" if dev.startswith("cuda") else "torch"):
        afd(dev)
        icm(dev)
        model(dev)
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    print("failures:", failures or "none")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
