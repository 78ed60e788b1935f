"""``atexport bench``: well-formed JSON, percentiles in order, a PyTorch baseline in the same run."""

from __future__ import annotations

import json

import pytest

from atexport.errors import BadInputError


@pytest.fixture(scope="session")
def bench_onnx(tiny_ckpt, tmp_path_factory):
    from atexport.export.onnx import export_onnx
    from atexport.export.settings import ExportSettings

    return export_onnx(tiny_ckpt, tmp_path_factory.mktemp("bench") / "tiny.onnx", ExportSettings(verify=False)).path


def test_bench_json_is_well_formed(tiny_ckpt, bench_onnx, tmp_path):
    from atexport.benchmark import BENCH_FORMAT, BenchSettings, benchmark

    out = tmp_path / "bench.json"
    res = benchmark(tiny_ckpt, onnx=bench_onnx, output_json=out,
                    settings=BenchSettings(batches="1,3", runs=4, warmup=1, threads=1, openvino=False))
    doc = json.loads(out.read_text())
    assert doc["format"] == BENCH_FORMAT and doc["format_version"] == 1
    m = doc["machine"]
    assert m["cpu"] and m["cores"] >= 1 and "onnxruntime" in m["libraries"] and "torch" in m["libraries"]
    assert isinstance(m["gpus"], list)
    assert doc["config"]["runs"] == 4 and doc["config"]["warmup"] == 1 and doc["config"]["batches"] == [1, 3]
    rows = {(r["backend"], r["batch"]): r for r in doc["rows"]}
    from atexport.utils.machine import has_amx

    want = {("pytorch", 1), ("pytorch", 3), ("onnxruntime", 1), ("onnxruntime", 3)}
    want |= {("pytorch-bf16", 1), ("pytorch-bf16", 3)} if has_amx() else set()  # BF16 autocast, where AMX runs it
    assert set(rows) == want
    for r in doc["rows"]:
        lat = r["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert r["runs"] == 4 and r["throughput"] == pytest.approx(r["batch"] / (lat["mean"] / 1000))
        assert r["speedup"] == pytest.approx(rows[("pytorch", r["batch"])]["latency_ms"]["mean"] / lat["mean"])
    assert rows[("pytorch", 1)]["speedup"] == 1.0 and rows[("onnxruntime", 3)]["path"] == str(bench_onnx)
    assert "onnxruntime fp32" in res.table() and "p99 ms" in res.table()


def test_bench_cli_and_its_errors(tiny_ckpt, bench_onnx, tmp_path):
    from click.testing import CliRunner

    from atexport.benchmark import parse_batches
    from atexport.cli import cli

    runner = CliRunner()
    out = tmp_path / "b.json"
    res = runner.invoke(cli, ["bench", "--ckpt", str(tiny_ckpt), "--onnx", str(bench_onnx), "--batch", "2",
                              "--runs", "2", "--warmup", "0", "--threads", "1", "--json", str(out), "--no-openvino"])
    assert res.exit_code == 0, res.output
    assert "machine:" in res.output and "pytorch eager fp32" in res.output and out.is_file()
    assert {r["batch"] for r in json.loads(out.read_text())["rows"]} == {2}
    assert "openvino" not in {r["backend"] for r in json.loads(out.read_text())["rows"]}
    assert parse_batches("1, 8,8") == [1, 8]
    for bad in ("0", "x", ""):
        with pytest.raises(BadInputError, match="--batch"):
            parse_batches(bad)
    res = runner.invoke(cli, ["bench", "--ckpt", str(tiny_ckpt), "--onnx", str(bench_onnx), "--batch", "1,zero"])
    assert res.exit_code == 2 and "--batch 1,zero" in res.output and "Traceback" not in res.output
    res = runner.invoke(cli, ["bench", "--ckpt", str(tmp_path / "none.pt")])
    assert res.exit_code == 2 and "none.pt" in res.output and "Traceback" not in res.output


def test_bench_times_openvino_at_every_precision_in_one_run(tiny_ckpt, bench_onnx, tmp_path):
    pytest.importorskip("openvino", reason="needs the openvino package: pip install 'atexport[openvino]'")
    from atexport.benchmark import BenchSettings, benchmark, cpu_has_bf16
    from atexport.export.precision import Int8Options, quantize_int8
    from atexport.utils.machine import has_amx

    q = quantize_int8(bench_onnx, tmp_path / "tiny.int8.onnx", "digits", verify=False,
                      options=Int8Options(count=64, keep_float="none")).path
    res = benchmark(tiny_ckpt, onnx=bench_onnx, onnx_int8=q,
                    settings=BenchSettings(batches="2", runs=2, warmup=1, threads=1))
    got = [(r.backend, r.precision) for r in res.rows]
    bf16 = cpu_has_bf16()
    want = [("pytorch", "fp32")] + ([("pytorch-bf16", "bf16")] if has_amx() else []) + [
        ("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("openvino", "fp32")] + ([("openvino", "bf16")] if bf16 else [])
    want += [("openvino", "int8")] + ([("openvino", "int8+bf16")] if bf16 else [])
    assert got == want
    assert all(r.device == "cpu" and r.latency_ms["p50"] > 0 and r.speedup for r in res.rows)
    assert res.config["openvino"] == sorted(p for b, p in want if b == "openvino")
    table = res.table()
    assert "openvino int8" in table and ("openvino int8+bf16" in table) == bf16
    if has_amx():
        assert "pytorch eager bf16 autocast" in table
    with pytest.raises(BadInputError, match="Q/DQ"):  # an FP32 file is never labelled int8
        from atexport.runtime.artifacts import Artifact, read_artifact

        read_artifact(Artifact(bench_onnx, "--openvino", "int8", "openvino"))
