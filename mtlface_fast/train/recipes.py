"""Losses and optimisation steps of the official recipes: AIFR, FAS and both alternating (joint).

Official facts (``MTLFACE.md`` section 7) and where this code departs from the released loop:

* AIFR: ``id = CE(CosFace(emb, y), y)``; ``age(x) = MSE(DEX(age_logits), age) + CE(group_logits, group)``
  on the estimator over ``x_age`` and, through a gradient-reversal layer, on the domain-adaptation head
  over ``x_id``; ``total = id + 0.001 age + 0.002 da``. One SGD (momentum 0.9) over backbone, CosFace,
  estimator and DA head. Weight decay 5e-4 on Conv/Linear/PReLU/CosFace weights, never on BN, biases or
  the DA head (official ``apply_weight_decay(..., wo_bn=True)``); here it is an SGD parameter group, which
  also keeps it right under fp16 loss scaling (the released code adds it to the scaled gradient). The
  warm-up + milestone schedule the official code defines (and never calls) is applied.
* FAS: the backbone and the estimator are frozen (eval); D (one call on real and generated faces
  together, so one spectral-norm power iteration per D step where the released code does two) minimizes
  ``0.5 [(D(real, t) - 1)^2 + D(G(x, t), t)^2]``; G minimizes ``75 gan + 0.002 MSE(x_id, x_id(G)) +
  10 CE(group_logits(G), t)`` (+ an optional L1 reconstruction at the source's own group, weight 0 by
  default as in the released code). Adam (1e-4, betas 0.5/0.99) for each. The released code leaves the
  estimator in train mode, so its BN statistics drift towards generated faces; here it stays in eval.
* Joint: an AIFR step then a FAS step on the same source batch (official order); the FAS gradients do
  not update the backbone, as in the released code.

Multi-process: the recognition network is wrapped in ``DistributedDataParallel``; the GAN's several
forwards per step (D on real and fake, G's adversarial pass through D) do not fit DDP's one-forward /
one-backward contract, so its gradients are averaged across processes explicitly before each step.
Both give every process the mean gradient of the global batch.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..precision import autocast
from ..reference.heads import AgeEstimationModule, CosFace, age2group, dex_age, grad_reverse
from ..reference.icm import PatchDiscriminator


def amp_dtype(amp: str) -> Optional[str]:
    """The :func:`~mtlface_fast.precision.autocast` dtype of a ``--amp`` mode: None for ``none``."""
    return None if amp == "none" else amp


def make_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(device.type, enabled=(amp == "fp16"))


@contextlib.contextmanager
def frozen(*modules: nn.Module):
    """Parameters of ``modules`` do not require grad inside the block (gradients still flow to inputs)."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def age_loss(age_logits: torch.Tensor, group_logits: torch.Tensor, ages: torch.Tensor, groups: torch.Tensor):
    """Official age loss: MSE of the DEX expected age (years) + CE of the group logits."""
    return F.mse_loss(dex_age(age_logits), ages.float()) + F.cross_entropy(group_logits.float(), groups)


def lsgan_loss(logits: torch.Tensor, target: float) -> torch.Tensor:
    return ((logits.float() - target) ** 2).mean()


def decay_groups(decayed: Sequence[nn.Module], others: Sequence[nn.Module], weight_decay: float):
    """SGD parameter groups: ``weight`` of every non-BN module of ``decayed`` with decay; the rest without."""
    decay, seen = [], set()
    for root in decayed:
        for m in root.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                continue
            w = m._parameters.get("weight")
            if w is not None and w.requires_grad and id(w) not in seen:
                seen.add(id(w))
                decay.append(w)
    rest = [p for root in list(decayed) + list(others) for p in root.parameters()
            if p.requires_grad and id(p) not in seen]
    rest = list({id(p): p for p in rest}.values())
    return [dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0.0)]


