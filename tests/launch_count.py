"""Count what one call would launch on a GPU: Triton kernels, aten ops that launch a device kernel, host syncs.

    with count_launches() as rec:          # Triton kernels stubbed: recorded, not run
        module(x)
    rec.check(max_launches=3, max_syncs=0)  # AssertionError listing every launch and sync when over

* Triton launches: every ``@triton.jit`` kernel call (interpreter ``InterpretedFunction.run`` and
  compiled ``JITFunction.run``), with its grid. ``stub=True`` (default) records without running, so the
  kernels' outputs stay as allocated; ``stub=False`` runs them (interpreter reads are no syncs).
* aten ops: the innermost aten ops of the profiled call that are neither views, allocations nor
  metadata (``NO_KERNEL``): ``aten::linear`` counts once, as its ``aten::mm``; ``aten::to`` as its ``copy_``.
  On a GPU each launches about one kernel. Ops run inside a Triton launch are not counted.
* host syncs: ``Tensor.item/tolist/numpy/cpu/__bool__/__int__/__float__/__index__/nonzero`` and
  ``torch.nonzero/unique/masked_select/bincount/repeat_interleave``, with the calling file and line.

Deterministic on CPU (no timing); general: nothing in it knows an op of this package.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import List

import torch

NO_KERNEL = set("""empty empty_like empty_strided select t transpose view reshape _reshape_alias flatten expand
    detach detach_ unsqueeze squeeze slice as_strided as_strided_ alias lift_fresh resolve_conj resolve_neg to
    contiguous permute unbind split narrow _unsafe_view item set_ result_type view_as new_empty new_empty_strided
    split_with_sizes expand_as chunk squeeze_ unsqueeze_ is_nonzero resize_ _has_compatible_shallow_copy_type
    _local_scalar_dense record_stream broadcast_tensors numpy_T unflatten movedim _nnpack_available _to_copy clone
    dropout feature_dropout alpha_dropout lift_fresh_copy size stride dim is_same_size zeros_like_meta""".split())

_SYNC_METHODS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero")
_SYNC_FUNCS = ("nonzero", "unique", "masked_select", "bincount", "repeat_interleave")
_MARK = "launch_count::triton"


@dataclass
class Record:
    triton: List[str] = field(default_factory=list)
    aten: List[str] = field(default_factory=list)
    syncs: List[str] = field(default_factory=list)

    @property
    def launches(self) -> int:
        return len(self.triton) + len(self.aten)

    def report(self) -> str:
        lines = [f"{self.launches} launches ({len(self.triton)} Triton, {len(self.aten)} aten), "
                 f"{len(self.syncs)} syncs"]
        lines += [f"  triton {t}" for t in self.triton] + [f"  aten   {a}" for a in self.aten]
        lines += [f"  sync   {s}" for s in self.syncs]
        return "\n".join(lines)

    def check(self, max_launches: int, max_syncs: int = 0) -> None:
        if self.launches > max_launches or len(self.syncs) > max_syncs:
            raise AssertionError(f"over budget ({max_launches} launches, {max_syncs} syncs):\n{self.report()}")


def _caller() -> str:
    f = sys._getframe(2)
    while f is not None and (f.f_code.co_filename == __file__ or "/torch/" in f.f_code.co_filename):
        f = f.f_back
    return f"{f.f_code.co_filename}:{f.f_lineno}" if f is not None else "?"


def _kernel_classes():
    out = []
    try:
        from triton.runtime.interpreter import InterpretedFunction
        out.append(InterpretedFunction)
    except ImportError:  # pragma: no cover
        pass
    try:
        from triton.runtime.jit import JITFunction
        out.append(JITFunction)
    except ImportError:  # pragma: no cover
        pass
    return out


def _innermost_compute(events) -> List[str]:
    """Names of the aten ops with no counted descendant, outside Triton launches."""
    counted = []

    def visit(ev, inside_launch) -> bool:  # True when ev or a descendant is counted
        if ev.name == _MARK:
            inside_launch = True
        below = False
        for ch in ev.cpu_children:
            below = visit(ch, inside_launch) or below
        name = ev.name
        if inside_launch or below or not name.startswith("aten::") or name[6:] in NO_KERNEL:
            return below
        counted.append(name)
        return True

    for ev in events:
        if ev.cpu_parent is None:
            visit(ev, False)
    return counted


@contextlib.contextmanager
def count_launches(stub: bool = True):
    rec = Record()
    patched = []
    depth = [0]

    def wrap_run(cls):
        orig = cls.run

        def run(self, *args, grid=None, warmup=False, **kwargs):
            if not warmup:
                g = grid(kwargs) if callable(grid) else grid
                rec.triton.append(f"{getattr(self, '__name__', getattr(getattr(self, 'fn', None), '__name__', '?'))}"
                                  f" grid={tuple(g) if g is not None else None}")
            if stub and not warmup:
                return None
            depth[0] += 1
            try:
                with torch.profiler.record_function(_MARK):
                    return orig(self, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                depth[0] -= 1
        patched.append((cls, "run", orig))
        cls.run = run

    def wrap_sync(owner, name):
        orig = getattr(owner, name, None)
        if orig is None:
            return

        def hook(*a, **k):
            if depth[0] == 0:
                rec.syncs.append(f"{getattr(owner, '__name__', 'torch')}.{name} at {_caller()}")
            return orig(*a, **k)
        patched.append((owner, name, orig))
        setattr(owner, name, hook)

    for cls in _kernel_classes():
        wrap_run(cls)
    for name in _SYNC_METHODS:
        wrap_sync(torch.Tensor, name)
    for name in _SYNC_FUNCS:
        wrap_sync(torch, name)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            yield rec
    finally:
        for owner, name, orig in reversed(patched):
            setattr(owner, name, orig)
    rec.aten.extend(_innermost_compute(prof.profiler.function_events))
