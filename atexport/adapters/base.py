"""The adapter-family registry: one way to add a parameter-efficient method, as PEFT does.

A *family* is one module under ``atexport/adapters/`` holding a config dataclass (validated in
``__post_init__``, with a fixed ``kind`` field that travels in ``run.pt``) and an
:class:`AdapterFamily` registered with :func:`register_family`. The family knows how to

- ``inject`` its layers into a timm ViT (the *training layout*),
- describe its trainable parameters (``cfg.num_params(dim, depth)`` and ``cfg.formula(dim, depth)``),
- give the *export layout* of a trained checkpoint: :meth:`AdapterFamily.export_adapter_config` and
  :meth:`AdapterFamily.export_state`. The export side (ONNX, swap, multi-task bank, precision,
  TensorRT, verify) only ever sees export layouts, so it needs no per-family branch: AdaRing
  materialises to AdapterTune's layout, merged LoRA to the frozen backbone with merged ``qkv`` weights,
  Adapter-X and separable LoRA export their own modules,
- say whether its export layout can be separable or live in a multi-task bank
  (:func:`check_export_mode`, raising a clear error naming the family otherwise), and give its bank:
  the bank tensors (:meth:`AdapterFamily.bank_tensors`, what the manifest records), the bank layers
  (:meth:`AdapterFamily.bank_modules`, per-sample task slices) and where they sit in the ViT
  (:meth:`AdapterFamily.bank_wire`), so the multi-task export holds no family's formula,
- optionally name diagnostics that ``atexport verify`` checks beside the logits
  (:meth:`AdapterFamily.probes`: Adapter-X's expert choice per token).

Naming convention (the one task-tensor predicate, :func:`is_adapter_tensor`): every trainable tensor
of every family has ``.adapter.`` in its name (``blocks.3.adapter.down.weight``,
``blocks.3.attn.qkv.adapter.q_down.weight``, and the cross-layer tensors of AdaRing and Adapter-X
under ``shared.adapter.*``; a family that trains a backbone tensor holds a trainable copy under such a
name, as Adapter-X's norm2, ``blocks.3.adapter.norm``, and CLS token, ``shared.adapter.cls.token``). So the
existing rules (trainable state, backbone fingerprint, swappable
tensors, ``*.adapter.*`` keep-float globs) hold for every family unchanged.

This module is torch-free: family modules are imported on first use (:func:`get_family`).
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import fields
from typing import Any

from atexport.errors import BadInputError, IncompatibleCheckpointError

DEFAULT_KIND = "adaptertune"
# kind -> module that registers it (imported lazily: the modules import torch).
_MODULES = {
    "adaptertune": "atexport.adapters.adaptertune",
    "adaring": "atexport.adapters.adaring",
    "adapterx": "atexport.adapters.adapterx",
    "lora": "atexport.adapters.lora",
}
KINDS = tuple(_MODULES)
FAMILIES: dict[str, AdapterFamily] = {}
EXPORT_MODES = ("separable", "multitask")


def is_adapter_tensor(name: str) -> bool:
    """Whether a tensor name belongs to an adapter of any family (the one predicate; see the module doc)."""
    return ".adapter." in name


def placed_blocks(depth: int, every: int) -> list[int]:
    """Indices of the blocks that carry an adapter: ``i % every == 0``."""
    return [i for i in range(depth) if i % every == 0]


class FamilyConfig:
    """What every family's config dataclass shares: its record (``to_dict``/``from_dict``, unknown keys refused)
    and the placement ``every`` (an adapter on block ``i`` when ``i % every == 0``)."""

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        return config_from_dict(cls, dict(d))

    def placed(self, depth: int) -> list[int]:
        """Indices of the blocks that carry an adapter."""
        return placed_blocks(depth, self.every)


class AdapterFamily:
    """One adapter method. Subclasses override what differs from the defaults.

    Attributes:
        kind: the name in checkpoints, recipes and ``--adapter``.
        config_cls: the config dataclass.
        separable: whether the export layout keeps the task's tensors apart from the backbone.
        multitask: whether the export layout has a multi-task bank (:meth:`bank_tensors`, :meth:`bank_modules`,
            :meth:`bank_wire`).
        title: a human name for messages.
    """

    kind: str = ""
    config_cls: type = object
    separable: bool = True
    multitask: bool = False
    title: str = ""

    def inject(self, model, cfg):
        """Put the family's layers (training layout) into ``model`` in place; return the model."""
        raise NotImplementedError

    def export_adapter_config(self, cfg):
        """The adapter config of the export layout (default: ``cfg`` itself)."""
        return cfg

    def export_state(self, cfg, state_dict: dict) -> dict:
        """The checkpoint tensors in the export layout, FP32 (default: unchanged)."""
        return dict(state_dict)

    def export_model(self, cfg, model):
        """Turn a built model (training layout, trained weights loaded) into the export layout, in place.

        Default: unchanged. Merged LoRA folds its branches into the frozen ``qkv`` weights here, since the
        checkpoint alone (without the backbone) cannot.
        """
        return model

    def bank_tensors(self, cfg, dim: int, depth: int) -> list[dict]:
        """The family's multi-task bank tensors: :func:`atexport.artifact.bank.bank_entry` records (checkpoint
        source, per-task slice shape, transpose, block), in graph-input order; the head's are added by
        :func:`~atexport.artifact.bank.bank_layout`.

        Raises:
            IncompatibleCheckpointError: the family's export layout has no multi-task bank.
        """
        raise IncompatibleCheckpointError(f"{self.why_not(cfg, 'multitask') or self.title + ' has no bank layer'}.")

    def bank_modules(self, cfg, vit, ops) -> dict:
        """The family's bank layers: ``{path: module}``, registered under ``bank.<path>``.

        Their parameters, named ``bank.<path>.<name>``, must be exactly the bank tensors of
        :meth:`bank_tensors` (each with a leading task axis); ``ops`` makes them: ``ops.linear(d_in, d_out,
        bias=True)`` a layer applying each sample's own ``x @ weight[task] + bias[task]`` (parameters
        ``weight [K, in, out]``, ``bias [K, out]``), ``ops.param(*shape)`` a bank tensor ``[K, *shape]`` and
        ``ops.select(p)`` its per-sample slices ``[N, *shape]`` (a ``Gather`` on the task ids).

        Args:
            cfg: the export-layout config.
            vit: the frozen timm ViT the bank will serve (not modified here).
            ops: the bank builder's operations (above).
        """
        raise IncompatibleCheckpointError(f"{self.why_not(cfg, 'multitask') or self.title + ' has no bank layer'}.")

    def bank_wire(self, cfg, vit, modules: dict) -> None:
        """Make ``vit``'s blocks call the bank layers of :meth:`bank_modules` (in place), as the family's
        single-task model calls its adapters; the layers are referenced, not registered again."""
        raise IncompatibleCheckpointError(f"{self.why_not(cfg, 'multitask') or self.title + ' has no bank layer'}.")

    def aux_loss(self, cfg, model):
        """An extra training loss of the last forward pass (Adapter-X's load balancing), or ``None`` (default)."""
        return None

    def probes(self, cfg) -> list:
        """Diagnostics beyond the logits that ``atexport verify`` checks in every backend where it can observe
        them (default: none). Each is an object with ``name``, ``title``, ``reference(model, x)`` (the values
        from the PyTorch model, numpy), ``expose(proto)`` (adds the same values as outputs of an exported ONNX
        graph, in place, returning their names, or ``None`` where the graph does not show them) and
        ``compare(reference, got, precision)`` (a dict with ``passed`` and ``summary``).
        Adapter-X's routing check is one (:class:`atexport.adapters.adapterx.RoutingCheck`).
        """
        return []

    def why_not(self, cfg, mode: str) -> str | None:
        """Why ``mode`` (``separable`` or ``multitask``) is impossible for ``cfg``'s export layout, or ``None``."""
        if mode == "separable" and not self.separable:
            return f"{self.title} checkpoints cannot be exported separable"
        if mode == "multitask" and not self.multitask:
            return (f"{self.title} ('{self.kind}') adapters have no multi-task bank; export each task on its own "
                    "(separable, then swap tasks)")
        return None