def warmup_milestone_lambda(warmup: int, milestones: Sequence[int], gamma: float, base_lr: float,
                            min_lr: float) -> Callable[[int], float]:
    """Official ``adjust_learning_rate`` as a LambdaLR factor of step index ``s`` (0-based, step s+1 runs)."""
    def factor(s: int) -> float:
        step = s + 1
        if warmup > 0 and step <= warmup:
            lr = base_lr * step / warmup
        else:
            lr = base_lr * gamma ** sum(1 for m in milestones if m < step)
        return max(lr, min_lr) / base_lr
    return factor


def all_reduce_grads(params: Iterable[torch.nn.Parameter], world: int) -> None:
    """Average gradients across processes (one flat buffer per dtype/device)."""
    if world <= 1:
        return
    buckets: Dict = {}
    for p in params:
        if p.grad is not None:
            buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n


def shard_seeder(seed: int) -> Callable[[int, int], None]:
    """``seed_shard(step, shard)``: seeds torch's RNG (dropout) for one micro-batch of one step, from the run's
    seed, so a step is the same whatever the number of processes and wherever a run resumes."""
    def seed_shard(step: int, shard: int) -> None:
        torch.manual_seed(((int(seed) * 1_000_003 + int(step)) * 10_007 + int(shard)) % (2 ** 63 - 1))
    return seed_shard


class StepContext:
    """What a recipe step needs from the loop: device, precision, process group, per-shard seeding."""

    def __init__(self, device: torch.device, amp: str, world: int, rank: int, clip_grad: float,
                 seed_shard: Callable[[int, int], None], convert: Optional[Callable[[nn.Module], None]] = None):
        self.device, self.amp, self.world, self.rank = device, amp, world, rank
        self.clip_grad, self.seed_shard = clip_grad, seed_shard
        self.convert = convert  # applied to the recipe's own modules before DDP wraps them (--sync-bn)


class AIFRNet(nn.Module):
    """Backbone, estimator, CosFace and DA head as one module (what DDP wraps); forward returns the losses."""

    def __init__(self, model: nn.Module, head: CosFace, da_discriminator: AgeEstimationModule, *,
                 age_weight: float, da_weight: float, grl_coeff: float, amp: str):
        super().__init__()
        object.__setattr__(self, "model", model)  # not registered: the generator is not part of this net
        self.backbone, self.estimation_network = model.backbone, model.estimation_network
        self.head, self.da_discriminator = head, da_discriminator
        self.age_weight, self.da_weight, self.grl_coeff, self.amp = age_weight, da_weight, grl_coeff, amp

    def forward(self, images, labels, ages):
        with autocast(images.device, amp_dtype(self.amp)):
            f = self.model.features(images)
            embedding = self.backbone.output_layer(f.x_id)
        # Official: only the backbone runs under autocast; its outputs go to the heads in fp32.
        embedding, x_id, x_age = embedding.float(), f.x_id.float(), f.x_age.float()
        groups = age2group(ages, self.model.age_group)
        id_loss = F.cross_entropy(self.head(embedding, labels), labels)
        age = age_loss(*self.estimation_network(x_age), ages, groups)
        da = age_loss(*self.da_discriminator(grad_reverse(x_id, self.grl_coeff)), ages, groups)
        total = id_loss + self.age_weight * age + self.da_weight * da
        return total, dict(id_loss=id_loss.detach(), age_loss=age.detach(), da_loss=da.detach(),
                           x_id_rms=x_id.detach().square().mean().sqrt())


def _split(batch: Dict[str, torch.Tensor], parts: int) -> List[Dict[str, torch.Tensor]]:
    """Micro-batch j takes rows j, j+parts, ... (the same interleaving as the sampler's rank split)."""
    return [{k: v[j::parts] for k, v in batch.items()} for j in range(parts)]


