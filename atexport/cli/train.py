"""``atexport train`` and ``atexport import-official``: thin commands over :mod:`atexport.training`.

``train`` resolves the config (recipe YAML < flags) with :func:`atexport.training.resolve_config` and
calls :func:`atexport.training.train`; ``import-official`` calls
:func:`atexport.training.convert_official`. Nothing heavy is imported until a command runs.
"""

from __future__ import annotations

import sys

import click

from atexport.errors import BadInputError

COMMANDS = ["train_cmd", "import_official_cmd"]


def _epilog() -> str:
    from atexport import configs
    from atexport.data import available_datasets

    recipes = ", ".join(configs.available("training")) or "(none found)"
    data = ", ".join(n for n in available_datasets() if n != "imagefolder")
    return (
        "\b\n"
        f"Recipes (training/*.yaml): {recipes}\n"
        f"Data sets: {data}, imagefolder:PATH\n"
        "\b\n"
        "Examples:\n"
        "  atexport train --recipe digits                        # offline, ~1 min on CPU\n"
        "  atexport train --recipe pets --download -o runs/pets  # paper defaults, vit_small\n"
        "  atexport train --dataset imagefolder:~/birds --backbone vit_base_patch16_224 --epochs 30\n"
        "  atexport train --recipe cifar10 --seeds 0,1,2 -o runs/c10   # mean and std of test top-1\n"
        "  atexport train -o runs/pets --resume                  # continue an interrupted run\n"
        "  torchrun --nproc_per_node 4 -m atexport train --recipe food101   # DistributedDataParallel\n"
    )


@click.command("train", epilog=_epilog())
@click.option("--recipe", default=None, metavar="NAME|FILE",
              help="Recipe in training/ or a YAML file [default: the data set's recipe, else 'defaults'].")
@click.option("--dataset", default=None, metavar="NAME", help="Data set name, or imagefolder:PATH.")
@click.option("--data-dir", default=None, type=click.Path(file_okay=False),
              help="Root of downloaded data sets [default: $ATEXPORT_DATA_DIR or ./data].")
@click.option("--download", is_flag=True, default=None, help="Download a missing torchvision data set.")
@click.option("--backbone", default=None, metavar="TIMM_NAME", help="timm ViT name, optionally with a pretrained tag.")
@click.option("--pretrained/--no-pretrained", default=None,
              help="timm hub weights, or a random backbone (tests, offline demos).")
@click.option("--backbone-weights", default=None, type=click.Path(dir_okay=False),
              help="Local backbone weights: safetensors, a state dict, or an atexport 'full' run.pt.")
@click.option("--img-size", type=click.IntRange(min=1), default=None, help="Input size in pixels.")
@click.option("--patch-size", type=click.IntRange(min=1), default=None, help="Patch size in pixels.")
@click.option("--regime", type=click.Choice(["adapter", "head", "full"]), default=None,
              help="What trains: adapters + head (frozen backbone), head only, or everything.")
@click.option("--adapter", "adapter_kind", default=None, metavar="adaptertune|adaring|adapterx|lora",
              help="Adapter family [adaptertune]; its own keys with --set adapter.KEY=VALUE "
                   "(e.g. --set adapter.ring_rank=8).")
@click.option("--rank", type=click.IntRange(min=1), default=None, help="Adapter rank r [16].")
@click.option("--every", type=click.IntRange(min=1), default=None, help="An adapter on every N-th block [1].")
@click.option("--alpha", type=float, default=None, help="Adapter output scale [1.0].")
@click.option("--init", "init", type=click.Choice(["zero", "small"]), default=None, help="Adapter init [zero].")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs [50].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Global batch size [128].")
@click.option("--lr", type=float, default=None, help="Peak AdamW learning rate [1e-3].")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=None, help="AdamW weight decay [0.05].")
@click.option("--warmup-epochs", type=click.IntRange(min=0), default=None, help="Linear warm-up epochs [5].")
@click.option("--clip-grad", type=click.FloatRange(min=0), default=None, help="Gradient-norm clip, 0 for none [1.0].")
@click.option("--preprocess", type=click.Choice(["timm", "official"]), default=None,
              help="Input transform: the backbone's timm data config, or the official AdapterTune code's "
                   "(ImageNet mean/std, bilinear, resize 256 + crop 224) to reproduce the paper [timm].")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Share of the training set held out for validation [0.1].")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Data-loading processes [4].")
@click.option("--seed", type=int, default=None, help="Training seed [0].")
@click.option("--seeds", default=None, metavar="0,1,2", help="Run each seed; report mean and std of test top-1.")
@click.option("--limit-train", type=click.IntRange(min=1), default=None, metavar="N",
              help="Train on a seeded subset of N images (quick runs).")
@click.option("--limit-eval", type=click.IntRange(min=1), default=None, metavar="N",
              help="Validate and test on seeded subsets of N images (quick runs).")
@click.option("--device", default=None, metavar="auto|cpu|cuda[:N]", help="Where to train [auto].")
@click.option("--amp", type=click.Choice(["auto", "bf16", "fp16", "off"]), default=None,
              help="Mixed precision on CUDA [auto: bf16 where supported, else fp16].")
@click.option("-o", "--output", default=None, type=click.Path(file_okay=False),
              help="Output folder [runs/<recipe or data set>].")
