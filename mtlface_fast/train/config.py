"""Training configuration: one dataclass per recipe, overridable from a YAML/JSON file and the command line.

Precedence: dataclass defaults < ``--config`` file < command-line flags. Every field is a flag
(``--batch-size 64``, ``--milestones 20000,23000``, ``--amp bf16``); booleans take ``--flag`` /
``--no-flag``. Defaults are the official CVPR recipe (``MTLFACE.md`` section 7) unless a field's comment
says otherwise.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Type

from ..errors import MissingDependencyError
from ..reference.backbone import BACKBONE_UNITS
from ..reference.heads import AGE_GROUP_THRESHOLDS

RECIPES = ("aifr", "fas", "joint", "finetune")
AMP_MODES = ("none", "bf16", "fp16")
BALANCE_MODES = ("none", "identity", "age")


@dataclass
class TrainConfig:
    """Fields shared by every recipe: data, model, loop, precision, logging and checkpoints."""
    # data
    data: str = ""                    # list file: "id filename age gender" per line
    root: Optional[str] = None        # image folder the file names are relative to (default: the list's folder)
    num_workers: int = 4              # DataLoader worker processes per rank
    balance: str = "none"             # sampling: "none" (official), "identity" or "age" (inverse-frequency)
    flip: bool = True                 # random horizontal flip (official: p = 0.5)
    # model
    backbone: str = "ir50"            # ir34, ir50, ir64, ir101 or irse101
    input_size: int = 112             # square input side, a multiple of 16 (official 112)
    age_group: int = 7                # number of age groups, 4..8 (official 7)
    afd: str = "cvpr"                 # AFD variant: cvpr or tpami
    sigma: float = 0.1                # ICM channel overlap of adjacent age groups, in (0, 1]
    reference: bool = False           # train the plain-PyTorch reference model instead of the fast one
    init: Optional[str] = None        # start from a save_pretrained folder or a training checkpoint
    # loop
    batch_size: int = 64              # per process (official: 64 on each of 8 GPUs)
    grad_accum: int = 1               # micro-batches per step; the step's global batch is batch_size*grad_accum*world
    num_iter: int = 36000             # optimizer steps
    seed: int = 0                     # seed of the weights, the sampling and the augmentation
    device: str = "auto"              # auto (cuda if available), cpu, cuda, cuda:N
    amp: str = "none"                 # none, bf16 or fp16 (fp16 uses a gradient scaler)
    clip_grad: float = 0.0            # max global gradient norm; 0 disables clipping
    sync_bn: bool = False             # SyncBatchNorm across processes (CUDA only)
    # output
    output: str = "runs/mtlface"      # run folder: metrics.jsonl, checkpoints, final/ (save_pretrained)
    log_every: int = 10               # JSONL metrics and tqdm postfix every N steps
    save_every: int = 1000            # checkpoint every N steps (and at the end); 0: only at the end
    keep_checkpoints: int = 2         # step checkpoints kept besides last.pt
    sample_every: int = 500           # PNG grid of synthesized ages every N steps (recipes with a generator)
    tensorboard: bool = False         # also log to TensorBoard (needs the tensorboard package)
    progress: bool = True             # tqdm progress bar
    resume: Optional[str] = None      # a checkpoint file, a run folder (its last.pt), or "auto"

    recipe: typing.ClassVar[str] = ""

    def validate(self) -> "TrainConfig":
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)
        need(isinstance(self.data, str) and self.data, "data: a list file is required (--data FILE)")
        need(self.backbone in BACKBONE_UNITS,
             f"backbone must be one of {sorted(BACKBONE_UNITS)}, got {self.backbone!r}")
        need(self.age_group in AGE_GROUP_THRESHOLDS,
             f"age_group must be one of {sorted(AGE_GROUP_THRESHOLDS)}, got {self.age_group!r}")
        need(self.input_size >= 16 and self.input_size % 16 == 0,
             f"input_size must be a positive multiple of 16, got {self.input_size!r}")
        for name in ("batch_size", "grad_accum", "num_iter"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("num_workers", "log_every", "save_every", "sample_every", "keep_checkpoints"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)!r}")
        need(self.amp in AMP_MODES, f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        need(self.balance in BALANCE_MODES, f"balance must be one of {BALANCE_MODES}, got {self.balance!r}")
        need(self.clip_grad >= 0, f"clip_grad must be >= 0, got {self.clip_grad!r}")
        return self

    def to_dict(self) -> Dict[str, Any]:
        return dict(recipe=self.recipe, **dataclasses.asdict(self))


@dataclass
class AIFRConfig(TrainConfig):
    """Age-invariant face recognition: CosFace + age estimation + gradient-reversal domain adaptation."""
    lr: float = 0.1                   # SGD learning rate of the recognition networks
    momentum: float = 0.9             # SGD momentum
    weight_decay: float = 5e-4        # on Conv/Linear/PReLU/CosFace weights; never on BN, biases, the DA head
    warmup_steps: int = 1000          # linear warm-up (official intent; the released loop never calls it)
    milestones: Tuple[int, ...] = (20000, 23000)  # steps where the learning rate is multiplied by gamma
    gamma: float = 0.1                # learning-rate factor at each milestone
    min_lr: float = 1e-4              # floor of the learning rate (and the start of the warm-up)
    cosface_s: float = 64.0           # CosFace scale s
    cosface_m: float = 0.35           # CosFace margin m
    age_loss_weight: float = 1e-3     # --fr_age_loss_weight of the README recipe
    da_loss_weight: float = 2e-3      # --fr_da_loss_weight of the README recipe
    grl_coeff: float = 1.0            # gradient-reversal coefficient of the domain-adaptation head

    recipe: typing.ClassVar[str] = "aifr"

    def validate(self):
        super().validate()
        if self.lr <= 0 or self.min_lr < 0 or self.warmup_steps < 0:
            raise ValueError(f"lr must be > 0 and min_lr, warmup_steps >= 0 (got {self.lr}, {self.min_lr}, "
                             f"{self.warmup_steps})")
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must be increasing, got {list(self.milestones)}")
        return self


@dataclass
class FASConfig(TrainConfig):
    """Face age synthesis: the ICM generator against a conditional patch discriminator (LSGAN)."""
    g_lr: float = 1e-4                # Adam learning rate of the generator
    d_lr: float = 1e-4                # Adam learning rate of the discriminator
    betas: Tuple[float, ...] = (0.5, 0.99)  # Adam betas of generator and discriminator
    gan_weight: float = 75.0          # weight of the generator's LSGAN term
    id_weight: float = 2e-3           # MSE between x_id of the source and of the generated face
    age_weight: float = 10.0          # CE of the estimator's group logits on the generated face
    rec_weight: float = 0.0           # L1 of G(x, own group) to x; not in the released code (0 = official)

    recipe: typing.ClassVar[str] = "fas"


@dataclass
class JointConfig(AIFRConfig, FASConfig):
    """AIFR and FAS alternating on the same source batch every step (official --train_fr --train_fas)."""
    recipe: typing.ClassVar[str] = "joint"


@dataclass
class FinetuneConfig(AIFRConfig):
    """Selective fine-tuning (TPAMI): synthesize the training identities at other ages with the trained
    generator, keep the faces that stay the same person and land in their target group, then fine-tune
    recognition on real + selected synthetic faces."""
    lr: float = 0.01
    warmup_steps: int = 0
    milestones: Tuple[int, ...] = ()
    num_iter: int = 2000
    synth_per_identity: int = 4       # source images per identity that are synthesized at every other group
    min_similarity: float = 0.5       # cosine similarity of the synthetic face's embedding to the source's
    check_group: bool = True          # keep only faces whose estimated group is the target group
    synth_dir: Optional[str] = None   # where synthetic PNGs + list go (default: OUTPUT/synthetic)

    recipe: typing.ClassVar[str] = "finetune"


CONFIGS: Dict[str, Type[TrainConfig]] = {"aifr": AIFRConfig, "fas": FASConfig, "joint": JointConfig,
                                         "finetune": FinetuneConfig}


# -- parsing ------------------------------------------------------------------------------------------------
def _base_type(tp):
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return tp


def _field_types(cls) -> Dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(cls, name: str, value):
    """Convert ``value`` (from a file or the command line) to the type of ``cls.name``, or raise ValueError."""
    tp = _field_types(cls)[name]
    base = _base_type(tp)
    optional = typing.get_origin(tp) is typing.Union
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name}: null is not allowed")
    try:
        if typing.get_origin(base) in (tuple, list) or base in (tuple, list):
            args = typing.get_args(base)
            item = args[0] if args else float
            if isinstance(value, str):
                value = [v for v in value.replace(" ", "").split(",") if v]
            return tuple(item(v) for v in value)
        if base is bool:
            if isinstance(value, str):
                low = value.lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if not isinstance(value, bool):
                raise ValueError(value)
            return value
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if base is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {getattr(tp, '__name__', tp)}, got {value!r}") from None


def load_config_file(path: str) -> Dict[str, Any]:
    """A mapping of field -> value from a ``.yaml``/``.yml`` or ``.json`` file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as fh:
        text = fh.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise MissingDependencyError(f"{path}: a YAML config needs PyYAML (pip install PyYAML); or write it "
                                         f"as .json") from None
        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of option -> value, got {type(values).__name__}")
    return values


