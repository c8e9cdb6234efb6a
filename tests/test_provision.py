"""`provision` and `teardown` against moto: from nothing, again (no change), leftovers, foreign
resources, dry runs, and the config file edited without losing a comment."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from hpodlb.config import load_config
from hpodlb.provision import Provisioner, ProvisionError, Spec, add_target_group_to_config
from sim.aws import FakeAws, moto_server

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def aws(fresh_env: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Spec]]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        ec2 = boto3.client("ec2", region_name="us-west-2")
        vpc = ec2.create_vpc(CidrBlock="10.1.0.0/16")["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.1.64.0/18")["Subnet"]["SubnetId"]
        sg = ec2.create_security_group(GroupName="login", Description="ssh", VpcId=vpc)["GroupId"]
        yield boto3.client("elbv2", region_name="us-west-2"), Spec("ml-cluster", vpc, (subnet,), (sg,))


def inventory(elb: Any) -> dict[str, int]:
    lbs = elb.describe_load_balancers()["LoadBalancers"]
    listeners = sum(len(elb.describe_listeners(LoadBalancerArn=lb["LoadBalancerArn"])["Listeners"]) for lb in lbs)
    return {"tg": len(elb.describe_target_groups()["TargetGroups"]), "lb": len(lbs), "listener": listeners}


def test_from_nothing_then_nothing_to_change(aws: tuple[Any, Spec]) -> None:
    """The first run creates group, NLB and listener with tags and attributes; the second changes nothing."""
    elb, spec = aws
    first = Provisioner(elb, spec.cluster).provision(spec)
    assert len(first.changes) == 4
    assert inventory(elb) == {"tg": 1, "lb": 1, "listener": 1}
    tg = elb.describe_target_groups(Names=["smhp-login-node-tg"])["TargetGroups"][0]
    assert (tg["TargetType"], tg["Protocol"], tg["Port"], tg["HealthCheckProtocol"]) == ("ip", "TCP", 22, "TCP")
    attrs = {a["Key"]: a["Value"] for a in elb.describe_target_group_attributes(TargetGroupArn=tg["TargetGroupArn"])["Attributes"]}
    assert attrs["deregistration_delay.timeout_seconds"] == "30"
    assert attrs["deregistration_delay.connection_termination.enabled"] == "false"
    lb = elb.describe_load_balancers(Names=["smhp-login-node-lb"])["LoadBalancers"][0]
    assert (lb["Scheme"], lb["Type"]) == ("internal", "network")
    tags = {t["Key"]: t["Value"] for t in elb.describe_tags(ResourceArns=[lb["LoadBalancerArn"]])["TagDescriptions"][0]["Tags"]}
    assert tags == {"hpodlb:managed": "true", "hpodlb:cluster": "ml-cluster"}
    assert first.dns_name == lb["DNSName"]
    second = Provisioner(elb, spec.cluster).provision(spec)
    assert second.changes == []
    assert second.target_group_arn == tg["TargetGroupArn"]
    assert inventory(elb) == {"tg": 1, "lb": 1, "listener": 1}


def test_leftovers_are_completed(aws: tuple[Any, Spec]) -> None:
    """A target group left from an earlier run (no NLB yet) is reused and the rest created."""
    elb, spec = aws
    Provisioner(elb, spec.cluster).provision(spec)
    lb = elb.describe_load_balancers(Names=["smhp-login-node-lb"])["LoadBalancers"][0]
    elb.delete_load_balancer(LoadBalancerArn=lb["LoadBalancerArn"])
    report = Provisioner(elb, spec.cluster).provision(spec)
    assert [c.split()[1] for c in report.changes] == ["internal", "listener"]
    assert inventory(elb) == {"tg": 1, "lb": 1, "listener": 1}


def test_foreign_resources_are_refused(aws: tuple[Any, Spec]) -> None:
    """A same-named target group without hpodlb's tags, or another cluster's, is never touched."""
    elb, spec = aws
    elb.create_target_group(Name="smhp-login-node-tg", Protocol="TCP", Port=22, VpcId=spec.vpc_id, TargetType="ip")
    with pytest.raises(ProvisionError, match="a target group named smhp-login-node-tg exists but is not hpodlb's"):
        Provisioner(elb, spec.cluster).provision(spec)
    with pytest.raises(ProvisionError, match="refusing to touch it"):
        Provisioner(elb, spec.cluster).teardown("smhp-login-node", lambda steps: True)
    assert inventory(elb) == {"tg": 1, "lb": 0, "listener": 0}
    other = Spec("other-cluster", spec.vpc_id, spec.subnet_ids, spec.security_group_ids, name_prefix="x")
    Provisioner(elb, "other-cluster").provision(other)
    with pytest.raises(ProvisionError, match="not hpodlb's for cluster ml-cluster"):
        Provisioner(elb, "ml-cluster").teardown("x", lambda steps: True)


def test_dry_runs_change_nothing(aws: tuple[Any, Spec]) -> None:
    """Dry runs of provision and teardown say what they would do and do none of it."""
    elb, spec = aws
    report = Provisioner(elb, spec.cluster, dry_run=True).provision(spec)
    assert len(report.changes) == 4
    assert inventory(elb) == {"tg": 0, "lb": 0, "listener": 0}
    Provisioner(elb, spec.cluster).provision(spec)
    asked: list[list[str]] = []
    dry = Provisioner(elb, spec.cluster, dry_run=True).teardown("smhp-login-node", lambda s: asked.append(list(s)) or True)
    assert len(dry.changes) == 3
    assert asked == []
    assert inventory(elb) == {"tg": 1, "lb": 1, "listener": 1}


def test_teardown_removes_only_ours_in_order_and_asks(aws: tuple[Any, Spec]) -> None:
    """Teardown asks first; declined, nothing goes; accepted, listener, NLB, then target group go;
    an unrelated target group stays."""
    elb, spec = aws
    Provisioner(elb, spec.cluster).provision(spec)
    elb.create_target_group(Name="someone-else", Protocol="TCP", Port=22, VpcId=spec.vpc_id, TargetType="ip")
    declined = Provisioner(elb, spec.cluster).teardown("smhp-login-node", lambda steps: False)
    assert declined.changes == []
    assert inventory(elb) == {"tg": 2, "lb": 1, "listener": 1}
    report = Provisioner(elb, spec.cluster).teardown("smhp-login-node", lambda steps: True)
    assert [c.split()[1] for c in report.changes] == ["listener", "load", "target"]
    assert [g["TargetGroupName"] for g in elb.describe_target_groups()["TargetGroups"]] == ["someone-else"]
    assert Provisioner(elb, spec.cluster).teardown("smhp-login-node", lambda steps: True).changes == []


def test_write_config_keeps_comments(tmp_path: Path) -> None:
    """The example config's placeholder ARN is replaced in place; every comment line survives."""
    path = tmp_path / "config.toml"
    path.write_text((REPO / "config" / "hpodlb.toml").read_text())
    path.chmod(0o600)
    arn = "arn:aws:elasticloadbalancing:us-west-2:123456789012:targetgroup/smhp-login-node-tg/fedcba9876543210"
    comments = [ln for ln in path.read_text().splitlines() if ln.startswith("#")]
    assert add_target_group_to_config(path, arn, 22)
    assert [ln for ln in path.read_text().splitlines() if ln.startswith("#")] == comments
    assert [tg.arn for tg in load_config(path, {}).target_groups] == [arn]
    assert path.stat().st_mode & 0o777 == 0o600
    assert not add_target_group_to_config(path, arn, 22)
    second = arn.replace("fedcba9876543210", "0000000000000001")
    assert add_target_group_to_config(path, second, 2222)
    assert [(tg.arn, tg.port) for tg in load_config(path, {}).target_groups] == [(arn, 22), (second, 2222)]


