"""PyTorch runner: the reference every exported artifact is compared against."""

from __future__ import annotations

import numpy as np

from atexport.runtime.base import Runner


class TorchRunner(Runner):
    """Runs a ``torch.nn.Module`` in eval mode under ``torch.inference_mode``.

    Args:
        model: the module (moved to ``device`` on activation).
        device: ``"cpu"`` or ``"cuda"``.
        dtype: autocast dtype for mixed precision on CUDA, or None for FP32.
    """

    def __init__(self, model, device: str = "cpu", dtype=None, name: str = "pytorch"):
        super().__init__()
        self.model, self.device, self.dtype, self.name = model, device, dtype, name

    def _activate(self):
        self.model = self.model.to(self.device).eval()

    def _infer(self, batch, **feeds):
        import torch

        x = torch.from_numpy(batch).to(self.device)
        extra = {k: torch.as_tensor(v, device=self.device) for k, v in feeds.items()}
        with torch.inference_mode():
            if self.dtype is not None:
                with torch.autocast(self.device, dtype=self.dtype):
                    out = self.model(x, **extra)
            else:
                out = self.model(x, **extra)
        return out.float().cpu().numpy().astype(np.float32)
