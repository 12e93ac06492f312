"""Atomic file writes: the one helper every package uses (``lampo`` is the lowest layer, so all may import it).

A file is written under a temporary name beside it (``.NAME.PID-THREAD.tmp``, unique to the writing process and
thread, so several processes may write the same file at once, e.g. the shards of one evaluation writing
``meta.json``), flushed and ``fsync``-ed, then renamed over ``NAME`` (``os.replace``: one step on POSIX), and the folder
is ``fsync``-ed so the rename itself survives a power loss. A reader therefore sees the old content or the new, never a
mix; a failure before the rename removes the temporary file and leaves the old content untouched.

Folders written as a whole (checkpoints) have their own helper, ``pipeline.state.atomic_dir``.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the file's own fsync has happened
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that takes a file name (``safetensors.save_file``); once
    the block ends without an error the file is fsync-ed and renamed to ``path``. The parent folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """``open(path, mode)`` for writing, atomically: the content appears at ``path`` only when the block ends without
    an error. ``mode`` is ``"w"`` (text, in ``encoding``) or ``"wb"``."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a whole file: mode must be 'w' or 'wb', not {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
        yield f
        f.flush()


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_open(path, "w", encoding=encoding) as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike[str], data: Any, **dumps: Any) -> None:
    """Write ``json.dumps(data, indent=2, ensure_ascii=False, **dumps)`` and a final newline to ``path`` atomically;
    ``dumps`` may override those two or add others (``allow_nan=False``, ``default=float``)."""
    atomic_write_text(path, json.dumps(data, **{"indent": 2, "ensure_ascii": False, **dumps}) + "\n")


__all__ = ["atomic_path", "atomic_open", "atomic_write_text", "atomic_write_json"]
