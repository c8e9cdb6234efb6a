"""The state file: what earlier passes learned, kept so later passes can be cautious and `status` fast.

It is a cache, never the source of truth: AWS and the nodes are. Losing it makes hpodlb more careful
about targets (absence counters restart, so nothing is deregistered early) but forgets which
instances were verified: every node is then met as a new instance again, trusted on first use
(pinned to what its probe shows, and logged), which is why `status` says where the state came from.
Times that decide anything are monotonic seconds, valid only within the boot recorded beside them
(`boot_id`); wall-clock times are kept for people only.

It is written atomically (temp file, fsync, rename, fsync of the dir), so a SIGKILL or a
power cut leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from pydantic import BaseModel, ValidationError

STATE_FILE = "state.json"


class NodeRecord(BaseModel):
    instance_id: str = ""
    name: str = ""
    group: str = ""
    key_state: str = "unknown"  # an identity.KeyState value, or "unknown" before the first probe
    key_detail: str = ""
    verified_instance_id: str = ""  # the instance whose keys were last verified canonical
    verified_keys: str = ""  # fingerprints of the canonical set it was verified against
    verified_at: float | None = None  # wall clock, for people
    verified_mono: float | None = None  # monotonic: the probe interval counts from here
    last_error: str = ""
    last_error_at: float | None = None  # wall clock, for people
    failures: int = 0  # consecutive failed key pushes
    retry_mono: float | None = None  # monotonic: no key push before this
    retry_at: float | None = None  # wall clock of the same, for people
    unreachable: bool = False  # the last probe failed: a node that answers again is retried now


class AbsenceRecord(BaseModel):
    passes: int
    since: float  # monotonic, when it was first seen absent
    instance_id: str = ""


class TargetRecord(BaseModel):
    ip: str
    port: int
    state: str


class PassRecord(BaseModel):
    started_at: float = 0
    finished_at: float = 0
    ok: bool = False
    summary: str = ""
    errors: list[str] = []
    held: list[str] = []
    waiting: list[str] = []


class State(BaseModel):
    version: int = 2
    boot_id: str = ""  # the boot the monotonic times belong to
    absent: dict[str, dict[str, AbsenceRecord]] = {}
    registered_by_us: dict[str, list[str]] = {}
    nodes: dict[str, NodeRecord] = {}
    targets: dict[str, list[TargetRecord]] = {}
    target_errors: dict[str, str] = {}
    last_pass: PassRecord | None = None


def state_path(state_dir: Path) -> Path:
    return state_dir / STATE_FILE


def load_state(state_dir: Path) -> tuple[State, str | None]:
    """The saved state, or a fresh one and a warning saying why the saved one was not usable."""
    path = state_path(state_dir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return State(), None
    except OSError as exc:
        return State(), f"{path}: cannot read ({exc.strerror}); starting from an empty state"
    try:
        return State.model_validate(json.loads(raw)), None
    except (ValueError, ValidationError, RecursionError) as exc:
        first = str(exc).splitlines()[0]
        return State(), f"{path}: unusable ({first}); starting from an empty state"


def save_state(state_dir: Path, state: State) -> None:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    write_atomically(state_path(state_dir), state.model_dump_json(indent=1).encode(), mode=0o644)


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
