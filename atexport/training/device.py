"""Where training runs: device, mixed precision and torchrun's DistributedDataParallel.

One process per GPU under ``torchrun`` (``LOCAL_RANK``, ``RANK``, ``WORLD_SIZE`` in the environment),
one process otherwise. Mixed precision is CUDA autocast in bf16 where the GPU supports it, else fp16
with a gradient scaler; on CPU training runs in fp32 unless ``--amp bf16`` is asked for.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

from atexport.errors import BadInputError, MissingDependencyError


@dataclass
class Env:
    """The resolved execution environment of a training process."""

    device: Any  # torch.device
    amp_dtype: Any  # torch.dtype or None
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_process_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def amp_name(self) -> str:
        import torch

        return {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    def autocast(self):
        import torch

        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self):
        """A GradScaler for fp16 (bf16 and fp32 need none)."""
        import torch

        if self.amp_dtype is torch.float16:
            return torch.amp.GradScaler(self.device.type)
        return None

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum numbers over processes (identity in a single process)."""
        if not self.distributed:
            return list(values)
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self.owns_process_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_process_group = False


def is_main_process() -> bool:
    """Whether this is the process that writes files and prints (rank 0 of a torchrun job, or alone)."""
    return int(os.environ.get("RANK", "0")) == 0


def setup_env(device: str = "auto", amp: str = "auto") -> Env:
    """Resolve the device and AMP mode; join torchrun's process group when ``WORLD_SIZE`` > 1."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if device.startswith("cuda") and not cuda:
        raise MissingDependencyError(
            f"--device {device}: no CUDA device is visible to PyTorch (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda or 'none'}); use --device cpu, or install a CUDA build of torch."
        )
    use_cuda = cuda if device == "auto" else device.startswith("cuda")
    owns = False
    if world > 1:
        import torch.distributed as dist

        if use_cuda:
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
        else:
            dev = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
            owns = True
    elif use_cuda:
        dev = torch.device(device if ":" in device else "cuda")
    else:
        dev = torch.device("cpu")
    return Env(dev, _amp_dtype(amp, dev), rank, world, local_rank, owns)


def _amp_dtype(amp: str, dev):
    import torch

    if amp == "off":
        return None
    if dev.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if amp == "auto":
            return torch.bfloat16 if bf16_ok else torch.float16
        if amp == "bf16":
            if not bf16_ok:
                raise BadInputError("--amp bf16: this GPU does not support bfloat16; use --amp fp16 or off.")
            return torch.bfloat16
        return torch.float16
    # CPU: fp32 by default; bf16 autocast on request; fp16 autocast is a CUDA feature.
    if amp == "auto":
        return None
    if amp == "fp16":
        raise BadInputError("--amp fp16 needs CUDA; on CPU use --amp bf16 or --amp off.")
    return torch.bfloat16
