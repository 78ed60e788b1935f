"""Runners for every backend behind one interface, and a torch-free runtime for apps.

``atexport.runtime`` never imports torch: apps load an ONNX model or a TensorRT engine with its
metadata, preprocess images with numpy and Pillow, and run batches. The PyTorch runner lives in
``atexport.runtime.torch`` and is imported only by the code that compares against PyTorch.
"""

from atexport.runtime.base import Runner

__all__ = ["Runner"]
