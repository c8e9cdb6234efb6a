"""The pure planner: every rule and guard, with plain data (no AWS, no SSH, no clock)."""

from __future__ import annotations

import pytest

from hpodlb.guards import in_service, out_of_service, recent
from hpodlb.identity import KeyState
from hpodlb.inventory import LoginNode
from hpodlb.planner import (
    Absence,
    Drain,
    GroupView,
    Guard,
    Guards,
    KeyFacts,
    Kind,
    Memory,
    Plan,
    Probe,
    Target,
    plan_pass,
)
from tests.support.inputs import keyset

TG = "arn:aws:elasticloadbalancing:us-west-2:123456789012:targetgroup/tg-a/0123456789abcdef"
TG2 = "arn:aws:elasticloadbalancing:us-west-2:123456789012:targetgroup/tg-b/0123456789abcdef"
OFF = KeyFacts()  # host keys disabled: every node counts as verified


CANON = keyset("canonical")
OLD = keyset("previous")


def own(ip: str) -> dict[str, str]:
    """The keys a node generated itself (a fresh root volume)."""
    return keyset(ip)


def node(ip: str, instance: str | None = None) -> LoginNode:
    return LoginNode(
        ip=ip, instance_id=instance or f"i-{ip.replace('.', '')}", name=ip, group="login-group"
    )


def view(*ips: str, arn: str = TG, port: int = 22, state: str = "healthy") -> GroupView:
    return GroupView(arn=arn, port=port, targets=tuple(Target(ip, port, state) for ip in ips))


def facts(
    probes: dict[str, Probe], verified: dict[str, str] | None = None, **kw: object
) -> KeyFacts:
    args: dict[str, object] = {"current": CANON, **kw}
    return KeyFacts(enabled=True, probes=probes, verified=verified or {}, **args)  # type: ignore[arg-type]


def sees(keys: dict[str, str]) -> Probe:
    return Probe(offered=keys)


def summary(plan: Plan) -> set[tuple[str, str, str | None]]:
    """(kind, ip, guard) for every action: what an admin reads in `hpodlb plan`."""
    return {(a.kind.value, a.ip, a.held_by.value if a.held_by else None) for a in plan.actions}


# -- target groups ------------------------------------------------------------------------------


def test_new_nodes_are_registered_eagerly() -> None:
    """Login nodes missing from an empty target group are all registered in the first pass."""
    nodes = [node("10.1.0.1"), node("10.1.0.2")]
    plan = plan_pass(nodes, [view()], OFF, Guards())
    assert summary(plan) == {("register", "10.1.0.1", None), ("register", "10.1.0.2", None)}
    assert all(a.port == 22 and a.target_group == TG for a in plan.actions)


def test_in_step_target_group_is_settled() -> None:
    """Nothing to do when the target group already equals the login nodes."""
    nodes = [node("10.1.0.1"), node("10.1.0.2")]
    plan = plan_pass(nodes, [view("10.1.0.1", "10.1.0.2")], OFF, Guards())
    assert plan.settled
    assert plan.actions == ()


def test_absent_node_waits_for_passes_and_for_time() -> None:
    """A node gone from the resource config leaves only after 2 passes an interval apart."""
    nodes = [node("10.1.0.1"), node("10.1.0.2"), node("10.1.0.3")]
    current = [view("10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.4")]
    guards = Guards(min_absent_seconds=60)
    first = plan_pass(nodes, current, OFF, guards, Memory(), now=1000)
    assert summary(first) == {("deregister", "10.1.0.4", Guard.ABSENCE.value)}
    assert first.absent == {TG: {"10.1.0.4": Absence(1, 1000.0)}}
    # A second pass 1.5 s later (a burst of file changes): two passes, but not an interval apart.
    burst = plan_pass(nodes, current, OFF, guards, Memory(absent=first.absent), now=1001.5)
    assert summary(burst) == {("deregister", "10.1.0.4", Guard.ABSENCE.value)}
    assert "2/2 passes and 2/60 s" in burst.actions[0].reason
    later = plan_pass(nodes, current, OFF, guards, Memory(absent=burst.absent), now=1060)
    assert summary(later) == {("deregister", "10.1.0.4", None)}
    assert later.absent[TG]["10.1.0.4"] == Absence(3, 1000.0)


def test_absence_counter_resets_when_the_node_returns() -> None:
    """A node that reappears before the counter runs out keeps its target and loses its count."""
    nodes = [node("10.1.0.1"), node("10.1.0.2")]
    memory = Memory(absent={TG: {"10.1.0.2": Absence(1, 0.0)}})
    plan = plan_pass(nodes, [view("10.1.0.1", "10.1.0.2")], OFF, Guards(), memory)
    assert plan.settled
    assert plan.absent == {TG: {}}


