"""The JSON sidecar of a TensorRT engine: what an app needs to run it, and what it was built for.

An engine is an opaque binary tied to one TensorRT version and GPU architecture, so atexport writes
``model.engine.json`` beside it (written by the ``atexport trt`` stage, read here): the model's
metadata document, the build (TensorRT version, device, profiles, flags), the ONNX model it was built
from and its sha256, and, after a refit, what the engine holds now. :func:`read_sidecar` is the one
reader (format and version check, schema check, engine sha256); :func:`check_engine_compatible` refuses
an engine built for another GPU or TensorRT version with the command that rebuilds it here.
Torch-free and TensorRT-free: a CPU machine can read, check and describe any engine's sidecar.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

from atexport.artifact.metadata import ModelMetadata
from atexport.errors import BadInputError, IncompatibleCheckpointError

SIDECAR_FORMAT = "atexport.engine"


SIDECAR_VERSION = 1


def parse_version(version: str) -> tuple[int, int, int]:
    """``"10.13.2.6"`` -> ``(10, 13, 2)``."""
    parts = []
    for p in str(version).split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)  # type: ignore[return-value]


BANK_SUFFIX = ".bank.npz"


def bank_path(engine_path: str | os.PathLike) -> Path:
    """``tasks.engine`` -> ``tasks.engine.bank.npz``: the bank tensors a multi-task refit left in the engine."""
    p = Path(engine_path)
    return p.with_name(p.name + BANK_SUFFIX)


def bank_source(sidecar: dict, engine_path: str | os.PathLike) -> Path:
    """Where a multi-task engine's current bank tensors can be read (a refit rewrites each bank tensor whole).

    TensorRT's refitter hands back only weights set through it, not an engine's current values, so: the
    bank file that the refit which made this engine wrote beside it (``sidecar["bank"]``), else the ONNX model the engine was built from
    (``sidecar["onnx"]``); each must still match the sha256 the sidecar recorded.

    Raises:
        BadInputError: the file is missing or changed (says which, and what to do).
    """
    from atexport.utils.io import sha256_file

    where = f"engine {engine_path}"
    rec = sidecar.get("bank")
    if rec:
        p = Path(engine_path).with_name(str(rec.get("path")))
        if not p.is_file():
            raise BadInputError(
                f"{where}: its bank file {p.name} (the task weights the refit that made this engine put in) is "
                "missing; copy it beside the engine, or rebuild the engine with 'atexport trt'."
            )
        if rec.get("sha256") and sha256_file(p) != rec["sha256"]:
            raise BadInputError(f"{where}: its bank file {p.name} changed since the refit wrote it (sha256 differs).")
        return p
    onnx = sidecar.get("onnx") or {}
    if not onnx.get("path") or not Path(onnx["path"]).is_file():
        raise BadInputError(
            f"{where}: replacing one task needs every other task's weights, read from the ONNX model the engine was "
            f"built from ({onnx.get('path')}), which is not there; put it back at that path, or rebuild the engine "
            "with 'atexport trt'."
        )
    p = Path(onnx["path"])
    if onnx.get("sha256") and sha256_file(p) != onnx["sha256"]:
        raise BadInputError(
            f"{where}: the ONNX model it was built from ({p}) changed since (sha256 differs, e.g. 'atexport tasks' "
            f"edited it), so its bank is not the engine's; rebuild the engine from it: {rebuild_command(sidecar)}"
        )
    return p


def rebuild_command(sidecar: dict) -> str:
    """The ``atexport trt`` command that rebuilds the engine described by ``sidecar`` on this device."""
    build = sidecar.get("build", {})
    onnx_path = sidecar.get("onnx", {}).get("path") or "MODEL.onnx"
    parts = ["atexport", "trt", "--onnx", str(onnx_path), "--precision", str(sidecar.get("precision", "fp32"))]
    prof = (sidecar.get("profiles") or [{}])[0]  # the validated copy of the build's profiles
    if prof and isinstance(sidecar.get("metadata", {}).get("input", {}).get("shape", [None])[0], str):
        try:
            parts += ["--batch", ",".join(str(int(prof[k][0])) for k in ("min", "opt", "max"))]
        except (KeyError, IndexError, TypeError, ValueError):
            pass  # a damaged profile: the command without --batch still rebuilds (with the default)
    if build.get("refittable_weights"):
        parts.append("--refit")
    if "VERSION_COMPATIBLE" in (build.get("builder_flags") or []):
        parts.append("--version-compatible")
    if build.get("hardware_compatibility"):
        parts += ["--hardware-compatible"]
    if build.get("workspace_bytes"):
        parts += ["--workspace", f"{build['workspace_bytes'] / (1 << 30):g}"]
    parts += ["-o", str(sidecar.get("engine", {}).get("path") or "model.engine")]
    return " ".join(shlex.quote(p) for p in parts)


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def check_engine_compatible(sidecar: dict, trt_version: str, device: dict, where: str = "engine") -> list[str]:
    """Refuse an engine built for another GPU or TensorRT version; return warnings that do not refuse.

    Raises:
        IncompatibleCheckpointError: one sentence saying what the engine was built for, what this
            machine has, and the command that rebuilds it here.
    """
    if sidecar.get("format") != SIDECAR_FORMAT:
        raise BadInputError(f"{where}: its sidecar is not an atexport engine description.")
    built_trt = str(sidecar.get("tensorrt", {}).get("version", "?"))
    built_dev = sidecar.get("device", {})
    built_cc = tuple(built_dev.get("compute_capability") or ())
    here_cc = tuple(device.get("compute_capability") or ())
    build = sidecar.get("build", {})
    vc = "VERSION_COMPATIBLE" in (build.get("builder_flags") or [])
    hw = build.get("hardware_compatibility")
    problems = []
    bt, ht = parse_version(built_trt), parse_version(trt_version)
    if vc:
        # Version-compatible engines run on the same or later TensorRT (10.x engines on 11.x too).
        if ht < bt:
            problems.append(f"TensorRT {built_trt} or newer (this machine has {trt_version})")
    elif bt != ht:
        problems.append(f"TensorRT {built_trt} (this machine has {trt_version})")
    if built_cc and here_cc:
        if hw == "AMPERE_PLUS":
            if here_cc < (8, 0):
                problems.append(f"an Ampere-or-newer GPU (this {device.get('name')} is compute capability "
                                f"{here_cc[0]}.{here_cc[1]})")
        elif built_cc != here_cc:
            problems.append(f"a compute capability {built_cc[0]}.{built_cc[1]} GPU ({built_dev.get('name')}; this "
                            f"{device.get('name')} is {here_cc[0]}.{here_cc[1]})")
    if problems:
        raise IncompatibleCheckpointError(
            f"{where} was built for {' and '.join(problems)}; TensorRT engines are not portable, so rebuild it "
            f"on this device from its ONNX model: {rebuild_command(sidecar)}"
        )
    warnings = []
    if built_dev.get("name") and device.get("name") and built_dev.get("name") != device.get("name") and not hw:
        warnings.append(
            f"{where} was built on a {built_dev.get('name')} and runs on a {device.get('name')} (same compute "
            "capability): it works, but TensorRT's kernel choices were timed on the other GPU; rebuild for best speed."
        )
    return warnings



def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _bad(where: str, what: str) -> BadInputError:
    return BadInputError(f"{where}: damaged engine sidecar: {what}; rebuild the engine with 'atexport trt'.")


def validate_sidecar(doc, where: str) -> dict:
    """Check the sidecar's format, version and the fields readers rely on; return it."""
    if not isinstance(doc, dict):
        raise _bad(where, f"expected a JSON object, got {type(doc).__name__}")
    if doc.get("format") != SIDECAR_FORMAT:
        raise _bad(where, f"format {doc.get('format')!r} is not {SIDECAR_FORMAT!r}")
    version = doc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise _bad(where, "format_version must be an integer")
    if version > SIDECAR_VERSION:
        raise BadInputError(
            f"{where}: sidecar format v{version} is newer than this atexport (reads v{SIDECAR_VERSION}); "
            "upgrade atexport with: pip install -U atexport"
        )
    if not isinstance(doc.get("metadata"), dict):
        raise _bad(where, "'metadata' must be an object")
    for key in ("tensorrt", "device", "build", "engine", "onnx", "bank"):
        if doc.get(key) is not None and not isinstance(doc[key], dict):
            raise _bad(where, f"{key!r} must be an object")
    for key in ("tensorrt", "device", "build", "engine", "onnx"):  # readers may rely on these objects
        doc.setdefault(key, {})
    if not isinstance(doc.get("profiles", []), list) or not all(isinstance(p, dict) for p in doc.get("profiles", [])):
        raise _bad(where, "'profiles' must be a list of objects")
    for p in doc.get("profiles", []):
        for k in ("min", "opt", "max"):
            v = p.get(k)
            if not (isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)):
                raise _bad(where, f"profile {k} must be a list of positive integers")
    cc = doc["device"].get("compute_capability") or []
    if not (isinstance(cc, list) and len(cc) in (0, 2) and all(_is_int(x) and x >= 0 for x in cc)):
        raise _bad(where, "device.compute_capability must be [major, minor]")
    ModelMetadata.from_dict(doc["metadata"], where)
    return doc


