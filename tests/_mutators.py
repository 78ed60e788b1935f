"""Seeded mutations of every file format atexport reads, and the outcome of feeding each one to its reader.

Used by ``tests/test_mutations.py`` (a few hundred mutations per format) and ``bench/fuzz_formats.py``
(thousands). A mutation either loads correctly or ends in atexport's own error
(:class:`~atexport.errors.AtexportError`); any other exception is a crash, i.e. a bug in the reader.

Formats: model metadata (the JSON document inside an ONNX model), engine sidecar JSON, task ``.npz``,
checkpoint ``run.pt``, INT8 calibration cache JSON, training recipe YAML. Mutations: truncations, byte
flips, inserted/garbage bytes, and structured ones (missing and extra keys, type swaps, huge values,
NaN/inf, tensors of other shapes and dtypes).
"""

from __future__ import annotations

import copy
import io
import json
import random
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

# Values swapped in for any field: other types, huge and non-finite numbers, empty and huge containers.
ODD_VALUES = [
    None, True, False, 0, -1, 1, 2**63, -(2**70), 10**30, 1e308, -1e308, float("nan"), float("inf"),
    float("-inf"), 0.5, -0.0, "", "abc", "x" * 5000, "nan", "../../etc/passwd", [], [1, 2, 3], [[]], [None],
    ["a", "b"], [float("nan")] * 3, {}, {"a": 1}, {"": None}, list(range(1000)),
]


# ------------------------------------------------------------------------------------------ structure


def _paths(doc, prefix=()):
    """Every path (tuple of keys / indices) to a value inside nested dicts and lists."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:50]):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


def _parent(doc, path):
    node = doc
    for k in path[:-1]:
        node = node[k]
    return node


def mutate_doc(doc, rng: random.Random, leaf: Callable | None = None) -> tuple[str, Any]:
    """One structured mutation of a JSON-like document: delete, swap type, add a key, duplicate, empty."""
    doc = copy.deepcopy(doc)
    paths = list(_paths(doc))
    if not paths:
        return "replace root", rng.choice(ODD_VALUES)
    path = rng.choice(paths)
    parent, key = _parent(doc, path), path[-1]
    op = rng.choice(["delete", "swap", "swap", "swap", "extra", "root", "empty", "leaf"])
    if op == "delete":
        if isinstance(parent, dict):
            del parent[key]
        else:
            parent.pop(key)
    elif op == "swap" or (op == "leaf" and leaf is None):
        parent[key] = copy.deepcopy(rng.choice(ODD_VALUES))
    elif op == "leaf":
        parent[key] = leaf(parent[key], rng)
    elif op == "extra":
        target = parent if isinstance(parent, dict) else doc if isinstance(doc, dict) else None
        if target is None:
            return "replace root", [doc]
        target[rng.choice(["zz_extra", "format_version", "__class__", "", "metadata"])] = copy.deepcopy(
            rng.choice(ODD_VALUES))
    elif op == "root":
        return "replace root", copy.deepcopy(rng.choice([[], [1, 2], {}, "text", 3, None, [doc]]))
    elif op == "empty":
        value = parent[key]
        parent[key] = type(value)() if isinstance(value, (dict, list, str)) else None
    return f"{op} {'.'.join(map(str, path))[:80]}", doc


def mutate_bytes(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One byte-level mutation: truncation, flipped bytes, inserted or appended garbage, zeroed run."""
    n = len(data)
    op = rng.choice(["truncate", "truncate", "flip", "flip", "insert", "append", "zero", "garbage", "empty"])
    if op == "empty" or n == 0:
        return "empty file", b""
    if op == "truncate":
        at = rng.randrange(0, n)
        return f"truncate at {at}/{n}", data[:at]
    b = bytearray(data)
    if op == "flip":
        k = rng.choice([1, 1, 2, 8, 64])
        for _ in range(k):
            i = rng.randrange(n)
            b[i] ^= rng.randrange(1, 256)
        return f"flip {k} bytes", bytes(b)
    if op == "insert":
        at = rng.randrange(n)
        return f"insert at {at}", bytes(b[:at]) + rng.randbytes(rng.choice([1, 7, 100])) + bytes(b[at:])
    if op == "append":
        return "append garbage", bytes(b) + rng.randbytes(rng.choice([1, 100, 5000]))
    if op == "zero":
        at = rng.randrange(n)
        k = min(rng.choice([4, 64, 1024]), n - at)
        b[at:at + k] = bytes(k)
        return f"zero {k} bytes at {at}", bytes(b)
    return "random bytes", rng.randbytes(n)


