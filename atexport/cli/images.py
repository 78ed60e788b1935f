"""``atexport images``: write a data set's images to files (for predict, calibration folders, apps)."""

from __future__ import annotations

import click

COMMANDS = ["images_cmd"]


@click.command("images")
@click.option("--dataset", required=True, help="Data set name (digits, pets, ...) or imagefolder:PATH.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option("--count", type=click.IntRange(min=1), default=None, help="Seeded random subset of N images [all].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Root of downloaded data sets [default: $ATEXPORT_DATA_DIR or ./data].")
@click.option("--download", is_flag=True, help="Download a missing torchvision data set.")
@click.option("--format", "fmt", type=click.Choice(["png", "jpg"]), default="png", show_default=True)
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Folder to write.")
def images_cmd(dataset, split, count, seed, data_dir, download, fmt, output):
    """Write images of a data set as files, one subfolder per class.

    \b
    Examples:
      atexport images --dataset digits --split test --count 4 -o runs/images
      atexport predict --model model.onnx runs/images/*/*.png
      atexport trt --onnx model.onnx --precision int8 --calib runs/calib   # a folder of images
    """
    from atexport.data import load_dataset
    from atexport.data.files import write_images

    ds = load_dataset(dataset, split, data_dir=data_dir, download=download, seed=seed)
    paths = write_images(ds, output, count=count, seed=seed, fmt=fmt)
    click.echo(f"wrote {len(paths)} {split} images of {dataset} ({ds.num_classes} classes) under {output}/")
