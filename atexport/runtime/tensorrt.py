"""TensorRT runner: runs an atexport engine behind the common :class:`~atexport.runtime.base.Runner` interface.

Activation checks the engine's sidecar against this machine (TensorRT version, GPU compute capability;
a mismatch stops with the command that rebuilds it here), deserializes the engine and creates an
execution context; :meth:`infer` uses TensorRT's I/O tensor API (``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``), identical on TensorRT 10.x and 11.x. GPU memory comes
from torch (CUDA tensors); tensorrt and torch are imported on activation only.
"""

from __future__ import annotations

import numpy as np

from atexport.errors import BadInputError, MissingDependencyError
from atexport.runtime.base import Runner


class TensorRTRunner(Runner):
    """``with TensorRTRunner("model.engine") as r: logits = r.infer(batch)``.

    Args:
        engine: path of an engine written by ``atexport trt`` (its ``.json`` sidecar beside it).
        device: CUDA device index.
        name: label used in reports.
    """

    def __init__(self, engine, device: int = 0, name: str = "tensorrt", log=None):
        super().__init__()
        self.engine_path, self.device, self.name, self.log = engine, int(device), name, log
        self.engine = self.context = self.sidecar = None

    def _activate(self):
        from atexport.export.tensorrt import load_engine

        try:
            import torch
        except ImportError:
            raise MissingDependencyError(
                "torch is not installed; the TensorRT runner uses it for GPU memory. Install it with: "
                "pip install 'atexport[torch]'."
            ) from None
        self._torch = torch
        self.trt, self.runtime, self.engine, self.sidecar = load_engine(self.engine_path, log=self.log)
        trt = self.trt
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(self.inputs) != 1 or not self.outputs:
            raise BadInputError(f"{self.engine_path}: expected one image input, got inputs {self.inputs}.")
        self.stream = torch.cuda.Stream(device=self.device)

    def _deactivate(self):
        self.context = self.engine = self.runtime = None

    def _torch_dtype(self, name):
        np_dtype = np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))
        return {np.dtype(np.float32): self._torch.float32, np.dtype(np.float16): self._torch.float16,
                np.dtype(np.int32): self._torch.int32, np.dtype(np.int64): self._torch.int64}[np_dtype]

    def _infer(self, batch, **feeds):
        if feeds:
            raise BadInputError(
                f"the TensorRT engine takes only the image batch (got extra inputs {sorted(feeds)}); swap tasks "
                "with 'atexport swap --engine' (refit) instead."
            )
        torch = self._torch
        name = self.inputs[0]
        dev = torch.device("cuda", self.device)
        x = torch.from_numpy(batch).to(dev, dtype=self._torch_dtype(name)).contiguous()
        if not self.context.set_input_shape(name, tuple(x.shape)):
            prof = (self.sidecar.get("profiles") or [{}])[0]
            raise BadInputError(
                f"{self.engine_path}: input shape {tuple(x.shape)} is outside the engine's profile "
                f"(min {prof.get('min')}, max {prof.get('max')}); rebuild with a wider --batch range."
            )
        self.context.set_tensor_address(name, x.data_ptr())
        outs = {}
        for o in self.outputs:
            shape = tuple(self.context.get_tensor_shape(o))
            outs[o] = torch.empty(shape, dtype=self._torch_dtype(o), device=dev)
            self.context.set_tensor_address(o, outs[o].data_ptr())
        with torch.cuda.stream(self.stream):
            torch.cuda.current_stream(dev).wait_stream(torch.cuda.default_stream(dev))
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise BadInputError(f"{self.engine_path}: TensorRT execution failed.")
        self.stream.synchronize()
        return outs[self.outputs[0]].float().cpu().numpy().astype(np.float32)
