"""``atexport analyze``: the singular values of each adapter's update and a rank for the next run."""

from __future__ import annotations

import click

COMMANDS = ["analyze_cmd"]


@click.command("analyze")
@click.option("--ckpt", required=True, type=click.Path(dir_okay=False), help="An adapter run.pt.")
@click.option("-o", "--output", default=None, type=click.Path(file_okay=False),
              help="Folder for spectrum.json, .md, .png [analysis/ beside the checkpoint].")
def analyze_cmd(ckpt, output):
    """Effective rank of every adapter (90/95/99% energy of up.weight @ down.weight) and a recommended rank.

    \b
    Example:
      atexport analyze --ckpt runs/pets/run.pt -o runs/pets/analysis
    """
    from atexport.analysis import analyze_checkpoint

    result = analyze_checkpoint(ckpt, output)
    click.echo(result.table())
    click.echo(f"recommended rank: {result.recommended_rank if result.recommended_rank is not None else '-'}")
    for line in result.reasoning:
        click.echo(f"  {line}")
    for note in result.notes:
        click.echo(note)
    click.echo("wrote " + ", ".join(str(p) for p in result.files.values()))
