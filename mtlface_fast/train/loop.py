"""The training loop: process group, model, data, recipe, progress, metrics, samples and checkpoints.

Run it as ``mtlface-fast train RECIPE ...`` (one process) or ``torchrun --nproc_per_node N -m mtlface_fast
train RECIPE ...`` (DDP: NCCL on CUDA, gloo on CPU). ``--batch-size`` is per process; a step's global
batch is ``batch_size * grad_accum * world_size``. Every random draw of a step (dropout masks) is seeded
from (seed, step, shard), where the shard is the micro-batch's place in the global batch, so a run is
reproducible on CPU, a resumed run continues exactly, and one process with ``--grad-accum N`` computes the
same step as N processes (with batch-norm statistics per micro-batch / per process, as DDP without
SyncBatchNorm does).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from typing import Any, Dict, List

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoint import load_state_dict_strict
from ..errors import TrainingDivergedError
from .config import TrainConfig
from .data import FaceDataset, FaceList, StepSampler, balance_weights, load_image, make_loader, read_list_file
from .recipes import build_recipe
from .state import LAST, find_resume, load_checkpoint, prune, restore, save_checkpoint, set_rng_state

METRICS_FILE = "metrics.jsonl"


# -- process group and device ------------------------------------------------------------------------------
def setup_distributed(cfg: TrainConfig):
    """(world, rank, device); joins the process group that ``torchrun`` describes in the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {cfg.device!r} asked for CUDA, but CUDA is not available")
        torch.cuda.set_device(device)
    check_sync_bn(cfg.sync_bn, device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, rank, device


def check_sync_bn(sync_bn: bool, device: torch.device) -> None:
    """``--sync-bn`` needs CUDA: SyncBatchNorm gathers batch statistics with CUDA collectives."""
    if sync_bn and device.type != "cuda":
        raise ValueError(f"--sync-bn: SyncBatchNorm gathers batch statistics across processes with CUDA "
                         f"collectives and cannot run on {device.type}; drop --sync-bn (each process then "
                         f"normalizes with its own batch statistics, as the official code does)")


def convert_sync_batchnorm(*modules: torch.nn.Module) -> None:
    """Every BatchNorm of ``modules`` becomes a SyncBatchNorm in place: same parameter and buffer tensors,
    same state-dict keys. Modules that compute batch statistics themselves (the fused AFD, the compact
    ICM) would bypass the synchronization, so they are refused: :func:`build_model` with ``sync_bn``
    builds the model with the reference AFD and ICM instead."""
    from .. import layers
    own_stats = tuple(c for c in (getattr(layers, "FusedAttentionModule", None), getattr(layers, "CompactICM", None))
                      if c is not None)
    for module in modules:
        bad = [n for n, m in module.named_modules() if isinstance(m, own_stats)]
        if bad:
            raise ValueError(f"--sync-bn: {bad[0]!r} ({type(module.get_submodule(bad[0])).__name__}) computes its "
                             f"batch statistics itself; build the model with build_model(cfg, sync_bn=True)")
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            raise ValueError("--sync-bn: convert the module that holds the BatchNorm, not the BatchNorm itself")
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)  # children are replaced in place


# -- model ------------------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig, sync_bn: bool = False):
    """The model to train (seeded by ``cfg.seed``). ``sync_bn``: the fast model keeps its trunk units (their
    training forward calls the BatchNorm modules) but takes the reference AFD and ICM, whose BatchNorm
    modules a SyncBatchNorm conversion can replace; the state dict is the same either way."""
    from .. import MTLFace, reference
    from ..reference.afd import AttentionModule
    from ..reference.icm import AgingModule
    cls = reference.MTLFace if cfg.reference else MTLFace
    layers = dict(attention_layer=AttentionModule, generator_layer=AgingModule) if sync_bn else {}
    torch.manual_seed(cfg.seed)
    return cls(cfg.backbone, cfg.input_size, cfg.age_group, cfg.afd, cfg.sigma, **layers)


def load_init(model, path: str) -> Dict[str, Dict[str, torch.Tensor]]:
    """Weights from a save_pretrained folder or a training checkpoint; returns the checkpoint's other modules."""
    if os.path.isdir(path):
        from ..checkpoint import load_safetensors
        from ..reference.model import WEIGHTS_FILE
        w = os.path.join(path, WEIGHTS_FILE)
        if not os.path.isfile(w):
            raise FileNotFoundError(f"init: {w} not found (expected a folder written by save_pretrained)")
        load_state_dict_strict(model, load_safetensors(w, "init weights"), what=f"init {w}")
        return {}
    ckpt = load_checkpoint(path)
    load_state_dict_strict(model, ckpt["modules"]["model"], what=f"init {path} [model]")
    return {k: v for k, v in ckpt["modules"].items() if k != "model"}