class AIFRRecipe:
    """One SGD step of the AIFR objective over ``grad_accum`` micro-batches: :meth:`step` (forward, losses,
    backward, optimizer and schedule step) is what the training loop runs and what ``mtlface-fast bench``
    times as ``train_step``."""

    def __init__(self, model: nn.Module, num_classes: int, cfg, ctx: StepContext):
        self.model, self.cfg, self.ctx = model, cfg, ctx
        dev = ctx.device
        self.head = CosFace(512, num_classes, cfg.cosface_s, cfg.cosface_m).to(dev)
        self.da_discriminator = AgeEstimationModule(cfg.input_size, cfg.age_group).to(dev)
        if ctx.convert is not None:
            ctx.convert(self.da_discriminator)
        self.net = AIFRNet(model, self.head, self.da_discriminator, age_weight=cfg.age_loss_weight,
                           da_weight=cfg.da_loss_weight, grl_coeff=cfg.grl_coeff, amp=cfg.amp)
        self.ddp = self.net
        if ctx.world > 1:
            ids = [dev.index] if dev.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.net, device_ids=ids)
        groups = decay_groups([model.backbone, self.head, model.estimation_network], [self.da_discriminator],
                              cfg.weight_decay)
        self.optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_milestone_lambda(cfg.warmup_steps, cfg.milestones, cfg.gamma, cfg.lr, cfg.min_lr))
        self.scaler = make_scaler(dev, cfg.amp)

    def modules(self) -> Dict[str, nn.Module]:
        return dict(head=self.head, da_discriminator=self.da_discriminator)

    def state(self):
        return dict(optimizers=dict(fr=self.optimizer), schedulers=dict(fr=self.scheduler),
                    scalers=dict(fr=self.scaler))

    def train_mode(self):
        self.net.train()

    def step(self, batch: Dict[str, torch.Tensor], step: int) -> Dict[str, float]:
        cfg, ctx = self.cfg, self.ctx
        self.train_mode()
        self.optimizer.zero_grad(set_to_none=True)
        micros = _split(batch, cfg.grad_accum)
        logs: Dict[str, float] = {}
        for j, mb in enumerate(micros):
            ctx.seed_shard(step, ctx.rank + ctx.world * j)
            sync = j == len(micros) - 1 or not isinstance(self.ddp, nn.parallel.DistributedDataParallel)
            with (contextlib.nullcontext() if sync else self.ddp.no_sync()):
                total, parts = self.ddp(mb["image"], mb["label"], mb["age"])
                self.scaler.scale(total / len(micros)).backward()
            for k, v in dict(loss=total.detach(), **parts).items():
                logs[k] = logs.get(k, 0.0) + float(v) / len(micros)
        self.scaler.unscale_(self.optimizer)
        if ctx.clip_grad > 0:
            logs["grad_norm"] = float(nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], ctx.clip_grad))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        logs["lr"] = self.optimizer.param_groups[0]["lr"]
        return logs


