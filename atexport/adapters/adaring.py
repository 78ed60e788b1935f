"""AdaRing: the adapters of all layers as one tensor in tensor-ring form (Huang et al., arXiv 2508.11870).

**What is the paper's and what is atexport's.** Only the abstract was available to us (``../shared/papers/``;
the full text at arxiv.org/html/2508.11870v2 was not readable through our tools, and no code is public).
From the abstract: adapters of all layers written as a cross-layer tensor-ring decomposition with
layer-shared tensor cores and layer-specific slices, and "diverse rank-driven adapters" that cooperate. Everything
else below is atexport's own reading: the core shapes, biases outside the ring, the init, the contiguous
``group_ranks`` groups (off by default) and the parameter formula of point 6 (not a number from the paper).
The paper's "generalization-aware fine-tuning" is **absent**: no public source we could read defines it,
so atexport does not offer it. Every choice is listed so that it can be checked against the paper and
changed in one place:

1. *What is shared.* AdapterTune's per-layer bottleneck weights are stacked into
   ``W_down in R^{L x D x r}`` and ``W_up in R^{L x r x D}`` (L adapted layers, width D, rank r). Each is a
   tensor ring of ring rank R: ``W[l, i, j] = Tr(Z[:, l, :] @ A[:, i, :] @ B[:, j, :])`` with a *layer
   core* ``Z in R^{R x L x R}`` (a layer-specific slice ``Z[:, l, :]`` per layer), a *width core*
   ``A in R^{R x D x R}`` and a *rank core* ``B in R^{R x r x R}``, both shared by all layers. Down and up
   have their own three cores (``W_up[l, j, i]`` uses the same formula with i over D, j over r).
2. *Biases* are per layer and not in ring form (``r`` for down, ``D`` for up).
3. *Placement, activation and scale* are AdapterTune's: after the block, ``h <- h + alpha *
   up(GELU(down(h)))`` with exact GELU, on blocks ``i % every == 0``.
4. *Init.* The layer core of ``W_up`` is zero, so ``W_up = 0`` and step 0 computes exactly the frozen
   model. The other five cores are N(0, s^2) with ``s = (2 / ((D + r) R^3))^(1/6)``: a ring entry is a
   sum of R^3 products of three core entries, so its variance ``R^3 s^6`` equals Xavier's ``2 / (D + r)``.
5. *Diverse rank* (atexport's design for the abstract's "diverse rank-driven adapters"): optional
   ``group_ranks`` split the L adapted layers into contiguous groups (as equal as possible, earlier groups
   one larger) with their own ranks ``r_g <= r``; a layer of group g uses the first ``r_g`` slices of the
   shared rank core, so layers of different ranks share ``A``, ``B`` and the ring. The largest group rank
   must equal ``rank``.
6. *Trainable parameters* (atexport's count of its own layout, not a paper number):
   ``2 R^2 (L + D + r) + sum_l (r_l + D)``, i.e. ``2R^2(L + D + r) + L(r + D)`` with one rank (ViT-S, r 16,
   R 8: 57,536, against AdapterTune's 152,256).

Training materialises each layer's matrices from the ring in every forward pass. **Export** does the
same once, in FP32, into AdapterTune's layout (``blocks.{i}.adapter.{down,up}.{weight,bias}``; layers of
a smaller group rank are zero-padded to ``rank``, which changes no output since GELU(0) = 0 meets zero
columns of ``up``), so the ONNX graph, swap, multi-task bank, FP16/INT8 and TensorRT are exactly AdapterTune's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from atexport.adapters.adaptertune import AdapterConfig, wrap_blocks
from atexport.adapters.base import (
    FamilyConfig,
    AdapterFamily,
    check_number,
    check_positive_int,
    register_family,
)
from atexport.errors import BadInputError, IncompatibleCheckpointError

SHARED = "shared.adapter."
CORES = ("down_layer", "down_dim", "down_rank", "up_layer", "up_dim", "up_rank")


@dataclass
class AdaRingConfig(FamilyConfig):
    """AdaRing hyper-parameters.

    Attributes:
        rank: bottleneck width r (the largest rank when ``group_ranks`` is set).
        ring_rank: tensor-ring rank R.
        every: an adapter on block i when ``i % every == 0``.
        alpha: output scale.
        group_ranks: optional ranks of contiguous layer groups ("diverse rank"); ``max == rank``.
        kind: ``"adaring"``.
    """

    rank: int = 16
    ring_rank: int = 8
    every: int = 1
    alpha: float = 1.0
    group_ranks: list | None = None
    kind: str = "adaring"

    def __post_init__(self):
        for key in ("rank", "ring_rank", "every"):
            check_positive_int("adaring", key, getattr(self, key))
        self.alpha = check_number("adaring", "alpha", self.alpha)
        if self.kind != "adaring":
            raise BadInputError(f"AdaRingConfig is the 'adaring' family, got kind {self.kind!r}.")
        if self.group_ranks is not None:
            if not isinstance(self.group_ranks, (list, tuple)) or not self.group_ranks:
                raise BadInputError(f"adaring adapter: group_ranks must be a non-empty list of ranks, got "
                                    f"{self.group_ranks!r}.")
            for v in self.group_ranks:
                check_positive_int("adaring", "group_ranks", v)
            self.group_ranks = [int(v) for v in self.group_ranks]
            if max(self.group_ranks) != self.rank:
                raise BadInputError(
                    f"adaring adapter: the largest of group_ranks {self.group_ranks} must equal rank {self.rank} "
                    f"(the size of the shared rank core); pass --rank {max(self.group_ranks)}."
                )

    def layer_ranks(self, layers: int) -> list[int]:
        """The rank of each of the ``layers`` adapted layers (contiguous groups, earlier ones one larger)."""
        if not self.group_ranks:
            return [self.rank] * layers
        g = len(self.group_ranks)
        if g > layers:
            raise BadInputError(f"adaring adapter: {g} group_ranks for only {layers} adapted layers.")
        base, extra = divmod(layers, g)
        out = []
        for k, r in enumerate(self.group_ranks):
            out += [r] * (base + (1 if k < extra else 0))
        return out

    def num_params(self, dim: int, depth: int) -> int:
        """``2 R^2 (L + D + r) + sum_l (r_l + D)``."""
        L = len(self.placed(depth))
        return 2 * self.ring_rank**2 * (L + dim + self.rank) + sum(r + dim for r in self.layer_ranks(L))

    def formula(self, dim: int, depth: int) -> str:
        L, R = len(self.placed(depth)), self.ring_rank
        return (f"2*R^2*(L + D + r) + sum_l(r_l + D) = {2 * R * R * (L + dim + self.rank):,} + "
                f"{sum(r + dim for r in self.layer_ranks(L)):,} (L={L}, D={dim}, r={self.rank}, R={R})")


def ring_matrix(layer: torch.Tensor, dim: torch.Tensor, rank: torch.Tensor, r: int, transpose: bool) -> torch.Tensor:
    """One layer's matrix from its layer slice ``[R, R]`` and the shared cores ``[R, D, R]``, ``[R, r, R]``.

    Returns ``[r, D]`` (``nn.Linear(D, r)``'s weight) or, with ``transpose``, ``[D, r]`` (``nn.Linear(r, D)``'s).
    ``W[j, i] = Tr(Z_l A_i B_j)``; training and export call this same function, so they agree exactly.
    """
    eq = "ab,bic,cja->ij" if transpose else "ab,bic,cja->ji"
    return torch.einsum(eq, layer, dim, rank[:, :r, :]).contiguous()


class RingCores(nn.Module):
    """The six cores shared by every layer (``shared.adapter.*`` in the model)."""

    def __init__(self, layers: int, dim: int, rank: int, ring_rank: int):
        super().__init__()
        R = ring_rank
        shapes = {"down_layer": (R, layers, R), "down_dim": (R, dim, R), "down_rank": (R, rank, R),
                  "up_layer": (R, layers, R), "up_dim": (R, dim, R), "up_rank": (R, rank, R)}
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))
        std = (2.0 / ((dim + rank) * R**3)) ** (1.0 / 6.0)
        with torch.no_grad():
            for name in CORES:
                if name == "up_layer":
                    self.up_layer.zero_()
                else:
                    getattr(self, name).normal_(0.0, std)


class RingAdapter(nn.Module):
    """Layer ``index`` of the ring: ``alpha * up(gelu(down(x)))`` with weights read off the shared cores."""

    def __init__(self, cores: RingCores, index: int, dim: int, rank: int, alpha: float):
        super().__init__()
        self._cores = [cores]  # a reference, not a submodule: the cores are registered once, under ``shared``
        self.index, self.rank, self.alpha = int(index), int(rank), float(alpha)
        self.down_bias = nn.Parameter(torch.zeros(rank))
        self.up_bias = nn.Parameter(torch.zeros(dim))
        self.act = nn.GELU()

    def weights(self):
        c = self._cores[0]
        down = ring_matrix(c.down_layer[:, self.index, :], c.down_dim, c.down_rank, self.rank, transpose=False)
        up = ring_matrix(c.up_layer[:, self.index, :], c.up_dim, c.up_rank, self.rank, transpose=True)
        return down, up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.weights()
        return self.alpha * F.linear(self.act(F.linear(x, down, self.down_bias)), up, self.up_bias)

    def extra_repr(self) -> str:
        return f"layer={self.index}, rank={self.rank}, alpha={self.alpha}"


class AdaRingFamily(AdapterFamily):
    kind = "adaring"
    config_cls = AdaRingConfig
    separable = True
    multitask = True  # its export layout is AdapterTune's
    title = "AdaRing"

    def inject(self, model, cfg: AdaRingConfig):
        depth = len(getattr(model, "blocks", []) or [])
        dim = getattr(model, "embed_dim", None)
        placed = cfg.placed(depth)
        ranks = dict(zip(placed, cfg.layer_ranks(len(placed))))
        cores = RingCores(len(placed), dim, cfg.rank, cfg.ring_rank)
        order = {b: k for k, b in enumerate(placed)}
        wrap_blocks(model, lambda i: RingAdapter(cores, order[i], dim, ranks[i], cfg.alpha) if i in ranks else None,
                    "AdaRing")
        model.shared = nn.ModuleDict({"adapter": cores})
        return model

    def export_adapter_config(self, cfg: AdaRingConfig) -> AdapterConfig:
        return AdapterConfig(rank=cfg.rank, every=cfg.every, alpha=cfg.alpha, init="zero",
                             materialised_from=cfg.to_dict())

    def export_state(self, cfg: AdaRingConfig, state_dict: dict) -> dict:
        missing = [SHARED + n for n in CORES if SHARED + n not in state_dict]
        if missing:
            raise IncompatibleCheckpointError(f"the AdaRing checkpoint lacks its ring cores {missing[:3]}.")
        c = {n: state_dict[SHARED + n].detach().float().cpu() for n in CORES}
        layers = int(c["down_layer"].shape[1])
        ranks = cfg.layer_ranks(layers)
        out = {k: v for k, v in state_dict.items() if not k.startswith(SHARED) and ".adapter." not in k}
        with torch.no_grad():
            for k, r in enumerate(ranks):
                i = k * cfg.every
                src = f"blocks.{i}.adapter."
                try:
                    b_down = state_dict[src + "down_bias"].detach().float().cpu()
                    b_up = state_dict[src + "up_bias"].detach().float().cpu()
                except KeyError:
                    raise IncompatibleCheckpointError(f"the AdaRing checkpoint lacks {src}down_bias/up_bias.") from None
                down = ring_matrix(c["down_layer"][:, k, :], c["down_dim"], c["down_rank"], r, transpose=False)
                up = ring_matrix(c["up_layer"][:, k, :], c["up_dim"], c["up_rank"], r, transpose=True)
                pad = cfg.rank - r  # zero rows of down / columns of up: GELU(0) = 0 adds nothing
                out[src + "down.weight"] = F.pad(down, (0, 0, 0, pad)).contiguous()
                out[src + "down.bias"] = F.pad(b_down, (0, pad)).contiguous()
                out[src + "up.weight"] = F.pad(up, (0, pad)).contiguous()
                out[src + "up.bias"] = b_up.clone()
        return out


FAMILY = register_family(AdaRingFamily())
