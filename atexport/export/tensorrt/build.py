"""Building a TensorRT engine: replay a :class:`~atexport.export.tensorrt.plan.BuildPlan`, keep a timing cache.

The TensorRT Python API used here is the same on 10.x and 11.x:

* ``trt.Builder(logger)``, ``builder.create_network(flags)`` (``1 << int(NetworkDefinitionCreationFlag.X)``),
  ``trt.OnnxParser(network, logger).parse_from_file(path)`` with ``num_errors``/``get_error(i)``;
* ``builder.create_builder_config()``, ``config.set_memory_pool_limit(MemoryPoolType.WORKSPACE, n)``,
  ``config.set_flag``/``clear_flag(BuilderFlag.X)``, ``config.hardware_compatibility_level``,
  ``config.builder_optimization_level``;
* ``builder.create_optimization_profile()``, ``profile.set_shape(name, min, opt, max)``,
  ``config.add_optimization_profile(profile)``;
* ``config.create_timing_cache(bytes)``, ``config.set_timing_cache(cache, ignore_mismatch=False)`` (returns
  ``False`` for a cache from another device or version), ``config.get_timing_cache()`` (may be ``None``,
  as Polygraphy's loader allows for) and ``.serialize()``;
* ``network.mark_weights_refittable(name)`` (with ``BuilderFlag.REFIT_INDIVIDUAL``, TensorRT 10.2+);
* ``builder.build_serialized_network(network, config)`` (``None`` on failure).

The engine is written before the timing cache is saved, and nothing about the cache can lose a built engine:
a cache TensorRT refuses is replaced by a fresh one with one warning.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from atexport.artifact.sidecar import sidecar_path
from atexport.errors import AtexportError
from atexport.export.tensorrt.plan import BuildPlan, engine_sidecar
from atexport.runtime.tensorrt import _Logger, require_tensorrt


@dataclass
class BuildResult:
    """What :func:`build_engine` produced."""

    path: Path
    sidecar_path: Path
    sidecar: dict
    plan: BuildPlan
    seconds: dict = field(default_factory=dict)
    parity: list = field(default_factory=list)
    warnings: list = field(default_factory=list)


def attach_timing_cache(config, path: str | os.PathLike | None, say) -> Path | None:
    """Give ``config`` the timing cache in ``path`` (a fresh one when missing, unreadable or refused).

    TensorRT refuses (``set_timing_cache`` returns ``False``) a cache written on another device or TensorRT
    version; that is worth one warning, not a failed build. Returns the path to save the cache to after the
    build, or ``None`` when no cache could be attached at all.
    """
    if path is None:
        return None
    path = Path(path)
    data = b""
    if path.is_file():
        try:
            data = path.read_bytes()
        except OSError as e:
            say(f"warning: cannot read the timing cache {path} ({e}); starting a fresh one.")
    cache = config.create_timing_cache(data) if data else None
    if data and (cache is None or not config.set_timing_cache(cache, ignore_mismatch=False)):
        say(f"warning: TensorRT refused the timing cache {path} (made on another GPU, driver or TensorRT version?); "
            "starting a fresh one, which this build will overwrite it with.")
        data = b""
    if not data:
        cache = config.create_timing_cache(b"")
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            say(f"warning: TensorRT could not create a timing cache; building without one ({path} is not written).")
            return None
        say(f"timing cache: creating {path}")
    else:
        say(f"timing cache: reusing {path}")
    return path


def save_timing_cache(config, path: Path | None, say) -> bool:
    """Write ``config``'s timing cache to ``path`` atomically; a warning, never an error, when it cannot."""
    from atexport.utils.io import atomic_write_bytes

    if path is None:
        return False
    try:
        cache = config.get_timing_cache()
        if cache is None:  # Polygraphy guards the same way
            say(f"warning: TensorRT returned no timing cache after the build; {path} is not updated.")
            return False
        data = bytes(cache.serialize())
        if not data:
            say(f"warning: the timing cache is empty; {path} is not updated.")
            return False
        atomic_write_bytes(path, data)
        return True
    except Exception as e:  # noqa: BLE001 - the engine is already written; the cache is only a speed-up
        say(f"warning: could not save the timing cache {path} ({type(e).__name__}: {e}); the engine is fine.")
        return False


def build_engine(onnx_path: str | os.PathLike, output: str | os.PathLike, plan: BuildPlan, *, meta=None,
                 log=None) -> BuildResult:
    """Build a serialized engine from exactly ``onnx_path`` following ``plan``; write it and its sidecar.

    Args:
        onnx_path: the (precision) ONNX model.
        output: engine path; the sidecar goes to ``<output>.json``.
        plan: from :func:`~atexport.export.tensorrt.plan.plan_build`.
        meta: the model's metadata (read from ``onnx_path`` when omitted).
        log: optional callable receiving progress lines.
    """
    from hashlib import sha256

    from atexport.utils.io import atomic_write_bytes, atomic_write_json, check_writable, sha256_file

    warnings: list[str] = []

    def say(line: str) -> None:
        if line.startswith("warning:"):
            warnings.append(line)
        if log:
            log(line)

    trt, device = require_tensorrt()
    output = check_writable(output, "-o")
    if meta is None:
        from atexport.artifact.onnx import read_onnx_model

        _, meta = read_onnx_model(onnx_path)
    logger = _Logger(trt)
    t0 = time.perf_counter()
    builder = trt.Builder(logger)
    flags = 0
    for f in plan.network_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, f))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise AtexportError(f"TensorRT {plan.tensorrt}'s ONNX parser rejected {onnx_path}: {'; '.join(errs[:3])}.")
    config = builder.create_builder_config()
    if plan.workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(plan.workspace_bytes))
    for f in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, f))
    for f in plan.clear_flags:
        config.clear_flag(getattr(trt.BuilderFlag, f))
    if plan.hardware_compatibility:
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, plan.hardware_compatibility)
    if plan.optimization_level is not None:
        config.builder_optimization_level = int(plan.optimization_level)
    profile = builder.create_optimization_profile()
    for p in plan.profiles:
        profile.set_shape(p.input, tuple(p.min), tuple(p.opt), tuple(p.max))
    config.add_optimization_profile(profile)
    if "REFIT_INDIVIDUAL" in plan.builder_flags:
        for name in plan.refittable_weights:
            if not network.mark_weights_refittable(name):
                raise AtexportError(f"TensorRT cannot mark {name} refittable: it is not a weight of the parsed network.")
    cache_path = attach_timing_cache(config, plan.timing_cache, say)
    say(f"building the {plan.precision} engine (TensorRT {plan.tensorrt}, {device['name']}) ...")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise AtexportError(
            f"TensorRT {plan.tensorrt} could not build the engine: {'; '.join(logger.errors[-3:]) or 'see the log above'}."
        )
    engine_bytes = bytes(serialized)
    seconds = {"build": time.perf_counter() - t0}
    atomic_write_bytes(output, engine_bytes)  # the engine first: the cache below can only warn
    save_timing_cache(config, cache_path, say)
    sidecar = engine_sidecar(
        meta, plan, device=device, engine_path=output, engine_sha256=sha256(engine_bytes).hexdigest(),
        engine_bytes=len(engine_bytes), onnx_path=Path(onnx_path).resolve(), onnx_sha256=sha256_file(onnx_path),
        seconds=seconds,
    )
    side = atomic_write_json(sidecar_path(output), sidecar)
    return BuildResult(path=Path(output), sidecar_path=side, sidecar=sidecar, plan=plan, seconds=seconds,
                       warnings=warnings)
