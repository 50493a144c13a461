"""nn.Modules over the fast ops; each subclasses its reference module so state dicts load unchanged."""
from .icm import CompactAgingModule, CompactICM
from .trunk import FastBottleneckIR, fold_bn

__all__ = ["FastBottleneckIR", "fold_bn", "CompactAgingModule", "CompactICM"]
