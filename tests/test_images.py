"""``atexport images``: a data set as image files that ``imagefolder:`` and predict read back."""

import numpy as np
from click.testing import CliRunner
from PIL import Image

from atexport.cli import cli
from atexport.data import load_dataset


def test_images_round_trip_through_imagefolder(tmp_path):
    out = tmp_path / "imgs"
    res = CliRunner().invoke(cli, ["images", "--dataset", "digits", "--split", "test", "--count", "12", "-o", str(out)])
    assert res.exit_code == 0, res.output
    files = sorted(out.glob("*/*.png"))
    assert len(files) == 12
    src = load_dataset("digits", "test")
    assert {f.parent.name for f in files} <= set(src.class_names)
    # Lossless: every written image is one of the data set's images, under its own class folder.
    by_label = {}
    for i in range(len(src)):
        img, label = src[i]
        by_label.setdefault(src.class_names[label], []).append(np.asarray(img.convert("RGB")))
    for f in files:
        arr = np.asarray(Image.open(f).convert("RGB"))
        assert any(np.array_equal(arr, a) for a in by_label[f.parent.name]), f
    # The layout is what imagefolder:PATH reads as a split folder.
    res = CliRunner().invoke(cli, ["images", "--dataset", "digits", "--split", "test", "-o", str(tmp_path / "f" / "train")])
    assert res.exit_code == 0, res.output
    out.rename(tmp_path / "f" / "test")
    ds = load_dataset(f"imagefolder:{tmp_path / 'f'}", "test")
    assert len(ds) == 12 and ds.num_classes == 10


def test_images_refuses_a_file_as_output(tmp_path):
    f = tmp_path / "x"
    f.write_text("")
    res = CliRunner().invoke(cli, ["images", "--dataset", "digits", "--count", "1", "-o", str(f)])
    assert res.exit_code != 0
    assert "is a file" in res.output and "Traceback" not in res.output
