"""The fused noise + bias + leaky ReLU op of the StyleGAN2 decoder (Triton; the interpreter on CPU)."""
import pytest
import torch

import mtlface_fast
from mtlface_fast.backend import interpreter_enabled, triton_available
from mtlface_fast.layers.stylegan2 import FastStyledConv
from mtlface_fast.reference import stylegan2 as sg
from tests.utils import POISON, TOLERANCES, assert_close

pytestmark = pytest.mark.skipif(
    not (triton_available() and (torch.cuda.is_available() or interpreter_enabled())),
    reason="needs triton with CUDA, or the Triton interpreter (TRITON_INTERPRET=1)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(B, C, H, W, noise_batch, channels_last, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g).to(DEVICE, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    noise = torch.randn(noise_batch, 1, H, W, generator=g).to(DEVICE, dtype)
    strength = (torch.rand(1, generator=g) + 0.1).to(DEVICE, dtype)
    bias = (torch.rand(C, generator=g) - 0.5).to(DEVICE, dtype)
    return x, noise, strength, bias


def _reference(x, noise, strength, bias, slope=0.2, gain=2 ** 0.5):
    return sg.fused_leaky_relu(x.float() + strength.float() * noise.float(), bias.float(), slope, gain)


@pytest.mark.parametrize("shape,noise_batch", [((2, 5, 7, 3), 2), ((3, 4, 6, 6), 1), ((1, 3, 5, 5), 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_backward(shape, noise_batch, channels_last, monkeypatch):
    from mtlface_fast.kernels import stylegan2 as k

    x, noise, strength, bias = _inputs(*shape, noise_batch, channels_last)
    poisoned = []
    real_empty_like = torch.empty_like

    def poison_empty_like(t, *a, **kw):  # the kernel must write every output element
        out = real_empty_like(t, *a, **kw).fill_(POISON)
        poisoned.append(out)
        return out

    monkeypatch.setattr(k.torch, "empty_like", poison_empty_like)
    leaves = [t.clone().requires_grad_() for t in (x, noise, strength, bias)]
    out = k.noise_bias_lrelu(*leaves)
    monkeypatch.undo()
    assert poisoned, "the launcher did not allocate its output"
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    ref_leaves = [t.clone().requires_grad_() for t in (x, noise, strength, bias)]
    expected = _reference(*ref_leaves)
    assert_close(out, expected, name="forward")
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    (out * w).sum().backward()
    (expected * w).sum().backward()
    for name, a, b in zip(("x", "noise", "strength", "bias"), leaves, ref_leaves):
        assert_close(a.grad, b.grad, name=f"grad {name}")


def test_bf16_within_twice_the_reference_error():
    from mtlface_fast.kernels import stylegan2 as k

    x, noise, strength, bias = _inputs(2, 8, 6, 6, 2, False)
    exact = _reference(x.double(), noise.double(), strength.double(), bias.double())
    lo = [t.to(torch.bfloat16) for t in (x, noise, strength, bias)]
    ours = k.noise_bias_lrelu(*lo)
    assert ours.dtype == torch.bfloat16
    ref_lo = sg.fused_leaky_relu(lo[0] + lo[2] * lo[1], lo[3])
    ref_err = float((ref_lo.double() - exact).abs().max())
    err = float((ours.double() - exact).abs().max())
    assert err <= 2 * ref_err + TOLERANCES[torch.bfloat16][1], (err, ref_err)


def test_opcheck_and_errors():
    from mtlface_fast.kernels import stylegan2 as k

    x, noise, strength, bias = _inputs(2, 3, 4, 4, 2, False)
    args = (x.requires_grad_(), noise, strength.requires_grad_(), bias.requires_grad_(), 0.2, 2 ** 0.5)
    torch.library.opcheck(torch.ops.mtlface_fast.noise_bias_lrelu.default, args)
    with pytest.raises(ValueError, match="noise must have shape"):
        k.noise_bias_lrelu_forward(x.detach(), torch.zeros(3, 1, 4, 4, device=DEVICE), strength.detach(),
                                   bias.detach(), 0.2, 1.0)
    with pytest.raises(ValueError, match="bias must be"):
        k.noise_bias_lrelu_forward(x.detach(), noise, strength.detach(), torch.zeros(5, device=DEVICE), 0.2, 1.0)
    from mtlface_fast.kernels.utils import DECOMPOSITIONS
    assert torch.ops.mtlface_fast.noise_bias_lrelu.default in DECOMPOSITIONS


def test_styled_conv_on_the_triton_backend():
    torch.manual_seed(2)
    r = sg.StyledConv(4, 6, 3, 8, upsample=True)
    with torch.no_grad():
        r.noise.weight.fill_(0.3)
        r.activate.bias.uniform_(-0.3, 0.3)
    f = FastStyledConv(4, 6, 3, 8, upsample=True)
    f.load_state_dict(r.state_dict())
    r, f = r.to(DEVICE), f.to(DEVICE)
    x, style = torch.randn(2, 4, 5, 5, device=DEVICE), torch.randn(2, 8, device=DEVICE)
    noise = torch.randn(1, 1, 10, 10, device=DEVICE)
    with mtlface_fast.use_backend("triton"):
        out = f(x, style, noise=noise)
    assert_close(out, r(x, style, noise=noise), name="styled conv, triton backend")