def make_config(recipe: str, overrides: Optional[Dict[str, Any]] = None, file: Optional[str] = None) -> TrainConfig:
    """The recipe's config: defaults, then ``file`` (YAML/JSON), then ``overrides``; validated."""
    if recipe not in CONFIGS:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    cls = CONFIGS[recipe]
    names = {f.name for f in dataclasses.fields(cls)}
    values: Dict[str, Any] = {}
    for source in ([load_config_file(file)] if file else []) + [overrides or {}]:
        source = {k.replace("-", "_"): v for k, v in source.items()}
        source.pop("recipe", None)
        unknown = sorted(set(source) - names)
        if unknown:
            raise ValueError(f"unknown option(s) for recipe {recipe!r}: {', '.join(unknown)}")
        values.update({k: _coerce(cls, k, v) for k, v in source.items()})
    return cls(**values).validate()


def field_help(cls: Type[TrainConfig]) -> Dict[str, str]:
    """Each field's trailing ``# comment`` in the dataclass source (the one place a field is described);
    empty when the source is not available."""
    import inspect
    import re

    helps: Dict[str, str] = {}
    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for line in source.splitlines():
            m = re.match(r"^\s+(\w+)\s*:\s*[^=#]+=[^#]*#\s*(.+)$", line)
            if m:
                helps.setdefault(m.group(1), m.group(2).strip())
    return helps


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``RECIPE`` positional, ``--config FILE`` and one flag per field of every recipe's dataclass."""
    parser.add_argument("recipe", choices=RECIPES, help="aifr | fas | joint | finetune")
    parser.add_argument("--config", help="YAML or JSON file of options (command-line flags win)")
    seen = set()
    for cls in CONFIGS.values():
        helps = field_help(cls)
        for f in dataclasses.fields(cls):
            if f.name in seen:
                continue
            seen.add(f.name)
            flag = "--" + f.name.replace("_", "-")
            base = _base_type(_field_types(cls)[f.name])
            default = f.default if f.default is not dataclasses.MISSING else None
            if base is bool:
                text = helps.get(f.name, "")
                parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                    help=f"{text} (default {default})".strip())
            else:
                shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
                text = helps.get(f.name, "")
                shown = f" (default {shown})" if shown != "" else ""
                parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(),
                                    help=f"{text}{shown}".strip())


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    cls = CONFIGS[args.recipe]
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("recipe", "config", "func", "debug",
                                                                              "command")}
    foreign = sorted(k for k in given if k not in names)
    if foreign:
        raise ValueError(f"option(s) not used by recipe {args.recipe!r}: "
                         + ", ".join("--" + k.replace("_", "-") for k in foreign))
    return make_config(args.recipe, given, args.config)
