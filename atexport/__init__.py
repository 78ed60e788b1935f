"""atexport: train AdapterTune adapters on frozen timm ViTs and export them to verified deployable models.

The package is import-light: ``import atexport`` pulls in neither torch nor onnxruntime. Each stage
lives in its own subpackage (``atexport.training``, ``atexport.export``, ``atexport.runtime``,
``atexport.verify``) and imports its heavy libraries inside the functions that need them.
"""

__version__ = "0.1.0"

from atexport.errors import (  # noqa: E402
    AtexportError,
    BadInputError,
    IncompatibleCheckpointError,
    MissingDependencyError,
    ParityError,
)

__all__ = [
    "__version__",
    "AtexportError",
    "BadInputError",
    "IncompatibleCheckpointError",
    "MissingDependencyError",
    "ParityError",
]
