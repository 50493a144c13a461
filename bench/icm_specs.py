"""gpu_proxy SPECs for the compact ICM (``python ../shared/tools/gpu_proxy.py sass bench.icm_specs:eval_b64``).

Each function makes ONE call of the hot path; modules and inputs are built once. Full-size ICMs on
(B, C, 7, 7) inputs with mixed groups: the CVPR generator's ICM (512 -> 819, 7 groups, sigma 0.1) and the
TPAMI aging1 ICM (512 -> 800, sigma 1/8), bf16 under autocast as the benchmark runs them.
"""
import functools

import torch


@functools.lru_cache(None)
def _icm(variant: str, B: int, train: bool = False):
    from mtlface_fast.layers.icm import CompactICM
    from mtlface_fast.reference.icm import ICMBase

    class Compact(CompactICM, ICMBase):
        pass

    torch.manual_seed(0)
    sigma = 0.1 if variant == "cvpr" else 0.125
    m = Compact(512, 7, 128, sigma, 4, variant).train(train)
    x = torch.randn(B, 512, 7, 7, requires_grad=train)
    g = torch.randint(0, 7, (B,))
    return m, x, g


def _fwd(variant, B):
    m, x, g = _icm(variant, B)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        m.icm(x, g)


def eval_b64():
    """CVPR ICM eval forward, B=64, bf16."""
    _fwd("cvpr", 64)


def eval_b256():
    _fwd("cvpr", 256)


def eval_b1():
    _fwd("cvpr", 1)


def tpami_b64():
    """TPAMI aging1 ICM eval forward, B=64, bf16."""
    _fwd("tpami", 64)


def train_b64():
    """CVPR ICM training forward + backward (reference BN statistics), B=64, bf16."""
    m, x, g = _icm("cvpr", 64, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m.icm(x, g)
    y.float().sum().backward()
