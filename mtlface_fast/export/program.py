"""What every export target shares: the two entry points, their exported program, the decomposition step.

Entry points (``ENTRIES``):

* ``recognition``: ``images (B, 3, S, S) -> (embedding (B, 512), age (B,))``;
* ``synthesis``:   ``images (B, 3, S, S), target_group (B,) int64 -> image (B, 3, S, S)``.

:func:`export_program` runs ``torch.export`` on an entry of a model in eval mode with a dynamic batch
dimension in ``[min_batch, max_batch]``. :func:`decompose` replaces every fused ``mtlface_fast::`` op by
its aten decomposition (``kernels.utils.DECOMPOSITIONS``) plus the few aten ops that a runtime lacks
(``adaptive_max_pool2d`` has no ONNX operator), then refuses a graph that still holds a non-aten op.
:class:`ExportSpec` describes an artifact (entry, batch range, dtype, model config); every target stores it
beside or inside the artifact, and every loader checks inputs against it.
"""
from __future__ import annotations

import dataclasses
import json
import operator
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..precision import DTYPES, dtype_name  # noqa: F401  (re-exported for the export modules)

ENTRIES = ("recognition", "synthesis")
INPUT_NAMES = {"recognition": ("images",), "synthesis": ("images", "target_group")}
OUTPUT_NAMES = {"recognition": ("embedding", "age"), "synthesis": ("image",)}
SPEC_KEY = "mtlface_fast.export_spec"


class Recognition(nn.Module):
    """``images -> (embedding, age)``: the identity embedding (not normalized) and the DEX expected age."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        result = self.model.encode(images)
        return result.embedding, result.age


class Synthesis(nn.Module):
    """``(images, target_group) -> image``: every face re-rendered at its target age group."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, target_group: torch.Tensor) -> torch.Tensor:
        return self.model.synthesize(images, target_group)


WRAPPERS = {"recognition": Recognition, "synthesis": Synthesis}


@dataclasses.dataclass(frozen=True)
class ExportSpec:
    """What an exported artifact computes and accepts (stored with it as JSON)."""
    entry: str
    min_batch: int
    opt_batch: int
    max_batch: int
    dtype: str
    device: str
    input_size: int
    age_group: int
    backbone: str
    afd: str
    target: str = "torch"
    arch: str = "cvpr"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ExportSpec":
        try:
            data = json.loads(text)
            return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"not an mtlface_fast export spec: {exc}") from None

    @property
    def input_names(self) -> Tuple[str, ...]:
        return INPUT_NAMES[self.entry]

    @property
    def output_names(self) -> Tuple[str, ...]:
        return OUTPUT_NAMES[self.entry]

    def replace(self, **changes) -> "ExportSpec":
        return dataclasses.replace(self, **changes)

    def check_inputs(self, *inputs: torch.Tensor) -> None:
        """Clear errors for inputs the artifact cannot run: count, shape, dtype, batch range, group range."""
        names = self.input_names
        if len(inputs) != len(names):
            raise TypeError(f"the {self.entry} artifact takes {len(names)} input(s) {names}, got {len(inputs)}")
        images = inputs[0]
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        shape = (3, self.input_size, self.input_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != shape:
            raise ValueError(f"images must have shape (B, {', '.join(map(str, shape))}), got {tuple(images.shape)}")
        if images.dtype != DTYPES[self.dtype]:
            raise TypeError(f"images must be {DTYPES[self.dtype]} for this {self.dtype} artifact, got {images.dtype}")
        batch = images.size(0)
        if not self.min_batch <= batch <= self.max_batch:
            raise ValueError(f"batch size {batch} is outside the range this artifact was built for "
                             f"[{self.min_batch}, {self.max_batch}]; export again with min_batch/max_batch "
                             f"covering it, or split the batch")
        if self.entry == "synthesis":
            group = inputs[1]
            if not isinstance(group, torch.Tensor) or group.dtype != torch.int64 or tuple(group.shape) != (batch,):
                got = f"{group.dtype} {tuple(group.shape)}" if isinstance(group, torch.Tensor) else type(group).__name__
                raise TypeError(f"target_group must be an int64 tensor of shape ({batch},), got {got}")
            if batch and (int(group.min()) < 0 or int(group.max()) >= self.age_group):
                raise ValueError(f"target_group values must be in [0, {self.age_group}), got values in "
                                 f"[{int(group.min())}, {int(group.max())}]")


def check_model(model) -> nn.Module:
    from ..reference.model import MTLFace as ReferenceMTLFace
    if not isinstance(model, ReferenceMTLFace):
        raise TypeError(f"model must be an mtlface_fast.MTLFace (or reference.MTLFace, any architecture), "
                        f"got {type(model).__name__}")
    return model


def check_entry(entry: str) -> str:
    if entry not in ENTRIES:
        raise ValueError(f"entry must be one of {ENTRIES}, got {entry!r}")
    return entry


def check_batch_range(min_batch: int, opt_batch: Optional[int], max_batch: int) -> Tuple[int, int, int]:
    """(min, opt, max) with 1 <= min <= opt <= max; opt defaults to max."""
    for name, value in (("min_batch", min_batch), ("max_batch", max_batch), ("opt_batch", opt_batch)):
        if value is None and name == "opt_batch":
            opt_batch = max_batch
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not min_batch <= opt_batch <= max_batch:
        raise ValueError(f"need min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}")
    return min_batch, opt_batch, max_batch


def example_inputs(spec: ExportSpec, device, batch: Optional[int] = None, seed: int = 0) -> Tuple[torch.Tensor, ...]:
    """Random inputs an artifact accepts (images in [-1, 1], target groups cycling through the groups)."""
    if batch is None:
        # torch.export specializes a dimension traced at size 1: trace at 2 or more when the range allows it.
        batch = min(max(spec.opt_batch, spec.min_batch, 2), spec.max_batch)
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(batch, 3, spec.input_size, spec.input_size, generator=g) * 2 - 1)
    images = images.to(device=device, dtype=DTYPES[spec.dtype])
    if spec.entry == "recognition":
        return (images,)
    return images, (torch.arange(batch) % spec.age_group).to(device)


