"""Atomic file writes and hashing.

Every artifact atexport writes (checkpoints, ONNX models, engines, reports) goes through
:func:`atomic_write`, so an interrupted run never leaves a half-written file where a good one is
expected: the data goes to a temporary file in the same folder, which is renamed over the target only
once it is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from atexport.errors import BadInputError


def check_writable(path: str | os.PathLike, flag: str = "-o") -> Path:
    """Fail early, with the flag named, when ``path`` cannot be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise BadInputError(f"{flag} {path}: is a directory; give a file path.")
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BadInputError(f"{flag} {path}: cannot create folder {parent} ({e.strerror}).") from None
    if not parent.is_dir():
        raise BadInputError(f"{flag} {path}: {parent} is not a folder; choose another output path.")
    if not os.access(parent, os.W_OK):
        raise BadInputError(f"{flag} {path}: folder {parent} is not writable; choose another output path.")
    return path


def _default_mode() -> int:
    """``0o666`` less the process umask: the mode ``open()`` would have given a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())  # mkstemp makes 0600; give the artifact the usual umask mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_write(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_write(path, "w") as f:
        f.write(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def require_file(path: str | os.PathLike, flag: str, what: str = "file") -> Path:
    """Return ``path`` if it is an existing file, else raise a :class:`BadInputError` naming ``flag``."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"{flag} {path}: no such {what}.")
    if not path.is_file():
        raise BadInputError(f"{flag} {path}: not a file.")
    return path
