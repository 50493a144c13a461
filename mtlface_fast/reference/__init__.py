"""The reference MTLFace: plain eager PyTorch, faithful to the official code, the oracle for every fast path."""
from .afd import AFD_VARIANTS, AttentionModule, SPPModule
from .backbone import BACKBONE_UNITS, AIResNet, BottleneckIR, SEModule
from .heads import (AGE_GROUP_THRESHOLDS, AgeEstimationModule, CosFace, GradientReverseLayer, age2group, dex_age,
                    grad_reverse)
from .icm import AgingModule, ICMBase, PatchDiscriminator, ResidualBlock, TaskRouter, Upsample, router_windows
from .common import Architecture
from .cvpr import CVPR
from .model import ARCHITECTURES, EncodeResult, Features, MTLFace
from .tpami import TPAMI, StyleBlock, TPAMIAgingModule, TPAMIDecoder, TPAMIEncoder

__all__ = [
    "MTLFace", "EncodeResult", "Features", "AIResNet", "BottleneckIR", "SEModule", "AttentionModule", "SPPModule",
    "AgeEstimationModule", "CosFace", "GradientReverseLayer", "grad_reverse", "age2group", "dex_age", "AgingModule",
    "ICMBase", "ResidualBlock", "TaskRouter", "Upsample", "PatchDiscriminator", "router_windows", "AFD_VARIANTS",
    "BACKBONE_UNITS", "AGE_GROUP_THRESHOLDS", "ARCHITECTURES", "Architecture", "CVPR", "TPAMI", "TPAMIEncoder",
    "TPAMIDecoder", "TPAMIAgingModule", "StyleBlock",
]
