"""A tiny CUDA runtime wrapper for the TensorRT runner: device memory, copies, streams, device facts.

The TensorRT runner needs a handful of CUDA runtime calls (``cudaMalloc``, ``cudaFree``,
``cudaMemcpyAsync``, ``cudaStreamCreate``/``Synchronize``/``Destroy``, ``cudaGetErrorString``, and the
device's name and compute capability for the engine's sidecar check). They come from cuda-python's
runtime bindings when importable (``cuda.bindings.runtime``, or ``cuda.cudart`` in releases before 12.6),
else straight from the CUDA runtime library through ctypes, found the way Polygraphy's
``polygraphy/cuda/cuda.py`` finds it: ``libcudart.so*`` in ``LD_LIBRARY_PATH``, ``/usr/local/cuda/lib64``,
``/usr/lib`` and ``/lib`` (here also ``$CUDA_HOME``, the multiarch folders and the ``nvidia`` pip wheels that
TensorRT's wheels install), then the loader's default path. So the runtime never needs torch, and a
Jetson app needs only JetPack.

:func:`cuda_runtime` takes the first backend that finds a GPU (a cuda-python that reports "insufficient
driver", as cuda-bindings 13.x does on a CUDA 12 driver, falls back to ctypes) and records which one it
used (:func:`backend_info`). Without either, or without a usable GPU, it raises one
:class:`~atexport.errors.MissingDependencyError` sentence.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from atexport.errors import AtexportError, MissingDependencyError

MEMCPY_HOST_TO_DEVICE = 1
MEMCPY_DEVICE_TO_HOST = 2
ATTR_CC_MAJOR = 75  # cudaDevAttrComputeCapabilityMajor
ATTR_CC_MINOR = 76  # cudaDevAttrComputeCapabilityMinor
_PROPS_BYTES = 16384  # larger than cudaDeviceProp in every CUDA release; its first field is char name[256]


class NoCudaDevice(MissingDependencyError):
    """The CUDA runtime loads but reports no usable GPU (no device, no driver, driver too old)."""


def _missing_sentence(searched: Sequence[str], default_path: bool = True) -> str:
    where = ", ".join(searched) if searched else "no folders"
    where += " and the loader's default path" if default_path else ""
    return (
        "neither cuda-python nor the CUDA runtime library (libcudart.so*) was found (searched "
        f"{where}); the TensorRT runner needs one of them to move data to and from "
        "the GPU. Install TensorRT with pip install 'atexport[tensorrt]' (its wheels bring the CUDA runtime; "
        "on Jetson JetPack does), or: pip install cuda-python."
    )


def search_dirs(environ: dict | None = None) -> list[str]:
    """Folders searched for ``libcudart.so*``, in order (Polygraphy's list, then CUDA_HOME, multiarch, pip)."""
    env = os.environ if environ is None else environ
    dirs = [d for d in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if d]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            dirs += [os.path.join(env[var], "lib64"), os.path.join(env[var], "lib")]
    dirs += ["/usr/local/cuda/lib64", "/usr/local/cuda/lib", "/usr/lib", "/lib"]
    dirs += sorted(glob.glob("/usr/lib/*-linux-gnu")) + sorted(glob.glob("/usr/local/cuda-*/lib64"))
    dirs += sorted(glob.glob("/usr/local/cuda-*/lib"))
    try:  # nvidia-cuda-runtime wheels: nvidia/cuda_runtime/lib (CUDA 12), nvidia/cu13/lib (CUDA 13)
        import importlib.util

        spec = importlib.util.find_spec("nvidia")
        for root in (spec.submodule_search_locations or []) if spec else []:
            dirs += sorted(glob.glob(os.path.join(root, "*", "lib")))
    except (ImportError, ValueError):
        pass
    return list(dict.fromkeys(dirs))


def find_cudart(dirs: Sequence[str] | None = None) -> list[str]:
    """Candidate CUDA runtime libraries in ``dirs`` (default :func:`search_dirs`), most specific name first."""
    pattern = "cudart64_*.dll" if sys.platform.startswith("win") else "libcudart.so*"
    found = []
    for d in search_dirs() if dirs is None else dirs:
        # libcudart.so.13.0.96 before libcudart.so.13 before libcudart.so (a dev symlink that may dangle)
        found += sorted(glob.glob(os.path.join(d, pattern)), key=lambda p: (-len(Path(p).name), p))
    return [p for p in dict.fromkeys(found) if os.path.exists(p)]


def load_cudart(dirs: Sequence[str] | None = None, fallback: str | None = "default") -> tuple[ctypes.CDLL, str]:
    """Load the CUDA runtime library: the first candidate that loads, else the loader's default.

    Args:
        dirs: folders to search (default :func:`search_dirs`).
        fallback: ``"default"`` tries ``ctypes.util.find_library("cudart")`` and ``libcudart.so``;
            ``None`` tries nothing else.

    Raises:
        MissingDependencyError: nothing loads (one sentence naming the folders searched).
    """
    dirs = search_dirs() if dirs is None else list(dirs)
    names = find_cudart(dirs)
    if fallback == "default":
        names += [n for n in (ctypes.util.find_library("cudart"), "libcudart.so") if n]
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            lib.cudaMalloc  # noqa: B018 - a library without it is not the CUDA runtime
            return lib, name
        except (OSError, AttributeError):
            continue
    raise MissingDependencyError(_missing_sentence(dirs, fallback == "default"))


class CudaRuntime:
    """The CUDA runtime calls the TensorRT runner makes; pointers and streams are plain ints.

    Use :func:`cuda_runtime` to get the shared instance. ``kind`` is ``"cuda-python"`` or ``"ctypes"``.
    """

    kind = "?"
    source = "?"
    skipped: list = []

    # -- one call per backend
    def _call(self, name: str, *args):  # pragma: no cover - implemented by the backends
        raise NotImplementedError

    def error_string(self, code: int) -> str:  # pragma: no cover
        raise NotImplementedError

    def _fail(self, name: str, code: int):
        msg = self.error_string(code)
        if name in ("cudaGetDeviceCount", "cudaSetDevice") or code in (35, 100, 999):
            # insufficient driver, no device, unknown (no driver loaded)
            err = NoCudaDevice(
                f"no CUDA GPU is usable on this machine (CUDA runtime via {self.kind}: {msg}; {name} returned "
                f"error {code}); TensorRT engines need an NVIDIA GPU and its driver."
            )
            err.reason = f"{msg} ({name} error {code})"
            raise err
        raise AtexportError(f"CUDA {name} failed: {msg} (error {code}).")

    # -- the API
    def device_count(self) -> int:
        (n,) = self._call("cudaGetDeviceCount")
        return int(n)

    def set_device(self, index: int) -> None:
        self._call("cudaSetDevice", int(index))

    def device_info(self, index: int = 0) -> dict:
        """``{"name", "compute_capability": [major, minor], "index"}``; :class:`NoCudaDevice` without a GPU."""
        n = self.device_count()
        if n == 0:
            raise NoCudaDevice("no CUDA GPU is visible on this machine; TensorRT engines need an NVIDIA GPU and its driver.")
        if index >= n:
            raise NoCudaDevice(f"no CUDA GPU {index} on this machine ({n} visible); give a device index below {n}.")
        (major,) = self._call("cudaDeviceGetAttribute", ATTR_CC_MAJOR, int(index))
        (minor,) = self._call("cudaDeviceGetAttribute", ATTR_CC_MINOR, int(index))
        return {"name": self.device_name(index), "compute_capability": [int(major), int(minor)], "index": int(index)}

    def device_name(self, index: int) -> str:  # pragma: no cover - implemented by the backends
        raise NotImplementedError

    def malloc(self, nbytes: int) -> int:
        (ptr,) = self._call("cudaMalloc", max(int(nbytes), 1))
        return int(ptr)

    def free(self, ptr: int) -> None:
        if ptr:
            self._call("cudaFree", int(ptr))

    def copy_to_device(self, dst: int, host: np.ndarray, stream: int) -> None:
        """Enqueue ``host`` -> ``dst``; keep ``host`` alive until the stream is synchronized."""
        if host.nbytes:
            self._call("cudaMemcpyAsync", int(dst), int(host.ctypes.data), int(host.nbytes), MEMCPY_HOST_TO_DEVICE,
                       int(stream))

    def copy_to_host(self, host: np.ndarray, src: int, stream: int) -> None:
        """Enqueue ``src`` -> ``host`` (C-contiguous, ``host.nbytes`` bytes); read it after synchronizing."""
        if host.nbytes:
            self._call("cudaMemcpyAsync", int(host.ctypes.data), int(src), int(host.nbytes), MEMCPY_DEVICE_TO_HOST,
                       int(stream))

    def stream_create(self) -> int:
        (s,) = self._call("cudaStreamCreate")
        return int(s)

    def stream_synchronize(self, stream: int) -> None:
        self._call("cudaStreamSynchronize", int(stream))

    def stream_destroy(self, stream: int) -> None:
        if stream:
            self._call("cudaStreamDestroy", int(stream))


class CtypesRuntime(CudaRuntime):
    """The CUDA runtime library through ctypes (signatures from the CUDA Runtime API reference)."""

    kind = "ctypes"

    def __init__(self, lib: ctypes.CDLL, path: str):
        c = ctypes
        self.lib, self.source = lib, path
        sig = {
            "cudaGetDeviceCount": [c.POINTER(c.c_int)],
            "cudaSetDevice": [c.c_int],
            "cudaDeviceGetAttribute": [c.POINTER(c.c_int), c.c_int, c.c_int],
            "cudaMalloc": [c.POINTER(c.c_void_p), c.c_size_t],
            "cudaFree": [c.c_void_p],
            "cudaMemcpyAsync": [c.c_void_p, c.c_void_p, c.c_size_t, c.c_int, c.c_void_p],
            "cudaStreamCreate": [c.POINTER(c.c_void_p)],
            "cudaStreamSynchronize": [c.c_void_p],
            "cudaStreamDestroy": [c.c_void_p],
        }
        self._fn = {}
        for name, argtypes in sig.items():
            f = getattr(lib, name)
            f.argtypes, f.restype = argtypes, c.c_int
            self._fn[name] = f
        lib.cudaGetErrorString.argtypes, lib.cudaGetErrorString.restype = [c.c_int], c.c_char_p
        # CUDA 12 exports the current ABI as cudaGetDeviceProperties_v2; CUDA 11 and 13 as the plain name.
        self._props = getattr(lib, "cudaGetDeviceProperties_v2", None) or getattr(lib, "cudaGetDeviceProperties")
        self._props.argtypes, self._props.restype = [c.c_void_p, c.c_int], c.c_int

    def error_string(self, code: int) -> str:
        s = self.lib.cudaGetErrorString(int(code))
        return s.decode(errors="replace") if s else f"error {code}"

    def _call(self, name, *args):
        c = ctypes
        if name in ("cudaGetDeviceCount", "cudaDeviceGetAttribute"):
            out = c.c_int(0)
            code = self._fn[name](c.byref(out), *args)
        elif name in ("cudaMalloc", "cudaStreamCreate"):
            out = c.c_void_p(None)
            code = self._fn[name](c.byref(out), *args)
        else:
            out = None
            code = self._fn[name](*args)  # ints convert through argtypes (c_void_p, c_size_t, c_int)
        if code:
            self._fail(name, int(code))
        return () if out is None else (out.value or 0,)

    def device_name(self, index: int) -> str:
        buf = ctypes.create_string_buffer(_PROPS_BYTES)
        code = self._props(buf, int(index))
        if code:
            self._fail("cudaGetDeviceProperties", int(code))
        return buf.raw[:256].split(b"\0", 1)[0].decode(errors="replace")


class CudaPythonRuntime(CudaRuntime):
    """cuda-python's runtime bindings (every call returns ``(error, *results)``)."""

    kind = "cuda-python"

    def __init__(self, rt, source: str):
        self.rt, self.source = rt, source

    def error_string(self, code: int) -> str:
        try:
            err, s = self.rt.cudaGetErrorString(self.rt.cudaError_t(int(code)))
            return s.decode(errors="replace") if isinstance(s, bytes) else str(s)
        except Exception:
            return f"error {code}"

    def _call(self, name, *args):
        rt = self.rt
        if name == "cudaDeviceGetAttribute":
            out = rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr(args[0]), args[1])
        elif name == "cudaMemcpyAsync":
            dst, src, n, kind, stream = args
            out = rt.cudaMemcpyAsync(dst, src, n, rt.cudaMemcpyKind(kind), stream)
        else:
            out = getattr(rt, name)(*args)
        code = int(out[0])
        if code:
            self._fail(name, code)
        return tuple(int(v) for v in out[1:])

    def device_name(self, index: int) -> str:
        out = self.rt.cudaGetDeviceProperties(int(index))
        if int(out[0]):
            self._fail("cudaGetDeviceProperties", int(out[0]))
        name = out[1].name
        return name.split(b"\0", 1)[0].decode(errors="replace") if isinstance(name, bytes) else str(name)


