"""``mtlface-fast export --target triton-repo --out REPO/``: a model repository for NVIDIA Triton Inference Server.

    REPO/
      recognition/config.pbtxt        images -> embedding, age          (platform onnxruntime_onnx)
      recognition/1/model.onnx
      synthesis/config.pbtxt          images, target_group -> image     (platform onnxruntime_onnx)
      synthesis/1/model.onnx
      recognition_trt/, synthesis_trt/  the same as TensorRT plans (tensorrt_plan), where TensorRT and a GPU are
                                      present; a plan is bound to the GPU and TensorRT version that built it
      repository.json                 what was written, and why a TensorRT plan was not

Each ONNX file comes from :func:`mtlface_fast.export.export_onnx` (fp32, dynamic batch 1..max_batch). Each
``config.pbtxt`` is written from the exported graph itself: its input and output names, element types and shapes
(the batch dimension left to ``max_batch_size``; a per-sample scalar -- the age, the target group -- is declared
``dims: [ 1 ]`` with ``reshape { shape: [ ] }``, Triton's way for rank-1 batched tensors), with
``dynamic_batching`` (preferred batch sizes, queue delay) and an ``instance_group``. Images are (3, S, S) float32
in [-1, 1] (:func:`mtlface_fast.preprocess`); the target group is int64.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Dict, List, Optional, Sequence

ENTRIES = ("recognition", "synthesis")
ONNX_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 16: "TYPE_BF16", 7: "TYPE_INT64", 6: "TYPE_INT32", 9: "TYPE_BOOL"}
KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}


def graph_io(path: str) -> Dict[str, List[Dict]]:
    """Names, Triton data types and shapes (batch dimension first, as a name) of an ONNX file's inputs and
    outputs."""
    import onnx
    proto = onnx.load(os.fspath(path), load_external_data=False)

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            if t.elem_type not in ONNX_TYPES:
                raise ValueError(f"{path}: {v.name} has ONNX element type {t.elem_type}, which this writer does not "
                                 f"map to a Triton type")
            dims = [d.dim_param if d.HasField("dim_param") else int(d.dim_value) for d in t.shape.dim]
            out.append({"name": v.name, "data_type": ONNX_TYPES[t.elem_type], "shape": dims})
        return out
    return {"input": describe(proto.graph.input), "output": describe(proto.graph.output)}


def _tensor_block(t: Dict) -> str:
    batch, rest = t["shape"][0], t["shape"][1:]
    if not isinstance(batch, str):
        raise ValueError(f"{t['name']}: the first dimension must be the dynamic batch, got shape {t['shape']}")
    if any(not isinstance(d, int) or d < 1 for d in rest):
        raise ValueError(f"{t['name']}: dimensions after the batch must be fixed, got shape {t['shape']}")
    dims = ", ".join(str(d) for d in rest) if rest else "1"
    reshape = "" if rest else "\n    reshape { shape: [ ] }"
    return f'  {{\n    name: "{t["name"]}"\n    data_type: {t["data_type"]}\n    dims: [ {dims} ]{reshape}\n  }}'


def config_text(name: str, io: Dict[str, List[Dict]], *, platform: str, max_batch: int,
                preferred: Sequence[int], queue_delay_us: int, kind: str, count: int) -> str:
    """The ``config.pbtxt`` of one model (protobuf text format of Triton's ``ModelConfig``)."""
    lines = [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {max_batch}",
             "input [\n" + ",\n".join(_tensor_block(t) for t in io["input"]) + "\n]",
             "output [\n" + ",\n".join(_tensor_block(t) for t in io["output"]) + "\n]",
             "dynamic_batching {\n  preferred_batch_size: [ " + ", ".join(str(b) for b in preferred)
             + f" ]\n  max_queue_delay_microseconds: {queue_delay_us}\n}}",
             f"instance_group [\n  {{\n    count: {count}\n    kind: {KINDS[kind]}\n  }}\n]"]
    return "\n".join(lines) + "\n"


def parse_config(path: str):
    """A ``config.pbtxt`` parsed against Triton's own schema (tritonclient's ``model_config_pb2``)."""
    from google.protobuf import text_format

    from . import require
    pb = require("tritonclient.grpc.model_config_pb2", "checking a config.pbtxt")
    with open(path, encoding="utf-8") as fh:
        return text_format.Parse(fh.read(), pb.ModelConfig())


def export_triton_repo(model, repo: str, *, entries: Sequence[str] = ENTRIES, max_batch: int = 64,
                       preferred: Optional[Sequence[int]] = None, queue_delay_us: int = 2000, kind: str = "gpu",
                       count: int = 1, tensorrt: Optional[bool] = None, trt_dtype: str = "fp16",
                       log=print) -> Dict:
    """Write the model repository ``repo`` (see the module doc); returns what repository.json holds.

    Args:
        model: an :class:`mtlface_fast.MTLFace` (exported as :func:`mtlface_fast.export.export_onnx` takes it).
        entries: which models to write.
        max_batch: the largest batch of every model (the ONNX graphs accept 1..max_batch).
        preferred: dynamic batching's preferred batch sizes (default: max_batch and half of it).
        queue_delay_us: the longest a request waits in Triton's queue for a batch to fill.
        kind, count: ``instance_group``: "gpu" or "cpu", and instances per device.
        tensorrt: also TensorRT plans; None means where TensorRT and a GPU are present.
    """
    from ..checkpoint import atomic_write
    from ..export import export_onnx
    from ..export.tensorrt import tensorrt_available
    bad = [e for e in entries if e not in ENTRIES]
    if bad or not entries:
        raise ValueError(f"entries must be a non-empty subset of {ENTRIES}, got {list(entries)!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
    preferred = sorted({max(1, max_batch // 2), max_batch}) if preferred is None else sorted(set(preferred))
    if not preferred or any(isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= max_batch
                            for b in preferred):
        raise ValueError(f"preferred batch sizes must be ints in 1..{max_batch}, got {preferred!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}")
    if os.path.exists(repo) and not os.path.isdir(repo):
        raise ValueError(f"--out {repo} exists and is not a folder")
    ok, why = tensorrt_available()
    if tensorrt and not ok:
        from ..errors import MissingDependencyError
        raise MissingDependencyError(f"TensorRT plans were asked for but {why}")
    tensorrt = ok if tensorrt is None else tensorrt
    batching = dict(max_batch=max_batch, preferred=preferred, queue_delay_us=queue_delay_us, kind=kind, count=count)
    written = {"models": {}, "tensorrt": None if tensorrt else why, "max_batch": max_batch}
    for entry in entries:
        path = os.path.join(repo, entry, "1", "model.onnx")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        log(f"exporting {entry} -> {path}")
        spec = export_onnx(model, path, entry, min_batch=1, max_batch=max_batch)
        io = graph_io(path)
        text = config_text(entry, io, platform="onnxruntime_onnx", **batching)
        atomic_write(os.path.join(repo, entry, "config.pbtxt"), lambda tmp, t=text: open(tmp, "w").write(t))
        written["models"][entry] = {"platform": "onnxruntime_onnx", "file": f"{entry}/1/model.onnx", **io,
                                    "spec": json.loads(spec.to_json())}
        if tensorrt:
            written["models"][f"{entry}_trt"] = _tensorrt_model(model, repo, entry, io, batching, trt_dtype, log)
    atomic_write(os.path.join(repo, "repository.json"),
                 lambda tmp: open(tmp, "w").write(json.dumps(written, indent=2) + "\n"))
    return written


def _tensorrt_model(model, repo: str, entry: str, io: Dict, batching: Dict, dtype: str, log) -> Dict:
    """``<entry>_trt/1/model.plan`` from :func:`mtlface_fast.export.export_tensorrt` (a serialized engine, the
    file Triton's tensorrt_plan platform loads) and its config; images in ``dtype`` where the engine takes it."""
    from ..checkpoint import atomic_write
    from ..export import export_tensorrt
    name = f"{entry}_trt"
    folder = os.path.join(repo, name, "1")
    os.makedirs(folder, exist_ok=True)
    engine = os.path.join(folder, "model.engine")
    log(f"building the TensorRT engine of {entry} ({dtype}) -> {folder}/model.plan")
    export_tensorrt(model.to("cuda"), engine, entry, dtype=dtype, min_batch=1, max_batch=batching["max_batch"],
                    opt_batch=batching["preferred"][-1])
    shutil.move(engine, os.path.join(folder, "model.plan"))
    for side in (engine + ".json",):
        if os.path.isfile(side):
            shutil.move(side, os.path.join(folder, "model.plan.json"))
    low = {"fp16": "TYPE_FP16", "bf16": "TYPE_BF16"}.get(dtype)
    trt_io = json.loads(json.dumps(io))
    if low:  # the images and the floating outputs are in the engine's precision
        for t in trt_io["input"] + trt_io["output"]:
            if t["data_type"] == "TYPE_FP32":
                t["data_type"] = low
    text = config_text(name, trt_io, platform="tensorrt_plan", **batching)
    atomic_write(os.path.join(repo, name, "config.pbtxt"), lambda tmp: open(tmp, "w").write(text))
    return {"platform": "tensorrt_plan", "file": f"{name}/1/model.plan", **trt_io}
