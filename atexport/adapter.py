"""The AdapterTune adapter: config, layer, injection into a timm ViT.

AdapterTune (Khazem, 2026) places a residual low-rank bottleneck after each transformer block of a
frozen ViT: ``h <- h + alpha * up(GELU(down(h)))``. ``up`` is zero-initialised, so at step 0 the adapted
network computes exactly the pretrained function. The module layout matches the official code
(``blocks.{i}.block.*``, ``blocks.{i}.adapter.{down,up}.*``, ``head.*``), so its checkpoints load as they are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from atexport.errors import BadInputError, IncompatibleCheckpointError

INITS = ("zero", "small")


@dataclass
class AdapterConfig:
    """AdapterTune hyper-parameters (paper defaults).

    Attributes:
        rank: bottleneck width r.
        every: place an adapter on block i when ``i % every == 0`` (2 halves the count).
        alpha: output scale s.
        init: ``"zero"`` (exact pretrained function at step 0) or ``"small"`` (N(0, 1e-4) ablation).
    """

    rank: int = 16
    every: int = 1
    alpha: float = 1.0
    init: Literal["zero", "small"] = "zero"
    kind: str = "adaptertune"

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise BadInputError(f"adapter rank must be a positive integer, got {self.rank!r}.")
        if not isinstance(self.every, int) or self.every < 1:
            raise BadInputError(f"adapter every must be a positive integer, got {self.every!r}.")
        if self.init not in INITS:
            raise BadInputError(f"adapter init must be one of {INITS}, got {self.init!r}.")
        if self.kind != "adaptertune":
            raise BadInputError(f"unknown adapter kind {self.kind!r}; atexport supports 'adaptertune'.")
        self.alpha = float(self.alpha)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        known = {k: d[k] for k in ("rank", "every", "alpha", "init", "kind") if k in d}
        return cls(**known)

    def placed(self, depth: int) -> list[int]:
        """Indices of the blocks that carry an adapter."""
        return [i for i in range(depth) if i % self.every == 0]

    def num_params(self, dim: int, depth: int) -> int:
        """Trainable adapter parameters: ``2*D*r + r + D`` per adapter."""
        return len(self.placed(depth)) * (2 * dim * self.rank + self.rank + dim)


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


class AdapterBlock(nn.Module):
    """Wraps one timm block: ``x = block(x); x = x + adapter(x)`` (adapter may be ``None``)."""

    def __init__(self, block: nn.Module, adapter: Adapter | None):
        super().__init__()
        self.block = block
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(x)
        if self.adapter is not None:
            x = x + self.adapter(x)
        return x


def inject_adapters(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Wrap every block of a timm ViT in an :class:`AdapterBlock`, in place; returns the model."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not isinstance(blocks, nn.Sequential):
        raise IncompatibleCheckpointError(
            f"{type(model).__name__} has no 'blocks' sequence; AdapterTune needs a timm ViT-family model."
        )
    if any(isinstance(b, AdapterBlock) for b in blocks):
        raise IncompatibleCheckpointError("the model already carries adapters.")
    dim = model.embed_dim
    wrapped = []
    for i, block in enumerate(blocks):
        adapter = Adapter(dim, config.rank, config.alpha, config.init) if i % config.every == 0 else None
        wrapped.append(AdapterBlock(block, adapter))
    model.blocks = nn.Sequential(*wrapped)
    return model


def iter_adapters(model: nn.Module):
    """Yield ``(block_index, adapter)`` for every adapter in the model."""
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
