"""A Triton Inference Server model repository from an atexport ONNX model or TensorRT engine.

:func:`write_triton_repo` lays out ``<repo>/<name>/`` the way Triton expects::

    repo/
      digits/
        config.pbtxt      # platform, inputs/outputs and dims from the metadata, batching, labels
        labels.txt        # one class name per line (label_filename: Triton's classification extension)
        atexport.json     # the model's atexport metadata: preprocessing for clients, classes, provenance
        1/
          model.onnx      # or model.plan for a TensorRT engine

``platform`` is ``onnxruntime_onnx`` or ``tensorrt_plan``; the batch axis is left out of ``dims`` when
the model has a dynamic batch (``max_batch_size`` > 0, with ``dynamic_batching``), and kept, with
``max_batch_size: 0``, for a fixed-batch model. A multi-task model's ``task_id`` input (int64, one per
image) is declared ``dims: [ 1 ]`` with ``reshape: { shape: [ ] }``, so each request sends one task id
per image. The written ``config.pbtxt`` is read back with :func:`parse_pbtxt` (a small parser of
protobuf's text format: no tritonclient or protobuf needed) and checked against the model
(:func:`validate_triton_repo`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atexport.errors import BadInputError

PLATFORMS = {"onnx": "onnxruntime_onnx", "engine": "tensorrt_plan"}
MODEL_FILES = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}
_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
          "uint8": "TYPE_UINT8", "int8": "TYPE_INT8", "bool": "TYPE_BOOL"}
_ONNX_TYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 2: "uint8", 3: "int8", 9: "bool"}


@dataclass
class TritonRepo:
    """What :func:`write_triton_repo` wrote.

    Attributes:
        model_dir: ``<repo>/<name>``.
        config_path: its ``config.pbtxt``.
        model_path: ``<model_dir>/<version>/model.onnx`` or ``model.plan``.
        labels_path: ``labels.txt`` (``None`` without class names).
        config: the config as read back from disk.
    """

    model_dir: Path
    config_path: Path
    model_path: Path
    labels_path: Path | None
    config: dict = field(default_factory=dict)

    def summary(self) -> str:
        c = self.config
        ins = ", ".join(f"{i['name']} {i['data_type']} {i.get('dims')}" for i in c.get("input", []))
        outs = ", ".join(f"{o['name']} {o['data_type']} {o.get('dims')}" for o in c.get("output", []))
        batching = "dynamic batching" if "dynamic_batching" in c else "no batching by Triton"
        return (f"model {c.get('name')!r} ({c.get('platform')}), max_batch_size {c.get('max_batch_size')}, {batching}\n"
                f"inputs:  {ins}\noutputs: {outs}")


# --------------------------------------------------------------------------------------------------
# protobuf text format: writer and a small reader


def _quote(s: str) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _dims(dims) -> str:
    return "[ " + ", ".join(str(int(d)) for d in dims) + " ]"


def _tensor_block(t: dict, indent: str = "  ") -> str:
    lines = [f"{indent}{{", f"{indent}  name: {_quote(t['name'])}", f"{indent}  data_type: {t['data_type']}",
             f"{indent}  dims: {_dims(t['dims'])}"]
    if t.get("reshape") is not None:
        lines.append(f"{indent}  reshape: {{ shape: {_dims(t['reshape'])} }}")
    if t.get("label_filename"):
        lines.append(f"{indent}  label_filename: {_quote(t['label_filename'])}")
    lines.append(f"{indent}}}")
    return "\n".join(lines)


def render_config(config: dict) -> str:
    """``config.pbtxt`` text of a config dict (the subset of ModelConfig atexport writes)."""
    out = [f"name: {_quote(config['name'])}", f"platform: {_quote(config['platform'])}",
           f"max_batch_size: {int(config['max_batch_size'])}"]
    for key in ("input", "output"):
        out.append(f"{key} [\n" + ",\n".join(_tensor_block(t) for t in config[key]) + "\n]")
    db = config.get("dynamic_batching")
    if db is not None:
        inner = []
        if db.get("preferred_batch_size"):
            inner.append(f"  preferred_batch_size: {_dims(db['preferred_batch_size'])}")
        if db.get("max_queue_delay_microseconds") is not None:
            inner.append(f"  max_queue_delay_microseconds: {int(db['max_queue_delay_microseconds'])}")
        out.append("dynamic_batching {\n" + "\n".join(inner) + ("\n" if inner else "") + "}")
    for g in config.get("instance_group") or []:
        out.append(f"instance_group [\n  {{\n    count: {int(g.get('count', 1))}\n    kind: {g['kind']}\n  }}\n]")
    params = config.get("parameters") or {}
    for k, v in params.items():
        out.append(f"parameters {{\n  key: {_quote(k)}\n  value: {{ string_value: {_quote(v)} }}\n}}")
    return "\n".join(out) + "\n"


_TOKEN = re.compile(r'\s+|#[^\n]*|"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|[{}\[\]:,;<>]|[^\s{}\[\]:,;<>"\'#]+')


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise BadInputError(f"config.pbtxt: cannot read it at character {pos}: {text[pos:pos + 20]!r}.")
        tok = m.group(0)
        pos = m.end()
        if tok.strip() and not tok.startswith("#"):
            out.append(tok)
    return out


_ESCAPES = re.compile(r"\\(.)")
_UNESCAPE = {"n": "\n", "t": "\t", "r": "\r"}


def _scalar(tok: str):
    if tok[0] in "\"'":
        return _ESCAPES.sub(lambda m: _UNESCAPE.get(m.group(1), m.group(1)), tok[1:-1])
    if tok in ("true", "True"):
        return True
    if tok in ("false", "False"):
        return False
    try:
        return int(tok)
    except ValueError:
        pass
    try:
        return float(tok)
    except ValueError:
        return tok  # an enum name such as TYPE_FP32 or KIND_GPU


def parse_pbtxt(text: str) -> dict:
    """Parse protobuf text format into nested dicts; repeated fields become lists.

    Enough of the grammar for Triton configs: ``key: value``, ``key { ... }``, ``key: [ v, ... ]``,
    ``key [ { ... }, { ... } ]``, strings, numbers, enums and comments.

    Raises:
        BadInputError: the text is not valid protobuf text format.
    """
    toks = _tokens(text)
    pos = 0

    def expect(t):
        nonlocal pos
        if pos >= len(toks) or toks[pos] != t:
            got = toks[pos] if pos < len(toks) else "end of file"
            raise BadInputError(f"config.pbtxt: expected {t!r}, found {got!r}.")
        pos += 1

    def value():
        nonlocal pos
        t = toks[pos]
        if t in ("{", "<"):
            return message()
        if t == "[":
            pos += 1
            items = []
            while toks[pos] != "]":
                items.append(value())
                if toks[pos] == ",":
                    pos += 1
            pos += 1
            return items
        pos += 1
        return _scalar(t)

    def message():
        nonlocal pos
        close = "}" if toks[pos] == "{" else ">"
        pos += 1
        out = fields(close)
        expect(close)
        return out

    def fields(stop):
        nonlocal pos
        out: dict[str, Any] = {}
        while pos < len(toks) and toks[pos] != stop:
            key = toks[pos]
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_.]*$", key):
                raise BadInputError(f"config.pbtxt: expected a field name, found {key!r}.")
            pos += 1
            if pos < len(toks) and toks[pos] == ":":
                pos += 1
            elif pos >= len(toks) or toks[pos] not in ("{", "<", "["):
                raise BadInputError(f"config.pbtxt: field {key!r} has no value.")
            v = value()
            if key in out:
                prev = out[key]
                out[key] = (prev if isinstance(prev, list) else [prev]) + (v if isinstance(v, list) else [v])
            else:
                out[key] = v
            if pos < len(toks) and toks[pos] in (",", ";"):
                pos += 1
        return out

    try:
        result = fields(None)
    except IndexError:
        raise BadInputError("config.pbtxt: unexpected end of file (unbalanced brackets).") from None
    if pos != len(toks):
        raise BadInputError(f"config.pbtxt: unexpected {toks[pos]!r}.")
    return result


def read_triton_config(path: str | os.PathLike) -> dict:
    """Read a ``config.pbtxt`` into a dict (``input``/``output`` always lists)."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: no such config.pbtxt.")
    cfg = parse_pbtxt(path.read_text())
    for key in ("input", "output", "instance_group"):
        if key in cfg and isinstance(cfg[key], dict):
            cfg[key] = [cfg[key]]
    return cfg


