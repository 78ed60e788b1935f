"""Adapter-X beyond the families table (tests/test_adapter_families.py runs it through the shared cases).

Its paper layout (issue 19) against a forward written independently from the paper's method figure; which
tensors it trains (norm2, CLS token, prompt generators, one shared router); the ViT-B parameter counts against
the paper's 0.20% budget; the load-balancing loss; the layout key's defaults and validation; checkpoints of the
earlier layout (records without ``layout``) loading and exporting as before; OpenVINO and a live task swap on
both layouts; no import circle between the family and its routing probe.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import random_inputs, tiny_spec
from test_adapter_families import (  # noqa: F401  (fam_dir, fam_ckpts: the shared session fixtures)
    CASES,
    _built,
    _export,
    _ort,
    fam_ckpts,
    fam_dir,
    load_ck,
)

from atexport.adapters import get_family, inject_adapters
from atexport.adapters.adapterx import AdapterXConfig
from atexport.errors import BadInputError
from atexport.models import create_backbone


def test_adapterx_vit_base_counts_against_the_paper_budget():
    """ViT-B (D 768, 12 blocks), counted on the model: the paper layout's defaults (r 16, 4 sub-tokens, one
    router) 66,176 = 0.077% of the backbone, r 64 0.163%, against the paper's 0.20%; the earlier layout's
    per-block routers (148,224) outweigh its experts (101,440): 268,096 = 0.31%."""
    from atexport.models import HEAD_PREFIXES, ModelSpec

    model = create_backbone(ModelSpec("vit_base_patch16_224", 10))
    backbone = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(HEAD_PREFIXES))
    assert backbone == 85_798_656
    inject_adapters(model, AdapterXConfig())
    assert sum(p.numel() for n, p in model.named_parameters() if ".adapter." in n) == 66_176
    counts = {"paper layout, r 16": AdapterXConfig().num_params(768, 12),
              "paper layout, r 64": AdapterXConfig(rank=64).num_params(768, 12),
              "layout 1, r 16": AdapterXConfig(layout=1).num_params(768, 12)}
    assert list(counts.values()) == [66_176, 140_096, 268_096]
    assert AdapterXConfig(layout=1, share_router=True).num_params(768, 12) - 18_432 - 768 * 16 - 64 == 101_440
    print("\n" + "; ".join(f"Adapter-X {k}: {v:,} = {100 * v / backbone:.3f}% of ViT-B" for k, v in counts.items()))


def _paper_reference(model, cfg, x):
    """Adapter-X's forward written from the paper's figure with explicit loops, reading ``model``'s tensors:
    trainable CLS; per block: attention, the trainable norm2 feeding FFN and mixture, sub-token split, shared
    cosine router, top-1 expert scaled by its probability, merge; PG ``gamma * mean + beta`` appended."""
    import torch.nn.functional as F

    sh = model.shared["adapter"]
    ex = sh.experts
    x = model.patch_embed(x)
    cls = sh.cls.token.view(1, 1, -1).expand(len(x), -1, -1)
    x = torch.cat([cls, x], dim=1) + model.pos_embed
    t0, n, r = x.shape[1], cfg.experts, cfg.rank
    for i, wrapped in enumerate(model.blocks):
        b, ad = wrapped.block, wrapped.adapter
        if ad is None:
            x = b(x)
            continue
        x = x + b.attn(b.norm1(x))
        h = F.layer_norm(x, (x.shape[-1],), ad.norm.weight, ad.norm.bias, ad.norm.eps)
        u = h.unflatten(-1, (cfg.heads, -1))
        router = sh.router if cfg.share_router else ad.router
        q = F.normalize(u @ router.proj.weight.t(), dim=-1)
        probs = (q @ F.normalize(router.embed, dim=-1).t() / cfg.tau).softmax(-1)
        k = probs.argmax(-1)
        out = torch.zeros_like(u)
        for e in range(n):
            dw, db = ex.down.weight[e * r:(e + 1) * r], ex.down.bias[e * r:(e + 1) * r]
            uw = ex.up.weight[:, e * r:(e + 1) * r]
            y = F.gelu(u @ dw.t() + db) @ uw.t() + ex.up_bias[e]
            out = out + (k == e).unsqueeze(-1) * probs[..., e:e + 1] * y
        side = cfg.alpha * out.flatten(-2)
        x = x + b.mlp(h) + side
        x = torch.cat([x, ad.prompt.gamma * side.mean(1, keepdim=True) + ad.prompt.beta], dim=1)
    return model.forward_head(model.norm(x[:, :t0]))


def test_adapterx_paper_layout_equals_a_reference_written_from_the_figure(fam_ckpts):
    path, trained, _ = fam_ckpts["adapterx"]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (trained(x) - _paper_reference(trained, CASES["adapterx"], x)).abs().max().item() <= 1e-5
        # the frozen norm2 is unused (the trainable one feeds the FFN); the CLS token is the trainable one
        built = _built(path)
        before = built(x)
        built.blocks[1].block.norm2.weight.mul_(3.0)
        assert torch.equal(built(x), before)
        built.blocks[1].adapter.norm.weight.mul_(3.0)
        assert (built(x) - before).abs().max() > 1e-3
        built.shared["adapter"].cls.token.add_(1.0)
        assert (built(x) - before).abs().max() > 1e-3


def test_adapterx_paper_layout_trains_norm2_cls_and_prompts():
    from atexport.training.params import apply_regime

    model = inject_adapters(create_backbone(tiny_spec()), CASES["adapterx"])
    apply_regime(model, "adapter")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"shared.adapter.cls.token", "shared.adapter.router.proj.weight", "blocks.0.adapter.norm.weight",
            "blocks.3.adapter.prompt.gamma", "blocks.3.adapter.prompt.beta"} <= names
    assert not any(".block.norm2." in n or n == "cls_token" or ".adapter.router." in n and n.startswith("blocks.")
                   for n in names)


def test_adapterx_load_balancing_loss():
    fam = get_family("adapterx")
    cfg = CASES["adapterx_every2"]
    model = inject_adapters(create_backbone(tiny_spec()), cfg).train()
    with torch.no_grad():
        model.blocks[0].adapter.router.proj.weight.normal_()
    assert fam.aux_loss(cfg, model) is None
    model(torch.randn(2, 3, 32, 32)).sum()
    aux = fam.aux_loss(cfg, model)
    assert aux is not None and torch.isfinite(aux) and aux.item() > 0
    aux.backward()
    assert model.blocks[0].adapter.router.proj.weight.grad.abs().sum() > 0
    assert fam.aux_loss(cfg, model) is None  # consumed
    model.eval()(torch.randn(2, 3, 32, 32))
    assert fam.aux_loss(cfg, model) is None  # training only


def test_adapterx_layout_defaults_and_validation():
    new, old = AdapterXConfig(), AdapterXConfig(layout=1)
    assert (new.layout, new.heads, new.share_router, new.prompt, new.train_cls) == (2, 4, True, True, True)
    assert (old.layout, old.heads, old.share_router, old.prompt, old.train_cls) == (1, 1, False, False, False)
    for bad, key in (({"layout": 3}, "layout"), ({"layout": 1, "train_cls": True}, "train_cls"),
                     ({"balance": -1}, "balance"), ({"balance": float("nan")}, "balance"), ({"balance": "x"}, "balance")):
        with pytest.raises(BadInputError, match=key):
            AdapterXConfig(**bad)


def test_old_adapterx_checkpoint_without_layout_loads_and_exports_as_before(tmp_path, fam_dir, fam_ckpts):
    """A checkpoint written before ``layout`` existed (its record lacks layout, train_cls, balance) is layout 1:
    it builds the very model it was trained as and exports with parity; it still fits its own separable model."""
    from atexport.checkpoint import load_checkpoint
    from atexport.export.swap import swap_onnx

    path, trained, _ = fam_ckpts["adapterx_v1"]
    d = torch.load(path, map_location="cpu", weights_only=True)
    d["adapter"] = {k: v for k, v in d["adapter"].items() if k not in ("layout", "train_cls", "balance")}
    torch.save(d, tmp_path / "old.pt")
    ck = load_checkpoint(tmp_path / "old.pt")
    assert ck.adapter == CASES["adapterx_v1"] and ck.adapter.layout == 1 and not ck.adapter.train_cls
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(_built(tmp_path / "old.pt")(x), trained(x))
    from atexport.export.onnx import export_onnx
    from atexport.export.settings import ExportSettings

    res = export_onnx(tmp_path / "old.pt", tmp_path / "old.onnx", ExportSettings(separable=True))
    assert res.passed and max(r.max_abs for r in res.parity) <= 1e-5
    swapped = swap_onnx(_export(fam_dir, path, "adapterx_v1_sep", separable=True).path, tmp_path / "old.pt",
                        tmp_path / "swapped.onnx")
    assert np.abs(_ort(swapped.path, x.numpy())[0] - trained(x).detach().numpy()).max() <= 1e-5


def test_routing_does_not_import_adapterx():
    """The routing probe module is used by Adapter-X, not the other way round (no import circle)."""
    import ast
    from pathlib import Path

    import atexport.adapters.routing as routing

    tree = ast.parse(Path(routing.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in names if "adapterx" in m]


@pytest.mark.parametrize("name", ["adapterx", "adapterx_v1"])
def test_adapterx_openvino_matches_onnxruntime(fam_dir, fam_ckpts, name):
    """The separable export of both Adapter-X layouts runs in OpenVINO (FP32) as in ONNX Runtime, and a live
    task swap in OpenVINO gives task B's model (prompt tokens, CLS, norms and routing included)."""
    from atexport.runtime.openvino import OpenVINORunner

    a, _, b = fam_ckpts[name]
    sep = _export(fam_dir, a, f"{name}_sep", separable=True)
    x = random_inputs(6, seed=13)
    with OpenVINORunner(str(sep.path), precision="fp32") as ov:
        got = ov.infer(x)
    assert np.abs(got - _ort(sep.path, x)[0]).max() <= 1e-4
    from atexport.runtime import load_model

    from atexport.checkpoint import export_task_weights

    npz = export_task_weights(load_ck(b), fam_dir / f"{name}_b_task.npz")
    model = load_model(sep.path, backend="openvino", precision="fp32")
    try:
        model.set_task(str(npz), name="b")
        swapped = model.logits(x)
    finally:
        model.close()
    with torch.no_grad():
        assert np.abs(got - _built(a)(torch.from_numpy(x)).numpy()).max() <= 1e-4
        assert np.abs(swapped - _built(b)(torch.from_numpy(x)).numpy()).max() <= 1e-4
