"""A Triton Inference Server model repository from an atexport ONNX model, OpenVINO IR or TensorRT engine.

:func:`write_triton_repo` lays out ``<repo>/<name>/`` the way Triton expects::

    repo/
      digits/
        config.pbtxt      # platform, inputs/outputs and dims from the metadata, batching, labels
        labels.txt        # one class name per line (label_filename: Triton's classification extension)
        atexport.json     # the model's atexport metadata: preprocessing for clients, classes, provenance
        1/
          model.onnx      # or model.plan for a TensorRT engine, model.xml + model.bin for an OpenVINO IR

``platform`` is ``onnxruntime_onnx`` or ``tensorrt_plan``; an OpenVINO IR (``atexport openvino``) gets
``backend: "openvino"`` with ``default_model_filename: "model.xml"``, runs on CPU instances, with
``PERFORMANCE_HINT: LATENCY`` and, for a BF16 or INT8+BF16 IR, ``HINT_BF16: YES`` (Triton's OpenVINO backend
has no FP32 hint: on AMX / AVX512-BF16 hosts OpenVINO then runs an FP32 IR in BF16). The batch axis is left out of ``dims`` when
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

from atexport.deploy.pbtxt import parse_pbtxt, read_triton_config, render_config  # noqa: F401 (re-exported)
from atexport.errors import BadInputError

PLATFORMS = {"onnx": "onnxruntime_onnx", "engine": "tensorrt_plan", "openvino": "openvino"}
MODEL_FILES = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan", "openvino": "model.xml"}
BF16_NOTE = ("Triton's OpenVINO backend takes no FP32 precision hint: on a host with AMX or AVX512-BF16, "
             "OpenVINO runs this FP32 IR in BF16 (check that precision with 'atexport verify --openvino "
             "MODEL.onnx --openvino-precision bf16'); serve it with onnxruntime_onnx where FP32 is required.")
_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
          "uint8": "TYPE_UINT8", "int8": "TYPE_INT8", "bool": "TYPE_BOOL"}
_ONNX_TYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 2: "uint8", 3: "int8", 9: "bool"}


@dataclass
class TritonRepo:
    """What :func:`write_triton_repo` wrote.

    Attributes:
        model_dir: ``<repo>/<name>``.
        config_path: its ``config.pbtxt``.
        model_path: ``<model_dir>/<version>/model.onnx``, ``model.plan`` or ``model.xml``.
        labels_path: ``labels.txt`` (``None`` without class names).
        config: the config as read back from disk.
        notes: what the user should know about how Triton will run it.
    """

    model_dir: Path
    config_path: Path
    model_path: Path
    labels_path: Path | None
    config: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def summary(self) -> str:
        c = self.config
        ins = ", ".join(f"{i['name']} {i['data_type']} {i.get('dims')}" for i in c.get("input", []))
        outs = ", ".join(f"{o['name']} {o['data_type']} {o.get('dims')}" for o in c.get("output", []))
        batching = "dynamic batching" if "dynamic_batching" in c else "no batching by Triton"
        return (f"model {c.get('name')!r} ({c.get('platform') or c.get('backend')}), max_batch_size {c.get('max_batch_size')}, {batching}\n"
                f"inputs:  {ins}\noutputs: {outs}")


# --------------------------------------------------------------------------------------------------
# The repository


def _sanitize(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")
    return s or "model"


def engine_io(side: dict, meta) -> tuple[list[dict], list[dict], tuple[int, int] | None]:
    """An engine's inputs and outputs from its sidecar, and its profile's ``(min, max)`` batch.

    Every engine input is declared: the image and, for a multi-task engine, its per-sample ``task_id`` (int64,
    the metadata's ``extra["task_input"]``); each batch-aligned input has a profile entry. A fixed-batch
    engine (profile min = max) keeps its batch in the shapes.
    """
    profiles = {p.get("input"): p for p in side.get("profiles") or []}
    first = (side.get("profiles") or [{}])[0]
    rng = (int(first["min"][0]), int(first["max"][0])) if first.get("min") and first.get("max") else None
    fixed = rng is not None and rng[0] == rng[1]

    def shape(name, declared):
        p = profiles.get(name)
        if p is not None:  # the profile's max shape, batch first
            dims = list(p["max"])
            return dims if fixed else ["batch", *dims[1:]]
        return list(declared)

    inputs = [{"name": meta.input["name"], "dtype": meta.input.get("dtype", "float32"),
               "shape": shape(meta.input["name"], meta.input["shape"])}]
    spec = (meta.extra or {}).get("task_input") or {}
    if meta.tasks or spec:
        name = str(spec.get("name", "task_id"))
        inputs.append({"name": name, "dtype": str(spec.get("dtype", "int64")),
                       "shape": shape(name, spec.get("shape") or ["batch"])})
    out_shape = list(meta.output["shape"])
    if fixed:
        out_shape = [rng[0], *out_shape[1:]]
    outputs = [{"name": meta.output["name"], "dtype": "float32", "shape": out_shape}]
    return inputs, outputs, rng


def _model_io(path: Path, kind: str):
    """``(metadata, inputs, outputs, engine profile (min, max) batch or None)``: tensors as ``{name, dtype, shape}``."""

    if kind == "engine":
        from atexport.artifact.sidecar import read_sidecar, sidecar_metadata

        side = read_sidecar(path, "--model")
        meta = sidecar_metadata(side, f"--model {path}")
        return meta, *engine_io(side, meta)
    if kind == "openvino":
        return (*openvino_io(path), None)
    from atexport.artifact.onnx import read_onnx
    from atexport.artifact.metadata import read_onnx_metadata

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


def openvino_io(path: Path):
    """``(metadata, inputs, outputs)`` of an OpenVINO IR written by ``atexport openvino`` (dynamic dims: -1)."""
    from atexport.runtime.openvino import read_metadata, read_ov_model

    model = read_ov_model(path, "--model")
    meta = read_metadata(model, f"--model {path}")
    if meta is None:
        raise BadInputError(f"--model {path}: no atexport metadata; write the IR with 'atexport openvino --onnx MODEL.onnx'.")
    types = {"f32": "float32", "f16": "float16", "i64": "int64", "i32": "int32", "u8": "uint8", "i8": "int8",
             "boolean": "bool"}

    def tensors(ports):
        return [{"name": p.get_any_name(), "dtype": types.get(p.get_element_type().get_type_name(), "float32"),
                 "shape": [d.get_length() if d.is_static else -1 for d in p.get_partial_shape()]} for p in ports]

    return meta, tensors(model.inputs), tensors(model.outputs)


def ir_precision(meta) -> str:
    """The precision an IR written by ``atexport openvino`` records (``fp32`` where it records none)."""
    return str(((meta.extra or {}).get("openvino") or {}).get("precision") or "fp32")


def write_triton_repo(
    model: str | os.PathLike,
    output: str | os.PathLike,
    *,
    name: str | None = None,
    max_batch: int | None = None,
    version: int = 1,
    preferred_batch: list[int] | None = None,
    max_queue_delay_us: int | None = None,
    instance_kind: str | None = None,
    instances: int = 1,
    force: bool = False,
    backend: str | None = None,
) -> TritonRepo:
    """Write a Triton model repository entry for an atexport model and validate it by reading it back.

    Every option is checked first; the entry is written into a temporary folder beside it, read back and
    checked, then renamed into place, so a failed run leaves nothing that looks like a model.

    Args:
        model: an ``.onnx`` model or an ``.engine`` (with its sidecar).
        output: the repository root (created if needed); the model goes to ``<output>/<name>``.
        name: model name (default: the file's stem, made Triton-safe).
        max_batch: ``max_batch_size`` for a dynamic-batch model (default: 8 for ONNX, the profile's maximum
            for an engine, which also caps it). Fixed-batch models get ``max_batch_size: 0`` and full dims.
        version: the version folder.
        preferred_batch: ``dynamic_batching.preferred_batch_size`` (default: none, Triton's choice); each at
            most ``max_batch_size``.
        max_queue_delay_us: ``dynamic_batching.max_queue_delay_microseconds`` (default 100).
        instance_kind: ``cpu`` or ``gpu`` for an ``instance_group`` (default: Triton's choice; engines: gpu,
            OpenVINO IRs: cpu).
        instances: instances per group.
        force: replace an existing entry of that name.
        backend: ``onnxruntime``, ``tensorrt`` or ``openvino`` (default: from the suffix: ``.onnx``, ``.engine``
            / ``.plan``, ``.xml``); ``openvino`` takes the IR ``atexport openvino`` writes (its ``.bin`` beside it).
    """
    import tempfile

    from atexport.utils.io import atomic_write_json, atomic_write_text, check_writable

    src = Path(model)
    if not src.is_file():
        raise BadInputError(f"--model {src}: no such file.")
    kind = {".engine": "engine", ".plan": "engine", ".trt": "engine", ".onnx": "onnx", ".xml": "openvino"}.get(
        src.suffix.lower())
    if kind is None:
        raise BadInputError(f"--model {src}: give an .onnx model, an OpenVINO .xml IR or a TensorRT .engine/.plan.")
    if backend not in (None, "onnxruntime", "tensorrt", "openvino"):
        raise BadInputError(f"--backend {backend}: expected onnxruntime, tensorrt or openvino.")
    natural = {"onnx": "onnxruntime", "engine": "tensorrt", "openvino": "openvino"}[kind]
    if backend is not None and backend != natural:
        onnx = str(src) if kind == "onnx" else "MODEL.onnx"  # an engine or IR: the .onnx it was made from
        how = {"openvino": f"write its OpenVINO IR with 'atexport openvino --onnx {onnx}' and give the .xml",
               "tensorrt": f"build an engine with 'atexport trt --onnx {onnx}' and give the .engine"}.get(
                   backend, "give the .onnx model")
        if kind != "onnx":
            how += f" (MODEL.onnx: the ONNX model {src.name} was made from)"
        raise BadInputError(f"--backend {backend}: {src} runs in {natural}; to serve it with {backend}, {how}.")
    if kind == "openvino" and not src.with_suffix(".bin").is_file():
        raise BadInputError(f"--model {src}: its weights {src.with_suffix('.bin').name} are missing beside it.")
    if kind == "openvino" and instance_kind == "gpu":
        raise BadInputError("--instance-kind gpu: Triton's OpenVINO backend runs on CPU instances; use cpu or leave it out.")
    if max_batch is not None and int(max_batch) < 1:
        raise BadInputError(f"--max-batch {max_batch}: must be at least 1.")
    if int(version) < 1:
        raise BadInputError(f"--version {version}: must be a positive integer.")
    if instance_kind not in (None, "cpu", "gpu"):
        raise BadInputError(f"--instance-kind {instance_kind}: expected cpu or gpu.")
    if int(instances) < 1:
        raise BadInputError(f"--instances {instances}: must be at least 1.")
    if max_queue_delay_us is not None and int(max_queue_delay_us) < 0:
        raise BadInputError(f"--max-queue-delay-us {max_queue_delay_us}: must be 0 or more.")
    if preferred_batch is not None and any(int(b) < 1 for b in preferred_batch):
        raise BadInputError(f"--preferred-batch {','.join(map(str, preferred_batch))}: sizes must be at least 1.")
    if kind == "engine" and instance_kind == "cpu":
        raise BadInputError("--instance-kind cpu: a TensorRT engine runs on the GPU only; use gpu or leave it out.")
    meta, inputs, outputs, profile = _model_io(src, kind)
    from atexport.artifact.graph import check_graph_fits_metadata

    check_graph_fits_metadata(meta, {t["name"]: t["shape"] for t in inputs}, {t["name"]: t["shape"] for t in outputs},
                              f"--model {src}")
    name = _sanitize(name) if name else _sanitize(src.stem)
    model_dir = Path(output) / name
    if model_dir.exists() and not force:
        raise BadInputError(f"-o {output}: {model_dir} already exists; pass --force to replace it, or --name another.")
    platform = PLATFORMS[kind]
    image = next((t for t in inputs if t["name"] == meta.input.get("name")), inputs[0] if inputs else None)
    if image is None:
        raise BadInputError(f"--model {src}: no image input found.")
    if kind == "engine":
        dynamic = profile is None or profile[0] != profile[1]
        if dynamic and profile is not None:
            if profile[0] > 1:
                raise BadInputError(
                    f"--model {src}: the engine's profile starts at batch {profile[0]}, but Triton sends any batch "
                    f"from 1; rebuild it with 'atexport trt --batch 1,{profile[0]},{profile[1]}'."
                )
            if max_batch is not None and int(max_batch) > profile[1]:
                raise BadInputError(
                    f"--max-batch {max_batch}: the engine's optimisation profile stops at batch {profile[1]}; "
                    f"use --max-batch {profile[1]} or rebuild with 'atexport trt --batch 1,8,{max_batch}'."
                )
        default_max = profile[1] if profile is not None else 8
    else:
        dynamic = not isinstance(image["shape"][0], int) or image["shape"][0] in (-1, 0)
        default_max = 8
    mbs = int(max_batch if max_batch is not None else default_max) if dynamic else 0
    if not dynamic:
        fixed = image["shape"][0]
        given = [f for f, v in (("--max-batch", max_batch), ("--preferred-batch", preferred_batch),
                                ("--max-queue-delay-us", max_queue_delay_us)) if v is not None]
        if given:
            raise BadInputError(
                f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to dynamic-batch models; {src} has a "
                f"fixed batch of {fixed}, so Triton gets max_batch_size 0 (no batching by Triton)."
            )
    too_big = [int(b) for b in preferred_batch or [] if int(b) > mbs]
    if too_big:
        raise BadInputError(
            f"--preferred-batch {','.join(map(str, preferred_batch))}: {too_big} exceed max_batch_size {mbs}, which "
            "Triton refuses; give sizes up to --max-batch."
        )

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
        config["dynamic_batching"] = {"preferred_batch_size": [int(b) for b in preferred_batch or []],
                                      "max_queue_delay_microseconds": int(100 if max_queue_delay_us is None
                                                                          else max_queue_delay_us)}
    notes = []
    if kind == "openvino":
        del config["platform"]
        config["backend"] = "openvino"
        config["default_model_filename"] = MODEL_FILES["openvino"]
        precision = ir_precision(meta)
        config["parameters"]["PERFORMANCE_HINT"] = "LATENCY"
        if precision in ("bf16", "int8+bf16"):
            config["parameters"]["HINT_BF16"] = "YES"
        elif precision == "fp32":
            notes.append(BF16_NOTE)
        else:  # int8: its INT8 layers run in INT8 either way; its float ops may run in BF16
            notes.append(BF16_NOTE.replace("this FP32 IR", "the float ops of this INT8 IR").replace(
                "--openvino-precision bf16", "--openvino-precision int8+bf16").replace("MODEL.onnx", "MODEL.int8.onnx"))
    kind_group = instance_kind or {"engine": "gpu", "openvino": "cpu"}.get(kind)
    if kind_group:
        config["instance_group"] = [{"count": int(instances), "kind": f"KIND_{kind_group.upper()}"}]
    # Write everything into a temporary folder beside the entry, check it, then rename it into place.
    root = Path(output)
    check_writable(root / f".{name}.tmp", "-o")  # creates the repository root; says so if it cannot
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
    try:
        target = tmp / str(int(version)) / MODEL_FILES[platform]
        target.parent.mkdir(parents=True)
        shutil.copyfile(src, target)
        if kind == "openvino":
            shutil.copyfile(src.with_suffix(".bin"), target.with_suffix(".bin"))
        if labels:
            atomic_write_text(tmp / labels, "\n".join(meta.class_names) + "\n")
        from dataclasses import asdict

        atomic_write_json(tmp / "atexport.json", asdict(meta))
        atomic_write_text(tmp / "config.pbtxt", render_config(config))
        checked = validate_triton_repo(tmp, meta=meta, name=name)
        old = None
        if model_dir.exists():  # --force: the old entry leaves only once the new one is complete
            old = root / f".{name}.old-{os.getpid()}"
            os.replace(model_dir, old)
        os.replace(tmp, model_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    labels_path = model_dir / labels if labels else None
    repo = TritonRepo(model_dir, model_dir / "config.pbtxt", model_dir / str(int(version)) / MODEL_FILES[platform],
                      labels_path)
    repo.config, repo.notes = checked, notes
    return repo


def validate_triton_repo(model_dir: str | os.PathLike, meta=None, name: str | None = None) -> dict:
    """Read ``<model_dir>/config.pbtxt`` back and check it against the files beside it.

    Checked: the name is the folder's (or ``name``, for a folder about to be renamed); the platform's default
    model file exists in a numeric version folder; every preferred batch size is at most ``max_batch_size``;
    the image input (and a multi-task model's task input) and the logits output are declared with the
    model's dims (without the batch axis when ``max_batch_size`` > 0); the labels file has one line per class.

    Returns:
        The parsed config.

    Raises:
        BadInputError: with every problem found.
    """
    model_dir = Path(model_dir)
    cfg = read_triton_config(model_dir / "config.pbtxt")
    problems = []
    want_name = name or model_dir.name
    if cfg.get("name") != want_name:
        problems.append(f"name {cfg.get('name')!r} is not the folder's {want_name!r}")
    platform = cfg.get("platform") or cfg.get("backend")
    if platform not in MODEL_FILES:
        problems.append(f"platform {platform!r} is not one of {sorted(MODEL_FILES)}")
    else:
        versions = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
        wanted = cfg.get("default_model_filename") or MODEL_FILES[platform]
        if not any((v / wanted).is_file() for v in versions):
            problems.append(f"no numeric version folder holds {wanted}")
        if platform == "openvino" and not any((v / Path(wanted).with_suffix(".bin")).is_file() for v in versions):
            problems.append(f"no numeric version folder holds the IR's weights {Path(wanted).with_suffix('.bin')}")
        if platform == "openvino" and any(g.get("kind") == "KIND_GPU" for g in cfg.get("instance_group") or []):
            problems.append("the OpenVINO backend runs on KIND_CPU instances, not KIND_GPU")
    mbs = cfg.get("max_batch_size")
    if not isinstance(mbs, int) or mbs < 0:
        problems.append(f"max_batch_size {mbs!r} is not a non-negative integer")
    if mbs and "dynamic_batching" not in cfg:
        problems.append("max_batch_size > 0 without dynamic_batching")
    db = cfg.get("dynamic_batching")
    if isinstance(db, dict):
        pref = db.get("preferred_batch_size") or []
        pref = pref if isinstance(pref, list) else [pref]
        if not mbs:
            problems.append("dynamic_batching with max_batch_size 0")
        elif any(not isinstance(b, int) or b < 1 or b > mbs for b in pref):
            problems.append(f"preferred_batch_size {pref} not all within 1..max_batch_size {mbs}")
    if meta is None and (model_dir / "atexport.json").is_file():
        from atexport.artifact.metadata import ModelMetadata

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
        spec = (meta.extra or {}).get("task_input") or {}
        if meta.tasks:
            t = ins.get(str(spec.get("name", "task_id")))
            if t is None:
                problems.append(f"the task input {spec.get('name', 'task_id')!r} of this multi-task model is not declared")
            elif t.get("data_type") != "TYPE_INT64":
                problems.append(f"task input data_type {t.get('data_type')} is not TYPE_INT64")
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
