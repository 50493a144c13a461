"""``mtlface-fast export --target triton-repo``: every config.pbtxt parses against Triton's own schema (tritonclient's
model_config_pb2) and agrees with its ONNX graph, which ONNX Runtime runs at the configured shapes."""
import json
import os

import numpy as np
import pytest
import torch

import mtlface_fast
from mtlface_fast.cli import main
from mtlface_fast.export.tensorrt import tensorrt_available
from mtlface_fast.scale import triton_repo as T
from tests.scale_utils import ARCHS, save_model

pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="the scale extra (in the test extra)")
ort = pytest.importorskip("onnxruntime", reason="the test extra")
NP = {"TYPE_FP32": np.float32, "TYPE_INT64": np.int64}
MAX_BATCH = 3


def _load(arch, weights):
    return mtlface_fast.MTLFace.from_pretrained(weights) if arch == "cvpr" else \
        mtlface_fast.MTLFace.from_official(weights)


def _inputs(config, batch, age_group, seed):
    """Random inputs of every configured input at ``batch``, in the shape the graph sees (dims, or reshape)."""
    from tritonclient.grpc import model_config_pb2 as pb
    g = torch.Generator().manual_seed(seed)
    feeds = {}
    for t in config.input:
        dims = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
        dtype = NP[pb.DataType.Name(t.data_type)]
        if dtype == np.int64:
            feeds[t.name] = torch.randint(0, age_group, [batch] + dims, generator=g).numpy()
        else:
            feeds[t.name] = (torch.rand([batch] + dims, generator=g) * 2 - 1).numpy()
    return feeds


def check_repository(repo, model):
    """Parse each config.pbtxt, compare it with its ONNX graph, run the graph at batch 1 and max_batch_size against
    the PyTorch model."""
    from tritonclient.grpc import model_config_pb2 as pb
    with open(os.path.join(repo, "repository.json")) as fh:
        written = json.load(fh)
    onnx_models = [m for m, v in written["models"].items() if v["platform"] == "onnxruntime_onnx"]
    assert sorted(onnx_models) == ["recognition", "synthesis"]
    age_group = int(model.config["age_group"])
    for name in onnx_models:
        config = T.parse_config(os.path.join(repo, name, "config.pbtxt"))
        assert config.name == name and config.platform == "onnxruntime_onnx"
        assert config.max_batch_size == MAX_BATCH
        assert list(config.dynamic_batching.preferred_batch_size) == [1, MAX_BATCH]
        assert config.dynamic_batching.max_queue_delay_microseconds == 2000
        assert [(g.count, pb.ModelInstanceGroup.Kind.Name(g.kind)) for g in config.instance_group] == [(2, "KIND_CPU")]
        session = ort.InferenceSession(os.path.join(repo, name, "1", "model.onnx"), providers=["CPUExecutionProvider"])
        for declared, actual in ((config.input, session.get_inputs()), (config.output, session.get_outputs())):
            assert [t.name for t in declared] == [a.name for a in actual]
            for t, a in zip(declared, actual):
                dims = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
                assert a.shape[0] == "batch" and list(a.shape[1:]) == dims, (t.name, a.shape)
                want = {"TYPE_FP32": "tensor(float)", "TYPE_INT64": "tensor(int64)"}[pb.DataType.Name(t.data_type)]
                assert a.type == want
        for batch in (1, config.max_batch_size):
            feeds = _inputs(config, batch, age_group, seed=batch)
            outs = dict(zip([o.name for o in config.output], session.run(None, feeds)))
            x = torch.from_numpy(feeds["images"])
            with torch.no_grad():
                if name == "recognition":
                    enc = model.eval().encode(x)
                    want = {"embedding": enc.embedding, "age": enc.age}
                else:
                    want = {"image": model.eval().synthesize(x, torch.from_numpy(feeds["target_group"]))}
            for key, ref in want.items():
                got = torch.from_numpy(outs[key]).double()
                assert got.shape == ref.shape
                err = float((got - ref.double()).abs().max() / ref.double().abs().max())
                assert err < 1e-4, (name, key, batch, err)


@pytest.mark.parametrize("arch", ["cvpr", "tpami"])
def test_triton_repository_from_the_command_line(arch, tmp_path, capsys):
    weights = save_model(arch, tmp_path)
    repo = str(tmp_path / "repo")
    rc = main(["export", "--target", "triton-repo", "--out", repo, "--weights", weights, "--max-batch",
               str(MAX_BATCH), "--instance-kind", "cpu", "--instance-count", "2"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert sorted(os.listdir(repo)) == ["recognition", "repository.json", "synthesis"] or tensorrt_available()[0]
    check_repository(repo, _load(arch, weights))


def test_config_text_declares_scalars_per_sample_and_refuses_what_triton_cannot_batch():
    io = {"input": [{"name": "images", "data_type": "TYPE_FP32", "shape": ["batch", 3, 8, 8]},
                    {"name": "g", "data_type": "TYPE_INT64", "shape": ["batch"]}],
          "output": [{"name": "y", "data_type": "TYPE_FP32", "shape": ["batch", 4]}]}
    text = T.config_text("m", io, platform="onnxruntime_onnx", max_batch=8, preferred=[4, 8], queue_delay_us=100,
                         kind="gpu", count=1)
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb
    config = text_format.Parse(text, pb.ModelConfig())
    assert list(config.input[1].dims) == [1] and list(config.input[1].reshape.shape) == []
    assert list(config.input[0].dims) == [3, 8, 8] and not config.input[0].HasField("reshape")
    assert config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    with pytest.raises(ValueError, match="first dimension must be the dynamic batch"):
        T.config_text("m", {"input": [{"name": "x", "data_type": "TYPE_FP32", "shape": [2, 3]}], "output": []},
                      platform="p", max_batch=1, preferred=[1], queue_delay_us=0, kind="cpu", count=1)
    with pytest.raises(ValueError, match="must be fixed"):
        T.config_text("m", {"input": [{"name": "x", "data_type": "TYPE_FP32", "shape": ["b", "h"]}], "output": []},
                      platform="p", max_batch=1, preferred=[1], queue_delay_us=0, kind="cpu", count=1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(entries=("detector",)), "entries must be a non-empty subset"),
    (dict(max_batch=0), "max_batch must be a positive int"),
    (dict(max_batch=4, preferred=[8]), "preferred batch sizes must be ints in 1..4"),
    (dict(kind="tpu"), "kind must be one of"),
    (dict(count=0), "count must be a positive int"),
])
def test_bad_arguments_are_named(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        T.export_triton_repo(None, str(tmp_path / "repo"), **kwargs)


def test_tensorrt_plans_where_tensorrt_is_present(tmp_path):
    ok, why = tensorrt_available()
    model = mtlface_fast.MTLFace(backbone="ir34", input_size=112, age_group=4)
    if not ok:
        with pytest.raises(RuntimeError, match="TensorRT plans were asked for"):
            T.export_triton_repo(model, str(tmp_path / "repo"), tensorrt=True)
        pytest.skip(f"TensorRT is not available here: {why}")
    written = T.export_triton_repo(model, str(tmp_path / "repo"), max_batch=4)
    for name in ("recognition_trt", "synthesis_trt"):
        config = T.parse_config(str(tmp_path / "repo" / name / "config.pbtxt"))
        assert config.platform == "tensorrt_plan" and config.max_batch_size == 4
        assert os.path.getsize(tmp_path / "repo" / name / "1" / "model.plan") > 0
        assert written["models"][name]["platform"] == "tensorrt_plan"
