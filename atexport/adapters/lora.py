"""LoRA on the attention's query and value projections (Hu et al., 2021): the baseline users ask for.

timm fuses q, k and v into one ``attn.qkv`` Linear (D -> 3D). The frozen layer is replaced, under the
same name, by :class:`LoRAQKV`, which keeps the frozen ``weight`` and ``bias`` (same names, so the
backbone fingerprint and ``--backbone-weights`` are unchanged) and adds, for each target t in
``targets`` (default q and v), ``scale * up_t(down_t(x))`` to that third of the output, with
``scale = lora_alpha / rank``. ``down`` is Kaiming-uniform (as PEFT), ``up`` zero: step 0 is the frozen
model. The trainable tensors are ``blocks.{i}.attn.qkv.adapter.{t}_{down,up}.weight``:
``L * len(targets) * 2 * D * r`` parameters.

Export, chosen by ``merge`` (recorded in the checkpoint):

- ``merge: true`` (default): ``W_qkv + scale * [up_q down_q; 0; up_v down_v]`` is merged in FP32 into the
  frozen weights when the model is built for export: the graph is the bare backbone's, zero runtime
  cost, but not separable (refused with a clear error) and not in a multi-task bank.
- ``merge: false``: the side branches stay in the graph as named, swappable tensors: separable export,
  swap, and the multi-task bank (each task's ``{t}_down``/``{t}_up`` stacked per task, gathered per sample
  by :class:`BankLoRABranches`). Merged LoRA is refused by the bank: it changes the backbone's weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from atexport.adapters.base import (
    FamilyConfig,
    AdapterFamily,
    check_positive_float,
    check_positive_int,
    register_family,
)
from atexport.errors import BadInputError, IncompatibleCheckpointError

TARGETS = ("q", "k", "v")


@dataclass
class LoRAConfig(FamilyConfig):
    """LoRA hyper-parameters.

    Attributes:
        rank: LoRA rank r.
        lora_alpha: scale numerator; the update is ``lora_alpha / rank * up(down(x))``.
        targets: which of q, k, v get a LoRA branch.
        merge: merge into the frozen qkv weights at export (not separable) or keep the branches.
        every: LoRA on block i when ``i % every == 0``.
        kind: ``"lora"``.
    """

    rank: int = 16
    lora_alpha: float = 16.0
    targets: list = field(default_factory=lambda: ["q", "v"])
    merge: bool = True
    every: int = 1
    kind: str = "lora"

    def __post_init__(self):
        check_positive_int("lora", "rank", self.rank)
        check_positive_int("lora", "every", self.every)
        self.lora_alpha = check_positive_float("lora", "lora_alpha", self.lora_alpha)
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if not isinstance(self.targets, (list, tuple)) or not self.targets or any(t not in TARGETS for t in self.targets):
            raise BadInputError(f"lora adapter: targets must be a non-empty list of {TARGETS}, got {self.targets!r}.")
        self.targets = [t for t in TARGETS if t in self.targets]
        if not isinstance(self.merge, bool):
            raise BadInputError(f"lora adapter: merge must be true or false, got {self.merge!r}.")
        if self.kind != "lora":
            raise BadInputError(f"LoRAConfig is the 'lora' family, got kind {self.kind!r}.")

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.rank

    def num_params(self, dim: int, depth: int) -> int:
        return len(self.placed(depth)) * len(self.targets) * 2 * dim * self.rank

    def formula(self, dim: int, depth: int) -> str:
        L, t = len(self.placed(depth)), len(self.targets)
        return f"L * targets * 2*D*r = {L} x {t} x {2 * dim * self.rank:,} (D={dim}, r={self.rank})"


class LoRABranches(nn.Module):
    """The trainable side branches of one qkv layer: ``{t}_down`` (D -> r) and ``{t}_up`` (r -> D)."""

    def __init__(self, dim: int, rank: int, targets):
        super().__init__()
        for t in targets:
            down, up = nn.Linear(dim, rank, bias=False), nn.Linear(rank, dim, bias=False)
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(up.weight)
            self.add_module(f"{t}_down", down)
            self.add_module(f"{t}_up", up)

    def delta(self, t: str) -> torch.Tensor:
        """The merged update ``up_t @ down_t`` ``[D, D]`` (before the scale)."""
        return getattr(self, f"{t}_up").weight @ getattr(self, f"{t}_down").weight


class LoRAQKV(nn.Module):
    """A frozen qkv Linear (``weight``, ``bias`` kept under their names) plus LoRA branches (``adapter``)."""

    def __init__(self, qkv: nn.Linear, rank: int, scale: float, targets):
        super().__init__()
        self.in_features, self.out_features = qkv.in_features, qkv.out_features
        self.weight = qkv.weight
        self.bias = qkv.bias
        self.dim = qkv.out_features // 3
        self.scale, self.targets = float(scale), list(targets)
        self.adapter = LoRABranches(qkv.in_features, rank, targets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        parts = list(y.split(self.dim, dim=-1))
        for k, t in enumerate(TARGETS):
            if t in self.targets:
                a = self.adapter
                parts[k] = parts[k] + self.scale * getattr(a, f"{t}_up")(getattr(a, f"{t}_down")(x))
        return torch.cat(parts, dim=-1)

    def merged(self) -> nn.Linear:
        """A plain Linear with the update merged into the weight, in FP32 (then cast back)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            w = self.weight.detach().float().clone()
            for k, t in enumerate(TARGETS):
                if t in self.targets:
                    w[k * self.dim:(k + 1) * self.dim] += self.scale * self.adapter.delta(t).float()
            lin.weight.copy_(w.to(self.weight.dtype))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin.to(self.weight.device)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, targets={self.targets}, scale={self.scale}"


