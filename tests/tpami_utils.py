"""Helpers for the TPAMI tests: randomized StyleGAN2 parameters and buffers, small configurations."""
from __future__ import annotations

import torch
from torch import nn

from tests.utils import randomize_

# A small TPAMI configuration for CPU tests: 32 px input (8 latents, a 32 px generator), ir34 trunk.
SMALL = dict(arch="tpami", backbone="ir34", input_size=32, age_group=7)


@torch.no_grad()
def randomize_tpami_(model: nn.Module, seed: int = 0) -> nn.Module:
    """randomize_ for Conv/Linear/BN, plus every StyleGAN2 parameter and buffer moved off its init.

    Noise strengths (init 0), activation and RGB biases (init 0), modulation biases (init 1),
    ``latent_avg`` (init 0) and the stored noise maps get fresh random values; the routers, the
    FIR kernels and ``expectation`` keep their fixed values. ToRGB weights are scaled down so that the
    images are mostly inside the clamp range.
    """
    randomize_(model, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    fixed = ("_unit_mapping", "kernel", "expectation", "num_batches_tracked", "running_mean", "running_var")
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not (name.startswith("decoder.") or ".decoder." in name) or name.endswith(fixed):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("noise.weight"):
            t.copy_(torch.rand(t.shape, generator=g) * 0.4 + 0.1)
        elif leaf == "bias":
            t.copy_(torch.rand(t.shape, generator=g) * 0.4 - 0.2 + (1.0 if ".modulation." in name else 0.0))
        elif name.endswith("latent_avg"):
            t.copy_(torch.randn(t.shape, generator=g) * 0.5)
        elif "noises.noise_" in name or name.endswith("input.input"):
            t.copy_(torch.randn(t.shape, generator=g))
        elif leaf == "weight":
            t.copy_(torch.randn(t.shape, generator=g))
            if ".to_rgb" in name:
                t.mul_(0.1)  # keep images mostly inside [-1, 1], as a trained generator's, so the clamp bites rarely
    return model
