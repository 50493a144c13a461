"""The reference MTLFace: plain eager PyTorch, faithful to the official code, the oracle for every fast path."""
from .afd import AFD_VARIANTS, AttentionModule, SPPModule
from .backbone import BACKBONE_UNITS, AIResNet, BottleneckIR, SEModule
from .heads import (AGE_GROUP_THRESHOLDS, AgeEstimationModule, CosFace, GradientReverseLayer, age2group, dex_age,
                    grad_reverse)
from .icm import AgingModule, ICMBase, PatchDiscriminator, ResidualBlock, TaskRouter, Upsample, router_windows
from .model import EncodeResult, Features, MTLFace
from .tpami import StyleBlock, TPAMIAgingModule, TPAMIDecoder, TPAMIEncoder, TPAMIMTLFace

__all__ = [
    "MTLFace", "EncodeResult", "Features", "AIResNet", "BottleneckIR", "SEModule", "AttentionModule", "SPPModule",
    "AgeEstimationModule", "CosFace", "GradientReverseLayer", "grad_reverse", "age2group", "dex_age", "AgingModule",
    "ICMBase", "ResidualBlock", "TaskRouter", "Upsample", "PatchDiscriminator", "router_windows", "AFD_VARIANTS",
    "BACKBONE_UNITS", "AGE_GROUP_THRESHOLDS", "TPAMIMTLFace", "TPAMIEncoder", "TPAMIDecoder", "TPAMIAgingModule",
    "StyleBlock",
]
