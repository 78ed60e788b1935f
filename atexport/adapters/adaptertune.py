"""The AdapterTune adapter family: config, layer, injection into a timm ViT (atexport's original method).

AdapterTune (Khazem, 2026) places a residual low-rank bottleneck after each transformer block of a
frozen ViT: ``h <- h + alpha * up(GELU(down(h)))``. ``up`` is zero-initialised, so at step 0 the adapted
network computes exactly the pretrained function. The module layout matches the official code
(``blocks.{i}.block.*``, ``blocks.{i}.adapter.{down,up}.*``, ``head.*``), so its checkpoints load as they are.

This layout is also the *export layout* of AdaRing (:mod:`atexport.adapters.adaring`), which
materialises its tensor-ring adapters into it; such a config records ``materialised_from``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from atexport.adapters.base import (
    FamilyConfig,
    AdapterFamily,
    register_family,
)
from atexport.errors import BadInputError, IncompatibleCheckpointError

INITS = ("zero", "small")


@dataclass
class AdapterConfig(FamilyConfig):
    """AdapterTune hyper-parameters (paper defaults).

    Attributes:
        rank: bottleneck width r.
        every: place an adapter on block i when ``i % every == 0`` (2 halves the count).
        alpha: output scale s.
        init: ``"zero"`` (exact pretrained function at step 0) or ``"small"`` (N(0, 1e-4) ablation).
        kind: ``"adaptertune"``.
        materialised_from: the config of the family whose trained adapters were materialised into this
            layout for export (AdaRing), else ``None``.
    """

    rank: int = 16
    every: int = 1
    alpha: float = 1.0
    init: Literal["zero", "small"] = "zero"
    kind: str = "adaptertune"
    materialised_from: dict | None = None

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise BadInputError(f"adapter rank must be a positive integer, got {self.rank!r}.")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise BadInputError(f"adapter every must be a positive integer, got {self.every!r}.")
        if self.init not in INITS:
            raise BadInputError(f"adapter init must be one of {INITS}, got {self.init!r}.")
        if self.kind != "adaptertune":
            raise BadInputError(f"AdapterConfig is the 'adaptertune' family, got kind {self.kind!r}.")
        try:
            alpha = float(self.alpha) if not isinstance(self.alpha, bool) else math.nan
        except (TypeError, ValueError):
            alpha = math.nan
        if not math.isfinite(alpha):
            raise BadInputError(f"adapter alpha must be a finite number, got {self.alpha!r}.")
        self.alpha = alpha

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["materialised_from"] is None:  # the record of plain AdapterTune runs stays as it always was
            d.pop("materialised_from")
        return d

    def num_params(self, dim: int, depth: int) -> int:
        """Trainable adapter parameters: ``2*D*r + r + D`` per adapter."""
        return len(self.placed(depth)) * (2 * dim * self.rank + self.rank + dim)

    def formula(self, dim: int, depth: int) -> str:
        n = len(self.placed(depth))
        return f"{n} adapters x (2*D*r + r + D) = {n} x {2 * dim * self.rank + self.rank + dim:,} (D={dim}, r={self.rank})"


class Adapter(nn.Module):
    """``alpha * up(gelu(down(x)))`` with exact (erf) GELU."""

    def __init__(self, dim: int, rank: int, alpha: float = 1.0, init: str = "zero"):
        super().__init__()
        self.dim, self.rank, self.alpha = dim, rank, float(alpha)
        self.down = nn.Linear(dim, rank)
        self.act = nn.GELU()
        self.up = nn.Linear(rank, dim)
        self.reset_parameters(init)

    def reset_parameters(self, init: str = "zero") -> None:
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        if init == "zero":
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        elif init == "small":
            nn.init.normal_(self.up.weight, mean=0.0, std=1e-4)
            nn.init.normal_(self.up.bias, mean=0.0, std=1e-4)
        else:
            raise BadInputError(f"adapter init must be one of {INITS}, got {init!r}.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.up(self.act(self.down(x)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, rank={self.rank}, alpha={self.alpha}"


class BankAdapter(nn.Module):
    """:class:`Adapter` in a multi-task bank: ``alpha * up(gelu(down(x)))`` where ``down`` and ``up`` apply
    each sample's own task weights (``linear`` layers from the bank builder: a ``Gather`` of the task's
    slice and a batched ``MatMul``, so a sample costs what it costs in a single-task model)."""

    def __init__(self, dim: int, rank: int, alpha: float, linear):
        super().__init__()
        self.down = linear(dim, rank)
        self.up = linear(rank, dim)
        self.act = nn.GELU()
        self.alpha = float(alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.up(self.act(self.down(x)))


class BankBlock(nn.Module):
    """A frozen timm block followed by its bank adapter (``x = block(x); x = x + adapter(x)``), as
    :class:`AdapterBlock`; the adapter is referenced, its parameters live in the bank."""

    def __init__(self, block: nn.Module, adapter: nn.Module):
        super().__init__()
        self.block = block
        self._adapter = [adapter]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(x)
        return x + self._adapter[0](x)


class AdapterBlock(nn.Module):
    """Wraps one timm block: ``x = block(x); x = x + adapter(x)`` (adapter may be ``None``)."""

    def __init__(self, block: nn.Module, adapter: nn.Module | None):
        super().__init__()
        self.block = block
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(x)
        if self.adapter is not None:
            x = x + self.adapter(x)
        return x


def wrap_blocks(model: nn.Module, make_adapter, title: str = "AdapterTune") -> nn.Module:
    """Wrap every block in an :class:`AdapterBlock` whose adapter is ``make_adapter(i)`` (``None``: none)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not isinstance(blocks, nn.Sequential):
        raise IncompatibleCheckpointError(
            f"{type(model).__name__} has no 'blocks' sequence; {title} needs a timm ViT-family model."
        )
    if any(isinstance(b, AdapterBlock) for b in blocks) or getattr(model, "shared", None) is not None:
        raise IncompatibleCheckpointError("the model already carries adapters.")
    model.blocks = nn.Sequential(*[AdapterBlock(block, make_adapter(i)) for i, block in enumerate(blocks)])
    return model


