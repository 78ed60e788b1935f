"""The one table of runtime backends: what load_model, artifact reading, Triton and bench look up.

Each backend module in ``atexport/runtime/`` keeps its loader beside its runner (as Polygraphy keeps
``EngineFromBytes`` beside ``TrtRunner``): ``open_onnxruntime`` (in ``session.py``, beside the separable
runner it may pick), ``open_openvino``, ``open_tensorrt``, ``open_litert``, ``open_executorch`` take a path and
:class:`LoadOptions` and hand back an :class:`Opened`.
:data:`BACKENDS` has one :class:`Backend` row per backend, named as the runtime names it (``onnxruntime``,
``openvino``, ``tensorrt``, ``litert``, ``executorch``): the files it reads, its loader, the precisions it
can be asked for, the options it refuses and why, where bench times it, and its Triton platform. Loaders
and Triton's tensor readers are named ``"module:function"`` and imported only when used, so importing
this table imports no backend library.

Adding a backend is one module (runner + loader) and one row here (:func:`register` for one made
elsewhere, e.g. in a test). The PyTorch runner (``runtime/torch.py``) has no row: it runs an
``nn.Module``, not a file, as the baseline of verify and bench.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from atexport.errors import BadInputError


@dataclass(frozen=True)
class LoadOptions:
    """What a caller may ask of a backend when it opens a file (each backend uses what applies to it).

    Attributes:
        providers: ONNX Runtime execution providers.
        threads: inference threads.
        device: CUDA device (TensorRT).
        precision: the precision to run at (backends with ``precisions``), or ``None``: the file's own.
        flag: how the file is named in messages (``--model``, ``--onnx``...).
        app: opened for an app (``load_model``): the runner is active now and a separable model's swaps tasks;
            ``False`` (artifact reading for verify, bench): the file's own weights, TensorRT loaded on activation.
    """

    providers: Any = None
    threads: int | None = None
    device: int = 0
    precision: str | None = None
    flag: str = "--model"
    app: bool = True


@dataclass
class Opened:
    """What a loader hands back.

    Attributes:
        meta: the model's :class:`~atexport.artifact.metadata.ModelMetadata`.
        runner: its :class:`~atexport.runtime.base.Runner` (active, except TensorRT's for artifact reading,
            which loads the engine when activated).
        mode: ``single``, ``separable`` or ``multitask``.
        batch: a fixed batch, or (TensorRT) the largest its profile takes; ``None``: any.
        precision: what runs (the file's precision, or what the runner compiled).
    """

    meta: Any
    runner: Any
    mode: str
    batch: int | None = None
    precision: str | None = None

    def __post_init__(self):
        if self.precision is None:
            self.precision = getattr(self.runner, "precision", None) or self.meta.precision


@dataclass(frozen=True)
class TritonTarget:
    """How Triton serves a backend's file.

    Attributes:
        platform: Triton's ``platform`` (or ``backend``, see ``key``) name.
        model_file: the file name Triton loads from a version folder.
        key: ``platform`` or ``backend`` (a Triton backend named by ``backend:`` and ``default_model_filename``).
        instance_kind: the one instance kind it runs on (also the default), or ``None``: Triton's choice.
        instance_note: why the other kind is refused (after ``--instance-kind KIND: ``).
        weights: suffix of a weights file that sits beside the model file (``.bin`` of an OpenVINO IR).
        make: how to get this backend's file, ``{onnx}`` the ONNX model (in the message refusing another file).
        io: ``"module:function"``, ``(path) -> (metadata, inputs, outputs, engine profile (min, max) or None)``.
        profiled: its batch range is an optimisation profile's (the ``(min, max)`` ``io`` returns), not the
            model's input shape.
        parameters: ``"module:function"``, ``(metadata) -> (config parameters, notes)``, or ``None``.
    """

    platform: str
    model_file: str
    io: str
    key: str = "platform"
    instance_kind: str | None = None
    instance_note: str = ""
    weights: str | None = None
    make: str = "give the .onnx model"
    parameters: str | None = None
    profiled: bool = False


@dataclass(frozen=True)
class Backend:
    """One runtime backend: everything load_model, artifact reading, Triton and bench need to know of it.

    Attributes:
        name: the backend's name (``load_model(..., backend=)``, ``model.backend``, bench rows).
        title: how messages name it (``ONNX Runtime``).
        suffixes: the file types it reads; the first row that lists a suffix runs such files by default.
        label: the file it reads, in messages (``an OpenVINO .xml IR``).
        open: its loader, ``"module:function"`` or a callable: ``(path, LoadOptions) -> Opened``.
        precisions: precisions it can be asked to run at; empty: a file runs at its own precision.
        refuse_precision: why ``precision`` is refused (when ``precisions`` is empty), ``{precision}`` the value.
        refuse_providers: why execution providers are refused, ``{providers}`` the value; ``None``: taken or ignored.
        sole: why another backend cannot run a file only this one reads, ``{backend}`` and ``{path}`` filled in.
        device: where bench times it: ``cpu``, ``cuda``, or ``None``: where its providers run.
        pads: a fixed-batch model takes exactly its batch (bench pads and skips other sizes).
        batch_one: runs one image at a time (on-device formats: bench times batch 1 only).
        swaps: a separable model's runner holds several tasks and swaps them (``add_task`` / ``use``).
        triton: how Triton serves its file, or ``None``.
    """

    name: str
    title: str
    suffixes: tuple[str, ...]
    label: str
    open: Any
    precisions: tuple[str, ...] = ()
    refuse_precision: str = "--precision {precision}: {path} runs at the precision it was exported with."
    refuse_providers: str | None = None
    sole: str = "--backend {backend}: {path} runs in {title} only."
    device: str | None = "cpu"
    pads: bool = False
    batch_one: bool = False
    swaps: bool = True
    triton: TritonTarget | None = None

    def load(self, path: Path, options: LoadOptions) -> Opened:
        """Open ``path`` with this backend's loader."""
        return resolve(self.open)(Path(path), options)

    def check_options(self, path: Path, backend: str | None, options: LoadOptions) -> None:
        """Refuse what this backend cannot do with ``path``, in the order a user would fix it."""
        if backend is not None and backend != self.name:
            raise BadInputError(self.sole.format(backend=backend, path=path, title=self.title))
        if options.providers and self.refuse_providers:
            providers = ", ".join(map(str, options.providers))
            raise BadInputError(self.refuse_providers.format(providers=providers, path=path, title=self.title))
        if options.precision is not None and not self.precisions:
            raise BadInputError(self.refuse_precision.format(precision=options.precision, path=path, title=self.title))


def resolve(ref: Any) -> Callable:
    """A callable from ``"package.module:function"`` (imported now), or the callable itself."""
    if callable(ref):
        return ref
    module, _, name = str(ref).partition(":")
    return getattr(importlib.import_module(module), name)


_EDGE_SOLE = ("{path} runs in {title} only, at the precision it was exported with; leave --backend, --provider "
              "and --precision out.")

BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend(
        "onnxruntime", "ONNX Runtime", (".onnx",), "an .onnx model", "atexport.runtime.session:open_onnxruntime",
        refuse_precision="--precision {precision}: ONNX Runtime runs a model at the precision of its file; choose "
                         "the file (model.int8.onnx, ...) or run it with --backend openvino.",
        device=None, pads=True,
        triton=TritonTarget("onnxruntime_onnx", "model.onnx", "atexport.runtime.onnxruntime:onnx_io"),
    ),
    Backend(
        "openvino", "OpenVINO", (".onnx", ".xml"), "an OpenVINO .xml IR", "atexport.runtime.openvino:open_openvino",
        precisions=("fp32", "bf16", "fp16", "int8", "int8+bf16"),
        refuse_providers="--provider {providers}: execution providers are ONNX Runtime's; OpenVINO runs on the CPU "
                         "(leave --provider out, or use --backend onnxruntime).",
        sole="--backend {backend}: {path} is an OpenVINO IR, which runs in OpenVINO only; use --backend openvino, "
             "or give the .onnx model.",
        pads=True,
        triton=TritonTarget(
            "openvino", "model.xml", "atexport.runtime.openvino:openvino_io", key="backend", instance_kind="cpu",
            instance_note="Triton's OpenVINO backend runs on CPU instances; use cpu or leave it out.", weights=".bin",
            make="write its OpenVINO IR with 'atexport openvino --onnx {onnx}' and give the .xml",
            parameters="atexport.runtime.openvino:triton_parameters"),
    ),
    Backend(
        "tensorrt", "TensorRT", (".engine", ".plan", ".trt"), "a TensorRT .engine/.plan",
        "atexport.runtime.tensorrt:open_tensorrt",
        refuse_precision="--precision {precision}: a TensorRT engine runs at the precision it was built with; "
                         "rebuild it ('atexport trt --precision ...') to change it.",
        sole="--backend {backend}: {path} is a TensorRT engine, which runs in TensorRT only; give the .onnx model "
             "it was built from to run it in another backend.",
        device="cuda", swaps=False,
        triton=TritonTarget(
            "tensorrt_plan", "model.plan", "atexport.runtime.tensorrt:engine_file_io", instance_kind="gpu",
            instance_note="a TensorRT engine runs on the GPU only; use gpu or leave it out.", profiled=True,
            make="build an engine with 'atexport trt --onnx {onnx}' and give the .engine"),
    ),
    Backend("litert", "litert", (".tflite",), "a LiteRT .tflite", "atexport.runtime.litert:open_litert",
            refuse_precision=_EDGE_SOLE, refuse_providers=_EDGE_SOLE, sole=_EDGE_SOLE, batch_one=True),
    Backend("executorch", "executorch", (".pte",), "an ExecuTorch .pte", "atexport.runtime.executorch:open_executorch",
            refuse_precision=_EDGE_SOLE, refuse_providers=_EDGE_SOLE, sole=_EDGE_SOLE, batch_one=True),
)}


