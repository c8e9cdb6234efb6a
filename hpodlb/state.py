"""The state file: what earlier passes learned, kept so later passes can be cautious and `status` fast.

It is a cache, never the source of truth: AWS and the nodes are. Losing it makes hpodlb more careful
about targets (absence counters restart, so nothing is deregistered early) but forgets which
instances were verified: every node is then met as a new instance again and trusted on first use
(pinned to what its probe shows; each one logged as `ssh_trust_on_first_use`).
Times that decide anything are monotonic seconds, valid only within the boot recorded beside them
(`boot_id`); wall-clock times are kept for people only.

It is written atomically (temp file, fsync, rename, fsync of the dir), so a SIGKILL or a
power cut leaves either the old file or the new one, never half of one. Its dir must be trusted
like the config (it decides whom hpodlb trusts on first use), and the file is never read through a
symlink, from a FIFO or past a size bound.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ValidationError

from hpodlb.files import (
    UntrustedPathError,
    UnusableFileError,
    make_trusted_dir,
    read_regular_file,
    require_trusted_dir,
    write_atomically,
)
from hpodlb.intentmodel import DrainRequest

STATE_FILE = "state.json"
STATE_MAX_BYTES = 64 << 20  # about 400 bytes a node: far beyond any cluster


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
    platform_status: str = ""  # HyperPod's InstanceStatus when last asked (to explain, not decide)
    drained: str = ""  # the admin's reason while it is drained; empty: not drained
    sessions: int | None = None  # drained: SSH connections still open on it (None: not counted)
    sessions_at: float | None = None  # wall clock of that count
    sessions_error: str = ""  # why it could not be counted


class AbsenceRecord(BaseModel):
    passes: int
    since: float  # monotonic, when it was first seen absent
    instance_id: str = ""


class TargetRecord(BaseModel):
    ip: str
    port: int
    state: str  # the NLB's TargetHealth.State
    reason: str = ""  # TargetHealth.Reason (Target.FailedHealthChecks, ...)
    description: str = ""
    since: float = 0  # wall clock, for people: when it entered this state (as first seen)
    since_mono: float | None = None  # monotonic, for deciding: how long it has been so
    warned: bool = False  # its "unhealthy for too long" warning was logged


class PassRecord(BaseModel):
    started_at: float = 0
    finished_at: float = 0
    ok: bool = False
    summary: str = ""
    standby: str = ""  # `standby (controller: NAME)`: another head acted; this one observed
    login_groups: str = ""  # `login-a (from ...)`: which groups, and who said so
    errors: list[str] = []
    held: list[str] = []
    waiting: list[str] = []
    unhealthy: list[str] = []


class State(BaseModel):
    version: int = 2
    boot_id: str = ""  # the boot the monotonic times belong to
    absent: dict[str, dict[str, AbsenceRecord]] = {}
    registered_by_us: dict[str, list[str]] = {}
    # Monotonic times (each pass's start) of the deregistrations still inside
    # max_deregister_fraction's window, by target group ARN: kept here so that the window
    # outlives the pass, and a restart (`guards.py`).
    departures: dict[str, list[float]] = {}
    nodes: dict[str, NodeRecord] = {}
    targets: dict[str, list[TargetRecord]] = {}
    target_errors: dict[str, str] = {}
    # DescribeCluster's last answer, by cluster ARN: used while it cannot be asked, so that a
    # denied or unreachable API never shrinks the login groups to a guess.
    cluster_login_groups: dict[str, list[str]] = {}
    # The drains in force at the last pass, copied from intents.json: if that file is lost, these
    # keep the nodes out (and the pass says so) instead of putting them back by accident.
    drains: dict[str, DrainRequest] = {}
    last_pass: PassRecord | None = None
    # Wall clock of the last pass that converged (or stood by soundly), kept apart from last_pass
    # so that "not converged for 10 minutes" survives restarts and passes that did not converge.
    last_converged_at: float | None = None
    first_pass_at: float | None = None  # wall clock: "not converged since" when none ever did


def state_path(state_dir: Path) -> Path:
    return state_dir / STATE_FILE


def load_state(state_dir: Path) -> tuple[State, str | None]:
    """The saved state, or a fresh one and a warning saying why the saved one was not usable."""
    path = state_path(state_dir)
    try:
        require_trusted_dir(state_dir)
        raw = read_regular_file(path, STATE_MAX_BYTES, follow_symlinks=False)
    except FileNotFoundError:
        return State(), None
    except (UntrustedPathError, UnusableFileError) as exc:
        return State(), f"{exc}; starting from an empty state"
    except OSError as exc:
        return State(), f"{path}: cannot read ({exc.strerror}); starting from an empty state"
    try:
        return State.model_validate(json.loads(raw)), None
    except (ValueError, ValidationError, RecursionError) as exc:
        first = str(exc).splitlines()[0]
        return State(), f"{path}: unusable ({first}); starting from an empty state"


def save_state(state_dir: Path, state: State) -> None:
    """Raises UntrustedPathError for a state dir others could change, OSError if it cannot write."""
    make_trusted_dir(state_dir)
    write_atomically(state_path(state_dir), state.model_dump_json(indent=1).encode(), mode=0o644)
