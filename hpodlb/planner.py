"""The pure core: (desired nodes, observed targets, key verdicts, memory, guards) -> a plan.

No I/O, no clock, no boto3, no paramiko: every decision hpodlb makes about a target group is taken
here, with its reason, so that it can be printed by `plan`, applied by `once` and tested with plain
data. Guards never drop an action silently: a held-back action stays in the plan with the guard that
held it, and `status` shows it.

Rules, in the order an admin asks about them:
- register eagerly: a desired node whose host keys are verified is registered the pass it appears;
- host-key gate: a node that presents other keys is pushed the canonical ones and registered only
  after they verify; a registered node found with other keys leaves at once (not held by absence);
- deregister cautiously: a target no node accounts for goes only after it was absent for
  `absent_passes_before_deregister` consecutive passes, never more than `max_deregister_fraction` of
  a group in one pass, and never below `min_in_service` registered targets;
- with `prune = false`, only targets hpodlb itself registered are ever removed;
- targets at another port than the configured one are never touched.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from hpodlb.inventory import LoginNode

# NLB states in which a target is on its way out or gone: it does not count as registered.
NOT_REGISTERED_STATES = frozenset({"draining"})


class KeyVerdict(enum.Enum):
    """What we know about the host keys a node presents, from this pass's probe."""

    IN_SYNC = "in-sync"
    NEEDS_KEYS = "needs-keys"  # reachable, presents other keys: push, verify, then register
    UNREACHABLE = "unreachable"  # cannot tell: register nothing, leave registrations alone
    REPLACED_UNREACHABLE = "replaced-unreachable"  # new instance, keys unknown: out of rotation


class Kind(str, enum.Enum):
    PUSH_KEYS = "push-keys"
    REGISTER = "register"
    DEREGISTER = "deregister"


class Guard(str, enum.Enum):
    ABSENCE = "absent_passes_before_deregister"
    FRACTION = "max_deregister_fraction"
    MIN_IN_SERVICE = "min_in_service"
    BACKOFF = "backoff"


@dataclass(frozen=True)
class Target:
    ip: str
    port: int
    state: str

    @property
    def registered(self) -> bool:
        return self.state not in NOT_REGISTERED_STATES


@dataclass(frozen=True)
class GroupView:
    """One target group as observed this pass."""

    arn: str
    port: int
    targets: tuple[Target, ...]


@dataclass(frozen=True)
class Guards:
    prune: bool = True
    max_deregister_fraction: float = 0.5
    absent_passes_before_deregister: int = 2
    min_in_service: int = 1


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

    @property
    def held(self) -> bool:
        return self.held_by is not None


@dataclass(frozen=True)
class Waiting:
    """A desired node that cannot be put in service this pass, and why."""

    node: LoginNode
    reason: str


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...] = ()
    waiting: tuple[Waiting, ...] = ()
    unmanaged: tuple[tuple[str, Target], ...] = ()  # (target group, target) left alone: prune=off
    absent_passes: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    def runnable(self, kind: Kind | None = None) -> tuple[Action, ...]:
        return tuple(a for a in self.actions if not a.held and kind in (None, a.kind))

    def held(self) -> tuple[Action, ...]:
        return tuple(a for a in self.actions if a.held)

    @property
    def converged(self) -> bool:
        """Nothing to do, nothing held back, nobody waiting: `plan` exits 0, `once` exits 0."""
        return not self.actions and not self.waiting


_NOT_IN_SYNC = {
    KeyVerdict.NEEDS_KEYS: "presents host keys other than the canonical ones",
    KeyVerdict.REPLACED_UNREACHABLE: "was replaced (new instance) and its host keys are unverified",
}


