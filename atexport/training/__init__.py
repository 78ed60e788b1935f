"""The training stage: AdapterTune adapters (or the head, or everything) on a frozen timm ViT.

``train(config)`` runs one recipe (``training/*.yaml`` < CLI flags, resolved by ``resolve_config``)
and writes ``run.pt`` (best), ``last.pt`` (resumable), ``metrics.jsonl`` and ``config.yaml``;
``convert_official`` imports checkpoints of the official AdapterTune code. Importing this package
does not import torch.

Example:
    >>> from atexport.training import resolve_config, train
    >>> result = train(resolve_config("digits", {"output": "runs/digits"}))
    >>> result.checkpoint, result.metrics["test_top1"]
"""

from atexport.training.config import REGIMES, TrainConfig, load_recipe, parse_seeds, parse_set, resolve_config
from atexport.training.device import is_main_process
from atexport.training.official import convert_official, read_class_names
from atexport.training.params import param_report
from atexport.training.schedule import lr_at
from atexport.training.trainer import TrainResult, train

__all__ = [
    "REGIMES",
    "TrainConfig",
    "TrainResult",
    "convert_official",
    "is_main_process",
    "load_recipe",
    "lr_at",
    "param_report",
    "parse_seeds",
    "parse_set",
    "read_class_names",
    "resolve_config",
    "train",
]
