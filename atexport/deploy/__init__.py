"""Deployment targets: a Triton Inference Server model repository (:mod:`atexport.deploy.triton`).

The Jetson path needs no code of its own: the ONNX model is made anywhere, the engine is built on the
Jetson with ``atexport trt`` (JetPack's TensorRT), and the engine's sidecar check refuses an engine
built elsewhere; see ``docs/deploy.md``.
"""

from atexport.deploy.triton import (TritonOptions, TritonRepo, parse_pbtxt, read_triton_config, validate_triton_repo,
                                    write_triton_repo)

__all__ = ["TritonOptions", "TritonRepo", "parse_pbtxt", "read_triton_config", "validate_triton_repo",
           "write_triton_repo"]
