"""The pure core: (desired nodes, observed targets, host-key facts, memory, guards) -> a plan.

No I/O, no clock, no boto3, no paramiko: every decision hpodlb makes is taken here, with its
reason, so that it can be printed by `plan`, applied by `once` and tested with plain data. The
executor (`reconcile.py`) calls it again whenever a node's probe or push comes back, with what it
has applied so far, and applies what became runnable: the plan is always f(the world as now known).
Guards never drop an action silently: a held-back action stays in the plan with the guard that
held it, and `status` shows it.

Rules, in the order an admin asks about them:
- register eagerly: a desired node whose host keys are verified is registered the pass it appears;
- host keys (`identity.py` judges, `keyplan.py` plans): a node presenting other keys is pushed the canonical ones (pinned to
  keys we can vouch for) and registered only after they verify; a known instance presenting
  unknown keys is held for an admin; an empty store adopts the first login node's keys;
- every deregistration, whatever its reason, counts against `max_deregister_fraction` of the
  group's registered targets (as its window began: `memory` carries what left within it) and
  never leaves fewer than `min_in_service` login nodes in service (`guards.in_service`, the one
  definition); wrong identities go first, then drains, then instances in service at a new IP,
  then absent targets;
- an instance listed at a new IP frees its old one without the absence wait only once it is in
  service at the new one: one odd read of the resource config moves no target;
- a desired node whose target is leaving (`draining`, `unhealthy.draining`) is registered again;
  one that was failing its checks too keeps the plan waiting;
- an absent target goes only after `absent_passes_before_deregister` consecutive passes, the first
  and the last at least (that - 1) x `interval_seconds` apart, as that many scheduled passes are
  (a burst of file-triggered passes does not shorten it);
- a node an admin drained is deregistered (against the same guards, unless the drain was forced
  past them) and never registered while drained; its keys are still judged and repaired, and it
  is not waited for: being out of rotation is what was asked;
- with `prune = false`, only targets hpodlb itself registered are ever removed;
- only targets whose Id is an IP address at the configured port are ever touched;
- a target group that failed its check (type, protocol, port) gets no action at all.

What a plan is made of (and the data it is made from) is `plantypes.py`'s; this module re-exports
it, so that a caller asks the planner for its plan and its words alike.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from hpodlb.config import target_group_name
from hpodlb.guards import Guard, Guards, Ledger, in_service
from hpodlb.identity import Judgement, KeyState
from hpodlb.inventory import LoginNode
from hpodlb.keyplan import (
    is_replacement,
    leave_reason,
    plan_keys,
    role_of,
    standing,
    unverified_waiting,
)
from hpodlb.plantypes import (
    SHUTTING_DOWN,
    Absence,
    Action,
    Drain,
    GroupView,
    KeyFacts,
    Kind,
    Memory,
    Plan,
    Probe,
    Role,
    Target,
    Waiting,
)

__all__ = [
    "SHUTTING_DOWN",
    "Absence",
    "Action",
    "Drain",
    "GroupView",
    "Guard",
    "Guards",
    "KeyFacts",
    "Kind",
    "Memory",
    "Plan",
    "Probe",
    "Role",
    "Target",
    "Waiting",
    "plan_pass",
]


def plan_pass(
    nodes: Sequence[LoginNode],
    groups: Sequence[GroupView],
    keys: KeyFacts,
    guards: Guards,
    memory: Memory | None = None,
    now: float = 0.0,
    drained: Mapping[str, Drain] | None = None,
) -> Plan:
    """Decide one pass. `nodes` in resource-config order (the first one is the adoption source);
    `now` is monotonic seconds, compared only with `memory.absent` times; `drained`: the admin's
    drains by IP."""
    memory = memory or Memory()
    drains = {n.ip: drained[n.ip] for n in nodes if drained and n.ip in drained}
    judgements, key_actions, key_waiting = plan_keys(nodes, keys)
    by_ip = {n.ip: n for n in nodes}
    roles = {n.ip: role_of(judgements[n.ip], is_replacement(n, keys)) for n in nodes}
    vouching = {n.ip: standing(n, judgements[n.ip], keys) for n in nodes}
    pushing = {a.ip for a in key_actions if a.kind is Kind.PUSH_KEYS and not a.held}

    actions = list(key_actions)
    unmanaged: list[tuple[str, Target]] = []
    absent: dict[str, dict[str, Absence]] = {}
    problems: list[str] = []
    for group in groups:
        if group.problem:
            problems.append(group.problem)
            continue
        planned = _plan_group(
            group, by_ip, roles, judgements, vouching, pushing, drains, guards, memory, now
        )
        actions.extend(planned.actions)
        unmanaged.extend((group.arn, t) for t in planned.unmanaged)
        absent[group.arn] = planned.absent

    live = [g for g in groups if not g.problem]
    waiting = [
        w
        for w in (
            *key_waiting,
            *unverified_waiting(nodes, roles, judgements, live),
            *_failing(nodes, live),
        )
        if w.node.ip not in drains  # out of rotation on purpose: nothing to wait for
    ]
    return Plan(
        actions=tuple(actions),
        waiting=tuple(waiting),
        unmanaged=tuple(unmanaged),
        absent=absent,
        judgements=judgements,
        problems=tuple(problems),
        drained=drains,
    )


# -- target groups -----------------------------------------------------------------------------


@dataclass
class _GroupPlan:
    actions: list[Action]
    absent: dict[str, Absence]
    unmanaged: list[Target]


def _plan_group(
    group: GroupView,
    by_ip: Mapping[str, LoginNode],
    roles: Mapping[str, Role],
    judgements: Mapping[str, Judgement],
    vouching: Mapping[str, str],
    pushing: set[str],
    drains: Mapping[str, Drain],
    guards: Guards,
    memory: Memory,
    now: float,
) -> _GroupPlan:
    live = {t.ip: t for t in group.targets if t.port == group.port and _is_ip(t.ip)}
    registered = {ip for ip, t in live.items() if t.registered}
    serving = in_service(vouching, live.values(), group.port)

    def act(kind: Kind, ip: str, reason: str, held_by: Guard | None = None) -> Action:
        node = by_ip.get(ip)
        return Action(
            kind,
            ip,
            reason,
            target_group=group.arn,
            port=group.port,
            instance_id=node.instance_id if node else memory.last_instance.get(ip, ""),
            held_by=held_by,
            after_push=kind is Kind.REGISTER and roles.get(ip) in (Role.IN_PLACE, Role.REPAIR),
        )

    actions: list[Action] = []
    # Register eagerly, but only what is (or is about to be) verified.
    for ip in sorted(set(by_ip) - registered - set(drains)):
        why = (
            f"{live[ip].state} target re-registered" if ip in live else "login node not registered"
        )
        if roles[ip] is Role.SERVE:
            actions.append(act(Kind.REGISTER, ip, why))
        elif roles[ip] in (Role.IN_PLACE, Role.REPAIR) and ip in pushing:
            actions.append(act(Kind.REGISTER, ip, f"{why}; after its pushed host keys verify"))

    ledger = Ledger(
        guards,
        serving=len(serving),
        base=memory.start_registered.get(group.arn, len(registered)),
        spent=memory.spent.get(group.arn, 0),
    )

    def take(ip: str, *, forced: bool = False) -> Guard | None:
        return ledger.take(in_service=ip in serving, forced=forced)

    # Wrong identity first: it is serving users a host key they were not told about, right now.
    for ip in sorted(registered & set(by_ip)):
        if roles[ip] not in (Role.REPAIR, Role.HOLD, Role.LEAVE):
            continue
        held = take(ip, forced=ip in drains and drains[ip].force)
        node = by_ip[ip]
        reason = f"{node.label()}: {leave_reason(judgements[ip], roles[ip])}"
        actions.append(act(Kind.DEREGISTER, ip, reason, held))
        if held is None and ip in pushing and ip not in drains:
            actions.append(act(Kind.REGISTER, ip, "back in after its pushed host keys verify"))
    # Then the admin's drains: out of rotation for maintenance, within the guards unless forced.
    for ip in sorted(registered & set(drains)):
        if roles[ip] in (Role.REPAIR, Role.HOLD, Role.LEAVE):
            continue  # already leaving above, for its identity
        if vouching[ip] == KeyState.PENDING.value:
            continue  # whether it is in service is known once its probe is back: the guards wait
        drain = drains[ip]
        reason = f"{by_ip[ip].label()}: drained by an admin: {drain.reason}"
        actions.append(act(Kind.DEREGISTER, ip, reason, take(ip, forced=drain.force)))

    ours = frozenset(memory.registered_by_us.get(group.arn, ()))
    strays = sorted(registered - set(by_ip))
    unmanaged = [live[ip] for ip in strays if not guards.prune and ip not in ours]
    managed = [ip for ip in strays if guards.prune or ip in ours]
    absent = _absences(managed, memory.absent.get(group.arn, {}), memory.last_instance, now)
    listed_at = {n.instance_id: n.ip for n in by_ip.values()}
    actions += _plan_absent(absent, listed_at, serving, guards, now, act, take)
    return _GroupPlan(actions, absent, unmanaged)


def _plan_absent(
    absent: Mapping[str, Absence],
    listed_at: Mapping[str, str],
    serving: set[str],
    guards: Guards,
    now: float,
    act: Callable[[Kind, str, str, Guard | None], Action],
    take: Callable[[str], Guard | None],
) -> list[Action]:
    """The targets no login node accounts for: each goes once its absence has lasted (passes and
    time), or at once if its instance is in service at a new IP."""
    actions: list[Action] = []
    moved_to = {ip: listed_at.get(a.instance_id, ip) for ip, a in absent.items()}
    # An instance in service at a new IP: its old IP is stale for certain, no need to wait. One
    # not in service there (a bad read, a new IP that does not verify) waits like any absence.
    moved = {ip for ip, new in moved_to.items() if new != ip and new in serving}
    for ip in sorted(moved):
        reason = f"instance {absent[ip].instance_id} moved to {moved_to[ip]}, in service there"
        actions.append(act(Kind.DEREGISTER, ip, reason, take(ip)))
    need = guards.absent_passes_before_deregister
    for ip, record in absent.items():
        if ip in moved:
            continue
        waited = now - record.since
        reason = f"not in the resource config for {record.passes}/{need} passes"
        if guards.min_absent_seconds:
            reason += f" and {waited:.0f}/{guards.min_absent_seconds:.0f} s"
        if moved_to[ip] != ip:
            reason += f" (instance {record.instance_id} listed at {moved_to[ip]}, not in service)"
        early = record.passes < need or waited < guards.min_absent_seconds
        actions.append(act(Kind.DEREGISTER, ip, reason, Guard.ABSENCE if early else take(ip)))
    return actions


def _failing(nodes: Sequence[LoginNode], groups: Sequence[GroupView]) -> list[Waiting]:
    """Login nodes whose target was leaving and failing its health checks as the pass read the
    group: registered again, but not in service until the NLB says they pass."""
    return [
        Waiting(
            node,
            f"its target in {target_group_name(g.arn)} was {g.failing[node.ip]} as the pass read "
            "it: registered again; in service once the NLB's health checks pass",
        )
        for g in groups
        for node in nodes
        if node.ip in g.failing
    ]


def _absences(
    strays: Sequence[str],
    before: Mapping[str, Absence],
    last_instance: Mapping[str, str],
    now: float,
) -> dict[str, Absence]:
    """Each stray's absence, one pass longer; a new one starts now."""
    out: dict[str, Absence] = {}
    for ip in strays:
        old = before.get(ip)
        out[ip] = Absence(
            passes=(old.passes if old else 0) + 1,
            since=old.since if old else now,
            instance_id=(old.instance_id if old else "") or last_instance.get(ip, ""),
        )
    return out


@functools.lru_cache(maxsize=8192)
def _is_ip(target_id: str) -> bool:
    """Instance ids, Lambda and ALB ARNs are other services' targets: never ours to touch.
    (Cached: a pass asks for every target of every group on each of its plans.)"""
    try:
        ipaddress.ip_address(target_id)
    except ValueError:
        return False
    return True
