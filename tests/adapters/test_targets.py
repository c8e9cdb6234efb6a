"""The target-group adapter and whole passes against moto in-process (mock_aws)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest

from hpodlb.config import load_config
from hpodlb.planner import Kind
from hpodlb.reconcile import Reconciler
from hpodlb.state import AbsenceRecord, State, load_state, save_state
from hpodlb.targets import BATCH_SIZE, TargetGroup, TargetsError
from tests.support.aws import Clock, make_group


def ips_in(elb: Any, arn: str) -> set[str]:
    reply = elb.describe_target_health(TargetGroupArn=arn)
    return {d["Target"]["Id"] for d in reply["TargetHealthDescriptions"]}


def test_register_and_deregister_in_batches(elb: Any) -> None:
    """More than 200 targets go in several calls, each at the exact port."""
    arn = make_group(elb)
    calls: list[int] = []
    elb.meta.events.register(
        "provide-client-params.elastic-load-balancing-v2.RegisterTargets",
        lambda params, **_: calls.append(len(params["Targets"])),
    )
    group = TargetGroup(elb, arn, 22)
    ips = [f"10.1.{i // 200}.{i % 200 + 1}" for i in range(450)]
    group.register(ips)
    assert calls == [BATCH_SIZE, BATCH_SIZE, 50]
    view = group.observe()
    assert {t.ip for t in view.targets} == set(ips)
    assert {t.port for t in view.targets} == {22}
    group.deregister(ips[:300])
    assert ips_in(elb, arn) == set(ips[300:])


def test_missing_target_group_is_named_with_its_error_code(elb: Any) -> None:
    """An ARN that does not exist gives TargetGroupNotFound and the group's name."""
    arn = make_group(elb).replace("smhp-login-node-tg/", "smhp-login-node-tg/f")[:-1]
    with pytest.raises(TargetsError) as err:
        TargetGroup(elb, arn, 22).observe()
    assert err.value.code == "TargetGroupNotFound"
    assert str(err.value).startswith("smhp-login-node-tg: ")
    assert "DescribeTargetHealth" in str(err.value)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def reconciler_for(
    elb: Any, write_config: Callable[..., Path], clock: Clock
) -> Callable[..., tuple[Reconciler, str]]:
    def build(arn: str | None = None, **sections: dict[str, Any]) -> tuple[Reconciler, str]:
        arn = arn or make_group(elb)
        cfg = load_config(write_config([{"arn": arn, "port": 22}], **sections), {})
        return Reconciler(
            cfg, [TargetGroup(elb, arn, 22)], keys=None, clock=clock, boot_id="b1"
        ), arn

    return build


def calls_of(rec: Reconciler) -> list[str]:
    """Every elbv2 API call the reconciler's client makes from now on, by operation name."""
    seen: list[str] = []
    rec.groups[0].client.meta.events.register(
        "before-call.elastic-load-balancing-v2.*", lambda model, **_: seen.append(model.name)
    )
    return seen


def test_pass_converges_and_second_pass_is_idle(
    elb: Any, reconciler_for: Callable[..., tuple[Reconciler, str]]
) -> None:
    """The first pass registers the fixture's login nodes; the next pass changes nothing."""
    rec, arn = reconciler_for()
    state = State()
    first = rec.run_pass(state, apply=True)
    assert first.converged, (first.errors, first.plan)
    assert ips_in(elb, arn) == {"10.1.71.12", "10.1.72.45", "10.1.70.201"}
    assert state.registered_by_us[arn] == ["10.1.70.201", "10.1.71.12", "10.1.72.45"]
    second = rec.run_pass(state, apply=True)
    assert second.converged
    assert second.applied == []


def test_dry_run_changes_nothing(
    elb: Any, reconciler_for: Callable[..., tuple[Reconciler, str]]
) -> None:
    """A pass with apply=False (what `plan` runs) writes nothing to AWS or the state."""
    rec, arn = reconciler_for()
    state = State()
    outcome = rec.run_pass(state, apply=False)
    assert outcome.plan is not None
    assert len(outcome.plan.runnable(Kind.REGISTER)) == 3
    assert ips_in(elb, arn) == set()
    assert state == State()


def test_bad_inventory_changes_nothing(
    elb: Any, reconciler_for: Callable[..., tuple[Reconciler, str]], cluster_dir: Path
) -> None:
    """A half-written resource config leaves every target in place for as many passes as it lasts."""
    rec, arn = reconciler_for(
        reconcile={
            "absent_passes_before_deregister": 1,
            "max_deregister_fraction": 1.0,
            "min_in_service": 0,
        }
    )
    state = State()
    rec.run_pass(state, apply=True)
    before = ips_in(elb, arn)
    rc = cluster_dir / "resource_config.json"
    rc.write_text(rc.read_text()[:100])
    for _ in range(3):
        outcome = rec.run_pass(state, apply=True)
        assert outcome.inventory_error and "not valid JSON" in outcome.inventory_error
        assert not outcome.converged
    assert ips_in(elb, arn) == before
    assert state.last_pass is not None and "not valid JSON" in state.last_pass.errors[0]


