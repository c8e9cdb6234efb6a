"""The pure core: (desired nodes, observed targets, host-key facts, memory, guards) -> a plan.

No I/O, no clock, no boto3, no paramiko: every decision hpodlb makes is taken here, with its
reason, so that it can be printed by `plan`, applied by `once` and tested with plain data. The
executor (`reconcile.py`) calls it again whenever a node's probe or push comes back, with what it
has applied so far, and applies what became runnable: the plan is always f(the world as now known).
Guards never drop an action silently: a held-back action stays in the plan with the guard that
held it, and `status` shows it.

Rules, in the order an admin asks about them:
- register eagerly: a desired node whose host keys are verified is registered the pass it appears;
- host keys (`identity.py`): a node presenting other keys is pushed the canonical ones (pinned to
  keys we can vouch for) and registered only after they verify; a known instance presenting
  unknown keys is held for an admin; an empty store adopts the first login node's keys;
- every deregistration, whatever its reason, counts against `max_deregister_fraction` of the
  group's registered targets (as the pass began) and never leaves fewer than `min_in_service`;
  wrong identities go first, then instances that moved to another IP, then absent targets;
- an absent target goes only after `absent_passes_before_deregister` consecutive passes, the first
  and the last at least (that - 1) x `interval_seconds` apart, as that many scheduled passes are
  (a burst of file-triggered passes does not shorten it);
- a node an admin drained is deregistered (against the same guards, unless the drain was forced
  past them) and never registered while drained; its keys are still judged and repaired, and it
  is not waited for: being out of rotation is what was asked;
- with `prune = false`, only targets hpodlb itself registered are ever removed;
- only targets whose Id is an IP address at the configured port are ever touched;
- a target group that failed its check (type, protocol, port) gets no action at all.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from hpodlb.guards import Guard, Guards, Ledger
from hpodlb.identity import Judgement, KeyState, judge
from hpodlb.inventory import LoginNode
from hpodlb.targetstate import is_registered, registered_ips

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
    start_registered: Mapping[str, int] = field(default_factory=dict)  # fraction base, by arn
    spent: Mapping[str, int] = field(default_factory=dict)  # deregistrations applied this pass


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
    judgements, key_actions, key_waiting = _plan_keys(nodes, keys)
    by_ip = {n.ip: n for n in nodes}
    roles = {n.ip: _role(judgements[n.ip], _replaced(n, keys)) for n in nodes}
    pushing = {a.ip for a in key_actions if a.kind is Kind.PUSH_KEYS and not a.held}

    actions = list(key_actions)
    unmanaged: list[tuple[str, Target]] = []
    absent: dict[str, dict[str, Absence]] = {}
    problems: list[str] = []
    for group in groups:
        if group.problem:
            problems.append(group.problem)
            continue
        planned = _plan_group(group, by_ip, roles, judgements, pushing, drains, guards, memory, now)
        actions.extend(planned.actions)
        unmanaged.extend((group.arn, t) for t in planned.unmanaged)
        absent[group.arn] = planned.absent

    live = [g for g in groups if not g.problem]
    waiting = [
        w
        for w in (*key_waiting, *_unverified_waiting(nodes, roles, judgements, live))
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


# -- host keys ----------------------------------------------------------------------------------


def _plan_keys(
    nodes: Sequence[LoginNode], keys: KeyFacts
) -> tuple[dict[str, Judgement], list[Action], list[Waiting]]:
    """Judgements per node, the key actions (adopt, push, retire) and who waits on keys, and why."""
    if not keys.enabled:
        return {n.ip: Judgement(KeyState.NOT_CHECKED) for n in nodes}, [], []
    actions: list[Action] = []
    current: Mapping[str, str] = keys.current
    blocked = ""
    if keys.unavailable:
        blocked = keys.unavailable
    elif not current and not nodes:
        pass
    elif not current and not keys.adopt:
        blocked = (
            "the key store is empty and adopt_from_first_node is off: run `hpodlb keys generate` "
            "or `hpodlb keys adopt --from IP`"
        )
    elif not current:
        source = nodes[0]
        probe = keys.probes.get(source.ip, Probe())
        if probe.offered:
            current = probe.offered  # what the store will hold once the adoption is done
            actions.append(
                Action(
                    Kind.ADOPT,
                    source.ip,
                    f"the key store is empty: adopt the keys of {source.label()} ({source.name}), "
                    "the first login node in the resource config",
                    instance_id=source.instance_id,
                    pin=frozenset(probe.offered.values()),
                )
            )
        else:
            why = probe.error or ("offers no configured key type" if probe.offered == {} else "")
            blocked = (
                f"the key store is empty; adopting the keys of {source.label()}, the first login "
                f"node in the resource config, waits for it{': ' + why if why else ''}"
            )
    if blocked:
        judged = {n.ip: Judgement(KeyState.NO_CANONICAL, detail=blocked) for n in nodes}
        return judged, [], []

    judgements = {n.ip: _judge_node(n, keys, current) for n in nodes}
    pushes, waiting = _pushes(nodes, judgements, keys)
    actions.extend(pushes)
    if keys.previous and nodes and all(j.state is KeyState.IN_SYNC for j in judgements.values()):
        actions.append(
            Action(
                Kind.RETIRE_PREVIOUS,
                "",
                "every login node presents the current canonical keys: the rotation is done",
            )
        )
    return judgements, actions, waiting


def _pushes(
    nodes: Sequence[LoginNode], judgements: Mapping[str, Judgement], keys: KeyFacts
) -> tuple[list[Action], list[Waiting]]:
    """A push for each node whose keys may be replaced, unless it backs off or is going away."""
    actions: list[Action] = []
    waiting: list[Waiting] = []
    for node in nodes:
        j = judgements[node.ip]
        if not j.pushable:
            continue
        if keys.platform.get(node.ip) == SHUTTING_DOWN:  # keys for an instance that is going away
            waiting.append(Waiting(node, "HyperPod is shutting this instance down: no key push"))
            continue
        held = keys.backing_off.get(node.ip)
        reason = f"{node.label()} {j.detail}"
        if held:
            waiting.append(Waiting(node, f"key push backing off: {held}"))
            reason = f"{reason}; retry held back: {held}"
        actions.append(
            Action(
                Kind.PUSH_KEYS,
                node.ip,
                reason,
                instance_id=node.instance_id,
                held_by=Guard.BACKOFF if held else None,
                pin=j.pin,
            )
        )
    return actions, waiting


def _judge_node(node: LoginNode, keys: KeyFacts, current: Mapping[str, str]) -> Judgement:
    probe = keys.probes.get(node.ip)
    if probe is None:
        return Judgement(KeyState.PENDING, detail="probe not finished")
    if probe.skipped:
        return Judgement(KeyState.IN_SYNC, detail="verified recently; not probed this pass")
    if probe.offered is None:
        return Judgement(KeyState.UNREACHABLE, detail=probe.error or "no answer")
    trusted = keys.trusted.get(node.ip)
    return judge(
        probe.offered,
        current,
        keys.previous,
        known_instance=keys.verified.get(node.ip) == node.instance_id,
        admin_trusted=trusted[1] if trusted and trusted[0] == node.instance_id else None,
        ip=node.ip,
    )


def _replaced(node: LoginNode, keys: KeyFacts) -> bool:
    """A new instance at an IP whose keys were verified for another one (a HyperPod replacement)."""
    verified = keys.verified.get(node.ip, "")
    return bool(verified) and verified != node.instance_id


def _role(j: Judgement, replaced: bool) -> Role:
    state = j.state
    if state in (KeyState.IN_SYNC, KeyState.NOT_CHECKED):
        return Role.SERVE
    if state is KeyState.ROTATING:
        return Role.IN_PLACE
    if state in (KeyState.NEW_INSTANCE, KeyState.ADMIN_TRUSTED):
        return Role.REPAIR
    if state in (KeyState.UNKNOWN_KEYS, KeyState.NO_KEY_TYPE):
        return Role.HOLD
    if state is KeyState.PENDING:
        return Role.KEEP
    return Role.LEAVE if replaced else Role.KEEP  # unreachable, no canonical keys


def _unverified_waiting(
    nodes: Sequence[LoginNode],
    roles: Mapping[str, Role],
    judgements: Mapping[str, Judgement],
    groups: Sequence[GroupView],
) -> list[Waiting]:
    """Nodes not (or not verifiably) serving as they should, with what is true of them. Nodes
    with a push to come are not listed: their action says it, and a held push says why."""
    out: list[Waiting] = []
    in_every = (
        set.intersection(*(registered_ips(g.targets, g.port) for g in groups)) if groups else set()
    )
    for node in nodes:
        role, j = roles[node.ip], judgements[node.ip]
        if role in (Role.SERVE, Role.IN_PLACE, Role.REPAIR):
            continue
        if j.state is KeyState.UNREACHABLE:
            registered = node.ip in in_every
            where = (
                "registered, but its host keys cannot be verified"
                if registered
                else "not registered until its host keys verify"
            )
            out.append(Waiting(node, f"{where}: {j.detail}"))
        elif role is Role.LEAVE:
            out.append(Waiting(node, _leave_reason(j, role)))
        else:
            out.append(Waiting(node, j.detail))
    return out


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
    pushing: set[str],
    drains: Mapping[str, Drain],
    guards: Guards,
    memory: Memory,
    now: float,
) -> _GroupPlan:
    live = {t.ip: t for t in group.targets if t.port == group.port and _is_ip(t.ip)}
    registered = {ip for ip, t in live.items() if t.registered}

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
        why = "draining target re-registered" if ip in live else "login node not registered"
        if roles[ip] is Role.SERVE:
            actions.append(act(Kind.REGISTER, ip, why))
        elif roles[ip] in (Role.IN_PLACE, Role.REPAIR) and ip in pushing:
            actions.append(act(Kind.REGISTER, ip, f"{why}; after its pushed host keys verify"))

    ledger = Ledger(
        guards,
        registered=len(registered),
        base=memory.start_registered.get(group.arn, len(registered)),
        spent=memory.spent.get(group.arn, 0),
    )
    # Wrong identity first: it is serving users a host key they were not told about, right now.
    for ip in sorted(registered & set(by_ip)):
        if roles[ip] not in (Role.REPAIR, Role.HOLD, Role.LEAVE):
            continue
        held = ledger.take(forced=ip in drains and drains[ip].force)
        node = by_ip[ip]
        reason = f"{node.label()}: {_leave_reason(judgements[ip], roles[ip])}"
        actions.append(act(Kind.DEREGISTER, ip, reason, held))
        if held is None and ip in pushing and ip not in drains:
            actions.append(act(Kind.REGISTER, ip, "back in after its pushed host keys verify"))
    # Then the admin's drains: out of rotation for maintenance, within the guards unless forced.
    for ip in sorted(registered & set(drains)):
        if roles[ip] in (Role.REPAIR, Role.HOLD, Role.LEAVE):
            continue  # already leaving above, for its identity
        drain = drains[ip]
        reason = f"{by_ip[ip].label()}: drained by an admin: {drain.reason}"
        actions.append(act(Kind.DEREGISTER, ip, reason, ledger.take(forced=drain.force)))

    ours = frozenset(memory.registered_by_us.get(group.arn, ()))
    strays = sorted(registered - set(by_ip))
    unmanaged = [live[ip] for ip in strays if not guards.prune and ip not in ours]
    managed = [ip for ip in strays if guards.prune or ip in ours]
    absent = _absences(managed, memory.absent.get(group.arn, {}), memory.last_instance, now)
    listed_at = {n.instance_id: n.ip for n in by_ip.values()}
    # An instance now listed at another IP: its old IP is stale for certain, no need to wait.
    moved = {ip for ip, a in absent.items() if listed_at.get(a.instance_id, ip) != ip}
    for ip in sorted(moved):
        reason = f"instance {absent[ip].instance_id} moved to {listed_at[absent[ip].instance_id]}"
        actions.append(act(Kind.DEREGISTER, ip, reason, ledger.take()))
    need = guards.absent_passes_before_deregister
    for ip, record in absent.items():
        if ip in moved:
            continue
        waited = now - record.since
        reason = f"not in the resource config for {record.passes}/{need} passes"
        if guards.min_absent_seconds:
            reason += f" and {waited:.0f}/{guards.min_absent_seconds:.0f} s"
        early = record.passes < need or waited < guards.min_absent_seconds
        actions.append(act(Kind.DEREGISTER, ip, reason, Guard.ABSENCE if early else ledger.take()))
    return _GroupPlan(actions, absent, unmanaged)


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


def _leave_reason(j: Judgement, role: Role) -> str:
    if role is Role.LEAVE:
        return f"replaced (new instance) and its host keys are unverified ({j.detail})"
    return j.detail or "presents host keys other than the canonical ones"


@functools.lru_cache(maxsize=8192)
def _is_ip(target_id: str) -> bool:
    """Instance ids, Lambda and ALB ARNs are other services' targets: never ours to touch.
    (Cached: a pass asks for every target of every group on each of its plans.)"""
    try:
        ipaddress.ip_address(target_id)
    except ValueError:
        return False
    return True
