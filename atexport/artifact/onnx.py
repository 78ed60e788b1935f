"""Reading an exported ONNX model: the file itself, its atexport metadata and its swappable-tensor manifest.

Needs the ``onnx`` package (imported lazily); the runtime reads the metadata through ONNX Runtime
instead (:func:`atexport.artifact.metadata.metadata_from_props`) and never needs it.
"""

from __future__ import annotations

import os
from typing import Mapping

from atexport.artifact.metadata import ModelMetadata, read_onnx_metadata
from atexport.errors import BadInputError, require
from atexport.utils.io import require_file


def read_onnx(path: str | os.PathLike, flag: str = "--onnx"):
    """Load an ONNX file with a clear error when it is missing or not a readable ONNX model."""
    onnx = require("onnx", "reading ONNX models", "onnx")
    path = require_file(path, flag, "ONNX file")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # DecodeError, google.protobuf errors, OSError: the file is not an ONNX model
        msg = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:200]
        raise BadInputError(f"{flag} {path}: not a readable ONNX model ({msg}).") from None
    if not model.graph.node and not model.graph.input:
        raise BadInputError(f"{flag} {path}: not a readable ONNX model (empty or corrupted graph).")
    return model


def read_onnx_model(path: str | os.PathLike, flag: str = "--onnx") -> tuple[object, ModelMetadata]:
    """``(onnx.ModelProto, metadata)`` of an atexport ONNX file; its manifest is checked against the graph."""
    proto = read_onnx(path, flag)
    meta = read_onnx_metadata(proto, f"{flag} {path}")
    check_manifest(proto, meta.manifest, f"{flag} {path}")
    return proto, meta


def shape_of(value_info) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value_info.type.tensor_type.shape.dim]


def check_manifest(model, manifest: Mapping[str, dict], what: str = "model") -> None:
    """Every manifest entry must be a graph input *and* an initializer of the same name and shape."""
    inputs = {i.name: shape_of(i) for i in model.graph.input}
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    problems = []
    for name, entry in manifest.items():
        init = entry.get("initializer", name)
        if init not in inputs:
            problems.append(f"{init} is not a graph input")
        elif init not in inits:
            problems.append(f"{init} has no initializer")
        elif inits[init] != list(entry["shape"]):
            problems.append(f"{init} has shape {inits[init]}, manifest says {entry['shape']}")
    if problems:
        raise BadInputError(f"{what}: its swappable-tensor manifest does not match the graph: {'; '.join(problems[:5])}.")


def failed_path_for(output: str | os.PathLike) -> "os.PathLike":
    """Where an artifact that failed its check is kept: ``<stem>.failed<suffix>`` beside ``output``."""
    from pathlib import Path

    p = Path(output)
    return p.with_name(f"{p.stem}.failed{p.suffix or '.onnx'}")


def with_outputs(proto, tensors):
    """A copy of ``proto`` whose graph also outputs ``tensors`` (their types from shape inference): Polygraphy's
    "mark outputs", for comparing two graphs tensor by tensor."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is best effort; unknown types default to float
        inferred = model
    types = {}
    for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        types[vi.name] = vi.type.tensor_type.elem_type
    for init in inferred.graph.initializer:
        types.setdefault(init.name, init.data_type)
    have = {o.name for o in model.graph.output}
    for t in tensors:
        if t not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(t, types.get(t) or onnx.TensorProto.FLOAT, None))
            have.add(t)
    return model