def test_node_leaving_is_deregistered_after_two_passes_and_two_intervals(
    elb: Any, reconciler_for: Callable[..., tuple[Reconciler, str]], cluster_dir: Path, clock: Clock
) -> None:
    """Remove one login node: a burst of passes does not remove it; 2 passes an interval apart do."""
    rec, arn = reconciler_for(reconcile={"interval_seconds": 600})
    state = State()
    rec.run_pass(state, apply=True)
    rc = cluster_dir / "resource_config.json"
    data = json.loads(rc.read_text())
    data["InstanceGroups"][1]["Instances"].pop()  # login-group-3, 10.1.70.201
    rc.write_text(json.dumps(data))
    for _ in range(3):  # three file-triggered passes 1.5 s apart
        held = rec.run_pass(state, apply=True)
        clock.advance(1.5)
        assert not held.converged
        assert "10.1.70.201" in ips_in(elb, arn)
    clock.advance(1200)
    gone = rec.run_pass(state, apply=True)
    assert [(a.kind, a.ip) for a in gone.applied] == [(Kind.DEREGISTER, "10.1.70.201")]
    assert ips_in(elb, arn) == {"10.1.71.12", "10.1.72.45"}


def test_absence_from_an_earlier_boot_does_not_count(
    elb: Any, reconciler_for: Callable[..., tuple[Reconciler, str]], cluster_dir: Path, clock: Clock
) -> None:
    """Monotonic times saved before a reboot are meaningless: the absence window starts again."""
    rec, arn = reconciler_for()
    state = State()
    rec.run_pass(state, apply=True)
    elb.register_targets(TargetGroupArn=arn, Targets=[{"Id": "10.1.99.99", "Port": 22}])
    rec.run_pass(state, apply=True)
    clock.advance(10_000)
    rec.boot_id = "b2"  # the head node rebooted in between
    rebooted = rec.run_pass(state, apply=True)
    assert "10.1.99.99" in ips_in(elb, arn)
    assert any("2/2 passes and 0/30 s" in a.reason for a in rebooted.plan.held())  # type: ignore[union-attr]
    clock.advance(30)
    rec.run_pass(state, apply=True)
    assert "10.1.99.99" not in ips_in(elb, arn)


def test_hand_added_target_is_pruned(
    elb: Any, reconciler_for: Callable[..., tuple[Reconciler, str]], clock: Clock
) -> None:
    """A target added by hand is removed once the absence guard (passes and time) has run out."""
    rec, arn = reconciler_for()
    state = State()
    rec.run_pass(state, apply=True)
    elb.register_targets(TargetGroupArn=arn, Targets=[{"Id": "10.1.99.99", "Port": 22}])
    rec.run_pass(state, apply=True)
    clock.advance(60)
    rec.run_pass(state, apply=True)
    assert "10.1.99.99" not in ips_in(elb, arn)


def test_prune_off_keeps_hand_added_target(
    elb: Any, reconciler_for: Callable[..., tuple[Reconciler, str]]
) -> None:
    """With prune = false a foreign target survives any number of passes."""
    rec, arn = reconciler_for(reconcile={"prune": False})
    elb.register_targets(TargetGroupArn=arn, Targets=[{"Id": "10.1.99.99", "Port": 22}])
    state = State()
    for _ in range(3):
        outcome = rec.run_pass(state, apply=True)
        assert outcome.converged
    assert "10.1.99.99" in ips_in(elb, arn)


def test_state_survives_a_round_trip_and_corruption(tmp_path: Path) -> None:
    """The state file round-trips; a corrupt one is replaced by an empty state with a warning."""
    state = State(absent={"tg": {"10.1.0.1": AbsenceRecord(passes=1, since=5.0)}})
    save_state(tmp_path, state)
    assert load_state(tmp_path) == (state, None)
    (tmp_path / "state.json").write_text('{"absent": ')
    fresh, warning = load_state(tmp_path)
    assert fresh == State()
    assert warning is not None and "unusable" in warning
    (tmp_path / "state.json").write_text('{"absent": {"tg": {"x": "many"}}}')
    assert load_state(tmp_path)[0] == State()