def _dump_json(doc) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()


# ------------------------------------------------------------------------------------------ base files


@dataclass
class Context:
    """The real files every format's mutations start from (built once from a tiny checkpoint)."""

    workdir: Path
    ckpt_path: Path
    metadata: dict
    task_npz: bytes
    ckpt_bytes: bytes


def build_context(workdir: Path, ckpt_path: Path) -> Context:
    """Base documents from a real tiny checkpoint: its separable-model metadata, task .npz and run.pt."""
    import torch  # noqa: F401  (the checkpoint reader needs it anyway)

    from atexport.artifact.tasks import task_npz_bytes
    from atexport.checkpoint import load_checkpoint

    ck = load_checkpoint(ckpt_path)
    tw = ck.task_weights()
    manifest = {n: {"initializer": n, "shape": list(a.shape), "dtype": "float32",
                    "role": "head" if n.startswith("head.") else "adapter"} for n, a in tw.arrays.items()}
    info = tw.info
    n = ck.model.num_classes
    meta = {
        "backbone": dict(info.get("backbone") or {"name": ck.model.backbone, "fingerprint": ck.fingerprint,
                                                  "model_args": ck.model.model_args}),
        "input": {"name": "input", "shape": ["batch", *ck.preprocess["input_size"]], "dtype": "float32",
                  "layout": "NCHW"},
        "output": {"name": "logits", "shape": ["batch", n], "dtype": "float32"},
        "preprocess": json.loads(json.dumps(ck.preprocess)),
        "class_names": list(ck.model.class_names or [f"class_{i}" for i in range(n)]),
        "num_classes": n,
        "adapter": info.get("adapter"),
        "regime": ck.regime,
        "separable": True,
        "manifest": manifest,
        "precision": "fp32",
        "task": ck.name,
        "tasks": None,
        "extra": {"export": {"opset": 20}},
        "format_version": 1,
    }
    return Context(workdir=Path(workdir), ckpt_path=Path(ckpt_path), metadata=meta, task_npz=task_npz_bytes(tw),
                   ckpt_bytes=Path(ckpt_path).read_bytes())


def multitask_metadata(meta: dict) -> dict:
    """The metadata of a two-task model built from ``meta`` (task list, task axis on the manifest)."""
    m = copy.deepcopy(meta)
    n = m["num_classes"]
    m["tasks"] = [{"name": "a", "index": 0, "num_classes": n, "class_names": m["class_names"]},
                  {"name": "b", "index": 1, "num_classes": 2, "class_names": ["x", "y"]}]
    m["manifest"] = {f"bank.{k}": dict(v, initializer=f"bank.{k}", shape=[2, *v["shape"]])
                     for k, v in m["manifest"].items()}
    m["separable"] = False
    return m


def sidecar_doc(meta: dict) -> dict:
    return {
        "format": "atexport.engine", "format_version": 1, "precision": "fp16",
        "tensorrt": {"version": "10.3.0", "major": 10},
        "device": {"name": "NVIDIA H100", "compute_capability": [9, 0], "sm": "sm_90"},
        "profiles": [{"input": "input", "min": [1, 3, 32, 32], "opt": [8, 3, 32, 32], "max": [32, 3, 32, 32]}],
        "build": {"builder_flags": ["FP16"], "profiles": [{"min": [1], "opt": [8], "max": [32]}],
                  "workspace_bytes": 1 << 30, "refittable_weights": []},
        "engine": {"path": "model.engine", "sha256": None, "bytes": 16},
        "onnx": {"path": "model.fp16.onnx", "sha256": "0" * 64},
        "metadata": dict(copy.deepcopy(meta), precision="fp16"),
        "parity": [], "seconds": {"build": 1.0},
    }


