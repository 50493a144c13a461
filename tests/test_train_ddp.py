"""Two-process gloo DDP on CPU equals one process on the same global batch.

One process with ``grad_accum=2`` runs the global batch as two micro-batches, with batch-norm statistics
per micro-batch, exactly what two DDP processes without SyncBatchNorm compute (the official code has no
SyncBatchNorm either); dropout masks are seeded per shard, so both runs draw the same masks. AIFR
exercises ``DistributedDataParallel``, FAS the explicit gradient averaging of the GAN.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mtlface_fast.train import make_config, make_synthetic_dataset, train
from mtlface_fast.train.loop import build_model

BASE = dict(backbone="ir34", age_group=4, sigma=0.5, num_workers=0, progress=False, log_every=1, sample_every=0,
            save_every=0, num_iter=2)
RUNS = [("aifr", dict(input_size=32, lr=0.01, warmup_steps=0)), ("fas", dict(input_size=48))]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, data, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import warnings
    warnings.simplefilter("ignore")
    try:
        for recipe, extra in RUNS:
            train(make_config(recipe, dict(BASE, **extra, data=data, batch_size=2, device="cpu",
                                           output=os.path.join(out, recipe))))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore")
def test_two_process_gloo_equals_single_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    data = make_synthetic_dataset(str(tmp_path / "faces"), identities=4, images_per_identity=4, size=48, seed=3)
    mp.spawn(_worker, args=(2, _free_port(), data, str(tmp_path / "ddp")), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels as each DDP process runs
    try:
        for recipe, extra in RUNS:
            train(make_config(recipe, dict(BASE, **extra, data=data, batch_size=2, grad_accum=2, device="cpu",
                                           output=str(tmp_path / "single" / recipe))))
    finally:
        torch.set_num_threads(threads)
    worst = 0.0
    for recipe, extra in RUNS:
        init = build_model(make_config(recipe, dict(BASE, **extra, data=data))).state_dict()
        a = torch.load(tmp_path / "ddp" / recipe / "last.pt", map_location="cpu", weights_only=True)
        b = torch.load(tmp_path / "single" / recipe / "last.pt", map_location="cpu", weights_only=True)
        assert a["world_size"] == 2 and b["world_size"] == 1
        trained = 0
        for name, sd in b["modules"].items():
            for k, v in sd.items():
                # parameters only: running BN statistics are per process in DDP (rank 0's are saved)
                if not v.is_floating_point() or "running_" in k or "weight_u" in k or "weight_v" in k:
                    continue
                err = float((a["modules"][name][k] - v).abs().max() / v.abs().max().clamp_min(1e-12))
                worst = max(worst, err)
                assert err <= 1e-5, (recipe, name, k, err)
                trained += int(name == "model" and not torch.equal(init[k], v))
        assert trained > 0, recipe
    print(f"DDP (2 x gloo) vs one process: max relative parameter error {worst:.2e}")


def test_sync_bn_is_refused_on_cpu(tmp_path, capsys):
    # the device check comes before anything is read or built
    cfg = make_config("aifr", dict(BASE, input_size=32, data=str(tmp_path / "none.txt"), device="cpu", sync_bn=True,
                                   output=str(tmp_path / "out")))
    with pytest.raises(ValueError, match=r"--sync-bn: SyncBatchNorm .* cannot run on cpu"):
        train(cfg)
    from mtlface_fast.cli import main
    assert main(["train", "aifr", "--data", str(tmp_path / "none.txt"), "--device", "cpu", "--sync-bn"]) == 2
    assert "--sync-bn" in capsys.readouterr().err


def test_sync_bn_conversion_keeps_the_state_dict():
    from torch import nn
    from torch.nn.modules.batchnorm import _BatchNorm

    from mtlface_fast.train.loop import convert_sync_batchnorm
    from mtlface_fast.train.recipes import AIFRRecipe, StepContext
    cfg = make_config("joint", dict(BASE, input_size=48, data="unused.txt", sync_bn=True))
    fast = build_model(cfg)
    # the fused AFD and compact ICM compute batch statistics themselves: converting them would not sync
    with pytest.raises(ValueError, match="computes its batch statistics itself"):
        convert_sync_batchnorm(fast)
    model = build_model(cfg, sync_bn=True)
    model.load_state_dict(fast.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bns = {n: (type(m), m.momentum, m.eps) for n, m in model.named_modules() if isinstance(m, _BatchNorm)}
    assert len(bns) > 80 and {t for t, _, _ in bns.values()} == {nn.BatchNorm1d, nn.BatchNorm2d}
    convert_sync_batchnorm(model)
    synced = {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm)}
    assert set(synced) == set(bns)
    for n, m in synced.items():
        assert type(m) is nn.SyncBatchNorm and (m.momentum, m.eps) == bns[n][1:], n  # AFD keeps momentum 0.01
    after = model.state_dict()
    assert list(after) == list(before) == list(fast.state_dict())
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    # evaluation (running statistics) is unchanged by the conversion
    x = torch.randn(2, 3, 48, 48)
    fast.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), fast(x), rtol=1e-4, atol=1e-4)
    # the recipe converts its own heads before wrapping them
    ctx = StepContext(torch.device("cpu"), "none", 1, 0, 0.0, lambda step, shard: None, convert=convert_sync_batchnorm)
    recipe = AIFRRecipe(model, 4, cfg, ctx)
    heads = [m for m in recipe.da_discriminator.modules() if isinstance(m, _BatchNorm)]
    assert heads and all(type(m) is nn.SyncBatchNorm for m in heads)