def register_family(family: AdapterFamily) -> AdapterFamily:
    """Register ``family`` under ``family.kind`` (used at the bottom of each family module).

    Raises:
        ValueError: no ``kind``, or another family already registered under it (a second family of one name
            would silently replace the first for every checkpoint that records it).
    """
    if not family.kind:
        raise ValueError("an adapter family needs a kind")
    known = FAMILIES.get(family.kind)
    if known is not None and known is not family:
        raise ValueError(f"the adapter family {family.kind!r} is already registered ({type(known).__name__}); "
                         "give the new family another kind.")
    FAMILIES[family.kind] = family
    return family


def get_family(kind: str | None, where: str | None = None) -> AdapterFamily:
    """The family registered as ``kind`` (``None``: AdapterTune, for checkpoints from before families).

    Args:
        kind: the family name.
        where: the file that recorded it (a checkpoint); ``None``: the user gave it (``--adapter`` or
            ``--set adapter.kind``), and the message says so.
    """
    kind = DEFAULT_KIND if kind is None else str(kind)
    if kind not in FAMILIES:
        if kind not in _MODULES:
            close = difflib.get_close_matches(kind, KINDS, 1)
            known = f"atexport has {', '.join(KINDS)}" + (f" (did you mean {close[0]}?)" if close else "")
            if where:
                raise BadInputError(f"{where}: records the adapter family {kind!r}, which this atexport does not "
                                    f"know ({known}); it was written by another version, or is damaged.")
            raise BadInputError(f"unknown adapter family {kind!r} (given with --adapter or --set adapter.kind); {known}.")
        importlib.import_module(_MODULES[kind])
    return FAMILIES[kind]


