"""Count what one call would launch on a GPU and where it would synchronize with the host, on CPU.

``with count_launches() as rec: fn()`` records, during the block:

* ``rec.triton``: Triton kernel launches (name, grid), stubbed: the kernels do not run (outputs stay
  uninitialized), so a full-size call costs only its host code;
* ``rec.aten``: aten ops that launch a device kernel (compute ops and copies; views, allocations,
  metadata and scalar reads excluded), through a TorchDispatchMode; ``rec.custom`` the custom
  (non-aten) ops dispatched;
* ``rec.syncs``: host reads of tensor values (Tensor.item / tolist / numpy / cpu / __bool__ / __int__ /
  __float__ / __index__ / nonzero, torch.nonzero / unique / bincount / masked_select / repeat_interleave)
  with their call site.

``as_cuda=True`` (default) makes ``Tensor.is_cuda`` True and CUDA-graph capture False, so host code that
branches on the device takes its GPU branch (on CPU-only torch; no CUDA API may then be called).
:func:`check_budget` raises with every recorded launch and sync when a budget is exceeded.
"""
from __future__ import annotations

import contextlib
import dataclasses
import traceback
from typing import List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops without a device kernel of their own (views, allocations, metadata, scalar reads)
NO_KERNEL = set("""empty empty_like empty_strided select t transpose view reshape _reshape_alias flatten expand
    detach detach_ unsqueeze squeeze slice as_strided alias lift_fresh resolve_conj resolve_neg contiguous permute
    unbind split narrow _unsafe_view item set_ result_type view_as new_empty new_empty_strided split_with_sizes
    expand_as chunk squeeze_ unsqueeze_ is_nonzero _local_scalar_dense sym_size sym_stride sym_numel
    sym_storage_offset dim size stride numel is_same_size _to_copy_noop""".split())

SYNC_METHODS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero")
SYNC_FUNCTIONS = ("nonzero", "unique", "bincount", "masked_select", "repeat_interleave")


@dataclasses.dataclass
class Record:
    triton: List[Tuple[str, tuple]] = dataclasses.field(default_factory=list)
    aten: List[str] = dataclasses.field(default_factory=list)
    custom: List[str] = dataclasses.field(default_factory=list)
    syncs: List[Tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def launches(self) -> int:
        return len(self.triton) + len(self.aten)

    def report(self) -> str:
        lines = [f"{len(self.triton)} Triton launches, {len(self.aten)} aten kernel launches, "
                 f"{len(self.syncs)} host syncs, custom ops {self.custom}"]
        lines += [f"  triton {name} grid={grid}" for name, grid in self.triton]
        lines += [f"  aten   {name}" for name in self.aten]
        lines += [f"  sync   {name} at {site}" for name, site in self.syncs]
        return "\n".join(lines)


class _AtenCounter(TorchDispatchMode):
    def __init__(self, rec: Record):
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ns = func.namespace
        name = func.overloadpacket.__name__
        if ns != "aten":
            self.rec.custom.append(f"{ns}::{name}")
        elif name not in NO_KERNEL:
            self.rec.aten.append(name)
        return func(*args, **(kwargs or {}))


def _site() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename and not frame.filename.endswith("launch_count_icm.py"):
            return f"{'/'.join(frame.filename.split('/')[-3:])}:{frame.lineno}"
    return "?"


@contextlib.contextmanager
def count_launches(as_cuda: bool = True):
    """Record the launches and host syncs of the block (see the module docstring)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    rec = Record()
    patches = []

    def patch(owner, name, value):
        patches.append((owner, name, owner.__dict__.get(name, _MISSING)))
        setattr(owner, name, value)

    def stub_run(self, *args, grid=None, **kwargs):
        fn, meta = self, dict(kwargs)
        if isinstance(self, Autotuner):
            meta.update(self.configs[0].kwargs)  # the first config, as the interpreter's autotuner takes
        while hasattr(fn, "fn"):
            fn = fn.fn
        g = grid(meta) if callable(grid) else grid
        rec.triton.append((getattr(fn, "__name__", repr(fn)), tuple(g)))
        return None

    def sync_method(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            rec.syncs.append((f"Tensor.{name}", _site()))
            return original(self, *args, **kwargs)
        return wrapper

    def sync_function(name):
        original = getattr(torch, name)

        def wrapper(*args, **kwargs):
            rec.syncs.append((f"torch.{name}", _site()))
            return original(*args, **kwargs)
        return wrapper

    patch(Autotuner, "run", stub_run)
    patch(JITFunction, "run", stub_run)
    patch(InterpretedFunction, "run", stub_run)
    for name in SYNC_METHODS:
        patch(torch.Tensor, name, sync_method(name))
    for name in SYNC_FUNCTIONS:
        patch(torch, name, sync_function(name))
    if as_cuda:
        patch(torch.Tensor, "is_cuda", property(lambda self: True))
        patch(torch.cuda, "is_current_stream_capturing", lambda: False)
    try:
        with _AtenCounter(rec):
            yield rec
    finally:
        for owner, name, old in reversed(patches):
            if old is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, old)


_MISSING = object()


def check_budget(rec: Record, launches: Optional[int] = None, syncs: int = 0, what: str = "call") -> None:
    """Raise with the full record when ``rec`` exceeds ``launches`` (Triton + aten) or ``syncs``."""
    if (launches is not None and rec.launches > launches) or len(rec.syncs) > syncs:
        raise AssertionError(f"{what}: budget {launches} launches / {syncs} syncs exceeded\n{rec.report()}")
