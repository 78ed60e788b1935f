import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from _helpers import make_checkpoint  # noqa: E402


_HARDWARE_SKIPS: dict[str, str] = {}


def _hardware() -> tuple[str | None, str | None]:
    """Why ``gpu`` and ``tensorrt`` tests cannot run here (``None``: they can), asked the way atexport asks:
    a CUDA device through atexport.runtime.cuda (cuda-python or libcudart, not torch), TensorRT by import."""
    gpu_reason = None
    try:
        from atexport.runtime.cuda import cuda_runtime

        cuda_runtime().device_info(0)
    except Exception as e:  # noqa: BLE001 - any failure means "no usable GPU"; its sentence is the reason
        gpu_reason = f"no CUDA GPU found by atexport.runtime.cuda: {e}"
    try:
        import importlib

        importlib.import_module("tensorrt")
        trt_reason = gpu_reason
    except Exception as e:  # noqa: BLE001
        trt_reason = f"TensorRT's Python package does not import ({type(e).__name__}: {e})"
    return gpu_reason, trt_reason


def pytest_collection_modifyitems(config, items):
    marked = [i for i in items if "tensorrt" in i.keywords or "gpu" in i.keywords]
    if not marked:
        return
    gpu_reason, trt_reason = _hardware()
    for item in marked:
        reason = trt_reason if "tensorrt" in item.keywords else gpu_reason
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
            _HARDWARE_SKIPS.setdefault("tensorrt" if "tensorrt" in item.keywords else "gpu", reason)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Say once, in the summary, why the GPU and TensorRT tests did not run."""
    for marker, reason in sorted(_HARDWARE_SKIPS.items()):
        terminalreporter.write_line(f"'{marker}' tests skipped: {reason}")


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpts")


@pytest.fixture(scope="session")
def tiny_ckpt(ckpt_dir):
    """A tiny-ViT adapter checkpoint (every=1, 5 classes) with non-zero adapters."""
    return make_checkpoint(ckpt_dir / "tiny_a.pt", num_classes=5, every=1, weight_seed=1)


@pytest.fixture(scope="session")
def tiny_ckpt_b(ckpt_dir):
    """Same backbone and layout as ``tiny_ckpt``, other task weights."""
    return make_checkpoint(ckpt_dir / "tiny_b.pt", num_classes=5, every=1, weight_seed=2)


@pytest.fixture(scope="session")
def tiny_ckpt_every2(ckpt_dir):
    return make_checkpoint(ckpt_dir / "tiny_every2.pt", num_classes=5, every=2, weight_seed=3)