def family_of(cfg) -> AdapterFamily:
    """The family of a config object."""
    return get_family(getattr(cfg, "kind", None))


def adapter_config_from_dict(d: dict | None, where: str = "checkpoint"):
    """The family config recorded in a checkpoint (``kind`` missing: AdapterTune, as before families; keys it
    predates: :func:`atexport.artifact.fit.record_with_defaults`)."""
    if not d:
        return None
    if not isinstance(d, dict):
        raise BadInputError(f"{where}: the adapter section must be a mapping, got {d!r}.")
    from atexport.artifact.fit import record_with_defaults

    return get_family(d.get("kind"), where).config_cls.from_dict(record_with_defaults(d))


def config_from_dict(cls, d: dict, *, lenient: tuple = ()) -> Any:
    """Build a family config dataclass from a dict, refusing unknown keys (typos) with a hint.

    Args:
        cls: the config dataclass.
        d: the keys (``kind`` included or not).
        lenient: keys silently dropped (recorded by older versions).
    """
    known = {f.name for f in fields(cls)}
    d = {k: v for k, v in d.items() if k not in lenient}
    unknown = sorted(set(d) - known)
    if unknown:
        hints = [f"adapter.{k} (did you mean adapter.{m[0]}?)" if (m := difflib.get_close_matches(k, known, 1))
                 else f"adapter.{k}" for k in unknown]
        raise BadInputError(
            f"unknown keys for the {d.get('kind', cls.kind if hasattr(cls, 'kind') else '?')} adapter: "
            f"{', '.join(hints)}; its keys are {', '.join(sorted(known - {'kind'}))}."
        )
    return cls(**d)


def check_positive_int(kind: str, key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadInputError(f"{kind} adapter: {key} must be a positive integer, got {value!r}.")


def check_number(kind: str, key: str, value, *, minimum: float | None = None, positive: bool = False) -> float:
    """``value`` as a finite float, or one :class:`BadInputError` naming ``adapter.KEY`` (never a ValueError).

    The one check of every family's float settings (``alpha``, ``lora_alpha``, ``tau``, ``router_noise``):
    text, booleans, NaN and infinity are refused, as are values below ``minimum`` or, with ``positive``,
    not above zero.
    """
    import math

    try:
        v = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError, OverflowError):
        v = math.nan
    want = ("a positive" if positive else "a") + " finite number" + (
        f" >= {minimum:g}" if minimum is not None else "")
    if not math.isfinite(v) or (positive and not v > 0) or (minimum is not None and v < minimum):
        raise BadInputError(f"{kind} adapter: {key} must be {want}, got {value!r} (--set adapter.{key}=...).")
    return v


def check_positive_float(kind: str, key: str, value) -> float:
    return check_number(kind, key, value, positive=True)


TRAINING_BYTES_PER_PARAM = 16  # FP32 weight, its gradient, and AdamW's two moments


def check_adapter_memory(cfg, dim: int, depth: int, flag: str | None = None) -> None:
    """Refuse, before any tensor is allocated, adapters whose training would not fit this machine's memory.

    Args:
        cfg: a family config (its ``num_params(dim, depth)`` gives the count).
        dim: the backbone's width; ``depth``: its number of blocks.
        flag: the flag the sizes came from, for the message (default: the family's settings).

    Raises:
        BadInputError: with the parameter count, the memory it needs and the memory available.
    """
    from atexport.utils.machine import check_memory

    if cfg is None:
        return
    n = int(cfg.num_params(int(dim), int(depth)))
    sizes = ", ".join(f"{f.name}={getattr(cfg, f.name)}" for f in fields(cfg)
                      if isinstance(getattr(cfg, f.name), int) and not isinstance(getattr(cfg, f.name), bool))
    where = f"{flag}: " if flag else ""
    check_memory(n * TRAINING_BYTES_PER_PARAM, f"{where}the {family_of(cfg).kind} adapter ({sizes}) has {n:,} trainable "
                 f"parameters on this backbone (width {dim}, {depth} blocks); training it",
                 "lower the rank (--rank, --ranks) or the family's sizes (--set adapter.KEY=...)")


def check_export_mode(cfg, mode: str, what: str = "this checkpoint") -> None:
    """Refuse ``mode`` (``separable`` or ``multitask``) where the family's export layout cannot do it.

    Raises:
        IncompatibleCheckpointError: naming the family and what to do instead.
    """
    if cfg is None:
        return
    if mode not in EXPORT_MODES:
        raise ValueError(f"mode must be one of {EXPORT_MODES}")
    reason = family_of(cfg).why_not(cfg, mode)
    if reason:
        raise IncompatibleCheckpointError(f"{what}: {reason}.")