class BankLoRABranches(nn.Module):
    """:class:`LoRABranches` with each sample's task's ``{t}_down``/``{t}_up`` (bank linear layers)."""

    def __init__(self, ops, dim: int, rank: int, targets):
        super().__init__()
        for t in targets:
            self.add_module(f"{t}_down", ops.linear(dim, rank, bias=False))
            self.add_module(f"{t}_up", ops.linear(rank, dim, bias=False))


class BankLoRAQKV(nn.Module):
    """:class:`LoRAQKV` over the bank's branches (referenced: their parameters live in the bank)."""

    def __init__(self, qkv: nn.Linear, branches: BankLoRABranches, scale: float, targets):
        super().__init__()
        self.weight, self.bias = qkv.weight, qkv.bias
        self.dim = qkv.out_features // 3
        self.scale, self.targets = float(scale), list(targets)
        self._branches = [branches]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, D]
        y = F.linear(x, self.weight, self.bias)
        parts = list(y.split(self.dim, dim=-1))
        a = self._branches[0]
        for k, t in enumerate(TARGETS):
            if t in self.targets:
                parts[k] = parts[k] + self.scale * getattr(a, f"{t}_up")(getattr(a, f"{t}_down")(x))
        return torch.cat(parts, dim=-1)


class LoRAFamily(AdapterFamily):
    kind = "lora"
    config_cls = LoRAConfig
    multitask = True  # separable LoRA only (why_not refuses merged LoRA)
    title = "LoRA"

    def inject(self, model, cfg: LoRAConfig):
        blocks = getattr(model, "blocks", None)
        if blocks is None or not isinstance(blocks, nn.Sequential):
            raise IncompatibleCheckpointError(
                f"{type(model).__name__} has no 'blocks' sequence; LoRA needs a timm ViT-family model."
            )
        for i in cfg.placed(len(blocks)):
            attn = getattr(blocks[i], "attn", None)
            qkv = getattr(attn, "qkv", None)
            if isinstance(qkv, LoRAQKV) or getattr(model, "shared", None) is not None or hasattr(blocks[i], "adapter"):
                raise IncompatibleCheckpointError("the model already carries adapters.")
            if not isinstance(qkv, nn.Linear) or qkv.out_features != 3 * qkv.in_features:
                raise IncompatibleCheckpointError(
                    f"LoRA targets a fused attn.qkv Linear (D -> 3D); block {i} of {type(model).__name__} has none."
                )
            attn.qkv = LoRAQKV(qkv, cfg.rank, cfg.scale, cfg.targets)
        return model

    def export_model(self, cfg: LoRAConfig, model):
        if not cfg.merge:
            return model
        for b in getattr(model, "blocks", []):
            attn = getattr(b, "attn", None)
            if isinstance(getattr(attn, "qkv", None), LoRAQKV):
                attn.qkv = attn.qkv.merged()
        return model

    def why_not(self, cfg: LoRAConfig, mode: str) -> str | None:
        if mode == "separable" and cfg.merge:
            return ("LoRA with merge: true is merged into the frozen qkv weights at export (zero runtime cost), so "
                    "there are no separate task tensors to swap. Export it without --separable, or train with "
                    "--set adapter.merge=false to keep the LoRA branches separable")
        if mode == "multitask" and cfg.merge:
            return ("LoRA with merge: true changes the backbone's own qkv weights at export (W + scale * up @ down is "
                    "folded into them), so tasks cannot share one frozen backbone in a multi-task model. Export "
                    "each task on its own, or train with --set adapter.merge=false: separable LoRA branches go in "
                    "the multi-task bank")
        return super().why_not(cfg, mode)

    def bank_tensors(self, cfg: LoRAConfig, dim, depth):
        from atexport.artifact.bank import bank_entry

        out = []
        for i in cfg.placed(depth):
            for t in cfg.targets:
                a = f"blocks.{i}.attn.qkv.adapter.{t}"
                out += [bank_entry(f"{a}_down.weight", [dim, cfg.rank], transpose=True, block=i),
                        bank_entry(f"{a}_up.weight", [cfg.rank, dim], transpose=True, block=i)]
        return out

    def bank_modules(self, cfg: LoRAConfig, vit, ops):
        dim = int(vit.embed_dim)
        return {f"blocks.{i}.attn.qkv.adapter": BankLoRABranches(ops, dim, cfg.rank, cfg.targets)
                for i in cfg.placed(len(vit.blocks))}

    def bank_wire(self, cfg: LoRAConfig, vit, modules):
        for i in cfg.placed(len(vit.blocks)):
            attn = vit.blocks[i].attn
            qkv = getattr(attn, "qkv", None)
            if not isinstance(qkv, nn.Linear) or qkv.out_features != 3 * qkv.in_features:
                raise IncompatibleCheckpointError(
                    f"LoRA targets a fused attn.qkv Linear (D -> 3D); block {i} of {type(vit).__name__} has none."
                )
            attn.qkv = BankLoRAQKV(qkv, modules[f"blocks.{i}.attn.qkv.adapter"], cfg.scale, cfg.targets)


FAMILY = register_family(LoRAFamily())
