"""Adapter-X's layers (training layout): router, shared experts, the per-block SMoA, the Prompt Generator, the
trainable CLS token, the block wrapper and the routing probe. See :mod:`atexport.adapters.adapterx`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from atexport.adapters.adapterx.config import AdapterXConfig


class Router(nn.Module):
    """Cosine routing: ``softmax(cos(proj(u), expert embedding) / tau)`` over N experts."""

    def __init__(self, d: int, experts: int, router_dim: int, tau: float, noise: float):
        super().__init__()
        self.proj = nn.Linear(d, router_dim, bias=False)
        self.embed = nn.Parameter(torch.randn(experts, router_dim))
        self.tau, self.noise = float(tau), float(noise)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        q = F.normalize(self.proj(u), dim=-1)
        k = F.normalize(self.embed, dim=-1)
        logits = torch.matmul(q, k.t()) / self.tau
        if self.training and self.noise > 0:
            logits = logits + torch.randn_like(logits) * self.noise
        return logits.softmax(dim=-1)


class Experts(nn.Module):
    """N expert adapters as two dense Linear layers: ``d -> N*r`` and ``N*r -> d`` (+ per-expert up bias)."""

    def __init__(self, d: int, experts: int, rank: int):
        super().__init__()
        self.n, self.r = experts, rank
        self.down = nn.Linear(d, experts * rank)
        self.act = nn.GELU()
        self.up = nn.Linear(experts * rank, d, bias=False)
        self.up_bias = nn.Parameter(torch.zeros(experts, d))
        for k in range(experts):  # each expert's down is Xavier-initialised as its own d x r matrix
            nn.init.xavier_uniform_(self.down.weight.data[k * rank:(k + 1) * rank])
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)

    def forward(self, u: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """``sum_n gate_n * expert_n(u)``; ``gate [..., N]`` (one-hot x probability)."""
        h = self.act(self.down(u))  # [..., N*r]
        h = (h.unflatten(-1, (self.n, self.r)) * gate.unsqueeze(-1)).flatten(-2)
        return self.up(h) + torch.matmul(gate, self.up_bias)


class ClsToken(nn.Module):
    """The trainable CLS token (layout 2), initialised as the model's; ``delta(frozen)`` is what it adds to
    the frozen token (exactly 0 at init)."""

    def __init__(self, cls_token: torch.Tensor):
        super().__init__()
        self.token = nn.Parameter(cls_token.detach().reshape(-1).clone())

    def delta(self, frozen: torch.Tensor) -> torch.Tensor:  # [1, 1, D]
        return (self.token - frozen.reshape(-1)).view(1, 1, -1)


class ClsSwap(nn.Module):
    """Wraps the ViT's ``patch_drop`` (after the position embedding, before ``norm_pre``): token 0 becomes
    the trainable CLS token (+ its position embedding) instead of the frozen one. ``cls`` is referenced (its
    parameters live under ``shared.adapter.cls``); it gives ``delta(frozen) [N or 1, 1, D]``."""

    def __init__(self, inner: nn.Module, cls, vit: nn.Module):
        super().__init__()
        self.inner = inner
        self._refs = [cls, vit]

    def forward(self, x: torch.Tensor):
        cls, vit = self._refs
        x = torch.cat([x[:, :1] + cls.delta(vit.cls_token), x[:, 1:]], dim=1)
        return self.inner(x)


class SharedModules(nn.Module):
    """What every block shares (``shared.adapter.*``): the experts, the router when shared, the CLS token."""

    def __init__(self, cfg: AdapterXConfig, d: int, cls_token: torch.Tensor | None = None):
        super().__init__()
        self.experts = Experts(d, cfg.experts, cfg.rank)
        self.router = Router(d, cfg.experts, cfg.router_dim, cfg.tau, cfg.router_noise) if cfg.share_router else None
        self.cls = ClsToken(cls_token) if cfg.train_cls else None
        self.balance = float(cfg.balance)
        self.aux: list = []  # training only: the load-balancing terms of the last forward (see balance_loss)


def balance_loss(probs: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load balancing over probabilities ``[..., N]``: ``N * sum_n f_n * P_n`` (f: share of
    sub-tokens choosing expert n, P: mean probability of n); 1 when balanced."""
    p = probs.reshape(-1, probs.shape[-1])
    n = p.shape[-1]
    f = F.one_hot(p.argmax(-1), n).to(p.dtype).mean(0)
    return n * (f * p.mean(0)).sum()


class PromptGenerator(nn.Module):
    """Layout 1: a per-block prompt added to every token, ``up(GELU(down(mean_tokens(x))))``, ``up`` zero-init."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.act = nn.GELU()
        self.up = nn.Linear(rank, dim)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x.mean(dim=1, keepdim=True))))


class PromptToken(nn.Module):
    """Layout 2, the paper's Prompt Generator: ``gamma * mean_tokens(mixture output) + beta``, one new token
    (gamma 1, beta 0 at init)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, side: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, 1, D]
        return side.mean(dim=1, keepdim=True) * self.gamma + self.beta


