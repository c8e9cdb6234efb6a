"""Never a wrong AWS action (issue 10), proved through a real HTTP moto server and the real
`hpodlb` process: a target group of another kind, a malformed inventory that looks like a
shrink, a mass key change under the fraction guard, ownership under any hash seed, one bad
target in a batch, and the number of AWS attempts docs/reference.md promises.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from hpodlb.state import load_state
from hpodlb.targets import TargetGroup, TargetsError, boto_config
from sim.aws import FakeAws, moto_server
from sim.env import SimEnv
from sim.faultproxy import FaultPlan, fault_proxy
from tests.support.data import FIGURES
from tests.support.lab import nodes

pytestmark = pytest.mark.reliability


@pytest.fixture
def aws(fresh_env: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAws]:
    with moto_server() as fake:
        for key, value in fake.env().items():
            monkeypatch.setenv(key, value)
        yield fake


def hpodlb(
    config: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hpodlb", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
    )


def targets(aws: FakeAws, arn: str) -> set[str]:
    return {ip for ip, _ in aws.targets(arn)}


def test_a_target_group_of_another_service_is_never_touched(
    aws: FakeAws, write_config: Callable[..., Path]
) -> None:
    """The ARN of someone's `instance` group by mistake: 5 passes, not one target changes, each
    exits 1 naming the group, its type and what was expected."""
    ec2, elb = aws.client("ec2"), aws.client("elbv2")
    vpc = ec2.create_vpc(CidrBlock="10.2.0.0/16")["Vpc"]["VpcId"]
    arn = elb.create_target_group(
        Name=f"web-{uuid.uuid4().hex[:8]}",
        Protocol="TCP",
        Port=22,
        VpcId=vpc,
        TargetType="instance",
    )["TargetGroups"][0]["TargetGroupArn"]
    instances = [f"i-0abc{n:013d}" for n in range(3)]
    elb.register_targets(TargetGroupArn=arn, Targets=[{"Id": i} for i in instances])
    config = write_config(
        [{"arn": arn, "port": 22}],
        reconcile={
            "min_in_service": 0,
            "max_deregister_fraction": 1.0,
            "absent_passes_before_deregister": 1,
            "interval_seconds": 0.001,
        },
    )
    for _ in range(5):
        done = hpodlb(config, "once")
        assert done.returncode == 1, done.stderr
        assert "not a login target group: target type 'instance' (expected 'ip')" in done.stderr
    assert targets(aws, arn) == set(instances)
    FIGURES["wrong-kind target group"] = "5 passes, 0 targets changed"


def test_a_login_group_listed_twice_is_no_shrink(
    aws: FakeAws, write_config: Callable[..., Path], cluster_dir: Path
) -> None:
    """A second, empty entry of the login group (or a repeated key): every pass refuses the
    inventory (exit 2) and no target moves, however long it lasts."""
    arn = aws.create_login_nlb(name=f"t{uuid.uuid4().hex[:12]}")
    config = write_config([{"arn": arn, "port": 22}], reconcile={"interval_seconds": 0.001})
    assert hpodlb(config, "once").returncode == 0
    before = targets(aws, arn)
    assert len(before) == 3
    rc = cluster_dir / "resource_config.json"
    data = json.loads(rc.read_text())
    data["InstanceGroups"].append({"Name": "login-group", "Instances": []})
    rc.write_text(json.dumps(data))
    for _ in range(3):
        done = hpodlb(config, "once")
        assert done.returncode == 2
        assert "group 'login-group' is listed twice" in done.stderr
    data["InstanceGroups"].pop()
    rc.write_text(
        '{"InstanceGroups": [], ' + json.dumps(data)[1:]
    )  # the key twice, the real one last
    done = hpodlb(config, "once")
    assert done.returncode == 2 and "appears twice in one object" in done.stderr
    assert targets(aws, arn) == before
    FIGURES["login group listed twice / repeated key"] = "refused every pass, 0 targets changed"


@pytest.mark.sshd
def test_every_node_replaced_at_once_stays_within_the_fraction(sim_env: SimEnv) -> None:
    """4 registered nodes all replaced (new instances, new keys) in one go: at most half leave in
    the pass, all 4 get the canonical keys in that same pass, and all 4 are back in at its end."""
    env = sim_env
    ips = nodes(env, 4)
    assert env.run_pass().converged
    for n, ip in enumerate(ips):
        env.cluster.nodes[ip].replace(f"i-0mass{n:012d}")
    env.list_nodes(ips)
    outcome = env.run_pass()
    deregistered = [a.ip for a in outcome.applied if a.kind.value == "deregister"]
    pushed = {a.ip for a in outcome.applied if a.kind.value == "push-keys"}
    held = [a for a in outcome.plan.held() if a.kind.value == "deregister"] if outcome.plan else []
    assert len(deregistered) <= 2
    assert pushed == set(ips)
    assert targets(env.aws, env.arn) == set(ips)
    assert outcome.converged, outcome.errors
    FIGURES["mass key change, fraction 0.5"] = (
        f"{len(deregistered)} of 4 left the group, {4 - len(deregistered)} held back"
        f"{' (now settled)' if not held else ''}, 4 pushed in the same pass"
    )


@pytest.mark.sshd
@pytest.mark.parametrize("seed", ["0", "1", "2", "3", "4"])
def test_ownership_is_recorded_in_the_order_applied_under_any_hash_seed(
    sim_env: SimEnv, seed: str
) -> None:
    """A pass that deregisters and re-registers the same IP (a replacement) leaves it recorded as
    ours and registered, whatever PYTHONHASHSEED is; with prune off it is removed after it leaves."""
    env = sim_env
    env.write_config(
        reconcile={"prune": False, "interval_seconds": 0.001, "absent_passes_before_deregister": 1}
    )
    ips = nodes(env, 3)
    seeded = {"PYTHONHASHSEED": seed, "HPODLB_CONFIG": str(env.config_path)}
    first = hpodlb(env.config_path, "once", env=seeded)
    assert first.returncode == 0, first.stdout + first.stderr[-3000:]
    env.cluster.nodes[ips[2]].replace(f"i-0seed{seed:0>12}")
    env.list_nodes(ips)
    replaced = hpodlb(env.config_path, "once", env=seeded)
    assert replaced.returncode == 0, replaced.stderr
    state, _ = load_state(env.state_dir)
    assert ips[2] in state.registered_by_us[env.arn]
    assert {t.ip: t.state for t in state.targets[env.arn]}[ips[2]] != "draining"
    env.list_nodes(ips[:2])
    left = hpodlb(env.config_path, "once", env=seeded)
    assert left.returncode == 0, left.stdout + left.stderr[-3000:]
    assert targets(env.aws, env.arn) == set(ips[:2])


def test_one_refused_target_does_not_keep_the_others_out(
    aws: FakeAws, write_config: Callable[..., Path], cluster_dir: Path
) -> None:
    """AWS refuses one IP of a batch (as it does for an IP outside the VPC; moto accepts it, so a
    proxy answers as AWS does): the others are registered, the refused one is named with AWS's
    reason, and only it is tried again."""
    arn = aws.create_login_nlb(name=f"t{uuid.uuid4().hex[:12]}")
    plan = FaultPlan(seed=1)
    bad = "10.1.72.45"
    plan.invalid_targets[bad] = f"The IP address '{bad}' is not within the VPC's CIDR block"
    config = write_config([{"arn": arn, "port": 22}])
    with fault_proxy(aws.endpoint_url, plan) as proxy:
        for _ in range(2):
            done = hpodlb(config, "once", env={"AWS_ENDPOINT_URL": proxy})
            assert done.returncode == 1
            refused = [json.loads(x) for x in done.stderr.splitlines() if '"register_refused"' in x]
            assert [(e["ip"], e["reason"]) for e in refused] == [
                (bad, f"RegisterTargets failed: ValidationError: {plan.invalid_targets[bad]}")
            ]
    assert targets(aws, arn) == {"10.1.71.12", "10.1.70.201"}
    assert plan.actions["RegisterTargets"] >= 4  # each pass: the batch, then its halves


@pytest.mark.parametrize(("setting", "attempts"), [(None, 5), ("2", 2)])
def test_aws_calls_are_tried_as_often_as_documented(
    aws: FakeAws, setting: str | None, attempts: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call that always fails with 503 is tried 5 times in all (docs/reference.md's figure), or
    AWS_MAX_ATTEMPTS times, counting the first."""
    arn = aws.create_login_nlb(name=f"t{uuid.uuid4().hex[:12]}")
    if setting is None:
        monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    else:
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", setting)
    plan = FaultPlan(seed=1)
    plan.rate, plan.kinds = 1.0, ("503",)
    with fault_proxy(aws.endpoint_url, plan) as proxy:
        client: Any = boto3.session.Session().client(
            "elbv2", region_name=aws.region, endpoint_url=proxy, config=boto_config()
        )
        with pytest.raises(TargetsError, match="ServiceUnavailable"):
            TargetGroup(client, arn, 22).observe()
    assert plan.requests == attempts
    FIGURES[f"AWS attempts per failing call ({setting or 'default'})"] = str(plan.requests)
