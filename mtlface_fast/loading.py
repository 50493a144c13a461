"""Where a command's model comes from: the ``--weights/--generator/--estimator/--backbone/--seed`` options
(declared once, for every command) and :func:`load_model` (a saved folder, the TPAMI release file, official
CVPR checkpoints, or a seeded random initialization).

Torch is imported only when a model is loaded, so declaring the options keeps ``--help`` light.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional

WEIGHTS_HELP = ("a folder written by save_pretrained, the authors' TPAMI release file (mtlface_checkpoints.tar), "
                "or an official CVPR backbone checkpoint (default: a seeded random model, for trying the pipeline)")


def add_model_arguments(parser, title: Optional[str] = "model") -> None:
    """Declare the model-source options on ``parser`` (in an argument group named ``title`` when given)."""
    g = parser.add_argument_group(title) if title else parser
    g.add_argument("--weights", help=WEIGHTS_HELP)
    g.add_argument("--generator", help="official CVPR generator checkpoint (with an official CVPR --weights)")
    g.add_argument("--estimator", help="official CVPR estimation-network checkpoint (with an official CVPR --weights)")
    g.add_argument("--backbone", default="ir50", help="backbone of the random model when no --weights (ir50)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random initialization (0)")


def load_model(weights: Optional[str], generator: Optional[str] = None, estimator: Optional[str] = None,
               backbone: str = "ir50", seed: int = 0, model_cls=None):
    """(model, description): a saved folder, official checkpoints, or a seeded random initialization."""
    import torch

    from .model import MTLFace
    model_cls = model_cls or MTLFace
    extra = [opt for opt, value in (("--generator", generator), ("--estimator", estimator)) if value is not None]
    if extra and (weights is None or os.path.isdir(weights)):
        given = "no --weights" if weights is None else f"--weights {weights} (a saved model folder, which holds them)"
        verb = "needs" if len(extra) == 1 else "need"
        raise ValueError(f"{' and '.join(extra)} {verb} an official CVPR backbone checkpoint as --weights; with "
                         f"{given}, {'it' if len(extra) == 1 else 'they'} would be ignored")
    if weights is None:
        torch.manual_seed(seed)
        return model_cls(backbone=backbone), f"random initialization (seed {seed}); NOT a trained model"
    if os.path.isdir(weights):
        return model_cls.from_pretrained(weights), f"saved model {weights}"
    return (model_cls.from_official(weights, generator_ckpt=generator, estimation_ckpt=estimator),
            f"official checkpoint {weights}")


def load_model_from_args(args: argparse.Namespace, model_cls=None):
    """:func:`load_model` with the options declared by :func:`add_model_arguments`."""
    return load_model(args.weights, args.generator, args.estimator, args.backbone, args.seed, model_cls=model_cls)
