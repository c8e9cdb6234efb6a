"""The host-key half of the plan: adopt, push, retire, and what each node's keys mean for its
targets. Pure, as `planner.py` (which calls it first, each plan).

Which identity a node presents, and whether hpodlb may push to it, is `identity.py`'s judgement;
this module turns the judgements into actions and roles: an empty store adopts the first login
node's keys, a node whose keys may be replaced is pushed to (unless it backs off, or HyperPod is
shutting it down), a rotation is retired once every node presents the new set, and each node's
`Role` says what its targets should do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from hpodlb.guards import Guard
from hpodlb.identity import Judgement, KeyState, judge
from hpodlb.inventory import LoginNode
from hpodlb.plantypes import SHUTTING_DOWN, Action, GroupView, KeyFacts, Kind, Probe, Role, Waiting
from hpodlb.targetstate import registered_ips


def plan_keys(
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


def is_replacement(node: LoginNode, keys: KeyFacts) -> bool:
    """A new instance at an IP whose keys were verified for another one (a HyperPod replacement)."""
    verified = keys.verified.get(node.ip, "")
    return bool(verified) and verified != node.instance_id


def standing(node: LoginNode, j: Judgement, keys: KeyFacts) -> str:
    """The key state that counts for `guards.in_service`: the judgement, except that a node whose
    probe of this pass is not back yet stands as it was last verified (this instance, the
    canonical keys): a probe in flight proves nothing either way, and the guards must not take
    it for a node out of service while they decide whether another may leave."""
    if j.state is KeyState.PENDING and keys.verified.get(node.ip) == node.instance_id:
        return KeyState.IN_SYNC.value
    return j.state.value


def role_of(j: Judgement, replaced: bool) -> Role:
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


def unverified_waiting(
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
            out.append(Waiting(node, leave_reason(j, role)))
        else:
            out.append(Waiting(node, j.detail))
    return out


def leave_reason(j: Judgement, role: Role) -> str:
    if role is Role.LEAVE:
        return f"replaced (new instance) and its host keys are unverified ({j.detail})"
    return j.detail or "presents host keys other than the canonical ones"
