"""Whether a file hpodlb acts on could have been written by someone other than root.

hpodlb runs as root and does root things with what these files say (registers IPs, pushes keys,
runs the reload command on every login node), so the config file, the resource config and the key
store must be changeable only by root. A path is trusted when its final target (symlinks are followed
and the target is judged) and every directory above it are owned by root (or by us, in tests run as
another user) and not writable by group or others, except directories with the sticky bit (/tmp),
where others can add files but not replace ours.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class UntrustedPathError(Exception):
    """The message names the path (or the directory above it) and what is wrong with it."""


def require_trusted(path: Path) -> None:
    """Raise UntrustedPathError unless only root (or we) could have changed `path`."""
    real = Path(os.path.realpath(path))
    owners = {0, os.geteuid()}
    try:
        st = real.stat()
    except OSError:
        return  # missing or unreadable: the caller's own read reports that more precisely
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
