"""Adapter-X's multi-task bank: the same maths as :mod:`~atexport.adapters.adapterx.modules` with every task
tensor stacked per task (a leading task axis) and each sample reading its own task's slice."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from atexport.adapters.adapterx.config import AdapterXConfig
from atexport.adapters.adapterx.modules import block_forward


class BankRouter(nn.Module):
    """:class:`~atexport.adapters.adapterx.modules.Router` with each sample's task's projection and embeddings."""

    def __init__(self, ops, d: int, experts: int, router_dim: int, tau: float):
        super().__init__()
        self._ops = [ops]
        self.proj = ops.linear(d, router_dim, bias=False)
        self.embed = ops.param(experts, router_dim)
        self.tau = float(tau)

    def forward(self, u: torch.Tensor) -> torch.Tensor:  # u [B, S, d]
        q = F.normalize(self.proj(u), dim=-1)
        k = F.normalize(self._ops[0].select(self.embed), dim=-1)  # [B, N, e]
        return (torch.matmul(q, k.transpose(1, 2)) / self.tau).softmax(dim=-1)


class BankExperts(nn.Module):
    """The experts with each sample's task's ``down``, ``up``, ``up_bias``."""

    def __init__(self, ops, d: int, experts: int, rank: int):
        super().__init__()
        self._ops = [ops]
        self.n, self.r = experts, rank
        self.down = ops.linear(d, experts * rank)
        self.act = nn.GELU()
        self.up = ops.linear(experts * rank, d, bias=False)
        self.up_bias = ops.param(experts, d)

    def forward(self, u: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:  # u [B, S, d], gate [B, S, N]
        h = self.act(self.down(u))
        h = (h.unflatten(-1, (self.n, self.r)) * gate.unsqueeze(-1)).flatten(-2)
        return self.up(h) + torch.matmul(gate, self._ops[0].select(self.up_bias))


class BankNorm(nn.Module):
    """A LayerNorm whose scale and shift are each sample's task's."""

    def __init__(self, ops, dim: int, eps: float):
        super().__init__()
        self._ops = [ops]
        self.weight, self.bias, self.eps, self.dim = ops.param(dim), ops.param(dim), float(eps), int(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, D]
        sel = self._ops[0].select
        return F.layer_norm(x, (self.dim,), None, None, self.eps) * sel(self.weight).unsqueeze(1) \
            + sel(self.bias).unsqueeze(1)


class BankPrompt(nn.Module):
    """Layout 1's bottleneck prompt with each sample's task's weights."""

    def __init__(self, ops, dim: int, rank: int):
        super().__init__()
        self.down = ops.linear(dim, rank)
        self.act = nn.GELU()
        self.up = ops.linear(rank, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x.mean(dim=1, keepdim=True))))


class BankPromptToken(nn.Module):
    """Layout 2's Prompt Generator (``gamma * mean + beta``) with each sample's task's gamma and beta."""

    def __init__(self, ops, dim: int):
        super().__init__()
        self._ops = [ops]
        self.gamma, self.beta = ops.param(dim), ops.param(dim)

    def forward(self, side: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, 1, D]
        sel = self._ops[0].select
        return side.mean(dim=1, keepdim=True) * sel(self.gamma).unsqueeze(1) + sel(self.beta).unsqueeze(1)


class BankCls(nn.Module):
    """Layout 2's trainable CLS token, each sample's task's (``delta`` as :class:`ClsToken`'s, ``[B, 1, D]``)."""

    def __init__(self, ops, dim: int):
        super().__init__()
        self._ops = [ops]
        self.token = ops.param(dim)

    def delta(self, frozen: torch.Tensor) -> torch.Tensor:
        return (self._ops[0].select(self.token) - frozen.reshape(-1)).unsqueeze(1)


class BankSMoA(nn.Module):
    """:class:`~atexport.adapters.adapterx.modules.SMoA` reading the bank: own norm (router, prompt) per block,
    the task's shared experts (and shared router)."""

    def __init__(self, ops, cfg: AdapterXConfig, dim: int, eps: float, experts: BankExperts, router: BankRouter | None):
        super().__init__()
        d = cfg.sub_dim(dim)
        self._shared = [experts, router]
        self.heads, self.n, self.alpha = cfg.heads, cfg.experts, cfg.alpha
        self.norm = BankNorm(ops, dim, eps)
        self.router = None if cfg.share_router else BankRouter(ops, d, cfg.experts, cfg.router_dim, cfg.tau)
        self.prompt = None
        if cfg.prompt:
            self.prompt = BankPrompt(ops, dim, cfg.prompt_rank) if cfg.layout == 1 else BankPromptToken(ops, dim)

    def mix(self, h: torch.Tensor):
        u = h.unflatten(-1, (self.heads, -1))  # [B, T, h, d]
        shape = u.shape
        u = u.flatten(1, 2)  # [B, T*h, d]: bank layers take one row of tokens per sample
        router = self.router if self.router is not None else self._shared[1]
        probs = router(u)
        choice = probs.argmax(dim=-1, keepdim=True)
        ids = torch.arange(self.n, device=h.device)
        gate = (choice == ids).to(probs.dtype) * probs
        out = self.alpha * self._shared[0](u, gate).unflatten(1, (shape[1], shape[2])).flatten(-2)
        return out, probs.unflatten(1, (shape[1], shape[2]))

    def forward(self, x: torch.Tensor, return_probs: bool = False):
        out, probs = self.mix(self.norm(x))
        return (out, probs) if return_probs else out


