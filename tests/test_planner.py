"""The pure planner: every rule and guard, with plain data (no AWS, no SSH, no clock)."""

from __future__ import annotations

import pytest

from hpodlb.inventory import LoginNode
from hpodlb.planner import (
    GroupView,
    Guard,
    Guards,
    KeyVerdict,
    Kind,
    Plan,
    Target,
    plan_pass,
)

TG = "arn:aws:elasticloadbalancing:us-west-2:123456789012:targetgroup/tg-a/0123456789abcdef"
TG2 = "arn:aws:elasticloadbalancing:us-west-2:123456789012:targetgroup/tg-b/0123456789abcdef"


def node(ip: str, instance: str | None = None) -> LoginNode:
    return LoginNode(ip=ip, instance_id=instance or f"i-{ip.replace('.', '')}", name=ip, group="login-group")


def view(*ips: str, arn: str = TG, port: int = 22, state: str = "healthy") -> GroupView:
    return GroupView(arn=arn, port=port, targets=tuple(Target(ip, port, state) for ip in ips))


def synced(*nodes: LoginNode) -> dict[str, KeyVerdict]:
    return {n.ip: KeyVerdict.IN_SYNC for n in nodes}


def summary(plan: Plan) -> set[tuple[str, str, str | None]]:
    """(kind, ip, guard) for every action: what an admin reads in `hpodlb plan`."""
    return {(a.kind.value, a.ip, a.held_by.value if a.held_by else None) for a in plan.actions}


def test_new_nodes_are_registered_eagerly() -> None:
    """Login nodes missing from an empty target group are all registered in the first pass."""
    nodes = [node("10.1.0.1"), node("10.1.0.2")]
    plan = plan_pass(nodes, [view()], synced(*nodes), Guards())
    assert summary(plan) == {("register", "10.1.0.1", None), ("register", "10.1.0.2", None)}
    assert all(a.port == 22 and a.target_group == TG for a in plan.actions)


def test_in_step_target_group_is_converged() -> None:
    """Nothing to do when the target group already equals the login nodes."""
    nodes = [node("10.1.0.1"), node("10.1.0.2")]
    plan = plan_pass(nodes, [view("10.1.0.1", "10.1.0.2")], synced(*nodes), Guards())
    assert plan.converged
    assert plan.actions == ()


def test_absent_node_waits_for_the_absence_counter() -> None:
    """A node gone from the resource config is held on the first pass and leaves on the second."""
    nodes = [node("10.1.0.1"), node("10.1.0.2"), node("10.1.0.3")]
    current = [view("10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.4")]
    first = plan_pass(nodes, current, synced(*nodes), Guards())
    assert summary(first) == {("deregister", "10.1.0.4", Guard.ABSENCE.value)}
    assert first.absent_passes == {TG: {"10.1.0.4": 1}}
    second = plan_pass(nodes, current, synced(*nodes), Guards(), absent_passes=first.absent_passes)
    assert summary(second) == {("deregister", "10.1.0.4", None)}
    assert "2/2" in second.actions[0].reason


def test_absence_counter_resets_when_the_node_returns() -> None:
    """A node that reappears before the counter runs out keeps its target and loses its count."""
    nodes = [node("10.1.0.1"), node("10.1.0.2")]
    plan = plan_pass(
        nodes, [view("10.1.0.1", "10.1.0.2")], synced(*nodes), Guards(),
        absent_passes={TG: {"10.1.0.2": 1}},
    )
    assert plan.converged
    assert plan.absent_passes == {TG: {}}


@pytest.mark.parametrize(
    ("registered", "fraction", "allowed"),
    [(4, 0.5, 2), (4, 0.25, 1), (3, 0.5, 1), (10, 0.0, 0), (4, 1.0, 3)],
)
def test_max_deregister_fraction_caps_one_pass(registered: int, fraction: float, allowed: int) -> None:
    """Never more than floor(fraction x registered) targets leave a group in one pass."""
    keep = node("10.1.0.100")
    ips = [f"10.1.0.{i}" for i in range(1, registered)]
    plan = plan_pass(
        [keep], [view(keep.ip, *ips)], synced(keep),
        Guards(max_deregister_fraction=fraction, absent_passes_before_deregister=1),
    )
    deregs = plan.runnable(Kind.DEREGISTER)
    held = [a for a in plan.held() if a.held_by is Guard.FRACTION]
    assert len(deregs) == min(allowed, registered - 1)
    assert len(deregs) + len(held) == registered - 1


