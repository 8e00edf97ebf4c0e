"""Atomic file writes: the one way skillkv writes a file others may read (snapshots, export files, records).

The data goes to a temporary file in the destination's folder (`temp_name`: it carries the writer's pid, so a later
writer can tell a dead writer's leftovers), is fsynced and renamed over the destination; a failed or partial write
is never visible and leaves no temporary file behind. Files are created with mode 0666 less the umask, like any
file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def temp_name(prefix: str, suffix: str) -> str:
    """<prefix><pid>-<random><suffix>."""
    return f"{prefix}{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def write_atomic(path: Path, data: bytes, prefix: str = ".tmp-", suffix: str = ".tmp", sync_dir: bool = False) -> int:
    """Write `data` to `path` atomically (module docstring); `sync_dir` also fsyncs the folder so the rename
    survives a crash. Returns the bytes written."""
    path = Path(path)
    tmp = str(path.parent / temp_name(prefix, suffix))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)  # umask applies
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync_dir:
        with contextlib.suppress(OSError):
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    return len(data)
