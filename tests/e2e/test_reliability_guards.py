"""Never a wrong AWS action (issue 10), proved through a real HTTP moto server and the real
`hpodlb` process: a target group of another kind, a malformed inventory that looks like a
shrink, a mass key change under the fraction guard, ownership under any hash seed, one bad
target in a batch, and the number of AWS attempts docs/reference.md promises.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from hpodlb.guards import WINDOW_SLACK
from hpodlb.state import load_state
from hpodlb.targets import TargetGroup, TargetsError, boto_config
from sim.aws import FakeAws, moto_server
from sim.env import SimEnv
from sim.faultproxy import FaultPlan, fault_proxy
from tests.support.daemon import Daemon, spawn_daemon, stop_daemons
from tests.support.data import FIGURES
from tests.support.lab import nodes
from tests.support.process import run_hpodlb

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
    return run_hpodlb(*args, config=config, env={**os.environ, **(env or {})})


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


def at(event: dict[str, Any]) -> float:
    """An event's own timestamp (the daemon's or the command's clock), as epoch seconds."""
    return dt.datetime.fromisoformat(event["timestamp"]).timestamp()


def events(done: subprocess.CompletedProcess[str], *names: str) -> list[dict[str, Any]]:
    """The JSON events of a finished `hpodlb` process, of these names, in order."""
    found = [json.loads(x) for x in done.stderr.splitlines() if x.startswith("{")]
    return [e for e in found if e["event"] in names]


@pytest.mark.sshd
def test_one_read_listing_instances_at_other_ips_moves_no_target(sim_env: SimEnv) -> None:
    """A resource config that, for one read, lists 2 of 4 known instances at IPs where nothing
    answers: no target is written (their old IPs wait, as absent ones do, for the new ones to be
    in service); its flap back, no write either. A real move (a node answering at the new IP)
    frees the old IP in the same pass, once the new one is verified and registered."""
    from sim.demo import resource_config

    env = sim_env
    ips = nodes(env, 4)
    assert hpodlb(env.config_path, "once").returncode == 0
    instances = {ip: env.cluster.nodes[ip].instance_id for ip in ips}
    odd = {env.cluster.ip(60): instances[ips[0]], env.cluster.ip(61): instances[ips[1]]}
    odd |= {ip: instances[ip] for ip in ips[2:]}
    env.rc.write_text(json.dumps(resource_config(odd)))
    read = hpodlb(env.config_path, "once")
    assert read.returncode == 1, read.stderr[-3000:]  # the new IPs do not verify: not converged
    assert events(read, "registered", "deregistered") == []
    held = events(read, "held_back")
    assert {e["ip"] for e in held} == set(ips[:2])
    assert all(e["guard"] == "absent_passes_before_deregister" for e in held)
    assert targets(env.aws, env.arn) == set(ips)
    env.list_nodes(ips)  # the flap back
    back = hpodlb(env.config_path, "once")
    assert back.returncode == 0, back.stderr[-3000:]
    assert events(back, "registered", "deregistered") == []
    assert targets(env.aws, env.arn) == set(ips)

    new = env.cluster.ip(62)
    env.cluster.add_node(new, instances[ips[3]])  # HyperPod moved it: it answers at the new IP
    moved = {ip: instances[ip] for ip in ips[:3]} | {new: instances[ips[3]]}
    env.rc.write_text(json.dumps(resource_config(moved)))
    done = hpodlb(env.config_path, "once")
    assert done.returncode == 0, done.stderr[-3000:]
    writes = [(e["event"], e["ip"]) for e in events(done, "registered", "deregistered")]
    assert writes == [("registered", new), ("deregistered", ips[3])]
    assert targets(env.aws, env.arn) == {*ips[:3], new}
    FIGURES["known instances listed at other IPs for one read"] = (
        "0 writes on the read and 0 on its flap back; a real move: old IP freed in the same pass, "
        "after the new one registered"
    )


def test_the_fraction_is_a_budget_per_interval_whatever_triggers_the_passes(
    aws: FakeAws, write_config: Callable[..., Path], cluster_dir: Path, tmp_path: Path
) -> None:
    """8 targets, 7 of which no login node accounts for, and a resource config rewritten every
    second (a pass each time, by the real daemon): 4 leave in the first interval, whatever
    the number of passes; a restart (`hpodlb once` after the daemon) within it deregisters
    nothing; the next interval lets 2 more go."""
    from sim.demo import resource_config

    arn = aws.create_login_nlb(name=f"t{uuid.uuid4().hex[:12]}")
    interval = 20
    config = write_config(
        [{"arn": arn, "port": 22}],
        reconcile={
            "interval_seconds": interval,
            "absent_passes_before_deregister": 1,
            "max_deregister_fraction": 0.5,
        },
    )
    rc = cluster_dir / "resource_config.json"
    text = json.dumps(resource_config({"10.1.71.12": "i-0a1b2c3d4e5f60011"}))
    rc.write_text(text)
    strays = [f"10.1.80.{n}" for n in range(1, 8)]
    aws.client("elbv2").register_targets(
        TargetGroupArn=arn, Targets=[{"Id": ip, "Port": 22} for ip in ["10.1.71.12", *strays]]
    )
    assert len(targets(aws, arn)) == 8
    started: list[Daemon] = []
    try:
        daemon = spawn_daemon(tmp_path, started, config, dict(os.environ))
        daemon.wait_event("pass_finished", timeout=60)
        for _ in range(6):  # a rewrite every second (the daemon lets it settle for half of one)
            time.sleep(1.0)
            rc.write_text(text)
        daemon.wait_event("pass_finished", timeout=30, count=5)
        left = daemon.events_named("deregistered")
        passes = daemon.events_named("pass_finished")
    finally:
        stop_daemons(started)
    # The daemon's own stamps: what happened within the first window, whatever came after.
    window_end = at(left[0]) + interval * (1 - WINDOW_SLACK)
    assert len([e for e in left if at(e) < window_end]) == 4, [e["ip"] for e in left]
    passes_within = len([e for e in passes if at(e) < window_end])
    assert passes_within >= 5
    restarted = hpodlb(config, "once")
    assert time.time() < window_end  # still within it, as the next assertions need
    assert restarted.returncode == 1  # held back, and says by what
    assert events(restarted, "deregistered") == []
    assert {e["guard"] for e in events(restarted, "held_back")} == {"max_deregister_fraction"}
    time.sleep(max(0.0, at(left[-1]) + interval - time.time()))  # the window ends
    later = hpodlb(config, "once")
    assert len(events(later, "deregistered")) == 2  # half of the 4 as this window began
    assert len(targets(aws, arn)) == 2
    FIGURES["max_deregister_fraction per interval, resource config rewritten every second"] = (
        f"8 targets: 4 left in the first {interval} s over {passes_within} daemon passes and a "
        "restart; "
        "2 more in the next interval"
    )
