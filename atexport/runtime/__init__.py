"""Runners for every backend behind one interface, and a torch-free runtime for apps.

``atexport.runtime`` never imports torch: apps load an ONNX model or a TensorRT engine with its
metadata (:func:`load_model`), preprocess images with numpy and Pillow (:class:`Preprocessor`, the
same numbers as timm's eval transform), and get labels and scores (:meth:`Model.predict`). The
PyTorch runner lives in ``atexport.runtime.torch`` and is imported only by the code that compares
against PyTorch.

::

    from atexport.runtime import load_model

    model = load_model("model.onnx")
    print(model.predict("photo.jpg", top_k=3)[0].label)
"""

from atexport.artifact.tasks import TaskWeights, load_task
from atexport.runtime.base import Runner
from atexport.runtime.model import Model, Prediction, load_model
from atexport.runtime.preprocess import Preprocessor

__all__ = ["Model", "Prediction", "Preprocessor", "Runner", "TaskWeights", "load_model", "load_task"]