@pytest.mark.parametrize(
    ("registered", "fraction", "allowed"),
    [(4, 0.5, 2), (4, 0.25, 1), (3, 0.5, 1), (10, 0.0, 0), (4, 1.0, 3)],
)
def test_max_deregister_fraction_caps_one_pass(
    registered: int, fraction: float, allowed: int
) -> None:
    """Never more than floor(fraction x registered) targets leave a group in one pass."""
    keep = node("10.1.0.100")
    ips = [f"10.1.0.{i}" for i in range(1, registered)]
    plan = plan_pass(
        [keep],
        [view(keep.ip, *ips)],
        OFF,
        Guards(max_deregister_fraction=fraction, absent_passes_before_deregister=1),
    )
    deregs = plan.runnable(Kind.DEREGISTER)
    held = [a for a in plan.held() if a.held_by is Guard.FRACTION]
    assert len(deregs) == min(allowed, registered - 1)
    assert len(deregs) + len(held) == registered - 1


def test_budget_spent_earlier_in_the_pass_counts() -> None:
    """Re-planned mid-pass, the fraction is of the group as the pass began, minus what already left."""
    ips = [f"10.1.0.{i}" for i in range(1, 4)]  # 3 of 4 registered remain: one already left
    guards = Guards(
        max_deregister_fraction=0.5, absent_passes_before_deregister=1, min_in_service=0
    )
    fresh = plan_pass([], [view(*ips)], OFF, guards)
    assert len(fresh.runnable(Kind.DEREGISTER)) == 1  # floor(0.5 x 3)
    later = plan_pass(
        [], [view(*ips)], OFF, guards, Memory(start_registered={TG: 4}, spent={TG: 1})
    )
    assert len(later.runnable(Kind.DEREGISTER)) == 1  # floor(0.5 x 4) - 1
    done = plan_pass([], [view(*ips)], OFF, guards, Memory(start_registered={TG: 4}, spent={TG: 2}))
    assert done.runnable(Kind.DEREGISTER) == ()


def test_min_in_service_keeps_the_last_targets() -> None:
    """An empty login group never empties the target group below min_in_service: with no login
    node in service, nothing leaves at all; with one, every other target may."""
    guards = Guards(
        max_deregister_fraction=1.0, absent_passes_before_deregister=1, min_in_service=1
    )
    plan = plan_pass([], [view("10.1.0.1", "10.1.0.2")], OFF, guards)
    assert plan.runnable(Kind.DEREGISTER) == ()
    assert {(a.ip, a.held_by) for a in plan.held()} == {
        ("10.1.0.1", Guard.MIN_IN_SERVICE),
        ("10.1.0.2", Guard.MIN_IN_SERVICE),
    }
    kept = plan_pass([node("10.1.0.3")], [view("10.1.0.1", "10.1.0.2", "10.1.0.3")], OFF, guards)
    assert {a.ip for a in kept.runnable(Kind.DEREGISTER)} == {"10.1.0.1", "10.1.0.2"}


def test_min_in_service_zero_allows_emptying_when_fraction_allows() -> None:
    """With min_in_service = 0 and fraction 1.0 the admin has said an empty group is fine."""
    plan = plan_pass(
        [],
        [view("10.1.0.1")],
        OFF,
        Guards(max_deregister_fraction=1.0, absent_passes_before_deregister=1, min_in_service=0),
    )
    assert summary(plan) == {("deregister", "10.1.0.1", None)}


def test_prune_off_leaves_foreign_targets_alone() -> None:
    """With prune = false, a target hpodlb did not register is never deregistered."""
    nodes = [node("10.1.0.1")]
    current = [view("10.1.0.1", "10.1.0.9", "10.1.0.8")]
    plan = plan_pass(
        nodes,
        current,
        OFF,
        Guards(prune=False, absent_passes_before_deregister=1, max_deregister_fraction=1.0),
        Memory(registered_by_us={TG: ["10.1.0.8"]}),
    )
    assert summary(plan) == {("deregister", "10.1.0.8", None)}
    assert [t.ip for _, t in plan.unmanaged] == ["10.1.0.9"]


def test_prune_on_removes_hand_added_targets() -> None:
    """With prune = true, a hand-added target at the configured port is drift to remove."""
    nodes = [node("10.1.0.1"), node("10.1.0.2")]
    plan = plan_pass(
        nodes,
        [view("10.1.0.1", "10.1.0.2", "10.1.0.9")],
        OFF,
        Guards(absent_passes_before_deregister=1),
    )
    assert summary(plan) == {("deregister", "10.1.0.9", None)}


