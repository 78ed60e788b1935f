"""Adapter families: AdapterTune, AdaRing, Adapter-X and LoRA behind one registry.

One shared entry point injects any family (:func:`inject_adapters`), one reads a recorded config
(:func:`adapter_config_from_dict`, dispatching on ``kind``; records without ``kind`` are AdapterTune's),
and each family gives the export layout of its checkpoints (:func:`export_view`), so the export side
never branches on the family. See :mod:`atexport.adapters.base` for what a family provides.

Importing this package is torch-free; family modules (which import torch) load on first use.
"""

from __future__ import annotations

from atexport.adapters.base import (
    DEFAULT_KIND,
    FAMILIES,
    KINDS,
    AdapterFamily,
    adapter_config_from_dict,
    check_export_mode,
    family_of,
    get_family,
    is_adapter_tensor,
    register_family,
)

__all__ = [
    "DEFAULT_KIND",
    "FAMILIES",
    "KINDS",
    "AdapterConfig",
    "AdapterFamily",
    "adapter_config_from_dict",
    "check_export_mode",
    "export_model",
    "export_view",
    "family_of",
    "get_family",
    "inject_adapters",
    "is_adapter_tensor",
    "register_family",
]


def inject_adapters(model, config):
    """Put ``config``'s family of adapters into a timm ViT, in place; returns the model.

    Adapters too large for this machine's memory are refused, with the numbers, before any is allocated.
    """
    from atexport.adapters.base import check_adapter_memory

    blocks = getattr(model, "blocks", None)
    if getattr(model, "embed_dim", None) is not None and blocks is not None and hasattr(blocks, "__len__"):
        check_adapter_memory(config, int(model.embed_dim), len(blocks))
    return family_of(config).inject(model, config)


def export_view(config, state_dict: dict):
    """``(export config, export state dict)`` of trained ``config``/``state_dict``; idempotent.

    Families whose export layout is their training layout return them unchanged; AdaRing returns
    AdapterTune's layout (materialised FP32 matrices), merged LoRA the backbone's merged ``qkv`` weights.
    """
    if config is None:
        return None, dict(state_dict)
    fam = family_of(config)
    out_cfg = fam.export_adapter_config(config)
    if out_cfg is config:
        return config, dict(state_dict)
    return out_cfg, fam.export_state(config, state_dict)


def export_model(config, model):
    """The built, trained ``model`` in ``config``'s export layout (in place; merged LoRA merges here)."""
    return model if config is None else family_of(config).export_model(config, model)


def __getattr__(name):  # lazy: AdapterConfig and friends import torch
    if name in ("AdapterConfig", "Adapter", "AdapterBlock", "INITS", "iter_adapters", "infer_adapter_config"):
        from atexport.adapters import adaptertune

        return getattr(adaptertune, name)
    raise AttributeError(f"module 'atexport.adapters' has no attribute {name!r}")
