"""``atexport triton``: a model repository whose config.pbtxt parses back and matches the model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_runtime import build_multitask_onnx, fake_engine

from atexport.errors import BadInputError


@pytest.fixture(scope="session")
def tdir(tmp_path_factory):
    return tmp_path_factory.mktemp("triton")


@pytest.fixture(scope="session")
def small_onnx(tdir):
    """A single-task atexport ONNX model (hand-built: the repository needs its metadata, not a ViT)."""
    import onnx

    from atexport.metadata import read_onnx_metadata, write_onnx_metadata

    path = tdir / "mt.onnx"
    build_multitask_onnx(path)
    proto = onnx.load(str(path))
    meta = read_onnx_metadata(proto)
    # the same graph as a single-task model: task_id becomes a constant
    proto.graph.input.pop()
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(1, np.int64), "task_id"))
    meta.tasks, meta.num_classes, meta.class_names, meta.task = None, 5, ["cat", "dog", "owl", "fox", "emu"], "pets"
    write_onnx_metadata(proto, meta)
    out = tdir / "pets.onnx"
    onnx.save(proto, str(out))
    return out


def test_onnx_repository_reads_back(small_onnx, tdir):
    from atexport.deploy import parse_pbtxt, validate_triton_repo, write_triton_repo

    repo = write_triton_repo(small_onnx, tdir / "repo", name="pets", max_batch=16, preferred_batch=[4, 8])
    d = tdir / "repo" / "pets"
    assert repo.model_path == d / "1" / "model.onnx" and repo.model_path.read_bytes() == small_onnx.read_bytes()
    cfg = parse_pbtxt((d / "config.pbtxt").read_text())
    assert cfg["name"] == "pets" and cfg["platform"] == "onnxruntime_onnx" and cfg["max_batch_size"] == 16
    inp, out = cfg["input"], cfg["output"]
    inp, out = (inp[0] if isinstance(inp, list) else inp), (out[0] if isinstance(out, list) else out)
    assert inp == {"name": "input", "data_type": "TYPE_FP32", "dims": [3, 32, 32]}
    assert out == {"name": "logits", "data_type": "TYPE_FP32", "dims": [5], "label_filename": "labels.txt"}
    assert cfg["dynamic_batching"] == {"preferred_batch_size": [4, 8], "max_queue_delay_microseconds": 100}
    assert json.loads(cfg["parameters"]["value"]["string_value"])["input_size"] == [3, 32, 32]
    assert (d / "labels.txt").read_text().split() == ["cat", "dog", "owl", "fox", "emu"]
    assert json.loads((d / "atexport.json").read_text())["task"] == "pets"
    assert validate_triton_repo(d)["name"] == "pets"
    # a broken repository is caught by the read-back
    (d / "labels.txt").write_text("cat\ndog\n")
    with pytest.raises(BadInputError, match="2 labels for 5 classes"):
        validate_triton_repo(d)
    with pytest.raises(BadInputError, match="already exists"):
        write_triton_repo(small_onnx, tdir / "repo", name="pets")
    write_triton_repo(small_onnx, tdir / "repo", name="pets", force=True)
    assert validate_triton_repo(d)


def triton_model_config_class():
    """Triton's ``inference.ModelConfig`` (the fields atexport writes, with Triton's field numbers and enum
    values from model_config.proto), built at run time with protobuf so the text format is checked by
    protobuf's own parser, without tritonclient."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="atexport_test_model_config.proto", package="inference", syntax="proto3")
    dt = fdp.enum_type.add(name="DataType")
    for i, n in enumerate(["TYPE_INVALID", "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64",
                           "TYPE_INT8", "TYPE_INT16", "TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32"]):
        dt.value.add(name=n, number=i)

    def msg(name, fields, parent=None):
        m = (parent.nested_type if parent else fdp.message_type).add(name=name)
        for fname, num, ftype, label, tname in fields:
            f = m.field.add(name=fname, number=num, type=ftype, label=label)
            if tname:
                f.type_name = tname
        return m

    one, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    msg("ModelTensorReshape", [("shape", 1, F.TYPE_INT64, rep, None)])
    msg("ModelInput", [("name", 1, F.TYPE_STRING, one, None), ("data_type", 2, F.TYPE_ENUM, one, ".inference.DataType"),
                       ("dims", 4, F.TYPE_INT64, rep, None), ("reshape", 5, F.TYPE_MESSAGE, one, ".inference.ModelTensorReshape")])
    msg("ModelOutput", [("name", 1, F.TYPE_STRING, one, None), ("data_type", 2, F.TYPE_ENUM, one, ".inference.DataType"),
                        ("dims", 3, F.TYPE_INT64, rep, None), ("label_filename", 4, F.TYPE_STRING, one, None),
                        ("reshape", 5, F.TYPE_MESSAGE, one, ".inference.ModelTensorReshape")])
    msg("ModelDynamicBatching", [("preferred_batch_size", 1, F.TYPE_INT32, rep, None),
                                 ("max_queue_delay_microseconds", 2, F.TYPE_UINT64, one, None)])
    ig = msg("ModelInstanceGroup", [("name", 1, F.TYPE_STRING, one, None), ("count", 2, F.TYPE_INT32, one, None),
                                    ("kind", 4, F.TYPE_ENUM, one, ".inference.ModelInstanceGroup.Kind")])
    kind = ig.enum_type.add(name="Kind")
    for i, n in enumerate(["KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"]):
        kind.value.add(name=n, number=i)
    msg("ModelParameter", [("string_value", 1, F.TYPE_STRING, one, None)])
    cfg = msg("ModelConfig", [
        ("name", 1, F.TYPE_STRING, one, None), ("platform", 2, F.TYPE_STRING, one, None),
        ("max_batch_size", 4, F.TYPE_INT32, one, None), ("input", 5, F.TYPE_MESSAGE, rep, ".inference.ModelInput"),
        ("output", 6, F.TYPE_MESSAGE, rep, ".inference.ModelOutput"),
        ("instance_group", 7, F.TYPE_MESSAGE, rep, ".inference.ModelInstanceGroup"),
        ("dynamic_batching", 11, F.TYPE_MESSAGE, one, ".inference.ModelDynamicBatching"),
        ("parameters", 14, F.TYPE_MESSAGE, rep, ".inference.ModelConfig.ParametersEntry"),
    ])
    entry = msg("ParametersEntry", [("key", 1, F.TYPE_STRING, one, None),
                                    ("value", 2, F.TYPE_MESSAGE, one, ".inference.ModelParameter")], parent=cfg)
    entry.options.map_entry = True
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