def plan_pass(
    nodes: Sequence[LoginNode],
    groups: Sequence[GroupView],
    verdicts: Mapping[str, KeyVerdict],
    guards: Guards,
    absent_passes: Mapping[str, Mapping[str, int]] | None = None,
    registered_by_us: Mapping[str, Iterable[str]] | None = None,
    backing_off: Mapping[str, str] | None = None,
) -> Plan:
    """Decide one pass. `verdicts` must name every node; a missing one counts as unreachable.

    `backing_off` maps a node IP to a reason: such a node gets no key push this pass (its retry
    timer has not run out), but the rest of its plan stands.
    """
    absent_passes = absent_passes or {}
    registered_by_us = registered_by_us or {}
    backing_off = backing_off or {}
    by_ip = {n.ip: n for n in nodes}
    verdict = {n.ip: verdicts.get(n.ip, KeyVerdict.UNREACHABLE) for n in nodes}

    actions: list[Action] = []
    waiting: list[Waiting] = []
    unmanaged: list[tuple[str, Target]] = []
    next_absent: dict[str, dict[str, int]] = {}

    push_ips = [ip for ip in by_ip if verdict[ip] is KeyVerdict.NEEDS_KEYS]
    for ip in push_ips:
        node = by_ip[ip]
        held = Guard.BACKOFF if ip in backing_off else None
        reason = _NOT_IN_SYNC[KeyVerdict.NEEDS_KEYS]
        if held:
            reason = f"{reason}; retry held back: {backing_off[ip]}"
        actions.append(
            Action(Kind.PUSH_KEYS, ip, reason, instance_id=node.instance_id, held_by=held)
        )

    for group in groups:
        group_actions, group_absent, group_unmanaged = _plan_group(
            group,
            by_ip,
            verdict,
            guards,
            absent_passes.get(group.arn, {}),
            frozenset(registered_by_us.get(group.arn, ())),
            frozenset(backing_off),
        )
        actions.extend(group_actions)
        unmanaged.extend((group.arn, t) for t in group_unmanaged)
        next_absent[group.arn] = group_absent

    for ip, node in by_ip.items():
        v = verdict[ip]
        if v is KeyVerdict.UNREACHABLE:
            waiting.append(Waiting(node, "host keys unverified: node unreachable"))
        elif v is KeyVerdict.REPLACED_UNREACHABLE:
            waiting.append(Waiting(node, _NOT_IN_SYNC[v]))
        elif v is KeyVerdict.NEEDS_KEYS and ip in backing_off:
            waiting.append(Waiting(node, f"key push backing off: {backing_off[ip]}"))
    # Unreachable nodes that are registered everywhere already are not waiting for anything.
    registered_somewhere = {
        (g.arn, t.ip) for g in groups for t in g.targets if t.port == g.port and t.registered
    }
    waiting = [
        w
        for w in waiting
        if not (
            verdict[w.node.ip] is KeyVerdict.UNREACHABLE
            and all((g.arn, w.node.ip) in registered_somewhere for g in groups)
        )
    ]
    return Plan(
        actions=tuple(actions),
        waiting=tuple(waiting),
        unmanaged=tuple(unmanaged),
        absent_passes=next_absent,
    )


def _plan_group(
    group: GroupView,
    by_ip: Mapping[str, LoginNode],
    verdict: Mapping[str, KeyVerdict],
    guards: Guards,
    absent: Mapping[str, int],
    ours: frozenset[str],
    backing_off: frozenset[str],
) -> tuple[list[Action], dict[str, int], list[Target]]:
    at_port = {t.ip: t for t in group.targets if t.port == group.port}
    registered = {ip for ip, t in at_port.items() if t.registered}

    def act(kind: Kind, ip: str, reason: str, held_by: Guard | None = None) -> Action:
        node = by_ip.get(ip)
        return Action(
            kind,
            ip,
            reason,
            target_group=group.arn,
            port=group.port,
            instance_id=node.instance_id if node else "",
            held_by=held_by,
            after_push=kind is Kind.REGISTER and verdict.get(ip) is KeyVerdict.NEEDS_KEYS,
        )

    # Register eagerly, but only what is (or is about to be) verified.
    actions: list[Action] = []
    for ip in sorted(set(by_ip) - registered):
        why = "draining target re-registered" if ip in at_port else "login node not registered"
        if verdict[ip] is KeyVerdict.IN_SYNC:
            actions.append(act(Kind.REGISTER, ip, why))
        elif verdict[ip] is KeyVerdict.NEEDS_KEYS and ip not in backing_off:
            actions.append(act(Kind.REGISTER, ip, f"{why}; after its pushed host keys verify"))

    # Candidates to leave. Wrong identity first: it is serving users the wrong host key right now.
    identity = [ip for ip in sorted(registered & set(by_ip)) if verdict[ip] in _NOT_IN_SYNC]
    strays = sorted(registered - set(by_ip))
    unmanaged = [at_port[ip] for ip in strays if not guards.prune and ip not in ours]
    next_absent = {ip: absent.get(ip, 0) + 1 for ip in strays if guards.prune or ip in ours}

    budget = math.floor(guards.max_deregister_fraction * len(registered))
    remaining = len(registered)
    leaving = 0
    for ip in identity:
        reason = f"{by_ip[ip].label()} {_NOT_IN_SYNC[verdict[ip]]}"
        if remaining - 1 < guards.min_in_service:
            actions.append(act(Kind.DEREGISTER, ip, reason, Guard.MIN_IN_SERVICE))
            continue
        actions.append(act(Kind.DEREGISTER, ip, reason))
        if verdict[ip] is KeyVerdict.NEEDS_KEYS and ip not in backing_off:
            actions.append(act(Kind.REGISTER, ip, "back in after its pushed host keys verify"))
        remaining -= 1
        leaving += 1
    need = guards.absent_passes_before_deregister
    for ip, passes in next_absent.items():
        held = _absence_guard(passes, need, leaving < budget, remaining > guards.min_in_service)
        reason = f"not in the resource config for {passes}/{need} passes"
        actions.append(act(Kind.DEREGISTER, ip, reason, held))
        if held is None:
            remaining -= 1
            leaving += 1
    return actions, next_absent, unmanaged


def _absence_guard(passes: int, need: int, within_budget: bool, above_floor: bool) -> Guard | None:
    """The first guard that holds back an absent node's deregistration, or None to let it go."""
    if passes < need:
        return Guard.ABSENCE
    if not within_budget:
        return Guard.FRACTION
    if not above_floor:
        return Guard.MIN_IN_SERVICE
    return None
