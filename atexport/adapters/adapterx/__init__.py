"""Adapter-X: a Sharing Mixture of Adapters (Li, Ye, Huang et al., arXiv 2406.03051), dense and static.

The paper's code was never released (its repository, leoli646/Adapter-X, holds only the figures). What the
abstract, the captions and the method figure (``../shared/papers/``) show is followed in the default
``layout: 2``; every choice the paper leaves open is a config key, listed here:

- *Experts* (paper): N = 4 bottleneck adapters ``up(GELU(down(u)))`` of rank ``rank`` shared by every
  block (``shared.adapter.experts.*``); ``up`` is zero-initialised (the mixture adds 0 at step 0).
- *Sub-tokens* (paper: "multi-head split/merge"; count not given, ``heads`` default 4): each token of
  width D is split into ``heads`` sub-tokens of width ``d = D / heads``; routing and experts work per
  sub-token.
- *Router* (paper: shared across blocks, linear + L2-normalised expert embeddings): a bias-free projection
  ``d -> router_dim`` (``router_dim`` 16: not given) and N expert embeddings, cosine similarity divided by
  the temperature ``tau`` (fixed 0.1: not given), softmax; top-1, the chosen expert's output scaled by its
  probability. ``share_router: false`` gives one router per block (layout 1's default).
- *Load balancing* (paper: not given): ``balance`` > 0 adds a Switch-style loss ``N sum_n f_n P_n``
  (:func:`~atexport.adapters.adapterx.modules.balance_loss`) per routed block; default 0 (off).
- *Block-specific norm* (paper): the block's norm2 is trainable and feeds both the FFN and the mixture.
  atexport holds it as ``blocks.i.adapter.norm`` (initialised as norm2, used in norm2's place) so the
  backbone stays the frozen, shared one and the norm is a task tensor; the frozen norm2 is unused.
- *Placement* (paper): in parallel with the FFN: ``x = x + attn(norm1(x)); h = norm_b(x);
  x = x + mlp(h) + alpha * smoa(h)`` (timm ``Block`` only).
- *Prompt Generator* (paper): per block, ``gamma * mean_tokens(smoa(h)) + beta`` (gamma 1, beta 0 at init:
  not given) appended as a new token after the block, so block k sees the tokens plus k earlier prompts.
  Every block's token count is static (``T + prompts so far``); the last block drops the prompts so the
  final norm and head see the original tokens (the paper's head reads CLS; with ``global_pool: avg`` the
  mean is over patch tokens only, an atexport choice). Because later blocks attend to the prompt tokens,
  **step 0 is not exactly the frozen model with the Prompt Generator on** (it is with ``prompt: false``).
- *CLS token* (paper): trainable (``train_cls``), held as ``shared.adapter.cls.token``: the frozen token
  is replaced by it after the position embedding (``ClsSwap`` around ``patch_drop``).

Departures that remain (also in the README's families table): the expert count, router width, temperature,
sub-token count and PG init are atexport's choices; experts carry biases; routing is dense (below); the
PG's prompts are dropped before the head.

**One dense, static form for training and export**: every expert is computed (one ``Linear d -> N*r``,
one ``Linear N*r -> d``) and their outputs are combined with a one-hot x probability mask (``ArgMax``,
``Equal`` with ``arange(N)``), so there are no data-dependent shapes, no TopK, no capacity dropping:
TensorRT can build it and the exported graph computes exactly what was trained. Routing decisions can
flip where the top-2 probabilities nearly tie; :class:`RoutingProbe` returns the per-block probabilities
beside the logits, and the family's probe (:class:`atexport.adapters.routing.RoutingCheck`) lets ``atexport
verify`` compare the chosen expert per token in every ONNX artifact and report the gaps.

**Task tensors**: everything trained is named ``*.adapter.*`` (the registry's one predicate,
:func:`atexport.adapters.base.is_adapter_tensor`): experts, router, CLS token, per-block norms and prompt
generators; so separable export, swap, banks and keep-float rules treat them as the task's.

**Multi-task bank**: those tensors are stacked per task (:mod:`~atexport.adapters.adapterx.bank`); a mixed
batch routes each sample with its own task's router, experts, norms, prompts and CLS token.

**Layouts**: ``layout: 1`` is atexport's earlier Adapter-X (per-block routers, a norm copy feeding the
mixture only, no split, a bottleneck prompt added to every token, frozen CLS); checkpoints without
``layout`` are layout 1 and load and export exactly as before (:mod:`~atexport.adapters.adapterx.config`).

Trainable parameters (d = D/heads, e = router_dim, L adapted blocks, B = 1 shared router or L):
``N (2 d r + r + d) + B (d e + N e) + 2 D L`` + ``2 D L`` (layout 2 PG) + ``D`` (CLS); layout 1's prompt adds
``L (2 D p + p + D)``. ViT-B (D 768, 12 blocks) with the defaults (r 16, heads 4): 66,176 = 0.077% of the
backbone; ``--rank 64``: 140,096 = 0.163% (the paper reports 0.20%).
"""

