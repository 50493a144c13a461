"""Shared test helpers: one tolerance table, randomized weights, poisoning, comparisons."""
from __future__ import annotations

import math

import torch
from torch import nn

# One tolerance table for the suite: (rtol, atol) by dtype, relative to an fp32 (or fp64) reference.
TOLERANCES = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (2e-2, 2e-3),
    torch.bfloat16: (2e-2, 2e-3),
}

POISON = float("nan")


def tol(dtype: torch.dtype):
    return TOLERANCES[dtype]


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| (a scale-aware error that does not blow up at zeros)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    denom = expected.abs().max().clamp_min(1e-30)
    return float((actual - expected).abs().max() / denom)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32, name: str = "",
                 rtol: float | None = None):
    """Max error relative to the expected tensor's largest magnitude, within the dtype's tolerance."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values in the result"
    limit = rtol if rtol is not None else TOLERANCES[dtype][0]
    err = max_rel_err(actual, expected)
    assert err <= limit, f"{name}: max relative error {err:.3e} > {limit:.1e}"


def check_low_precision(got: torch.Tensor, want: torch.Tensor, lowp: torch.Tensor, dtype: torch.dtype, name: str):
    """A compiled artefact in ``dtype`` may be off from the fp32 model by at most twice what the PyTorch model
    run in ``dtype`` is off (or the dtype's tolerance, whichever is larger). fp32 artefacts may use TF32, so
    they get the bf16 tolerance."""
    err, base = max_rel_err(got.float(), want), max_rel_err(lowp.float(), want)
    limit = max(2 * base, TOLERANCES[torch.bfloat16 if dtype == torch.float32 else dtype][0])
    print(f"{name}: error {err:.3e}, PyTorch {dtype} error {base:.3e}, limit {limit:.3e}")
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    assert err <= limit, f"{name}: max relative error {err:.3e} > {limit:.3e} (PyTorch in {dtype}: {base:.3e})"


def assert_encodes_like(embedding: torch.Tensor, age: torch.Tensor, images: torch.Tensor, fast: nn.Module,
                        ref: nn.Module):
    """An exported recognition artefact's outputs against the fast model's and the reference's encode (fp32)."""
    with torch.no_grad():
        want, oracle = fast.encode(images), ref.encode(images)
    assert_close(embedding, want.embedding, torch.float32, "embedding vs fast model")
    assert_close(age, want.age, torch.float32, "age vs fast model")
    assert_close(embedding, oracle.embedding, torch.float32, "embedding vs reference")
    assert_close(age, oracle.age, torch.float32, "age vs reference")


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0, scale: float = 1.0) -> nn.Module:
    """Give every parameter and BN statistic a random, non-default value (never zeros or inits).

    Conv/Linear weights get N(0, scale * gain / sqrt(fan_in)) so activations keep a sane range
    through deep stacks; biases, BN affine/statistics and PReLU slopes are moved away from their
    defaults. Spectral-norm vectors are left as they are.
    """
    g = torch.Generator().manual_seed(seed)

    def rand(shape, lo, hi):
        return torch.rand(shape, generator=g) * (hi - lo) + lo

    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)):
            w = getattr(m, "weight_orig", m.weight)
            fan_in = w[0].numel()
            w.copy_(torch.randn(w.shape, generator=g) * scale / math.sqrt(fan_in))
            if m.bias is not None:
                m.bias.copy_(rand(m.bias.shape, -0.1, 0.1))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.affine:
                m.weight.copy_(rand(m.weight.shape, 0.5, 1.5))
                m.bias.copy_(rand(m.bias.shape, -0.2, 0.2))
            if m.track_running_stats:
                m.running_mean.copy_(rand(m.running_mean.shape, -0.2, 0.2))
                m.running_var.copy_(rand(m.running_var.shape, 0.5, 2.0))
        elif isinstance(m, nn.PReLU):
            m.weight.copy_(rand(m.weight.shape, 0.05, 0.45))
    return module