def _cuda_python():
    try:
        from cuda.bindings import runtime as rt  # cuda-python >= 12.6

        return rt, "cuda.bindings.runtime"
    except ImportError:
        pass
    try:
        from cuda import cudart as rt  # older cuda-python

        return rt, "cuda.cudart"
    except ImportError:
        return None, None


_RUNTIME: CudaRuntime | None = None
BACKENDS = ("cuda-python", "ctypes")


def make_backend(kind: str) -> CudaRuntime:
    """One CUDA backend, loaded but not yet asked about devices.

    Raises:
        MissingDependencyError: that backend's library is not installed (one sentence).
    """
    if kind == "cuda-python":
        mod, source = _cuda_python()
        if mod is None:
            raise MissingDependencyError(
                "cuda-python is not installed; it is one way for the TensorRT runner to reach the GPU. "
                "Install it with: pip install cuda-python."
            )
        return CudaPythonRuntime(mod, source)
    if kind == "ctypes":
        return CtypesRuntime(*load_cudart())
    raise ValueError(f"unknown CUDA backend {kind!r}; expected one of {BACKENDS}")


def cuda_runtime(prefer: str | None = None) -> CudaRuntime:
    """The shared CUDA runtime wrapper: the first backend that finds a GPU.

    cuda-python is tried first, then ``libcudart`` through ctypes. A backend that loads but reports no
    usable device does not end the search: cuda-bindings 13.x on a machine whose driver only supports
    CUDA 12 answers "insufficient driver" while the CUDA 12 ``libcudart`` of TensorRT's wheels works. The
    backend used, and why the others were passed over, are in ``runtime.kind``, ``runtime.source`` and
    ``runtime.skipped`` (and in :func:`backend_info`, which ``describe_machine`` reports).

    Args:
        prefer: ``"cuda-python"`` or ``"ctypes"`` to get exactly that backend, whether or not it finds a GPU
            (tests); default: the search above, whose result is kept for the process.

    Raises:
        MissingDependencyError: neither library is available (one sentence: what, why, how to install).
        NoCudaDevice: every backend loads but none finds a usable GPU (each one's answer).
    """
    global _RUNTIME
    if prefer is not None:
        return make_backend(prefer)
    if _RUNTIME is not None:
        return _RUNTIME
    skipped: list[str] = []
    missing: list[MissingDependencyError] = []
    no_device: list[str] = []
    for kind in BACKENDS:
        try:
            # ctypes: every libcudart found, in order (a CUDA 13 one may sit before the CUDA 12 one that works)
            candidates = [make_backend(kind)] if kind != "ctypes" else list(_ctypes_runtimes())
        except MissingDependencyError as e:
            missing.append(e)
            skipped.append(f"{kind}: not installed")
            continue
        if not candidates:
            missing.append(MissingDependencyError(_missing_sentence(search_dirs())))
            skipped.append(f"{kind}: no libcudart found")
        for rt in candidates:
            try:
                n = rt.device_count()
            except NoCudaDevice as e:
                reason = getattr(e, "reason", str(e))
                no_device.append(f"{kind} via {rt.source}: {reason}")
                skipped.append(f"{kind} via {rt.source}: {reason}")
                continue
            if n == 0:
                no_device.append(f"{kind} via {rt.source}: 0 devices")
                skipped.append(f"{kind} via {rt.source}: 0 devices")
                continue
            rt.skipped = skipped
            _RUNTIME = rt
            return rt
    if not no_device:
        raise missing[-1] if missing else MissingDependencyError(_missing_sentence(search_dirs()))
    if len(no_device) > 4:
        no_device = no_device[:4] + [f"and {len(no_device) - 4} more libraries alike"]
    raise NoCudaDevice(
        "no CUDA GPU is usable on this machine (" + "; ".join(no_device) + "); TensorRT engines need an NVIDIA "
        "GPU and its driver. cuda-bindings 13.x needs a CUDA 13 driver: on a CUDA 12 driver install "
        "pip install 'cuda-python<13' (the ctypes backend uses the libcudart that TensorRT's wheels bring)."
    )


