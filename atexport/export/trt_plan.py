"""What a TensorRT build will do, decided without TensorRT: flags per version, profile, sidecar.

Everything here is plain Python and unit-tested on machines without TensorRT or a GPU; the small
module that touches TensorRT (:mod:`atexport.export.tensorrt`) only replays a :class:`BuildPlan`.

The rules, from TensorRT's documentation:

* The precision lives in the ONNX model (FP16 casts or INT8 Q/DQ), so the network is *strongly typed*
  on every supported version: TensorRT 10.x needs ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``;
  11.x is always strongly typed (the flag is deprecated and ignored) and has no ``BuilderFlag.FP16``/
  ``INT8`` and no INT8 calibrators at all. ``EXPLICIT_BATCH`` is deprecated (ignored) since 10.0 and
  never set. Builder precision flags are never set, on either version.
* An FP32 build clears ``BuilderFlag.TF32`` (on by default), as Polygraphy does, so an "fp32" engine
  meets the fp32 parity tolerance.
* A dynamic batch axis gets one optimisation profile (min/opt/max) covering every batch-aligned input:
  the image, and a multi-task model's per-sample ``task_id`` (int64 ``[N]``; the bank tensors are
  initializers, which TensorRT's ONNX parser imports as weights, not inputs); a fixed-batch model gets
  its batch.
* Refittable adapters: ``BuilderFlag.REFIT_INDIVIDUAL`` with the swappable tensors of the metadata's
  manifest marked refittable (``INetworkDefinition.mark_weights_refittable``), so only those weights
  stay refittable and the frozen backbone is optimised as constants. A multi-task model's manifest names
  its bank tensors, so one task's slice is replaced by refitting each bank tensor whole
  (:func:`bank_source` says where the other tasks' current values are read from).
* ``--version-compatible``: ``BuilderFlag.VERSION_COMPATIBLE`` (the runtime then needs
  ``engine_host_code_allowed``); such engines run in the lean runtime, which cannot refit, so the two are
  refused together. ``--hardware-compatible``: ``HardwareCompatibilityLevel.AMPERE_PLUS`` (compute
  capability 8.0 or newer on both the building and the running GPU).
"""

from __future__ import annotations

import os
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from atexport.errors import BadInputError, IncompatibleCheckpointError, MissingDependencyError

SUPPORTED_MAJORS = (10, 11)
SIDECAR_FORMAT = "atexport.engine"
SIDECAR_VERSION = 1
HARDWARE_LEVELS = ("none", "ampere_plus", "same_compute_capability")


def parse_version(version: str) -> tuple[int, int, int]:
    """``"10.13.2.6"`` -> ``(10, 13, 2)``."""
    parts = []
    for p in str(version).split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)  # type: ignore[return-value]


@dataclass
class Profile:
    """One optimisation profile: min/opt/max shape of one input."""

    input: str
    min: list[int]
    opt: list[int]
    max: list[int]


