"""The fast models compute the reference's function: equal to round-off in float64, float32 noise in float32.

Both architectures, small configurations (ir34 trunk, 32 px input), randomized weights and statistics,
eval mode; the TPAMI model is loaded from a release-layout checkpoint file (``MTLFace.from_official``).

* float64: every public entry point (forward, encode, synthesize, synthesize_all_ages) of the fast
  model equals the reference's within 1e-10 relative, under the torch backend and under the triton
  backend (the kernels run in the interpreter on CPU). The compact ICM's window-convolution kernels
  accumulate in fp32 only: on fp64 inputs the ICM takes its PyTorch twin (tested here under both
  backends, see :class:`mtlface_fast.layers.icm.CompactICM`).
* float32: the fast model's error against the float64 reference is at most twice the error of the
  reference run in float32 (flash-attention's rule for low precision), on several inputs including an
  awkward batch (one sample, the last age group, inputs saturated at +-1).
"""
import copy

import pytest
import torch

import mtlface_fast
from mtlface_fast import reference as ref
from tests.tpami_utils import SMALL as TPAMI_SMALL
from tests.tpami_utils import randomize_tpami_
from tests.utils import max_rel_err, randomize_

CVPR_SMALL = dict(backbone="ir34", input_size=32, age_group=7)
# Four age groups (the fewest allowed) keep the 512-channel 32 px StyleGAN2 generator runs few (synthesize_all_ages, float64).
TPAMI_SMALL4 = dict(TPAMI_SMALL, age_group=4)
EXACT = 1e-10  # float64 round-off through a few dozen layers is ~1e-14; a float32 step anywhere shows as >1e-8
FP32_EPS = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{arch: (reference, fast)} in float32, same weights; the fast TPAMI model from a release-layout file."""
    torch.manual_seed(0)
    cvpr = randomize_(ref.MTLFace(**CVPR_SMALL), seed=11).eval()
    fast_cvpr = mtlface_fast.MTLFace(**CVPR_SMALL)
    fast_cvpr.load_state_dict(cvpr.state_dict())
    tpami = randomize_tpami_(ref.MTLFace(**TPAMI_SMALL4), seed=7).eval()
    path = tmp_path_factory.mktemp("release") / "mtlface_checkpoints.tar"
    torch.save(tpami.state_dict(), path)
    fast_tpami = mtlface_fast.MTLFace.from_official(str(path))
    assert fast_tpami.config == tpami.config
    return {"cvpr": (cvpr, fast_cvpr.eval()), "tpami": (tpami, fast_tpami.eval())}


def _images(b, seed, awkward=False):
    x = torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return (x * 3).clamp(-1, 1) if awkward else x


def _entry_points(model, arch, x, groups, every=True):
    """The public entry points' outputs, by name (``every``: synthesize_all_ages and the TPAMI variants too)."""
    out = {"forward": model(x)}
    res = model.encode(x)
    for k in ("embedding", "age", "group_logits", "x_id", "x_age", "age_logits"):
        out[f"encode.{k}"] = getattr(res, k)
    out["synthesize"] = model.synthesize(x, groups)
    if every:
        out["synthesize_all_ages"] = model.synthesize_all_ages(x[:1])
        if arch == "tpami":
            out["encode(flip=False).embedding"] = model.encode(x, flip=False).embedding
            out["synthesize (random noise)"] = model.synthesize(x[:1], groups[:1], noise="random",
                                                                generator=torch.Generator().manual_seed(5))
    return out


F64_INPUT = dict(cvpr=(_images(2, seed=1), torch.tensor([6, 2])), tpami=(_images(2, seed=1), torch.tensor([3, 0])))


@pytest.fixture(scope="module")
def f64_reference(models):
    """{arch: (fast model in float64, the reference's outputs in float64)}."""
    out = {}
    for arch, (r, f) in models.items():
        x, groups = F64_INPUT[arch]
        with torch.no_grad():
            out[arch] = copy.deepcopy(f).double(), _entry_points(copy.deepcopy(r).double(), arch, x.double(), groups)
    return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("arch", ["cvpr", "tpami"])
@torch.no_grad()
def test_float64_equals_reference(f64_reference, arch, backend):
    f, want = f64_reference[arch]
    x, groups = F64_INPUT[arch]
    with mtlface_fast.use_backend(backend):
        got = _entry_points(f, arch, x.double(), groups)
    assert all(got[k].dtype == torch.float64 for k in got), {k: v.dtype for k, v in got.items()}
    errs = {k: max_rel_err(got[k], want[k]) for k in want}
    print(f"{arch}/{backend} float64 max relative errors:", {k: f"{v:.1e}" for k, v in errs.items()})
    bad = {k: f"{v:.2e}" for k, v in errs.items() if not v <= EXACT}
    assert not bad, f"{arch}/{backend} float64 outputs off the reference by more than {EXACT:.0e}: {bad}"


# (batch, seed, target groups, awkward); the last case: one sample, the last group, inputs saturated at +-1.
FP32_CASES = {"cvpr": [(3, 1, [0, 3, 6], False), (2, 2, [6, 6], False), (2, 3, [1, 5], False), (1, 4, [6], True)],
              "tpami": [(2, 1, [0, 2], False), (2, 2, [1, 1], False), (2, 3, [3, 0], False), (1, 4, [3], True)]}


def _rms_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||a - e|| / ||e||: float32 noise over the whole output. The max error of one element is a poor
    statistic here: the 32 px TPAMI model normalizes 2x2 and 4x4 maps, whose InstanceNorm amplifies
    the rounding of a few elements by orders of magnitude, and which elements is decided by last bits."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


@pytest.mark.parametrize("case", range(4))
@pytest.mark.parametrize("arch", ["cvpr", "tpami"])
@torch.no_grad()
def test_float32_error_within_twice_the_reference(models, arch, case):
    """The NCHW path (``channels_last=False``) within twice the eager reference's fp32 error, on the small test
    models and awkward inputs. (The default CPU path, channels_last with packed oneDNN weights, has the error
    of channels_last convolutions -- torch.compile(reference)'s -- and is judged against those at the real model
    size: tests/test_cpu_fast_path.py.)"""
    b, seed, groups, awkward = FP32_CASES[arch][case]
    r, f = models[arch]
    f = copy.deepcopy(f)
    f.channels_last = False
    x, g = _images(b, seed, awkward), torch.tensor(groups)
    truth = _entry_points(copy.deepcopy(r).double(), arch, x.double(), g, every=False)
    base = _entry_points(r, arch, x, g, every=False)
    with mtlface_fast.use_backend("torch"):
        got = _entry_points(f, arch, x, g, every=False)
    bad, report = {}, {}
    for k, t in truth.items():
        err, ref_err = _rms_rel_err(got[k], t), _rms_rel_err(base[k], t)
        report[k] = f"{err:.1e}/{ref_err:.1e} (max {max_rel_err(got[k], t):.1e}/{max_rel_err(base[k], t):.1e})"
        # A few units of float32 round-off as the floor: the age is B numbers, one rounding can double it.
        if not err <= 2 * ref_err + 4 * FP32_EPS:
            bad[k] = f"{err:.2e} (reference in float32: {ref_err:.2e})"
    print(f"{arch} case {case} float32 relative error fast/reference:", report)
    assert not bad, f"{arch}: float32 errors against float64 above twice the reference's: {bad}"
