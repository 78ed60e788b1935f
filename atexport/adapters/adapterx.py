"""Adapter-X: a Sharing Mixture of Adapters (Li, Ye, Huang et al., arXiv 2406.03051), dense and static.

The paper's code was never released; what is known (N = 4 experts shared by all blocks, token-level
routing, block-specific norms and an optional prompt generator) is kept, and every unspecified choice
is a config key, documented here:

- *Experts*: N bottleneck adapters ``up(GELU(down(u)))`` of rank ``rank`` shared by every block
  (``shared.adapter.experts.*``); ``up`` is zero-initialised (step 0 = the frozen model).
- *Sub-tokens* (``heads``, default 1): each token of width D is split into ``heads`` sub-tokens of width
  ``d = D / heads``; experts and routing work per sub-token (1: whole tokens).
- *Router* (per block unless ``share_router``): a bias-free projection ``d -> router_dim`` and N expert
  embeddings ``[N, router_dim]``; both are L2-normalised and their cosine similarity divided by the
  temperature ``tau`` (fixed, default 0.1) gives the logits; softmax gives the probabilities.
  Top-1: the chosen expert's output is scaled by its probability (so the router learns). Optional
  ``router_noise`` adds Gaussian noise to the logits in training only, never at inference.
- *Block-specific norm*: each block's adapter input is its own trainable LayerNorm of the residual
  stream after attention, initialised as a copy of the block's frozen ``norm2``.
- *Placement*: in parallel with the MLP: ``x = x + attn(norm1(x)); x = x + mlp(norm2(x)) +
  alpha * smoa(norm_b(x))`` (timm ``Block`` only).
- *Prompt generator* (``prompt``, default off): per block, ``up(GELU(down(mean over tokens of x)))``
  of rank ``prompt_rank`` is added to every token before the block; its ``up`` is zero-initialised.

**One dense, static form for training and export**: every expert is computed (one ``Linear d -> N*r``,
one ``Linear N*r -> d``) and their outputs are combined with a one-hot x probability mask (``ArgMax``,
``Equal`` with ``arange(N)``), so there are no data-dependent shapes, no TopK, no capacity dropping:
TensorRT can build it and the exported graph computes exactly what was trained. Routing decisions can
flip where the top-2 probabilities nearly tie; :class:`RoutingProbe` returns the per-block
probabilities beside the logits, and the family's probe (:class:`atexport.adapters.routing.RoutingCheck`)
lets ``atexport verify`` compare the chosen expert per token in every ONNX artifact and report the gaps.

**Multi-task bank**: the shared experts (and shared router), each block's norm, router and prompt
generator are stacked per task (:func:`bank_tensors`); the bank layers (:class:`BankSMoA`...) gather
each sample's task slice, so a mixed batch routes each sample with its own task's router and experts.

Trainable parameters (d = D/heads, e = router_dim, L adapted blocks, B = L routers, or 1 when shared):
``N (2 d r + r + d) + B (d e + N e) + 2 D L`` plus, with the prompt generator, ``L (2 D p + p + D)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from atexport.adapters.base import (
    FamilyConfig,
    AdapterFamily,
    check_number,
    check_positive_float,
    check_positive_int,
    register_family,
)
from atexport.adapters.routing import routing_margins  # noqa: F401  (re-exported: phase 1's home)
from atexport.errors import BadInputError, IncompatibleCheckpointError


@dataclass
class AdapterXConfig(FamilyConfig):
    """Adapter-X hyper-parameters (see the module docstring for what each one decides).

    Attributes:
        rank: bottleneck width r of each expert.
        experts: number of shared experts N (paper: 4).
        heads: sub-tokens per token (D must divide by it).
        router_dim: width of the routing space e.
        tau: routing temperature.
        share_router: one router for every block instead of one per block.
        prompt: the per-block prompt generator.
        prompt_rank: its bottleneck width.
        router_noise: std of the training-only noise on routing logits (0: none).
        every: an adapter on block i when ``i % every == 0``.
        alpha: output scale.
        kind: ``"adapterx"``.
    """

    rank: int = 16
    experts: int = 4
    heads: int = 1
    router_dim: int = 16
    tau: float = 0.1
    share_router: bool = False
    prompt: bool = False
    prompt_rank: int = 8
    router_noise: float = 0.0
    every: int = 1
    alpha: float = 1.0
    kind: str = "adapterx"

    def __post_init__(self):
        for key in ("rank", "experts", "heads", "router_dim", "prompt_rank", "every"):
            check_positive_int("adapterx", key, getattr(self, key))
        self.tau = check_positive_float("adapterx", "tau", self.tau)
        self.alpha = check_number("adapterx", "alpha", self.alpha)
        for key in ("share_router", "prompt"):
            if not isinstance(getattr(self, key), bool):
                raise BadInputError(f"adapterx adapter: {key} must be true or false, got {getattr(self, key)!r}.")
        self.router_noise = check_number("adapterx", "router_noise", self.router_noise, minimum=0)
        if self.kind != "adapterx":
            raise BadInputError(f"AdapterXConfig is the 'adapterx' family, got kind {self.kind!r}.")

    def sub_dim(self, dim: int) -> int:
        if dim % self.heads:
            raise BadInputError(f"adapterx adapter: width {dim} does not divide into heads={self.heads} sub-tokens.")
        return dim // self.heads

    def num_params(self, dim: int, depth: int) -> int:
        L, d, n, r, e = len(self.placed(depth)), self.sub_dim(dim), self.experts, self.rank, self.router_dim
        routers = 1 if self.share_router else L
        total = n * (2 * d * r + r + d) + routers * (d * e + n * e) + 2 * dim * L
        if self.prompt:
            p = self.prompt_rank
            total += L * (2 * dim * p + p + dim)
        return total

    def formula(self, dim: int, depth: int) -> str:
        L, d = len(self.placed(depth)), self.sub_dim(dim)
        s = (f"N(2dr + r + d) + B(de + Ne) + 2DL{' + L(2Dp + p + D)' if self.prompt else ''} "
             f"(N={self.experts}, d={d}, r={self.rank}, e={self.router_dim}, B={1 if self.share_router else L}, "
             f"D={dim}, L={L}{f', p={self.prompt_rank}' if self.prompt else ''})")
        return s


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


class SharedModules(nn.Module):
    """What every block shares (``shared.adapter.*``): the experts, and the router when shared."""

    def __init__(self, cfg: AdapterXConfig, d: int):
        super().__init__()
        self.experts = Experts(d, cfg.experts, cfg.rank)
        self.router = Router(d, cfg.experts, cfg.router_dim, cfg.tau, cfg.router_noise) if cfg.share_router else None


class PromptGenerator(nn.Module):
    """A per-block prompt added to every token: ``up(GELU(down(mean_tokens(x))))``, ``up`` zero-initialised."""

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


class SMoA(nn.Module):
    """One block's Sharing Mixture of Adapters: own norm (and router), the shared experts."""

    def __init__(self, shared: SharedModules, cfg: AdapterXConfig, norm: nn.Module, dim: int):
        super().__init__()
        self._shared = [shared]  # a reference: the shared modules are registered once, under ``shared``
        d = cfg.sub_dim(dim)
        self.heads, self.n, self.alpha = cfg.heads, cfg.experts, cfg.alpha
        self.norm = nn.LayerNorm(dim, eps=getattr(norm, "eps", 1e-6))
        with torch.no_grad():
            if getattr(norm, "weight", None) is not None:
                self.norm.weight.copy_(norm.weight)
            if getattr(norm, "bias", None) is not None:
                self.norm.bias.copy_(norm.bias)
        self.router = None if cfg.share_router else Router(d, cfg.experts, cfg.router_dim, cfg.tau, cfg.router_noise)
        self.prompt = PromptGenerator(dim, cfg.prompt_rank) if cfg.prompt else None

    def route(self, x: torch.Tensor):
        """``(sub-tokens [B, T, h, d], probabilities [B, T, h, N])``."""
        u = self.norm(x).unflatten(-1, (self.heads, -1))
        router = self.router if self.router is not None else self._shared[0].router
        return u, router(u)

    def forward(self, x: torch.Tensor, return_probs: bool = False):
        u, probs = self.route(x)
        choice = probs.argmax(dim=-1, keepdim=True)
        ids = torch.arange(self.n, device=x.device)
        gate = (choice == ids).to(probs.dtype) * probs  # one-hot x probability: dense and static
        out = self.alpha * self._shared[0].experts(u, gate).flatten(-2)
        return (out, probs) if return_probs else out