def register(backend: Backend) -> Backend:
    """Add (or replace) a row of :data:`BACKENDS`: a backend made outside this package, e.g. in a test."""
    BACKENDS[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    """The row of ``name``.

    Raises:
        BadInputError: no such backend.
    """
    if name not in BACKENDS:
        raise BadInputError(f"--backend {name}: expected one of {', '.join(BACKENDS)}.")
    return BACKENDS[name]


def backend_for(path: str | Path, among: Any = None) -> Backend | None:
    """The backend that runs ``path`` by default: the first row (of ``among``, default all) reading its suffix."""
    suffix = Path(path).suffix.lower()
    rows = [BACKENDS[n] for n in among] if among is not None else list(BACKENDS.values())
    return next((b for b in rows if suffix in b.suffixes), None)


def choosable() -> list[str]:
    """Backends a user may choose with ``--backend``: those reading a file type another backend reads too."""
    return [b.name for b in BACKENDS.values()
            if any(s in o.suffixes for o in BACKENDS.values() if o is not b for s in b.suffixes)]


def labels(rows: Any = None) -> str:
    """``"an .onnx model, an OpenVINO .xml IR or a TensorRT .engine/.plan"``: the files of ``rows``."""
    names = [b.label for b in (rows if rows is not None else BACKENDS.values())]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def triton_backends() -> list[Backend]:
    """The rows Triton can serve."""
    return [b for b in BACKENDS.values() if b.triton is not None]


__all__ = ["BACKENDS", "Backend", "LoadOptions", "Opened", "TritonTarget", "backend_for", "choosable", "get_backend",
           "labels", "register", "resolve", "triton_backends"]
