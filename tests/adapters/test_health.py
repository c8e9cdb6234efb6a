"""Target health as the truth (issue 15): what the NLB says of each login node's target, since when,
what it most likely means, and what it does to the outcome (never a deregistration).

moto reports every registered IP target healthy at once, so the failing health checks are injected
into it (`sim.aws.nlb_health`); everything else is moto's answer through boto3.
"""

from __future__ import annotations

import io
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest

from hpodlb import health
from hpodlb.config import load_config
from hpodlb.logs import setup_logging
from hpodlb.planner import Target
from hpodlb.reconcile import Reconciler
from hpodlb.service import summary_line
from hpodlb.state import NodeRecord, State, TargetRecord, load_state
from hpodlb.targets import TargetGroup
from sim.aws import FakeAws, nlb_health
from tests.support.aws import Clock
from tests.support.process import run_hpodlb

NODES = ["10.1.70.201", "10.1.71.12", "10.1.72.45"]  # the fixture's login nodes
FAILING = ("unhealthy", "Target.FailedHealthChecks", "Health checks failed")


# -- the pure part --------------------------------------------------------------------------------


def test_since_carries_while_the_state_holds_and_restarts_when_it_changes() -> None:
    first = health.track(
        [], [Target("10.0.0.1", 22, "initial", "Elb.RegistrationInProgress")], 100, 5000
    )
    same = health.track(first, [Target("10.0.0.1", 22, "initial")], 130, 5030)
    assert (same[0].since_mono, same[0].since) == (100, 5000)
    changed = health.track(same, [Target("10.0.0.1", 22, "unhealthy", "Target.Timeout")], 160, 5060)
    assert (changed[0].since_mono, changed[0].since, changed[0].reason) == (
        160,
        5060,
        "Target.Timeout",
    )


def test_overdue_counts_login_nodes_not_healthy_past_the_window_only() -> None:
    records = [
        TargetRecord(ip="10.0.0.1", port=22, state="unhealthy", since_mono=0),  # overdue
        TargetRecord(ip="10.0.0.2", port=22, state="unhealthy", since_mono=50),  # within window
        TargetRecord(ip="10.0.0.3", port=22, state="healthy", since_mono=0),
        TargetRecord(ip="10.0.0.4", port=22, state="draining", since_mono=0),  # leaving
        TargetRecord(ip="10.9.9.9", port=22, state="unused", since_mono=0),  # not a login node
        TargetRecord(ip="10.0.0.5", port=22, state="unused", since_mono=0),  # AZ not enabled
    ]
    logins = {"10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"}
    late = health.overdue(records, logins, window=60, now=100)
    assert [r.ip for r in late] == ["10.0.0.1", "10.0.0.5"]
    assert (
        health.window_seconds({"HealthCheckIntervalSeconds": 10, "HealthyThresholdCount": 3}) == 30
    )
    assert health.window_seconds({}) == 150  # the NLB's defaults: 30 s x 5
    assert "security group" in health.likely_fix("Target.FailedHealthChecks")
    assert "Availability Zone" in health.likely_fix("Target.NotInUse")


def test_headline_counts_nodes_healthy_in_every_group_with_verified_keys() -> None:
    state = State(nodes={ip: NodeRecord(key_state="in-sync") for ip in NODES})
    state.nodes[NODES[2]].key_state = "unknown-keys"
    state.targets = {
        "a": [TargetRecord(ip=ip, port=22, state="healthy") for ip in NODES],
        "b": [
            TargetRecord(ip=NODES[0], port=22, state="healthy"),
            TargetRecord(ip=NODES[1], port=22, state="initial"),
        ],
    }
    assert health.headline(state, ["a", "b"]) == (
        "1/3 login nodes healthy (1 more registered, not healthy yet)"
    )
    assert health.headline(state, ["a"]) == "2/3 login nodes healthy"


# -- whole passes against moto --------------------------------------------------------------------