def _block_forward(b: nn.Module, adapter, x: torch.Tensor, return_probs: bool):
    """A timm ``Block`` with ``adapter`` (an SMoA or its bank form) in parallel with its MLP."""
    probs = None
    if adapter is None:
        x = b(x)
    else:
        if adapter.prompt is not None:
            x = x + adapter.prompt(x)
        x = x + b.drop_path1(b.ls1(b.attn(b.norm1(x))))
        side, probs = adapter(x, return_probs=True)
        x = x + b.drop_path2(b.ls2(b.mlp(b.norm2(x)))) + side
    return (x, probs) if return_probs else x


class AdapterXBlock(nn.Module):
    """A timm ``Block`` with the SMoA in parallel with its MLP (and the prompt before it)."""

    def __init__(self, block: nn.Module, adapter: SMoA | None):
        super().__init__()
        self.block = block
        self.adapter = adapter

    def forward(self, x: torch.Tensor, return_probs: bool = False):
        return _block_forward(self.block, self.adapter, x, return_probs)

    @property
    def routed(self) -> bool:
        return self.adapter is not None


# --------------------------------------------------------------------------------------------------
# The multi-task bank: the same maths with every trainable tensor stacked per task


class BankRouter(nn.Module):
    """:class:`Router` with each sample's task's projection and expert embeddings."""

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
    """:class:`Experts` with each sample's task's experts (``down``, ``up``, ``up_bias`` stacked per task)."""

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
    """:class:`PromptGenerator` with each sample's task's weights."""

    def __init__(self, ops, dim: int, rank: int):
        super().__init__()
        self.down = ops.linear(dim, rank)
        self.act = nn.GELU()
        self.up = ops.linear(rank, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x.mean(dim=1, keepdim=True))))


