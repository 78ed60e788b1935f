"""Write a data set's images to a folder of files.

Apps, ``atexport predict``, INT8 calibration (``--calib FOLDER``) and Triton clients read image files; this
turns any registered data set (including the offline digits) into them, one subfolder per class, which
is also the layout ``imagefolder:PATH`` reads.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from atexport.data.datasets import ImageDataset, seeded_subset
from atexport.errors import BadInputError


def _safe(name: str) -> str:
    """A class name as a folder name (no separators, no leading dots)."""
    return re.sub(r"[^\w.+-]+", "_", str(name)).lstrip(".") or "_"


def _output_root(out: Path) -> Path:
    """The folder that will hold the temporary copy: ``out`` itself if it exists, else its parent (created)."""
    if out.exists() and not out.is_dir():
        raise BadInputError(f"-o {out}: exists and is not a folder; choose a folder path.")
    where = out if out.is_dir() else out.parent
    blocking = next((p for p in (where, *where.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise BadInputError(f"-o {out}: {blocking} is a file, not a folder; choose another output folder.")
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInputError(f"-o {out}: cannot create folder {where} ({e.strerror}); choose another output folder.") from None
    if not os.access(where, os.W_OK | os.X_OK):
        raise BadInputError(f"-o {out}: folder {where} is not writable; choose another output folder.")
    return where


def write_images(ds: ImageDataset, output: str | os.PathLike, count: int | None = None, seed: int = 0,
                 fmt: str = "png") -> list[Path]:
    """Write ``count`` seeded images of ``ds`` (all when ``None``) as ``output/<class>/<split>-<index>.<fmt>``.

    All images are written to a hidden temporary folder first and moved into ``output`` only when every
    one of them was read and encoded, so an unreadable image in the data set leaves no half output.

    Returns:
        The written paths, in data-set order.

    Raises:
        BadInputError: bad ``fmt``, an output that is a file or not writable, an unreadable image.
    """
    import shutil
    import tempfile

    if fmt not in ("png", "jpg"):
        raise BadInputError(f"--format {fmt}: expected png or jpg.")
    out = Path(output)
    where = _output_root(out)
    subset = seeded_subset(ds, count, seed)
    split = ds.split or "images"
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=where))
    except OSError as e:
        raise BadInputError(f"-o {out}: cannot write in {where} ({e.strerror}); choose another output folder.") from None
    try:
        rel = []
        for i in range(len(subset)):
            img, label = subset[i]
            name = Path(_safe(ds.class_names[label])) / f"{split}-{i:05d}.{fmt}"
            (tmp / name.parent).mkdir(parents=True, exist_ok=True)
            img.convert("RGB").save(tmp / name, format="PNG" if fmt == "png" else "JPEG", quality=95)
            rel.append(name)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for name in rel:  # every image is ready: move them in (a rename each, same file system)
            (out / name.parent).mkdir(parents=True, exist_ok=True)
            os.replace(tmp / name, out / name)
            paths.append(out / name)
        return paths
    except OSError as e:  # disk full, permissions changed under us
        raise BadInputError(f"-o {out}: cannot write the images ({e.strerror or e}).") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
