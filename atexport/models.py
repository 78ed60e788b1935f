"""Building the timm backbone, its fingerprint and its preprocessing.

A model is described by a :class:`ModelSpec` (timm name, architecture overrides, class count and
where the backbone weights come from). The spec travels inside every checkpoint and artifact, so each
later stage rebuilds exactly the network that was trained, and refuses a backbone whose tensors differ
(checked through :func:`backbone_fingerprint`).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from atexport.errors import BadInputError, IncompatibleCheckpointError, require
from atexport.utils.io import error_reason, load_torch_file

HEAD_PREFIXES = ("head.",)
# timm ViT-family names atexport knows to work (the adapter needs ``model.blocks`` and ``embed_dim``).
SUPPORTED_PREFIXES = ("vit_", "deit_", "deit3_", "eva", "beit", "flexivit", "samvit")


@dataclass
class ModelSpec:
    """Everything needed to rebuild a backbone.

    Attributes:
        backbone: timm model name, optionally with a pretrained tag (``vit_small_patch16_224.augreg_in21k``).
        num_classes: classes of the task head.
        model_args: architecture overrides passed to ``timm.create_model`` (img_size, patch_size, depth, ...).
        source: where the backbone weights come from: ``{"kind": "timm"}`` (hub weights),
            ``{"kind": "file", "path": ..., "sha256": ...}`` or ``{"kind": "random", "seed": 0}``.
        class_names: one name per class.
    """

    backbone: str
    num_classes: int
    model_args: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=lambda: {"kind": "random", "seed": 0})
    class_names: list[str] | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        return cls(
            backbone=d["backbone"],
            num_classes=int(d["num_classes"]),
            model_args=dict(d.get("model_args") or {}),
            source=dict(d.get("source") or {"kind": "random", "seed": 0}),
            class_names=list(d["class_names"]) if d.get("class_names") else None,
        )


def _timm():
    return require("timm", "building Vision Transformer backbones", "torch")


def _check_name(name: str) -> None:
    timm = _timm()
    arch = name.split(".")[0]
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
        raise BadInputError(
            f"--backbone {name}: not a timm model name. Similar names: {', '.join(close) or 'none'}."
        )
    if not arch.startswith(SUPPORTED_PREFIXES):
        raise BadInputError(
            f"--backbone {name}: atexport supports timm's ViT family ({', '.join(SUPPORTED_PREFIXES)}*)."
        )


def load_weights_file(path: str | Path) -> dict:
    """Read backbone weights from safetensors, a state dict, or an atexport full fine-tune checkpoint.

    Never unpickles: ``.pt``/``.pth`` files are read with ``torch.load(weights_only=True)``.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"--backbone-weights {path}: no such file.")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            sd = load_file(str(path))
        except Exception as e:  # corrupt file
            raise BadInputError(
                f"--backbone-weights {path}: not a readable safetensors file ({error_reason(e)})."
            ) from None
    else:  # corrupt file, pickle with code, ...: one sentence, never torch's advice to disable weights_only
        sd = load_torch_file(path, "--backbone-weights", "safetensors file or weights-only state dict")
    if isinstance(sd, dict) and sd.get("format") == "atexport.checkpoint":
        if sd.get("regime") != "full":
            raise BadInputError(
                f"--backbone-weights {path}: an atexport '{sd.get('regime')}' checkpoint holds no backbone; "
                "only 'full' fine-tune checkpoints can serve as backbone weights."
            )
        sd = sd["state_dict"]
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BadInputError(f"--backbone-weights {path}: not a state dict of tensors.")
    return {canonical_name(k): v for k, v in sd.items()}


def canonical_name(name: str) -> str:
    """Strip the adapter wrapping (``blocks.3.block.x`` -> ``blocks.3.x``) and a DDP ``module.`` prefix."""
    if name.startswith("module."):
        name = name[len("module."):]
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "blocks" and parts[2] == "block":
        del parts[2]
    return ".".join(parts)


def _model_args_error(spec: ModelSpec, e: Exception) -> BadInputError:
    """timm's TypeError/AssertionError for a bad architecture argument, as one sentence naming the key."""
    import re

    m = re.search(r"unexpected keyword argument '([^']+)'", str(e))
    if m:
        key = m.group(1)
        return BadInputError(
            f"model_args.{key}: {spec.backbone} takes no argument {key!r} (given with --set model_args.{key}=..., "
            "--model-args or the recipe); remove it or use one of the model class's arguments."
        )
    return BadInputError(
        f"model_args {spec.model_args}: timm cannot build {spec.backbone} with them ({error_reason(e) or type(e).__name__})."
    )


