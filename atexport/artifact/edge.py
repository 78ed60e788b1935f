"""The JSON sidecar of an on-device artifact (LiteRT ``.tflite``, ExecuTorch ``.pte``): its atexport metadata.

Neither format has a place an app can read atexport's metadata from without the converter's tooling, so
``atexport litert`` and ``atexport executorch`` write ``model.tflite.json`` / ``model.pte.json`` beside the
artifact (the same convention as a TensorRT engine's ``model.engine.json``). It holds the metadata document
(preprocessing, classes, the swappable-tensor manifest of a separable model, the parity rows in
``extra``), which format and file it describes, and that file's sha256, so a sidecar left beside a
re-exported artifact is refused instead of silently describing another model. Torch-free: an app reads
it with the standard library.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from atexport.artifact.metadata import ModelMetadata
from atexport.errors import BadInputError

EDGE_FORMAT = "atexport.edge"
EDGE_VERSION = 1
# artifact suffix -> format name
EDGE_SUFFIXES = {".tflite": "litert", ".pte": "executorch"}


def edge_sidecar_path(artifact: str | os.PathLike) -> Path:
    """``model.tflite`` -> ``model.tflite.json``."""
    p = Path(artifact)
    return p.with_name(p.name + ".json")


def edge_sidecar(meta: ModelMetadata, artifact_name: str, fmt: str, sha256: str, **extra) -> dict:
    """The sidecar document for an artifact named ``artifact_name`` with content hash ``sha256``."""
    return {"format": EDGE_FORMAT, "format_version": EDGE_VERSION, "artifact": {"file": artifact_name, "format": fmt,
            "sha256": sha256, **extra}, "metadata": meta.to_dict()}


def read_edge_sidecar(artifact: str | os.PathLike, flag: str = "--model", *, check_hash: bool = True
                      ) -> tuple[ModelMetadata, dict]:
    """Read and check the sidecar of ``artifact``: ``(metadata, artifact record)``.

    Raises:
        BadInputError: no sidecar, not valid JSON, another format, a newer version, or a sha256 that does
            not match the artifact (the sidecar belongs to another export).
    """
    from atexport.utils.io import sha256_file

    path = Path(artifact)
    side = edge_sidecar_path(path)
    where = f"{flag} {path}"
    if not side.is_file():
        raise BadInputError(f"{where}: its metadata {side.name} is missing beside it (atexport litert/executorch "
                            "write it with the model; copy both).")
    try:
        doc = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInputError(f"{where}: {side.name} is not valid JSON ({e}).") from None
    if not isinstance(doc, dict) or doc.get("format") != EDGE_FORMAT:
        raise BadInputError(f"{where}: {side.name} is not an atexport sidecar (format {EDGE_FORMAT!r}).")
    version = doc.get("format_version")
    if not isinstance(version, int) or version > EDGE_VERSION:
        raise BadInputError(f"{where}: {side.name} is format v{version}, newer than this atexport reads "
                            f"(v{EDGE_VERSION}); upgrade atexport with: pip install -U atexport")
    record = doc.get("artifact")
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        raise BadInputError(f"{where}: {side.name} has no 'artifact' record with the model's sha256.")
    want = EDGE_SUFFIXES.get(path.suffix.lower())
    if record.get("format") != want:
        raise BadInputError(f"{where}: {side.name} describes a {record.get('format')!r} artifact, not {want!r}.")
    if check_hash and sha256_file(path) != record["sha256"]:
        raise BadInputError(f"{where}: {side.name} was written for another file (sha256 differs); re-export the "
                            "model, or put its own sidecar beside it.")
    return ModelMetadata.from_dict(doc.get("metadata"), f"{where} ({side.name})"), record


__all__ = ["EDGE_FORMAT", "EDGE_SUFFIXES", "EDGE_VERSION", "edge_sidecar", "edge_sidecar_path", "read_edge_sidecar"]
