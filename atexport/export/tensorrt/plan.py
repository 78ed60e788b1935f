"""What a TensorRT build will do, decided without TensorRT: options, flags per version, profile, sidecar.

Everything here is plain Python and unit-tested on machines without TensorRT or a GPU; :mod:`.build`
only replays a :class:`BuildPlan` through TensorRT.

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
* Refittable adapters: ``BuilderFlag.REFIT_INDIVIDUAL`` (TensorRT 10.2 and later) with the swappable
  tensors of the metadata's manifest marked refittable (``INetworkDefinition.mark_weights_refittable``),
  so only those weights stay refittable and the frozen backbone is optimised as constants. TensorRT 10.0
  and 10.1 have neither, so there the plan says so and uses ``BuilderFlag.REFIT`` (every weight
  refittable). An INT8 model whose swappable tensors feed quantized layers is refused: the Q/DQ scales
  were calibrated for the old weights.
* ``--version-compatible``: ``BuilderFlag.VERSION_COMPATIBLE`` (the runtime then needs
  ``engine_host_code_allowed``); such engines run in the lean runtime, which cannot refit, so the two are
  refused together. ``--hardware-compatible``: ``HardwareCompatibilityLevel.AMPERE_PLUS`` (compute
  capability 8.0 or newer on both GPUs) or ``SAME_COMPUTE_CAPABILITY`` (TensorRT 10.9 and later); neither
  on Jetson.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from atexport.artifact.sidecar import SIDECAR_FORMAT, SIDECAR_VERSION, parse_version
from atexport.errors import BadInputError, MissingDependencyError

SUPPORTED_MAJORS = (10, 11)
HARDWARE_LEVELS = ("none", "ampere_plus", "same_compute_capability")
REFIT_INDIVIDUAL_SINCE = (10, 2)  # BuilderFlag.REFIT_INDIVIDUAL and INetworkDefinition.mark_weights_refittable
SAME_CC_SINCE = (10, 9)  # HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY


@dataclass
class Profile:
    """One optimisation profile: min/opt/max shape of one input."""

    input: str
    min: list[int]
    opt: list[int]
    max: list[int]


def parse_batch_range(spec: str | Sequence[int] | None, default: Sequence[int] = (1, 8, 32)) -> tuple[int, int, int]:
    """``"1,8,32"`` / ``(1, 8, 32)`` / ``"8"`` (fixed) -> ``(min, opt, max)``, validated.

    Raises:
        BadInputError: not one or three integers with ``1 <= min <= opt <= max``.
    """
    bad = f"--batch {spec}: expected MIN,OPT,MAX (e.g. 1,8,32) or one batch size."
    if spec is None:
        vals = list(default)
    else:
        try:
            raw = [v for v in spec.replace(":", ",").split(",") if v.strip()] if isinstance(spec, str) else list(spec)
            vals = [int(str(v).strip()) for v in raw]
        except (TypeError, ValueError):
            raise BadInputError(bad) from None
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise BadInputError(bad)
    lo, opt, hi = vals
    if not (1 <= lo <= opt <= hi):
        raise BadInputError(f"--batch {spec}: need 1 <= min <= opt <= max, got {lo},{opt},{hi}.")
    return lo, opt, hi


@dataclass(frozen=True)
class EngineOptions:
    """How to build the engine; every value is validated on construction (before any work starts).

    Attributes:
        batch: ``MIN,OPT,MAX`` batch sizes of the optimisation profile (dynamic-batch models), or one size.
        workspace_gb: workspace memory pool limit in GiB (``None``: TensorRT's default, all memory).
        refit: make the swappable adapter and head weights refittable (separable or multi-task models).
        version_compatible: build an engine later TensorRT versions can run.
        hardware_compatible: ``True``/``"ampere_plus"`` or ``"same_compute_capability"`` (``False``: off).
        timing_cache: timing cache file to reuse and update; ``None``: one per TensorRT version and GPU
            beside the engine; ``False``: no timing cache.
        optimization_level: builder optimisation level 0-5 (``None``: TensorRT's default, 3).
        build: ``yes`` builds the engine (no TensorRT or GPU is an error), ``auto`` builds it where TensorRT
            and a GPU exist and otherwise stops after the precision ONNX with a note, ``no`` stops after the
            precision ONNX.
        output: the engine file (default ``<precision model stem>.engine``).
    """

    batch: str | Sequence[int] | None = None
    workspace_gb: float | None = None
    refit: bool = False
    version_compatible: bool = False
    hardware_compatible: bool | str = False
    timing_cache: str | os.PathLike | bool | None = None
    optimization_level: int | None = None
    build: str = "yes"
    output: str | os.PathLike | None = None

    def __post_init__(self):
        if self.build not in ("yes", "auto", "no"):
            raise BadInputError(f"--build {self.build}: expected yes, auto or no.")
        if self.batch is not None:
            parse_batch_range(self.batch)
        if self.workspace_gb is not None:
            try:
                ws = float(self.workspace_gb)
            except (TypeError, ValueError):
                ws = float("nan")
            if not (math.isfinite(ws) and ws > 0):
                raise BadInputError(f"--workspace {self.workspace_gb}: must be a positive number of GiB.")
        if self.optimization_level is not None:
            if isinstance(self.optimization_level, bool) or not isinstance(self.optimization_level, int) \
                    or not 0 <= self.optimization_level <= 5:
                raise BadInputError(f"--opt-level {self.optimization_level}: must be an integer 0-5.")
        if self.hardware_level is not None and self.hardware_level not in HARDWARE_LEVELS:
            raise BadInputError(f"--hardware-compatible {self.hardware_compatible}: expected one of {HARDWARE_LEVELS}.")
        if self.refit and self.version_compatible:
            raise BadInputError(
                "--refit and --version-compatible cannot be combined: version-compatible engines run in "
                "TensorRT's lean runtime, which cannot refit. Choose one."
            )
        if self.timing_cache is True:
            raise BadInputError("--timing-cache: give a file path (or leave it out for the default cache).")

    @property
    def hardware_level(self) -> str | None:
        """``"ampere_plus"``, ``"same_compute_capability"``, ``"none"`` or ``None`` (not asked for)."""
        if self.hardware_compatible is False or self.hardware_compatible is None:
            return None
        return "ampere_plus" if self.hardware_compatible is True else str(self.hardware_compatible).lower()

    def given(self) -> list[str]:
        """The engine-build flags set to something other than their default (for "does not apply" refusals)."""
        named = (("--batch", self.batch is not None), ("--workspace", self.workspace_gb is not None),
                 ("--version-compatible", self.version_compatible), ("--hardware-compatible", self.hardware_level),
                 ("--timing-cache", self.timing_cache not in (None, False)),
                 ("--opt-level", self.optimization_level is not None), ("-o", self.output is not None))
        return [flag for flag, on in named if on]

    def flags(self) -> str:
        """The ``atexport trt`` flags that rebuild with these options (leading space, or empty)."""
        parts = []
        if self.batch is not None:
            parts.append("--batch " + ",".join(str(v) for v in parse_batch_range(self.batch)))
        if self.refit:
            parts.append("--refit")
        if self.version_compatible:
            parts.append("--version-compatible")
        if self.hardware_level not in (None, "none"):
            parts.append("--hardware-compatible")
        if self.workspace_gb is not None:
            parts.append(f"--workspace {float(self.workspace_gb):g}")
        if self.optimization_level is not None:
            parts.append(f"--opt-level {self.optimization_level}")
        return "".join(" " + p for p in parts)


@dataclass
class BuildPlan:
    """Everything :func:`~atexport.export.tensorrt.build.build_engine` sets, by TensorRT's own names.

    Attributes:
        tensorrt: the TensorRT version the plan is for; ``major`` its major version.
        precision: ``fp32``, ``fp16`` or ``int8`` (as baked into the ONNX model).
        network_flags: ``NetworkDefinitionCreationFlag`` members to set.
        builder_flags: ``BuilderFlag`` members to set; ``clear_flags`` those to clear.
        workspace_bytes: ``MemoryPoolType.WORKSPACE`` limit (``None``: TensorRT's default, all memory).
        profiles: optimisation profiles.
        hardware_compatibility: ``HardwareCompatibilityLevel`` member name, or ``None``.
        refittable_weights: ONNX initializer names a refit replaces (marked refittable with
            ``REFIT_INDIVIDUAL``; with ``REFIT`` every weight is refittable).
        timing_cache: path of the timing cache read before and written after the build, or ``None``.
        optimization_level: ``builder_optimization_level`` (0-5), or ``None`` for TensorRT's default (3).
        engine_host_code_allowed: the runtime must allow host code (version-compatible engines).
        int8_refit_checked: an INT8 refit build whose swappable tensors were checked to feed no quantized layer.
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
    int8_refit_checked: bool = False
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


def check_batch_for_model(meta, batch) -> None:
    """Refuse a ``--batch`` range for a fixed-batch model (it has exactly one batch size)."""
    b = list(meta.input["shape"])[0]
    if isinstance(b, int) and batch is not None and parse_batch_range(batch) != (b,) * 3:
        raise BadInputError(
            f"--batch {batch}: this model has a fixed batch of {b}; export it with a dynamic batch "
            "(atexport onnx without --batch) to build a batch range."
        )


def check_refit_for_model(meta) -> None:
    """Refuse ``--refit`` for a model without a manifest of swappable tensors."""
    if not (meta.manifest and (meta.separable or meta.tasks)):
        raise BadInputError(
            "--refit needs a model exported with 'atexport onnx --separable' (or --multitask): only its manifest "
            "names the adapter and head weights that can be swapped."
        )


def quantized_consumers(model, names: Sequence[str]) -> dict[str, list[str]]:
    """The quantized layers that each of ``names`` (initializers) feeds, in an ONNX ``ModelProto``.

    A tensor feeds a quantized layer when it reaches a ``QuantizeLinear`` (its values would be quantized with
    scales calibrated for the old weights) or a node one of whose other inputs comes from a
    ``DequantizeLinear`` (an INT8 layer), possibly through Transpose/Reshape/Cast/Identity. Layers kept float
    (``--int8-keep-float``) have no Q/DQ around them and are not reported.
    """
    consumers: dict[str, list] = {}
    producers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
        for o in n.output:
            producers[o] = n
    passthrough = {"Transpose", "Reshape", "Cast", "Identity", "Unsqueeze", "Squeeze", "Flatten"}
    out: dict[str, list[str]] = {}
    for name in names:
        hits, frontier, seen = [], [name], set()
        while frontier:
            t = frontier.pop()
            for n in consumers.get(t, []):
                if id(n) in seen:
                    continue
                seen.add(id(n))
                if n.op_type == "QuantizeLinear":
                    hits.append(n.name or n.op_type)
                elif n.op_type in passthrough:
                    frontier.extend(n.output)
                elif any(i != t and getattr(producers.get(i), "op_type", None) == "DequantizeLinear" for i in n.input):
                    hits.append(n.name or n.op_type)
        if hits:
            out[name] = hits
    return out


def plan_build(meta, trt_version: str, options: EngineOptions | None = None, *, device_cc: tuple[int, int] | None = None,
               jetson: bool = False, quantized: dict[str, list[str]] | None = None) -> BuildPlan:
    """Plan a strongly typed TensorRT build of an atexport ONNX model.

    Args:
        meta: the model's :class:`~atexport.artifact.metadata.ModelMetadata` (input shape, precision, manifest).
        trt_version: the TensorRT version that will build (``tensorrt.__version__``).
        options: the :class:`EngineOptions` (default: all defaults); ``options.timing_cache`` must already be
            a path or ``False`` (the stage fills in the default).
        device_cc: compute capability of the building GPU, if known (checked for hardware compatibility).
        jetson: the build runs on a Jetson (aarch64 with Tegra), where hardware compatibility does not exist.
        quantized: for an INT8 refit build, :func:`quantized_consumers` of the swappable tensors (``None``: not
            checked; the sidecar then says so and a refit checks the ONNX model itself).

    Raises:
        MissingDependencyError: a TensorRT version atexport does not support.
        BadInputError: options that contradict each other, the model, the TensorRT version or the platform.
    """
    opts = options or EngineOptions()
    major, minor, _ = parse_version(trt_version)
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
    _plan_typing(plan, major, precision)
    _plan_profiles(plan, meta, opts)
    if opts.workspace_gb is not None:
        plan.workspace_bytes = int(float(opts.workspace_gb) * (1 << 30))
    if opts.optimization_level is not None:
        plan.optimization_level = int(opts.optimization_level)
    if opts.refit:
        _plan_refit(plan, meta, (major, minor), quantized)
    if opts.version_compatible:
        plan.builder_flags.append("VERSION_COMPATIBLE")
        plan.engine_host_code_allowed = True
        plan.notes.append("version compatible: runs on later TensorRT runtimes (runtime.engine_host_code_allowed).")
    _plan_hardware(plan, opts.hardware_level, trt_version, (major, minor), device_cc, jetson)
    if opts.timing_cache not in (None, False):
        plan.timing_cache = str(opts.timing_cache)
    return plan


def _plan_typing(plan: BuildPlan, major: int, precision: str) -> None:
    """Strong typing: the precision is the ONNX model's."""
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


def _plan_profiles(plan: BuildPlan, meta, opts: EngineOptions) -> None:
    """Optimisation profile for the batch axis, on every batch-aligned input."""
    shape = list(meta.input["shape"])
    check_batch_for_model(meta, opts.batch)
    if isinstance(shape[0], int):
        lo = opt = hi = int(shape[0])
    else:
        lo, opt, hi = parse_batch_range(opts.batch)
    for name, rest in batch_inputs(meta):
        plan.profiles.append(Profile(input=name, min=[lo, *rest], opt=[opt, *rest], max=[hi, *rest]))
    if meta.tasks:
        plan.notes.append(f"multi-task model ({len(meta.tasks)} tasks): the profile covers the image and "
                          f"{plan.profiles[-1].input}; the bank tensors are weights.")


def _plan_refit(plan: BuildPlan, meta, version: tuple[int, int], quantized) -> None:
    """Refittable adapter and head weights (REFIT_INDIVIDUAL, or REFIT before TensorRT 10.2)."""
    major, minor = version
    precision = plan.precision
    check_refit_for_model(meta)
    names = [str(e.get("initializer", k)) for k, e in meta.manifest.items()]
    if precision == "int8" and not meta.tasks and quantized:
        detail = "; ".join(f"{n} -> {', '.join(v[:3])}" for n, v in list(quantized.items())[:4])
        raise BadInputError(
            f"--refit: this INT8 model's swappable tensors feed quantized layers ({detail}); their INT8 scales "
            "were calibrated for this task's weights, so a refit with another task's weights would be wrong. "
            "Make the INT8 model with those layers kept float (--int8-keep-float 'head,*.adapter.*'), or build "
            "an FP16 engine to refit."
        )
    plan.int8_refit_checked = precision == "int8" and quantized is not None
    if (major, minor) >= REFIT_INDIVIDUAL_SINCE:
        plan.builder_flags.append("REFIT_INDIVIDUAL")
        plan.notes.append("refit: REFIT_INDIVIDUAL with the manifest's adapter and head weights marked refittable; "
                          "the frozen backbone stays constant-folded.")
    else:
        plan.builder_flags.append("REFIT")
        plan.notes.append(f"refit: TensorRT {major}.{minor} has no REFIT_INDIVIDUAL/mark_weights_refittable "
                          "(they came in 10.2), so BuilderFlag.REFIT makes every weight refittable (a slower "
                          "engine); install TensorRT 10.2 or newer for adapter-only refit.")
    plan.refittable_weights = names


def _plan_hardware(plan: BuildPlan, level: str | None, trt_version: str, version: tuple[int, int],
                   device_cc: tuple[int, int] | None, jetson: bool) -> None:
    """Hardware compatibility (``--hardware-compatible``), refused where TensorRT or the platform lacks it."""
    if level in (None, "none"):
        return
    if jetson:
        raise BadInputError(
            "--hardware-compatible: TensorRT has no hardware compatibility on Jetson (aarch64 with Tegra); "
            "build the engine on the Jetson model that runs it, without --hardware-compatible."
        )
    if level == "same_compute_capability" and version < SAME_CC_SINCE:
        raise BadInputError(
            f"--hardware-compatible same_compute_capability needs TensorRT 10.9 or newer "
            f"(HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY); this is {trt_version}. Use ampere_plus or "
            "upgrade TensorRT."
        )
    if level == "ampere_plus" and device_cc is not None and tuple(device_cc) < (8, 0):
        raise BadInputError(
            f"--hardware-compatible needs an Ampere or newer GPU (compute capability 8.0+) to build on; "
            f"this one is {device_cc[0]}.{device_cc[1]}."
        )
    plan.hardware_compatibility = level.upper()


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


def is_jetson(root: str = "/") -> bool:
    """This machine is a Jetson: aarch64 with NVIDIA Tegra (``/etc/nv_tegra_release`` or a Tegra device tree)."""
    import platform

    if platform.machine() not in ("aarch64", "arm64"):
        return False
    r = Path(root)
    if (r / "etc/nv_tegra_release").is_file():
        return True
    try:
        compat = (r / "proc/device-tree/compatible").read_bytes().decode(errors="replace").lower()
    except OSError:
        return False
    return "tegra" in compat


def default_timing_cache(engine_path: str | os.PathLike, trt_version: str, device: dict | None) -> Path:
    """A timing cache per TensorRT version, compute capability and GPU model, beside the engine.

    TensorRT refuses a cache from another device (its header records the device), so the GPU's name is in the
    file name too: two GPUs of one architecture (an A10 and an A40) get separate caches.
    """
    device = device or {}
    cc = device.get("compute_capability")
    sm = f"sm{cc[0]}{cc[1]}" if cc and len(cc) == 2 else "sm-unknown"
    name = re.sub(r"[^A-Za-z0-9]+", "-", str(device.get("name") or "gpu")).strip("-").lower() or "gpu"
    return Path(engine_path).with_name(f".atexport-timing-trt{trt_version}-{sm}-{name}.cache")


def engine_sidecar(meta, plan: BuildPlan, *, device: dict, engine_path: str | os.PathLike, engine_sha256: str,
                   engine_bytes: int, onnx_path: str | os.PathLike | None, onnx_sha256: str | None,
                   parity: list | None = None, seconds: dict | None = None) -> dict:
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
    cc = list(device.get("compute_capability") or [])
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
        "metadata": asdict(meta),
        "parity": [r.to_dict() if hasattr(r, "to_dict") else r for r in (parity or [])],
        "seconds": seconds or {},
    }


def describe_plan(plan: BuildPlan) -> str:
    """A few lines for the terminal."""
    typed = "strongly typed" if plan.major >= 11 or "STRONGLY_TYPED" in plan.network_flags else "weakly typed"
    lines = [f"tensorrt:   {plan.tensorrt} ({typed})", f"precision:  {plan.precision} (from the ONNX model)"]
    for i, p in enumerate(plan.profiles):
        lines.append(f"{'profile:' if i == 0 else '':<12}{p.input} min {p.min} opt {p.opt} max {p.max}")
    flags = plan.builder_flags + [f"-{f}" for f in plan.clear_flags]
    lines.append(f"flags:      network {plan.network_flags or '[]'}, builder {flags or '[]'}")
    if plan.workspace_bytes:
        lines.append(f"workspace:  {plan.workspace_bytes / (1 << 30):g} GiB")
    if plan.refittable:
        how = "all weights refittable (BuilderFlag.REFIT)" if "REFIT" in plan.builder_flags else "marked refittable"
        lines.append(f"refit:      {len(plan.refittable_weights)} adapter/head weights, {how}")
    if plan.hardware_compatibility:
        lines.append(f"hardware:   {plan.hardware_compatibility}")
    if plan.timing_cache:
        lines.append(f"cache:      timing cache {plan.timing_cache}")
    return "\n".join(lines)

