"""nn.Modules over the fast ops; each subclasses its reference module so state dicts load unchanged."""
from .trunk import FastBottleneckIR, fold_bn

__all__ = ["FastBottleneckIR", "fold_bn"]