def _ctypes_runtimes():
    """A :class:`CtypesRuntime` for every CUDA runtime library that loads, most specific first."""
    names = find_cudart() + [n for n in (ctypes.util.find_library("cudart"), "libcudart.so") if n]
    seen = set()
    for name in names:
        real = os.path.realpath(name) if os.sep in name else name
        if real in seen:
            continue
        seen.add(real)
        try:
            lib = ctypes.CDLL(name)
            lib.cudaMalloc  # noqa: B018 - a library without it is not the CUDA runtime
        except (OSError, AttributeError):
            continue
        yield CtypesRuntime(lib, name)


def backend_info() -> dict | None:
    """The CUDA backend this process uses (``{"backend", "source", "skipped"}``), or ``None`` if none was chosen."""
    rt = _RUNTIME
    if rt is None:
        return None
    return {"backend": rt.kind, "source": rt.source, "skipped": list(getattr(rt, "skipped", []))}


class DeviceBuffer:
    """GPU memory that grows on demand (reallocated only when a larger batch needs more)."""

    def __init__(self, cuda: CudaRuntime):
        self.cuda, self.ptr, self.nbytes = cuda, 0, 0

    def ensure(self, nbytes: int) -> int:
        if nbytes > self.nbytes:
            self.free()
            self.ptr, self.nbytes = self.cuda.malloc(nbytes), int(nbytes)
        return self.ptr

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr, self.nbytes = self.ptr, 0, 0
            self.cuda.free(ptr)


__all__ = ["BACKENDS", "CudaRuntime", "DeviceBuffer", "NoCudaDevice", "backend_info", "cuda_runtime", "find_cudart",
           "load_cudart", "make_backend", "search_dirs"]