class BankXBlock(nn.Module):
    """:class:`~atexport.adapters.adapterx.modules.AdapterXBlock` over the bank's SMoA (referenced: its
    parameters live in the bank)."""

    def __init__(self, block: nn.Module, adapter: BankSMoA | None, layout: int, drop: int):
        super().__init__()
        self.block = block
        self._adapter = [adapter]
        self.layout, self.drop = int(layout), int(drop)

    @property
    def routed(self) -> bool:
        return self._adapter[0] is not None

    def forward(self, x: torch.Tensor, return_probs: bool = False):
        return block_forward(self.block, self._adapter[0], x, return_probs, self.layout, self.drop)


def bank_tensors(cfg: AdapterXConfig, dim: int, depth: int) -> list[dict]:
    """Adapter-X's bank tensors: the shared experts (shared router, CLS token), then per block its norm, router
    and prompt generator; 2-D weights transposed to ``x @ W``."""
    from atexport.artifact.bank import bank_entry

    d, n, r, e, p = cfg.sub_dim(dim), cfg.experts, cfg.rank, cfg.router_dim, cfg.prompt_rank
    ex = "shared.adapter.experts"
    out = [bank_entry(f"{ex}.down.weight", [d, n * r], transpose=True), bank_entry(f"{ex}.down.bias", [n * r]),
           bank_entry(f"{ex}.up.weight", [n * r, d], transpose=True), bank_entry(f"{ex}.up_bias", [n, d])]

    def router(prefix, block=None):
        return [bank_entry(f"{prefix}.proj.weight", [d, e], transpose=True, block=block),
                bank_entry(f"{prefix}.embed", [n, e], block=block)]

    if cfg.share_router:
        out += router("shared.adapter.router")
    if cfg.train_cls:
        out.append(bank_entry("shared.adapter.cls.token", [dim]))
    for i in cfg.placed(depth):
        a = f"blocks.{i}.adapter"
        out += [bank_entry(f"{a}.norm.weight", [dim], block=i), bank_entry(f"{a}.norm.bias", [dim], block=i)]
        if not cfg.share_router:
            out += router(f"{a}.router", i)
        if cfg.prompt and cfg.layout == 1:
            out += [bank_entry(f"{a}.prompt.down.weight", [dim, p], transpose=True, block=i),
                    bank_entry(f"{a}.prompt.down.bias", [p], block=i),
                    bank_entry(f"{a}.prompt.up.weight", [p, dim], transpose=True, block=i),
                    bank_entry(f"{a}.prompt.up.bias", [dim], block=i)]
        elif cfg.prompt:
            out += [bank_entry(f"{a}.prompt.gamma", [dim], block=i), bank_entry(f"{a}.prompt.beta", [dim], block=i)]
    return out


def bank_modules(cfg: AdapterXConfig, vit, ops) -> dict:
    """The bank layers at their paths (see :meth:`atexport.adapters.base.AdapterFamily.bank_modules`)."""
    dim, d = int(vit.embed_dim), cfg.sub_dim(int(vit.embed_dim))
    experts = BankExperts(ops, d, cfg.experts, cfg.rank)
    out = {"shared.adapter.experts": experts}
    router = None
    if cfg.share_router:
        router = out["shared.adapter.router"] = BankRouter(ops, d, cfg.experts, cfg.router_dim, cfg.tau)
    if cfg.train_cls:
        out["shared.adapter.cls"] = BankCls(ops, dim)
    for i in cfg.placed(len(vit.blocks)):
        eps = getattr(vit.blocks[i].norm2, "eps", 1e-6)
        out[f"blocks.{i}.adapter"] = BankSMoA(ops, cfg, dim, eps, experts, router)
    return out


def bank_wire(cfg: AdapterXConfig, vit, modules: dict) -> None:
    """Make ``vit`` call the bank layers as the single-task model calls its adapters (in place)."""
    from atexport.adapters.adapterx.modules import ClsSwap, prompts_dropped_after

    blocks = list(vit.blocks)
    drops = prompts_dropped_after(cfg, len(blocks))
    placed = set(cfg.placed(len(blocks)))
    for i, b in enumerate(blocks):
        if i in placed or drops[i]:
            blocks[i] = BankXBlock(b, modules[f"blocks.{i}.adapter"] if i in placed else None, cfg.layout, drops[i])
    vit.blocks = nn.Sequential(*blocks)
    if cfg.train_cls:
        vit.patch_drop = ClsSwap(vit.patch_drop, modules["shared.adapter.cls"], vit)