def test_min_in_service_keeps_the_last_targets() -> None:
    """An empty login group never empties the target group below min_in_service."""
    plan = plan_pass(
        [], [view("10.1.0.1", "10.1.0.2")], {},
        Guards(max_deregister_fraction=1.0, absent_passes_before_deregister=1, min_in_service=1),
    )
    assert [a.ip for a in plan.runnable(Kind.DEREGISTER)] == ["10.1.0.1"]
    assert [(a.ip, a.held_by) for a in plan.held()] == [("10.1.0.2", Guard.MIN_IN_SERVICE)]


def test_min_in_service_zero_allows_emptying_when_fraction_allows() -> None:
    """With min_in_service = 0 and fraction 1.0 the admin has said an empty group is fine."""
    plan = plan_pass(
        [], [view("10.1.0.1")], {},
        Guards(max_deregister_fraction=1.0, absent_passes_before_deregister=1, min_in_service=0),
    )
    assert summary(plan) == {("deregister", "10.1.0.1", None)}


def test_prune_off_leaves_foreign_targets_alone() -> None:
    """With prune = false, a target hpodlb did not register is never deregistered."""
    nodes = [node("10.1.0.1")]
    current = [view("10.1.0.1", "10.1.0.9", "10.1.0.8")]
    plan = plan_pass(
        nodes, current, synced(*nodes),
        Guards(prune=False, absent_passes_before_deregister=1, max_deregister_fraction=1.0),
        registered_by_us={TG: ["10.1.0.8"]},
    )
    assert summary(plan) == {("deregister", "10.1.0.8", None)}
    assert [t.ip for _, t in plan.unmanaged] == ["10.1.0.9"]


def test_prune_on_removes_hand_added_targets() -> None:
    """With prune = true, a hand-added target at the configured port is drift to remove."""
    nodes = [node("10.1.0.1"), node("10.1.0.2")]
    plan = plan_pass(
        nodes, [view("10.1.0.1", "10.1.0.2", "10.1.0.9")], synced(*nodes),
        Guards(absent_passes_before_deregister=1),
    )
    assert summary(plan) == {("deregister", "10.1.0.9", None)}


def test_targets_at_other_ports_are_never_touched() -> None:
    """A target on another port (someone else's listener) is neither pruned nor counted."""
    nodes = [node("10.1.0.1")]
    current = GroupView(TG, 22, (Target("10.1.0.1", 22, "healthy"), Target("10.1.0.7", 2222, "healthy")))
    plan = plan_pass(nodes, [current], synced(*nodes), Guards(absent_passes_before_deregister=1))
    assert plan.converged


def test_draining_target_is_registered_again() -> None:
    """A desired node whose target is draining (someone deregistered it) is registered again."""
    nodes = [node("10.1.0.1")]
    plan = plan_pass(nodes, [view("10.1.0.1", state="draining")], synced(*nodes), Guards())
    assert summary(plan) == {("register", "10.1.0.1", None)}
    assert "draining" in plan.actions[0].reason


def test_node_whose_ip_moved_is_registered_now_and_old_ip_leaves_later() -> None:
    """A node with a new IP joins at once; its old IP leaves only after the absence counter."""
    moved = node("10.1.0.5", "i-same")
    plan = plan_pass([moved, node("10.1.0.2")], [view("10.1.0.1", "10.1.0.2")],
                     synced(moved, node("10.1.0.2")), Guards())
    assert summary(plan) == {
        ("register", "10.1.0.5", None),
        ("deregister", "10.1.0.1", Guard.ABSENCE.value),
    }


def test_several_target_groups_are_planned_independently() -> None:
    """Each target group gets its own actions, counters and guards."""
    nodes = [node("10.1.0.1"), node("10.1.0.2")]
    plan = plan_pass(
        nodes,
        [view("10.1.0.1", "10.1.0.2"), view("10.1.0.1", arn=TG2, port=2222)],
        synced(*nodes),
        Guards(),
    )
    assert {(a.target_group, a.ip, a.port) for a in plan.actions} == {(TG2, "10.1.0.2", 2222)}