def calibration_doc() -> dict:
    return {
        "format": "atexport.calibration-cache", "format_version": 1, "model_sha256": "m" * 64,
        "data_sha256": "d" * 64, "settings": {"method": "entropy", "images": 32},
        "calibration": {"images": 32}, "seconds": 1.5, "created": "2026-01-01T00:00:00",
        "ranges": {"input": {"lowest": -2.1, "highest": 2.3, "hist": [1, 2, 3], "hist_edges": [0.0, 1.0, 2.0, 3.0]}},
    }


RECIPE = """\
inherit: defaults
dataset: digits
dataset_args: {size: 64}
backbone: vit_tiny_patch16_224
pretrained: false
img_size: 32
patch_size: 8
model_args: {depth: 2, global_pool: avg}
adapter: {kind: adaptertune}
epochs: 3
warmup_epochs: 1
batch_size: 16
lr: 1.0e-2
scale: [0.85, 1.0]
ratio: [0.9, 1.1]
hflip: 0.0
seeds: [0, 1]
workers: 0
"""


# ------------------------------------------------------------------------------------------ readers


def _tiny_image():
    from PIL import Image

    return Image.fromarray(np.arange(48 * 40 * 3, dtype=np.uint8).reshape(48, 40, 3))


def read_metadata(data: bytes, ctx: Context) -> None:
    """What every model reader does with the metadata: validate, preprocess an image, check a task fits."""
    from atexport.artifact.fit import check_fits
    from atexport.artifact.metadata import metadata_from_props
    from atexport.artifact.tasks import load_task
    from atexport.runtime.preprocess import Preprocessor

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:  # ONNX stores metadata_props as protobuf strings: always valid UTF-8
        text = data.decode("utf-8", errors="replace")
    meta = metadata_from_props({"atexport": text}, "model.onnx")
    _ = meta.mode, meta.flat_props()
    x = Preprocessor(meta.preprocess)([_tiny_image()])
    if not np.isfinite(x).all():
        raise AssertionError(f"preprocessing produced non-finite values from metadata {meta.preprocess}")
    task_file = ctx.workdir / "base_task.npz"
    if not task_file.exists():
        task_file.write_bytes(ctx.task_npz)
    if meta.mode == "separable":
        check_fits(meta, load_task(task_file), "model.onnx")


def read_sidecar_bytes(data: bytes, ctx: Context) -> None:
    """An engine's sidecar as ``load_model``/``trt``/``triton`` read it."""
    from atexport.artifact.sidecar import (
        check_engine_compatible, profile_max_batch, read_sidecar, rebuild_command, sidecar_metadata,
    )

    engine = ctx.workdir / "fuzz.engine"
    engine.write_bytes(b"not an engine but 16b"[:16])
    (ctx.workdir / "fuzz.engine.json").write_bytes(data)
    doc = read_sidecar(engine, "--model")
    sidecar_metadata(doc, str(engine))
    profile_max_batch(doc)
    check_engine_compatible(doc, "10.3.0", {"name": "NVIDIA H100", "compute_capability": [9, 0]}, str(engine))
    rebuild_command(doc)


def read_task(data: bytes, ctx: Context) -> None:
    from atexport.artifact.fit import check_fits
    from atexport.artifact.metadata import ModelMetadata
    from atexport.artifact.tasks import load_task

    path = ctx.workdir / "fuzz_task.npz"
    path.write_bytes(data)
    task = load_task(path, flag="--task")
    _ = task.name, task.class_names
    check_fits(ModelMetadata.from_dict(copy.deepcopy(ctx.metadata)), task, "model.onnx")


def read_checkpoint(data: bytes, ctx: Context) -> None:
    from atexport.checkpoint import load_checkpoint

    path = ctx.workdir / "fuzz_run.pt"
    path.write_bytes(data)
    ck = load_checkpoint(path)
    ck.task_weights()
    ck.task_info()
    _ = ck.name
    load_checkpoint(path, layout="trained")


def _calibration_reader():
    from atexport.export.precision import calibration as calib

    return calib


def read_calibration(data: bytes, ctx: Context) -> None:
    calib = _calibration_reader()
    path = ctx.workdir / "fuzz_calib.json"
    path.write_bytes(data)
    base = calibration_doc()
    key = calib.CacheKey(model_sha256=base["model_sha256"], data_sha256=base["data_sha256"], settings=base["settings"])
    ranges, why = calib.read_cache(path, key)
    if not isinstance(why, str):
        raise AssertionError(f"read_cache gave a reason of type {type(why).__name__}")
    if ranges is not None and not isinstance(ranges, dict):
        raise AssertionError(f"read_cache accepted ranges of type {type(ranges).__name__}")
    if ranges is None:  # a damaged or foreign cache is not reused (the ranges are measured again): a refusal
        from atexport.errors import BadInputError

        raise BadInputError(f"cache not reused: {why}")