def test_targets_at_other_ports_are_never_touched() -> None:
    """A target on another port (someone else's listener) is neither pruned nor counted."""
    nodes = [node("10.1.0.1")]
    current = GroupView(
        TG, 22, (Target("10.1.0.1", 22, "healthy"), Target("10.1.0.7", 2222, "healthy"))
    )
    plan = plan_pass(nodes, [current], OFF, Guards(absent_passes_before_deregister=1))
    assert plan.settled


def test_targets_that_are_not_ip_addresses_are_never_deregistered() -> None:
    """Instance ids and ARNs are other services' targets: not pruned, not counted, whatever the guards."""
    others = ("i-0abc1234def567890", "arn:aws:lambda:us-west-2:123456789012:function:f")
    plan = plan_pass(
        [],
        [view(*others)],
        OFF,
        Guards(max_deregister_fraction=1.0, absent_passes_before_deregister=1, min_in_service=0),
    )
    assert plan.actions == ()
    assert plan.settled


def test_a_group_that_failed_its_check_gets_no_action() -> None:
    """A target group of the wrong kind gets nothing, not even registrations, and the plan says why."""
    nodes = [node("10.1.0.1")]
    wrong = GroupView(
        TG, 22, (Target("i-0abc", 22, "healthy"),), problem="tg-a: target type 'instance'"
    )
    plan = plan_pass(nodes, [wrong, view(arn=TG2)], OFF, Guards(absent_passes_before_deregister=1))
    assert {(a.target_group, a.kind) for a in plan.actions} == {(TG2, Kind.REGISTER)}
    assert plan.problems == ("tg-a: target type 'instance'",)
    assert not plan.settled


def test_draining_target_is_registered_again() -> None:
    """A desired node whose target is draining (someone deregistered it) is registered again."""
    nodes = [node("10.1.0.1")]
    plan = plan_pass(nodes, [view("10.1.0.1", state="draining")], OFF, Guards())
    assert summary(plan) == {("register", "10.1.0.1", None)}
    assert "draining" in plan.actions[0].reason


def test_a_moved_instance_frees_its_old_ip_once_it_is_in_service_at_the_new_one() -> None:
    """Same InstanceId at a new IP: the old IP leaves without waiting for the absence guard only
    once the new IP is registered and verified (in service); one odd read (the new IP not in
    service) changes nothing but the absence count."""
    moved, other, third = node("10.1.0.5", "i-same"), node("10.1.0.2"), node("10.1.0.3")
    memory = Memory(last_instance={"10.1.0.1": "i-same"})
    before = [view("10.1.0.1", "10.1.0.2", "10.1.0.3")]
    plan = plan_pass([moved, other, third], before, OFF, Guards(), memory)
    assert summary(plan) == {
        ("register", "10.1.0.5", None),
        ("deregister", "10.1.0.1", Guard.ABSENCE.value),
    }
    assert "instance i-same listed at 10.1.0.5, not in service" in plan.held()[0].reason
    # Once the new IP is in (the pass registers it, then plans again): the old one leaves.
    joined = [view("10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.5")]
    plan = plan_pass([moved, other, third], joined, OFF, Guards(), memory)
    assert summary(plan) == {("deregister", "10.1.0.1", None)}
    assert "instance i-same moved to 10.1.0.5, in service there" in plan.actions[0].reason
    # Still within the guards: with a budget of 0 it is held like any deregistration.
    held = plan_pass([moved, other], joined, OFF, Guards(max_deregister_fraction=0.0), memory)
    assert ("deregister", "10.1.0.1", Guard.FRACTION.value) in summary(held)


def test_a_new_ip_that_does_not_verify_never_frees_the_old_one_early() -> None:
    """Host keys on: a known instance listed at an IP where nothing answers (a bad read) is not
    in service there, so its old IP stays until the absence guard lets it go, as any absent
    target's."""
    moved = node("10.1.0.5", "i-same")
    others = [node("10.1.0.2"), node("10.1.0.3")]
    probes = {moved.ip: Probe(error="connect: refused")} | {n.ip: sees(CANON) for n in others}
    keys = facts(probes, {n.ip: n.instance_id for n in others})
    groups = [view("10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.5")]  # registered, unverified
    memory = Memory(last_instance={"10.1.0.1": "i-same"})
    plan = plan_pass([moved, *others], groups, keys, Guards(), memory)
    assert ("deregister", "10.1.0.1", Guard.ABSENCE.value) in summary(plan)
    later = Memory(last_instance=memory.last_instance, absent=plan.absent)
    plan = plan_pass([moved, *others], groups, keys, Guards(), later)
    assert ("deregister", "10.1.0.1", None) in summary(plan)  # 2/2 passes: an absence like any


