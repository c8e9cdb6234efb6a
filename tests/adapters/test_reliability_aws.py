"""AWS faults: throttling, 5xx, resets, slow answers, AccessDenied, TargetGroupNotFound.

Passes run through a fault-injecting proxy in front of a real moto server, while the login nodes
come and go. Nothing may crash, no desired node may be deregistered, nothing undesired registered,
no deregistration may follow a failed read, and once the faults stop the group converges.
"""

from __future__ import annotations

import io
import json
import random
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from hpodlb.config import load_config
from hpodlb.logs import setup_logging
from hpodlb.reconcile import Reconciler
from hpodlb.state import State
from hpodlb.targets import TargetGroup, boto_config
from sim.aws import FakeAws, moto_server
from sim.faultproxy import FaultPlan, fault_proxy
from tests.support.data import FIGURES

pytestmark = pytest.mark.reliability

POOL = [f"10.1.80.{i}" for i in range(1, 9)]


@pytest.fixture
def aws(fresh_env: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAws]:
    with moto_server() as fake:
        for key, value in fake.env().items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
        yield fake


def write_inventory(path: Path, ips: list[str]) -> None:
    group = {
        "Name": "login-group",
        "Instances": [
            {"CustomerIpAddress": ip, "InstanceId": f"i-{ip.replace('.', '')}"} for ip in ips
        ],
    }
    path.write_text(json.dumps({"InstanceGroups": [group]}))


@pytest.mark.slow
def test_aws_faults_cause_no_wrong_action_and_converge(
    aws: FakeAws, write_config: Callable[..., Path], cluster_dir: Path
) -> None:
    """120 passes with ~30% of AWS requests failing: 0 crashes, 0 wrong actions, then convergence."""
    arn = aws.create_login_nlb(name=f"t{uuid.uuid4().hex[:12]}")
    direct = aws.client("elbv2")
    direct.register_targets(TargetGroupArn=arn, Targets=[{"Id": "10.1.99.1", "Port": 22}])
    rc = cluster_dir / "resource_config.json"
    # A tiny interval: departed nodes leave after the absence passes, within these 120 passes.
    config = load_config(
        write_config([{"arn": arn, "port": 22}], reconcile={"interval_seconds": 0.001}), {}
    )
    plan = FaultPlan(seed=20261128)
    rng = random.Random(7)
    log = io.StringIO()
    setup_logging(stream=log)
    wrong: list[str] = []
    crashes = 0
    with fault_proxy(aws.endpoint_url, plan) as proxy:
        client = boto3.session.Session().client(
            "elbv2",
            region_name=aws.region,
            endpoint_url=proxy,
            config=boto_config(connect_timeout_seconds=1, read_timeout_seconds=1),
        )
        rec = Reconciler(config, [TargetGroup(client, arn, 22)], keys=None)
        state = State()
        passes = 120
        plan.rate = 0.3
        for n in range(passes):
            desired = sorted(rng.sample(POOL, rng.randint(2, len(POOL))))
            write_inventory(rc, desired)
            before = {ip for ip, _ in aws.targets(arn)}
            try:
                outcome = rec.run_pass(state, apply=True)
            except Exception as exc:
                crashes += 1
                wrong.append(f"pass {n}: crashed: {exc!r}")
                continue
            after = {ip for ip, _ in aws.targets(arn)}
            removed, added = before - after, after - before
            if removed & set(desired):
                wrong.append(f"pass {n}: deregistered desired {removed & set(desired)}")
            if added - set(desired):
                wrong.append(f"pass {n}: registered undesired {added - set(desired)}")
            if removed and any("DescribeTargetHealth" in e for e in outcome.errors):
                wrong.append(f"pass {n}: deregistered after a failed read")
        plan.rate = 0.0
        write_inventory(rc, POOL[:4])
        for _ in range(3):
            final = rec.run_pass(state, apply=True)
    events = [json.loads(line) for line in log.getvalue().splitlines() if line.startswith("{")]
    fault_events = [
        e
        for e in events
        if e["event"] in ("target_group_unreadable", "register_failed", "deregister_failed")
    ]
    codes = {e["code"] for e in fault_events}
    injected = sum(plan.injected.values())
    FIGURES["AWS faults injected"] = (
        f"{injected} over {plan.requests} requests in {passes} passes ({dict(plan.injected)})"
    )
    FIGURES["AWS faults that outlasted botocore's retries (logged events)"] = (
        f"{len(fault_events)} ({sorted(codes)})"
    )
    FIGURES["AWS wrong actions"] = str(len(wrong))
    assert crashes == 0
    assert wrong == []
    assert set(plan.injected) == {
        "throttle",
        "throttle-exception",
        "500",
        "503",
        "reset",
        "slow",
        "denied",
        "notfound",
    }
    assert {"AccessDenied", "TargetGroupNotFound"} <= codes
    assert all(e["target_group"] and e["code"] for e in fault_events)
    assert final.converged
    assert {ip for ip, _ in aws.targets(arn)} == set(POOL[:4])


def test_a_failed_read_never_deregisters(
    aws: FakeAws, write_config: Callable[..., Path], cluster_dir: Path
) -> None:
    """Once every DescribeTargetHealth fails, however many passes run, no write call is made and
    the stray target a clean pass already saw stays (writes themselves would get through)."""
    arn = aws.create_login_nlb(name=f"t{uuid.uuid4().hex[:12]}")
    aws.client("elbv2").register_targets(
        TargetGroupArn=arn, Targets=[{"Id": "10.1.99.1", "Port": 22}]
    )
    write_inventory(cluster_dir / "resource_config.json", [])
    # A tiny interval, so that the absence guard's time is no reason to keep the stray: only the
    # failed reads are.
    config = load_config(
        write_config(
            [{"arn": arn, "port": 22}],
            reconcile={
                "min_in_service": 0,
                "max_deregister_fraction": 1.0,
                "interval_seconds": 0.001,
            },
        ),
        {},
    )
    plan = FaultPlan(seed=1)
    plan.kinds, plan.only_actions = (
        ("denied", "notfound", "500", "throttle"),
        frozenset({"DescribeTargetHealth"}),
    )
    writes: list[str] = []
    with fault_proxy(aws.endpoint_url, plan) as proxy:
        client: Any = boto3.session.Session().client(
            "elbv2", region_name=aws.region, endpoint_url=proxy, config=boto_config(1, 1)
        )
        client.meta.events.register(
            "before-call.elastic-load-balancing-v2.*",
            lambda model, **_: (
                writes.append(model.name) if not model.name.startswith("Describe") else None
            ),
        )
        rec = Reconciler(config, [TargetGroup(client, arn, 22)], keys=None)
        state = State()
        clean = rec.run_pass(state, apply=True)  # sees the stray: absence 1 of 2, held back
        assert (clean.errors, writes) == ([], [])
        plan.rate = 1.0
        for _ in range(5):
            outcome = rec.run_pass(state, apply=True)
            assert not outcome.converged
            assert [e.split(": ")[:2] for e in outcome.errors] == [
                [arn.split("/")[1], "DescribeTargetHealth failed"]
            ]
    assert plan.injected.total() >= 5
    assert writes == []
    assert aws.targets(arn) == {("10.1.99.1", 22)}
