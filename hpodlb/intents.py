"""What an admin asked for that must outlive any pass: kept apart from the state cache.

Two kinds: `hpodlb keys trust IP` requests (accept, once, the keys a re-imaged instance presents
now) and `hpodlb drain IP` (keep a login node out of rotation until `hpodlb undrain IP`).
The state file is a cache that may be deleted at will; an admin's decision is not, so it lives in
its own small file, changed only under its own lock (the daemon and the commands may all touch it).
A trust request is bound to the instance and the exact keys it was made for: it can never approve
anything else, and it is removed once that node verified with the canonical keys. A drain is bound
to the IP (a HyperPod replacement at that IP stays drained: the admin's word outlives instances)
and is removed only by `undrain`. The daemon keeps a copy of the drains in its state, so that a
lost intents file is noticed, said loudly, and never puts a drained node back by itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from pydantic import ValidationError

from hpodlb.files import (
    UnusableFileError,
    read_regular_file,
    write_atomically,
)
from hpodlb.intentmodel import Intents
from hpodlb.logs import get_logger
from hpodlb.state import load_state

INTENTS_FILE = "intents.json"
LOCK_FILE = "intents.lock"
MAX_BYTES = 1024 * 1024


class IntentsError(Exception):
    """The intents file exists but cannot be used; the message names it."""


def intents_path(state_dir: Path) -> Path:
    return state_dir / INTENTS_FILE


def load_intents(state_dir: Path) -> Intents:
    """The admin's intents; an empty set when the file does not exist (see `intents_path`)."""
    path = intents_path(state_dir)
    try:
        raw = read_regular_file(path, MAX_BYTES, follow_symlinks=False)
    except FileNotFoundError:
        return Intents()
    except UnusableFileError as exc:
        raise IntentsError(str(exc)) from None
    except OSError as exc:
        raise IntentsError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return Intents.model_validate(json.loads(raw))
    except (ValueError, ValidationError, RecursionError) as exc:  # deep nesting: json recurses
        raise IntentsError(f"{path}: unusable ({str(exc).splitlines()[0]})") from None


def update_intents(state_dir: Path, change: Callable[[Intents], None]) -> Intents:
    """Read, change and write the intents under their lock; returns what was written. When the
    file is gone but the daemon's last pass had drains, they are put back first: whoever writes
    the file next (a drain, an undrain, a `keys trust`, the daemon) must not erase them."""
    with _locked(state_dir):
        intents = load_intents(state_dir)
        if not intents_path(state_dir).exists():
            _restore_drains(state_dir, intents)
        change(intents)
        write_atomically(
            intents_path(state_dir), intents.model_dump_json(indent=1).encode(), mode=0o600
        )
        return intents


def _restore_drains(state_dir: Path, intents: Intents) -> None:
    """The daemon's copy of the drains, kept in the state file, back into `intents`."""
    remembered = load_state(state_dir)[0].drains
    if remembered:
        intents.drain.update(remembered)
        get_logger("hpodlb.intents").warning(
            "drain_intents_restored",
            drained=sorted(remembered),
            source="the state file's copy (intents.json was gone)",
        )


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(
        state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