class SMoA(nn.Module):
    """One block's Sharing Mixture of Adapters: own norm (and router, prompt), the shared experts."""

    def __init__(self, shared: SharedModules, cfg: AdapterXConfig, norm: nn.Module, dim: int):
        super().__init__()
        self._shared = [shared]  # a reference: the shared modules are registered once, under ``shared``
        d = cfg.sub_dim(dim)
        self.heads, self.n, self.alpha, self.layout = cfg.heads, cfg.experts, cfg.alpha, cfg.layout
        self.norm = nn.LayerNorm(dim, eps=getattr(norm, "eps", 1e-6))
        with torch.no_grad():
            if getattr(norm, "weight", None) is not None:
                self.norm.weight.copy_(norm.weight)
            if getattr(norm, "bias", None) is not None:
                self.norm.bias.copy_(norm.bias)
        self.router = None if cfg.share_router else Router(d, cfg.experts, cfg.router_dim, cfg.tau, cfg.router_noise)
        self.prompt = None
        if cfg.prompt:
            self.prompt = PromptGenerator(dim, cfg.prompt_rank) if cfg.layout == 1 else PromptToken(dim)

    def mix(self, h: torch.Tensor):
        """The mixture of the normalised tokens ``h [B, T, D]``: ``(output [B, T, D], probabilities [B, T, h, N])``."""
        u = h.unflatten(-1, (self.heads, -1))  # sub-tokens [B, T, heads, d]
        shared = self._shared[0]
        probs = (self.router if self.router is not None else shared.router)(u)
        choice = probs.argmax(dim=-1, keepdim=True)
        ids = torch.arange(self.n, device=h.device)
        gate = (choice == ids).to(probs.dtype) * probs  # one-hot x probability: dense and static
        if self.training and shared.balance > 0:
            shared.aux.append(balance_loss(probs))
        return self.alpha * shared.experts(u, gate).flatten(-2), probs

    def forward(self, x: torch.Tensor, return_probs: bool = False):
        out, probs = self.mix(self.norm(x))
        return (out, probs) if return_probs else out


def block_forward(b: nn.Module, adapter, x: torch.Tensor, return_probs: bool, layout: int, drop: int):
    """A timm ``Block`` with ``adapter`` (an SMoA or its bank form) in parallel with its MLP.

    Layout 2: the adapter's norm (the block's norm2, trainable) feeds both the MLP and the mixture, and the
    Prompt Generator appends one token. Layout 1: the frozen norm2 feeds the MLP, the adapter's copy the
    mixture, the bottleneck prompt is added to every token. ``drop``: prompt tokens removed from the end
    after this block (the last block drops them all, so the norm and the head see the original tokens).
    """
    probs = None
    if adapter is None:
        x = b(x)
    elif layout == 1:
        if adapter.prompt is not None:
            x = x + adapter.prompt(x)
        x = x + b.drop_path1(b.ls1(b.attn(b.norm1(x))))
        side, probs = adapter(x, return_probs=True)
        x = x + b.drop_path2(b.ls2(b.mlp(b.norm2(x)))) + side
    else:
        x = x + b.drop_path1(b.ls1(b.attn(b.norm1(x))))
        h = adapter.norm(x)
        side, probs = adapter.mix(h)
        x = x + b.drop_path2(b.ls2(b.mlp(h))) + side
        if adapter.prompt is not None:
            x = torch.cat([x, adapter.prompt(side)], dim=1)
    if drop:
        x = x[:, :-drop]  # a static Slice
    return (x, probs) if return_probs else x


class AdapterXBlock(nn.Module):
    """A timm ``Block`` with the SMoA in parallel with its MLP (see :func:`block_forward`)."""

    def __init__(self, block: nn.Module, adapter: SMoA | None, layout: int = 1, drop: int = 0):
        super().__init__()
        self.block = block
        self.adapter = adapter
        self.layout, self.drop = int(layout), int(drop)

    def forward(self, x: torch.Tensor, return_probs: bool = False):
        return block_forward(self.block, self.adapter, x, return_probs, self.layout, self.drop)

    @property
    def routed(self) -> bool:
        return self.adapter is not None


def prompts_dropped_after(cfg: AdapterXConfig, depth: int) -> list[int]:
    """Per block, how many prompt tokens it removes at its end: all of them after the last block (layout 2 with
    the Prompt Generator), none elsewhere. The token count of every block is static: ``T + (prompts so far)``."""
    out = [0] * depth
    if cfg.layout == 2 and cfg.prompt:
        out[-1] = len(cfg.placed(depth))
    return out


class RoutingProbe(nn.Module):
    """``forward(x) -> (logits, probs of block 0, probs of block 1, ...)``: the model plus every adapted block's
    routing probabilities ``[B, T_block, heads, N]`` (``T_block`` grows by one per earlier prompt in layout 2),
    for checking the chosen expert per token in an exported graph (ORT, FP16, INT8)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        routes = []
        for b in m.blocks:
            if getattr(b, "routed", False):
                x, p = b(x, return_probs=True)
                routes.append(p)
            else:
                x = b(x)
        return (m.forward_head(m.norm(x)), *routes)