def test_an_ip_whose_instance_is_not_listed_waits_for_the_absence_guard() -> None:
    """A stray IP whose last instance is nowhere in the resource config is an ordinary absence."""
    plan = plan_pass(
        [node("10.1.0.2")],
        [view("10.1.0.1", "10.1.0.2")],
        OFF,
        Guards(),
        Memory(last_instance={"10.1.0.1": "i-gone"}),
    )
    assert summary(plan) == {("deregister", "10.1.0.1", Guard.ABSENCE.value)}


def test_several_target_groups_are_planned_independently() -> None:
    """Each target group gets its own actions, counters and guards."""
    nodes = [node("10.1.0.1"), node("10.1.0.2")]
    plan = plan_pass(
        nodes,
        [view("10.1.0.1", "10.1.0.2"), view("10.1.0.1", arn=TG2, port=2222)],
        OFF,
        Guards(),
    )
    assert {(a.target_group, a.ip, a.port) for a in plan.actions} == {(TG2, "10.1.0.2", 2222)}


def test_zero_nodes_and_empty_group_is_settled() -> None:
    """No login nodes and no targets: nothing to do."""
    assert plan_pass([], [view()], OFF, Guards()).settled


def test_a_thousand_nodes_are_planned_in_one_pass() -> None:
    """1,000 new nodes (NLB's per-group limit) are all registered; 999 absent ones are capped."""
    nodes = [node(f"10.2.{i // 250}.{i % 250 + 1}") for i in range(1000)]
    plan = plan_pass(nodes, [view()], OFF, Guards())
    assert len(plan.runnable(Kind.REGISTER)) == 1000
    gone = plan_pass(
        nodes[:1], [view(*(n.ip for n in nodes))], OFF, Guards(absent_passes_before_deregister=1)
    )
    assert len(gone.runnable(Kind.DEREGISTER)) == 500
    assert len(gone.held()) == 499


# -- host keys ---------------------------------------------------------------------------------


def test_in_sync_node_is_registered() -> None:
    """A node presenting the canonical keys is registered."""
    n = node("10.1.0.1")
    plan = plan_pass([n], [view()], facts({n.ip: sees(CANON)}), Guards())
    assert summary(plan) == {("register", n.ip, None)}
    assert plan.judgements[n.ip].state is KeyState.IN_SYNC


def test_a_node_offering_only_some_types_counts_only_those() -> None:
    """A node whose sshd offers only ed25519, canonical, is in sync (the types it offers count)."""
    n = node("10.1.0.1")
    plan = plan_pass(
        [n],
        [view(n.ip)],
        facts({n.ip: sees({"ed25519": CANON["ed25519"]})}, {n.ip: n.instance_id}),
        Guards(),
    )
    assert plan.settled
    none = plan_pass([n], [view()], facts({n.ip: sees({})}), Guards())
    assert none.actions == ()
    assert none.judgements[n.ip].state is KeyState.NO_KEY_TYPE


def test_new_node_with_own_keys_is_pushed_pinned_to_its_probe() -> None:
    """A new node with its own keys gets a push pinned to exactly what its probe saw, then joins."""
    n = node("10.1.0.1")
    plan = plan_pass([n], [view()], facts({n.ip: sees(own(n.ip))}), Guards())
    assert summary(plan) == {("push-keys", n.ip, None), ("register", n.ip, None)}
    (push,) = plan.runnable(Kind.PUSH_KEYS)
    assert push.pin == frozenset(own(n.ip).values())
    (register,) = plan.runnable(Kind.REGISTER)
    assert register.after_push


def test_replaced_node_leaves_is_pushed_and_comes_back() -> None:
    """A new instance at a registered IP (HyperPod replacement) leaves, is pushed, and returns."""
    a, b = node("10.1.0.1", "i-new"), node("10.1.0.2")
    keys = facts({a.ip: sees(own(a.ip)), b.ip: sees(CANON)}, {a.ip: "i-old", b.ip: b.instance_id})
    plan = plan_pass([a, b], [view(a.ip, b.ip)], keys, Guards())
    assert summary(plan) == {
        ("deregister", a.ip, None),
        ("push-keys", a.ip, None),
        ("register", a.ip, None),
    }
    assert plan.judgements[a.ip].state is KeyState.NEW_INSTANCE


