"""Durable file writes shared by the modules that keep state on disk (IRT cache, evaluation results)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """
    Write a text file atomically: a temporary file in the same folder, flushed and fsynced, then `os.replace`d over
    the target. A crash mid-write leaves the old file (or none), never a truncated one.

    Args:
        path (`str` or `os.PathLike`):
            The target file; its folder is created if needed.
        text (`str`):
            The content, written as UTF-8.

    Returns:
        `Path`: The written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    return path
