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

    from atexport.artifact.metadata import read_onnx_metadata, write_onnx_metadata

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
    from atexport.deploy import TritonOptions, parse_pbtxt, validate_triton_repo, write_triton_repo

    repo = write_triton_repo(small_onnx, tdir / "repo", TritonOptions(max_batch=16, preferred_batch=[4, 8]),
                             name="pets")
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
        ("backend", 17, F.TYPE_STRING, one, None), ("default_model_filename", 8, F.TYPE_STRING, one, None),
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
    from atexport.deploy import TritonOptions, write_triton_repo

    ModelConfig = triton_model_config_class()
    repo = write_triton_repo(small_onnx, tdir / "repo_pb", TritonOptions(preferred_batch=[2, 4], instance_kind="cpu"),
                             name="pets")
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

    from atexport.deploy import TritonOptions, write_triton_repo
    from atexport.artifact.metadata import read_onnx_metadata

    mt = tdir / "multi.onnx"
    build_multitask_onnx(mt)
    repo = write_triton_repo(mt, tdir / "repo2", TritonOptions(max_batch=4))
    ins = {i["name"]: i for i in repo.config["input"]}
    assert ins["task_id"] == {"name": "task_id", "data_type": "TYPE_INT64", "dims": [1], "reshape": {"shape": []}}
    assert repo.labels_path is None and "label_filename" not in repo.config["output"][0]
    meta = asdict(read_onnx_metadata(onnx.load(str(mt))))
    meta["tasks"] = None
    engine = fake_engine(tdir, meta)
    repo = write_triton_repo(engine, tdir / "repo2", TritonOptions(max_batch=8), name="eng")
    assert repo.config["platform"] == "tensorrt_plan" and repo.model_path.name == "model.plan"
    assert repo.config["instance_group"][0]["kind"] == "KIND_GPU" and repo.config["max_batch_size"] == 8
    with pytest.raises(BadInputError, match="profile stops at batch 8"):
        write_triton_repo(engine, tdir / "repo2", TritonOptions(max_batch=16), name="eng2")


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


# ------------------------------------------------------------------------------------------- engines (issue 12)


def _engine_from(tdir, onnx_path, name, batch):
    """An engine file with the sidecar 'atexport trt --batch BATCH' writes for ``onnx_path`` (no TensorRT)."""
    import hashlib

    import onnx

    from atexport.artifact.metadata import read_onnx_metadata
    from atexport.artifact.sidecar import sidecar_path
    from atexport.export.tensorrt.plan import EngineOptions, engine_sidecar, plan_build

    meta = read_onnx_metadata(onnx.load(str(onnx_path)))
    engine = tdir / f"{name}.engine"
    engine.write_bytes(name.encode())
    side = engine_sidecar(meta, plan_build(meta, "10.13.3.9", EngineOptions(batch=batch)),
                          device={"name": "NVIDIA L4", "compute_capability": [8, 9]}, engine_path=engine,
                          engine_sha256=hashlib.sha256(name.encode()).hexdigest(), engine_bytes=len(name),
                          onnx_path=onnx_path, onnx_sha256=None)
    sidecar_path(engine).write_text(json.dumps(side))
    return engine


def test_multitask_engine_declares_every_input(tdir):
    """A multi-task engine takes the image and int64 task_id: both are declared (Triton refuses a request otherwise)."""
    text_format = pytest.importorskip("google.protobuf.text_format", reason="protobuf not installed")
    from atexport.deploy import write_triton_repo

    mt = tdir / "mt_engine.onnx"
    build_multitask_onnx(mt)
    engine = _engine_from(tdir, mt, "mt_dyn", "1,4,16")
    repo = write_triton_repo(engine, tdir / "repo_eng", name="mt")
    ins = {i["name"]: i for i in repo.config["input"]}
    assert ins["input"] == {"name": "input", "data_type": "TYPE_FP32", "dims": [3, 32, 32]}
    assert ins["task_id"] == {"name": "task_id", "data_type": "TYPE_INT64", "dims": [1], "reshape": {"shape": []}}
    assert repo.config["max_batch_size"] == 16  # dynamic: the profile's maximum
    cfg = text_format.Parse(repo.config_path.read_text(), triton_model_config_class()())
    assert [i.name for i in cfg.input] == ["input", "task_id"] and cfg.input[1].data_type == 9


