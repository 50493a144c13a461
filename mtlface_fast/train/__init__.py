"""Training: AIFR, FAS, joint and selective fine-tuning recipes on the fast (or reference) model.

``train(make_config("aifr", dict(data="train.txt", ...)))`` or ``mtlface-fast train aifr --data train.txt``;
see ``docs/TRAINING.md``.
"""
from .config import (CONFIGS, RECIPES, AIFRConfig, FASConfig, FinetuneConfig, JointConfig, TrainConfig,
                     make_config)
from .data import FaceDataset, FaceList, StepSampler, read_list_file
from .loop import train
from .synthetic import make_synthetic_dataset

__all__ = ["train", "make_config", "TrainConfig", "AIFRConfig", "FASConfig", "JointConfig", "FinetuneConfig",
           "CONFIGS", "RECIPES", "read_list_file", "FaceDataset", "FaceList", "StepSampler",
           "make_synthetic_dataset"]