# -- progress ---------------------------------------------------------------------------------------------
class Logger:
    """JSONL metrics, a tqdm bar and TensorBoard (when asked for and installed); rank 0 only."""

    def __init__(self, cfg: TrainConfig, active: bool, start: int):
        self.active, self.every = active, max(1, cfg.log_every)
        self.bar = self.tb = self.fh = None
        if not active:
            return
        os.makedirs(cfg.output, exist_ok=True)
        self.fh = open(os.path.join(cfg.output, METRICS_FILE), "a")
        if cfg.progress:
            from tqdm import tqdm
            self.bar = tqdm(total=cfg.num_iter, initial=start, desc=f"train {cfg.recipe}", dynamic_ncols=True)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(cfg.output, "tensorboard"))
            except ImportError:
                warnings.warn("tensorboard: the tensorboard package is not installed; logging to JSONL only")

    def log(self, step: int, logs: Dict[str, float]):
        if not self.active:
            return
        if self.bar is not None:
            self.bar.update(1)
        if step % self.every and step != 1:
            return
        self.fh.write(json.dumps(dict(step=step, **{k: round(v, 6) for k, v in logs.items()})) + "\n")
        self.fh.flush()
        if self.bar is not None:
            keys = [k for k in ("loss", "id_loss", "d_loss", "g_loss", "images_per_s") if k in logs]
            self.bar.set_postfix({k: f"{logs[k]:.3g}" for k in keys})
        if self.tb is not None:
            for k, v in logs.items():
                self.tb.add_scalar(k, v, step)

    def close(self):
        for obj in (self.bar, self.tb, self.fh):
            if obj is not None:
                obj.close()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(..., 3, H, W) in [-1, 1] -> (..., H, W, 3) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


@torch.no_grad()
def save_age_grid(model, sources: torch.Tensor, path: str) -> str:
    """PNG grid: one row per face, the source then every age group."""
    from PIL import Image
    from ..checkpoint import atomic_write
    was = model.training
    model.eval()
    try:
        ages = model.synthesize_all_ages(sources)
    finally:
        model.train(was)
    rows = torch.cat([sources[:, None], ages], dim=1)
    tiles = to_uint8(rows)
    b, n, h, w, _ = tiles.shape
    grid = tiles.transpose(0, 2, 1, 3, 4).reshape(b * h, n * w, 3)
    atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
    return path