def test_fixed_batch_engine_has_max_batch_size_zero(tdir):
    from atexport.deploy import TritonOptions, write_triton_repo

    mt = tdir / "mt_fixed.onnx"
    build_multitask_onnx(mt)
    engine = _engine_from(tdir, mt, "mt_fixed", "4")  # profile min = max = 4
    repo = write_triton_repo(engine, tdir / "repo_fixed", name="fixed")
    ins = {i["name"]: i for i in repo.config["input"]}
    assert repo.config["max_batch_size"] == 0 and "dynamic_batching" not in repo.config
    assert ins["input"]["dims"] == [4, 3, 32, 32] and ins["task_id"] == {"name": "task_id", "data_type": "TYPE_INT64",
                                                                         "dims": [4]}
    assert repo.config["output"][0]["dims"] == [4, 5]
    with pytest.raises(BadInputError, match="--max-batch applies to dynamic-batch models.*fixed batch of 4"):
        write_triton_repo(engine, tdir / "repo_fixed", TritonOptions(max_batch=4), name="fixed2")


@pytest.mark.parametrize("kwargs, match", [
    ({"preferred_batch": [64], "max_batch": 8}, r"\[64\] exceed max_batch_size 8"),
    ({"preferred_batch": [0]}, "must be at least 1"),
    ({"max_queue_delay_us": -1}, "must be 0 or more"),
    ({"instances": 0}, "at least 1"),
])
def test_triton_options_validated_and_nothing_written(small_onnx, tdir, kwargs, match):
    from atexport.deploy import TritonOptions, write_triton_repo

    out = tdir / "repo_bad"
    with pytest.raises(BadInputError, match=match):
        write_triton_repo(small_onnx, out, TritonOptions(**kwargs), name="bad")
    assert not (out / "bad").exists() and not [p for p in out.glob(".*")] if out.exists() else True


def test_engine_profile_must_start_at_one_and_cpu_is_refused(tdir, small_onnx):
    from atexport.deploy import TritonOptions, write_triton_repo

    engine = _engine_from(tdir, small_onnx, "from2", "2,4,8")
    with pytest.raises(BadInputError, match="starts at batch 2.*--batch 1,2,8"):
        write_triton_repo(engine, tdir / "repo_p")
    with pytest.raises(BadInputError, match="GPU only"):
        write_triton_repo(_engine_from(tdir, small_onnx, "ok", "1,4,8"), tdir / "repo_p",
                          TritonOptions(instance_kind="cpu"))


def test_failed_write_leaves_no_model_folder(small_onnx, tdir, monkeypatch):
    """A config that fails the read-back leaves nothing behind, and the next run works."""
    import atexport.deploy.triton as tri

    out = tdir / "repo_atomic"
    real = tri.render_config
    monkeypatch.setattr(tri, "render_config", lambda cfg: real({**cfg, "name": "wrong"}))
    with pytest.raises(BadInputError, match="not the folder's 'pets'"):
        tri.write_triton_repo(small_onnx, out, name="pets")
    assert list(out.iterdir()) == []
    monkeypatch.setattr(tri, "render_config", real)
    repo = tri.write_triton_repo(small_onnx, out, name="pets")
    assert repo.model_path.is_file() and sorted(p.name for p in out.iterdir()) == ["pets"]
    # --force replaces it whole
    repo = tri.write_triton_repo(small_onnx, out, tri.TritonOptions(max_batch=4), name="pets", force=True)
    assert repo.config["max_batch_size"] == 4 and sorted(p.name for p in out.iterdir()) == ["pets"]


def test_cli_quotes_the_serve_command(small_onnx, tmp_path):
    import shlex

    from click.testing import CliRunner

    from atexport.cli import cli

    out = tmp_path / "my repo"
    res = CliRunner().invoke(cli, ["triton", "--model", str(small_onnx), "-o", str(out), "--name", "p"])
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("serve it with:"))
    assert shlex.split(line.split(":", 1)[1]) == ["tritonserver", f"--model-repository={out.resolve()}"]
    res = CliRunner().invoke(cli, ["triton", "--model", str(small_onnx), "-o", str(out), "--name", "q",
                                   "--preferred-batch", "64", "--max-batch", "8"])
    assert res.exit_code == 2 and "exceed max_batch_size 8" in res.output and not (out / "q").exists()


# ---------------------------------------------------------------------------------------------- OpenVINO backend


def _ir(src, out, precision=None):
    pytest.importorskip("openvino", reason="needs the openvino package: pip install 'atexport[openvino]'")
    from atexport.export.openvino import to_openvino

    return to_openvino(src, out, precision=precision, verify=False, cache_dir=False).path


def _params(cfg) -> dict:
    ps = cfg["parameters"]
    return {p["key"]: p["value"]["string_value"] for p in (ps if isinstance(ps, list) else [ps])}


