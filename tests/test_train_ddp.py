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