def read_recipe(data: bytes, ctx: Context) -> None:
    from atexport.training.config import resolve_config

    path = ctx.workdir / "fuzz_recipe.yaml"
    path.write_bytes(data)
    cfg = resolve_config(path, {"output": str(ctx.workdir / "never_written")})
    cfg.adapter_config()
    cfg.resolved_model_args()
    cfg.output_dir()
    cfg.to_dict(record=True)


# ------------------------------------------------------------------------------------------ mutants


def _json_mutants(doc_fn):
    def gen(ctx: Context, rng: random.Random):
        doc = doc_fn(ctx)
        if rng.random() < 0.6:
            desc, new = mutate_doc(doc, rng)
            return desc, _dump_json(new)
        return mutate_bytes(_dump_json(doc), rng)
    return gen


def _metadata_mutants(ctx: Context, rng: random.Random):
    base = ctx.metadata if rng.random() < 0.7 else multitask_metadata(ctx.metadata)
    return _json_mutants(lambda _c: base)(ctx, rng)


def _array_leaf(value, rng: random.Random):
    """A mutated array: NaN, other dtype or shape, empty, huge (as numpy)."""
    a = np.asarray(value)
    op = rng.choice(["nan", "inf", "int", "f16", "f64", "shape", "empty", "scalar", "bool", "str", "complex"])
    if op in ("nan", "inf") and a.dtype.kind == "f" and a.size:
        a = a.copy()
        a.flat[rng.randrange(a.size)] = np.nan if op == "nan" else np.inf
        return a
    return {
        "int": lambda: a.astype(np.int32) if a.dtype.kind != "U" else a,
        "f16": lambda: a.astype(np.float16) if a.dtype.kind == "f" else a,
        "f64": lambda: a.astype(np.float64) if a.dtype.kind == "f" else a,
        "shape": lambda: np.zeros((*a.shape[:-1], a.shape[-1] + 1) if a.ndim else (2,), np.float32),
        "empty": lambda: np.zeros((0,), np.float32),
        "scalar": lambda: np.float32(1.0),
        "bool": lambda: np.ones(a.shape, bool),
        "str": lambda: np.array("abc"),
        "complex": lambda: a.astype(np.complex64) if a.dtype.kind == "f" else a,
        "nan": lambda: np.full((3,), np.nan, np.float32),
        "inf": lambda: np.full((3,), np.inf, np.float32),
    }[op]()


