"""Exported artifacts named on a command line, read into runners: what verify, bench and triton take.

An :class:`Artifact` is a path plus the flag it came from (``--onnx``, ``--onnx-fp16``, ``--onnx-int8``,
``--engine``, ``--openvino``, ``--litert``, ``--executorch``), so every message names the flag, and the
backend that runs it (a name of :data:`~atexport.runtime.backends.BACKENDS`); :func:`read_artifact` opens it
with that backend's loader, the same one :func:`atexport.runtime.load_model` uses. A backend that runs a
file at a precision it is asked for (OpenVINO) runs it at the file's precision or the one asked for, and
is labelled with what the runner compiled; for the others, the flag's precision is a promise checked
against the metadata.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atexport.errors import BadInputError
from atexport.runtime.backends import BACKENDS, LoadOptions, backend_for, get_backend

PRECISION_FLAGS = {"fp32": "--onnx", "fp16": "--onnx-fp16", "int8": "--onnx-int8"}
# the flags of files that run in ONNX Runtime, or in OpenVINO when they are an OpenVINO IR
_ONNX_FLAG_BACKENDS = ("onnxruntime", "openvino")


@dataclass
class Artifact:
    """An exported model to verify or time.

    Attributes:
        path: the model file.
        flag: the CLI flag it came from (for messages).
        precision: backends that run a file at its own precision: the precision the flag promises (checked
            against the metadata); OpenVINO: the precision to run (``fp32``, ``bf16``, ``fp16``, ``int8``,
            ``int8+bf16``). ``None``: the file's own.
        backend: the backend that runs it (``None``: the default for its suffix, ONNX Runtime for any other).
    """

    path: Path
    flag: str = "--onnx"
    precision: str | None = None
    backend: str | None = None

    @property
    def runs_in(self) -> str:
        """The backend that runs it."""
        if self.backend:
            return self.backend
        row = backend_for(self.path, _ONNX_FLAG_BACKENDS)
        return row.name if row is not None else "onnxruntime"


def artifacts(onnx=(), onnx_fp16=(), onnx_int8=(), engines=(), openvino=(), openvino_precision=None, litert=(),
              executorch=()) -> list[Artifact]:
    """The artifacts of the CLI's flags (each may be a path or a list of paths).

    ``onnx``: ONNX models, or OpenVINO ``.xml`` IRs (run in OpenVINO at their own precision).
    ``openvino``: IRs or ONNX files to run in OpenVINO, each at ``openvino_precision`` (default: its own).
    ``litert`` / ``executorch``: ``.tflite`` / ``.pte`` files (their ``.json`` sidecars beside them).
    """

    def many(v):
        return [] if v is None else [v] if isinstance(v, (str, os.PathLike)) else list(v)

    onnx_flags = (("--onnx", None, onnx), ("--onnx-fp16", "fp16", onnx_fp16), ("--onnx-int8", "int8", onnx_int8))
    out = [Artifact(Path(p), flag, precision) for flag, precision, paths in onnx_flags for p in many(paths)]
    out += [Artifact(Path(p), "--engine", None, "tensorrt") for p in many(engines)]
    out += [Artifact(Path(p), "--openvino", openvino_precision, "openvino") for p in many(openvino)]
    out += [Artifact(Path(p), "--litert", None, "litert") for p in many(litert)]
    out += [Artifact(Path(p), "--executorch", None, "executorch") for p in many(executorch)]
    return out


@dataclass
class LoadedArtifact:
    """An artifact with its runner (active, except a TensorRT engine's), metadata and batch constraint."""

    artifact: Artifact
    runner: Any
    meta: Any
    precision: str
    backend: str
    batch: int | None  # fixed batch, or the engine's largest
    name: str = ""

    @property
    def tolerance(self) -> str:
        """The tolerance row of what runs: ``int8+bf16`` (OpenVINO: INT8 layers, float ops in BF16) is held to
        ``int8``'s; every other precision to its own row."""
        return "int8" if self.precision == "int8+bf16" else self.precision

    @property
    def pads(self) -> bool:
        """Whether a fixed-batch model takes exactly its batch (the last chunk padded): ONNX Runtime and
        OpenVINO (``Backend.pads``); an engine takes any batch up to its profile's largest."""
        return bool(self.batch) and BACKENDS[self.backend].pads


def read_artifact(a: Artifact, threads=None, providers=None) -> LoadedArtifact:
    """Read an artifact's metadata and make its runner with its backend's loader, without a checkpoint to
    check it against (a TensorRT engine is loaded when its runner is activated).

    Raises:
        BadInputError: missing file, damaged metadata, wrong flag for its precision.
    """
    from atexport.utils.io import require_file

    require_file(a.path, a.flag, "file")
    row = get_backend(a.runs_in)
    asked = a.precision if row.precisions else None
    options = LoadOptions(providers=providers, threads=threads, precision=asked, flag=a.flag, app=False)
    opened = row.load(a.path, options)
    meta = opened.meta
    if a.precision and not row.precisions and meta.precision != a.precision:
        right = PRECISION_FLAGS.get(meta.precision, "--onnx")
        raise BadInputError(f"{a.flag} {a.path}: its metadata says precision {meta.precision}, not {a.precision}; "
                            f"pass it with {right}.")
    return LoadedArtifact(a, opened.runner, meta, opened.precision, row.name, opened.batch)
