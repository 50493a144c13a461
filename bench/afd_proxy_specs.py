"""Hot-path calls of the fused AFD for ``gpu_proxy.py`` (static SASS and launch counts without a GPU).

    python ../shared/tools/gpu_proxy.py sass bench.afd_proxy_specs:eval_cvpr_b256
    python ../shared/tools/gpu_proxy.py launches bench.afd_proxy_specs:train_cvpr_b256

Each function makes one call of the module at B=256, 512 x 7 x 7, bf16 (eval: no_grad forward;
train: forward + backward of a composite loss). The module and inputs are built once per process.
"""
from __future__ import annotations

import functools

import torch

B = 256


@functools.lru_cache(None)
def _setup(variant: str, training: bool):
    from mtlface_fast.layers import FusedAttentionModule
    torch.manual_seed(0)
    m = FusedAttentionModule(512, 16, variant).train(training).bfloat16()
    x = torch.randn(B, 512, 7, 7, dtype=torch.bfloat16)
    return m, x


def _eval(variant):
    m, x = _setup(variant, False)
    with torch.no_grad():
        m(x)


def _train(variant):
    m, x = _setup(variant, True)
    x = x.detach().requires_grad_()
    x_id, x_age = m(x)
    (x_id.float().sum() + 2 * x_age.float().sum()).backward()


def eval_cvpr_b256():
    _eval("cvpr")


def eval_tpami_b256():
    _eval("tpami")


def train_cvpr_b256():
    _train("cvpr")


def train_tpami_b256():
    _train("tpami")