def group_with_health_checks(elb: Any, interval: int = 10, threshold: int = 3) -> str:
    ec2 = boto3.client("ec2", region_name="us-west-2")
    vpc = ec2.create_vpc(CidrBlock="10.1.0.0/16")["Vpc"]["VpcId"]
    return str(
        elb.create_target_group(
            Name="smhp-login-node-tg",
            Protocol="TCP",
            Port=22,
            VpcId=vpc,
            TargetType="ip",
            HealthCheckProtocol="TCP",
            HealthCheckIntervalSeconds=interval,
            HealthyThresholdCount=threshold,
        )["TargetGroups"][0]["TargetGroupArn"]
    )


def reconciler(elb: Any, write_config: Callable[..., Path]) -> tuple[Reconciler, Clock, str]:
    """Host keys off, a clock the test moves: passes as the daemon runs them, minus the waiting."""
    arn = group_with_health_checks(elb)
    cfg = load_config(write_config([{"arn": arn, "port": 22}]), {})
    clock = Clock()
    rec = Reconciler(
        cfg, [TargetGroup(elb, arn, 22)], keys=None, clock=clock, wall=clock, boot_id="b"
    )
    return rec, clock, arn


def test_a_target_unhealthy_past_its_window_is_reported_once_and_never_deregistered(
    elb: Any, write_config: Callable[..., Path], tmp_path: Path
) -> None:
    """Health checks failing on one login node (window: 10 s x 3): within the window the pass
    converges; past it the pass is not converged, names the node, AWS's reason and the fix, logs one
    warning however many passes it lasts, and the target stays registered; healed, it converges."""
    rec, clock, arn = reconciler(elb, write_config)
    state = State()
    stream = io.StringIO()
    setup_logging(verbose=False, stream=stream)
    assert rec.run_pass(state, apply=True).converged  # registers the three login nodes
    with nlb_health({NODES[1]: FAILING}):
        clock.advance(5)
        early = rec.run_pass(state, apply=True)
        assert early.converged and early.unhealthy == []
        late = []
        for _ in range(3):
            clock.advance(31)
            late.append(rec.run_pass(state, apply=True))
        assert [o.converged for o in late] == [False, False, False]
        assert late[0].errors == [] and late[0].applied == []
        (line,) = late[0].unhealthy
        assert line.startswith(
            f"{NODES[1]} (i-0a1b2c3d4e5f60011) on smhp-login-node-tg: unhealthy "
            "(Target.FailedHealthChecks: Health checks failed) for 31s (health-check "
            "window 30s); likely fix: the NLB's health checks fail"
        )
        registered = {
            d["Target"]["Id"]
            for d in elb.describe_target_health(TargetGroupArn=arn)["TargetHealthDescriptions"]
        }
        assert registered == set(NODES)
        assert summary_line(state, late[-1], rec.config).startswith(
            "2/3 login nodes healthy (1 more registered, not healthy yet), 0 pending, "
            "1 targets unhealthy too long, 0 errors"
        )
        assert state.last_pass is not None and state.last_pass.unhealthy == late[-1].unhealthy
    clock.advance(20)
    healed = rec.run_pass(state, apply=True)
    assert healed.converged
    logged = [json.loads(x) for x in stream.getvalue().splitlines()]
    warnings = [e for e in logged if e["event"] == "target_unhealthy"]
    assert len(warnings) == 1
    assert {k: warnings[0][k] for k in ("ip", "instance_id", "reason", "window_seconds")} == {
        "ip": NODES[1],
        "instance_id": "i-0a1b2c3d4e5f60011",
        "reason": "Target.FailedHealthChecks",
        "window_seconds": 30.0,
    }
    assert [e["ip"] for e in logged if e["event"] == "target_healthy_again"] == [NODES[1]]


def test_every_target_unhealthy_empties_nothing(
    elb: Any, write_config: Callable[..., Path]
) -> None:
    """A security-group mistake makes every target fail: passes go on reporting, and the group
    keeps every target (health never triggers a deregistration)."""
    rec, clock, arn = reconciler(elb, write_config)
    state = State()
    rec.run_pass(state, apply=True)
    with nlb_health(dict.fromkeys(NODES, ("unhealthy", "Target.Timeout", "Request timed out"))):
        for _ in range(4):
            clock.advance(31)
            outcome = rec.run_pass(state, apply=True)
            assert outcome.applied == []
    assert len(outcome.unhealthy) == 3 and not outcome.converged
    assert len(elb.describe_target_health(TargetGroupArn=arn)["TargetHealthDescriptions"]) == 3