def test_a_known_instance_with_unknown_keys_is_held_not_pushed() -> None:
    """Same instance, new keys (re-imaged in place, or an impostor): out of rotation, nothing pushed."""
    a, b = node("10.1.0.1"), node("10.1.0.2")
    keys = facts(
        {a.ip: sees(own(a.ip)), b.ip: sees(CANON)}, {a.ip: a.instance_id, b.ip: b.instance_id}
    )
    plan = plan_pass([a, b], [view(a.ip, b.ip)], keys, Guards())
    assert summary(plan) == {("deregister", a.ip, None)}
    assert plan.judgements[a.ip].state is KeyState.UNKNOWN_KEYS
    (waiting,) = plan.waiting
    assert f"hpodlb keys trust {a.ip}" in waiting.reason


def test_an_admin_trusted_instance_is_pushed_pinned_to_the_accepted_keys() -> None:
    """After `keys trust`, exactly the accepted keys of that instance are trusted for a push."""
    a = node("10.1.0.1")
    accepted = (a.instance_id, frozenset(own(a.ip).values()))
    keys = facts({a.ip: sees(own(a.ip))}, {a.ip: a.instance_id}, trusted={a.ip: accepted})
    plan = plan_pass([a], [view()], keys, Guards())
    assert summary(plan) == {("push-keys", a.ip, None), ("register", a.ip, None)}
    # The same request does not cover other keys, nor another instance at that IP.
    other = facts({a.ip: sees(own("10.9.9.9"))}, {a.ip: a.instance_id}, trusted={a.ip: accepted})
    assert plan_pass([a], [view()], other, Guards()).judgements[a.ip].state is KeyState.UNKNOWN_KEYS


def test_a_node_presenting_the_previous_set_is_updated_in_place() -> None:
    """During a rotation, a node with the previous keys stays registered and is pushed the new ones."""
    a, b = node("10.1.0.1"), node("10.1.0.2")
    keys = facts(
        {a.ip: sees(OLD), b.ip: sees(CANON)},
        {a.ip: a.instance_id, b.ip: b.instance_id},
        previous=OLD,
    )
    plan = plan_pass([a, b], [view(a.ip, b.ip)], keys, Guards())
    assert summary(plan) == {("push-keys", a.ip, None)}
    assert plan.judgements[a.ip].state is KeyState.ROTATING
    assert plan.runnable(Kind.PUSH_KEYS)[0].pin == frozenset(OLD.values())


def test_the_previous_set_is_retired_once_every_node_presents_the_new_one() -> None:
    """The rotation ends (retire action) only when every login node is verified in the new set."""
    a, b = node("10.1.0.1"), node("10.1.0.2")
    done = facts({a.ip: sees(CANON), b.ip: sees(CANON)}, previous=OLD)
    assert ("retire-previous-keys", "", None) in summary(
        plan_pass([a, b], [view(a.ip, b.ip)], done, Guards())
    )
    unreachable = facts({a.ip: sees(CANON), b.ip: Probe(error="connect: refused")}, previous=OLD)
    plan = plan_pass([a, b], [view(a.ip, b.ip)], unreachable, Guards())
    assert all(act.kind is not Kind.RETIRE_PREVIOUS for act in plan.actions)


def test_an_empty_store_adopts_the_first_node_in_the_resource_config() -> None:
    """Adoption is a plan action from the resource config's first node, not the lowest IP."""
    first, second = node("10.1.0.9"), node("10.1.0.1")
    keys = KeyFacts(
        enabled=True, probes={first.ip: sees(own(first.ip)), second.ip: sees(own(second.ip))}
    )
    plan = plan_pass([first, second], [view()], keys, Guards())
    (adopt,) = plan.runnable(Kind.ADOPT)
    assert adopt.ip == first.ip
    assert adopt.pin == frozenset(own(first.ip).values())
    assert "the first login node in the resource config" in adopt.reason
    # The rest of the plan is what follows the adoption: the others get the adopted keys.
    assert ("push-keys", second.ip, None) in summary(plan)


def test_adoption_waits_for_an_unreachable_first_node_and_says_so() -> None:
    """No adoption from another node when the first one is down: everyone waits, with the reason."""
    first, second = node("10.1.0.9"), node("10.1.0.1")
    keys = KeyFacts(
        enabled=True,
        probes={first.ip: Probe(error="connect: refused"), second.ip: sees(own(second.ip))},
    )
    plan = plan_pass([first, second], [view(second.ip)], keys, Guards())
    assert plan.actions == ()
    assert {w.node.ip for w in plan.waiting} == {first.ip, second.ip}
    assert all(
        "adopting the keys of 10.1.0.9" in w.reason and "connect: refused" in w.reason
        for w in plan.waiting
    )


