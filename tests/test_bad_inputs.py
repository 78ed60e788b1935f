"""Bad inputs and faults, one table row each: the command, how its input is built, the exit code, a word
the message must contain, and the files that must not exist afterwards.

Every row also asserts that no traceback reaches the user. A new command gets the same treatment by adding
rows. The models are built once per session from a tiny checkpoint (no parity check: these rows test
refusals, not exports).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from click.testing import CliRunner

from _bad_builders import (
    NO_FLAGS, _first_adapter_nan, ckpt_with, edit_run_pt, fake_run, import_official, official_ckpt,
    sweep_cell,
)
from _helpers import make_checkpoint

# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def models(tmp_path_factory, tiny_ckpt):
    """A fused and a separable ONNX model of ``tiny_ckpt`` (5 classes), its task .npz, and tampered copies."""
    from atexport.checkpoint import export_task_weights
    from atexport.export.onnx import export_onnx
    from atexport.export.settings import ExportSettings

    d = tmp_path_factory.mktemp("bad_models")
    export_onnx(tiny_ckpt, d / "fused.onnx", ExportSettings(verify=False))
    export_onnx(tiny_ckpt, d / "sep.onnx", ExportSettings(separable=True, verify=False))
    export_task_weights(tiny_ckpt, d / "task.npz")
    edits = {
        "four_classes": lambda m: m.update(num_classes=4, class_names=m["class_names"][:4]),
        "three_names": lambda m: (m.pop("num_classes"), m.update(class_names=m["class_names"][:3])),
        "list_doc": lambda m: [1, 2, 3],
        "empty_doc": lambda m: {},
        "mean_abc": lambda m: m["preprocess"].update(mean="abc"),
    }
    for name, fn in edits.items():
        _edit_metadata(d / "fused.onnx", d / f"{name}.onnx", fn)
    _edit_metadata(d / "sep.onnx", d / "sep_four_classes.onnx", edits["four_classes"])
    _edit_metadata(d / "sep.onnx", d / "sep_manifest.onnx",
                   lambda m: m["manifest"]["head.weight"].update(shape=[4, m["manifest"]["head.weight"]["shape"][1]]))
    _edit_metadata(d / "sep.onnx", d / "sep_list_doc.onnx", edits["list_doc"])
    _ir_with_metadata(d / "fused.onnx", d / "four_classes.xml", edits["four_classes"])
    return d


def _ir_with_metadata(src: Path, dst: Path, fn: Callable) -> None:
    """An OpenVINO IR of ``src`` whose atexport metadata (rt_info) is edited by ``fn``."""
    import openvino as ov

    from atexport.runtime.openvino import read_metadata, read_ov_model

    model = read_ov_model(src)
    doc = read_metadata(model).to_dict()
    fn(doc)
    model.set_rt_info(json.dumps(doc), "atexport")
    ov.save_model(model, str(dst), compress_to_fp16=False)


SWEEP = ["sweep", "--dataset", "digits", "--epochs", "1", "--warmup-epochs", "0", "--limit-train", "32",
         "--limit-eval", "16", "--no-progress", "--workers", "0", "--set", "model_args.depth=1"]


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory):
    """A finished sweep (ranks 1 and 2, seed 0, one epoch of 32 digits) made by the CLI, copied per row."""
    from atexport.cli import cli

    out = tmp_path_factory.mktemp("bad_sweep") / "sw"
    r = CliRunner().invoke(cli, [*SWEEP, "--ranks", "1,2", "-o", str(out)])
    assert r.exit_code == 0, r.output
    return out


def _edit_metadata(src: Path, dst: Path, fn: Callable) -> None:
    import onnx

    m = onnx.load(str(src))
    for p in m.metadata_props:
        if p.key == "atexport":
            doc = json.loads(p.value)
            out = fn(doc)
            p.value = json.dumps(out if isinstance(out, list) or out == {} else doc)
    onnx.save(m, str(dst))


@pytest.fixture(scope="session")
def nan_ckpt(ckpt_dir):
    """A checkpoint whose head holds NaN (a diverged run)."""
    import torch

    path = make_checkpoint(ckpt_dir / "nan.pt", num_classes=5, weight_seed=4)
    d = torch.load(path, weights_only=True)
    d["state_dict"]["head.weight"][0, 0] = float("nan")
    torch.save(d, path)
    return path


# ------------------------------------------------------------------------------------------ builders


def _full_regime_missing_backbone(doc) -> None:
    """A 'full' fine-tune whose backbone file is gone: only a refusal made before building the model passes."""
    doc["regime"] = "full"
    doc["model"]["source"] = {"kind": "file", "path": "/nonexistent/backbone.safetensors"}
    doc["backbone"]["source"] = doc["model"]["source"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def empty_file(d: Path, name: str) -> None:
    (d / name).write_bytes(b"")


def evil_pickle(d: Path, name: str) -> None:
    import torch

    torch.save({"model": {"head.weight": torch.zeros(2, 2)}, "evil": _Evil()}, d / name)


def bomb_png(d: Path, name: str = "bomb.png") -> None:
    from PIL import Image

    (d / name).parent.mkdir(parents=True, exist_ok=True)
    Image.new("1", (20000, 20000)).save(d / name)  # 48 kB, 400 megapixels


def small_png(d: Path, name: str = "ok.png") -> None:
    from PIL import Image

    (d / name).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)).save(d / name)


def sidecar(doc) -> Callable:
    def build(d: Path) -> None:
        (d / "m.engine").write_bytes(b"\0" * 16)
        (d / "m.engine.json").write_text(json.dumps(doc))
    return build


def image_folder(classes: dict[str, int], corrupt: str | None = None) -> Callable:
    """``d/ds/{train,test}/<class>/`` with ``n`` images per class; ``corrupt`` adds a broken file there."""
    def build(d: Path) -> None:
        for split in ("train", "test"):
            for c, n in classes.items():
                (d / "ds" / split / c).mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    small_png(d / "ds" / split / c, f"{i}.png")
        if corrupt:
            (d / "ds" / corrupt).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return build


def read_only_dir(d: Path) -> None:
    (d / "ro").mkdir()
    os.chmod(d / "ro", 0o555)


def blocking_file(d: Path) -> None:
    (d / "afile").write_text("not a folder")


QUICK_TRAIN = ["train", "--epochs", "1", "--warmup-epochs", "0", "--limit-train", "32", "--limit-eval", "16",
               "--no-progress", "--workers", "0", "--set", "model_args.depth=1"]


# ------------------------------------------------------------------------------------------ the table


@dataclass
class Case:
    id: str
    argv: list  # placeholders: {d} scratch folder, {m} models folder, {ckpt} tiny checkpoint, {nan} NaN checkpoint
    exit_code: int
    word: str
    build: Callable | None = None
    absent: list = field(default_factory=list)  # paths (with placeholders) that must not exist afterwards
    never: tuple = ("weights_only=False", "allow_pickle")  # advice that must never be printed
    skip: str | None = None
    unchanged: list = field(default_factory=list)  # paths whose bytes must be the same afterwards
    sweep: bool = False  # start from a copy of the tiny finished sweep at {d}/sw


ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


def _ort_providers() -> list[str]:
    import onnxruntime

    return onnxruntime.get_available_providers()


CASES = [
    # 1. empty (0-byte) checkpoints, in every command that reads one
    Case("empty-ckpt-export-task", ["export-task", "--ckpt", "{d}/e.pt", "-o", "{d}/x.npz"], 2, "empty",
         lambda d: empty_file(d, "e.pt"), ["{d}/x.npz"]),
    Case("empty-ckpt-onnx", ["onnx", "--ckpt", "{d}/e.pt", "-o", "{d}/x.onnx"], 2, "empty",
         lambda d: empty_file(d, "e.pt"), ["{d}/x.onnx"]),
    Case("empty-ckpt-swap", ["swap", "--onnx", "{m}/sep.onnx", "--ckpt", "{d}/e.pt", "-o", "{d}/x.onnx"], 2, "empty",
         lambda d: empty_file(d, "e.pt"), ["{d}/x.onnx"]),
    Case("empty-ckpt-predict-task", ["predict", "--model", "{m}/sep.onnx", "--task", "{d}/e.pt", "{d}/ok.png"], 2,
         "--task", lambda d: (empty_file(d, "e.pt"), small_png(d))),
    Case("empty-ckpt-resume", ["train", "--dataset", "digits", "-o", "{d}/run", "--resume", *QUICK_TRAIN[1:]], 2,
         "empty", lambda d: ((d / "run").mkdir(), empty_file(d / "run", "last.pt"),
                             (d / "run" / "config.yaml").write_text("dataset: digits\n"))),
    # 15. code-carrying pickles: refused, and torch's advice to disable the check never repeated
    Case("pickle-ckpt-export-task", ["export-task", "--ckpt", "{d}/evil.pt", "-o", "{d}/x.npz"], 2, "never loads",
         lambda d: evil_pickle(d, "evil.pt"), ["{d}/x.npz"]),
    Case("pickle-import-official", ["import-official", "--ckpt", "{d}/evil.pt", "--backbone", "vit_tiny_patch16_224",
                                    "-o", "{d}/x.pt"], 2, "never loads", lambda d: evil_pickle(d, "evil.pt"),
         ["{d}/x.pt"]),
    Case("pickle-npz-task", ["predict", "--model", "{m}/sep.onnx", "--task", "{d}/obj.npz", "{d}/ok.png"], 2,
         "pickled", lambda d: (np.savez(d / "obj.npz", a=np.array([{"x": 1}], dtype=object)), small_png(d))),
    # 4. decompression bombs
    Case("bomb-predict", ["predict", "--model", "{m}/fused.onnx", "{d}/bomb.png"], 2, "decompression bomb",
         bomb_png),
    Case("bomb-onnx-images", ["onnx", "--ckpt", "{ckpt}", "-o", "{d}/x.onnx", "--images", "{d}/imgs"], 2,
         "decompression bomb", lambda d: bomb_png(d, "imgs/bomb.png"), ["{d}/x.onnx", "{d}/x.failed.onnx"]),
    # 5, 6. a model whose graph disagrees with its metadata; class names of the wrong count
    Case("metadata-4-classes-predict", ["predict", "--model", "{m}/four_classes.onnx", "{d}/ok.png"], 2, "logits",
         small_png),
    Case("metadata-3-names-predict", ["predict", "--model", "{m}/three_names.onnx", "{d}/ok.png"], 2, "3 classes",
         small_png),
    Case("metadata-3-names-verify", ["verify", "--ckpt", "{ckpt}", "--onnx", "{m}/three_names.onnx", "--limit", "4"],
         2, "3 classes"),
    Case("separable-4-classes-predict-task", ["predict", "--model", "{m}/sep_four_classes.onnx", "--task",
                                              "{m}/task.npz", "{d}/ok.png"], 2, "logits", small_png),
    Case("separable-manifest-shape", ["predict", "--model", "{m}/sep_manifest.onnx", "{d}/ok.png"], 2, "shape",
         small_png),
    # 2. metadata of the wrong shape (validated by the lead's reader) across predict, swap, verify
    Case("metadata-list-predict", ["predict", "--model", "{m}/list_doc.onnx", "{d}/ok.png"], 2, "metadata",
         small_png),
    Case("metadata-empty-predict", ["predict", "--model", "{m}/empty_doc.onnx", "{d}/ok.png"], 2, "metadata",
         small_png),
    Case("metadata-mean-abc-predict", ["predict", "--model", "{m}/mean_abc.onnx", "{d}/ok.png"], 2,
         "preprocess.mean", small_png),
    Case("metadata-list-verify", ["verify", "--ckpt", "{ckpt}", "--onnx", "{m}/list_doc.onnx", "--limit", "4"], 2,
         "metadata"),
    Case("metadata-mean-abc-verify", ["verify", "--ckpt", "{ckpt}", "--onnx", "{m}/mean_abc.onnx", "--limit", "4"],
         2, "preprocess.mean"),
    Case("metadata-list-swap", ["swap", "--onnx", "{m}/sep_list_doc.onnx", "--ckpt", "{ckpt}", "-o", "{d}/x.onnx"],
         2, "metadata", absent=["{d}/x.onnx"]),
    # 3. engine sidecars of the wrong shape
    Case("sidecar-list-predict", ["predict", "--model", "{d}/m.engine", "{d}/ok.png"], 2, "sidecar",
         lambda d: (sidecar([1, 2])(d), small_png(d))),
    Case("sidecar-empty-predict", ["predict", "--model", "{d}/m.engine", "{d}/ok.png"], 2, "sidecar",
         lambda d: (sidecar({})(d), small_png(d))),
    Case("sidecar-list-swap", ["swap", "--engine", "{d}/m.engine", "--ckpt", "{ckpt}"], 2, "sidecar",
         sidecar([1, 2])),
    Case("sidecar-empty-swap", ["swap", "--engine", "{d}/m.engine", "--ckpt", "{ckpt}"], 2, "sidecar",
         sidecar({})),
    # 14. the message names the flag the user gave
    Case("engine-without-sidecar-names-model", ["predict", "--model", "{d}/x.engine", "{d}/ok.png"], 2, "--model",
         lambda d: ((d / "x.engine").write_bytes(b"\0" * 16), small_png(d))),
    Case("npz-task-names-task", ["predict", "--model", "{m}/sep.onnx", "--task", "{d}/e.npz", "{d}/ok.png"], 2,
         "--task", lambda d: (empty_file(d, "e.npz"), small_png(d))),
    Case("set-unknown-key-blames-set", ["--set", "no_such_key=1"], 2, "--set", absent=["{d}/run"]),
    Case("lr-nan", ["--lr", "nan"], 2, "--lr must be a finite number", absent=["{d}/run"]),
    Case("lr-inf", ["--lr", "inf"], 2, "--lr must be a finite number", absent=["{d}/run"]),
    Case("alpha-nan", ["--alpha", "nan"], 2, "--alpha must be a finite number", absent=["{d}/run"]),
    Case("adapter-alpha-nan", ["--set", "adapter.alpha=nan"], 2, "alpha", absent=["{d}/run"]),
    # 7. unknown timm model arguments
    Case("unknown-model-arg-train", ["--set", "model_args.no_such_arg=3"], 2, "no_such_arg", absent=["{d}/run"]),
    Case("unknown-model-arg-import", ["import-official", "--ckpt", "{d}/off.pt", "--backbone", "vit_tiny_patch16_224",
                                      "--model-args", "{{no_such_arg: 3}}", "-o", "{d}/x.pt"], 2, "no_such_arg",
         lambda d: __import__("torch").save({"model": {"head.weight": __import__("torch").zeros(2, 192)}},
                                            d / "off.pt"), ["{d}/x.pt"]),
    # 9. a diverging run stops, never saves non-finite weights; export refuses them by name
    Case("lr-huge-diverges", ["--lr", "1e30"], 2, "diverged", absent=["{d}/run/run.pt", "{d}/run"]),
    Case("nan-weights-export", ["onnx", "--ckpt", "{nan}", "-o", "{d}/x.onnx"], 2, "head.weight",
         absent=["{d}/x.onnx", "{d}/x.failed.onnx"]),
    # flags that do not apply are refused before any model is built (its backbone here cannot even be found)
    Case("separable-full-finetune", ["onnx", "--ckpt", "{d}/k.pt", "--separable", "-o", "{d}/x.onnx"], 3,
         "'full' fine-tune", ckpt_with(_full_regime_missing_backbone), ["{d}/x.onnx"]),
    Case("multitask-opset-low", ["onnx", "--ckpt", "{ckpt}", "--multitask", "--opset", "17", "-o", "{d}/x.onnx"],
         2, "opset >= 20", absent=["{d}/x.onnx", "{d}/x.failed.onnx"]),
    # 10. image folders a classifier cannot learn from
    Case("one-class-folder", ["train", "--dataset", "imagefolder:{d}/ds", "-o", "{d}/run", *QUICK_TRAIN[1:]], 2,
         "one class", image_folder({"cat": 3}), ["{d}/run"]),
    Case("empty-class-folder", ["train", "--dataset", "imagefolder:{d}/ds", "-o", "{d}/run", *QUICK_TRAIN[1:]], 2,
         "no image files", lambda d: (image_folder({"cat": 3, "dog": 3})(d), (d / "ds/train/bird").mkdir()),
         ["{d}/run"]),
    # 8 (+ Also). images: unwritable output, output under a file, corrupt data set keeps no half output
    Case("images-output-unwritable", ["images", "--dataset", "digits", "--count", "2", "-o", "{d}/ro/out"], 2,
         "not writable", read_only_dir, ["{d}/ro/out"], skip="root ignores folder permissions" if ROOT else None),
    Case("images-output-under-a-file", ["images", "--dataset", "digits", "--count", "2", "-o", "{d}/afile/out"], 2,
         "not a folder", blocking_file),
    Case("images-corrupt-file", ["images", "--dataset", "imagefolder:{d}/ds", "--split", "test", "-o", "{d}/out"], 2,
         "cannot read", image_folder({"cat": 2, "dog": 2}, corrupt="test/dog/zz.png"), ["{d}/out"]),
    # 17. an execution provider this ONNX Runtime does not have: exit 4, no silent CPU fallback
    Case("provider-unavailable", ["predict", "--model", "{m}/fused.onnx", "--provider", "CUDAExecutionProvider",
                                  "{d}/ok.png"], 4, "onnxruntime-gpu", small_png,
         skip=None if "CUDAExecutionProvider" not in _ort_providers() else "CUDA provider present"),
    Case("provider-unknown", ["predict", "--model", "{m}/fused.onnx", "--provider", "NoSuchExecutionProvider",
                              "{d}/ok.png"], 2, "not an ONNX Runtime execution provider", small_png),
    # ---- issue 22 ----
    # N9: a report never overwrites its inputs; it writes a folder
    Case("report-o-metrics-jsonl", ["report", "{d}/run", "-o", "{d}/run/metrics.jsonl"], 2, "not a folder",
         fake_run(), unchanged=["{d}/run/metrics.jsonl"]),
    Case("report-o-run-pt", ["report", "{d}/run", "-o", "{d}/run/run.pt"], 2, "folder", fake_run(),
         ["{d}/run/run.pt"]),
    Case("report-o-run-folder", ["report", "{d}/run", "-o", "{d}/run"], 2, "run folder", fake_run(),
         ["{d}/run/report.md", "{d}/run/report.json"]),
    # N8: run files that parse but hold the wrong types; nothing of the report is written
    Case("report-metrics-line-list", ["report", "{d}/run", "-o", "{d}/rep"], 2, "metrics.jsonl",
         fake_run(metrics="[1, 2]\n"), ["{d}/rep"]),
    Case("report-test-score-abc", ["report", "{d}/run", "-o", "{d}/rep"], 2, "test_top1",
         fake_run(metrics='{"epoch": 1, "train_loss": 1.0}\n{"event": "test", "epoch": 1, "test_top1": "abc"}\n'),
         ["{d}/rep"]),
    Case("report-config-list", ["report", "{d}/run", "-o", "{d}/rep"], 2, "config.yaml",
         fake_run(config="- 1\n- 2\n"), ["{d}/rep"]),
    Case("report-config-invalid", ["report", "{d}/run", "-o", "{d}/rep"], 2, "not valid YAML",
         fake_run(config="rank: [1\n"), ["{d}/rep"]),
    Case("report-config-rank-text", ["report", "{d}/run", "-o", "{d}/rep"], 2, "rank",
         fake_run(config="dataset: digits\nrank: abc\n"), ["{d}/rep"]),
    Case("report-verify-list", ["report", "{d}/run", "-o", "{d}/rep"], 2, "verify report",
         fake_run(verify="[1]"), ["{d}/rep"]),
    Case("report-verify-accuracy-text", ["report", "{d}/run", "-o", "{d}/rep"], 2, "accuracy",
         fake_run(verify='{"backends": [{"name": "ort", "accuracy": "abc"}]}'), ["{d}/rep"]),
    # N14: a run.pt found in a folder is named by its path, never by a flag the user did not give
    Case("report-run-pt-empty", ["report", "{d}/run", "-o", "{d}/rep"], 2, "run.pt", fake_run(run_pt=b""),
         ["{d}/rep"], never=NO_FLAGS),
    # N16, N17, N14: sweep cells whose files are another run's or damaged
    Case("sweep-cell-run-pt-of-another-cell", [*SWEEP, "--ranks", "1,2", "-o", "{d}/sw"], 3, "another run",
         sweep_cell(lambda c, sw: (c / "run.pt").write_bytes((sw / "adaptertune_r2_e1/seed_0/run.pt").read_bytes())),
         never=NO_FLAGS, unchanged=["{d}/sw/sweep.json"], sweep=True),
    Case("sweep-cell-config-damaged", [*SWEEP, "--ranks", "1,2", "-o", "{d}/sw"], 2, "config.yaml",
         sweep_cell(lambda c, sw: (c / "config.yaml").write_text("rank: [1\n")), never=NO_FLAGS,
         unchanged=["{d}/sw/sweep.json"], sweep=True),
    Case("sweep-cell-config-list", [*SWEEP, "--ranks", "1,2", "-o", "{d}/sw"], 2, "config.yaml",
         sweep_cell(lambda c, sw: (c / "config.yaml").write_text("- 1\n")), never=NO_FLAGS, sweep=True),
    Case("sweep-cell-run-pt-params-list", [*SWEEP, "--ranks", "1,2", "-o", "{d}/sw"], 2, "damaged metrics",
         sweep_cell(lambda c, sw: edit_run_pt(c / "run.pt", lambda doc: doc["metrics"].update(params=[1]))),
         never=NO_FLAGS, unchanged=["{d}/sw/sweep.json"], sweep=True),
    Case("sweep-cell-run-pt-empty", [*SWEEP, "--ranks", "1,2", "-o", "{d}/sw"], 2, "run.pt",
         sweep_cell(lambda c, sw: (c / "run.pt").write_bytes(b"")), never=NO_FLAGS, sweep=True),
    Case("sweep-cell-last-pt-empty", [*SWEEP, "--ranks", "1,2", "-o", "{d}/sw"], 2, "last.pt",
         sweep_cell(lambda c, sw: ((c / "last.pt").write_bytes(b""), (c / "metrics.jsonl").write_text(""))),
         never=NO_FLAGS, sweep=True),
    # N11: an unwritable sweep folder
    Case("sweep-output-unwritable", [*SWEEP, "--ranks", "1", "-o", "{d}/ro/sw"], 2, "-o", read_only_dir,
         ["{d}/ro/sw"], skip="root ignores folder permissions" if ROOT else None),
    Case("sweep-output-under-a-file", [*SWEEP, "--ranks", "1", "-o", "{d}/afile/sw"], 2, "cannot create",
         blocking_file),
    # N12 (+ N13: a family's own keys reach that family in a sweep): sizes refused before any allocation
    Case("sweep-ranks-huge", [*SWEEP, "--ranks", "100000000", "-o", "{d}/sw"], 2, "needs about", absent=["{d}/sw"]),
    Case("sweep-adaring-ring-rank-huge", [*SWEEP, "--adapter", "adaring", "--set", "adapter.ring_rank=100000",
                                          "--ranks", "2", "-o", "{d}/sw"], 2, "ring_rank=100000", absent=["{d}/sw"]),
    Case("train-rank-huge", ["--rank", "100000000"], 2, "needs about", absent=["{d}/run"]),
    Case("adaring-ring-rank-huge", ["--set", "adapter.kind=adaring", "--set", "adapter.ring_rank=100000"], 2,
         "needs about", absent=["{d}/run"]),
    Case("adapterx-experts-huge", ["--set", "adapter.kind=adapterx", "--set", "adapter.experts=10000000"], 2,
         "experts=10000000", absent=["{d}/run"]),
    Case("bench-batch-huge", ["bench", "--ckpt", "{ckpt}", "--onnx", "{m}/fused.onnx", "--batch", "1000000"], 2,
         "needs about"),
    # N19, N20, N21: family settings that are not finite numbers
    Case("adaring-alpha-abc", ["--set", "adapter.kind=adaring", "--set", "adapter.alpha=abc"], 2, "adapter.alpha",
         absent=["{d}/run"]),
    Case("adapterx-alpha-abc", ["--set", "adapter.kind=adapterx", "--set", "adapter.alpha=abc"], 2, "adapter.alpha",
         absent=["{d}/run"]),
    Case("adapterx-router-noise-nan", ["--set", "adapter.kind=adapterx", "--set", "adapter.router_noise=.nan"], 2,
         "router_noise", absent=["{d}/run"]),
    Case("lora-alpha-inf", ["--set", "adapter.kind=lora", "--set", "adapter.lora_alpha=.inf"], 2, "lora_alpha",
         absent=["{d}/run"]),
    # N7: an unknown family is named where it came from
    Case("adapter-kind-unknown-set", ["--set", "adapter.kind=nosuch"], 2, "--set adapter.kind", absent=["{d}/run"]),
    Case("adapter-kind-unknown-ckpt", ["export-task", "--ckpt", "{d}/k.pt", "-o", "{d}/x.npz"], 2,
         "records the adapter family", ckpt_with(lambda doc: doc["adapter"].update(kind="nosuch")), ["{d}/x.npz"]),
    # N23: an input the backbone's patch cannot cover
    Case("img-size-1", ["--img-size", "1"], 2, "patch", absent=["{d}/run"]),
    Case("patch-larger-than-image", ["--patch-size", "64"], 2, "patch", absent=["{d}/run"]),
    # N22, N24: import-official keeps no NaN and no input size the backbone cannot take
    Case("import-official-nan-weights", import_official(), 2, "NaN", official_ckpt(nan=True), ["{d}/x.pt"]),
    Case("import-official-nan-mean", import_official("--preprocess", "{{mean: [.nan, 0.5, 0.5]}}"), 2, "mean",
         official_ckpt(), ["{d}/x.pt"]),
    Case("import-official-input-smaller-than-patch",
         import_official(model_args="{{img_size: 4, patch_size: 8, depth: 4, embed_dim: 64, num_heads: 2}}"), 2,
         "patch", official_ckpt(), ["{d}/x.pt"]),
    Case("import-official-preprocess-input-size", import_official("--preprocess", "{{input_size: [3, 48, 48]}}"), 2,
         "input_size", official_ckpt(), ["{d}/x.pt"]),
    # N6: a diverged run has no spectrum
    Case("analyze-nan-adapter", ["analyze", "--ckpt", "{d}/k.pt", "-o", "{d}/an"], 2, "NaN",
         ckpt_with(_first_adapter_nan), ["{d}/an"]),
    # N2: one graph-vs-metadata check in every backend (ONNX -> IR, IR predict, OpenVINO predict, triton)
    Case("openvino-metadata-4-classes", ["openvino", "--onnx", "{m}/four_classes.onnx", "-o", "{d}/x.xml"], 2,
         "logits", absent=["{d}/x.xml", "{d}/x.bin", "{d}/x.failed.xml"]),
    Case("predict-openvino-metadata-4-classes", ["predict", "--model", "{m}/four_classes.onnx", "--backend",
                                                 "openvino", "{d}/ok.png"], 2, "logits", small_png),
    Case("predict-ir-metadata-4-classes", ["predict", "--model", "{m}/four_classes.xml", "{d}/ok.png"], 2, "logits",
         small_png),
    Case("triton-ir-metadata-4-classes", ["triton", "--model", "{m}/four_classes.xml", "-o", "{d}/repo"], 2,
         "logits", absent=["{d}/repo"]),
    Case("triton-onnx-metadata-4-classes", ["triton", "--model", "{m}/four_classes.onnx", "-o", "{d}/repo"], 2,
         "logits", absent=["{d}/repo"]),
    # N1, N5: advice names commands that exist, and the file the user gave
    Case("openvino-int8-on-fp32", ["openvino", "--onnx", "{m}/fused.onnx", "--precision", "int8", "-o",
                                   "{d}/x.xml"], 2, "atexport trt --onnx", absent=["{d}/x.xml"],
         never=("onnx-precision",)),
    # issue 21: LiteRT full-integer INT8 takes --calib, and only it does
    Case("litert-int8-full-without-calib", ["litert", "--ckpt", "{ckpt}", "-o", "{d}/x.tflite", "--precision",
                                            "int8-full"], 2, "--precision int8-full needs a calibration set",
         absent=["{d}/x.tflite", "{d}/x.failed.tflite"]),
    Case("litert-calib-with-int8", ["litert", "--ckpt", "{ckpt}", "-o", "{d}/x.tflite", "--precision", "int8",
                                    "--calib", "digits"], 2, "--calib applies to --precision int8-full",
         absent=["{d}/x.tflite"]),
    Case("litert-calib-count-with-fp32", ["litert", "--ckpt", "{ckpt}", "-o", "{d}/x.tflite", "--calib-count", "8"],
         2, "--calib applies to --precision int8-full", absent=["{d}/x.tflite"]),
    Case("litert-int8-full-separable", ["litert", "--ckpt", "{ckpt}", "-o", "{d}/x.tflite", "--precision",
                                        "int8-full", "--calib", "digits", "--separable"], 2, "--separable",
         absent=["{d}/x.tflite"]),
    Case("litert-int8-full-multitask", ["litert", "--ckpt", "{ckpt}", "--ckpt", "{ckpt}", "-o", "{d}/x.tflite",
                                        "--precision", "int8-full", "--calib", "digits"], 2, "for one --ckpt",
         absent=["{d}/x.tflite"]),
    Case("triton-engine-backend-openvino", ["triton", "--model", "{d}/x.engine", "--backend", "openvino", "-o",
                                            "{d}/repo"], 2, "MODEL.onnx",
         lambda d: (d / "x.engine").write_bytes(b"\0" * 16), ["{d}/repo"], never=("x.engine'",)),
]

_TRAIN_FLAGS = ("--set", "--lr", "--alpha", "--rank", "--img-size", "--patch-size")


def _argv(case: Case, d: Path, m: Path, ckpt: Path, nan: Path) -> list[str]:
    args = case.argv
    if args[0] in _TRAIN_FLAGS:  # a training flag row: quick digits run into {d}/run
        args = ["train", "--dataset", "digits", "-o", "{d}/run", *QUICK_TRAIN[1:], *args]
    return [a.format(d=d, m=m, ckpt=ckpt, nan=nan) for a in args]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, models, tiny_ckpt, nan_ckpt, monkeypatch, request):
    import shutil

    from atexport.cli import cli

    if case.skip:
        pytest.skip(case.skip)
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "case"
    d.mkdir()
    if case.sweep:
        shutil.copytree(request.getfixturevalue("tiny_sweep"), d / "sw")
    if case.build is not None:
        case.build(d)
    kept = {p: Path(p.format(d=d)).read_bytes() for p in case.unchanged}
    argv = _argv(case, d, models, tiny_ckpt, nan_ckpt)
    result = CliRunner().invoke(cli, argv, catch_exceptions=True)
    out = result.output  # stdout and stderr, as a terminal shows them
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"uncaught {type(result.exception).__name__}: {result.exception}\n{out}")
    assert result.exit_code == case.exit_code, out
    assert case.word.lower() in out.lower(), out
    assert "Traceback" not in out, out
    for advice in case.never:
        assert advice not in out, out
    for p in case.absent:
        assert not Path(p.format(d=d)).exists(), f"{p} was left behind"
    for p, data in kept.items():
        assert Path(p.format(d=d)).read_bytes() == data, f"{p} was changed"
    leftovers = [p.name for p in d.rglob(".*.tmp")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


# ------------------------------------------------------------------------------------------ load_model


@pytest.mark.parametrize("model, task, word", [
    ("list_doc.onnx", None, "metadata"),
    ("empty_doc.onnx", None, "metadata"),
    ("mean_abc.onnx", None, "preprocess.mean"),
    ("four_classes.onnx", None, "4 classes"),
    ("three_names.onnx", None, "3 classes"),
    ("sep_four_classes.onnx", "task.npz", "4 classes"),
    ("sep.onnx", "empty.npz", "--task"),
])
def test_load_model_refuses(models, tmp_path, model, task, word):
    from atexport.errors import BadInputError
    from atexport.runtime import load_model

    (tmp_path / "empty.npz").write_bytes(b"")
    task_path = None if task is None else str((models if task == "task.npz" else tmp_path) / task)
    with pytest.raises(BadInputError) as e:
        load_model(models / model, task=task_path)
    assert word in str(e.value)


# ------------------------------------------------------------------------------------------ the "Also" items


def test_stale_temp_files_of_dead_writers_are_cleaned_on_the_next_write(tmp_path):
    from atexport.utils.io import atomic_write_text

    target = tmp_path / "model.onnx"
    dead = tmp_path / ".model.onnx.999999999.abcd.tmp"  # PID beyond pid_max: its writer is gone
    live = tmp_path / f".model.onnx.{os.getppid()}.abcd.tmp"  # a live process's write in progress
    legacy_old = tmp_path / ".model.onnx.x1y2z3.tmp"  # older naming, untouched for two hours
    legacy_new = tmp_path / ".model.onnx.q9w8e7.tmp"  # older naming, recent: maybe a live write
    other = tmp_path / ".other.onnx.999999999.abcd.tmp"  # another target's file
    for p in (dead, live, legacy_old, legacy_new, other):
        p.write_bytes(b"x" * 10)
    old = time.time() - 7200
    os.utime(legacy_old, (old, old))
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert not dead.exists() and not legacy_old.exists()
    assert live.exists() and legacy_new.exists() and other.exists()


def test_a_failed_run_leaves_no_output_folder_but_a_diverged_one_keeps_its_best_epoch(tmp_path):
    from atexport.cli import cli

    r = CliRunner().invoke(cli, ["train", "--dataset", "digits", "-o", str(tmp_path / "run"), *QUICK_TRAIN[1:],
                                 "--set", "model_args.no_such_arg=1"])
    assert r.exit_code == 2 and not (tmp_path / "run").exists(), r.output


# ------------------------------------------------------------------------------------------ issue 22 (not refusals)


def test_a_finished_cell_with_a_damaged_metrics_file_is_resumed_and_written_again(tiny_sweep, tmp_path):
    """N18: the cell is resumed from last.pt, its metrics.jsonl rewritten, and the summary keeps its rank."""
    import shutil

    from atexport.artifact.runfiles import read_metrics
    from atexport.cli import cli

    sw = tmp_path / "sw"
    shutil.copytree(tiny_sweep, sw)
    cell = sw / "adaptertune_r1_e1" / "seed_0"
    want = read_metrics(cell / "metrics.jsonl")
    for damage in ("", "[1, 2]\n", '{"epoch": 1}\n{"event": "test", "test_top1": "abc"}\n'):
        (cell / "metrics.jsonl").write_text(damage)
        r = CliRunner().invoke(cli, [*SWEEP, "--ranks", "1,2", "-o", str(sw)])
        assert r.exit_code == 0 and "trained 1 cells" in r.output, r.output
        got = read_metrics(cell / "metrics.jsonl")
        assert got.finished and got.test["test_top1"] == want.test["test_top1"]
        assert [h["epoch"] for h in got.history] == [h["epoch"] for h in want.history]
        summary = json.loads((sw / "sweep.json").read_text())
        assert summary["complete"] and [c["n"] for c in summary["series"][0]["cells"]] == [1, 1]
    again = CliRunner().invoke(cli, [*SWEEP, "--ranks", "1,2", "-o", str(sw)])
    assert "trained 0 cells, skipped 2" in again.output, again.output


def test_load_model_takes_one_provider_as_a_string(models):
    """N15: a provider given as a string is one provider, not a list of letters."""
    from atexport.runtime import load_model

    m = load_model(models / "fused.onnx", providers="CPUExecutionProvider")
    assert len(m.predict(np.zeros((1, 3, 32, 32), np.float32))) == 1


def test_openvino_errors_name_the_input_not_a_temporary_ir(models):
    """N3: a runner made on a temporary IR names the file the user gave."""
    from atexport.errors import BadInputError
    from atexport.runtime.openvino import OpenVINORunner

    with pytest.raises(BadInputError) as e:
        OpenVINORunner(str(models / "four_classes.xml"), where="--onnx user.onnx (as an OpenVINO fp32 IR)").activate()
    assert "--onnx user.onnx" in str(e.value) and "four_classes.xml" not in str(e.value)


def test_a_killed_openvino_run_leaves_a_folder_the_next_run_removes(models, tmp_path):
    """N4: the IR is written in a temporary folder named like atomic writes' files; a dead writer's is removed."""
    from atexport.export.openvino import to_openvino

    dead = tmp_path / ".m.xml.999999999.abcd1234.tmp"  # what SIGKILL during 'atexport openvino' leaves
    dead.mkdir()
    (dead / "m.xml").write_text("<net/>")
    (dead / "m.bin").write_bytes(b"\0" * 64)
    live = tmp_path / f".m.xml.{os.getppid()}.abcd1234.tmp"  # a live process's conversion in progress
    live.mkdir()
    res = to_openvino(models / "fused.onnx", tmp_path / "m.xml", verify=False, cache_dir=False)
    assert res.path == tmp_path / "m.xml" and (tmp_path / "m.bin").is_file()
    assert not dead.exists() and live.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [live.name]