# --------------------------------------------------------------------------------------------------
# The repository


def _sanitize(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")
    return s or "model"


def _model_io(path: Path, kind: str):
    """``(metadata, inputs, outputs, batch info)``: tensors as ``{name, dtype, shape}``."""
    from atexport.metadata import ModelMetadata

    if kind == "engine":
        from atexport.export.tensorrt import read_sidecar

        side = read_sidecar(path)
        md = side.get("metadata") or {}
        meta = ModelMetadata(**{k: v for k, v in md.items() if k in ModelMetadata.__dataclass_fields__})
        prof = (side.get("profiles") or [{}])[0]
        inputs = [{"name": meta.input["name"], "dtype": meta.input.get("dtype", "float32"), "shape": meta.input["shape"]}]
        outputs = [{"name": meta.output["name"], "dtype": "float32", "shape": meta.output["shape"]}]
        max_batch = int(prof["max"][0]) if prof.get("max") else None
        return meta, inputs, outputs, max_batch
    from atexport.export.swap import read_onnx
    from atexport.metadata import read_onnx_metadata

    proto = read_onnx(path, "--model")
    meta = read_onnx_metadata(proto, str(path))
    inits = {i.name for i in proto.graph.initializer}

    def tensors(values):
        out = []
        for vi in values:
            if vi.name in inits:
                continue  # overridable initializers (separable task weights): not request inputs
            tt = vi.type.tensor_type
            shape = [d.dim_value if d.dim_value else (d.dim_param or -1) for d in tt.shape.dim]
            out.append({"name": vi.name, "dtype": _ONNX_TYPES.get(tt.elem_type, "float32"), "shape": shape})
        return out

    return meta, tensors(proto.graph.input), tensors(proto.graph.output), None


def write_triton_repo(
    model: str | os.PathLike,
    output: str | os.PathLike,
    *,
    name: str | None = None,
    max_batch: int = 8,
    version: int = 1,
    preferred_batch: list[int] | None = None,
    max_queue_delay_us: int = 100,
    instance_kind: str | None = None,
    instances: int = 1,
    force: bool = False,
) -> TritonRepo:
    """Write a Triton model repository entry for an atexport model and validate it by reading it back.

    Args:
        model: an ``.onnx`` model or an ``.engine`` (with its sidecar).
        output: the repository root (created if needed); the model goes to ``<output>/<name>``.
        name: model name (default: the file's stem, made Triton-safe).
        max_batch: ``max_batch_size`` for a dynamic-batch model (an engine's profile maximum caps it).
        version: the version folder.
        preferred_batch: ``dynamic_batching.preferred_batch_size`` (default: none, Triton's choice).
        max_queue_delay_us: ``dynamic_batching.max_queue_delay_microseconds``.
        instance_kind: ``cpu`` or ``gpu`` for an ``instance_group`` (default: Triton's choice; engines: gpu).
        instances: instances per group.
        force: replace an existing entry of that name.
    """
    from atexport.utils.io import atomic_write_json, atomic_write_text, check_writable

    src = Path(model)
    if not src.is_file():
        raise BadInputError(f"--model {src}: no such file.")
    kind = "engine" if src.suffix.lower() in (".engine", ".plan", ".trt") else "onnx" if src.suffix.lower() == ".onnx" else None
    if kind is None:
        raise BadInputError(f"--model {src}: give an .onnx model or a TensorRT .engine/.plan.")
    if int(max_batch) < 1:
        raise BadInputError(f"--max-batch {max_batch}: must be at least 1.")
    if int(version) < 1:
        raise BadInputError(f"--version {version}: must be a positive integer.")
    if instance_kind not in (None, "cpu", "gpu"):
        raise BadInputError(f"--instance-kind {instance_kind}: expected cpu or gpu.")
    meta, inputs, outputs, profile_max = _model_io(src, kind)
    name = _sanitize(name) if name else _sanitize(src.stem)
    model_dir = Path(output) / name
    if model_dir.exists() and not force:
        raise BadInputError(f"-o {output}: {model_dir} already exists; pass --force to replace it, or --name another.")
    platform = PLATFORMS[kind]
    image = next((t for t in inputs if t["name"] == meta.input.get("name")), inputs[0] if inputs else None)
    if image is None:
        raise BadInputError(f"--model {src}: no image input found.")
    dynamic = not isinstance(image["shape"][0], int) or image["shape"][0] in (-1, 0)
    if kind == "engine":
        dynamic = True  # engines are built with an optimisation profile over the batch axis
        if profile_max is not None and int(max_batch) > profile_max:
            raise BadInputError(
                f"--max-batch {max_batch}: the engine's optimisation profile stops at batch {profile_max}; "
                f"use --max-batch {profile_max} or rebuild with 'atexport trt --batch 1,8,{max_batch}'."
            )
    mbs = int(max_batch) if dynamic else 0

    def entry(t, label=None):
        dtype = _TYPES.get(str(t["dtype"]))
        if dtype is None:
            raise BadInputError(f"--model {src}: tensor {t['name']} has type {t['dtype']}, which Triton cannot take.")
        dims = [int(d) if isinstance(d, int) and d > 0 else -1 for d in t["shape"]]
        e = {"name": t["name"], "data_type": dtype, "dims": dims[1:] if mbs else dims}
        if mbs and not e["dims"]:  # a per-image scalar (task_id [N]): one value per request item
            e["dims"], e["reshape"] = [1], []
        if label:
            e["label_filename"] = label
        return e

    labels = None
    if meta.tasks:
        pass  # several tasks: class names per task live in atexport.json
    elif meta.class_names:
        labels = "labels.txt"
    logits = next((t for t in outputs if t["name"] == (meta.output or {}).get("name")), outputs[0])
    config = {
        "name": name,
        "platform": platform,
        "max_batch_size": mbs,
        "input": [entry(t) for t in inputs],
        "output": [entry(t, labels if t is logits else None) for t in outputs],
        "parameters": {"atexport.preprocess": json.dumps(meta.preprocess)},
    }
    if mbs:
        config["dynamic_batching"] = {"preferred_batch_size": list(preferred_batch or []),
                                      "max_queue_delay_microseconds": int(max_queue_delay_us)}
    kind_group = instance_kind or ("gpu" if kind == "engine" else None)
    if kind_group:
        config["instance_group"] = [{"count": int(instances), "kind": f"KIND_{kind_group.upper()}"}]
    # Write: the model file first (atomically, via a temp copy), then labels, metadata and config.
    target = model_dir / str(int(version)) / MODEL_FILES[platform]
    check_writable(target, "-o")
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, target)
    labels_path = None
    if labels:
        labels_path = atomic_write_text(model_dir / labels, "\n".join(meta.class_names) + "\n")
    from dataclasses import asdict

    atomic_write_json(model_dir / "atexport.json", asdict(meta))
    config_path = atomic_write_text(model_dir / "config.pbtxt", render_config(config))
    repo = TritonRepo(model_dir, config_path, target, labels_path)
    repo.config = validate_triton_repo(model_dir, meta=meta)
    return repo