def test_openvino_repository_reads_back(small_onnx, tdir):
    text_format = pytest.importorskip("google.protobuf.text_format", reason="protobuf not installed")
    from atexport.deploy import TritonOptions, validate_triton_repo, write_triton_repo

    ir = _ir(small_onnx, tdir / "ov" / "pets.xml")
    repo = write_triton_repo(ir, tdir / "repo_ov", TritonOptions(max_batch=4))
    d = tdir / "repo_ov" / "pets"
    assert repo.model_path == d / "1" / "model.xml" and (d / "1" / "model.bin").read_bytes() == ir.with_suffix(".bin").read_bytes()
    cfg = repo.config
    assert cfg["backend"] == "openvino" and cfg["default_model_filename"] == "model.xml" and "platform" not in cfg
    assert cfg["max_batch_size"] == 4 and cfg["instance_group"][0]["kind"] == "KIND_CPU"
    assert cfg["input"][0] == {"name": "input", "data_type": "TYPE_FP32", "dims": [3, 32, 32]}
    assert cfg["output"][0]["dims"] == [5] and cfg["output"][0]["label_filename"] == "labels.txt"
    params = _params(cfg)
    assert params["PERFORMANCE_HINT"] == "LATENCY" and "HINT_BF16" not in params  # an FP32 IR: no BF16 hint...
    assert any("no FP32 precision hint" in n for n in repo.notes)  # ...and the note that FP32 cannot be forced
    pb = text_format.Parse(repo.config_path.read_text(), triton_model_config_class()())
    assert pb.backend == "openvino" and pb.default_model_filename == "model.xml" and pb.platform == ""
    assert validate_triton_repo(d)["backend"] == "openvino"
    (d / "1" / "model.bin").unlink()
    with pytest.raises(BadInputError, match="weights model.bin"):
        validate_triton_repo(d)


def test_openvino_repository_bf16_and_multitask(tdir):
    from atexport.deploy import write_triton_repo
    from atexport.runtime.openvino import cpu_capabilities

    mt = tdir / "multi_ov.onnx"
    build_multitask_onnx(mt)
    repo = write_triton_repo(_ir(mt, tdir / "ov" / "multi.xml"), tdir / "repo_ov2", backend="openvino")
    ins = {i["name"]: i for i in repo.config["input"]}
    assert ins["task_id"] == {"name": "task_id", "data_type": "TYPE_INT64", "dims": [1], "reshape": {"shape": []}}
    if "BF16" not in cpu_capabilities():
        pytest.skip("this CPU cannot run BF16 in OpenVINO")
    repo = write_triton_repo(_ir(mt, tdir / "ov" / "multi.bf16.xml", "bf16"), tdir / "repo_ov2", name="bf")
    params = _params(repo.config)
    assert params["HINT_BF16"] == "YES" and params["PERFORMANCE_HINT"] == "LATENCY" and not repo.notes


@pytest.mark.parametrize("what,kwargs,match", [
    ("onnx", {"backend": "openvino"}, "atexport openvino --onnx"),
    ("ir", {"backend": "onnxruntime"}, "runs in openvino"),
    ("ir", {"instance_kind": "gpu"}, "CPU instances"),
    ("ir", {"backend": "tvm"}, "--backend tvm"),
    ("ir_no_bin", {}, "weights nobin.bin are missing"),
])
def test_openvino_repository_refusals(what, kwargs, match, small_onnx, tdir):

    src = small_onnx
    if what != "onnx":
        src = _ir(small_onnx, tdir / "ov" / "refuse.xml")
    if what == "ir_no_bin":
        src = tdir / "ov" / "nobin.xml"
        src.write_bytes((tdir / "ov" / "refuse.xml").read_bytes())
    out = tdir / f"repo_refuse_{what}"
    with pytest.raises(BadInputError, match=match):
        _write_split(src, out, name="x", **kwargs)
    assert not (out / "x").exists()


def test_cli_openvino_prints_the_bf16_note(small_onnx, tdir, tmp_path):
    from click.testing import CliRunner

    from atexport.cli import cli

    ir = _ir(small_onnx, tdir / "ov" / "cli.xml")
    res = CliRunner().invoke(cli, ["triton", "--model", str(ir), "-o", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert "(openvino)" in res.output and "note: Triton's OpenVINO backend takes no FP32 precision hint" in res.output


def _write_split(src, out, name, **kwargs):
    """write_triton_repo with its options given as keywords (for tables of cases)."""
    from atexport.deploy import TritonOptions, write_triton_repo

    keys = ("max_batch", "preferred_batch", "instance_kind", "max_queue_delay_us", "instances", "version")
    opts = TritonOptions(**{k: v for k, v in kwargs.items() if k in keys})
    return write_triton_repo(src, out, opts, name=name, **{k: v for k, v in kwargs.items() if k not in keys})