@dataclass
class BuildPlan:
    """Everything :func:`atexport.export.tensorrt.build_engine` sets, by TensorRT's own names.

    Attributes:
        tensorrt: the TensorRT version the plan is for; ``major`` its major version.
        precision: ``fp32``, ``fp16`` or ``int8`` (as baked into the ONNX model).
        network_flags: ``NetworkDefinitionCreationFlag`` members to set.
        builder_flags: ``BuilderFlag`` members to set; ``clear_flags`` those to clear.
        workspace_bytes: ``MemoryPoolType.WORKSPACE`` limit (``None``: TensorRT's default, all memory).
        profiles: optimisation profiles.
        hardware_compatibility: ``HardwareCompatibilityLevel`` member name, or ``None``.
        refittable_weights: ONNX initializer names marked refittable (``REFIT_INDIVIDUAL``).
        timing_cache: path of the timing cache read before and written after the build, or ``None``.
        optimization_level: ``builder_optimization_level`` (0-5), or ``None`` for TensorRT's default (3).
        engine_host_code_allowed: the runtime must allow host code (version-compatible engines).
        notes: human-readable reasons for the less obvious choices.
    """

    tensorrt: str
    major: int
    precision: str
    network_flags: list[str] = field(default_factory=list)
    builder_flags: list[str] = field(default_factory=list)
    clear_flags: list[str] = field(default_factory=list)
    workspace_bytes: int | None = None
    profiles: list[Profile] = field(default_factory=list)
    hardware_compatibility: str | None = None
    refittable_weights: list[str] = field(default_factory=list)
    timing_cache: str | None = None
    optimization_level: int | None = None
    engine_host_code_allowed: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def refittable(self) -> bool:
        return bool(self.refittable_weights)

    @property
    def version_compatible(self) -> bool:
        return "VERSION_COMPATIBLE" in self.builder_flags

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BuildPlan":
        d = dict(d)
        d["profiles"] = [Profile(**p) for p in d.get("profiles", [])]
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def parse_batch_range(spec: str | Sequence[int] | None, default: Sequence[int] = (1, 8, 32)) -> tuple[int, int, int]:
    """``"1,8,32"`` / ``(1, 8, 32)`` / ``"8"`` (fixed) -> ``(min, opt, max)``, validated."""
    if spec is None:
        vals = list(default)
    elif isinstance(spec, str):
        try:
            vals = [int(v) for v in spec.replace(":", ",").split(",") if v.strip()]
        except ValueError:
            raise BadInputError(f"--batch {spec}: expected MIN,OPT,MAX (e.g. 1,8,32) or one batch size.") from None
    else:
        vals = [int(v) for v in spec]
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise BadInputError(f"--batch {spec}: expected MIN,OPT,MAX (e.g. 1,8,32) or one batch size.")
    lo, opt, hi = vals
    if not (1 <= lo <= opt <= hi):
        raise BadInputError(f"--batch {spec}: need 1 <= min <= opt <= max, got {lo},{opt},{hi}.")
    return lo, opt, hi