def test_an_unusable_store_says_so_instead_of_unreachable() -> None:
    """A refused key store is the reason given for every node, not 'node unreachable'."""
    a = node("10.1.0.1")
    keys = KeyFacts(
        enabled=True,
        unavailable="key store refused: mode 0755 is wider than 0700",
        probes={a.ip: sees(own(a.ip))},
    )
    plan = plan_pass([a], [view()], keys, Guards())
    assert plan.actions == ()
    assert plan.waiting[0].reason == "key store refused: mode 0755 is wider than 0700"


def test_unreachable_node_is_not_registered_and_waits() -> None:
    """A node whose keys could not be checked is not registered; it is reported as waiting."""
    n = node("10.1.0.1")
    plan = plan_pass([n], [view()], facts({n.ip: Probe(error="connect: refused")}), Guards())
    assert plan.actions == ()
    assert plan.waiting[0].reason == "not registered until its host keys verify: connect: refused"
    assert not plan.settled


def test_unreachable_registered_node_stays_registered_but_is_not_settled() -> None:
    """A registered node that is only unreachable keeps its target, and the pass is not converged."""
    n = node("10.1.0.1")
    plan = plan_pass(
        [n], [view(n.ip)], facts({n.ip: Probe(error="handshake: timed out")}), Guards()
    )
    assert plan.actions == ()
    assert (
        plan.waiting[0].reason
        == "registered, but its host keys cannot be verified: handshake: timed out"
    )


def test_a_node_without_a_probe_yet_gets_no_action() -> None:
    """Mid-pass, a node whose probe has not come back is neither registered nor deregistered."""
    a, b = node("10.1.0.1"), node("10.1.0.2")
    plan = plan_pass([a, b], [view(b.ip)], facts({}), Guards())
    assert plan.actions == ()


def test_replaced_unreachable_node_leaves_rotation() -> None:
    """A replaced node (new instance id) that cannot be verified is taken out of rotation."""
    a, b = node("10.1.0.1", "i-new"), node("10.1.0.2")
    keys = facts({a.ip: Probe(error="connect: refused"), b.ip: sees(CANON)}, {a.ip: "i-old"})
    plan = plan_pass([a, b], [view(a.ip, b.ip)], keys, Guards())
    assert summary(plan) == {("deregister", a.ip, None)}
    assert [w.node.ip for w in plan.waiting] == [a.ip]


def test_backing_off_node_gets_no_push_this_pass() -> None:
    """A node inside its push backoff is not pushed to, and says so."""
    a = node("10.1.0.1")
    plan = plan_pass(
        [a], [view()], facts({a.ip: sees(own(a.ip))}, backing_off={a.ip: "retry in 40s"}), Guards()
    )
    assert summary(plan) == {("push-keys", a.ip, Guard.BACKOFF.value)}
    assert "retry in 40s" in plan.waiting[0].reason


def test_every_deregistration_counts_against_the_fraction_and_held_ones_are_still_pushed() -> None:
    """4 registered, 3 replaced, fraction 0.5: 2 leave, 1 is held back, all 3 are pushed."""
    nodes = [node(f"10.1.0.{i}", f"i-new{i}") for i in range(1, 4)] + [node("10.1.0.4")]
    probes = {n.ip: sees(own(n.ip)) for n in nodes[:3]} | {"10.1.0.4": sees(CANON)}
    verified = {n.ip: f"i-old{n.ip}" for n in nodes[:3]}
    plan = plan_pass(
        nodes,
        [view(*(n.ip for n in nodes))],
        facts(probes, verified),
        Guards(max_deregister_fraction=0.5),
    )
    deregs = [a for a in plan.actions if a.kind is Kind.DEREGISTER]
    assert sum(not a.held for a in deregs) == 2
    assert [a.held_by for a in deregs if a.held] == [Guard.FRACTION]
    assert {a.ip for a in plan.runnable(Kind.PUSH_KEYS)} == {"10.1.0.1", "10.1.0.2", "10.1.0.3"}


def test_wrong_keys_still_respect_min_in_service() -> None:
    """Even a wrong identity does not take the last target out (min_in_service); it is pushed."""
    a = node("10.1.0.1", "i-new")
    plan = plan_pass(
        [a],
        [view(a.ip)],
        facts({a.ip: sees(own(a.ip))}, {a.ip: "i-old"}),
        Guards(max_deregister_fraction=1.0),
    )
    assert summary(plan) == {
        ("push-keys", a.ip, None),
        ("deregister", a.ip, Guard.MIN_IN_SERVICE.value),
    }


