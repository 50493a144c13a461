"""nn.Modules over the fast ops; each subclasses its reference module so state dicts load unchanged."""
from . import onednn
from .afd import FusedAttentionModule
from .fold import fold_bn
from .fused import FusedLayer, WeightsVersioned
from .icm import CompactAgingModule, CompactICM, CompactTPAMIAgingModule
from .stylegan2 import FastStyledConv, FastToRGB
from .trunk import FastBottleneckIR

__all__ = ["CompactAgingModule", "CompactICM", "CompactTPAMIAgingModule", "FastBottleneckIR", "FastStyledConv",
           "FastToRGB", "FusedAttentionModule", "FusedLayer", "WeightsVersioned", "fold_bn"]