def plan_build(
    meta,
    trt_version: str,
    *,
    batch: str | Sequence[int] | None = None,
    workspace_gb: float | None = None,
    refit: bool = False,
    version_compatible: bool = False,
    hardware_compatible: bool | str = False,
    timing_cache: str | os.PathLike | None = None,
    optimization_level: int | None = None,
    device_cc: tuple[int, int] | None = None,
) -> BuildPlan:
    """Plan a strongly typed TensorRT build of an atexport ONNX model.

    Args:
        meta: the model's :class:`~atexport.metadata.ModelMetadata` (input shape, precision, manifest).
        trt_version: the TensorRT version that will build (``tensorrt.__version__``).
        batch: ``MIN,OPT,MAX`` batch sizes of the optimisation profile (dynamic-batch models).
        workspace_gb: workspace memory pool limit in GiB.
        refit: make the swappable adapter and head weights refittable (separable models only).
        version_compatible: build a version-compatible engine.
        hardware_compatible: ``True``/``"ampere_plus"`` or ``"same_compute_capability"``.
        timing_cache: timing cache file to reuse and update.
        optimization_level: builder optimisation level 0-5.
        device_cc: compute capability of the building GPU, if known (checked for hardware compatibility).

    Raises:
        MissingDependencyError: a TensorRT version atexport does not support.
        BadInputError: flags that contradict each other or the model.
    """
    major, minor, patch = parse_version(trt_version)
    if major < SUPPORTED_MAJORS[0]:
        raise MissingDependencyError(
            f"TensorRT {trt_version} is too old: atexport builds strongly typed networks from precision ONNX "
            f"models, which needs TensorRT {SUPPORTED_MAJORS[0]}.0 or newer. Install it with: "
            "pip install 'atexport[tensorrt]'."
        )
    precision = str(meta.precision)
    if precision not in ("fp32", "fp16", "int8"):
        raise BadInputError(f"the model's metadata says precision {precision!r}; expected fp32, fp16 or int8.")
    plan = BuildPlan(tensorrt=str(trt_version), major=major, precision=precision)
    if major > SUPPORTED_MAJORS[-1]:
        plan.notes.append(f"TensorRT {major}.x is newer than the versions atexport was written for "
                          f"({', '.join(f'{m}.x' for m in SUPPORTED_MAJORS)}); planned as 11.x.")

    # Strong typing: the precision is the ONNX model's.
    if major == 10:
        plan.network_flags.append("STRONGLY_TYPED")
        plan.notes.append("TensorRT 10: STRONGLY_TYPED network, so the ONNX model's types (FP16 casts, INT8 Q/DQ) "
                          "decide every layer's precision; no FP16/INT8 builder flags.")
    else:
        plan.notes.append(f"TensorRT {major}: networks are always strongly typed (no STRONGLY_TYPED flag, no "
                          "FP16/INT8 builder flags, no calibrators).")
    if precision == "fp32":
        plan.clear_flags.append("TF32")
        plan.notes.append("fp32: TF32 cleared so the engine meets the fp32 tolerance.")

    # Optimisation profile for the batch axis, on every batch-aligned input.
    shape = list(meta.input["shape"])
    if isinstance(shape[0], int):
        if batch is not None and parse_batch_range(batch) != (shape[0],) * 3:
            raise BadInputError(
                f"--batch {batch}: this model has a fixed batch of {shape[0]}; export it with a dynamic batch "
                "(atexport onnx without --batch) to build a batch range."
            )
        lo = opt = hi = int(shape[0])
    else:
        lo, opt, hi = parse_batch_range(batch)
    for name, rest in batch_inputs(meta):
        plan.profiles.append(Profile(input=name, min=[lo, *rest], opt=[opt, *rest], max=[hi, *rest]))
    if meta.tasks:
        plan.notes.append(f"multi-task model ({len(meta.tasks)} tasks): the profile covers the image and "
                          f"{plan.profiles[-1].input}; the bank tensors are weights.")

    if workspace_gb is not None:
        if workspace_gb <= 0:
            raise BadInputError(f"--workspace {workspace_gb}: must be a positive number of GiB.")
        plan.workspace_bytes = int(float(workspace_gb) * (1 << 30))
    if optimization_level is not None:
        if not 0 <= int(optimization_level) <= 5:
            raise BadInputError(f"--opt-level {optimization_level}: must be 0-5.")
        plan.optimization_level = int(optimization_level)

    if refit:
        if version_compatible:
            raise BadInputError(
                "--refit and --version-compatible cannot be combined: version-compatible engines run in "
                "TensorRT's lean runtime, which cannot refit. Choose one."
            )
        manifest = meta.manifest or {}
        if not meta.separable or not manifest:
            raise BadInputError(
                "--refit needs a model exported with 'atexport onnx --separable': only its manifest names the "
                "adapter and head weights that can be swapped."
            )
        plan.builder_flags.append("REFIT_INDIVIDUAL")
        plan.refittable_weights = [str(e.get("initializer", k)) for k, e in manifest.items()]
        plan.notes.append("refit: REFIT_INDIVIDUAL with the manifest's adapter and head weights marked refittable; "
                          "the frozen backbone stays constant-folded.")
    if version_compatible:
        plan.builder_flags.append("VERSION_COMPATIBLE")
        plan.engine_host_code_allowed = True
        plan.notes.append("version compatible: runs on later TensorRT runtimes (runtime.engine_host_code_allowed).")
    if hardware_compatible:
        level = "ampere_plus" if hardware_compatible is True else str(hardware_compatible).lower()
        if level not in HARDWARE_LEVELS:
            raise BadInputError(f"--hardware-compatible {hardware_compatible}: expected one of {HARDWARE_LEVELS}.")
        if level != "none":
            if level == "ampere_plus" and device_cc is not None and device_cc < (8, 0):
                raise BadInputError(
                    f"--hardware-compatible needs an Ampere or newer GPU (compute capability 8.0+) to build on; "
                    f"this one is {device_cc[0]}.{device_cc[1]}."
                )
            plan.hardware_compatibility = level.upper()
    if timing_cache is not None:
        plan.timing_cache = str(timing_cache)
    return plan


def batch_inputs(meta) -> list[tuple[str, list[int]]]:
    """The model's inputs whose first axis is the batch, with their other dimensions.

    The image input, and for a multi-task model its per-sample task input (``extra["task_input"]``,
    ``task_id`` ``[N]`` int64). Every one of them needs a shape in the optimisation profile.
    """
    out = [(str(meta.input.get("name", "input")), [int(v) for v in list(meta.input["shape"])[1:]])]
    if getattr(meta, "tasks", None):
        spec = (meta.extra or {}).get("task_input") or {}
        out.append((str(spec.get("name", "task_id")), [int(v) for v in list(spec.get("shape") or [None])[1:]]))
    return out


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


