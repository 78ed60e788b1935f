"""``atexport report``: the paper-style table, training curves and per-backend accuracy of finished runs."""

from __future__ import annotations

import click

COMMANDS = ["report_cmd"]


@click.command("report")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("-o", "--output", default="report", show_default=True, type=click.Path(),
              help="Report folder: report.md, report.json and curves/ go into it (never a run's folder).")
@click.option("--no-curves", is_flag=True, help="Skip the per-run training-curve figures.")
def report_cmd(run_dirs, output, no_curves):
    """Table of finished runs (method x data set, mean +- std over seeds, parameters), curves, verify results.

    \b
    Example:
      atexport report runs/pets runs/cifar10 runs/sweep -o runs/report
    """
    from atexport.analysis import build_report

    result = build_report(run_dirs, output, curves=not no_curves)
    s = result.summary
    click.echo(f"{len(s['runs'])} runs, {len(s['rows'])} methods x {len(s['datasets'])} data sets"
               + (f"; {len(s['unfinished'])} unfinished" if s["unfinished"] else ""))
    for note in result.notes:
        click.echo(note)
    files = [str(result.files["markdown"]), str(result.files["json"])]
    if result.files.get("curves"):
        files.append(f"{len(result.files['curves'])} curves in {result.files['curves'][0].parent}/")
    click.echo("wrote " + ", ".join(files))
