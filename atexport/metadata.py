"""The metadata an app needs to feed an exported model, stored inside the model itself.

ONNX models carry it in ``metadata_props`` (key ``atexport``, a JSON document, plus a few flat keys
for humans and tools); TensorRT engines carry the same document in a JSON sidecar. The document is
enough for an app to preprocess images, name the classes and select task adapters without atexport's
training code or PyTorch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from atexport import __version__
from atexport.errors import BadInputError

META_KEY = "atexport"
META_VERSION = 1


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
        precision: ``fp32``, ``fp16`` or ``int8``.
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

    @classmethod
    def from_json(cls, text: str, where: str = "model") -> "ModelMetadata":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadInputError(f"{where}: atexport metadata is not valid JSON ({e}).") from None
        if int(d.get("format_version", 0)) > META_VERSION:
            raise BadInputError(
                f"{where}: metadata format v{d.get('format_version')} is newer than this atexport; upgrade it."
            )
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
