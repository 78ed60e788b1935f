"""The settings of an ONNX export, made once and shared by the single-task and multi-task exporters.

:class:`ExportSettings` resolves the export preset (``export_configs/onnx.yaml`` or another) with the
user's overrides and validates the result in ``__post_init__``: the opset, the batch size (``None``: a
dynamic batch axis), the simplifier, whether to verify, where the backbone and extra parity photos come
from. The CLI (``atexport onnx``) makes one and hands it to :func:`~atexport.export.onnx.export_onnx` or
:func:`~atexport.export.multitask.export_multitask`; a Python user does the same::

    from atexport.export import ExportSettings, export_onnx
    export_onnx("runs/cars/run.pt", "cars.onnx", ExportSettings(separable=True, batch=8))

So a bad ``--opset`` or ``--batch`` is refused, with one message, before any checkpoint is read or model built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from atexport.errors import BadInputError
from atexport.export.module import MIN_OPSET, check_opset


def load_export_config(config: str | Mapping = "onnx", **overrides) -> dict:
    """The ``export_configs/onnx.yaml`` preset (or another), with non-``None`` overrides applied.

    Overrides are ``section__key=value`` or plain keys of the ``export`` section.
    """
    from atexport import configs

    data = dict(config) if isinstance(config, Mapping) else configs.load("export_configs", config)
    data.setdefault("export", {})
    data.setdefault("parity", {})
    for k, v in overrides.items():
        if v is None:
            continue
        section, _, key = k.rpartition("__")
        data.setdefault(section or "export", {})[key] = v
    return data


@dataclass(frozen=True)
class ExportSettings:
    """How to export, whatever is exported (one checkpoint, or several as one multi-task model).

    ``None`` for ``opset``, ``batch``, ``simplify`` and ``simplifier`` takes the preset's value; after
    construction these fields hold the resolved values the export uses.

    Attributes:
        config: export preset name in ``export_configs/`` (or a YAML path), or a dict.
        opset: ONNX opset (>= 20, where GELU is one ``Gelu`` node and LayerNorm one ``LayerNormalization``).
        batch: fixed batch size; ``None``: a dynamic batch axis named ``"batch"``.
        simplify: run the simplifier.
        simplifier: ``"onnxslim"`` or ``"onnxsim"``.
        separable: lift adapter and head tensors to named, swappable initializers (a multi-task model's
            bank is always swappable, so a multi-task export ignores it).
        verify: check parity against PyTorch (on by default; off only to save time).
        backbone_weights: local backbone weights file, for checkpoints whose backbone is not in timm's hub.
        images: extra real images for parity: a folder, or a list of paths or PIL images.
        log: optional callable receiving progress lines.
        preset: the resolved preset (``export`` and ``parity`` sections), recorded in the model's metadata.
    """

    config: str | Mapping = "onnx"
    opset: int | None = None
    batch: int | None = None
    simplify: bool | None = None
    simplifier: str | None = None
    separable: bool = False
    verify: bool = True
    backbone_weights: str | Path | None = None
    images: Any = field(default=None, compare=False)
    log: Callable[[str], None] | None = field(default=None, compare=False, repr=False)
    preset: dict = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        cfg = load_export_config(self.config, opset=self.opset, batch=self.batch, simplify=self.simplify,
                                 simplifier=self.simplifier)
        ex = cfg["export"]
        opset, batch = int(ex.get("opset", MIN_OPSET)), ex.get("batch")
        if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
            raise BadInputError(f"--batch {batch}: must be a positive integer (omit it for a dynamic batch axis).")
        check_opset(opset)
        for name, value in (("preset", cfg), ("opset", opset), ("batch", batch),
                            ("simplify", bool(ex.get("simplify", True))),
                            ("simplifier", str(ex.get("simplifier", "onnxslim")))):
            object.__setattr__(self, name, value)

    @property
    def parity(self) -> dict:
        """The preset's ``parity`` section (tolerances, photos, random inputs, batch sizes)."""
        return self.preset["parity"]

    @property
    def precision(self) -> str:
        """The tolerance row parity is held to (``fp32`` for an export)."""
        return self.parity.get("precision", "fp32")

    @property
    def trace_batch(self) -> int:
        """The batch the model is traced at: the fixed batch, else the preset's (at least 2: batch 1 would
        specialise a dynamic axis)."""
        return int(self.batch) if self.batch is not None else max(int(self.preset["export"].get("trace_batch", 2)), 2)

    @property
    def batch_sizes(self) -> list[int]:
        """The batch sizes parity is checked at: the fixed batch, else the preset's."""
        return [int(self.batch)] if self.batch is not None else [int(b) for b in self.parity.get("batch_sizes", [1, 4])]

    def say(self, line: str) -> None:
        """Send a progress line to ``log`` (if any)."""
        if self.log is not None:
            self.log(line)

    def describe_batch(self) -> str:
        return "dynamic batch" if self.batch is None else f"batch {self.batch}"

    def load_images(self):
        """The extra parity photos, read now (a bad image fails before minutes of export); ``None`` if none
        or if parity is not checked."""
        if not self.verify or self.images is None:
            return None
        from atexport.parity.images import load_images

        return load_images(self.images, limit=self.parity.get("max_images"))

    def record(self) -> dict:
        """What made an exported model (exporter, versions, settings, resolved config), for its metadata."""
        import onnx
        import torch

        return {
            "exporter": "torch.onnx.export(dynamo=True)",
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "opset": self.opset,
            "batch": self.batch,
            "trace_batch": self.trace_batch,
            "simplify": self.simplify,
            "simplifier": self.simplifier if self.simplify else None,
            "config": {k: v for k, v in self.preset.items() if not k.startswith("_")},
            "config_source": self.preset.get("_source"),
        }
