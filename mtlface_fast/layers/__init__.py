"""nn.Modules over the fast ops; each subclasses its reference module so state dicts load unchanged."""
from .afd import FusedAttentionModule
from .trunk import FastBottleneckIR, fold_bn

__all__ = ["FastBottleneckIR", "FusedAttentionModule", "fold_bn"]