def export_program(model: nn.Module, entry: str = "recognition", *, min_batch: int = 1,
                   opt_batch: Optional[int] = None, max_batch: int = 64, dtype=torch.float32,
                   device=None) -> Tuple[torch.export.ExportedProgram, ExportSpec]:
    """``torch.export`` an entry point of ``model`` (in eval mode) with a dynamic batch dimension.

    Args:
        model: an :class:`mtlface_fast.MTLFace` (fast or reference). Its weights are exported in ``dtype`` on
            ``device``; the model itself is not changed (a copy is cast when dtype/device differ).
        entry: ``"recognition"`` or ``"synthesis"``.
        min_batch, opt_batch, max_batch: the batch sizes the program accepts (opt defaults to max).
        dtype: dtype of the weights and images (fp32, fp16 or bf16; each target says which it honours).
        device: where the program runs (default: the model's device).

    Returns:
        (ExportedProgram, ExportSpec).
    """
    import copy

    check_model(model)
    check_entry(entry)
    min_batch, opt_batch, max_batch = check_batch_range(min_batch, opt_batch, max_batch)
    name = dtype_name(dtype)
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    if param.dtype != DTYPES[name] or param.device != device:
        model = copy.deepcopy(model).to(device=device, dtype=DTYPES[name])
    cfg = model.config
    spec = ExportSpec(entry=entry, min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch, dtype=name,
                      device=device.type, input_size=cfg["input_size"], age_group=cfg["age_group"],
                      backbone=cfg["backbone"], afd=cfg["afd"], arch=cfg["arch"])
    args = example_inputs(spec, device)
    if min_batch == max_batch:
        dynamic = None
    else:
        # Traced at the upper bound of its range, the batch comes out of AOTInductor as a constant (torch 2.13):
        # the program's bound then sits one above; loaders enforce the spec's range.
        upper = max_batch + 1 if args[0].size(0) == max_batch else max_batch
        batch = torch.export.Dim("batch", min=min_batch, max=upper)
        dynamic = tuple({0: batch} for _ in args)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ep = torch.export.export(WRAPPERS[entry](model), args, dynamic_shapes=dynamic, strict=False)
    finally:
        model.train(was_training)
    return ep, spec


# -- decompositions ------------------------------------------------------------------------------------