@pytest.fixture
def server(fresh_env: None) -> Iterator[FakeAws]:
    with moto_server() as fake:
        yield fake


def test_cli_provision_write_config_and_teardown(server: FakeAws, tmp_path: Path, cluster_dir: Path) -> None:
    """As an admin: provision --write-config, then once uses the new group; teardown --yes."""
    ec2 = server.client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.1.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.1.64.0/18")["Subnet"]["SubnetId"]
    sg = ec2.create_security_group(GroupName="login", Description="ssh", VpcId=vpc)["GroupId"]
    config = tmp_path / "config.toml"
    config.write_text((REPO / "config" / "hpodlb.toml").read_text().replace(
        "/opt/ml/config/", f"{cluster_dir}/").replace("/var/lib/hpodlb", str(tmp_path / "state")).replace(
        "enabled = true", "enabled = false"))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "HPODLB_"))}, **server.env()}

    def hpodlb(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "hpodlb", *args, "--config", str(config)],
                              env=env, capture_output=True, text=True, timeout=120, check=False)

    flags = ["--vpc-id", vpc, "--subnet-id", subnet, "--security-group-id", sg]
    dry = hpodlb("provision", *flags, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would create target group smhp-login-node-tg" in dry.stdout
    made = hpodlb("provision", *flags, "--write-config")
    assert made.returncode == 0, made.stderr
    assert "users connect:    ssh USER@" in made.stdout
    assert "now points at the target group" in made.stdout
    again = hpodlb("provision", *flags)
    assert "nothing to change" in again.stdout
    assert hpodlb("once").returncode == 0
    refused = hpodlb("teardown")
    assert refused.returncode == 0 and "refusing to delete without --yes" in refused.stderr
    gone = hpodlb("teardown", "--yes")
    assert gone.returncode == 0, gone.stderr
    assert "deleted 3 resource(s) of cluster ml-cluster" in gone.stdout
    left = [lb["LoadBalancerName"] for lb in server.client("elbv2").describe_load_balancers()["LoadBalancers"]]
    assert "smhp-login-node-lb" not in left  # (moto's state is per process: other tests' LBs stay)
