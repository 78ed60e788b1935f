"""A Triton Inference Server model repository from an atexport ONNX model, OpenVINO IR or TensorRT engine.

:func:`write_triton_repo` lays out ``<repo>/<name>/`` the way Triton expects::

    repo/
      digits/
        config.pbtxt      # platform, inputs/outputs and dims from the metadata, batching, labels
        labels.txt        # one class name per line (label_filename: Triton's classification extension)
        atexport.json     # the model's atexport metadata: preprocessing for clients, classes, provenance
        1/
          model.onnx      # or model.plan for a TensorRT engine, model.xml + model.bin for an OpenVINO IR

Which backend serves a file, its platform and model file name, its instance kind and its extra parameters are
looked up in :data:`atexport.runtime.backends.BACKENDS` (each row's ``triton``).
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

from atexport.deploy.pbtxt import parse_pbtxt, read_triton_config, render_config  # noqa: F401 (re-exported)
from atexport.errors import BadInputError
from atexport.runtime.backends import Backend, backend_for, labels, resolve, triton_backends
from atexport.runtime.openvino import BF16_NOTE, ir_precision, openvino_io  # noqa: F401 (re-exported)
from atexport.runtime.tensorrt import engine_io  # noqa: F401 (re-exported)

_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
          "uint8": "TYPE_UINT8", "int8": "TYPE_INT8", "bool": "TYPE_BOOL"}


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


@dataclass(frozen=True)
class TritonOptions:
    """How Triton batches and places the model: every value checked once, here.

    Attributes:
        max_batch: ``max_batch_size`` for a dynamic-batch model (default: 8 for ONNX, the profile's maximum
            for an engine, which also caps it). Fixed-batch models get ``max_batch_size: 0`` and full dims.
        version: the version folder.
        preferred_batch: ``dynamic_batching.preferred_batch_size`` (default: none, Triton's choice); each at
            most ``max_batch_size``.
        max_queue_delay_us: ``dynamic_batching.max_queue_delay_microseconds`` (default 100).
        instance_kind: ``cpu`` or ``gpu`` for an ``instance_group`` (default: Triton's choice; engines: gpu,
            OpenVINO IRs: cpu).
        instances: instances per group.
    """

    max_batch: int | None = None
    version: int = 1
    preferred_batch: list[int] | None = None
    max_queue_delay_us: int | None = None
    instance_kind: str | None = None
    instances: int = 1

    def __post_init__(self):
        if self.max_batch is not None and int(self.max_batch) < 1:
            raise BadInputError(f"--max-batch {self.max_batch}: must be at least 1.")
        if int(self.version) < 1:
            raise BadInputError(f"--version {self.version}: must be a positive integer.")
        if self.instance_kind not in (None, "cpu", "gpu"):
            raise BadInputError(f"--instance-kind {self.instance_kind}: expected cpu or gpu.")
        if int(self.instances) < 1:
            raise BadInputError(f"--instances {self.instances}: must be at least 1.")
        if self.max_queue_delay_us is not None and int(self.max_queue_delay_us) < 0:
            raise BadInputError(f"--max-queue-delay-us {self.max_queue_delay_us}: must be 0 or more.")
        if self.preferred_batch is not None and any(int(b) < 1 for b in self.preferred_batch):
            sizes = ",".join(map(str, self.preferred_batch))
            raise BadInputError(f"--preferred-batch {sizes}: sizes must be at least 1.")


def _sanitize(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")
    return s or "model"


def model_files() -> dict[str, str]:
    """``{Triton platform or backend: the model file it loads}`` of every backend Triton serves."""
    return {b.triton.platform: b.triton.model_file for b in triton_backends()}


def _serving_backend(src: Path, backend: str | None, opts: TritonOptions) -> Backend:
    """The backend row that serves ``src`` (the default for its suffix); refuse another one asked for, a missing
    weights file, or an instance kind it cannot run on."""
    if not src.is_file():
        raise BadInputError(f"--model {src}: no such file.")
    rows = triton_backends()
    row = backend_for(src, [b.name for b in rows])
    if row is None:
        raise BadInputError(f"--model {src}: give {labels(rows)}.")
    if backend not in (None, *[b.name for b in rows]):
        raise BadInputError(f"--backend {backend}: expected {_names(rows)}.")
    if backend is not None and backend != row.name:
        is_onnx = src.suffix.lower() == ".onnx"
        onnx = str(src) if is_onnx else "MODEL.onnx"  # an engine or IR: the .onnx it was made from
        how = next(b.triton.make for b in rows if b.name == backend).format(onnx=onnx)
        if not is_onnx:
            how += f" (MODEL.onnx: the ONNX model {src.name} was made from)"
        raise BadInputError(f"--backend {backend}: {src} runs in {row.name}; to serve it with {backend}, {how}.")
    t = row.triton
    if t.weights and not src.with_suffix(t.weights).is_file():
        raise BadInputError(f"--model {src}: its weights {src.with_suffix(t.weights).name} are missing beside it.")
    if t.instance_kind and opts.instance_kind not in (None, t.instance_kind):
        raise BadInputError(f"--instance-kind {opts.instance_kind}: {t.instance_note}")
    return row


def _names(rows) -> str:
    names = [b.name for b in rows]
    return ", ".join(names[:-1]) + " or " + names[-1]


def _max_batch_size(src: Path, row: Backend, image: dict, profile, opts: TritonOptions) -> int:
    """``max_batch_size``: 0 for a fixed-batch model, else ``--max-batch`` or the default (8, or the engine
    profile's largest); refuse what Triton or the engine's profile cannot take."""
    max_batch, preferred = opts.max_batch, opts.preferred_batch
    if row.triton.profiled:
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
        given = [f for f, v in (("--max-batch", max_batch), ("--preferred-batch", preferred),
                                ("--max-queue-delay-us", opts.max_queue_delay_us)) if v is not None]
        if given:
            raise BadInputError(
                f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to dynamic-batch models; {src} has a "
                f"fixed batch of {image['shape'][0]}, so Triton gets max_batch_size 0 (no batching by Triton)."
            )
    too_big = [int(b) for b in preferred or [] if int(b) > mbs]
    if too_big:
        raise BadInputError(
            f"--preferred-batch {','.join(map(str, preferred))}: {too_big} exceed max_batch_size {mbs}, which "
            "Triton refuses; give sizes up to --max-batch."
        )
    return mbs


def _tensor_entry(src: Path, t: dict, mbs: int, label: str | None = None) -> dict:
    """One ``input`` / ``output`` entry: Triton's type, dims without the batch axis when Triton batches."""
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


def _config(src: Path, row: Backend, name: str, io: tuple, mbs: int,
            opts: TritonOptions) -> tuple[dict, str | None, list]:
    """``(config dict, labels file name or None, notes)`` of the entry."""
    meta, inputs, outputs = io
    t = row.triton
    labels_file = "labels.txt" if meta.class_names and not meta.tasks else None  # several tasks: in atexport.json
    logits = next((o for o in outputs if o["name"] == (meta.output or {}).get("name")), outputs[0])
    config = {"name": name}
    if t.key == "platform":
        config["platform"] = t.platform
    config.update({
        "max_batch_size": mbs,
        "input": [_tensor_entry(src, i, mbs) for i in inputs],
        "output": [_tensor_entry(src, o, mbs, labels_file if o is logits else None) for o in outputs],
        "parameters": {"atexport.preprocess": json.dumps(meta.preprocess)},
    })
    if mbs:
        config["dynamic_batching"] = {"preferred_batch_size": [int(b) for b in opts.preferred_batch or []],
                                      "max_queue_delay_microseconds": int(100 if opts.max_queue_delay_us is None
                                                                          else opts.max_queue_delay_us)}
    if t.key == "backend":
        config["backend"], config["default_model_filename"] = t.platform, t.model_file
    notes: list = []
    if t.parameters:
        params, notes = resolve(t.parameters)(meta)
        config["parameters"].update(params)
    kind = opts.instance_kind or t.instance_kind
    if kind:
        config["instance_group"] = [{"count": int(opts.instances), "kind": f"KIND_{kind.upper()}"}]
    return config, labels_file, notes


def _write_entry(src: Path, row: Backend, root: Path, config: dict, meta, labels_file, opts: TritonOptions) -> dict:
    """Write the entry into a temporary folder beside it, read it back and check it, then rename it into place
    (an entry of that name already there leaves only once the new one is complete). Returns the checked config."""
    import tempfile

    from atexport.utils.io import atomic_write_json, atomic_write_text, check_writable

    name = config["name"]
    model_dir = root / name
    check_writable(root / f".{name}.tmp", "-o")  # creates the repository root; says so if it cannot
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
    try:
        target = tmp / str(int(opts.version)) / row.triton.model_file
        target.parent.mkdir(parents=True)
        shutil.copyfile(src, target)
        if row.triton.weights:
            shutil.copyfile(src.with_suffix(row.triton.weights), target.with_suffix(row.triton.weights))
        if labels_file:
            atomic_write_text(tmp / labels_file, "\n".join(meta.class_names) + "\n")
        atomic_write_json(tmp / "atexport.json", asdict(meta))
        atomic_write_text(tmp / "config.pbtxt", render_config(config))
        checked = validate_triton_repo(tmp, meta=meta, name=name)
        old = None
        if model_dir.exists():
            old = root / f".{name}.old-{os.getpid()}"
            os.replace(model_dir, old)
        os.replace(tmp, model_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return checked


def write_triton_repo(model: str | os.PathLike, output: str | os.PathLike, options: TritonOptions | None = None, *,
                      name: str | None = None, force: bool = False, backend: str | None = None) -> TritonRepo:
    """Write a Triton model repository entry for an atexport model and validate it by reading it back.

    Every option is checked first; the entry is written into a temporary folder beside it, read back and
    checked, then renamed into place, so a failed run leaves nothing that looks like a model::

        write_triton_repo("model.onnx", "triton_repo", TritonOptions(max_batch=16), name="digits")

    Args:
        model: an ``.onnx`` model, an OpenVINO ``.xml`` IR (its ``.bin`` beside it) or an ``.engine`` (with its
            sidecar).
        output: the repository root (created if needed); the model goes to ``<output>/<name>``.
        options: batching, version and instances (:class:`TritonOptions`; default: its defaults).
        name: model name (default: the file's stem, made Triton-safe).
        force: replace an existing entry of that name.
        backend: ``onnxruntime``, ``tensorrt`` or ``openvino`` (default: from the suffix: ``.onnx``, ``.engine``
            / ``.plan``, ``.xml``); ``openvino`` takes the IR ``atexport openvino`` writes (its ``.bin`` beside it).
    """
    from atexport.artifact.graph import check_graph_fits_metadata

    opts = options or TritonOptions()
    src = Path(model)
    row = _serving_backend(src, backend, opts)
    meta, inputs, outputs, profile = resolve(row.triton.io)(src)
    check_graph_fits_metadata(meta, {t["name"]: t["shape"] for t in inputs}, {t["name"]: t["shape"] for t in outputs},
                              f"--model {src}")
    name = _sanitize(name) if name else _sanitize(src.stem)
    model_dir = Path(output) / name
    if model_dir.exists() and not force:
        raise BadInputError(f"-o {output}: {model_dir} already exists; pass --force to replace it, or --name another.")
    image = next((t for t in inputs if t["name"] == meta.input.get("name")), inputs[0] if inputs else None)
    if image is None:
        raise BadInputError(f"--model {src}: no image input found.")
    mbs = _max_batch_size(src, row, image, profile, opts)
    config, labels_file, notes = _config(src, row, name, (meta, inputs, outputs), mbs, opts)
    checked = _write_entry(src, row, Path(output), config, meta, labels_file, opts)
    repo = TritonRepo(model_dir, model_dir / "config.pbtxt", model_dir / str(int(opts.version)) / row.triton.model_file,
                      model_dir / labels_file if labels_file else None)
    repo.config, repo.notes = checked, notes
    return repo


# --------------------------------------------------------------------------------------------------
# Reading a repository back


def _check_files(model_dir: Path, cfg: dict, problems: list) -> None:
    """The platform is one Triton serves, its model file (and weights) in a numeric version folder, and the
    instance kind the one it runs on."""
    platform = cfg.get("platform") or cfg.get("backend")
    rows = {b.triton.platform: b for b in triton_backends()}
    if platform not in rows:
        problems.append(f"platform {platform!r} is not one of {sorted(rows)}")
        return
    t = rows[platform].triton
    versions = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    wanted = cfg.get("default_model_filename") or t.model_file
    if not any((v / wanted).is_file() for v in versions):
        problems.append(f"no numeric version folder holds {wanted}")
    if t.weights and not any((v / Path(wanted).with_suffix(t.weights)).is_file() for v in versions):
        problems.append(f"no numeric version folder holds the IR's weights {Path(wanted).with_suffix(t.weights)}")
    other = {"cpu": "gpu", "gpu": "cpu"}.get(t.instance_kind or "")
    if other and any(g.get("kind") == f"KIND_{other.upper()}" for g in cfg.get("instance_group") or []):
        problems.append(f"the {rows[platform].title} backend runs on KIND_{t.instance_kind.upper()} instances, "
                        f"not KIND_{other.upper()}")


def _check_batching(cfg: dict, problems: list) -> None:
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


def _check_inputs(cfg: dict, meta, problems: list) -> None:
    mbs = cfg.get("max_batch_size")
    ins = {t.get("name"): t for t in cfg.get("input", [])}
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


def _check_output(model_dir: Path, cfg: dict, meta, problems: list) -> None:
    o = {t.get("name"): t for t in cfg.get("output", [])}.get((meta.output or {}).get("name"))
    if o is None:
        problems.append(f"the logits output {(meta.output or {}).get('name')!r} is not declared")
        return
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
    problems: list[str] = []
    want_name = name or model_dir.name
    if cfg.get("name") != want_name:
        problems.append(f"name {cfg.get('name')!r} is not the folder's {want_name!r}")
    _check_files(model_dir, cfg, problems)
    _check_batching(cfg, problems)
    if meta is None and (model_dir / "atexport.json").is_file():
        from atexport.artifact.metadata import ModelMetadata

        meta = ModelMetadata.from_json((model_dir / "atexport.json").read_text(), str(model_dir / "atexport.json"))
    if meta is not None:
        _check_inputs(cfg, meta, problems)
        _check_output(model_dir, cfg, meta, problems)
    if problems:
        raise BadInputError(f"{model_dir / 'config.pbtxt'} is not a valid Triton config: " + "; ".join(problems) + ".")
    return cfg


def __getattr__(name: str):
    """``PLATFORMS`` / ``MODEL_FILES`` of earlier releases, now read from the backend table."""
    if name == "MODEL_FILES":
        return model_files()
    if name == "PLATFORMS":
        return {{"onnxruntime": "onnx", "tensorrt": "engine"}.get(b.name, b.name): b.triton.platform
                for b in triton_backends()}
    raise AttributeError(name)


__all__ = ["BF16_NOTE", "TritonOptions", "TritonRepo", "engine_io", "ir_precision", "model_files", "openvino_io",
           "parse_pbtxt", "read_triton_config", "render_config", "validate_triton_repo", "write_triton_repo"]
