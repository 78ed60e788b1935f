"""Exported artifacts named on a command line, read into runners: what verify, bench and triton take.

An :class:`Artifact` is a path plus the flag it came from (``--onnx``, ``--onnx-fp16``, ``--onnx-int8``,
``--engine``, ``--openvino``), so every message names the flag, and the backend that runs it;
:func:`read_artifact` reads its metadata through the same readers as :func:`atexport.runtime.load_model`
and makes its runner. An OpenVINO artifact (an ``.xml`` IR, or an ONNX file given with ``--openvino``)
runs at its file's precision or the one asked for, and is labelled with what the runner compiled.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atexport.errors import BadInputError

PRECISION_FLAGS = {"fp32": "--onnx", "fp16": "--onnx-fp16", "int8": "--onnx-int8"}


@dataclass
class Artifact:
    """An exported model to verify.

    Attributes:
        path: the ``.onnx``, ``.xml`` (OpenVINO IR) or ``.engine`` file.
        kind: ``onnx``, ``ir`` or ``engine``.
        flag: the CLI flag it came from (for messages).
        precision: ONNX Runtime: the precision the flag promises (checked against the metadata); OpenVINO:
            the precision to run (``fp32``, ``bf16``, ``fp16``, ``int8``, ``int8+bf16``). ``None``: the file's own.
        backend: ``onnxruntime``, ``openvino`` or ``tensorrt`` (``None``: ``openvino`` for an ``.xml`` IR,
            ``tensorrt`` for an engine, else ``onnxruntime``).
    """

    path: Path
    kind: str = "onnx"
    flag: str = "--onnx"
    precision: str | None = None
    backend: str | None = None

    @property
    def runs_in(self) -> str:
        """The backend that runs it."""
        if self.backend:
            return self.backend
        if self.kind == "engine":
            return "tensorrt"
        return "openvino" if self.kind == "ir" or Path(self.path).suffix.lower() == ".xml" else "onnxruntime"


def artifacts(onnx=(), onnx_fp16=(), onnx_int8=(), engines=(), openvino=(), openvino_precision=None, litert=(),
              executorch=()) -> list[Artifact]:
    """The artifacts of the CLI's flags (each may be a path or a list of paths).

    ``openvino``: IRs or ONNX files to run in OpenVINO, each at ``openvino_precision`` (default: its own).
    ``litert`` / ``executorch``: ``.tflite`` / ``.pte`` files (their ``.json`` sidecars beside them).
    """

    def many(v):
        return [] if v is None else [v] if isinstance(v, (str, os.PathLike)) else list(v)

    out = [Artifact(Path(p), "onnx", "--onnx") for p in many(onnx)]
    out += [Artifact(Path(p), "onnx", "--onnx-fp16", "fp16") for p in many(onnx_fp16)]
    out += [Artifact(Path(p), "onnx", "--onnx-int8", "int8") for p in many(onnx_int8)]
    out += [Artifact(Path(p), "engine", "--engine") for p in many(engines)]
    out += [Artifact(Path(p), "ir" if Path(p).suffix.lower() == ".xml" else "onnx", "--openvino", openvino_precision,
                     "openvino") for p in many(openvino)]
    out += [Artifact(Path(p), "edge", "--litert", None, "litert") for p in many(litert)]
    out += [Artifact(Path(p), "edge", "--executorch", None, "executorch") for p in many(executorch)]
    return out


@dataclass
class LoadedArtifact:
    """An artifact with its (not yet active) runner, metadata and batch constraint."""

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
        OpenVINO; an engine takes any batch up to its profile's largest."""
        return bool(self.batch) and self.backend in ("onnxruntime", "openvino")


def read_artifact(a: Artifact, threads=None, providers=None) -> LoadedArtifact:
    """Read an artifact's metadata and make its runner, without a checkpoint to check it against (an ONNX
    Runtime session is opened here, to read the metadata; a TensorRT engine is loaded when its runner is
    activated).

    Raises:
        BadInputError: missing file, damaged metadata, wrong flag for its precision.
    """
    from atexport.utils.io import require_file

    require_file(a.path, a.flag, "file")
    if a.kind == "edge":  # LiteRT / ExecuTorch: metadata from the sidecar; the runner takes any batch
        want = {"litert": ".tflite", "executorch": ".pte"}[a.runs_in]
        if a.path.suffix.lower() != want:
            raise BadInputError(f"{a.flag} {a.path}: expected a {want} file written by 'atexport {a.runs_in}'.")
        if a.runs_in == "litert":
            from atexport.runtime.litert import open_litert

            meta, runner, _ = open_litert(a.path, threads=threads, flag=a.flag)
        else:
            from atexport.runtime.executorch import open_executorch

            meta, runner, _ = open_executorch(a.path, flag=a.flag)
        return LoadedArtifact(a, runner, meta, meta.precision, a.runs_in, None)
    if a.runs_in == "openvino":
        from atexport.runtime.openvino import open_openvino

        if a.kind == "engine":
            raise BadInputError(f"{a.flag} {a.path}: a TensorRT engine runs in TensorRT only; give the .onnx model "
                                "it was built from, or its OpenVINO .xml IR.")
        meta, runner, _ = open_openvino(a.path, precision=a.precision, threads=threads, flag=a.flag)
        b = meta.input.get("shape", [None])[0]
        return LoadedArtifact(a, runner, meta, runner.precision, "openvino", b if isinstance(b, int) else None)
    if a.kind == "engine":
        from atexport.artifact.sidecar import profile_max_batch, read_sidecar, sidecar_metadata
        from atexport.runtime.tensorrt import TensorRTRunner

        side = read_sidecar(a.path, a.flag)
        meta = sidecar_metadata(side, f"{a.flag} {a.path}")
        batch = profile_max_batch(side)
        runner = TensorRTRunner(str(a.path), name="tensorrt")
        backend = "tensorrt"
    else:
        from atexport.runtime.model import open_onnx

        meta, runner, _ = open_onnx(a.path, providers, threads, flag=a.flag, sessions=False)
        b = meta.input.get("shape", [None])[0]
        batch = b if isinstance(b, int) else None
        backend = "onnxruntime"
    if a.precision and meta.precision != a.precision:
        right = PRECISION_FLAGS.get(meta.precision, "--onnx")
        raise BadInputError(f"{a.flag} {a.path}: its metadata says precision {meta.precision}, not {a.precision}; "
                            f"pass it with {right}.")
    return LoadedArtifact(a, runner, meta, meta.precision, backend, batch)