class BankSMoA(nn.Module):
    """:class:`SMoA` reading the bank: own norm (router, prompt) per block, the task's shared experts."""

    def __init__(self, ops, cfg: AdapterXConfig, dim: int, eps: float, experts: BankExperts, router: BankRouter | None):
        super().__init__()
        d = cfg.sub_dim(dim)
        self._shared = [experts, router]
        self.heads, self.n, self.alpha = cfg.heads, cfg.experts, cfg.alpha
        self.norm = BankNorm(ops, dim, eps)
        self.router = None if cfg.share_router else BankRouter(ops, d, cfg.experts, cfg.router_dim, cfg.tau)
        self.prompt = BankPrompt(ops, dim, cfg.prompt_rank) if cfg.prompt else None

    def forward(self, x: torch.Tensor, return_probs: bool = False):
        u = self.norm(x).unflatten(-1, (self.heads, -1))  # [B, T, h, d]
        shape = u.shape
        u = u.flatten(1, 2)  # [B, T*h, d]: bank layers take one row of tokens per sample
        router = self.router if self.router is not None else self._shared[1]
        probs = router(u)
        choice = probs.argmax(dim=-1, keepdim=True)
        ids = torch.arange(self.n, device=x.device)
        gate = (choice == ids).to(probs.dtype) * probs
        out = self.alpha * self._shared[0](u, gate).unflatten(1, (shape[1], shape[2])).flatten(-2)
        probs = probs.unflatten(1, (shape[1], shape[2]))
        return (out, probs) if return_probs else out


class BankXBlock(nn.Module):
    """:class:`AdapterXBlock` over the bank's SMoA (referenced: its parameters live in the bank)."""

    routed = True

    def __init__(self, block: nn.Module, adapter: BankSMoA):
        super().__init__()
        self.block = block
        self._adapter = [adapter]

    def forward(self, x: torch.Tensor, return_probs: bool = False):
        return _block_forward(self.block, self._adapter[0], x, return_probs)