def create_backbone(spec: ModelSpec, weights: str | Path | None = None):
    """Create the timm model (backbone + fresh head) described by ``spec``.

    Args:
        spec: the model description; ``spec.source`` decides where weights come from.
        weights: a local weights file that overrides ``spec.source`` (``--backbone-weights``).
    """
    import torch

    timm = _timm()
    _check_name(spec.backbone)
    source = dict(spec.source)
    if weights is not None:
        source = {"kind": "file", "path": str(weights)}
    kind = source.get("kind")
    seed = int(source.get("seed", 0))
    # Seeded so that a random backbone (and a fresh head) is reproducible from the spec alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "timm":
            try:
                model = timm.create_model(
                    spec.backbone, pretrained=True, num_classes=spec.num_classes, **spec.model_args
                )
            except (TypeError, AssertionError, ValueError, ZeroDivisionError) as e:
                raise _model_args_error(spec, e) from None
            except Exception as e:
                raise BadInputError(
                    f"cannot load pretrained weights for {spec.backbone} from the timm hub ({e}). "
                    "Offline? Download them once, or pass --backbone-weights FILE, or --no-pretrained."
                ) from None
        elif kind in ("random", "file"):
            # Headless first, so the random backbone does not depend on the class count (tasks with
            # different heads then share one backbone and can be served by one multi-task model).
            try:
                model = timm.create_model(spec.backbone, pretrained=False, num_classes=0, **spec.model_args)
            except (TypeError, AssertionError, ValueError, ZeroDivisionError, RuntimeError) as e:
                raise _model_args_error(spec, e) from None
            model.reset_classifier(spec.num_classes)
            head = model.get_classifier()
            if isinstance(head, torch.nn.Linear):  # timm's ViT head init: trunc normal std 0.02, zero bias
                torch.nn.init.trunc_normal_(head.weight, std=0.02)
                torch.nn.init.zeros_(head.bias)
        else:
            raise IncompatibleCheckpointError(f"unknown backbone source {source!r}.")
    check_input_geometry(model, spec)  # before any weights: a size the backbone cannot take is the user's to fix
    if kind == "file":
        path = source.get("path")
        if not path or not Path(path).is_file():
            raise BadInputError(
                f"the backbone weights file {path} is missing; pass it with --backbone-weights FILE."
            )
        sd = load_weights_file(path)
        sd = {k: v for k, v in sd.items() if not k.startswith(HEAD_PREFIXES) and ".adapter." not in k}
        try:
            missing, unexpected = model.load_state_dict(sd, strict=False)
        except RuntimeError as e:  # shape mismatches (another size, patch or width)
            raise IncompatibleCheckpointError(
                f"--backbone-weights {path} does not fit {spec.backbone} {spec.model_args or ''}: "
                f"{str(e).splitlines()[-1].strip()[:300]}"
            ) from None
        missing = [k for k in missing if not k.startswith(HEAD_PREFIXES)]
        if missing or unexpected:
            raise IncompatibleCheckpointError(
                f"--backbone-weights {path} does not fit {spec.backbone} {spec.model_args or ''}: "
                f"missing {missing[:5]}, unexpected {list(unexpected)[:5]}."
            )
    return model


def _pair(v) -> tuple[int, int] | None:
    try:
        t = tuple(int(x) for x in (v if isinstance(v, (tuple, list)) else (v, v)))
    except (TypeError, ValueError):
        return None
    return t if len(t) == 2 else None


def check_input_geometry(model, spec: ModelSpec) -> None:
    """Refuse an input size the backbone cannot take: smaller than its patch (no token at all).

    Raises:
        BadInputError: naming the input size and the patch, and what to pass instead.
    """
    pe = getattr(model, "patch_embed", None)
    img, patch = _pair(getattr(pe, "img_size", None)), _pair(getattr(pe, "patch_size", None))
    if img is None or patch is None:
        return
    if any(i < p for i, p in zip(img, patch)):
        raise BadInputError(
            f"{spec.backbone}: an input of {img[0]}x{img[1]} px is smaller than its {patch[0]}x{patch[1]} px patch, "
            f"so the image holds no patch; give an input size of at least {max(patch)} px, a multiple of the patch "
            f"(--img-size, or model_args.img_size), or a smaller patch (--patch-size)."
        )


def check_forward(model, input_size, what: str) -> None:
    """Run one zero image of ``input_size`` through ``model``: refuse a size the backbone cannot take.

    Raises:
        BadInputError: naming ``what`` (the flags that set the size) and the backbone's own reason.
    """
    import torch

    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *[int(v) for v in input_size]))
    except (RuntimeError, ValueError, AssertionError, TypeError, IndexError) as e:
        raise BadInputError(f"{what}: the backbone cannot take an input of {list(input_size)} "
                            f"({error_reason(e)}); give the input size it was trained at.") from None


def backbone_dims(backbone: str, model_args: dict | None = None) -> tuple[int, int]:
    """``(width, blocks)`` of a timm ViT, built on the meta device (no memory, no weights): for sizing
    adapters before anything is allocated."""
    import torch

    timm = _timm()
    _check_name(backbone)
    spec = ModelSpec(backbone, 1, dict(model_args or {}))
    try:
        with torch.device("meta"):
            model = timm.create_model(backbone.split(".")[0], pretrained=False, num_classes=0, **spec.model_args)
    except (TypeError, AssertionError, ValueError, ZeroDivisionError, RuntimeError) as e:
        raise _model_args_error(spec, e) from None
    check_input_geometry(model, spec)
    return int(getattr(model, "embed_dim", 0) or 0), len(getattr(model, "blocks", ()) or ())


