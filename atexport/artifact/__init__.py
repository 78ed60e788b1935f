"""The file formats atexport writes and reads, torch-free: model metadata, ONNX models and their manifest,
engine sidecars, task weights, the multi-task bank layout, and the one task-fits-model check.

Every reader here checks the format version and the shape of what it reads, so a damaged or foreign
file ends in one :class:`~atexport.errors.BadInputError` naming the file. Imports only the ground
layer (errors, utils) and numpy; ``onnx`` is imported lazily where an ONNX file is parsed.
"""

from atexport.artifact.bank import PAD_LOGIT, TASK_INPUT
from atexport.artifact.fit import check_fits, check_same_family
from atexport.artifact.metadata import META_KEY, ModelMetadata
from atexport.artifact.tasks import TaskWeights, default_task_name, load_task

__all__ = [
    "META_KEY", "PAD_LOGIT", "TASK_INPUT", "ModelMetadata", "TaskWeights", "check_fits", "check_same_family",
    "default_task_name", "load_task",
]
