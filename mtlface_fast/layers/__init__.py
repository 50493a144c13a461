"""nn.Modules over the fast ops; each subclasses its reference module so state dicts load unchanged."""
from .afd import FusedAttentionModule
from .icm import CompactAgingModule, CompactICM
from .fold import fold_bn
from .trunk import FastBottleneckIR

__all__ = ["CompactAgingModule", "CompactICM", "FastBottleneckIR", "FusedAttentionModule", "fold_bn"]
