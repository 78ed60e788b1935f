"""Adapter-X's config (torch-free): the keys, their validation, the layout version and the parameter formula.

Two layouts exist (``layout``), and a checkpoint records which one it was trained with:

- ``2`` (the default, the paper's layout): shared router, the block's norm2 trainable and feeding both the
  FFN and the mixture, sub-token split (``heads`` 4), the paper's Prompt Generator (mean of the mixture
  output, scale gamma, shift beta, appended as a token), trainable CLS token.
- ``1`` (atexport before issue 19): per-block routers, a trainable copy of norm2 feeding the mixture only,
  no sub-token split, the optional bottleneck prompt added to every token, CLS frozen. Records without a
  ``layout`` key (written before it existed) are this layout (:func:`atexport.artifact.fit.record_with_defaults`,
  which every checkpoint and artifact record passes through), so they load and
  export exactly as before.

Keys left ``None`` take their layout's default in ``__post_init__``; the record holds the resolved values.
"""

from __future__ import annotations

from dataclasses import dataclass

from atexport.adapters.base import FamilyConfig, check_number, check_positive_float, check_positive_int
from atexport.errors import BadInputError

LAYOUTS = (1, 2)
PAPER_LAYOUT = 2

# layout -> defaults of the keys that differ between layouts
_LAYOUT_DEFAULTS = {
    1: {"heads": 1, "share_router": False, "prompt": False, "train_cls": False},
    2: {"heads": 4, "share_router": True, "prompt": True, "train_cls": True},
}


@dataclass
class AdapterXConfig(FamilyConfig):
    """Adapter-X hyper-parameters (see :mod:`atexport.adapters.adapterx` for what each one decides).

    Attributes:
        rank: bottleneck width r of each expert.
        experts: number of shared experts N (paper: 4).
        heads: sub-tokens per token (D must divide by it); paper: a split, count not given; default 4
            (layout 1: 1).
        router_dim: width of the routing space e (paper: not given).
        tau: routing temperature of the cosine router (paper: not given).
        share_router: one router for every block (layout 2 default, as the paper) instead of one per block.
        prompt: the per-block Prompt Generator (layout 2: the paper's, appended token; layout 1: the
            bottleneck prompt added to every token).
        prompt_rank: layout 1's bottleneck prompt width (unused in layout 2).
        train_cls: train the CLS token (layout 2 default, as the paper).
        balance: weight of a load-balancing loss on the routing (paper: none given; 0 = off); training only.
        router_noise: std of the training-only noise on routing logits (0: none).
        every: an adapter on block i when ``i % every == 0``.
        alpha: output scale of the mixture.
        layout: 2 (the paper's) or 1 (atexport's earlier layout, for its checkpoints).
        kind: ``"adapterx"``.
    """

    rank: int = 16
    experts: int = 4
    heads: int | None = None
    router_dim: int = 16
    tau: float = 0.1
    share_router: bool | None = None
    prompt: bool | None = None
    prompt_rank: int = 8
    train_cls: bool | None = None
    balance: float = 0.0
    router_noise: float = 0.0
    every: int = 1
    alpha: float = 1.0
    layout: int = PAPER_LAYOUT
    kind: str = "adapterx"

    def __post_init__(self):
        if isinstance(self.layout, bool) or self.layout not in LAYOUTS:
            raise BadInputError(f"adapterx adapter: layout must be one of {', '.join(map(str, LAYOUTS))} "
                                f"(2: the paper's; 1: atexport's earlier one), got {self.layout!r}.")
        for key, value in _LAYOUT_DEFAULTS[self.layout].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        for key in ("rank", "experts", "heads", "router_dim", "prompt_rank", "every"):
            check_positive_int("adapterx", key, getattr(self, key))
        self.tau = check_positive_float("adapterx", "tau", self.tau)
        self.alpha = check_number("adapterx", "alpha", self.alpha)
        for key in ("share_router", "prompt", "train_cls"):
            if not isinstance(getattr(self, key), bool):
                raise BadInputError(f"adapterx adapter: {key} must be true or false, got {getattr(self, key)!r}.")
        for key in ("router_noise", "balance"):
            setattr(self, key, check_number("adapterx", key, getattr(self, key), minimum=0))
        if self.layout == 1 and self.train_cls:
            raise BadInputError("adapterx adapter: train_cls needs layout 2 (the paper's layout); layout 1 keeps "
                                "the CLS token frozen.")
        if self.kind != "adapterx":
            raise BadInputError(f"AdapterXConfig is the 'adapterx' family, got kind {self.kind!r}.")

    def sub_dim(self, dim: int) -> int:
        if dim % self.heads:
            raise BadInputError(f"adapterx adapter: width {dim} does not divide into heads={self.heads} sub-tokens.")
        return dim // self.heads

    def num_params(self, dim: int, depth: int) -> int:
        """Trainable adapter parameters (the head not included) on a ViT of width ``dim`` and ``depth`` blocks."""
        L, d, n, r, e = len(self.placed(depth)), self.sub_dim(dim), self.experts, self.rank, self.router_dim
        routers = 1 if self.share_router else L
        total = n * (2 * d * r + r + d) + routers * (d * e + n * e) + 2 * dim * L
        if self.prompt and self.layout == 1:
            p = self.prompt_rank
            total += L * (2 * dim * p + p + dim)
        elif self.prompt:
            total += 2 * dim * L
        return total + (dim if self.train_cls else 0)

    def formula(self, dim: int, depth: int) -> str:
        L, d = len(self.placed(depth)), self.sub_dim(dim)
        terms = "N(2dr + r + d) + B(de + Ne) + 2DL"
        if self.prompt:
            terms += " + L(2Dp + p + D)" if self.layout == 1 else " + 2DL"
        if self.train_cls:
            terms += " + D"
        extra = f", p={self.prompt_rank}" if self.prompt and self.layout == 1 else ""
        return (f"{terms} (N={self.experts}, d={d}, r={self.rank}, e={self.router_dim}, "
                f"B={1 if self.share_router else L}, D={dim}, L={L}{extra}; layout {self.layout})")