# -- main entry -------------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Train ``cfg.recipe``; returns ``dict(step, output, history, skipped_images, skipped_rows)``.

    ``history`` holds every step's logged values on rank 0 (losses, lr, images/s).
    """
    cfg.validate()
    world, rank, device = setup_distributed(cfg)
    main = rank == 0
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2 ** 32)

    faces = read_list_file(cfg.data, cfg.root, verbose=main)
    sync_bn = cfg.sync_bn and world > 1  # one process: its batch statistics are already the global ones
    model = build_model(cfg, sync_bn)
    extra: Dict[str, Dict[str, torch.Tensor]] = {}
    if cfg.init:
        extra = load_init(model, cfg.init)
    elif cfg.recipe in ("fas", "finetune") and not cfg.resume:
        if cfg.recipe == "finetune":
            raise ValueError("init: the finetune recipe needs a trained model (--init CHECKPOINT_OR_FOLDER)")
        warnings.warn("init: FAS without --init trains the generator against an untrained backbone and "
                      "estimator (the official recipe loads pretrained ones)")
    model.to(device)

    if cfg.recipe == "finetune":
        from .finetune import build_synthetic_set
        synth_dir = cfg.synth_dir or os.path.join(cfg.output, "synthetic")
        reuse = cfg.resume and os.path.isfile(os.path.join(synth_dir, "list.txt"))
        if main and not reuse:  # a resumed run keeps the set it selected before
            build_synthetic_set(model, faces, cfg, device, synth_dir)
        if world > 1:
            dist.barrier()
        synth = read_list_file(os.path.join(synth_dir, "list.txt"), synth_dir, verbose=main)
        faces = merge_lists(faces, synth)

    if sync_bn:
        convert_sync_batchnorm(model)

    recipe = build_recipe(cfg, model, faces.num_classes, device, world, rank,
                          convert=convert_sync_batchnorm if sync_bn else None)
    modules = dict(model=model, **recipe.modules())
    for name, state in extra.items():  # heads of an init checkpoint, when they fit
        if name in modules and all(state[k].shape == v.shape for k, v in modules[name].state_dict().items()
                                   if k in state) and set(state) == set(modules[name].state_dict()):
            modules[name].load_state_dict(state)
    stateful = recipe.state()

    start = 0
    resume = find_resume(cfg.resume, cfg.output)
    if resume:
        ckpt = load_checkpoint(resume)
        if ckpt.get("recipe") != cfg.recipe:
            raise ValueError(f"resume: {resume} is a {ckpt.get('recipe')!r} checkpoint, not {cfg.recipe!r}")
        old = ckpt.get("config", {})
        old_gb = old.get("batch_size", 0) * old.get("grad_accum", 1) * ckpt.get("world_size", 1)
        new_gb = cfg.batch_size * cfg.grad_accum * world
        if old_gb != new_gb:
            warnings.warn(f"resume: global batch {new_gb} differs from the checkpoint's {old_gb}; the data order "
                          "will not continue exactly")
        restore(ckpt, modules, stateful, f"resume {resume}")
        set_rng_state(ckpt["rng"])
        start = int(ckpt["step"])
        if main:
            print(f"resumed from {resume} at step {start}", file=sys.stderr)

    fas = cfg.recipe in ("fas", "joint")
    dataset = FaceDataset(faces, cfg.input_size, cfg.age_group, flip=cfg.flip, seed=cfg.seed, with_targets=fas)
    per_rank = cfg.batch_size * cfg.grad_accum
    sampler = StepSampler(len(faces), per_rank, cfg.num_iter, world_size=world, rank=rank, start_step=start,
                          seed=cfg.seed, weights=balance_weights(faces, cfg.balance, cfg.age_group))
    loader = make_loader(dataset, sampler, per_rank, cfg.num_workers, pin_memory=device.type == "cuda")
    sources = None
    if fas and main and cfg.sample_every:
        sources = torch.stack([load_image(p, cfg.input_size, False) for p in faces.paths[:4]]).to(device)

    logger = Logger(cfg, main, start)
    history: List[Dict[str, float]] = []
    skipped = torch.zeros((), dtype=torch.long)
    step = start
    ckpt_dir = os.path.join(cfg.output, "checkpoints")

    def checkpoint(step):
        if not main:
            return
        common = dict(step=step, recipe=cfg.recipe, config=cfg.to_dict(), classes=faces.classes, world_size=world,
                      modules=modules, stateful=stateful)
        if cfg.save_every and step % cfg.save_every == 0:
            save_checkpoint(os.path.join(ckpt_dir, f"step_{step:08d}.pt"), **common)
            prune(ckpt_dir, cfg.keep_checkpoints)
        save_checkpoint(os.path.join(cfg.output, LAST), **common)

    try:
        tick = time.perf_counter()
        for batch in loader:
            if step >= cfg.num_iter:
                break
            skipped += batch.pop("skipped").sum()
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            logs = recipe.step(batch, step)
            step += 1
            now = time.perf_counter()
            logs["images_per_s"] = per_rank * world / max(now - tick, 1e-9)
            tick = now
            if cfg.amp != "fp16":  # fp16: the gradient scaler skips overflowing steps
                for key in ("loss", "d_loss", "g_loss"):
                    if key in logs and not math.isfinite(logs[key]):
                        raise TrainingDivergedError(f"step {step}: {key} is {logs[key]} (lower the learning rate, "
                                                    f"or use --clip-grad)")
            if main:
                history.append(dict(step=step, **logs))
            logger.log(step, logs)
            if sources is not None and step % cfg.sample_every == 0:
                save_age_grid(model, sources, os.path.join(cfg.output, "samples", f"step_{step:08d}.png"))
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.num_iter:
                checkpoint(step)
        checkpoint(step)
        if main:
            model.save_pretrained(os.path.join(cfg.output, "final"))
    finally:
        logger.close()
    if world > 1:
        dist.all_reduce(skipped)
    if main and int(skipped):
        print(f"warning: {int(skipped)} corrupt image read(s) were skipped (see the warnings above)",
              file=sys.stderr)
    if main and faces.skipped:
        print(f"warning: {len(faces.skipped)} list row(s) were skipped (see the warnings above)", file=sys.stderr)
    return dict(step=step, output=cfg.output, history=history, skipped_images=int(skipped),
                skipped_rows=len(faces.skipped))


def merge_lists(real: FaceList, synth: FaceList) -> FaceList:
    """Real + synthetic rows; synthetic identities must be identities of the real list."""
    index = {c: i for i, c in enumerate(real.classes)}
    unknown = sorted(set(synth.classes) - set(index))
    if unknown:
        raise ValueError(f"synthetic list has identities not in the training list: {unknown[:10]}")
    labels = np.asarray([index[synth.classes[i]] for i in synth.labels], dtype=np.int64)
    return FaceList(real.paths + synth.paths, np.concatenate([real.labels, labels]),
                    np.concatenate([real.ages, synth.ages]), np.concatenate([real.genders, synth.genders]),
                    list(real.classes), real.skipped + synth.skipped, real.where + synth.where)
