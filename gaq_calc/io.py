"""Atomic file writes: a temporary file in the destination folder, then os.replace.

A reader, or a restart after a kill, sees the old file or the new one, never half of one. Every writer of
results, cards, logs, figures, checkpoints, model files and artifacts goes through `atomic_path`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp", fsync: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write to; on success it replaces `path`, on any error it
    is removed and `path` is left as it was. `suffix` ends the temporary name (".tmp.png" for writers that
    choose the format by extension); `fsync` flushes the file to disk before the rename. An OSError names
    the file ("No space left on device" alone does not say which)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from err
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str | os.PathLike, text: str, fsync: bool = False, newline: str | None = None) -> None:
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, "w", newline=newline) as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, data, fsync: bool = True) -> None:
    """JSON (indent 1; floats round-trip exactly through repr; NaN allowed), written atomically."""
    write_text_atomic(path, json.dumps(data, indent=1, allow_nan=True), fsync=fsync)
