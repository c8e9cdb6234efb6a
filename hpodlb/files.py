"""The files hpodlb reads and writes: who could have changed them, how they are read and written.

hpodlb runs as root for months and acts on what its files say, so every file goes through here:
- **trust**: a file that someone other than root could have changed (the path as given: each
  directory on the way, each symlink on the way and every directory on the way to where it points,
  and the file it ends at; not owned by root, or writable by group or others without the sticky
  bit) is refused, never "fixed"; a file that belongs to one other account by design
  (`ssh.key_file`, in the login user's home) names that account as a further owner;
- **reading**: only a regular file of bounded size, opened with O_NONBLOCK so that a FIFO never
  blocks the open; a FIFO, a device or a file larger than the caller's limit is a one-line error
  naming the file, never a hang or a MemoryError;
- **writing**: a temp file beside the target, created with its final mode, fsync, rename, fsync of
  the dir, so a crash leaves the old file or the new one, never half of one;
- **the state dir**: trusted like the config, created 0700 by us, its files opened without following
  symlinks.
This module never decides what a file means: callers turn its errors into their own messages.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

_MAX_LINKS = 40  # as the kernel's path walk (ELOOP beyond)


class FileSignature(NamedTuple):
    """What a stat says about a file's content: equal before and after a read, nobody replaced or
    rewrote it meanwhile (to the mtime's resolution)."""

    inode: int
    device: int
    size: int
    mtime_ns: int


class UntrustedPathError(Exception):
    """The message names the path (or the directory above it) and what is wrong with it."""


class UnusableFileError(Exception):
    """Not a regular file, a symlink where none may be, or too large; the message names the file."""


def os_reason(exc: BaseException) -> str:
    """Why a file could not be used, for a message that already names it: the OS's words
    (`Permission denied`, `No space left on device`), else the exception's own message (ours
    name the path and what is wrong with it)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def require_trusted(path: Path, owners: Mapping[int, str] | None = None) -> None:
    """Raise UntrustedPathError unless only root (or we, or one of `owners`: uid -> name) could
    have changed `path`.

    Judged as given, not only where it leads: a symlink in a user's directory is that user's to
    re-point at any time, so a path through it is theirs however trusted its target is today.
    A missing path passes: the caller's own read reports that more precisely.
    """
    allowed = _owners(owners)
    chain = _walk(path)
    if chain is None:
        return
    *on_the_way, (final, st) = chain
    _judge(path, final, st, allowed, is_dir=False)
    for entry, est in on_the_way:
        _judge(path, entry, est, allowed, is_dir=True)
    _require_chosen_by_its_owner(path, chain, allowed)


def _require_chosen_by_its_owner(
    path: Path, chain: list[tuple[Path, os.stat_result]], allowed: Mapping[int, str]
) -> None:
    """A further owner (the login user, for its key) who owns something on the way chooses which
    file the path ends at, so that file must be theirs: else root would use, on their word, a
    file they cannot read themselves (a symlink of theirs to a key only root can read)."""
    root = {0, os.geteuid()}
    (final, st) = chain[-1]
    for entry, est in reversed(chain[:-1]):  # the nearest first: what the message names
        if est.st_uid not in root and st.st_uid != est.st_uid:
            who, owner = allowed[est.st_uid], allowed.get(st.st_uid, f"uid {st.st_uid}")
            raise UntrustedPathError(
                f"{path}: {final} is owned by {owner}, but {who} chose it ({entry} is {who}'s):"
                f" it must be {who}'s own key"
            )


def _walk(path: Path) -> list[tuple[Path, os.stat_result]] | None:
    """What the kernel goes through to reach `path`, in order, each with its lstat: `/`, every
    directory, every symlink and then where it points, and last what `path` names. None if a part
    of it is missing (or not a directory where one is needed)."""
    here = Path("/")
    chain = [(here, os.lstat(here))]
    todo = list(reversed((path if path.is_absolute() else Path.cwd() / path).parts[1:]))
    links = 0
    while todo:
        name = todo.pop()
        if name == "..":
            here = here.parent  # `here` never is a symlink: its parent is the one walked through
            continue
        entry = here / name
        try:
            st = os.lstat(entry)
        except OSError:
            return None
        chain.append((entry, st))
        if not stat.S_ISLNK(st.st_mode):
            here = entry
            continue
        links += 1
        if links > _MAX_LINKS:
            raise UntrustedPathError(f"{path}: too many levels of symbolic links")
        target = entry.readlink()
        if target.is_absolute():
            here = Path("/")
        todo.extend(reversed(target.parts[1:] if target.is_absolute() else target.parts))
    if chain[-1][0] != here:  # it ended on `..` or on a symlink to `/` or `.`
        chain.append((here, os.lstat(here)))
    return chain


def require_trusted_file(path: Path, owners: Mapping[int, str] | None = None) -> None:
    """`require_trusted` for a path that must be a regular file, what it is judged first: a
    directory given as a file (`--config /tmp`, sticky and world-writable) is named a directory,
    not an untrusted file. A missing path passes, as in `require_trusted`."""
    with contextlib.suppress(OSError):  # the caller's read says why a path cannot be stat'ed
        _require_regular(path, path.stat())
    require_trusted(path, owners)


def read_trusted_file(path: Path, limit: int, owners: Mapping[int, str] | None = None) -> bytes:
    """`require_trusted_file`, then `read_regular_file`: the whole file, if only root (or
    `owners`) could have changed it. The open file is judged again, so one swapped in between the
    check and the open is still refused.

    Raises UntrustedPathError, UnusableFileError, or OSError (FileNotFoundError first of all)."""
    require_trusted_file(path, owners)
    allowed = _owners(owners)
    real = Path(os.path.realpath(path))
    return read_regular_file(
        path, limit, check=lambda st: _judge(path, real, st, allowed, is_dir=False)
    )


def require_trusted_dir(path: Path) -> None:
    """`require_trusted` for a dir hpodlb writes; one that does not exist yet is judged by the
    nearest directory above it, where it would be created."""
    if path.exists():
        require_trusted(path)
        if not path.is_dir():
            raise UntrustedPathError(f"{path}: not a directory")
        return
    existing = next((p for p in path.parents if p.exists()), Path("/"))
    require_trusted(existing)


def make_trusted_dir(path: Path) -> None:
    """Refuse an untrusted dir (UntrustedPathError), else create it 0700 if missing."""
    require_trusted_dir(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    require_trusted(path)


def _owners(others: Mapping[int, str] | None) -> dict[int, str]:
    """Who may own a trusted path, uid -> name for messages: root (and we, root as a rule),
    and `others`."""
    return {os.geteuid(): "root", 0: "root", **(others or {})}


def _judge(
    asked: Path, path: Path, st: os.stat_result, owners: Mapping[int, str], *, is_dir: bool
) -> None:
    what = f"{asked}" if path == Path(os.path.realpath(asked)) else f"{asked}: {path}"
    if st.st_uid not in owners:
        names = " or ".join(dict.fromkeys(owners.values()))
        raise UntrustedPathError(
            f"{what} is owned by uid {st.st_uid}, not {names}; refusing to trust it"
        )
    if stat.S_ISLNK(st.st_mode):
        return  # its mode means nothing: who owns it and its directory decide where it points
    writable_by_others = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable_by_others and not (is_dir and st.st_mode & stat.S_ISVTX):
        raise UntrustedPathError(
            f"{what} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            "refusing to trust it"
        )


def read_regular_file(
    path: Path,
    limit: int,
    *,
    follow_symlinks: bool = True,
    check: Callable[[os.stat_result], None] | None = None,
) -> bytes:
    """The whole file, if it is a regular file of at most `limit` bytes (UnusableFileError if not).

    OSError (FileNotFoundError first of all) is left to the caller, which knows what a missing file
    means. `check` sees the open file's own stat before a byte is read (ownership, mode).
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    fd = _open(path, flags)
    try:
        st = os.fstat(fd)
        _require_regular(path, st)
        if check is not None:
            check(st)
        if st.st_size > limit:
            raise _too_large(path, limit)
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, min(1 << 20, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:  # it grew while we read
                raise _too_large(path, limit)
        return b"".join(chunks)
    finally:
        os.close(fd)


def open_private_file(path: Path) -> int:
    """A read-write fd on `path` (created 0600 if missing) that is our own regular file.

    Never follows a symlink and never blocks on a FIFO; a file of someone else's, or one with
    another name (a hard link), is refused. A mode wider than 0600 is narrowed: the file is ours.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = _open(path, flags, 0o600)
    try:
        _require_own_regular(path, os.fstat(fd))
        os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


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


def _open(path: Path, flags: int, mode: int = 0o600) -> int:
    try:
        return os.open(path, flags, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP and flags & os.O_NOFOLLOW:
            raise UnusableFileError(
                f"{path}: cannot open: a symbolic link, never followed here"
            ) from None
        raise


_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def _require_regular(path: Path, st: os.stat_result) -> None:
    if stat.S_ISREG(st.st_mode):
        return
    kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a file")
    raise UnusableFileError(f"{path}: cannot read: not a regular file ({kind})")


def _require_own_regular(path: Path, st: os.stat_result) -> None:
    _require_regular(path, st)
    if st.st_uid != os.geteuid() or st.st_nlink != 1:
        raise UnusableFileError(
            f"{path}: cannot use: owned by uid {st.st_uid}, {st.st_nlink} name(s); not ours alone"
        )


def _too_large(path: Path, limit: int) -> UnusableFileError:
    size = f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit >> 10} KiB"
    return UnusableFileError(f"{path}: cannot read: larger than {size}")
