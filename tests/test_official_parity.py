"""The reference against the official code, same randomized weights, every returned tensor (fp32, max rel err 1e-5).

The official code is never part of this repository. Point OFFICIAL_MTLFACE at an exported copy of the
public Hzzone/MTLFace repository to run these tests; they skip otherwise.
"""
import copy
import importlib.util
import os

import pytest
import torch

from mtlface_fast import reference as ref
from tests.utils import max_rel_err, randomize_

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFICIAL = os.path.expanduser(os.environ.get("OFFICIAL_MTLFACE", ""))
LOADER = os.path.join(os.path.dirname(ROOT), "shared", "tools", "official_mtlface.py")

pytestmark = pytest.mark.skipif(
    not (OFFICIAL and os.path.isdir(os.path.join(OFFICIAL, "backbone")) and os.path.isfile(LOADER)),
    reason="set OFFICIAL_MTLFACE to an exported copy of the official MTLFace code to compare against it")

TOL = 1e-5


@pytest.fixture(scope="module")
def official():
    spec = importlib.util.spec_from_file_location("official_mtlface_loader", LOADER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.load(OFFICIAL)


def _pair(theirs, ours, seed):
    randomize_(theirs, seed=seed)
    state = theirs.state_dict()
    assert list(state) == list(ours.state_dict()), "state-dict keys (and order) differ from the official ones"
    ours.load_state_dict(state, strict=True)
    return theirs, ours


def _compare(a, b, names):
    errs = {}
    for name, x, y in zip(names, a, b):
        assert x.shape == y.shape, name
        errs[name] = max_rel_err(y, x)
    bad = {k: v for k, v in errs.items() if v > TOL}
    assert not bad, f"max relative errors above {TOL}: {bad}"
    return errs


@pytest.mark.parametrize("name", ["ir34", "ir50", "irse101"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_backbone(official, name, mode):
    torch.manual_seed(0)
    theirs, ours = _pair(official.backbone_dict[name](112), ref.AIResNet(112, name, "cvpr"), seed=1)
    x = torch.randn(3, 3, 112, 112)
    getattr(theirs, mode)(), getattr(ours, mode)()
    with torch.no_grad():
        torch.manual_seed(5)
        a = theirs(x, return_shortcuts=True) + (theirs(x),)
        torch.manual_seed(5)
        b = ours(x, return_shortcuts=True) + (ours(x),)
    _compare(a, b, ["x_1", "x_2", "x_3", "x_4", "x_5", "x_id", "x_age", "embedding"])
    if mode == "train":  # running statistics moved identically
        for (k, v), (k2, v2) in zip(theirs.state_dict().items(), ours.state_dict().items()):
            assert k == k2 and max_rel_err(v2.float(), v.float()) <= TOL, k


@pytest.mark.parametrize("variant", ["cvpr", "tpami"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_afd(official, variant, mode):
    cls = official.AttentionModule if variant == "cvpr" else official.TpamiAttentionModule
    theirs, ours = _pair(cls(), ref.AttentionModule(variant=variant), seed=2)
    getattr(theirs, mode)(), getattr(ours, mode)()
    x = torch.randn(4, 512, 7, 7) * 2
    a, b = theirs(x), ours(x)
    _compare(a, b, ["x_id", "x_age"])
    grads = []
    for m, out in ((theirs, a), (ours, b)):
        (out[0].square().mean() + 3 * out[1].sin().mean()).backward()
        grads.append([p.grad for p in m.parameters()])
    _compare(grads[0], grads[1], [n for n, _ in ours.named_parameters()])


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_estimation_and_dex(official, mode):
    theirs, ours = _pair(official.AgeEstimationModule(112, 7), ref.AgeEstimationModule(112, 7), seed=3)
    getattr(theirs, mode)(), getattr(ours, mode)()
    x = torch.randn(4, 512, 7, 7)
    a, b = theirs(x), ours(x)
    _compare(a, b, ["age_logits", "group_logits"])
    expected = (torch.softmax(a[0], 1) * torch.arange(101).float()).sum(1)
    assert max_rel_err(ref.dex_age(b[0]), expected) <= TOL


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("age_group", [4, 7, 8])
def test_generator(official, mode, age_group):
    theirs, ours = _pair(official.AgingModule(age_group), ref.AgingModule(age_group, 4, 0.1), seed=4)
    getattr(theirs, mode)(), getattr(ours, mode)()
    B = 5
    img = torch.randn(B, 3, 112, 112)
    feats = [torch.randn(B, 64, 112, 112), torch.randn(B, 64, 56, 56), torch.randn(B, 128, 28, 28),
             torch.randn(B, 256, 14, 14), torch.randn(B, 512, 7, 7), torch.randn(B, 512, 7, 7),
             torch.randn(B, 512, 7, 7)]
    cond = torch.randint(0, age_group, (B,))
    a = theirs(img, *feats, cond)
    b = ours(img, *feats, cond)
    _compare([a], [b], ["image"])
    a.square().mean().backward()
    b.square().mean().backward()
    _compare([p.grad for p in theirs.parameters()], [p.grad for p in ours.parameters()],
             [n for n, _ in ours.named_parameters()])


def test_discriminator_and_cosface(official):
    torch.manual_seed(0)
    theirs = official.PatchDiscriminator(7, norm_layer="sn", repeat_num=4)
    ours = ref.PatchDiscriminator(7, repeat_num=4)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()), strict=True)
    x, cond = torch.randn(3, 3, 112, 112), torch.randint(0, 7, (3,))
    theirs.eval(), ours.eval()  # spectral norm: no power iteration in eval, same weights
    _compare([theirs(x, cond)], [ours(x, cond)], ["patch_logits"])

    head_t = official.CosFace(512, 11)
    head_o = ref.CosFace(512, 11)
    head_o.load_state_dict(head_t.state_dict())
    emb, label = torch.randn(6, 512), torch.randint(0, 11, (6,))
    _compare([head_t(emb, label)], [head_o(emb, label)], ["cosface_logits"])


@pytest.mark.parametrize("age_group", [4, 5, 6, 7, 8])
def test_router_buffers(official, age_group):
    theirs = official.TaskRouter(128, age_group, 0.1)
    ours = ref.TaskRouter(128, age_group, 0.1)
    assert torch.equal(theirs._unit_mapping, ours._unit_mapping)