def make_instance_group(elb: Any) -> str:
    """Another service's target group: type instance, with three healthy EC2 targets."""
    ec2 = boto3.client("ec2", region_name="us-west-2")
    vpc = ec2.create_vpc(CidrBlock="10.2.0.0/16")["Vpc"]["VpcId"]
    arn = str(
        elb.create_target_group(
            Name="web-tg", Protocol="TCP", Port=22, VpcId=vpc, TargetType="instance"
        )["TargetGroups"][0]["TargetGroupArn"]
    )
    ids = [f"i-0abc{n:013d}" for n in range(3)]
    elb.register_targets(TargetGroupArn=arn, Targets=[{"Id": i} for i in ids])
    return arn


def test_a_target_group_of_the_wrong_kind_gets_no_write_at_all(
    elb: Any, reconciler_for: Callable[..., tuple[Reconciler, str]], clock: Clock
) -> None:
    """The ARN of an `instance` group, by mistake: no register, no deregister, pass not converged."""
    arn = make_instance_group(elb)
    rec, _ = reconciler_for(
        arn,
        reconcile={
            "absent_passes_before_deregister": 1,
            "min_in_service": 0,
            "max_deregister_fraction": 1.0,
        },
    )
    calls = calls_of(rec)
    before = ips_in(elb, arn)
    state = State()
    for _ in range(3):
        outcome = rec.run_pass(state, apply=True)
        clock.advance(700)
        assert not outcome.converged
        assert any(
            "web-tg: not a login target group: target type 'instance' (expected 'ip')" in e
            for e in outcome.errors
        ), outcome.errors
    assert not {"RegisterTargets", "DeregisterTargets"} & set(calls)
    assert ips_in(elb, arn) == before


@pytest.mark.parametrize(
    ("create", "expected"),
    [
        ({"Protocol": "TCP", "Port": 2222}, "port 2222 (expected 22, the configured port)"),
        ({"Protocol": "UDP", "Port": 22}, "protocol 'UDP' (expected 'TCP')"),
    ],
)
def test_a_group_on_another_port_or_protocol_is_refused(
    elb: Any,
    reconciler_for: Callable[..., tuple[Reconciler, str]],
    create: dict[str, Any],
    expected: str,
) -> None:
    """Port and protocol are checked like the type; the message says what was found and expected."""
    ec2 = boto3.client("ec2", region_name="us-west-2")
    vpc = ec2.create_vpc(CidrBlock="10.3.0.0/16")["Vpc"]["VpcId"]
    arn = elb.create_target_group(Name="other-tg", VpcId=vpc, TargetType="ip", **create)[
        "TargetGroups"
    ][0]["TargetGroupArn"]
    rec, _ = reconciler_for(arn)
    calls = calls_of(rec)
    outcome = rec.run_pass(State(), apply=True)
    assert any(expected in e for e in outcome.errors), outcome.errors
    assert "RegisterTargets" not in calls


def test_the_group_is_checked_at_start_and_every_ten_minutes_not_every_pass(
    elb: Any, reconciler_for: Callable[..., tuple[Reconciler, str]], clock: Clock
) -> None:
    """An idle pass makes one DescribeTargetHealth; DescribeTargetGroups runs at start and per 600 s."""
    rec, _ = reconciler_for()
    calls = calls_of(rec)
    state = State()
    rec.run_pass(state, apply=True)
    assert calls.count("DescribeTargetGroups") == 1
    calls.clear()
    for _ in range(5):
        clock.advance(30)
        assert rec.run_pass(state, apply=True).converged
    assert calls == ["DescribeTargetHealth"] * 5
    clock.advance(600)
    rec.run_pass(state, apply=True)
    assert calls.count("DescribeTargetGroups") == 1


def test_an_instance_that_moved_to_a_new_ip_leaves_its_old_ip_in_the_same_pass(
    elb: Any, reconciler_for: Callable[..., tuple[Reconciler, str]], cluster_dir: Path
) -> None:
    """Same InstanceId at a new IP: once the new IP is registered (in service: host keys are off
    here), the old IP's target goes in the same pass, without the absence wait."""
    rec, arn = reconciler_for()
    state = State()
    rec.run_pass(state, apply=True)
    rc = cluster_dir / "resource_config.json"
    data = json.loads(rc.read_text())
    moved = data["InstanceGroups"][1]["Instances"][0]
    old_ip, moved["CustomerIpAddress"] = moved["CustomerIpAddress"], "10.1.71.99"
    rc.write_text(json.dumps(data))
    outcome = rec.run_pass(state, apply=True)
    assert old_ip not in ips_in(elb, arn)
    assert "10.1.71.99" in ips_in(elb, arn)
    (gone,) = [a for a in outcome.applied if a.kind is Kind.DEREGISTER]
    assert gone.reason == f"instance {moved['InstanceId']} moved to 10.1.71.99, in service there"