def inject_adaptertune(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Wrap every block of a timm ViT in an :class:`AdapterBlock`, in place; returns the model."""
    dim = getattr(model, "embed_dim", None)
    placed = set(config.placed(len(getattr(model, "blocks", []) or [])))
    return wrap_blocks(
        model, lambda i: Adapter(dim, config.rank, config.alpha, config.init) if i in placed else None
    )


def iter_adapters(model: nn.Module):
    """Yield ``(block_index, adapter)`` for every block-level adapter in the model."""
    for i, b in enumerate(getattr(model, "blocks", [])):
        if isinstance(b, AdapterBlock) and b.adapter is not None:
            yield i, b.adapter


def has_adapters(model: nn.Module) -> bool:
    return any(True for _ in iter_adapters(model))


def adapter_param_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if ".adapter." in n]


def infer_adapter_config(state_dict: dict, depth: int, alpha: float = 1.0) -> AdapterConfig:
    """Recover rank and placement from an (official-layout) state dict's adapter tensors."""
    placed = sorted(
        {int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.") and ".adapter.down.weight" in k}
    )
    if not placed:
        raise IncompatibleCheckpointError("the state dict holds no adapter tensors (blocks.{i}.adapter.*).")
    rank = int(state_dict[f"blocks.{placed[0]}.adapter.down.weight"].shape[0])
    every = placed[1] - placed[0] if len(placed) > 1 else max(depth, 1)
    if placed != list(range(0, depth, every)):
        raise IncompatibleCheckpointError(
            f"adapters on blocks {placed} do not follow AdapterTune's 'every block i with i % every == 0'."
        )
    return AdapterConfig(rank=rank, every=every, alpha=alpha)


class AdapterTuneFamily(AdapterFamily):
    kind = "adaptertune"
    config_cls = AdapterConfig
    separable = True
    multitask = True
    title = "AdapterTune"

    def inject(self, model, cfg):
        return inject_adaptertune(model, cfg)

    def bank_adapter(self, cfg, dim: int, linear):
        """One block's adapter in a multi-task bank: a module called after the block (AdapterTune's layout,
        also AdaRing's export layout).

        Args:
            cfg: the export-layout config.
            dim: the model width.
            linear: ``linear(d_in, d_out)`` makes a bank linear layer (see :meth:`AdapterFamily.bank_modules`).
        """
        return BankAdapter(dim, cfg.rank, cfg.alpha, linear)

    def bank_tensors(self, cfg, dim, depth):
        from atexport.artifact.bank import adaptertune_tensors

        return adaptertune_tensors(dim, cfg.rank, cfg.placed(depth))

    def bank_modules(self, cfg, vit, ops):
        dim = int(vit.embed_dim)
        return {f"blocks.{i}.adapter": self.bank_adapter(cfg, dim, ops.linear) for i in cfg.placed(len(vit.blocks))}

    def bank_wire(self, cfg, vit, modules):
        blocks = list(vit.blocks)
        for i in cfg.placed(len(blocks)):
            blocks[i] = BankBlock(blocks[i], modules[f"blocks.{i}.adapter"])
        vit.blocks = nn.Sequential(*blocks)


FAMILY = register_family(AdapterTuneFamily())
