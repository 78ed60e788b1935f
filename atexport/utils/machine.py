"""A description of the machine a number was measured on: CPU (model and the ISA flags that matter for
inference), memory, GPUs, library versions. Benchmarks, verify reports and bench/RESULTS.md quote it.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

# The CPU features that decide which kernels ONNX Runtime, OpenVINO and PyTorch can use.
INFERENCE_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
                   "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve")


def cpu_flags(wanted: Sequence[str] = INFERENCE_FLAGS) -> list[str]:
    """The inference-relevant ISA flags of this CPU (from /proc/cpuinfo; empty where it is not readable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def has_amx() -> bool:
    """Whether the CPU has AMX tiles with BF16 (fast BF16 matrix multiplies in PyTorch and OpenVINO)."""
    flags = cpu_flags()
    return "amx_bf16" in flags and "amx_tile" in flags


_LIBRARIES = ("atexport", "numpy", "pillow", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "torch", "timm",
              "tensorrt")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() or platform.processor()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def available_memory_bytes() -> int | None:
    """Memory the OS can give this process now (``MemAvailable``), or ``None`` where it cannot tell."""
    import os

    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(need: int, what: str, fix: str) -> None:
    """Refuse, before allocating, work that needs more memory than this machine has available.

    Args:
        need: bytes the work needs (an estimate, from the sizes the user gave).
        what: what needs it, e.g. ``"--batch 1000000"``.
        fix: what to do instead, e.g. ``"use a smaller --batch"``.

    Raises:
        BadInputError: ``need`` exceeds the available memory; the message gives both numbers.
    """
    from atexport.errors import BadInputError

    have = available_memory_bytes()
    if have is not None and need > have:
        raise BadInputError(f"{what} needs about {format_bytes(need)} of memory, but this machine has "
                            f"{format_bytes(have)} available; {fix}.")


def format_bytes(n: float) -> str:
    """``1.5 GB``, ``320 MB``, ``2.1e+06 TB`` for sizes beyond any machine."""
    for unit, size in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20)):
        if n >= size:
            v = n / size
            return f"{v:.3g} {unit}" if v < 1e6 else f"{v:.2e} {unit}"
    return f"{int(n)} bytes"


def _memory_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def _gpus() -> list[dict]:
    """GPUs from nvidia-smi (no CUDA library is loaded); Jetson boards report through /proc/device-tree."""
    out = []
    try:
        res = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10,
        )
        for line in res.stdout.strip().splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 3:
                out.append({"name": parts[0], "memory_mb": parts[1], "driver": parts[2]})
    except (OSError, subprocess.SubprocessError):
        pass
    if not out and Path("/proc/device-tree/model").is_file():
        model = Path("/proc/device-tree/model").read_text(errors="replace").strip("\x00 \n")
        if "jetson" in model.lower() or "nvidia" in model.lower():
            out.append({"name": model})
    return out


def library_versions(names: Sequence[str] = _LIBRARIES) -> dict[str, str]:
    """Installed versions (from package metadata: nothing is imported)."""
    import importlib.metadata as md

    out = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    for dist in ("tensorrt-cu13", "tensorrt-cu12", "tensorrt_cu13", "tensorrt_cu12"):
        if "tensorrt" not in out:
            try:
                out["tensorrt"] = md.version(dist)
            except md.PackageNotFoundError:
                continue
    return out


def _cuda_backend() -> dict | None:
    """The CUDA backend the TensorRT runner used in this process (cuda-python or ctypes), if it ran.

    Read from :mod:`atexport.runtime.cuda` only when something already imported it (nothing is loaded here).
    """
    mod = sys.modules.get("atexport.runtime.cuda")
    return mod.backend_info() if mod is not None else None


def describe_machine() -> dict:
    """CPU model, cores, memory, GPUs, OS, Python and library versions, date: what a figure needs beside it."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "cores_usable": affinity,
        "memory_gb": _memory_gb(),
        "gpus": _gpus(),
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "python": platform.python_version(),
        "libraries": library_versions(),
        "cuda_backend": _cuda_backend(),
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
    }


def machine_line(m: Mapping) -> str:
    """One line for terminals and reports."""
    gpus = ", ".join(g.get("name", "?") for g in m.get("gpus") or []) or "no GPU"
    libs = ", ".join(f"{k} {v}" for k, v in (m.get("libraries") or {}).items())
    mem = f", {m['memory_gb']} GB" if m.get("memory_gb") else ""
    flags = f", {' '.join(m['cpu_flags'])}" if m.get("cpu_flags") else ""
    cb = m.get("cuda_backend") or {}
    if cb:
        gpus += f" (CUDA via {cb.get('backend')}: {cb.get('source')})"
    return (f"{m.get('cpu')} ({m.get('cores_usable')} of {m.get('cores')} cores{mem}{flags}), {gpus}; "
            f"Python {m.get('python')}; {libs}")

