"""Write a data set's images to a folder of files.

Apps, ``atexport predict``, INT8 calibration (``--calib FOLDER``) and Triton clients read image files; this
turns any registered data set (including the offline digits) into them, one subfolder per class, which
is also the layout ``imagefolder:PATH`` reads.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

from atexport.data.datasets import ImageDataset, seeded_subset
from atexport.errors import BadInputError
from atexport.utils.io import atomic_write_bytes


def _safe(name: str) -> str:
    """A class name as a folder name (no separators, no leading dots)."""
    return re.sub(r"[^\w.+-]+", "_", str(name)).lstrip(".") or "_"


def write_images(ds: ImageDataset, output: str | os.PathLike, count: int | None = None, seed: int = 0,
                 fmt: str = "png") -> list[Path]:
    """Write ``count`` seeded images of ``ds`` (all when ``None``) as ``output/<class>/<split>-<index>.<fmt>``.

    Returns:
        The written paths, in data-set order. Each file is written atomically.
    """
    if fmt not in ("png", "jpg"):
        raise BadInputError(f"--format {fmt}: expected png or jpg.")
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise BadInputError(f"-o {out}: exists and is not a folder; choose a folder path.")
    subset = seeded_subset(ds, count, seed)
    split = ds.split or "images"
    paths = []
    for i in range(len(subset)):
        img, label = subset[i]
        path = out / _safe(ds.class_names[label]) / f"{split}-{i:05d}.{fmt}"
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="PNG" if fmt == "png" else "JPEG", quality=95)
        paths.append(atomic_write_bytes(path, buf.getvalue()))
    return paths