def backbone_tensors(model) -> dict:
    """The frozen backbone's tensors by canonical name (no head, no adapters)."""
    out = {}
    for name, t in model.state_dict().items():
        cname = canonical_name(name)
        if cname.startswith(HEAD_PREFIXES) or ".adapter." in cname:
            continue
        out[cname] = t
    return out


def backbone_fingerprint(model) -> str:
    """sha256 over the backbone's tensor names, shapes, dtypes and bytes (head and adapters excluded)."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(backbone_tensors(model).items()):
        t = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes())
    return h.hexdigest()


# The official AdapterTune code (``src/datasets/torchvision_datasets.py``) feeds every backbone
# ImageNet statistics, RandomResizedCrop + flip for training and Resize(256) + CenterCrop(224) for
# evaluation, with torchvision's default bilinear interpolation: crop_pct 224/256 = 0.875.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESS_MODES = ("timm", "official")


def official_preprocess(input_size) -> dict:
    """The official AdapterTune transform for ``input_size`` ``[3, H, W]``, as a preprocess dict.

    For 224 px this is exactly ``Resize(256) + CenterCrop(224) + Normalize(ImageNet)`` (bilinear).
    """
    c, h, w = (int(v) for v in input_size)
    return {
        "input_size": [c, h, w],
        "interpolation": "bilinear",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "crop_pct": 0.875,
        "crop_mode": "center",
    }


def preprocess_config(model, mode: str = "timm") -> dict:
    """The preprocessing recorded with a model, as plain JSON-able values.

    Args:
        model: the timm backbone.
        mode: ``timm`` (the backbone's own data config: what its pretrained weights expect) or
            ``official`` (the official AdapterTune code's ImageNet transform, see :func:`official_preprocess`).
    """
    if mode not in PREPROCESS_MODES:
        raise BadInputError(f"preprocess must be one of {', '.join(PREPROCESS_MODES)}, got {mode!r}.")
    timm_cfg = _timm_preprocess(model)
    return official_preprocess(timm_cfg["input_size"]) if mode == "official" else timm_cfg


def _timm_preprocess(model) -> dict:
    """The backbone's own eval preprocessing (timm data config)."""
    timm = _timm()
    cfg = timm.data.resolve_data_config({}, model=model)
    input_size = [int(v) for v in cfg["input_size"]]
    # The pretrained config keeps the hub weights' size (224) even when ``img_size`` was overridden:
    # the model's own patch embedding knows the size it accepts.
    pe = getattr(model, "patch_embed", None)
    img_size = getattr(pe, "img_size", None)
    if img_size is not None:
        in_chans = getattr(getattr(pe, "proj", None), "in_channels", input_size[0])
        input_size = [int(in_chans), *(int(v) for v in img_size)]
    return {
        "input_size": input_size,
        "interpolation": str(cfg.get("interpolation", "bicubic")),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "crop_pct": float(cfg.get("crop_pct", 0.875)),
        "crop_mode": str(cfg.get("crop_mode", "center")),
    }


def inject_activation_outliers(model, factor: float = 50.0, channels: int = 2, blocks=None, seed: int = 0) -> dict:
    """Give a ViT the massive activations of pretrained ones without changing what it computes.

    For each chosen block, ``channels`` channels of ``norm1`` and ``norm2`` get their gain and bias
    multiplied by ``factor`` (20-100 is what pretrained ViTs show), and the matching input columns of
    ``attn.qkv`` and ``mlp.fc1`` are divided by it: the LayerNorm outputs carry outlier channels while
    the FP32 function is unchanged up to rounding. A test and benchmark model for INT8 (random-init and
    small trained ViTs have none of these outliers).

    Args:
        model: a timm ViT (blocks with ``norm1``/``attn.qkv`` and ``norm2``/``mlp.fc1``), changed in place.
        factor: the outlier factor.
        channels: outlier channels per LayerNorm.
        blocks: block indices (default: all).
        seed: seed of the channel choice.

    Returns:
        ``{block index: {"norm1": [channels], "norm2": [channels]}}``.
    """
    import torch

    g = torch.Generator().manual_seed(int(seed))
    chosen = {}
    for i, blk in enumerate(model.blocks):
        if blocks is not None and i not in blocks:
            continue
        inner = getattr(blk, "block", blk)  # atexport wraps adapter blocks
        chosen[i] = {}
        for norm, linear in ((inner.norm1, inner.attn.qkv), (inner.norm2, inner.mlp.fc1)):
            idx = torch.randperm(norm.weight.shape[0], generator=g)[:channels]
            with torch.no_grad():
                norm.weight[idx] *= factor
                norm.bias[idx] *= factor
                linear.weight[:, idx] /= factor
            chosen[i]["norm1" if norm is inner.norm1 else "norm2"] = idx.tolist()
    return chosen
