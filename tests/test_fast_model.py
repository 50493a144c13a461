"""The fast model against the reference: outputs, training steps, the inference fold cache, compile, NVTX."""
import copy

import pytest
import torch
import torch.nn.functional as F

import mtlface_fast
from mtlface_fast import reference as ref
from mtlface_fast.layers import FastBottleneckIR
from tests.utils import assert_close, max_rel_err, randomize_

SMALL = dict(backbone="ir34", input_size=32, age_group=7)


def _pair(**cfg):
    cfg = {**SMALL, **cfg}
    r = randomize_(ref.MTLFace(**cfg), seed=11)
    f = mtlface_fast.MTLFace(**cfg)
    f.load_state_dict(r.state_dict())
    return r, f


def _x(b=4, size=32, seed=1):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("afd", ["cvpr", "tpami"])
def test_eval_outputs_match_reference(afd):
    r, f = _pair(afd=afd)
    r.eval(), f.eval()
    x, g = _x(), torch.tensor([0, 6, 3, 3])
    with torch.no_grad():
        a, b = r.encode(x), f.encode(x)
        assert_close(F.normalize(b.embedding), F.normalize(a.embedding), name="embedding")
        assert_close(b.age, a.age, name="age")
        assert_close(b.x_id, a.x_id, name="x_id")
        assert_close(f.synthesize(x, g), r.synthesize(x, g), name="synthesize")
        expected = r.synthesize_all_ages(x)
        for per_call in (None, 1, 3, 7):
            assert_close(f.synthesize_all_ages(x, groups_per_call=per_call), expected, name=f"all ages {per_call}")
    with pytest.raises(ValueError, match="groups_per_call"):
        f.synthesize_all_ages(x, groups_per_call=0)


def _aifr_losses(model, x, ids, ages, steps, head, da):
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()) + list(da.parameters()), lr=2e-3,
                          momentum=0.9)
    losses = []
    groups = ref.age2group(ages, model.age_group)
    for step in range(steps):
        torch.manual_seed(100 + step)  # same dropout masks for both models
        opt.zero_grad()
        f = model.features(x)
        emb = model.backbone.output_layer(f.x_id)
        logits, glogits = model.estimation_network(f.x_age)
        dl, dg = da(ref.grad_reverse(f.x_id))
        loss = (F.cross_entropy(head(emb, ids), ids)
                + 0.001 * (F.mse_loss(ref.dex_age(logits), ages) + F.cross_entropy(glogits, groups))
                + 0.002 * (F.mse_loss(ref.dex_age(dl), ages) + F.cross_entropy(dg, groups)))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_five_training_steps_match_reference():
    r, f = _pair()
    r.train(), f.train()
    x, ids, ages = _x(6), torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([5.0, 15, 25, 35, 45, 70])
    torch.manual_seed(3)
    head, da = ref.CosFace(512, 3), randomize_(ref.AgeEstimationModule(32, 7), seed=4)
    head2, da2 = copy.deepcopy(head), copy.deepcopy(da)
    la = _aifr_losses(r, x, ids, ages, 5, head, da)
    lb = _aifr_losses(f, x, ids, ages, 5, head2, da2)
    assert la[-1] != la[0]
    for i, (a, b) in enumerate(zip(la, lb)):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), f"step {i}: loss {b} vs reference {a}"
    sd_r, sd_f = r.state_dict(), f.state_dict()
    for k in sd_r:
        if sd_r[k].is_floating_point():
            assert_close(sd_f[k], sd_r[k], name=k, rtol=1e-3)


def test_fold_cache_follows_weight_changes():
    torch.manual_seed(0)
    blk = randomize_(FastBottleneckIR(16, 32, 2), seed=2).eval()
    plain = ref.BottleneckIR(16, 32, 2)
    plain.load_state_dict(blk.state_dict())
    plain.eval()
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        assert_close(blk(x), plain(x), name="initial")
        for m in (blk, plain):  # in-place updates, as an optimizer or load_state_dict would make
            m.res_layer[5].running_var.mul_(3.0)
            m.shortcut_layer[1].weight.add_(0.5)
            m.res_layer[1].weight.mul_(-1)
        blk.weights_changed()  # edits by hand are announced (tracked events need no call)
        assert_close(blk(x), plain(x), name="after in-place change")
        blk.load_state_dict(randomize_(copy.deepcopy(plain), seed=9).state_dict())
        plain.load_state_dict(blk.state_dict())
        assert_close(blk(x), plain(x), name="after load_state_dict")
    # gradients reach the parameters in eval mode too (folding is differentiable)
    x.requires_grad_(True)
    blk(x).square().sum().backward()
    plain(x).square().sum().backward()
    for (n, p), q in zip(blk.named_parameters(), plain.parameters()):
        assert_close(p.grad, q.grad, name=n)
    assert_close(x.grad, x.grad, name="x")


def test_identity_shortcut_is_a_strided_view():
    blk = FastBottleneckIR(8, 8, 2).eval()
    x = torch.randn(1, 8, 7, 7)
    torch.testing.assert_close(blk._shortcut(x), torch.nn.functional.max_pool2d(x, 1, 2))


def test_compiles_without_graph_breaks():
    _, f = _pair()
    f.eval()
    x = _x(2)
    compiled = torch.compile(lambda t: f.encode(t).embedding, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert_close(compiled(x), f.encode(x).embedding, name="compiled embedding")


def test_model_compile_covers_every_entry_point():
    _, f = _pair()
    f.eval()
    x = _x(2)
    with torch.no_grad():
        eager = (f(x), f.encode(x).age, f.synthesize(x, 3), f.synthesize_all_ages(x))
        assert f.compile(backend="aot_eager") is f
        assert all(name in f.__dict__ for name in ("forward", "encode", "synthesize", "synthesize_all_ages"))
        compiled = (f(x), f.encode(x).age, f.synthesize(x, 3), f.synthesize_all_ages(x))
    for a, b, name in zip(compiled, eager, ("forward", "encode.age", "synthesize", "synthesize_all_ages")):
        assert_close(a, b, name=name)


def test_nvtx_ranges_do_not_change_results():
    from mtlface_fast import nvtx

    _, f = _pair()
    f.eval()
    x = _x(2)
    with torch.no_grad():
        plain = f.synthesize(x, 1)
        nvtx.enable(True)
        try:
            marked = f.synthesize(x, 1)
        finally:
            nvtx.enable(False)
    torch.testing.assert_close(marked, plain)


def test_dtype_keyword_runs_reduced_precision():
    r, f = _pair()
    r.eval(), f.eval()
    x = _x(2)
    # rule: off from the fp32 reference by at most ~2x what the reference run in bf16 is off (or 2e-2)
    with torch.no_grad():
        e32 = F.normalize(r.encode(x).embedding)
        with torch.autocast("cpu", torch.bfloat16):
            e_ref16 = F.normalize(r.encode(x).embedding.float())
            s_ref16 = r.synthesize(x, 2).float()
        e16 = f.encode(x, dtype=torch.bfloat16).embedding
        assert e16.dtype == torch.bfloat16
        limit = max(2e-2, 2 * max_rel_err(e_ref16, e32))
        assert_close(F.normalize(e16.float()), e32, name="bf16 embedding", rtol=limit)
        s32 = r.synthesize(x, 2)
        out = f.synthesize(x, 2, dtype=torch.bfloat16)
        assert_close(out.float(), s32, name="bf16 synthesize", rtol=max(2e-2, 2 * max_rel_err(s_ref16, s32)))
    with pytest.raises(ValueError, match="dtype"):
        f.encode(x, dtype=torch.int8)