def default_timing_cache(engine_path: str | os.PathLike, trt_version: str, device_cc: tuple[int, int] | None) -> Path:
    """A timing cache per TensorRT version and GPU architecture, beside the engine (shared by builds)."""
    cc = f"sm{device_cc[0]}{device_cc[1]}" if device_cc else "sm-unknown"
    return Path(engine_path).with_name(f".atexport-timing-trt{trt_version}-{cc}.cache")


def rebuild_command(sidecar: dict) -> str:
    """The ``atexport trt`` command that rebuilds the engine described by ``sidecar`` on this device."""
    build = sidecar.get("build", {})
    onnx_path = sidecar.get("onnx", {}).get("path") or "MODEL.onnx"
    parts = ["atexport", "trt", "--onnx", str(onnx_path), "--precision", str(sidecar.get("precision", "fp32"))]
    prof = (build.get("profiles") or [{}])[0]
    if prof and isinstance(sidecar.get("metadata", {}).get("input", {}).get("shape", [None])[0], str):
        parts += ["--batch", f"{prof['min'][0]},{prof['opt'][0]},{prof['max'][0]}"]
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


def engine_sidecar(
    meta,
    plan: BuildPlan,
    *,
    device: dict,
    engine_path: str | os.PathLike,
    engine_sha256: str,
    engine_bytes: int,
    onnx_path: str | os.PathLike | None,
    onnx_sha256: str | None,
    parity: list | None = None,
    seconds: dict | None = None,
) -> dict:
    """The JSON sidecar written next to an engine: the ONNX metadata plus how and where it was built.

    Args:
        meta: the precision ONNX model's metadata (everything an app needs: preprocessing, classes...).
        plan: the build plan that was executed.
        device: ``{"name", "compute_capability": [major, minor]}`` of the building GPU.
        engine_path, engine_sha256, engine_bytes: the engine file.
        onnx_path, onnx_sha256: the exact ONNX model the engine was built from.
        parity: parity rows of the engine against the reference, if checked.
        seconds: build timings.
    """
    from dataclasses import asdict as _asdict

    cc = list(device.get("compute_capability") or [])
    md = _asdict(meta)
    return {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        "precision": plan.precision,
        "tensorrt": {"version": plan.tensorrt, "major": plan.major},
        "device": {"name": device.get("name"), "compute_capability": cc,
                   "sm": f"sm_{cc[0]}{cc[1]}" if len(cc) == 2 else None},
        "profiles": [asdict(p) for p in plan.profiles],
        "build": plan.to_dict(),
        "engine": {"path": Path(engine_path).name, "sha256": engine_sha256, "bytes": int(engine_bytes)},
        "onnx": {"path": str(onnx_path) if onnx_path else None, "sha256": onnx_sha256},
        "metadata": md,
        "parity": [r.to_dict() if hasattr(r, "to_dict") else r for r in (parity or [])],
        "seconds": seconds or {},
    }


def check_compatible(sidecar: dict, trt_version: str, device: dict, where: str = "engine") -> list[str]:
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


def describe_plan(plan: BuildPlan) -> str:
    """A few lines for the terminal."""
    lines = [
        f"tensorrt:   {plan.tensorrt} ({'strongly typed' if plan.major >= 11 or 'STRONGLY_TYPED' in plan.network_flags else 'weakly typed'})",
        f"precision:  {plan.precision} (from the ONNX model)",
    ]
    for i, p in enumerate(plan.profiles):
        lines.append(f"{'profile:' if i == 0 else '':<12}{p.input} min {p.min} opt {p.opt} max {p.max}")
    flags = plan.builder_flags + [f"-{f}" for f in plan.clear_flags]
    lines.append(f"flags:      network {plan.network_flags or '[]'}, builder {flags or '[]'}")
    if plan.workspace_bytes:
        lines.append(f"workspace:  {plan.workspace_bytes / (1 << 30):g} GiB")
    if plan.refittable:
        lines.append(f"refit:      {len(plan.refittable_weights)} adapter/head weights refittable")
    if plan.hardware_compatibility:
        lines.append(f"hardware:   {plan.hardware_compatibility}")
    if plan.timing_cache:
        lines.append(f"cache:      timing cache {plan.timing_cache}")
    return "\n".join(lines)


def to_jsonable(obj: Any):
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return obj
