"""The training configuration and its recipes.

A run is described by one flat :class:`TrainConfig`. Its defaults are the paper's (and the official
code's): rank 16 on every block, alpha 1, AdamW lr 1e-3 with weight decay 0.05, 50 epochs with 5
linear warm-up epochs then per-step cosine, gradient clipping 1.0, batch 128, 224 px.

Recipes are YAML files in ``training/`` holding the same keys; ``inherit: NAME`` pulls in another
recipe first (``training/defaults.yaml`` repeats the paper defaults as data). Precedence is
dataclass defaults < recipe (and what it inherits) < explicit overrides (CLI flags, ``--set``).
The resolved config is saved beside the checkpoints as ``config.yaml``, which is itself a recipe.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from atexport import configs
from atexport.errors import BadInputError

REGIMES = ("adapter", "head", "full")
INITS = ("zero", "small")  # atexport.adapters.adaptertune.INITS (not imported: it would pull in torch)
AMP_MODES = ("auto", "bf16", "fp16", "off")
PREPROCESS_MODES = ("timm", "official")  # atexport.models.PREPROCESS_MODES (not imported: torch-free here)
DEVICES = ("auto", "cpu", "cuda")
# How the invocation runs, not what it computes: excluded from config.yaml (resume/overwrite/progress)
# and free to change when resuming (all of these).
_INVOCATION_KEYS = ("resume", "overwrite", "progress")
_RESUMABLE_CHANGES = _INVOCATION_KEYS + (
    "output", "workers", "device", "amp", "data_dir", "download", "eval_batch_size", "seeds", "recipe",
    "backbone_weights",  # its content is checked by the backbone fingerprint instead
)


@dataclass
class TrainConfig:
    """Everything that defines a training run (recipe keys have the same names).

    Attributes:
        recipe: the recipe it was resolved from (informational).
        dataset: registry name (``digits``, ``pets``, ``cifar10``, ...) or ``imagefolder:PATH``.
        data_dir: root of downloaded data sets (default ``$ATEXPORT_DATA_DIR`` or ``./data``).
        download: let torchvision download a missing data set.
        dataset_args: data-set specific options, e.g. ``{size: 64}`` for digits.
        val_fraction: seeded, stratified share of the training set held out for validation (0: none;
            then ``run.pt`` is the last epoch).
        split_seed: seed of the validation split and of ``limit_*`` subsets (default: ``seed``, as the
            official code does).
        limit_train: train on a seeded subset of this many images (quick runs).
        limit_eval: evaluate on seeded subsets of this many validation and test images (the test
            subset is the same for every training seed).
        backbone: timm model name, optionally with a pretrained tag.
        pretrained: load timm's hub weights (ignored when ``backbone_weights`` is given).
        backbone_weights: local weights file (safetensors, a state dict, or an atexport full fine-tune).
        backbone_seed: seed of a random (not pretrained) backbone, shared by every training seed.
        model_args: architecture overrides for ``timm.create_model`` (depth, embed_dim, drop_path_rate...).
        img_size: input size (``model_args.img_size``); the backbone's own when unset.
        patch_size: patch size (``model_args.patch_size``).
        regime: ``adapter`` (frozen backbone; adapters + head), ``head`` (head only) or ``full``.
        rank: adapter bottleneck width r.
        every: an adapter on every ``every``-th block.
        alpha: adapter output scale.
        init: ``zero`` (exact pretrained function at step 0) or ``small``.
        adapter: the adapter family and its own keys (``--adapter KIND``, ``--set adapter.KEY=VALUE``), e.g.
            ``{kind: adaring, ring_rank: 8}``; empty: AdapterTune. ``rank``, ``every``, ``alpha`` and ``init``
            above apply to every family that has them (keys here win); the families and their keys are in
            :mod:`atexport.adapters`.
        epochs: training epochs.
        batch_size: global batch size (split over the processes of a torchrun job).
        eval_batch_size: batch size for validation and test (default ``batch_size``).
        lr: peak learning rate of AdamW (not scaled by batch size).
        min_lr: learning rate at the end of the cosine.
        weight_decay: AdamW weight decay, on every trainable tensor (as the official code).
        warmup_epochs: linear warm-up epochs (per step) before the per-step cosine.
        clip_grad: max global gradient norm; ``None`` or 0 for none.
        label_smoothing: cross-entropy label smoothing.
        scale: area range of RandomResizedCrop.
        ratio: aspect-ratio range of RandomResizedCrop.
        preprocess: ``timm`` (the backbone's own data config: mean/std, crop and interpolation its
            pretrained weights expect) or ``official`` (the official AdapterTune code's ImageNet
            mean/std, bilinear, Resize(256) + CenterCrop(224), for reproducing the paper's table). It
            is recorded in the checkpoint, so export, verify and the runtime use the same transform.
        hflip: horizontal flip probability.
        color_jitter: color jitter strength; ``None`` for none (the paper's augmentation).
        workers: data-loading processes (results are reproducible for a fixed value).
        seed: training seed (head and adapter init, shuffling, augmentation).
        seeds: several seeds, run one after another into ``OUTPUT/seed_{k}``, with mean and std.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        amp: mixed precision on CUDA: ``auto`` (bf16 where supported, else fp16), ``bf16``, ``fp16``, ``off``.
        output: output folder (default ``runs/<recipe or data set>``).
        resume: continue the run in ``output`` from its ``last.pt``.
        overwrite: start over in an ``output`` that already holds a run.
        progress: show a progress bar.
    """

    recipe: str | None = None
    dataset: str | None = None
    data_dir: str | None = None
    download: bool = False
    dataset_args: dict = field(default_factory=dict)
    val_fraction: float = 0.1
    split_seed: int | None = None
    limit_train: int | None = None
    limit_eval: int | None = None
    backbone: str = "vit_small_patch16_224"
    pretrained: bool = True
    backbone_weights: str | None = None
    backbone_seed: int = 0
    model_args: dict = field(default_factory=dict)
    img_size: int | None = None
    patch_size: int | None = None
    regime: str = "adapter"
    rank: int = 16
    every: int = 1
    alpha: float = 1.0
    init: str = "zero"
    adapter: dict = field(default_factory=dict)
    epochs: int = 50
    batch_size: int = 128
    eval_batch_size: int | None = None
    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.05
    warmup_epochs: int = 5
    clip_grad: float | None = 1.0
    label_smoothing: float = 0.0
    scale: list = field(default_factory=lambda: [0.08, 1.0])
    ratio: list = field(default_factory=lambda: [0.75, 4 / 3])
    preprocess: str = "timm"
    hflip: float = 0.5
    color_jitter: float | None = None
    workers: int = 4
    seed: int = 0
    seeds: list | None = None
    device: str = "auto"
    amp: str = "auto"
    output: str | None = None
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        for f in fields(self):
            setattr(self, f.name, _coerce(f.name, f.type, getattr(self, f.name)))
        _positive = ("epochs", "batch_size", "rank", "every")
        for k in _positive:
            if getattr(self, k) < 1:
                raise BadInputError(f"{_flag(k)} must be at least 1, got {getattr(self, k)}.")
        for k in ("limit_train", "limit_eval", "eval_batch_size"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise BadInputError(f"{_flag(k)} must be at least 1, got {v}.")
        for k in ("img_size", "patch_size"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise BadInputError(f"{_flag(k)} must be a positive number of pixels, got {v}.")
        if self.img_size is not None and self.patch_size is not None and self.patch_size > self.img_size:
            raise BadInputError(f"--patch-size {self.patch_size} is larger than the image (--img-size {self.img_size}); "
                                "the image would hold no patch. Give a patch that divides the image size.")
        if self.regime not in REGIMES:
            raise BadInputError(f"--regime must be one of {', '.join(REGIMES)}, got {self.regime!r}.")
        if self.init not in INITS:
            raise BadInputError(f"--init must be one of {', '.join(INITS)}, got {self.init!r}.")
        if self.preprocess not in PREPROCESS_MODES:
            raise BadInputError(
                f"--preprocess must be one of {', '.join(PREPROCESS_MODES)}, got {self.preprocess!r}."
            )
        if self.amp not in AMP_MODES:
            raise BadInputError(f"--amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}.")
        dev = self.device.split(":")[0]
        if dev not in DEVICES or (":" in self.device and (dev != "cuda" or not self.device.split(":")[1].isdigit())):
            raise BadInputError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}.")
        if self.lr <= 0:
            raise BadInputError(f"--lr must be positive, got {self.lr}.")
        if not 0 <= self.min_lr <= self.lr:
            raise BadInputError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}.")
        if self.weight_decay < 0:
            raise BadInputError(f"--weight-decay must be >= 0, got {self.weight_decay}.")
        if self.warmup_epochs < 0 or (self.warmup_epochs and self.warmup_epochs >= self.epochs):
            raise BadInputError(
                f"--warmup-epochs {self.warmup_epochs} must be 0 or smaller than --epochs {self.epochs}; "
                "pass a smaller --warmup-epochs (e.g. 0) for short runs."
            )
        if self.clip_grad is not None and self.clip_grad < 0:
            raise BadInputError(f"--clip-grad must be >= 0 (0: off), got {self.clip_grad}.")
        if self.clip_grad == 0:
            self.clip_grad = None
        if not 0 <= self.label_smoothing < 1:
            raise BadInputError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}.")
        if not 0 <= self.hflip <= 1:
            raise BadInputError(f"--hflip must be a probability in [0, 1], got {self.hflip}.")
        if not 0 <= self.val_fraction < 1:
            raise BadInputError(f"--val-fraction must be in [0, 1), got {self.val_fraction}.")
        if self.workers < 0:
            raise BadInputError(f"--workers must be >= 0, got {self.workers}.")
        self.scale = _pair("scale", self.scale)
        self.ratio = _pair("ratio", self.ratio)
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise BadInputError(f"scale must be two numbers 0 < lo <= hi <= 1, got {self.scale}.")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise BadInputError(f"ratio must be two numbers 0 < lo <= hi, got {self.ratio}.")
        if self.seeds is not None:
            self.seeds = parse_seeds(self.seeds)
        if not isinstance(self.model_args, dict) or not isinstance(self.dataset_args, dict):
            raise BadInputError("model_args and dataset_args must be mappings.")
        if self.adapter and self.regime != "adapter":
            raise BadInputError(
                f"--adapter / adapter.* ({self.adapter}) apply to --regime adapter only, not {self.regime!r}."
            )
        if self.adapter:
            self.adapter_config()  # validates the family and its keys now, not after the data are loaded

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "TrainConfig":
        """Build from a recipe-like dict; unknown keys are refused (they are usually typos)."""
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if not str(k).startswith("_") and k != "inherit"}
        unknown = sorted(set(d) - known)
        if unknown:
            import difflib

            hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, known, 1)) else k
                     for k in unknown]
            raise BadInputError(f"{source}: unknown training keys {', '.join(hints)}.")
        return cls(**d)

    def to_dict(self, record: bool = False) -> dict[str, Any]:
        """Plain values; ``record=True`` drops the invocation keys (resume, overwrite, progress)."""
        d = asdict(self)
        if record:
            for k in _INVOCATION_KEYS:
                d.pop(k)
        return d

    def adapter_config(self):
        """The adapter family's config of an ``adapter`` run (AdapterTune's by default), else ``None``."""
        if self.regime != "adapter":
            return None
        from atexport.adapters import DEFAULT_KIND, get_family

        section = dict(self.adapter)
        kind = section.pop("kind", None) or DEFAULT_KIND
        cls = get_family(kind).config_cls
        own = {f.name for f in fields(cls)}
        merged = {}
        for key in ("rank", "every", "alpha", "init"):
            value = getattr(self, key)
            if key in own:
                merged[key] = value
            elif _norm(value) != _norm(_FLAT_DEFAULTS[key]):
                raise BadInputError(
                    f"--{key} {value} does not apply to the {kind} adapter; its keys are "
                    f"{', '.join(sorted(own - {'kind'}))} (set them with --set adapter.KEY=VALUE)."
                )
        merged.update(section)
        merged["kind"] = kind
        return cls.from_dict(merged)

    def resolved_model_args(self) -> dict:
        args = dict(self.model_args)
        if self.img_size is not None:
            args["img_size"] = self.img_size
        if self.patch_size is not None:
            args["patch_size"] = self.patch_size
        return args

    @property
    def name(self) -> str:
        """A short name for default output folders."""
        if self.recipe and not str(self.recipe).endswith((".yaml", ".yml")):
            return Path(str(self.recipe)).name
        ds = str(self.dataset or "run")
        return Path(ds.split(":", 1)[1]).name if ds.startswith("imagefolder:") else ds

    def output_dir(self) -> Path:
        return Path(os.path.expanduser(self.output)) if self.output else Path("runs") / self.name

    def with_seed(self, seed: int, output: Path) -> "TrainConfig":
        """The single-seed config of one run of a ``seeds`` sweep."""
        return replace(self, seed=int(seed), seeds=None, output=str(output))

    def differences(self, saved: dict) -> list[str]:
        """What differs, in keys that change the result, from a saved (recorded) config."""
        now = self.to_dict()
        out = []
        for k, v in now.items():
            if k in _RESUMABLE_CHANGES or k not in saved:
                continue
            old = saved[k]
            if _norm(old) != _norm(v):
                out.append(f"{k}: {old!r} -> {v!r}")
        return out


_FLAT_DEFAULTS = {"rank": 16, "every": 1, "alpha": 1.0, "init": "zero"}


def _norm(v):
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


# Keys that 'atexport train' takes as flags (named --key in messages); the others are --set / recipe keys.
_FLAG_KEYS = {"img_size", "patch_size", "regime", "rank", "every", "alpha", "init", "epochs", "batch_size", "lr",
              "weight_decay", "warmup_epochs", "clip_grad", "preprocess", "val_fraction", "workers", "seed",
              "seeds", "limit_train", "limit_eval", "device", "amp"}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _pair(key: str, v) -> list:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise BadInputError(f"{key} must be a list of two numbers, got {v!r}.")
    return [_coerce(key, "float", x) for x in v]


def _coerce(key: str, typ: str, v):
    """Coerce recipe/flag values to the field's type, with a clear message when impossible."""
    typ = str(typ).replace(" ", "")
    optional = typ.endswith("|None")
    base = typ[: -len("|None")] if optional else typ
    if v is None:
        if optional:
            return None
        raise BadInputError(f"{key} must not be empty.")
    try:
        if base == "bool":
            if isinstance(v, bool):
                return v
            if isinstance(v, str) and v.lower() in ("true", "false", "yes", "no", "1", "0"):
                return v.lower() in ("true", "yes", "1")
            raise ValueError
        if base == "int":
            if isinstance(v, bool):
                raise ValueError
            if isinstance(v, float) and not v.is_integer():
                raise ValueError
            return int(v)
        if base == "float":
            if isinstance(v, bool):
                raise ValueError
            f = float(v)
            if not math.isfinite(f):  # nan/inf: refused here, before it becomes a misleading later error
                raise BadInputError(f"{_flag(key) if key in _FLAG_KEYS else key} must be a finite number, got {v!r}.")
            return f
        if base == "str":
            if not isinstance(v, (str, int, float, os.PathLike)) or isinstance(v, bool):
                raise ValueError
            return str(v)
        if base == "dict" and not isinstance(v, dict):
            raise ValueError
        if base == "list" and not isinstance(v, (list, tuple)):
            if key == "seeds" and isinstance(v, (str, int)):
                return v
            raise ValueError
        return list(v) if base == "list" else v
    except (TypeError, ValueError, OverflowError):
        raise BadInputError(f"{key}: expected {base}{' or null' if optional else ''}, got {v!r}.") from None


def parse_seeds(seeds) -> list[int]:
    """``"0,1,2"``, ``[0, 1, 2]`` or ``3`` -> a list of distinct ints."""
    items = str(seeds).split(",") if isinstance(seeds, (str, int)) else list(seeds)
    try:
        out = [int(str(s).strip()) for s in items if str(s).strip() != ""]
    except ValueError:
        raise BadInputError(f"--seeds {seeds!r}: expected comma-separated integers, e.g. 0,1,2.") from None
    if not out:
        raise BadInputError("--seeds: give at least one seed, e.g. 0,1,2.")
    if len(set(out)) != len(out):
        raise BadInputError(f"--seeds {seeds!r}: each seed once, please.")
    return out


def parse_set(items) -> dict:
    """``["model_args.depth=6", "scale=[0.5,1]"]`` -> nested overrides (values parsed as YAML)."""
    import yaml

    out: dict = {}
    for item in items or ():
        key, sep, raw = str(item).partition("=")
        if not sep or not key.strip():
            raise BadInputError(f"--set {item!r}: expected KEY=VALUE, e.g. --set model_args.depth=6.")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise BadInputError(f"--set {item!r}: {p} is not a mapping.")
        node[parts[-1]] = value
    return out


def load_recipe(name_or_path: str | os.PathLike, _seen: tuple = ()) -> dict:
    """Read a recipe (name in ``training/`` or a YAML path), following ``inherit`` chains."""
    data = configs.load("training", name_or_path)
    source = data.pop("_source", str(name_or_path))
    if source in _seen:
        raise BadInputError(f"recipe {source}: 'inherit' loops back to itself ({' -> '.join(_seen)}).")
    parent = data.pop("inherit", None)
    if parent is not None and not isinstance(parent, str):
        raise BadInputError(f"recipe {source}: 'inherit' must name one recipe, got {str(parent)[:60]!r}.")
    if parent:
        beside = Path(source).parent / f"{parent}.yaml"
        base = load_recipe(beside if configs.is_file(beside) else parent, _seen + (source,))
        base.pop("_source", None)
        data = configs.merge(base, data) if data else base
    data["_source"] = source
    return data


def recipe_for(dataset: str | None) -> str:
    """The recipe used without ``--recipe``: the data set's own (``training/<dataset>.yaml``) if any."""
    if dataset and dataset in configs.available("training"):
        return dataset
    return "defaults"


def resolve_config(recipe: str | os.PathLike | None = None, overrides: dict | None = None) -> TrainConfig:
    """Resolve a run's config: recipe (and what it inherits) < ``overrides``.

    Without a recipe: continuing a run (``resume`` with an ``output`` that holds ``config.yaml``) takes
    that saved config; otherwise the data set's own recipe if there is one, else ``defaults``.
    Overrides of ``None`` are ignored; nested mappings (``model_args``) are merged.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if recipe is None and overrides.get("resume") and overrides.get("output"):
        saved = Path(os.path.expanduser(str(overrides["output"]))) / "config.yaml"
        if not saved.is_file():
            raise BadInputError(
                f"--resume: {saved} does not exist; nothing to resume in {saved.parent}. "
                "Start without --resume, or give the run's --recipe and flags."
            )
        recipe = saved
    if recipe is None:
        recipe = recipe_for(overrides.get("dataset"))
    data = load_recipe(recipe)
    source = data.pop("_source")
    if "recipe" not in data or Path(str(recipe)).suffix not in (".yaml", ".yml"):
        data["recipe"] = str(recipe)
    unknown = sorted(set(overrides) - {f.name for f in fields(TrainConfig)})
    if unknown:  # from --set (flags are all known keys): blame --set, not the recipe
        TrainConfig.from_dict({k: overrides[k] for k in unknown}, source="--set")
    args = overrides.get("model_args")
    if isinstance(args, dict):  # model_args.img_size / .patch_size are the img_size / patch_size keys (one thing,
        args = dict(args)       # one key): a recipe's top-level patch_size must not silently beat --set's
        for key in ("img_size", "patch_size"):
            if key in args:
                value = args.pop(key)
                overrides.setdefault(key, value)  # a flag (--patch-size) still wins over --set
        overrides["model_args"] = args
    merged = configs.merge(data, overrides)
    cfg = TrainConfig.from_dict(merged, source=f"recipe {source}")
    if not cfg.dataset:
        raise BadInputError(f"no data set: recipe {source} names none; pass --dataset NAME or --recipe NAME.")
    return cfg
