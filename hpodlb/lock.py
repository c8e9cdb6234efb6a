"""One hpodlb acting per head node: an flock in the state dir, held for the life of the process.

The kernel drops the lock when the process dies (even by SIGKILL), so a crash never leaves a stale
lock behind; the pid written inside is only there to name the holder in the refusal message.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = "hpodlb.lock"


class LockedError(Exception):
    """Another hpodlb process holds the lock; the message names its pid."""


class InstanceLock:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> InstanceLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
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
