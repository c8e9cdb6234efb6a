"""The files hpodlb reads and writes: who could have changed them, how they are written.

hpodlb runs as root for months and acts on what its files say, so every file goes through here:
- **trust**: a file that someone other than root could have changed (its final target, symlinks
  followed, or any directory above it: not owned by root, or writable by group or others without
  the sticky bit) is refused, never "fixed";
- **change detection**: one signature of a file's identity, size and mtime;
- **writing**: a temp file beside the target, created with its final mode, fsync, rename, fsync of
  the dir, so a crash leaves the old file or the new one, never half of one.
This module never decides what a file means: callers turn its errors into their own messages.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import NamedTuple


class FileSignature(NamedTuple):
    """What a stat says about a file's content: equal before and after a read, nobody replaced or
    rewrote it meanwhile (to the mtime's resolution)."""

    inode: int
    device: int
    size: int
    mtime_ns: int


class UntrustedPathError(Exception):
    """The message names the path (or the directory above it) and what is wrong with it."""


def require_trusted(path: Path) -> None:
    """Raise UntrustedPathError unless only root (or we) could have changed `path`.

    A missing path passes: the caller's own read reports that more precisely.
    """
    real = Path(os.path.realpath(path))
    owners = {0, os.geteuid()}
    try:
        st = real.stat()
    except OSError:
        return
    _judge(path, real, st, owners, is_dir=False)
    for parent in real.parents:
        try:
            pst = parent.stat()
        except OSError as exc:
            raise UntrustedPathError(f"{parent}: cannot check ({exc.strerror})") from None
        _judge(path, parent, pst, owners, is_dir=True)


def _judge(asked: Path, path: Path, st: os.stat_result, owners: set[int], *, is_dir: bool) -> None:
    what = f"{asked}" if path == Path(os.path.realpath(asked)) else f"{asked}: {path}"
    if st.st_uid not in owners:
        raise UntrustedPathError(
            f"{what} is owned by uid {st.st_uid}, not root; refusing to trust it"
        )
    writable_by_others = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable_by_others and not (is_dir and st.st_mode & stat.S_ISVTX):
        raise UntrustedPathError(
            f"{what} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            "refusing to trust it"
        )


def file_signature(path: Path) -> FileSignature | None:
    """The signature of what `path` names now (symlinks followed); None if it cannot be stat'ed."""
    try:
        st = path.stat()
    except OSError:
        return None
    return FileSignature(st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)


def write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Temp file in the same dir (created with `mode` from the start), fsync, rename, fsync dir."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        Path(tmp).replace(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            Path(tmp).unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