def test_unreachable_node_is_not_registered_and_waits() -> None:
    """A node whose keys could not be checked is not registered; it is reported as waiting."""
    n = node("10.1.0.1")
    plan = plan_pass([n], [view()], {n.ip: KeyVerdict.UNREACHABLE}, Guards())
    assert plan.actions == ()
    assert [w.node.ip for w in plan.waiting] == ["10.1.0.1"]
    assert not plan.converged


def test_missing_verdict_counts_as_unreachable() -> None:
    """A caller that forgets a node's verdict cannot get it registered by accident."""
    plan = plan_pass([node("10.1.0.1")], [view()], {}, Guards())
    assert plan.actions == ()


def test_unreachable_registered_node_stays_registered() -> None:
    """A registered node that is only unreachable is left to the NLB's health check, not removed."""
    n = node("10.1.0.1")
    plan = plan_pass([n], [view(n.ip)], {n.ip: KeyVerdict.UNREACHABLE}, Guards())
    assert plan.converged


def test_node_with_other_keys_is_pushed_and_registered_after_push() -> None:
    """A new node with other keys gets a key push, and its registration waits for the push."""
    n = node("10.1.0.1")
    plan = plan_pass([n], [view()], {n.ip: KeyVerdict.NEEDS_KEYS}, Guards())
    assert summary(plan) == {("push-keys", "10.1.0.1", None), ("register", "10.1.0.1", None)}
    (register,) = plan.runnable(Kind.REGISTER)
    assert register.after_push


def test_registered_node_with_wrong_keys_leaves_at_once() -> None:
    """A registered node serving the wrong identity is deregistered without the absence wait."""
    a, b = node("10.1.0.1"), node("10.1.0.2")
    plan = plan_pass(
        [a, b], [view(a.ip, b.ip)],
        {a.ip: KeyVerdict.NEEDS_KEYS, b.ip: KeyVerdict.IN_SYNC},
        Guards(max_deregister_fraction=0.0),
    )
    assert summary(plan) == {("push-keys", a.ip, None), ("deregister", a.ip, None), ("register", a.ip, None)}
    (back,) = plan.runnable(Kind.REGISTER)
    assert back.after_push


def test_wrong_keys_still_respect_min_in_service() -> None:
    """Even a wrong identity does not take the last target out (min_in_service)."""
    a = node("10.1.0.1")
    plan = plan_pass([a], [view(a.ip)], {a.ip: KeyVerdict.NEEDS_KEYS}, Guards())
    assert summary(plan) == {("push-keys", a.ip, None), ("deregister", a.ip, Guard.MIN_IN_SERVICE.value)}


def test_replaced_unreachable_node_leaves_rotation() -> None:
    """A replaced node (new instance id) that cannot be verified is taken out of rotation."""
    a, b = node("10.1.0.1", "i-new"), node("10.1.0.2")
    plan = plan_pass(
        [a, b], [view(a.ip, b.ip)],
        {a.ip: KeyVerdict.REPLACED_UNREACHABLE, b.ip: KeyVerdict.IN_SYNC}, Guards(),
    )
    assert summary(plan) == {("deregister", a.ip, None)}
    assert [w.node.ip for w in plan.waiting] == [a.ip]


def test_backing_off_node_gets_no_push_this_pass() -> None:
    """A node inside its retry backoff is not pushed to, and says so."""
    a = node("10.1.0.1")
    plan = plan_pass([a], [view()], {a.ip: KeyVerdict.NEEDS_KEYS}, Guards(),
                     backing_off={a.ip: "retry in 40 s"})
    assert summary(plan) == {("push-keys", a.ip, Guard.BACKOFF.value)}
    assert "retry in 40 s" in plan.waiting[0].reason


def test_zero_nodes_and_empty_group_is_converged() -> None:
    """No login nodes and no targets: nothing to do."""
    assert plan_pass([], [view()], {}, Guards()).converged


def test_a_thousand_nodes_are_planned_in_one_pass() -> None:
    """1,000 new nodes (NLB's per-group limit) are all registered; 1,000 absent ones are capped."""
    nodes = [node(f"10.2.{i // 250}.{i % 250 + 1}") for i in range(1000)]
    plan = plan_pass(nodes, [view()], synced(*nodes), Guards())
    assert len(plan.runnable(Kind.REGISTER)) == 1000
    gone = plan_pass([], [view(*(n.ip for n in nodes))], {}, Guards(absent_passes_before_deregister=1))
    assert len(gone.runnable(Kind.DEREGISTER)) == 500
    assert len(gone.held()) == 500