@click.option("--resume", is_flag=True, default=None, help="Continue the run in -o from its last.pt.")
@click.option("--overwrite", is_flag=True, default=None, help="Start over in an -o that holds a run.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Any other config key, e.g. --set model_args.drop_path_rate=0.1 --set hflip=0 (repeatable).")
@click.option("--no-progress", is_flag=True, help="No progress bar (one line per epoch only).")
def train_cmd(recipe, sets, no_progress, seed, seeds, pretrained, backbone_weights, adapter_kind, **flags):
    """Train AdapterTune adapters (or the head, or everything) on a timm ViT.

    Writes OUTPUT/run.pt (best epoch by validation), last.pt (resumable), metrics.jsonl and
    config.yaml. Precedence: recipe < --set < flags.
    """
    from atexport.training import is_main_process, parse_set, resolve_config, train

    if seed is not None and seeds is not None:
        raise BadInputError("give --seed or --seeds, not both.")
    if backbone_weights is not None and pretrained is not None:
        raise BadInputError(
            "--backbone-weights replaces the timm weights; drop --pretrained/--no-pretrained."
        )
    overrides = parse_set(sets)
    overrides.update({k: v for k, v in flags.items() if v is not None})
    if adapter_kind is not None:
        if not isinstance(overrides.get("adapter", {}), dict):
            raise BadInputError("--set adapter=...: give family keys as --set adapter.KEY=VALUE.")
        overrides["adapter"] = {**overrides.get("adapter", {}), "kind": adapter_kind}
    overrides.update(seed=seed, seeds=seeds, pretrained=pretrained, backbone_weights=backbone_weights)
    if no_progress:
        overrides["progress"] = False
    cfg = resolve_config(recipe, overrides)
    main = is_main_process()  # under torchrun, only rank 0 talks
    if main:
        click.echo(f"recipe: {cfg.recipe}  ->  {cfg.output_dir()}", err=True)
    try:
        result = train(cfg, log=lambda line: click.echo(line, err=True))
    except KeyboardInterrupt:
        out = cfg.output_dir()
        if not (out.is_dir() and any(out.rglob("last.pt"))):  # a run that failed early removes its folder
            click.echo("interrupted before the first epoch finished; nothing to resume.", err=True)
            sys.exit(130)
        click.echo(
            f"interrupted; {cfg.output_dir()}/last.pt holds the last finished epoch. Continue with:\n"
            f"  atexport train -o {cfg.output_dir()} --resume",
            err=True,
        )
        sys.exit(130)
    if main:
        click.echo(result.summary_line())
        click.echo(f"wrote {result.checkpoint or result.output / 'summary.json'}")


@click.command("import-official")
@click.option("--ckpt", required=True, type=click.Path(dir_okay=False),
              help="Checkpoint of the official AdapterTune code (best.pt / last.pt).")
@click.option("--backbone", required=True, metavar="TIMM_NAME",
              help="The timm backbone it was trained on, with its pretrained tag if not the default.")
@click.option("--backbone-weights", default=None, type=click.Path(dir_okay=False),
              help="Local backbone weights instead of timm's hub (the official checkpoint itself works).")
@click.option("--img-size", type=click.IntRange(min=1), default=None, help="Input size, if not the backbone's.")
@click.option("--patch-size", type=click.IntRange(min=1), default=None, help="Patch size, if not the backbone's.")
@click.option("--model-args", default=None, metavar="YAML",
              help="Other architecture overrides, e.g. '{depth: 6, embed_dim: 256}' for a custom ViT.")
@click.option("--class-names", default=None, type=click.Path(dir_okay=False),
              help="Text file with one class name per line [default: class_0, class_1, ...].")
@click.option("--alpha", type=float, default=1.0, show_default=True, help="Adapter scale used in training.")
@click.option("--preprocess", default="official", show_default=True, metavar="official|timm|YAML",
              help="Transform to record: the official code's (ImageNet mean/std, bilinear, resize 256 + crop 224), "
                   "the backbone's timm config, or official fields overridden for a fork, e.g. '{crop_pct: 1.0}'.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="run.pt to write.")
def import_official_cmd(ckpt, backbone, backbone_weights, img_size, patch_size, model_args, class_names, alpha,
                        preprocess, output):
    """Convert an official AdapterTune checkpoint into an atexport run.pt.

    \b
    Example:
      atexport import-official --ckpt results/pets/best.pt --backbone vit_small_patch16_224 -o pets.pt
    """
    from atexport.training import convert_official, parse_set, read_class_names

    args = parse_set([f"model_args={model_args}"])["model_args"] if model_args else {}
    if not isinstance(args, dict):
        raise BadInputError(f"--model-args {model_args!r}: expected a YAML mapping, e.g. '{{depth: 6}}'.")
    args.update({k: v for k, v in (("img_size", img_size), ("patch_size", patch_size)) if v is not None})
    if preprocess not in ("official", "timm"):
        preprocess = parse_set([f"preprocess={preprocess}"])["preprocess"]
    ck = convert_official(
        ckpt, backbone, output, backbone_weights=backbone_weights,
        class_names=read_class_names(class_names) if class_names else None,
        model_args=args, alpha=alpha, preprocess=preprocess,
    )
    a = ck.adapter
    click.echo(f"adapters: rank {a.rank}, every {a.every}, alpha {a.alpha}; {ck.model.num_classes} classes; "
               f"backbone {ck.model.backbone} (fingerprint {ck.fingerprint[:12]})")
    click.echo(ck.preprocess_note)
    click.echo(f"wrote {output}")
