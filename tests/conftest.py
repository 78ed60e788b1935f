import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from _helpers import make_checkpoint  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import importlib.util

    have_trt = importlib.util.find_spec("tensorrt") is not None
    have_cuda = False
    try:
        import torch

        have_cuda = torch.cuda.is_available()
    except ImportError:
        pass
    for item in items:
        if "tensorrt" in item.keywords and not (have_trt and have_cuda):
            item.add_marker(pytest.mark.skip(reason="needs the TensorRT Python package and a CUDA GPU"))
        elif "gpu" in item.keywords and not have_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


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
