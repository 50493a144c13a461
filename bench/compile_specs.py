"""Every Triton specialization the public calls launch, as ``gpu_proxy.py sass`` SPECs (compile range).

    python ../shared/tools/gpu_proxy.py sass bench.compile_specs:afd_eval --out /tmp/sass_afd_eval
    python bench/compile_range.py            # all SPECs below, one table + JSON per triton version

Each function makes ONE call of its hot paths over both architectures (CVPR ``cvpr``, TPAMI ``tpami``) and the
three dtypes (fp32, bf16, fp16; the ICMs under autocast as the model runs them), at the benchmark shapes:
AFD B=256 and 1024 (eval) / 256 (train), ICM B=1, 64, 256 (eval) / 64 (train), the TPAMI decoder's fused
noise + bias + leaky ReLU at every StyledConv shape of synthesize at B=64, and the whole fast model of either
architecture (encode + synthesize, B=2; the trunk's shapes at larger B change no Triton specialization,
whose arguments are the AFD / ICM / decoder tensors covered above). Modules and inputs are built once.
"""
from __future__ import annotations

import contextlib
import functools

import torch

ARCHS = ("cvpr", "tpami")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _autocast(dtype):
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast("cpu", dtype=dtype)


@functools.lru_cache(None)
def _afd(arch: str, dtype: torch.dtype, training: bool):
    from mtlface_fast.layers import FusedAttentionModule
    torch.manual_seed(0)
    return FusedAttentionModule(512, 16, arch).train(training).to(dtype)


@functools.lru_cache(None)
def _x(batch: int, dtype: torch.dtype, channels: int = 512, size: int = 7, channels_last: bool = False):
    x = torch.randn(batch, channels, size, size).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def afd_eval():
    """Fused AFD eval forward (no_grad; the 3-launch afd_eval path): both archs x 3 dtypes x B 256, 1024,
    NCHW, and channels_last at B=256."""
    for arch in ARCHS:
        for dtype in DTYPES:
            m = _afd(arch, dtype, False)
            with torch.no_grad():
                for b in (256, 1024):
                    m(_x(b, dtype))
                m(_x(256, dtype, channels_last=True))


def afd_train():
    """Fused AFD train forward + backward of a composite loss: both archs x 3 dtypes, B=256."""
    for arch in ARCHS:
        for dtype in DTYPES:
            m = _afd(arch, dtype, True)
            x = _x(256, dtype).detach().requires_grad_()
            x_id, x_age = m(x)
            (x_id.float().sum() + 2 * x_age.float().sum()).backward()


@functools.lru_cache(None)
def _icm(arch: str, batch: int, train: bool):
    from bench.icm_specs import _icm as build
    return build(arch, batch, train)


def icm_eval():
    """Compact ICM eval forward (the one-launch icm_forward): both archs x 3 dtypes x B 1, 64, 256."""
    for arch in ARCHS:
        for dtype in DTYPES:
            for b in (1, 64, 256):
                m, x, g = _icm(arch, b, False)
                with torch.no_grad(), _autocast(dtype):
                    m.icm(x, g)


def icm_train():
    """Compact ICM training forward + backward (per-layer icm_conv and its gradients): both archs x 3
    dtypes, B=64."""
    for arch in ARCHS:
        for dtype in DTYPES:
            m, x, g = _icm(arch, 64, True)
            m.zero_grad(set_to_none=True)
            x.grad = None
            with _autocast(dtype):
                y = m.icm(x, g)
            y.float().sum().backward()


@functools.lru_cache(None)
def _model(arch: str):
    import mtlface_fast
    torch.manual_seed(0)
    m = (mtlface_fast.MTLFace() if arch == "cvpr" else mtlface_fast.MTLFace(arch="tpami")).eval()
    return m, torch.randn(2, 3, 112, 112).clamp(-1, 1)


def model():
    """The whole fast model of both architectures: encode and synthesize, B=2, bf16 and fp32."""
    for arch in ARCHS:
        m, img = _model(arch)
        with torch.no_grad():
            for dtype in (torch.float32, torch.bfloat16):
                m.encode(img, dtype=dtype)
                m.synthesize(img, torch.tensor([1, 5]), dtype=dtype)


@functools.lru_cache(None)
def _decoder_shapes():
    """(C, H, W) of every FastStyledConv output in TPAMI synthesize (recorded from one B=1 call)."""
    from mtlface_fast.layers.stylegan2 import FastStyledConv
    m, img = _model("tpami")
    shapes, hooks = [], [mod.register_forward_hook(lambda mod, i, o: shapes.append(tuple(o.shape[1:])))
                         for mod in m.modules() if isinstance(mod, FastStyledConv)]
    try:
        with torch.no_grad():
            m.synthesize(img[:1], torch.tensor([3]))
    finally:
        for h in hooks:
            h.remove()
    return tuple(dict.fromkeys(shapes))


def stylegan2():
    """The TPAMI decoder's fused noise + bias + leaky ReLU at every StyledConv shape of synthesize at B=64
    (channels_last, as on CUDA; stored noise of batch 1), 3 dtypes, forward (the backward is aten)."""
    from mtlface_fast.kernels.stylegan2 import noise_bias_lrelu
    for c, h, _ in _decoder_shapes():  # square maps
        for dtype in DTYPES:
            x = _x(64, dtype, c, h, channels_last=True)
            noise = torch.randn(1, 1, h, h, dtype=dtype)
            noise_bias_lrelu(x, noise, torch.zeros(1, dtype=dtype), torch.zeros(c, dtype=dtype))


ALL = ("afd_eval", "afd_train", "icm_eval", "icm_train", "stylegan2", "model")