from __future__ import annotations

from torch import nn

from atexport.adapters.adapterx.bank import bank_modules, bank_tensors, bank_wire
from atexport.adapters.adapterx.config import LAYOUTS, PAPER_LAYOUT, AdapterXConfig
from atexport.adapters.adapterx.modules import (
    AdapterXBlock,
    ClsSwap,
    RoutingProbe,
    SharedModules,
    SMoA,
    balance_loss,
    prompts_dropped_after,
)
from atexport.adapters.base import AdapterFamily, register_family
from atexport.adapters.routing import routing_margins
from atexport.errors import IncompatibleCheckpointError

__all__ = ["LAYOUTS", "PAPER_LAYOUT", "AdapterXBlock", "AdapterXConfig", "AdapterXFamily", "RoutingProbe",
           "balance_loss", "bank_tensors", "routing_margins"]

_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


def _check_blocks(blocks) -> None:
    bad = [type(b).__name__ for b in blocks if not all(hasattr(b, p) for p in _BLOCK_PARTS)]
    if bad:
        raise IncompatibleCheckpointError(
            f"Adapter-X runs in parallel with the MLP of timm's ViT Block; {bad[0]} blocks are not supported."
        )


def _check_cls(model, cfg: AdapterXConfig) -> None:
    if cfg.train_cls and getattr(model, "cls_token", None) is None:
        raise IncompatibleCheckpointError(
            f"{type(model).__name__} has no CLS token to train; set adapter.train_cls=false for this model."
        )


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
        _check_blocks(blocks)
        _check_cls(model, cfg)
        shared = SharedModules(cfg, cfg.sub_dim(dim), model.cls_token if cfg.train_cls else None)
        placed = set(cfg.placed(len(blocks)))
        drops = prompts_dropped_after(cfg, len(blocks))
        model.blocks = nn.Sequential(*[
            AdapterXBlock(b, SMoA(shared, cfg, b.norm2, dim) if i in placed else None, cfg.layout, drops[i])
            for i, b in enumerate(blocks)
        ])
        model.shared = nn.ModuleDict({"adapter": shared})
        if cfg.train_cls:
            model.patch_drop = ClsSwap(model.patch_drop, shared.cls, model)
        return model

    def bank_tensors(self, cfg: AdapterXConfig, dim, depth):
        return bank_tensors(cfg, dim, depth)

    def bank_modules(self, cfg: AdapterXConfig, vit, ops):
        _check_blocks(vit.blocks)
        _check_cls(vit, cfg)
        return bank_modules(cfg, vit, ops)

    def bank_wire(self, cfg: AdapterXConfig, vit, modules):
        bank_wire(cfg, vit, modules)

    def aux_loss(self, cfg: AdapterXConfig, model):
        """The load-balancing loss of the last training forward (``balance`` x mean over routed blocks), or None."""
        holder = getattr(model, "shared", None)
        shared = holder["adapter"] if isinstance(holder, nn.ModuleDict) and "adapter" in holder else None
        if shared is None or not getattr(shared, "aux", None):
            return None
        terms, shared.aux = shared.aux, []
        return shared.balance * sum(terms) / len(terms)

    def probes(self, cfg):
        from atexport.adapters.routing import RoutingCheck

        return [RoutingCheck(RoutingProbe)]


FAMILY = register_family(AdapterXFamily())
