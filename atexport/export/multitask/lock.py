"""Safe in-place edits by several processes: compare-and-swap on the file's sha256 under a lock file.

``atexport tasks add`` and ``remove`` edit a model in place: they read it, work for a few seconds
(building the new bank, checking the other tasks' logits), then replace the file atomically. Two edits
at once would both read the same model, and the later replace would silently drop the earlier one's
task. So an edit remembers the sha256 of the file it read (:func:`file_sha256`) and writes only through
:func:`unchanged_since`: under an exclusive lock file ``<model>.lock`` (created with ``O_EXCL``;
one older than :data:`LOCK_STALE_S`, left by a killed edit, is taken over) the file is hashed again and
replaced only if it is still what the edit read. Otherwise the later edit fails with a
:class:`~atexport.errors.BadInputError` (exit 2) asking to run it again; nothing is lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from atexport.errors import BadInputError
from atexport.utils.io import sha256_file

LOCK_STALE_S = 600.0
"""A lock file older than this (seconds) was left by an edit that died; it is taken over."""

LOCK_WAIT_S = 60.0
"""How long an edit waits for another edit's lock (held only while hashing and writing) before giving up."""


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of ``path``: ``<path>.lock`` beside it (``tasks.onnx`` -> ``tasks.onnx.lock``)."""
    return Path(f"{path}.lock")


def file_sha256(path: str | os.PathLike) -> str | None:
    """sha256 of the file at ``path``, ``None`` when there is none."""
    try:
        return sha256_file(path)
    except FileNotFoundError:
        return None


def _holder(lock: Path) -> str:
    try:
        d = json.loads(lock.read_text())
        return f"pid {d.get('pid')} on {d.get('host')} since {d.get('time')}"
    except (OSError, ValueError, AttributeError):
        return "another process"


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, where: str, *, wait_s: float = LOCK_WAIT_S,
                   stale_s: float = LOCK_STALE_S) -> Iterator[Path]:
    """Hold ``<path>.lock`` (``O_CREAT | O_EXCL``) for the block; wait for another holder, take over a stale one.

    Raises:
        BadInputError: the lock stayed held for ``wait_s`` seconds, or cannot be created.
    """
    lock = lock_path(path)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                age = time.time() - lock.stat().st_mtime
            except FileNotFoundError:
                continue  # released in between: try again
            if age > stale_s:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock)  # left by an edit that was killed
                continue
            if time.monotonic() > deadline:
                raise BadInputError(
                    f"{where}: {lock} is held by {_holder(lock)} (another 'atexport tasks' edit?); run the command "
                    f"again once it has finished, or delete {lock} if no edit is running."
                ) from None
            time.sleep(0.05)
        except OSError as e:
            raise BadInputError(
                f"{where}: cannot create the lock file {lock} ({e.strerror}); the folder must be writable."
            ) from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                "time": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)


@contextlib.contextmanager
def unchanged_since(path: str | os.PathLike, expected_sha256: str | None, where: str, *,
                    check: bool = True) -> Iterator[Path]:
    """Hold ``path``'s lock for the block (which writes ``path``), after checking it still hashes to ``expected_sha256``.

    Args:
        path: the file about to be replaced.
        expected_sha256: the hash of the file the edit read (:func:`file_sha256`; ``None``: it did not exist).
        where: how the file is named in messages (e.g. ``--model tasks.onnx``).
        check: ``False`` only takes the lock (a separate output, not an in-place edit).

    Raises:
        BadInputError: the file changed since it was read (the block does not run, nothing is written).
    """
    with exclusive_lock(path, where) as lock:
        if check and file_sha256(path) != expected_sha256:
            raise BadInputError(
                f"{where} changed while this edit ran (another 'atexport tasks' edit?); run the command again."
            )
        yield lock