def bank_tensors(cfg: AdapterXConfig, dim: int, depth: int) -> list[dict]:
    """Adapter-X's bank tensors: the shared experts (and shared router), then per block its norm, router and
    prompt generator; 2-D weights transposed to ``x @ W``."""
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
    for i in cfg.placed(depth):
        a = f"blocks.{i}.adapter"
        out += [bank_entry(f"{a}.norm.weight", [dim], block=i), bank_entry(f"{a}.norm.bias", [dim], block=i)]
        if not cfg.share_router:
            out += router(f"{a}.router", i)
        if cfg.prompt:
            out += [bank_entry(f"{a}.prompt.down.weight", [dim, p], transpose=True, block=i),
                    bank_entry(f"{a}.prompt.down.bias", [p], block=i),
                    bank_entry(f"{a}.prompt.up.weight", [p, dim], transpose=True, block=i),
                    bank_entry(f"{a}.prompt.up.bias", [dim], block=i)]
    return out


_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


class RoutingProbe(nn.Module):
    """``forward(x) -> (logits, probs [blocks, B, T, heads, N])``: the model plus every adapted block's routing
    probabilities, for checking the chosen expert per token in an exported graph (ORT, FP16, INT8)."""

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
        return m.forward_head(m.norm(x)), torch.stack(routes)


class AdapterXFamily(AdapterFamily):
    kind = "adapterx"
    config_cls = AdapterXConfig
    separable = True
    multitask = True
    title = "Adapter-X"

    def inject(self, model, cfg: AdapterXConfig):
        from atexport.adapters.adaptertune import AdapterBlock

        blocks = getattr(model, "blocks", None)
        dim = getattr(model, "embed_dim", None)
        if blocks is None or not isinstance(blocks, nn.Sequential) or dim is None:
            raise IncompatibleCheckpointError(
                f"{type(model).__name__} has no 'blocks' sequence; Adapter-X needs a timm ViT-family model."
            )
        if any(isinstance(b, (AdapterBlock, AdapterXBlock)) for b in blocks) or getattr(model, "shared", None) is not None:
            raise IncompatibleCheckpointError("the model already carries adapters.")
        bad = [type(b).__name__ for b in blocks if not all(hasattr(b, p) for p in _BLOCK_PARTS)]
        if bad:
            raise IncompatibleCheckpointError(
                f"Adapter-X runs in parallel with the MLP of timm's ViT Block; {bad[0]} blocks are not supported."
            )
        shared = SharedModules(cfg, cfg.sub_dim(dim))
        placed = set(cfg.placed(len(blocks)))
        model.blocks = nn.Sequential(*[
            AdapterXBlock(b, SMoA(shared, cfg, b.norm2, dim) if i in placed else None) for i, b in enumerate(blocks)
        ])
        model.shared = nn.ModuleDict({"adapter": shared})
        return model

    def bank_tensors(self, cfg: AdapterXConfig, dim, depth):
        return bank_tensors(cfg, dim, depth)

    def bank_modules(self, cfg: AdapterXConfig, vit, ops):
        dim, d = int(vit.embed_dim), cfg.sub_dim(int(vit.embed_dim))
        self._check_blocks(vit.blocks)
        experts = BankExperts(ops, d, cfg.experts, cfg.rank)
        out = {"shared.adapter.experts": experts}
        router = None
        if cfg.share_router:
            router = out["shared.adapter.router"] = BankRouter(ops, d, cfg.experts, cfg.router_dim, cfg.tau)
        for i in cfg.placed(len(vit.blocks)):
            eps = getattr(vit.blocks[i].norm2, "eps", 1e-6)
            out[f"blocks.{i}.adapter"] = BankSMoA(ops, cfg, dim, eps, experts, router)
        return out

    def bank_wire(self, cfg: AdapterXConfig, vit, modules):
        blocks = list(vit.blocks)
        for i in cfg.placed(len(blocks)):
            blocks[i] = BankXBlock(blocks[i], modules[f"blocks.{i}.adapter"])
        vit.blocks = nn.Sequential(*blocks)

    def probes(self, cfg):
        from atexport.adapters.routing import RoutingCheck

        return [RoutingCheck()]

    @staticmethod
    def _check_blocks(blocks):
        bad = [type(b).__name__ for b in blocks if not all(hasattr(b, p) for p in _BLOCK_PARTS)]
        if bad:
            raise IncompatibleCheckpointError(
                f"Adapter-X runs in parallel with the MLP of timm's ViT Block; {bad[0]} blocks are not supported."
            )


FAMILY = register_family(AdapterXFamily())
