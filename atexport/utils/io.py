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
import time
import warnings
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


STALE_TEMP_SECONDS = 3600.0  # a temp file without a PID untouched this long is left over from a killed write
LIVE_PID_TEMP_SECONDS = 86400.0  # one whose creating PID runs again (PID reuse) is removed only after a day


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but belongs to someone else (or we cannot tell): treat as alive
    return True


def clean_stale_temps(path: str | os.PathLike, max_age: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Delete temporary files and folders of our own naming (``.NAME.<pid>.<random>.tmp``) left beside ``path``.

    A write killed with SIGKILL cannot remove its temporary file. The next write of the same target
    removes such files when the process that created them is dead; files without a PID (older atexport
    versions, ``.NAME.<random>.tmp``) when untouched for ``max_age`` seconds; files whose PID is alive
    (a write in progress) only after a day untouched, in case the PID was reused. Another process's live
    temporary file is never touched.

    Returns:
        The files removed.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    prefix = f".{path.name}."
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        middle = name[len(prefix):-len(".tmp")]
        pid_text = middle.split(".", 1)[0] if "." in middle else ""
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
            if not (is_dir or entry.is_file(follow_symlinks=False)):
                continue
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        pid = int(pid_text) if pid_text.isdigit() else None
        if pid is None:  # an older atexport's name: only its age tells
            stale = age >= max_age
        elif pid == os.getpid() or _pid_alive(pid):  # a live write (ours or another process's), unless PID reuse
            stale = age >= LIVE_PID_TEMP_SECONDS
        else:
            stale = True
        if stale:
            with contextlib.suppress(OSError):
                if is_dir:  # a temporary folder (an OpenVINO IR pair is written into one)
                    import shutil

                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file beside ``path``; rename it over ``path`` only if the block succeeds.

    The temporary file is named ``.NAME.<pid>.<random>.tmp``; stale ones left by killed writes of the same
    target are removed first (:func:`clean_stale_temps`).
    """
    path = Path(path)
    check_writable(path)
    clean_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
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


def require_file(path: str | os.PathLike, flag: str | None, what: str = "file") -> Path:
    """Return ``path`` if it is an existing file, else raise a :class:`BadInputError` naming ``flag`` (when the
    user gave the file with one) and the path."""
    path = Path(path)
    where = f"{flag} {path}" if flag else str(path)
    if not path.exists():
        raise BadInputError(f"{where}: no such {what}.")
    if not path.is_file():
        raise BadInputError(f"{where}: not a file.")
    return path


def error_reason(e: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (its type name if it has none).

    Never an IndexError on an empty message (``EOFError()`` from a 0-byte file has none).
    """
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else type(e).__name__
    if len(text) > 120 and ". " in text:  # long library messages: their first sentence says it
        text = text.split(". ")[0]
    return text[:limit]


def _unpickle_refused(e: BaseException) -> str | None:
    """For torch's weights-only refusal: what it refused, without torch's advice to disable the check."""
    text = str(e)
    if "weights_only" not in text and "Weights only" not in text and "WeightsUnpickler" not in text:
        return None
    detail = ""
    for line in text.splitlines():
        line = line.strip()
        if "GLOBAL" in line or "Unsupported" in line:
            detail = line.replace("WeightsUnpickler error:", "").strip()[:150].rstrip(".")
            break
    if "GLOBAL" in detail:  # a reference to a Python callable: what code-carrying pickles are made of
        return ("it holds pickled Python objects other than tensors and plain data, which atexport never loads "
                f"because they can run code; {detail}")
    return ("cannot read it as a weights-only torch file" + (f": {detail}" if detail else "")
            + "; atexport never unpickles anything else")


def load_torch_file(path: str | os.PathLike, flag: str | None, expect: str) -> object:
    """``torch.load(path, weights_only=True)`` with one clear :class:`BadInputError` for any unreadable file.

    An empty file, a truncated or random one, and a pickle carrying code are each reported by ``flag`` and
    path. torch's own advice to re-run with ``weights_only=False`` (running the file's code) is never
    repeated.

    Args:
        path: the file (already known to exist).
        flag: the option that named it, e.g. ``"--ckpt"``; ``None`` for a file found inside a folder the
            user gave (a sweep cell's or a run's), which the message then names alone.
        expect: what it should be, finishing the sentence "not a readable ...", e.g. ``"atexport checkpoint"``.
    """
    import pickle

    import torch

    path = Path(path)
    where = f"{flag} {path}" if flag else str(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise BadInputError(f"{where}: cannot read it ({e.strerror}).") from None
    if size == 0:
        raise BadInputError(f"{where}: the file is empty (0 bytes).")
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it may not parse; the error below says it all.
            warnings.filterwarnings("ignore", message=".*pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise BadInputError(f"{where}: not a readable {expect} (it asks for more memory than there is).") from None
    except (Exception, pickle.UnpicklingError) as e:  # truncated zip, random bytes, code-carrying pickle...
        reason = _unpickle_refused(e) or error_reason(e)
        raise BadInputError(f"{where}: not a readable {expect} ({reason}).") from None



def canonical_json(obj) -> str:
    """A stable text form of a JSON-able value (sorted keys), to compare records and settings for equality."""
    return json.dumps(obj, sort_keys=True, default=str)
