"""Which parameters a regime trains, and the parameter report (trainable count, share of full fine-tuning,
the adapter family's documented formula) printed at the start of a run and stored in its checkpoint.
"""

from __future__ import annotations

from atexport.errors import IncompatibleCheckpointError


def apply_regime(model, regime: str) -> list:
    """Freeze what ``regime`` keeps fixed; return the trainable parameters in a stable order."""
    from atexport.models import HEAD_PREFIXES

    params = []
    for name, p in model.named_parameters():
        if regime == "full":
            train_it = True
        elif regime == "head":
            train_it = name.startswith(HEAD_PREFIXES)
        else:
            train_it = name.startswith(HEAD_PREFIXES) or ".adapter." in name
        p.requires_grad_(train_it)
        if train_it:
            params.append(p)
    if not params:
        raise IncompatibleCheckpointError(f"regime {regime!r} leaves nothing to train in this model.")
    return params


def param_report(model, regime: str, adapter_cfg) -> dict:
    """Trainable parameters and their share of full fine-tuning (backbone + head, no adapters)."""
    from atexport.models import HEAD_PREFIXES

    named = list(model.named_parameters())
    full = sum(p.numel() for n, p in named if ".adapter." not in n)
    trainable = sum(p.numel() for _, p in named if p.requires_grad)
    report = {
        "trainable": trainable,
        "full_finetune": full,
        "share": trainable / full,
        "head": sum(p.numel() for n, p in named if n.startswith(HEAD_PREFIXES)),
        "adapters": sum(p.numel() for n, p in named if ".adapter." in n),
    }
    if adapter_cfg is not None:
        dim, depth = int(model.embed_dim), len(model.blocks)
        report["num_adapters"] = len(adapter_cfg.placed(depth))
        if getattr(adapter_cfg, "kind", "adaptertune") == "adaptertune":
            report["per_adapter"] = 2 * dim * adapter_cfg.rank + adapter_cfg.rank + dim
        report["embed_dim"] = dim
        report["kind"] = getattr(adapter_cfg, "kind", "adaptertune")
        report["formula"] = adapter_cfg.formula(dim, depth)  # the family's documented count
        report["formula_params"] = adapter_cfg.num_params(dim, depth)
    return report


def describe_params(p: dict, regime: str) -> str:
    s = f"trainable parameters ({regime}): {p['trainable']:,}"
    if "formula" in p and "per_adapter" not in p:
        s += f" = {p['kind']} adapters {p['adapters']:,} ({p['formula']}) + head {p['head']:,}"
    if "per_adapter" in p:
        s += (f" = {p['num_adapters']} adapters x {p['per_adapter']:,} (2*D*r + r + D, D={p['embed_dim']})"
              f" + head {p['head']:,}")
    return s + f"; {100 * p['share']:.2f}% of full fine-tuning ({p['full_finetune']:,})"


def reinit_head(model, seed: int) -> None:
    """timm's head init (truncated normal, std 0.02; zero bias), drawn from the training seed."""
    import torch

    head = getattr(model, "head", None)
    if not isinstance(head, torch.nn.Linear):
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.nn.init.trunc_normal_(head.weight, std=0.02)
        torch.nn.init.zeros_(head.bias)