def test_protobuf_text_format_accepts_it(small_onnx, tdir):
    """protobuf's text-format parser, on Triton's ModelConfig schema, reads what atexport writes."""
    text_format = pytest.importorskip("google.protobuf.text_format", reason="protobuf not installed")
    from atexport.deploy import write_triton_repo

    ModelConfig = triton_model_config_class()
    repo = write_triton_repo(small_onnx, tdir / "repo_pb", name="pets", preferred_batch=[2, 4], instance_kind="cpu")
    cfg = text_format.Parse(repo.config_path.read_text(), ModelConfig())
    assert cfg.name == "pets" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 8
    assert list(cfg.input[0].dims) == [3, 32, 32] and cfg.output[0].label_filename == "labels.txt"
    assert list(cfg.dynamic_batching.preferred_batch_size) == [2, 4] and cfg.instance_group[0].kind == 2
    assert '"input_size": [3, 32, 32]' in cfg.parameters["atexport.preprocess"].string_value
    mt = tdir / "multi_pb.onnx"
    build_multitask_onnx(mt)
    cfg = text_format.Parse(write_triton_repo(mt, tdir / "repo_pb").config_path.read_text(), ModelConfig())
    assert cfg.input[1].name == "task_id" and cfg.input[1].data_type == 9 and cfg.input[1].HasField("reshape")
    with pytest.raises(text_format.ParseError):  # the schema is strict: a misspelt field is caught
        text_format.Parse('name: "x"\nmax_batchsize: 8', ModelConfig())


def test_multitask_and_engine_repositories(tdir):
    from dataclasses import asdict

    import onnx

    from atexport.deploy import write_triton_repo
    from atexport.metadata import read_onnx_metadata

    mt = tdir / "multi.onnx"
    build_multitask_onnx(mt)
    repo = write_triton_repo(mt, tdir / "repo2", max_batch=4)
    ins = {i["name"]: i for i in repo.config["input"]}
    assert ins["task_id"] == {"name": "task_id", "data_type": "TYPE_INT64", "dims": [1], "reshape": {"shape": []}}
    assert repo.labels_path is None and "label_filename" not in repo.config["output"][0]
    meta = asdict(read_onnx_metadata(onnx.load(str(mt))))
    meta["tasks"] = None
    engine = fake_engine(tdir, meta)
    repo = write_triton_repo(engine, tdir / "repo2", name="eng", max_batch=8)
    assert repo.config["platform"] == "tensorrt_plan" and repo.model_path.name == "model.plan"
    assert repo.config["instance_group"][0]["kind"] == "KIND_GPU" and repo.config["max_batch_size"] == 8
    with pytest.raises(BadInputError, match="profile stops at batch 8"):
        write_triton_repo(engine, tdir / "repo2", name="eng2", max_batch=16)


def test_pbtxt_parser_and_cli(small_onnx, tdir):
    from click.testing import CliRunner

    from atexport.cli import cli
    from atexport.deploy import parse_pbtxt

    got = parse_pbtxt('# comment\nname: "a\\"b"  x { y: [1, 2] } x { y: 3 }\nz [ { k: KIND_GPU }, { k: 2.5 } ] t: true')
    assert got == {"name": 'a"b', "x": [{"y": [1, 2]}, {"y": 3}], "z": [{"k": "KIND_GPU"}, {"k": 2.5}], "t": True}
    for bad in ('name: "x" }', "input [ { name: ", "name"):
        with pytest.raises(BadInputError, match="config.pbtxt"):
            parse_pbtxt(bad)
    runner = CliRunner()
    res = runner.invoke(cli, ["triton", "--model", str(small_onnx), "-o", str(tdir / "cli_repo"), "--name", "p"])
    assert res.exit_code == 0, res.output
    assert "onnxruntime_onnx" in res.output and (tdir / "cli_repo" / "p" / "config.pbtxt").is_file()
    res = runner.invoke(cli, ["triton", "--model", str(tdir / "none.onnx"), "-o", str(tdir / "x")])
    assert res.exit_code == 2 and "none.onnx: no such file" in res.output and "Traceback" not in res.output