def validate_triton_repo(model_dir: str | os.PathLike, meta=None) -> dict:
    """Read ``<model_dir>/config.pbtxt`` back and check it against the files beside it.

    Checked: the name is the folder's; the platform's default model file exists in a numeric version
    folder; the image input and the logits output are declared with the model's dims (without the batch
    axis when ``max_batch_size`` > 0); the labels file has one line per class.

    Returns:
        The parsed config.

    Raises:
        BadInputError: with every problem found.
    """
    model_dir = Path(model_dir)
    cfg = read_triton_config(model_dir / "config.pbtxt")
    problems = []
    if cfg.get("name") != model_dir.name:
        problems.append(f"name {cfg.get('name')!r} is not the folder's {model_dir.name!r}")
    platform = cfg.get("platform")
    if platform not in MODEL_FILES:
        problems.append(f"platform {platform!r} is not one of {sorted(MODEL_FILES)}")
    else:
        versions = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
        if not any((v / MODEL_FILES[platform]).is_file() for v in versions):
            problems.append(f"no numeric version folder holds {MODEL_FILES[platform]}")
    mbs = cfg.get("max_batch_size")
    if not isinstance(mbs, int) or mbs < 0:
        problems.append(f"max_batch_size {mbs!r} is not a non-negative integer")
    if mbs and "dynamic_batching" not in cfg:
        problems.append("max_batch_size > 0 without dynamic_batching")
    if meta is None and (model_dir / "atexport.json").is_file():
        from atexport.metadata import ModelMetadata

        meta = ModelMetadata.from_json((model_dir / "atexport.json").read_text(), str(model_dir / "atexport.json"))
    ins = {t.get("name"): t for t in cfg.get("input", [])}
    outs = {t.get("name"): t for t in cfg.get("output", [])}
    if meta is not None:
        want_in = [int(v) for v in meta.preprocess["input_size"]]
        i = ins.get(meta.input.get("name"))
        if i is None:
            problems.append(f"the image input {meta.input.get('name')!r} is not declared")
        else:
            dims = list(i.get("dims") or [])
            if mbs and dims != want_in:
                problems.append(f"input dims {dims} != the model's {want_in}")
            if not mbs and dims[1:] != want_in:
                problems.append(f"input dims {dims} != the model's [batch, *{want_in}]")
            if i.get("data_type") != "TYPE_FP32":
                problems.append(f"input data_type {i.get('data_type')} is not TYPE_FP32")
        o = outs.get((meta.output or {}).get("name"))
        if o is None:
            problems.append(f"the logits output {(meta.output or {}).get('name')!r} is not declared")
        else:
            n = int(meta.output["shape"][-1]) if isinstance(meta.output["shape"][-1], int) else None
            if n is not None and list(o.get("dims") or [])[-1:] != [n]:
                problems.append(f"output dims {o.get('dims')} do not end in the model's {n} classes")
            label = o.get("label_filename")
            if label:
                lp = model_dir / label
                if not lp.is_file():
                    problems.append(f"label_filename {label!r} is missing")
                else:
                    count = len([ln for ln in lp.read_text().splitlines() if ln.strip()])
                    if meta.num_classes is not None and count != int(meta.num_classes):
                        problems.append(f"{label} has {count} labels for {meta.num_classes} classes")
    if problems:
        raise BadInputError(f"{model_dir / 'config.pbtxt'} is not a valid Triton config: " + "; ".join(problems) + ".")
    return cfg
