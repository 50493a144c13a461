"""Count what one call would launch on a GPU and where it would synchronize with the host, on CPU.

    with count_launches() as rec:             # Triton kernels stubbed: recorded, not run
        module(x)
    check_budget(rec, 3, 0, "AFD eval")       # or rec.check(max_launches=3, max_syncs=0)

During the block:

* ``rec.triton``: Triton kernel launches as ``(name, grid)`` entries (also readable as the string
  ``"name grid=(...)"``): every ``@triton.jit`` call, compiled (``JITFunction``), interpreted
  (``InterpretedFunction``) or through ``triton.autotune`` (the first config's meta-parameters fill the
  grid, as the interpreter's autotuner takes). The launches are stubbed: the kernels do not run and their
  outputs stay as allocated, so a full-size call costs only its host code.
* ``rec.aten``: aten ops that launch a device kernel (compute ops and copies; views, allocations, metadata
  and scalar reads excluded, see ``NO_KERNEL``), seen through a TorchDispatchMode below autograd, so
  composite ops count as what they decompose to (``linear`` as its ``mm``/``addmm``). On a GPU each launches
  about one kernel.
* ``rec.custom``: the custom (non-aten) ops dispatched, e.g. ``mtlface::afd_eval`` (their own aten ops and
  Triton launches are counted as above).
* ``rec.syncs``: host reads of tensor values, as ``(what, call site)`` entries (also readable as strings):
  ``Tensor.item / tolist / numpy / cpu / __bool__ / __int__ / __float__ / __index__ / nonzero`` and
  ``torch.nonzero / unique / bincount / masked_select / repeat_interleave``, with the first calling line
  outside torch and this file.

``as_cuda=True`` (default) makes ``Tensor.is_cuda`` True and ``torch.cuda.is_current_stream_capturing``
False, so host code that branches on the device takes its GPU branch (CPU-only torch: no CUDA API may then
be called; ``x.device.type`` still says cpu). :func:`check_budget` / :meth:`Record.check` raise with every
recorded launch and sync when a budget is exceeded.

Deterministic on CPU (no timing); general: nothing in it knows an op of this package.
"""
from __future__ import annotations

import contextlib
import dataclasses
import traceback
from typing import List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops without a device kernel of their own (views, allocations, metadata, scalar reads)
NO_KERNEL = set("""empty empty_like empty_strided select t transpose view reshape _reshape_alias flatten expand
    detach detach_ unsqueeze squeeze slice as_strided alias lift_fresh resolve_conj resolve_neg contiguous permute
    unbind split narrow _unsafe_view item set_ result_type view_as new_empty new_empty_strided split_with_sizes
    expand_as chunk squeeze_ unsqueeze_ is_nonzero _local_scalar_dense sym_size sym_stride sym_numel
    sym_storage_offset dim size stride numel is_same_size _to_copy_noop unflatten movedim
    _has_compatible_shallow_copy_type record_stream""".split())

SYNC_METHODS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero")
SYNC_FUNCTIONS = ("nonzero", "unique", "bincount", "masked_select", "repeat_interleave")


class Entry(tuple):
    """A ``(name, detail)`` pair that also reads as its string form (``startswith``, ``split``, ``in``)."""

    fmt = "{} {}"

    def __str__(self) -> str:
        return self.fmt.format(*self)

    def __contains__(self, item) -> bool:
        return item in str(self) if isinstance(item, str) else tuple.__contains__(self, item)

    def startswith(self, *a) -> bool:
        return str(self).startswith(*a)

    def split(self, *a) -> List[str]:
        return str(self).split(*a)


class Launch(Entry):
    fmt = "{} grid={}"


class Sync(Entry):
    fmt = "{} at {}"


@dataclasses.dataclass
class Record:
    triton: List[Launch] = dataclasses.field(default_factory=list)
    aten: List[str] = dataclasses.field(default_factory=list)
    custom: List[str] = dataclasses.field(default_factory=list)
    syncs: List[Sync] = dataclasses.field(default_factory=list)

    @property
    def launches(self) -> int:
        """Triton launches + aten kernel launches."""
        return len(self.triton) + len(self.aten)

    def report(self) -> str:
        lines = [f"{self.launches} launches ({len(self.triton)} Triton, {len(self.aten)} aten), "
                 f"{len(self.syncs)} host syncs, custom ops {self.custom}"]
        lines += [f"  triton {t}" for t in self.triton] + [f"  aten   {a}" for a in self.aten]
        lines += [f"  sync   {s}" for s in self.syncs]
        return "\n".join(lines)

    def check(self, max_launches: Optional[int] = None, max_syncs: int = 0, what: str = "call") -> None:
        check_budget(self, max_launches, max_syncs, what)


def check_budget(rec: Record, launches: Optional[int] = None, syncs: int = 0, what: str = "call") -> None:
    """Raise with the full record when ``rec`` exceeds ``launches`` (Triton + aten; None: no limit) or ``syncs``."""
    if (launches is not None and rec.launches > launches) or len(rec.syncs) > syncs:
        raise AssertionError(f"{what}: budget {launches} launches / {syncs} syncs exceeded\n{rec.report()}")


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
        if "/torch/" not in frame.filename and frame.filename != __file__:
            return f"{'/'.join(frame.filename.split('/')[-3:])}:{frame.lineno}"
    return "?"


_MISSING = object()


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

    def stub_run(self, *args, grid=None, warmup=False, **kwargs):
        if warmup:
            return None
        fn, meta = self, dict(kwargs)
        if isinstance(self, Autotuner):
            meta.update(self.configs[0].kwargs)  # the first config, as the interpreter's autotuner takes
        while hasattr(fn, "fn"):
            fn = fn.fn
        g = grid(meta) if callable(grid) else grid
        rec.triton.append(Launch((getattr(fn, "__name__", repr(fn)), tuple(g) if g is not None else None)))
        return None

    def sync_method(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            rec.syncs.append(Sync((f"Tensor.{name}", _site())))
            return original(self, *args, **kwargs)
        return wrapper

    def sync_function(name):
        original = getattr(torch, name)

        def wrapper(*args, **kwargs):
            rec.syncs.append(Sync((f"torch.{name}", _site())))
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
