"""``atexport sweep``: a grid of adapter runs (rank x every x family x seed) and its elbow."""

from __future__ import annotations

import sys

import click

from atexport.errors import BadInputError

COMMANDS = ["sweep_cmd"]


@click.command("sweep")
@click.option("--recipe", default=None, metavar="NAME|FILE", help="Recipe every cell starts from [the data set's].")
@click.option("--dataset", default=None, metavar="NAME", help="Data set name, or imagefolder:PATH.")
@click.option("--ranks", required=True, metavar="2,4,8,...", help="Adapter ranks to train.")
@click.option("--every", "everies", default="1", show_default=True, metavar="1,2",
              help="Adapter placements (an adapter on every N-th block).")
@click.option("--adapter", "families", multiple=True, metavar="FAMILY",
              help="Adapter family (repeatable) [adaptertune].")
@click.option("--seeds", default="0", show_default=True, metavar="0,1,2", help="Seeds of each cell.")
@click.option("--tolerance", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="Elbow: the smallest rank within this many points of the best mean.")
@click.option("--backbone", default=None, metavar="TIMM_NAME", help="timm ViT name.")
@click.option("--pretrained/--no-pretrained", default=None, help="timm hub weights, or a random backbone.")
@click.option("--backbone-weights", default=None, type=click.Path(dir_okay=False), help="Local backbone weights.")
@click.option("--img-size", type=click.IntRange(min=1), default=None, help="Input size in pixels.")
@click.option("--patch-size", type=click.IntRange(min=1), default=None, help="Patch size in pixels.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs per cell.")
@click.option("--warmup-epochs", type=click.IntRange(min=0), default=None, help="Linear warm-up epochs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Batch size.")
@click.option("--lr", type=float, default=None, help="Peak AdamW learning rate.")
@click.option("--limit-train", type=click.IntRange(min=1), default=None, metavar="N", help="Train on N images.")
@click.option("--limit-eval", type=click.IntRange(min=1), default=None, metavar="N", help="Evaluate on N images.")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Data-loading processes.")
@click.option("--device", default=None, metavar="auto|cpu|cuda[:N]", help="Where to train [auto].")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Any other training key (repeatable).")
@click.option("-o", "--output", default="runs/sweep", show_default=True, type=click.Path(file_okay=False),
              help="Sweep folder: one <family>_r<rank>_e<every>/seed_<s>/ run per cell.")
@click.option("--verbose", is_flag=True, help="Also print the trainer's lines (one per epoch per cell).")
@click.option("--no-progress", is_flag=True, help="No progress bar (one line per cell).")
def sweep_cmd(recipe, ranks, everies, families, seeds, tolerance, sets, output, verbose, no_progress, pretrained,
              backbone_weights, **flags):
    """Train adapters at several ranks (and placements, families, seeds); find the elbow.

    Resumable: run the same command again and finished cells are skipped, interrupted ones resume.
    Writes OUTPUT/sweep.json, sweep.md (mean +- std test top-1, trainable parameters, % of full
    fine-tuning) and sweep.png (accuracy vs rank, the elbow marked; needs atexport[plot]).

    \b
    Examples:
      atexport sweep --recipe digits --ranks 2,4,8,16,32,64 --seeds 0,1,2 -o runs/sweep
      atexport sweep --dataset pets --ranks 4,16,64 --every 1,2 --seeds 0,1,2 -o runs/pets_sweep
      torchrun --nproc-per-node 4 -m atexport sweep --dataset pets --ranks 2,4,8,16,32,64 --seeds 0,1,2
          (one cell per process and GPU: cell i goes to process i % 4; rank 0 writes the summary)
    """
    from atexport.analysis import run_sweep
    from atexport.training import is_main_process, parse_set, resolve_config

    if backbone_weights is not None and pretrained is not None:
        raise BadInputError("--backbone-weights replaces the timm weights; drop --pretrained/--no-pretrained.")
    overrides = parse_set(sets)
    if families and isinstance(overrides.get("adapter"), dict) and "kind" not in overrides["adapter"]:
        # --set adapter.KEY=... are the first family's keys (each cell then checks them against its own family)
        overrides["adapter"] = {**overrides["adapter"], "kind": families[0]}
    overrides.update({k: v for k, v in flags.items() if v is not None})
    overrides.update(pretrained=pretrained, backbone_weights=backbone_weights, regime="adapter")
    if no_progress:
        overrides["progress"] = False
    base = resolve_config(recipe, overrides)
    echo = (lambda line: click.echo(line, err=True))
    try:
        result = run_sweep(base, ranks=ranks, everies=everies, families=families, seeds=seeds, output=output,
                           tolerance=tolerance, log=echo, train_log=echo if verbose else None)
    except KeyboardInterrupt:
        click.echo(f"interrupted; run the same command again to continue the sweep in {output}.", err=True)
        sys.exit(130)
    if not is_main_process():
        return
    where = " in this process (rank 0)" if result.summary.get("processes", 1) > 1 else ""
    click.echo(f"trained {len(result.trained)} cells, skipped {len(result.skipped)} finished ones{where}")
    for s in result.summary["series"]:
        e = s.get("elbow")
        if e:
            click.echo(f"{s['label']}: elbow at rank {e['rank']} ({e['mean']:.2f}%), within {tolerance:g} pt of the "
                       f"best ({e['best_mean']:.2f}% at rank {e['best_rank']})")
    for note in result.notes:
        click.echo(note)
    click.echo("wrote " + ", ".join(str(p) for p in result.files.values()))
