"""The AdapterTune adapter: exact zero init, parameter count, placement, official layout."""

import pytest
import torch

from _helpers import tiny_spec
from atexport.adapter import AdapterConfig, infer_adapter_config, inject_adapters, iter_adapters
from atexport.errors import BadInputError
from atexport.models import backbone_fingerprint, create_backbone


@pytest.mark.parametrize("every", [1, 2])
def test_zero_init_is_exactly_the_backbone(every):
    spec = tiny_spec()
    ref = create_backbone(spec).eval()
    model = inject_adapters(create_backbone(spec), AdapterConfig(rank=4, every=every)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        h_ref = ref.patch_drop(ref.norm_pre(ref._pos_embed(ref.patch_embed(x))))
        h = h_ref.clone()
        for b_ref, b in zip(ref.blocks, model.blocks):
            h_ref, h = b_ref(h_ref), b(h)
            assert torch.equal(h, h_ref)
        assert torch.equal(ref(x), model(x))


def test_small_init_moves_off_the_backbone():
    spec = tiny_spec()
    ref = create_backbone(spec).eval()
    model = inject_adapters(create_backbone(spec), AdapterConfig(rank=4, init="small")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        diff = (ref(x) - model(x)).abs().max().item()
    assert 0 < diff < 1e-2


@pytest.mark.parametrize("every,expected_adapters", [(1, 4), (2, 2), (3, 2)])
def test_param_count_and_placement(every, expected_adapters):
    cfg = AdapterConfig(rank=4, every=every)
    model = inject_adapters(create_backbone(tiny_spec()), cfg)
    placed = [i for i, _ in iter_adapters(model)]
    assert placed == cfg.placed(4) == list(range(0, 4, every))
    assert len(placed) == expected_adapters
    n = sum(p.numel() for name, p in model.named_parameters() if ".adapter." in name)
    assert n == cfg.num_params(dim=64, depth=4) == expected_adapters * (2 * 64 * 4 + 4 + 64)


def test_official_layout_round_trips():
    cfg = AdapterConfig(rank=4, every=2)
    model = inject_adapters(create_backbone(tiny_spec()), cfg)
    sd = model.state_dict()
    assert "blocks.0.block.attn.qkv.weight" in sd
    assert "blocks.0.adapter.down.weight" in sd and "blocks.2.adapter.up.bias" in sd
    assert not any(k.startswith("blocks.1.adapter") for k in sd)
    back = infer_adapter_config(sd, depth=4)
    assert (back.rank, back.every) == (4, 2)
    other = inject_adapters(create_backbone(tiny_spec()), back)
    other.load_state_dict(sd, strict=True)


def test_fingerprint_ignores_adapters_and_head_but_not_backbone():
    spec = tiny_spec()
    a = create_backbone(spec)
    fp = backbone_fingerprint(a)
    inject_adapters(a, AdapterConfig(rank=4))
    with torch.no_grad():
        a.head.weight.add_(1.0)
    assert backbone_fingerprint(a) == fp
    with torch.no_grad():
        a.blocks[1].block.mlp.fc1.weight[0, 0] += 1e-3
    assert backbone_fingerprint(a) != fp


@pytest.mark.parametrize("kw", [dict(rank=0), dict(every=0), dict(init="ones"), dict(rank=2.5)])
def test_bad_config_is_refused(kw):
    with pytest.raises(BadInputError):
        AdapterConfig(**kw)


def test_library_imports_families_not_the_compat_module():
    """``atexport.adapter`` stays for users' old imports (its re-exports work); atexport itself imports the
    families from ``atexport.adapters``."""
    import ast
    from pathlib import Path

    import atexport
    import atexport.adapter as compat

    root = Path(atexport.__file__).parent
    users = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if path != root / "adapter.py" and "atexport.adapter" in names:
                users.append(str(path.relative_to(root)))
    assert not users, f"import atexport.adapters instead of the compat module in {users}"
    from atexport.adapters import adaptertune

    assert compat.AdapterConfig is adaptertune.AdapterConfig
    assert compat.infer_adapter_config is adaptertune.infer_adapter_config