class FASRecipe:
    """One discriminator step then one generator step (official order) over ``grad_accum`` micro-batches."""

    def __init__(self, model: nn.Module, cfg, ctx: StepContext, *, train_backbone: bool = False):
        self.model, self.cfg, self.ctx = model, cfg, ctx
        dev = ctx.device
        self.discriminator = PatchDiscriminator(cfg.age_group, 64, 4).to(dev)
        self.generator = model.generator
        if not train_backbone:  # FAS alone: recognition networks are fixed feature extractors
            for p in list(model.backbone.parameters()) + list(model.estimation_network.parameters()):
                p.requires_grad_(False)
        betas = tuple(cfg.betas)
        self.g_optimizer = torch.optim.Adam(self.generator.parameters(), lr=cfg.g_lr, betas=betas)
        self.d_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=cfg.d_lr, betas=betas)
        self.g_scaler, self.d_scaler = make_scaler(dev, cfg.amp), make_scaler(dev, cfg.amp)
        if ctx.world > 1:  # same initial weights on every process
            for m in (self.generator, self.discriminator):
                for t in list(m.parameters()) + list(m.buffers()):
                    dist.broadcast(t.data, 0)

    def modules(self) -> Dict[str, nn.Module]:
        return dict(discriminator=self.discriminator)

    def state(self):
        return dict(optimizers=dict(g=self.g_optimizer, d=self.d_optimizer),
                    scalers=dict(g=self.g_scaler, d=self.d_scaler))

    def _discriminate(self, images, groups, micro: int):
        """D on one micro-batch. Spectral norm's power iteration runs once per phase (on the first
        micro-batch); later micro-batches reuse its vectors, as every DDP process does for its own shard."""
        if micro == 0:
            return self.discriminator(images, groups)
        self.discriminator.eval()
        try:
            return self.discriminator(images, groups)
        finally:
            self.discriminator.train()

    def _finish(self, optimizer, scaler, params, logs, name):
        all_reduce_grads(params, self.ctx.world)
        scaler.unscale_(optimizer)
        if self.ctx.clip_grad > 0:
            logs[f"{name}_grad_norm"] = float(nn.utils.clip_grad_norm_(params, self.ctx.clip_grad))
        scaler.step(optimizer)
        scaler.update()

    def step(self, batch: Dict[str, torch.Tensor], step: int) -> Dict[str, float]:
        cfg, ctx, model = self.cfg, self.ctx, self.model
        model.backbone.eval()
        model.estimation_network.eval()
        self.generator.train()
        self.discriminator.train()
        micros = _split(batch, cfg.grad_accum)
        n = len(micros)
        logs: Dict[str, float] = {}

        def add(k, v):
            logs[k] = logs.get(k, 0.0) + float(v) / n

        # Discriminator: real targets vs generated faces (generator graphs kept for the G step).
        self.d_optimizer.zero_grad(set_to_none=True)
        cache = []
        for j, mb in enumerate(micros):
            ctx.seed_shard(step, ctx.rank + ctx.world * j)
            src, t = mb["image"], mb["target_group"]
            with torch.no_grad(), autocast(ctx.device, amp_dtype(cfg.amp)):
                f = model.features(src)
            with autocast(ctx.device, amp_dtype(cfg.amp)):
                fake = model._generate(src, f, t).float()
                logits = self._discriminate(torch.cat([mb["target_image"], fake.detach()]), torch.cat([t, t]), j)
                real_logits, fake_logits = logits.chunk(2)
                d_loss = 0.5 * (lsgan_loss(real_logits, 1.0) + lsgan_loss(fake_logits, 0.0))
            self.d_scaler.scale(d_loss / n).backward()
            add("d_loss", d_loss.detach())
            add("src_x_id_rms", f.x_id.detach().float().square().mean().sqrt())
            cache.append((f, fake))
        self._finish(self.d_optimizer, self.d_scaler, list(self.discriminator.parameters()), logs, "d")

        # Generator: fool the updated D, keep the identity features, land in the target group.
        self.g_optimizer.zero_grad(set_to_none=True)
        with frozen(self.discriminator, model.backbone, model.estimation_network):
            for j, (mb, (f, fake)) in enumerate(zip(micros, cache)):
                src, t = mb["image"], mb["target_group"]
                with autocast(ctx.device, amp_dtype(cfg.amp)):
                    gan = 0.5 * lsgan_loss(self._discriminate(fake, t, j), 1.0)
                    gf = model.features(fake)
                    id_l = F.mse_loss(gf.x_id.float(), f.x_id.float())
                    _, group_logits = model.estimation_network(gf.x_age)
                    age_l = F.cross_entropy(group_logits.float(), t)
                    g_loss = cfg.gan_weight * gan + cfg.id_weight * id_l + cfg.age_weight * age_l
                    if cfg.rec_weight > 0:
                        own = age2group(mb["age"], model.age_group)
                        rec = F.l1_loss(model._generate(src, f, own).float(), src)
                        g_loss = g_loss + cfg.rec_weight * rec
                        add("rec_loss", rec.detach())
                self.g_scaler.scale(g_loss / n).backward()
                add("g_loss", g_loss.detach())
                add("gan_loss", gan.detach())
                add("gid_loss", id_l.detach())
                add("gage_loss", age_l.detach())
        self._finish(self.g_optimizer, self.g_scaler, list(self.generator.parameters()), logs, "g")
        return logs


