"""One hpodlb acting per head node: an flock in the state dir, held for the life of the process.

The kernel drops the lock when the process dies (even by SIGKILL), so a crash never leaves a stale
lock behind; the pid written inside is only there to name the holder in the refusal message. The
state dir must be trusted (hpodlb.files) and the lock file is ours, 0600, never a symlink: a user
who could plant the lock file or open it could make root truncate another file, or hold the flock
so that no hpodlb ever acts.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

from hpodlb.files import UntrustedPathError, UnusableFileError, make_trusted_dir, open_private_file

LOCK_FILE = "hpodlb.lock"


class LockedError(Exception):
    """The lock cannot be taken: another hpodlb holds it (the message names its pid), or the state
    dir or the lock file is not safe to use (the message says why)."""


class InstanceLock:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> InstanceLock:
        try:
            make_trusted_dir(self.state_dir)
            fd = open_private_file(self.path)
        except (UntrustedPathError, UnusableFileError) as exc:
            raise LockedError(f"state dir: {exc}; not acting") from None
        except OSError as exc:
            raise LockedError(f"{self.path}: cannot open ({exc.strerror}); not acting") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockedError(
                f"another hpodlb (pid {holder}) holds {self.path}; not acting"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> InstanceLock:
        return self if self.fd is not None else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_holder(state_dir: Path, locks: Path = Path("/proc/locks")) -> str | None:
    """The pid of the process that holds the lock now, or None if none does.

    Read from the kernel's lock table rather than by trying the lock: trying it, even shared and
    for an instant, could make a daemon starting at that moment believe another one holds it.
    OSError if it cannot tell (the state dir is not readable by this user, say); a lock file that
    does not exist is not held."""
    try:
        st = (state_dir / LOCK_FILE).lstat()
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    device = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    for line in locks.read_text().splitlines():
        fields = line.replace("->", "").split()
        if (
            len(fields) < 6
            or fields[1] != "FLOCK"
            or line.split(":", 1)[1].lstrip().startswith("->")
        ):
            continue
        try:
            major, minor, inode = fields[5].split(":")
            if (int(major, 16), int(minor, 16), int(inode)) == device:
                return fields[4]
        except ValueError:
            continue
    return None