def read_sidecar(engine_path: str | os.PathLike, flag: str = "--engine") -> dict:
    """The sidecar of an engine; a clear error when it is missing, damaged or does not describe this engine file."""
    from atexport.utils.io import require_file, sha256_file

    engine_path = require_file(engine_path, flag, "engine file")
    side = sidecar_path(engine_path)
    if not side.is_file():
        raise BadInputError(
            f"{flag} {engine_path}: its sidecar {side.name} is missing; atexport needs it to know the model's "
            "preprocessing, classes and what the engine was built for. Rebuild the engine with 'atexport trt'."
        )
    try:
        doc = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInputError(f"{side}: not a readable JSON sidecar ({e}).") from None
    validate_sidecar(doc, str(side))
    want = doc["engine"].get("sha256")
    if want and sha256_file(engine_path) != want:
        raise BadInputError(
            f"{flag} {engine_path}: the engine file changed since {side.name} was written (sha256 differs); "
            "rebuild it with 'atexport trt' or restore the matching sidecar."
        )
    return doc


def sidecar_metadata(sidecar: dict, where: str = "engine") -> ModelMetadata:
    """The model metadata an engine's sidecar carries (validated)."""
    return ModelMetadata.from_dict(sidecar.get("metadata"), where)


def profile_max_batch(sidecar: dict) -> int | None:
    """The largest batch of the engine's first profile, ``None`` for an engine without profiles."""
    profiles = sidecar.get("profiles") or []
    return int(profiles[0]["max"][0]) if profiles and profiles[0].get("max") else None