class JointRecipe:
    """Official joint training: an AIFR step, then a FAS step on the same source batch.

    The FAS half runs the backbone in eval mode (official), i.e. on BatchNorm running statistics, right after
    the SGD step of the AIFR half moved its weights. When the weights move faster than the running
    averages follow (a high learning rate without warm-up, from scratch), the error compounds over the
    residual units and the FAS half sees amplified features; its identity (MSE on x_id) and age losses
    then blow up. ``x_id_eval_ratio`` (RMS of x_id in the FAS half over the AIFR half's, same batch) measures
    it, and a warning is given once when it exceeds :attr:`LAG_WARN`.
    """

    LAG_WARN = 10.0

    def __init__(self, model: nn.Module, num_classes: int, cfg, ctx: StepContext):
        self.aifr = AIFRRecipe(model, num_classes, cfg, ctx)
        self.fas = FASRecipe(model, cfg, ctx, train_backbone=True)
        self._warned = False

    def modules(self):
        return dict(**self.aifr.modules(), **self.fas.modules())

    def state(self):
        a, f = self.aifr.state(), self.fas.state()
        return {k: dict(**a.get(k, {}), **f.get(k, {})) for k in ("optimizers", "schedulers", "scalers")}

    def step(self, batch, step):
        logs = self.aifr.step(batch, step)
        logs.update(self.fas.step(batch, step))
        ratio = logs["src_x_id_rms"] / max(logs["x_id_rms"], 1e-30)
        logs["x_id_eval_ratio"] = ratio
        if ratio > self.LAG_WARN and not self._warned:
            self._warned = True
            warnings.warn(f"joint step {step + 1}: x_id on the backbone's running BatchNorm statistics (FAS half, "
                          f"eval mode as in the official code) is {ratio:.3g}x its size on batch statistics (AIFR "
                          f"half): the running statistics lag weights that SGD moves fast, and the generator's "
                          f"identity and age losses are computed on amplified features. Lower --lr, keep the "
                          f"warm-up (--warmup-steps) or start from an AIFR model (--init)")
        return logs


def build_recipe(cfg, model: nn.Module, num_classes: int, device: torch.device, world: int = 1, rank: int = 0,
                 convert: Optional[Callable[[nn.Module], None]] = None):
    """The recipe ``cfg.recipe`` names (``aifr`` and ``finetune``: :class:`AIFRRecipe`, ``fas``, ``joint``) over
    ``model``, as the training loop runs it: its step context from ``cfg`` (``amp``, ``clip_grad``, per-shard
    seeding from ``seed``) and its heads initialized from ``cfg.seed + 1``, the same on every process and
    independent of the model's initialization. ``convert`` is applied to the recipe's own modules (``--sync-bn``)."""
    if cfg.recipe not in ("aifr", "finetune", "fas", "joint"):
        raise ValueError(f"recipe must be one of aifr, fas, joint, finetune, got {cfg.recipe!r}")
    ctx = StepContext(torch.device(device), cfg.amp, world, rank, cfg.clip_grad, shard_seeder(cfg.seed),
                      convert=convert)
    torch.manual_seed(cfg.seed + 1)
    if cfg.recipe == "fas":
        return FASRecipe(model, cfg, ctx)
    if cfg.recipe == "joint":
        return JointRecipe(model, num_classes, cfg, ctx)
    return AIFRRecipe(model, num_classes, cfg, ctx)