def hpodlb(*args: str) -> subprocess.CompletedProcess[str]:
    return run_hpodlb(*args)


def test_status_shows_health_with_reason_and_live_asks_aws_now(
    aws: FakeAws, arn: str, write_config: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`status` shows what the last pass saw (state, AWS's reason, since when); `status --live`
    shows what the NLB says now, without writing the state file."""
    for key, value in aws.env().items():
        monkeypatch.setenv(key, value)
    cfg = write_config([{"arn": arn, "port": 22}])
    assert hpodlb("once", "--config", str(cfg)).returncode == 0
    tg = arn.split("/")[1]
    before = load_state(load_config(cfg, {}).state.dir)[0]
    with nlb_health(
        {
            NODES[0]: (
                "unused",
                "Target.NotInUse",
                "Target group is not configured to receive traffic from the load balancer",
            )
        }
    ):
        stored = hpodlb("status", "--config", str(cfg)).stdout.splitlines()
        assert stored[1] == "0/3 login nodes healthy (3 more registered, not healthy yet)"
        live = hpodlb("status", "--live", "--config", str(cfg)).stdout.splitlines()
        doc = json.loads(hpodlb("status", "--live", "--json", "--config", str(cfg)).stdout)
    assert live[1] == "2/3 login nodes healthy (1 more registered, not healthy yet)"
    assert tg in live[2].split()
    cells = {row.split()[0]: row for row in live[3:6]}
    assert "  unused (Target.NotInUse) for " in cells[NODES[0]]
    assert "  healthy  " in cells[NODES[1]] and "initial" not in cells[NODES[1]]
    by_ip = {n["ip"]: n for n in doc["nodes"]}
    assert by_ip[NODES[0]]["health"][arn]["reason"] == "Target.NotInUse"
    assert by_ip[NODES[0]]["targets"][arn] == "unused"
    assert by_ip[NODES[1]]["health"][arn]["state"] == "healthy"
    assert load_state(load_config(cfg, {}).state.dir)[0] == before  # --live wrote nothing


def test_unhealthy_draining_is_registered_again_and_never_converged_and_checks_off_serves(
    elb: Any, write_config: Callable[..., Path]
) -> None:
    """`unhealthy.draining` is a target leaving the group while failing its checks (issue 23,
    item 7): each pass registers the login node again, counts it out of service, and does not
    converge, naming it; `unavailable` because health checks are off is how AWS says it sends
    to every target: serving, never "unhealthy too long", nothing done to it."""
    rec, clock, arn = reconciler(elb, write_config)
    state = State()
    rec.run_pass(state, apply=True)
    with nlb_health(
        {
            NODES[0]: ("unhealthy.draining", "Target.FailedHealthChecks", "Health checks failed"),
            NODES[1]: ("unavailable", "Target.HealthCheckDisabled", "Health checks disabled"),
        }
    ):
        for _ in range(3):
            clock.advance(31)
            outcome = rec.run_pass(state, apply=True)
            assert [(a.kind.value, a.ip) for a in outcome.applied] == [("register", NODES[0])]
            assert not outcome.converged
            assert state.last_pass is not None and not state.last_pass.ok
            (waiting,) = state.last_pass.waiting
            assert waiting.startswith(NODES[0]) and "was unhealthy.draining" in waiting
    assert (
        health.headline(state, [arn])
        == "2/3 login nodes healthy (1 more registered, not healthy yet)"
    )


def test_status_live_says_when_aws_did_not_answer(
    aws: FakeAws, arn: str, write_config: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`status --live` with AWS unreachable still shows the last pass's view, and says that the
    health shown is not live."""
    for key, value in aws.env().items():
        monkeypatch.setenv(key, value)
    cfg = write_config([{"arn": arn, "port": 22}])
    assert hpodlb("once", "--config", str(cfg)).returncode == 0
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    live = hpodlb("status", "--live", "--config", str(cfg))
    assert live.returncode == 0
    assert any(
        line.startswith(f"target group {arn.split('/')[1]}: ")
        and line.endswith("(asked live: the health shown for this group is the last pass's)")
        for line in live.stdout.splitlines()
    ), live.stdout