def _uniform_windows(size: int, out: int) -> Optional[Tuple[int, int]]:
    """(kernel, stride) when adaptive pooling of ``size`` into ``out`` bins is a plain pooling, else None."""
    starts = [(i * size) // out for i in range(out)]
    ends = [-(-((i + 1) * size) // out) for i in range(out)]
    kernel = ends[0] - starts[0]
    stride = starts[1] - starts[0] if out > 1 else 1
    if all(e - s == kernel for s, e in zip(starts, ends)) and all(s == i * stride for i, s in enumerate(starts)):
        return kernel, stride
    return None


def _adaptive_max_pool2d(x: torch.Tensor, output_size):
    """``aten.adaptive_max_pool2d`` as one ``max_pool2d_with_indices`` when its bins are uniform (always for
    the SPP sizes 1, 2, 3 on a 7x7 map), else as one max per bin (the spatial size is static in our graphs).
    Returns (values, flat indices into each H*W plane), as the aten op."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    oh, ow = output_size
    wh, ww = _uniform_windows(h, oh), _uniform_windows(w, ow)
    if wh is not None and ww is not None:
        return torch.ops.aten.max_pool2d_with_indices.default(x, [wh[0], ww[0]], [wh[1], ww[1]])
    rows_v, rows_i = [], []
    for i in range(oh):
        h0, h1 = (i * h) // oh, -(-((i + 1) * h) // oh)
        cols_v, cols_i = [], []
        for j in range(ow):
            w0, w1 = (j * w) // ow, -(-((j + 1) * w) // ow)
            values, arg = x[..., h0:h1, w0:w1].flatten(-2).max(dim=-1)
            cols_v.append(values)
            cols_i.append((h0 + arg // (w1 - w0)) * w + w0 + arg % (w1 - w0))
        rows_v.append(torch.stack(cols_v, dim=-1))
        rows_i.append(torch.stack(cols_i, dim=-1))
    return torch.stack(rows_v, dim=-2), torch.stack(rows_i, dim=-2)


EXPORT_ATEN_DECOMPOSITIONS = {torch.ops.aten.adaptive_max_pool2d.default: _adaptive_max_pool2d}


def decomposition_table(keep_triton_ops: bool = False) -> Dict[Any, Any]:
    """Fused-op decompositions (``kernels.utils.DECOMPOSITIONS``) plus :data:`EXPORT_ATEN_DECOMPOSITIONS`.

    With ``keep_triton_ops`` the ops registered with ``torch.library.triton_op`` are left in place (AOTInductor
    on CUDA compiles their Triton kernels into the package).
    """
    from ..kernels.utils import DECOMPOSITIONS
    table = dict(EXPORT_ATEN_DECOMPOSITIONS)
    triton_names = _triton_op_names() if keep_triton_ops else set()
    for op, fn in DECOMPOSITIONS.items():
        if _op_name(op) not in triton_names:
            table[op] = fn
    return table


def _triton_op_names() -> set:
    try:  # private registry of torch.library.triton_op (torch >= 2.6); without it every op is decomposed
        from torch._library.triton import triton_ops_to_kernels
    except ImportError:
        return set()
    return set(triton_ops_to_kernels)


def _op_name(op) -> str:
    schema = getattr(op, "_schema", None)
    return schema.name if schema is not None else str(op)


def foreign_ops(ep: torch.export.ExportedProgram, allowed: Tuple[str, ...] = ("aten",)) -> List[str]:
    """Names of the call targets in ``ep`` that are neither in an allowed op namespace nor Python builtins."""
    found = []
    for node in ep.graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            if target.namespace not in allowed:
                found.append(_op_name(target))
        elif isinstance(target, torch._ops.HigherOrderOperator):
            found.append(f"higher-order op {target.name()}")
        elif getattr(target, "__module__", None) not in (operator.__name__, "_operator", "builtins", "math", "torch"):
            found.append(f"{getattr(target, '__module__', '?')}.{getattr(target, '__name__', target)}")
    return sorted(set(found))


def decompose(ep: torch.export.ExportedProgram, *, keep_triton_ops: bool = False,
              what: str = "this export") -> torch.export.ExportedProgram:
    """Replace every fused op by aten ops (see :func:`decomposition_table`) and check nothing else remains.

    Raises:
        ValueError naming each op that has no decomposition.
    """
    ep = ep.run_decompositions(decomposition_table(keep_triton_ops))
    allowed = ("aten",)
    if keep_triton_ops:
        allowed = allowed + tuple(sorted({n.split("::")[0] for n in _triton_op_names()}))
    left = [n for n in foreign_ops(ep, allowed)
            if not (keep_triton_ops and n == "higher-order op triton_kernel_wrapper_functional")]
    if left:
        raise ValueError(f"{what} needs every op in standard aten form, but the graph still holds "
                         f"{', '.join(left)}: register an aten decomposition of each with "
                         f"kernels.utils.register_decomposition(op, fn)")
    return ep
