"""What a plan is made of, and the data the planner decides from: plain, frozen values.

No logic beyond what a value says of itself (a target is registered, a plan is settled). The
planner (`planner.py`, `keyplan.py`) builds them; the pass, `plan`, `status` and the metrics read
them.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from hpodlb.guards import Guard
from hpodlb.identity import Judgement
from hpodlb.inventory import LoginNode
from hpodlb.targetstate import is_registered

SHUTTING_DOWN = "ShuttingDown"  # HyperPod's InstanceStatus of an instance on its way out


class Kind(str, enum.Enum):
    ADOPT = "adopt-keys"
    PUSH_KEYS = "push-keys"
    REGISTER = "register"
    DEREGISTER = "deregister"
    RETIRE_PREVIOUS = "retire-previous-keys"


@dataclass(frozen=True)
class Target:
    ip: str  # the target's Id: an IP address for the groups hpodlb manages
    port: int
    state: str
    reason: str = ""  # AWS's TargetHealth.Reason, for people: decisions use `state` only
    description: str = ""

    @property
    def registered(self) -> bool:
        return is_registered(self.state)


@dataclass(frozen=True)
class GroupView:
    """One target group as observed this pass; `problem` set: it failed its check, hands off."""

    arn: str
    port: int
    targets: tuple[Target, ...]
    problem: str = ""
    # Targets AWS reported leaving *and* failing their health checks (`unhealthy.draining`) when
    # the pass read the group, ip -> state: registering them again cannot make them pass the
    # checks, so the pass waits on them (not converged) even after it has.
    failing: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Drain:
    """An admin's `hpodlb drain`: keep the node out of rotation; `force`: past min_in_service
    and max_deregister_fraction (the admin took that on with --force)."""

    reason: str
    force: bool = False


@dataclass(frozen=True)
class Absence:
    """A target no login node accounts for: since when (monotonic seconds) and for how many passes."""

    passes: int
    since: float
    instance_id: str = ""  # the instance last seen at that IP, if known


@dataclass(frozen=True)
class Probe:
    """What this pass saw of one node's host keys."""

    offered: Mapping[str, str] | None = None  # type -> `algo base64`; None: no answer (yet)
    error: str = ""  # `step: reason` when the probe failed
    skipped: bool = False  # verified recently (probe_interval_seconds): not probed


@dataclass(frozen=True)
class KeyFacts:
    """Everything about host keys the planner needs; `enabled=False` gates nothing."""

    enabled: bool = False
    current: Mapping[str, str] = field(default_factory=dict)  # canonical, type -> `algo base64`
    previous: Mapping[str, str] = field(default_factory=dict)  # during a rotation
    unavailable: str = ""  # why no canonical keys can be used this pass (store refused, ...)
    adopt: bool = True  # an empty store adopts the first login node's keys
    probes: Mapping[str, Probe] = field(default_factory=dict)  # by IP
    verified: Mapping[str, str] = field(default_factory=dict)  # IP -> instance verified canonical
    trusted: Mapping[str, tuple[str, frozenset[str]]] = field(default_factory=dict)  # admin
    backing_off: Mapping[str, str] = field(default_factory=dict)  # IP -> why pushes wait
    platform: Mapping[str, str] = field(default_factory=dict)  # IP -> HyperPod's InstanceStatus


@dataclass(frozen=True)
class Memory:
    """What earlier passes, and the earlier steps of this pass, leave for the planner."""

    absent: Mapping[str, Mapping[str, Absence]] = field(default_factory=dict)  # arn -> ip ->
    registered_by_us: Mapping[str, Iterable[str]] = field(default_factory=dict)
    last_instance: Mapping[str, str] = field(default_factory=dict)  # ip -> instance last seen
    # max_deregister_fraction's window, by arn: the targets registered as it began, and the
    # deregistrations applied within it (earlier passes' and this one's).
    start_registered: Mapping[str, int] = field(default_factory=dict)
    spent: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Action:
    kind: Kind
    ip: str
    reason: str
    target_group: str = ""
    port: int = 0
    instance_id: str = ""
    held_by: Guard | None = None
    after_push: bool = False  # a register that happens only if this pass's key push verifies
    pin: frozenset[str] = frozenset()  # push/adopt: the keys the node's session must present

    @property
    def held(self) -> bool:
        return self.held_by is not None


@dataclass(frozen=True)
class Waiting:
    """A desired node that cannot be put (or kept) in service as it should, and why."""

    node: LoginNode
    reason: str


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...] = ()
    waiting: tuple[Waiting, ...] = ()
    unmanaged: tuple[tuple[str, Target], ...] = ()  # (target group, target) left alone: prune=off
    absent: Mapping[str, Mapping[str, Absence]] = field(default_factory=dict)
    judgements: Mapping[str, Judgement] = field(default_factory=dict)  # by IP
    problems: tuple[str, ...] = ()  # target groups that get no action, and why
    drained: Mapping[str, Drain] = field(default_factory=dict)  # desired nodes kept out, by IP

    def runnable(self, kind: Kind | None = None) -> tuple[Action, ...]:
        return tuple(a for a in self.actions if not a.held and kind in (None, a.kind))

    def held(self) -> tuple[Action, ...]:
        return tuple(a for a in self.actions if a.held)

    @property
    def settled(self) -> bool:
        """Nothing to do, nothing held back, nobody waiting, no group refused: `plan` exits 0."""
        return not self.actions and not self.waiting and not self.problems


class Role(enum.Enum):
    """What a node's key judgement means for its targets."""

    SERVE = "serve"  # verified: register it
    IN_PLACE = "in-place"  # previous canonical keys: keep it in, push, register after the push
    REPAIR = "repair"  # other keys, trusted for a push: out, push, back in after it verifies
    HOLD = "hold"  # not trusted: out, nothing pushed
    KEEP = "keep"  # unknown this pass: keep a registration, register nothing
    LEAVE = "leave"  # unknown, and its instance changed since it was verified: out
