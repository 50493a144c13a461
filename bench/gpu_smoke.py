"""Every fused op once, forward and backward, on small CUDA shapes, checked against the reference.

Meant to run under ``compute-sanitizer`` (see bench/run_gpu.sh): small enough to finish under the
sanitizer's slowdown, and it launches every Triton kernel of the package at least once (AFD pooling /
decomposition and their backward, the compact ICM convolutions and their backward, the whole fast model's
inference and training step). Exits non-zero if an output is non-finite or off from the reference.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mtlface_fast  # noqa: E402
from mtlface_fast import layers, reference, use_backend  # noqa: E402
from tests.utils import randomize_  # noqa: E402

TOL = {torch.float32: 1e-3, torch.bfloat16: 3e-2}  # TF32 may be on for the reference's convolutions
failures = []


def check(name, actual, expected, dtype=torch.float32):
    # Error relative to the expected tensor's largest magnitude, floored at 1e-3: the gradient of a conv
    # bias that a training-mode BatchNorm follows is zero up to rounding, and relative error means nothing there.
    err = float((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-3))
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


def icm(dev):
    for train in (False, True):
        ref = randomize_(reference.AgingModule(7), seed=2).to(dev).train(train)
        fast = getattr(layers, "CompactAgingModule")(7).to(dev).train(train)
        fast.load_state_dict(ref.state_dict())
        x = torch.randn(5, 512, 7, 7, device=dev, requires_grad=True)
        xf = x.detach().clone().requires_grad_(True)
        g = torch.tensor([6, 0, 3, 3, 1], device=dev)
        r, f = ref.icm(x, g), fast.icm(xf, g)
        w = torch.randn_like(r)
        (r * w).sum().backward()
        (f * w).sum().backward()
        tag = f"icm {'train' if train else 'eval'}"
        check(tag + " out", f, r)
        check(tag + " grad x", xf.grad, x.grad)
        for (n, p), q in zip(ref.named_parameters(), fast.parameters()):
            if p.grad is not None:
                check(f"{tag} grad {n}", q.grad, p.grad)


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
    dev = p.parse_args(argv).device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda needs a CUDA GPU")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
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