# -- drains -------------------------------------------------------------------------------------


def test_a_drained_node_leaves_within_the_guards_and_is_never_registered() -> None:
    a, b, c = node("10.1.0.1"), node("10.1.0.2"), node("10.1.0.3")
    drained = {a.ip: Drain("kernel update"), c.ip: Drain("disk")}
    plan = plan_pass(
        [a, b, c], [view(a.ip, b.ip)], OFF, Guards(max_deregister_fraction=1.0), drained=drained
    )
    assert summary(plan) == {("deregister", a.ip, None)}  # c is not registered, and stays out
    (action,) = plan.actions
    assert "drained by an admin: kernel update" in action.reason
    assert set(plan.drained) == {a.ip, c.ip}
    after = plan_pass([a, b, c], [view(b.ip)], OFF, Guards(), drained=drained)
    assert after.settled  # out of rotation on purpose: nothing to do, nobody waits


def test_an_unforced_drain_keeps_min_in_service_and_a_forced_one_counts_against_others() -> None:
    a, b = node("10.1.0.1"), node("10.1.0.2")
    guards = Guards(max_deregister_fraction=1.0, min_in_service=1)
    both = {a.ip: Drain("x"), b.ip: Drain("y")}
    plan = plan_pass([a, b], [view(a.ip, b.ip)], OFF, guards, drained=both)
    assert summary(plan) == {("deregister", a.ip, None), ("deregister", b.ip, "min_in_service")}
    forced = {a.ip: Drain("x", force=True), b.ip: Drain("y", force=True)}
    plan = plan_pass([a, b], [view(a.ip, b.ip)], OFF, guards, drained=forced)
    assert summary(plan) == {("deregister", a.ip, None), ("deregister", b.ip, None)}
    # A forced drain uses the budget: an absent target in the same pass is held by the fraction.
    stray = "10.1.0.9"
    memory = Memory(absent={TG: {stray: Absence(passes=5, since=-1000)}})
    plan = plan_pass(
        [a, b],
        [view(a.ip, b.ip, stray)],
        OFF,
        Guards(max_deregister_fraction=0.34),
        memory,
        now=0,
        drained={a.ip: Drain("x", force=True)},
    )
    assert ("deregister", stray, "max_deregister_fraction") in summary(plan)


def test_a_drained_node_is_still_pushed_keys_and_not_waited_for() -> None:
    a, b = node("10.1.0.1"), node("10.1.0.2")
    probes = {a.ip: sees(own(a.ip)), b.ip: sees(CANON)}
    plan = plan_pass(
        [a, b], [view(a.ip, b.ip)], facts(probes), Guards(), drained={a.ip: Drain("m")}
    )
    assert ("push-keys", a.ip, None) in summary(plan)
    assert ("register", a.ip, None) not in summary(plan)  # not back in after the push
    assert not plan.waiting
    unreachable = {a.ip: Probe(error="connect: refused"), b.ip: sees(CANON)}
    plan = plan_pass([a, b], [view(b.ip)], facts(unreachable), Guards(), drained={a.ip: Drain("m")})
    assert plan.settled  # a node rebooting for maintenance is not a problem


def test_a_forced_drain_of_a_node_leaving_for_its_identity_passes_the_guards_too() -> None:
    a = node("10.1.0.1")
    guards = Guards(max_deregister_fraction=1.0, min_in_service=1)
    for probe, verified in ((sees(own(a.ip)), {a.ip: a.instance_id}), (sees(own(a.ip)), {})):
        keys = facts({a.ip: probe}, verified)  # unknown keys (held), or a new instance (repair)
        held = plan_pass([a], [view(a.ip)], keys, guards, drained={a.ip: Drain("x")})
        assert ("deregister", a.ip, "min_in_service") in summary(held)
        forced = plan_pass([a], [view(a.ip)], keys, guards, drained={a.ip: Drain("x", force=True)})
        assert ("deregister", a.ip, None) in summary(forced)
        assert ("register", a.ip, None) not in summary(forced)


# -- in service: one definition for every guard -------------------------------------------------


