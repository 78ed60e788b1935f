"""Compatibility: the AdapterTune family moved to :mod:`atexport.adapters.adaptertune` (families: :mod:`atexport.adapters`)."""
from atexport.adapters import inject_adapters  # noqa: F401  (dispatches on the config's family)
from atexport.adapters.adaptertune import (  # noqa: F401
    INITS,
    Adapter,
    AdapterBlock,
    AdapterConfig,
    adapter_param_names,
    has_adapters,
    infer_adapter_config,
    iter_adapters,
)
