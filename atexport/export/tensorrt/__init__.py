"""TensorRT engines from atexport ONNX models: plan, build, refit, verify, and the ``atexport trt`` stage.

One module per subject:

* :mod:`~atexport.export.tensorrt.plan`: what a build will do, decided without TensorRT (flags per
  version, optimisation profile, options, the sidecar written beside the engine); pure Python.
* :mod:`~atexport.export.tensorrt.build`: :func:`build_engine` replays a plan through TensorRT, with a
  timing cache that can never cost a built engine.
* :mod:`~atexport.export.tensorrt.refit`: :func:`refit_engine` puts another task's weights in a refittable
  engine and checks it against the swapped ONNX model.
* :mod:`~atexport.export.tensorrt.verify`: :func:`verify_engine`, the parity check after every build and refit.
* :mod:`~atexport.export.tensorrt.stage`: :func:`export_tensorrt`, the ``atexport trt`` command as a function.

Reading and checking sidecars lives in :mod:`atexport.artifact.sidecar`, loading and running engines in
:mod:`atexport.runtime.tensorrt`. Importing this package imports neither TensorRT nor onnx nor torch.
"""

from atexport.export.tensorrt.build import BuildResult, build_engine
from atexport.export.tensorrt.plan import (BuildPlan, EngineOptions, Profile, batch_inputs, default_timing_cache,
                                           describe_plan, engine_sidecar, parse_batch_range, plan_build)
from atexport.export.tensorrt.refit import RefitResult, refit_engine
from atexport.export.tensorrt.stage import Int8Options, TrtExportResult, export_tensorrt
from atexport.export.tensorrt.verify import verify_engine

__all__ = [
    "BuildPlan",
    "BuildResult",
    "EngineOptions",
    "Int8Options",
    "Profile",
    "RefitResult",
    "TrtExportResult",
    "batch_inputs",
    "build_engine",
    "default_timing_cache",
    "describe_plan",
    "engine_sidecar",
    "export_tensorrt",
    "parse_batch_range",
    "plan_build",
    "refit_engine",
    "verify_engine",
]
