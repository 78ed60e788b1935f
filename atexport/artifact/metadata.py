"""The metadata an app needs to feed an exported model, stored inside the model itself.

ONNX models carry it in ``metadata_props`` (key ``atexport``, a JSON document, plus a few flat keys
for humans and tools); TensorRT engines and OpenVINO models carry the same document in a JSON sidecar.
The document is enough for an app to preprocess images, name the classes and select task adapters
without atexport's training code or PyTorch.

There is one reader, :meth:`ModelMetadata.from_dict` (``from_json`` parses, then calls it): it checks
the format version and the *shape* of every field an app relies on, so a hand-edited or damaged
document ends in one :class:`~atexport.errors.BadInputError` naming the file and the field, never in an
``AttributeError`` deep inside a runner.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from atexport import __version__
from atexport.errors import BadInputError

META_KEY = "atexport"
META_VERSION = 1
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


@dataclass
class ModelMetadata:
    """Schema of the ``atexport`` metadata document.

    Attributes:
        backbone: ``{"name", "fingerprint", "model_args", "source"}``.
        input: ``{"name", "shape" (batch as a string or int), "dtype", "layout"}``.
        output: ``{"name", "shape"}``.
        preprocess: the backbone's eval transform (input_size, interpolation, mean, std, crop_pct, crop_mode).
        class_names: names of the output classes (single-task models).
        adapter: the adapter config, or ``None``.
        separable: whether adapter and head weights are named, swappable initializers.
        manifest: swappable tensors: ``{checkpoint tensor name: {"initializer": name, "shape": [...]}}``.
        precision: ``fp32``, ``fp16``, ``bf16`` or ``int8``.
        tasks: multi-task models: one entry per task (name, num_classes, class_names, fingerprint...).
        task: name of the task whose weights a single-task model holds.
        extra: anything else (export config, parity results, simplifier stats).
    """

    backbone: dict[str, Any]
    input: dict[str, Any]
    output: dict[str, Any]
    preprocess: dict[str, Any]
    class_names: list[str] | None = None
    num_classes: int | None = None
    adapter: dict[str, Any] | None = None
    regime: str | None = None
    separable: bool = False
    manifest: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"
    task: str | None = None
    tasks: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    atexport_version: str = __version__
    format_version: int = META_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=False)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, text: str, where: str = "model") -> "ModelMetadata":
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise BadInputError(f"{where}: atexport metadata is not valid JSON ({e}).") from None
        return cls.from_dict(d, where)

    @classmethod
    def from_dict(cls, d: Any, where: str = "model") -> "ModelMetadata":
        """The one reader of a metadata document: version check, then the schema (see :func:`validate`)."""
        if not isinstance(d, dict):
            raise _bad(where, "the document", f"a JSON object, got {type(d).__name__}")
        version = d.get("format_version", 0)
        if not _is_int(version):
            raise _bad(where, "format_version", f"an integer, got {version!r}")
        if version > META_VERSION:
            raise BadInputError(
                f"{where}: metadata format v{version} is newer than this atexport (reads v{META_VERSION}); "
                "upgrade atexport with: pip install -U atexport"
            )
        validate(d, where)
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def flat_props(self) -> dict[str, str]:
        """The ONNX ``metadata_props`` entries: the JSON document plus readable flat keys."""
        return {
            META_KEY: self.to_json(),
            "atexport.version": self.atexport_version,
            "atexport.backbone": str(self.backbone.get("name")),
            "atexport.backbone_fingerprint": str(self.backbone.get("fingerprint")),
            "atexport.precision": self.precision,
            "atexport.input": json.dumps(self.input),
            "atexport.preprocess": json.dumps(self.preprocess),
        }

    @property
    def mode(self) -> str:
        """``"multitask"``, ``"separable"`` or ``"single"``."""
        if self.tasks:
            return "multitask"
        return "separable" if self.separable and self.manifest else "single"


# ------------------------------------------------------------------------------------------ schema


def _bad(where: str, key: str, want: str) -> BadInputError:
    return BadInputError(
        f"{where}: damaged atexport metadata: {key} must be {want}; re-export the model with atexport "
        "(or restore the file) instead of editing its metadata."
    )


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _int_list(v, n: int | None = None, positive: bool = True) -> bool:
    return (isinstance(v, list) and (n is None or len(v) == n)
            and all(_is_int(x) and (x > 0 or not positive) for x in v))


def _check_preprocess(p, where: str) -> None:
    if not isinstance(p, dict):
        raise _bad(where, "preprocess", "an object")
    if not _int_list(p.get("input_size"), 3) or p["input_size"][0] != 3:
        raise _bad(where, "preprocess.input_size", "[3, height, width] with positive integers")
    for key in ("mean", "std"):
        v = p.get(key)
        if not (isinstance(v, list) and len(v) == 3 and all(_is_num(x) for x in v)):
            raise _bad(where, f"preprocess.{key}", "three finite numbers")
    if any(abs(float(x)) > 1e3 for x in p["mean"]):  # float32 arithmetic must stay finite
        raise _bad(where, "preprocess.mean", "three numbers of at most 1000 in size")
    if any(not 1e-6 <= float(x) <= 1e3 for x in p["std"]):
        raise _bad(where, "preprocess.std", "three positive numbers between 1e-6 and 1000")
    crop = p.get("crop_pct")
    if crop is not None and not (_is_num(crop) and 0 < float(crop) <= 1):
        raise _bad(where, "preprocess.crop_pct", "a number in (0, 1]")
    for key in ("interpolation", "crop_mode"):
        if key in p and not isinstance(p[key], str):
            raise _bad(where, f"preprocess.{key}", "a string")


check_preprocess = _check_preprocess  # the same check for a checkpoint's preprocess record


def _check_shape(v, where: str, key: str) -> None:
    ok = isinstance(v, list) and v and all(_is_int(x) and x > 0 or isinstance(x, str) for x in v)
    if not ok:
        raise _bad(where, key, "a list of positive integers or axis names")


def validate(d: dict, where: str = "model") -> None:
    """Check the shape of every field an app or a backend relies on; raise :class:`BadInputError` otherwise."""
    for key in ("backbone", "input", "output", "preprocess"):
        if not isinstance(d.get(key), dict):
            raise _bad(where, key, "an object")
    if not isinstance(d["input"].get("name"), str):
        raise _bad(where, "input.name", "a string")
    _check_shape(d["input"].get("shape"), where, "input.shape")
    if len(d["input"]["shape"]) != 4:
        raise _bad(where, "input.shape", "[batch, 3, height, width]")
    _check_preprocess(d["preprocess"], where)
    names, n = d.get("class_names"), d.get("num_classes")
    if names is not None and not (isinstance(names, list) and all(isinstance(x, str) for x in names)):
        raise _bad(where, "class_names", "a list of strings")
    if n is not None and not (_is_int(n) and n > 0):
        raise _bad(where, "num_classes", "a positive integer")
    if names is not None and n is not None and len(names) != n:
        raise _bad(where, "class_names", f"one name per class ({n}), got {len(names)}")
    for key, kind in (("adapter", dict), ("manifest", dict), ("extra", dict)):
        if d.get(key) is not None and not isinstance(d[key], kind):
            raise _bad(where, key, "an object")
    for name, e in (d.get("manifest") or {}).items():
        if not isinstance(e, dict) or not _int_list(e.get("shape"), positive=False):
            raise _bad(where, f"manifest[{name!r}]", "an object with a shape (list of integers)")
        for key in ("initializer", "dtype"):
            if key in e and not isinstance(e[key], str):
                raise _bad(where, f"manifest[{name!r}].{key}", "a string")
    if d.get("precision", "fp32") not in PRECISIONS:
        raise _bad(where, "precision", f"one of {', '.join(PRECISIONS)}")
    if not isinstance(d.get("separable", False), bool):
        raise _bad(where, "separable", "true or false")
    for key in ("task", "regime"):
        if d.get(key) is not None and not isinstance(d[key], str):
            raise _bad(where, key, "a string")
    tasks = d.get("tasks")
    if tasks is not None:
        if not isinstance(tasks, list):
            raise _bad(where, "tasks", "a list")
        seen = set()
        for i, t in enumerate(tasks):
            ok = (isinstance(t, dict) and isinstance(t.get("name"), str) and _is_int(t.get("index"))
                  and _is_int(t.get("num_classes")) and t["num_classes"] > 0)
            if not ok:
                raise _bad(where, f"tasks[{i}]", "an object with name, index and num_classes")
            cn = t.get("class_names")
            if cn is not None and not (isinstance(cn, list) and len(cn) == t["num_classes"]
                                       and all(isinstance(x, str) for x in cn)):
                raise _bad(where, f"tasks[{i}].class_names", f"{t['num_classes']} strings")
            seen.add(t["index"])
        if seen != set(range(len(tasks))):
            raise _bad(where, "tasks[*].index", f"0..{len(tasks) - 1}, each once")


# ------------------------------------------------------------------------------------------ ONNX


def write_onnx_metadata(model_proto, meta: ModelMetadata) -> None:
    """Replace atexport's entries in an ``onnx.ModelProto``'s ``metadata_props`` (in place)."""
    props = meta.flat_props()
    keep = [p for p in model_proto.metadata_props if p.key not in props and not p.key.startswith("atexport")]
    del model_proto.metadata_props[:]
    model_proto.metadata_props.extend(keep)
    for k, v in props.items():
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = k, v


def read_onnx_metadata(model_proto, where: str = "model") -> ModelMetadata:
    """Read atexport's metadata from an ``onnx.ModelProto`` (error if the model was not made by atexport)."""
    for p in model_proto.metadata_props:
        if p.key == META_KEY:
            return ModelMetadata.from_json(p.value, where)
    raise BadInputError(f"{where}: no atexport metadata; export the model with 'atexport onnx'.")


def metadata_from_props(props: dict, where: str = "model") -> ModelMetadata:
    """Read atexport's metadata from ONNX Runtime's ``custom_metadata_map`` (no onnx package needed)."""
    if META_KEY not in props:
        raise BadInputError(f"{where}: no atexport metadata (preprocessing, classes); export it with 'atexport onnx'.")
    return ModelMetadata.from_json(props[META_KEY], where)