def _npz_mutants(ctx: Context, rng: random.Random):
    if rng.random() < 0.4:
        return mutate_bytes(ctx.task_npz, rng)
    with np.load(io.BytesIO(ctx.task_npz), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    info_key = next(k for k in arrays if k.startswith("__"))
    info = json.loads(str(arrays[info_key]))
    op = rng.random()
    if op < 0.4:
        desc, new_info = mutate_doc(info, rng)
        arrays[info_key] = np.array(json.dumps(new_info, allow_nan=True))
        desc = f"record: {desc}"
    elif op < 0.85:
        name = rng.choice([k for k in arrays if k != info_key])
        kind = rng.choice(["leaf", "leaf", "leaf", "drop", "extra", "rename"])
        if kind == "leaf":
            arrays[name] = _array_leaf(arrays[name], rng)
        elif kind == "drop":
            arrays.pop(name)
        elif kind == "extra":
            arrays["blocks.99.adapter.down.weight"] = np.ones((2, 2), np.float32)
        else:
            arrays[name + ".x"] = arrays.pop(name)
        desc = f"tensor {name}: {kind}"
    elif op < 0.93:
        arrays["obj"] = np.array([{"code": 1}], dtype=object)  # a pickle inside the .npz
        desc = "object array (pickle)"
    else:
        arrays = {info_key: arrays[info_key]}
        desc = "record only, no tensors"
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return desc, buf.getvalue()


def _tensor_leaf(value, rng: random.Random):
    import torch

    if isinstance(value, torch.Tensor):
        op = rng.choice(["nan", "shape", "int", "half", "empty", "scalar", "str", "list"])
        if op == "nan" and value.is_floating_point() and value.numel():
            v = value.clone()
            v.view(-1)[rng.randrange(v.numel())] = float("nan")
            return v
        return {
            "nan": lambda: torch.full((3,), float("nan")),
            "shape": lambda: torch.zeros(*value.shape[:-1], value.shape[-1] + 1) if value.dim() else torch.zeros(2),
            "int": lambda: value.to(torch.int32),
            "half": lambda: value.half(),
            "empty": lambda: torch.zeros(0),
            "scalar": lambda: torch.tensor(1.0),
            "str": lambda: "tensor",
            "list": lambda: value.tolist() if value.numel() < 100 else [1.0, 2.0],
        }[op]()
    return copy.deepcopy(rng.choice(ODD_VALUES))


def _ckpt_mutants(ctx: Context, rng: random.Random):
    import torch

    if rng.random() < 0.35:
        return mutate_bytes(ctx.ckpt_bytes, rng)
    d = torch.load(io.BytesIO(ctx.ckpt_bytes), map_location="cpu", weights_only=True)
    desc, d = mutate_doc(d, rng, leaf=_tensor_leaf)
    buf = io.BytesIO()
    torch.save(d, buf)
    return desc, buf.getvalue()


def _recipe_mutants(ctx: Context, rng: random.Random):
    import yaml

    if rng.random() < 0.4:
        return mutate_bytes(RECIPE.encode(), rng)
    desc, doc = mutate_doc(yaml.safe_load(RECIPE), rng)
    return desc, yaml.safe_dump(doc, allow_unicode=True).encode()


@dataclass
class Format:
    name: str
    mutant: Callable  # (ctx, rng) -> (description, bytes)
    read: Callable  # (bytes, ctx) -> None; raises AtexportError for a refused file
    base: Callable  # ctx -> bytes of the unmutated file (must load)


FORMATS = {
    "metadata": Format("metadata", _metadata_mutants, read_metadata, lambda c: _dump_json(c.metadata)),
    "sidecar": Format("sidecar", _json_mutants(lambda c: sidecar_doc(c.metadata)), read_sidecar_bytes,
                      lambda c: _dump_json(sidecar_doc(c.metadata))),
    "task_npz": Format("task_npz", _npz_mutants, read_task, lambda c: c.task_npz),
    "run_pt": Format("run_pt", _ckpt_mutants, read_checkpoint, lambda c: c.ckpt_bytes),
    "calibration_cache": Format("calibration_cache", _json_mutants(lambda c: calibration_doc()), read_calibration,
                                lambda c: _dump_json(calibration_doc())),
    "recipe": Format("recipe", _recipe_mutants, read_recipe, lambda c: RECIPE.encode()),
}


@dataclass
class Outcome:
    kind: str  # "ok", "refused", "crash"
    detail: str  # error class / exception type
    description: str  # what the mutation was
    trace: str = ""


def run_one(fmt: Format, data: bytes, ctx: Context, description: str) -> Outcome:
    """Feed one mutated file to its reader; classify what happened."""
    from atexport.errors import AtexportError

    try:
        fmt.read(data, ctx)
    except AtexportError as e:
        if not str(e).strip() or "Traceback" in str(e):
            return Outcome("crash", f"{type(e).__name__} with an empty or traceback message", description)
        return Outcome("refused", type(e).__name__, description)
    except Exception as e:  # noqa: BLE001 - anything else is what we are hunting
        return Outcome("crash", f"{type(e).__name__}: {str(e)[:160]}", description,
                       "".join(traceback.format_exception(type(e), e, e.__traceback__)[-4:]))
    return Outcome("ok", "loaded", description)


def fuzz(fmt: Format, ctx: Context, count: int, seed: int = 0):
    """``count`` seeded mutations of ``fmt``: yields an :class:`Outcome` per mutation."""
    rng = random.Random(f"{fmt.name}-{seed}")
    for _ in range(count):
        description, data = fmt.mutant(ctx, rng)
        yield run_one(fmt, data, ctx, description)


__all__ = ["FORMATS", "Context", "Outcome", "build_context", "fuzz", "run_one", "mutate_bytes", "mutate_doc"]
