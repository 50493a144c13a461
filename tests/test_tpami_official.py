"""The TPAMI reference against the official python_package modules: same random weights, same noise (fp32).

The official code is never part of this repository. Point OFFICIAL_MTLFACE at an exported copy of the
public Hzzone/MTLFace repository to run this test (its CUDA ops are replaced by plain PyTorch by the
loader in ../shared/tools/official_mtlface.py); it skips otherwise.
"""
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from mtlface_fast import reference as ref
from tests.tpami_utils import randomize_tpami_
from tests.utils import max_rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFICIAL = os.path.expanduser(os.environ.get("OFFICIAL_MTLFACE", ""))
# The loader lives in a shared/tools folder beside the checkout, or one level further up.
LOADER = next((p for p in (os.path.join(os.path.dirname(ROOT), "shared", "tools", "official_mtlface.py"),
                           os.path.join(os.path.dirname(os.path.dirname(ROOT)), "shared", "tools",
                                        "official_mtlface.py")) if os.path.isfile(p)), "")

pytestmark = pytest.mark.skipif(
    not (OFFICIAL and os.path.isdir(os.path.join(OFFICIAL, "python_package")) and os.path.isfile(LOADER)),
    reason="set OFFICIAL_MTLFACE to an exported copy of the official MTLFace code to compare against it")

TOL = 1e-5


@pytest.fixture(scope="module")
def pair():
    spec = importlib.util.spec_from_file_location("official_mtlface_loader", LOADER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    official = mod.load(OFFICIAL)
    torch.manual_seed(0)
    theirs = randomize_tpami_(official.TpamiMTLFace(), seed=3).eval()
    state = theirs.state_dict()
    ours = ref.MTLFace(arch="tpami")
    assert list(state) == list(ours.state_dict()), "state-dict keys (and order) differ from the official ones"
    ours.load_state_dict(state, strict=True)
    return theirs, ours.eval()


@torch.no_grad()
def test_reference_matches_official(pair):
    theirs, ours = pair
    x = torch.rand(1, 3, 112, 112, generator=torch.Generator().manual_seed(1)) * 2 - 1
    cond = torch.tensor([5])
    errs = {}
    vec, age = theirs.encode(x)
    r = ours.encode(x)
    errs["embedding (flip TTA)"] = max_rel_err(r.embedding, vec)
    errs["age (flip TTA)"] = max_rel_err(r.age, age)
    latents = theirs.get_conditions(x, cond)
    f = ours.features(x)
    errs["latents"] = max_rel_err(ours.encoder.get_conditions(f.x_2, f.x_3, f.x_4, f.x_id, cond), latents)
    dec = theirs.decoder
    raw = dec.decoder([latents + dec.latent_avg], input_is_latent=True, randomize_noise=False)[0]
    errs["generator 128px (stored noise)"] = max_rel_err(
        ours.decoder.decoder(latents + ours.decoder.latent_avg, noise=ours.decoder.decoder.stored_noise()), raw)
    img = F.interpolate(raw, size=112, mode="bilinear", align_corners=True).clamp(-1, 1)
    errs["synthesize (stored noise)"] = max_rel_err(ours.synthesize(x, cond), img)
    torch.manual_seed(7)
    aged = theirs.aging(x, cond)  # the official call: fresh noise from the global RNG
    torch.manual_seed(7)
    errs["synthesize (random noise, same seed)"] = max_rel_err(ours.synthesize(x, cond, noise="random"), aged)
    print("max relative errors vs official:", {k: f"{v:.2e}" for k, v in errs.items()})
    bad = {k: v for k, v in errs.items() if v > TOL}
    assert not bad, f"max relative errors above {TOL}: {bad}"