def test_in_service_is_a_verified_login_node_registered_and_up() -> None:
    """A login node of the resource config, keys vouched for, registered and neither unhealthy,
    unused nor draining (`*.draining` included): nothing else is in service."""
    states = {
        "10.1.0.1": "healthy",
        "10.1.0.2": "initial",  # just registered: in service until its checks say otherwise
        "10.1.0.3": "unhealthy",
        "10.1.0.4": "unhealthy.draining",
        "10.1.0.5": "draining",
        "10.1.0.6": "unused",
        "10.1.0.7": "healthy",  # its keys are not verified
        "10.1.0.8": "healthy",  # during a rotation: the previous canonical set
        "10.1.0.9": "healthy",  # not a login node of the resource config
    }
    targets = [Target(ip, 22, state) for ip, state in states.items()]
    keys = dict.fromkeys(list(states)[:6], KeyState.IN_SYNC.value)
    keys |= {"10.1.0.7": KeyState.UNREACHABLE.value, "10.1.0.8": KeyState.ROTATING.value}
    assert in_service(keys, targets, 22) == {"10.1.0.1", "10.1.0.2", "10.1.0.8"}
    assert in_service(keys, targets, 2222) == set()
    assert out_of_service(keys, targets[3]) == "unhealthy.draining"
    assert out_of_service(keys, targets[6]) == "host keys unreachable"
    assert out_of_service(keys, targets[8]) == "not a login node of the resource config"


def test_a_drain_that_would_leave_no_node_in_service_is_held_whatever_else_is_registered() -> None:
    """A and B registered, B gone from the resource config, a hand-added target, an unhealthy
    node: draining A would leave none in service, so it is held by min_in_service (a count of
    registered targets would have let it go)."""
    a, c = node("10.1.0.1"), node("10.1.0.3")
    group = GroupView(
        TG,
        22,
        (
            Target(a.ip, 22, "healthy"),
            Target("10.1.0.2", 22, "healthy"),  # B: no longer in the resource config
            Target(c.ip, 22, "unhealthy"),
            Target("10.1.0.9", 22, "healthy"),  # added by hand
        ),
    )
    guards = Guards(max_deregister_fraction=1.0, min_in_service=1)
    plan = plan_pass([a, c], [group], OFF, guards, drained={a.ip: Drain("kernel")})
    assert ("deregister", a.ip, Guard.MIN_IN_SERVICE.value) in summary(plan)
    forced = plan_pass([a, c], [group], OFF, guards, drained={a.ip: Drain("kernel", force=True)})
    assert ("deregister", a.ip, None) in summary(forced)


def test_an_unhealthy_draining_target_is_registered_again_and_keeps_the_pass_waiting() -> None:
    """`unhealthy.draining` (any `*.draining`) is not registered: a desired node in that state is
    registered again, is not counted in service, and the plan waits on it (not converged)."""
    a, b = node("10.1.0.1"), node("10.1.0.2")
    group = GroupView(
        TG,
        22,
        (Target(a.ip, 22, "unhealthy.draining"), Target(b.ip, 22, "healthy")),
        failing={a.ip: "unhealthy.draining"},
    )
    plan = plan_pass([a, b], [group], OFF, Guards(max_deregister_fraction=1.0))
    assert summary(plan) == {("register", a.ip, None)}
    assert "unhealthy.draining target re-registered" in plan.actions[0].reason
    (waiting,) = plan.waiting
    assert waiting.node == a and "was unhealthy.draining as the pass read it" in waiting.reason
    assert not plan.settled
    drain_b = plan_pass(
        [a, b], [group], OFF, Guards(max_deregister_fraction=1.0), drained={b.ip: Drain("x")}
    )
    assert ("deregister", b.ip, Guard.MIN_IN_SERVICE.value) in summary(drain_b)


def test_deregistrations_spent_earlier_in_the_window_count() -> None:
    """The fraction is budgeted per window: what left within it, in earlier passes, is spent;
    a deregistration older than the window is not."""
    guards = Guards(max_deregister_fraction=0.5, fraction_window_seconds=27.0)
    assert recent([100.0, 100.0, 80.0, 73.0], now=100.0, guards=guards) == [100.0, 100.0, 80.0]
    assert recent([100.0], now=127.0, guards=guards) == []
    # 8 registered as the window began, 4 left since (earlier passes): nothing more may leave.
    ips = [f"10.1.0.{i}" for i in range(1, 5)]
    keep = node("10.1.0.1")
    spent = Memory(start_registered={TG: 8}, spent={TG: 4})
    plan = plan_pass([keep], [view(*ips)], OFF, Guards(absent_passes_before_deregister=1), spent)
    assert plan.runnable(Kind.DEREGISTER) == ()
    assert {a.held_by for a in plan.held()} == {Guard.FRACTION}
