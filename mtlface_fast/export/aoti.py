"""AOTInductor: a ``.pt2`` package (compiled kernels + weights) that Python and the C++ runner load.

On CPU every fused op is replaced by its aten decomposition before compiling (the package then holds
only Inductor's C++ kernels); on CUDA the ``torch.library.triton_op`` ops stay in the graph so their
Triton kernels are compiled into the package. The export spec goes into the package metadata, both as
JSON (``mtlface_fast.export_spec``) and as flat keys (``mtlface_fast.entry``, ``.min_batch``, ...) that
cpp/mtlface_infer.cpp reads. A package is bound to the torch version and device (GPU architecture) that
built it.
"""
from __future__ import annotations

import inspect
import os
from typing import Optional

import torch

from ..checkpoint import atomic_write
from ..errors import MissingDependencyError, UsageError
from .program import SPEC_KEY, ExportSpec, decompose, dtype_name, export_program

MIN_TORCH = (2, 6)


def _torch_version() -> tuple:
    parts = []
    for piece in torch.__version__.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _inductor():
    """``torch._inductor`` with the packaging API (a private module: checked by version and by name)."""
    import torch._inductor as inductor
    if _torch_version() < MIN_TORCH or not hasattr(inductor, "aoti_compile_and_package") \
            or not hasattr(inductor, "aoti_load_package"):
        raise MissingDependencyError(f"AOTInductor packages need torch >= {'.'.join(map(str, MIN_TORCH))} "
                                     f"(aoti_compile_and_package / aoti_load_package); this is torch "
                                     f"{torch.__version__}")
    return inductor


def _metadata(spec: ExportSpec) -> dict:
    flat = {f"mtlface_fast.{k}": str(getattr(spec, k)) for k in
            ("entry", "min_batch", "opt_batch", "max_batch", "dtype", "device", "input_size", "age_group")}
    flat[SPEC_KEY] = spec.to_json()
    return flat


def export_aoti(model, path: str, entry: str = "recognition", *, min_batch: int = 1, opt_batch: Optional[int] = None,
                max_batch: int = 64, dtype=torch.float32, device=None,
                inductor_configs: Optional[dict] = None) -> ExportSpec:
    """Compile ``entry`` of ``model`` into an AOTInductor package at ``path`` (``.pt2``).

    Args:
        model: an :class:`mtlface_fast.MTLFace`.
        path: the package file; must end in ``.pt2`` (written atomically).
        entry: ``"recognition"`` or ``"synthesis"``.
        min_batch, opt_batch, max_batch: batch range of the package.
        dtype: fp32 on CPU; fp32, fp16 or bf16 on CUDA.
        device: ``"cpu"`` or ``"cuda[:i]"`` (default: the model's device).
        inductor_configs: extra Inductor options (e.g. ``{"aot_inductor.compile_wrapper_opt_level": "O0"}``
            compiles the wrapper faster).

    Returns:
        The :class:`ExportSpec` stored in the package.
    """
    inductor = _inductor()
    path = os.fspath(path)
    if not path.endswith(".pt2"):
        raise ValueError(f"path must end in .pt2 (an AOTInductor package), got {path!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    name = dtype_name(dtype)
    if device.type == "cpu" and name != "fp32":
        raise ValueError(f"AOTInductor CPU packages are fp32 only, got dtype {name}; use device='cuda' for fp16/bf16")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("device cuda was requested but CUDA is not available; use device='cpu'")
    ep, spec = export_program(model, entry, min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
                              dtype=name, device=device)
    spec = spec.replace(target="aoti")
    ep = decompose(ep, keep_triton_ops=device.type == "cuda", what=f"the AOTInductor {device.type} package")
    configs = dict(inductor_configs or {})
    configs["aot_inductor.metadata"] = {**configs.get("aot_inductor.metadata", {}), **_metadata(spec)}
    atomic_write(path, lambda tmp: inductor.aoti_compile_and_package(ep, package_path=tmp, inductor_configs=configs),
                 keep_suffix=True)
    return spec


class AotiModel:
    """A loaded AOTInductor package: checks inputs against its spec, returns the entry's outputs."""

    def __init__(self, path: str, device_index: int = -1):
        inductor = _inductor()
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"AOTInductor package not found: {path}")
        self.path = path
        load = inductor.aoti_load_package
        kwargs = {"device_index": device_index} if "device_index" in inspect.signature(load).parameters else {}
        self.compiled = load(path, **kwargs)
        meta = self.compiled.loader.get_metadata()
        if SPEC_KEY not in meta:
            raise ValueError(f"{path} was not written by mtlface_fast.export.export_aoti (no {SPEC_KEY} metadata)")
        self.spec = ExportSpec.from_json(meta[SPEC_KEY])

    def __call__(self, *inputs: torch.Tensor):
        self.spec.check_inputs(*inputs)
        if any(t.device.type != self.spec.device for t in inputs):
            raise ValueError(f"this package runs on {self.spec.device}; move the inputs there "
                             f"(got {', '.join(str(t.device) for t in inputs)})")
        with torch.inference_mode():
            outs = self.compiled(*inputs)
        outs = tuple(outs) if isinstance(outs, (list, tuple)) else (outs,)
        return outs if len(outs) > 1 else outs[0]


def load_aoti(path: str, device_index: int = -1) -> AotiModel:
    """Open a package written by :func:`export_aoti`."""
    return AotiModel(path, device_index)
