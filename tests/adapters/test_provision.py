"""`provision` and `teardown` against moto: from nothing, again (no change), leftovers, foreign
resources, dry runs, and the config file edited without losing a comment."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from hpodlb.config import load_config
from hpodlb.provision import Provisioner, ProvisionError, Spec, add_target_group_to_config
from sim.aws import FakeAws, moto_server
from tests.support.aws import TG_ARN
from tests.support.imds import instance_metadata

REPO = Path(__file__).resolve().parents[2]


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
        yield (
            boto3.client("elbv2", region_name="us-west-2"),
            Spec("ml-cluster", vpc, (subnet,), (sg,)),
        )


def inventory(elb: Any) -> dict[str, int]:
    lbs = elb.describe_load_balancers()["LoadBalancers"]
    listeners = sum(
        len(elb.describe_listeners(LoadBalancerArn=lb["LoadBalancerArn"])["Listeners"])
        for lb in lbs
    )
    return {
        "tg": len(elb.describe_target_groups()["TargetGroups"]),
        "lb": len(lbs),
        "listener": listeners,
    }


def test_from_nothing_then_nothing_to_change(aws: tuple[Any, Spec]) -> None:
    """The first run creates group, NLB and listener with tags and attributes; the second changes nothing."""
    elb, spec = aws
    first = Provisioner(elb, spec.cluster).provision(spec)
    assert len(first.changes) == 4
    assert inventory(elb) == {"tg": 1, "lb": 1, "listener": 1}
    tg = elb.describe_target_groups(Names=["smhp-login-node-tg"])["TargetGroups"][0]
    assert (tg["TargetType"], tg["Protocol"], tg["Port"], tg["HealthCheckProtocol"]) == (
        "ip",
        "TCP",
        22,
        "TCP",
    )
    attrs = {
        a["Key"]: a["Value"]
        for a in elb.describe_target_group_attributes(TargetGroupArn=tg["TargetGroupArn"])[
            "Attributes"
        ]
    }
    assert attrs["deregistration_delay.timeout_seconds"] == "30"
    assert attrs["deregistration_delay.connection_termination.enabled"] == "false"
    lb = elb.describe_load_balancers(Names=["smhp-login-node-lb"])["LoadBalancers"][0]
    assert (lb["Scheme"], lb["Type"]) == ("internal", "network")
    tags = {
        t["Key"]: t["Value"]
        for t in elb.describe_tags(ResourceArns=[lb["LoadBalancerArn"]])["TagDescriptions"][0][
            "Tags"
        ]
    }
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
    elb.create_target_group(
        Name="smhp-login-node-tg", Protocol="TCP", Port=22, VpcId=spec.vpc_id, TargetType="ip"
    )
    with pytest.raises(
        ProvisionError, match="a target group named smhp-login-node-tg exists but is not hpodlb's"
    ):
        Provisioner(elb, spec.cluster).provision(spec)
    with pytest.raises(ProvisionError, match="refusing to touch it"):
        Provisioner(elb, spec.cluster).teardown("smhp-login-node", lambda steps: True)
    assert inventory(elb) == {"tg": 1, "lb": 0, "listener": 0}
    other = Spec(
        "other-cluster", spec.vpc_id, spec.subnet_ids, spec.security_group_ids, name_prefix="x"
    )
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

    def confirm(names: Sequence[str]) -> bool:
        asked.append(list(names))
        return True

    dry = Provisioner(elb, spec.cluster, dry_run=True).teardown("smhp-login-node", confirm)
    assert len(dry.changes) == 3
    assert asked == []
    assert inventory(elb) == {"tg": 1, "lb": 1, "listener": 1}


def test_teardown_removes_only_ours_in_order_and_asks(aws: tuple[Any, Spec]) -> None:
    """Teardown asks first; declined, nothing goes; accepted, listener, NLB, then target group go;
    an unrelated target group stays."""
    elb, spec = aws
    Provisioner(elb, spec.cluster).provision(spec)
    elb.create_target_group(
        Name="someone-else", Protocol="TCP", Port=22, VpcId=spec.vpc_id, TargetType="ip"
    )
    declined = Provisioner(elb, spec.cluster).teardown("smhp-login-node", lambda steps: False)
    assert declined.changes == []
    assert inventory(elb) == {"tg": 2, "lb": 1, "listener": 1}
    report = Provisioner(elb, spec.cluster).teardown("smhp-login-node", lambda steps: True)
    assert [c.split()[1] for c in report.changes] == ["listener", "load", "target"]
    assert [g["TargetGroupName"] for g in elb.describe_target_groups()["TargetGroups"]] == [
        "someone-else"
    ]
    assert (
        Provisioner(elb, spec.cluster).teardown("smhp-login-node", lambda steps: True).changes == []
    )


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
    assert [(tg.arn, tg.port) for tg in load_config(path, {}).target_groups] == [
        (arn, 22),
        (second, 2222),
    ]


@pytest.fixture
def server(fresh_env: None) -> Iterator[FakeAws]:
    with moto_server() as fake:
        yield fake


WOULD_DELETE = [
    "would delete listener TCP:22 of smhp-login-node-lb",
    "would delete load balancer smhp-login-node-lb",
    "would delete target group smhp-login-node-tg",
]


class Admin:
    """An admin's shell on a head node whose AWS is a moto server: a VPC, a subnet, a security
    group, the example config pointed at the fixtures, and `hpodlb` run as a process."""

    def __init__(self, server: FakeAws, tmp_path: Path, cluster_dir: Path) -> None:
        ec2 = server.client("ec2")
        vpc = ec2.create_vpc(CidrBlock="10.1.0.0/16")["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.1.64.0/18")["Subnet"]["SubnetId"]
        sg = ec2.create_security_group(GroupName="login", Description="ssh", VpcId=vpc)["GroupId"]
        self.flags = ["--vpc-id", vpc, "--subnet-id", subnet, "--security-group-id", sg]
        self.config = tmp_path / "config.toml"
        self.config.write_text(
            (REPO / "config" / "hpodlb.toml")
            .read_text()
            .replace("/opt/ml/config/", f"{cluster_dir}/")
            .replace("/var/lib/hpodlb", str(tmp_path / "state"))
            .replace("enabled = true", "enabled = false")
            .replace('leader = "slurmctld"', 'leader = "always"')
        )
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "HPODLB_"))},
            **server.env(),
        }
        self.elb = server.client("elbv2")

    def __call__(self, *args: str, stdin: int | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "hpodlb", *args, "--config", str(self.config)],
            env=self.env,
            stdin=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def load_balancers(self) -> list[str]:
        return [
            lb["LoadBalancerName"] for lb in self.elb.describe_load_balancers()["LoadBalancers"]
        ]


@pytest.fixture
def admin(server: FakeAws, tmp_path: Path, cluster_dir: Path) -> Admin:
    return Admin(server, tmp_path, cluster_dir)


def test_cli_provision_write_config_and_teardown(admin: Admin) -> None:
    """As an admin: provision --write-config, then once uses the new group; teardown without --yes
    and no terminal lists what it would delete, deletes nothing and exits 1; --yes deletes."""
    dry = admin("provision", *admin.flags, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would create target group smhp-login-node-tg" in dry.stdout
    made = admin("provision", *admin.flags, "--write-config")
    assert made.returncode == 0, made.stderr
    assert "users connect:    ssh USER@" in made.stdout
    assert "now points at the target group" in made.stdout
    again = admin("provision", *admin.flags)
    assert "nothing to change" in again.stdout
    assert admin("once").returncode == 0
    refused = admin("teardown", stdin=subprocess.DEVNULL)
    assert refused.returncode == 1
    assert refused.stdout.splitlines() == WOULD_DELETE
    assert refused.stderr.splitlines()[-1] == (
        "hpodlb: refusing to delete without --yes (standard input is not a terminal); nothing deleted"
    )
    assert "smhp-login-node-lb" in admin.load_balancers()
    gone = admin("teardown", "--yes")
    assert gone.returncode == 0, gone.stderr
    assert "deleted 3 resource(s) of cluster ml-cluster" in gone.stdout
    assert "smhp-login-node-lb" not in admin.load_balancers()
    nothing = admin("teardown")
    assert (nothing.returncode, nothing.stdout) == (0, "nothing to delete\n")


def test_cli_teardown_asks_on_a_terminal(admin: Admin) -> None:
    """On a terminal teardown says what it would delete, then asks: "n" deletes nothing and exits
    1, "y" deletes all three and exits 0."""
    assert admin("provision", *admin.flags).returncode == 0

    def teardown_answering(answer: bytes) -> subprocess.CompletedProcess[str]:
        terminal, tty = pty.openpty()
        try:
            os.write(terminal, answer)
            return admin("teardown", stdin=tty)
        finally:
            os.close(terminal)
            os.close(tty)

    declined = teardown_answering(b"n\n")
    assert declined.returncode == 1, declined.stderr
    assert declined.stdout.splitlines() == [
        *WOULD_DELETE,
        "Delete these 3 resource(s)? [y/N] nothing deleted",
    ]
    assert "smhp-login-node-lb" in admin.load_balancers()
    accepted = teardown_answering(b"y\n")
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout.splitlines() == [
        *WOULD_DELETE,
        "Delete these 3 resource(s)? [y/N] deleted 3 resource(s) of cluster ml-cluster",
    ]
    assert "smhp-login-node-lb" not in admin.load_balancers()


def test_cli_dry_run_events_say_would(admin: Admin) -> None:
    """Dry runs log each change as `would ...` with dry_run true; real runs as done, dry_run false."""

    def changes(run: subprocess.CompletedProcess[str]) -> list[tuple[str, bool]]:
        assert run.returncode == 0, run.stderr
        events = [json.loads(ln) for ln in run.stderr.splitlines()]
        return [(e["change"], e["dry_run"]) for e in events if e["event"] == "provision_change"]

    create = [
        "create target group smhp-login-node-tg (IP targets, TCP:22, TCP health checks)",
        "set target group attributes deregistration_delay.timeout_seconds=30, "
        "deregistration_delay.connection_termination.enabled=false",
        f"create internal network load balancer smhp-login-node-lb in {admin.flags[3]}",
        "create listener TCP:22 on smhp-login-node-lb forwarding to smhp-login-node-tg",
    ]
    delete = [line.removeprefix("would ") for line in WOULD_DELETE]
    assert changes(admin("provision", *admin.flags, "--dry-run")) == [
        (f"would {c}", True) for c in create
    ]
    assert changes(admin("provision", *admin.flags)) == [(c, False) for c in create]
    assert changes(admin("teardown", "--dry-run")) == [(f"would {c}", True) for c in delete]
    assert changes(admin("teardown", "--yes")) == [(c, False) for c in delete]


def test_cli_provision_takes_the_network_from_the_cluster(
    admin: Admin, server: FakeAws, cluster_dir: Path
) -> None:
    """A newcomer with a running cluster: `provision --write-config` and nothing else. The subnets
    and security groups are the cluster's VpcConfig (DescribeCluster, moto's SageMaker), the VPC
    theirs; a flag overrides its own part only; a cluster that cannot be described is a one-line
    refusal that says which flags to pass."""
    ec2 = server.client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.3.0.0/16")["Vpc"]["VpcId"]
    subnets = [
        ec2.create_subnet(
            VpcId=vpc, CidrBlock=f"10.3.{n * 64}.0/18", AvailabilityZone=f"us-west-2{z}"
        )["Subnet"]["SubnetId"]
        for n, z in enumerate("aba")
    ]  # two in one zone: an NLB takes one
    sg = ec2.create_security_group(GroupName="cluster", Description="hyperpod", VpcId=vpc)[
        "GroupId"
    ]
    arn = server.client("sagemaker").create_cluster(
        ClusterName="ml-cluster",
        InstanceGroups=[
            {
                "InstanceGroupName": "login-group",
                "InstanceType": "ml.m5.4xlarge",
                "InstanceCount": 1,
                "LifeCycleConfig": {
                    "SourceS3Uri": "s3://sagemaker-lifecycle/",
                    "OnCreate": "on_create.sh",
                },
                "ExecutionRole": "arn:aws:iam::123456789012:role/hyperpod",
                "ThreadsPerCore": 1,
            }
        ],
        VpcConfig={"SecurityGroupIds": [sg], "Subnets": subnets},
    )["ClusterArn"]
    rc = cluster_dir / "resource_config.json"
    missing = admin("provision", "--dry-run")
    assert missing.returncode == 1  # the fixture's ClusterArn names no cluster here
    assert missing.stderr.strip().endswith("pass --vpc-id, --subnet-id and --security-group-id")
    data = json.loads(rc.read_text())
    data["ClusterConfig"]["ClusterArn"] = arn
    rc.write_text(json.dumps(data))

    made = admin("provision", "--write-config")
    assert made.returncode == 0, made.stderr
    assert made.stdout.splitlines()[0] == (
        f"network (cluster {arn}'s VpcConfig (DescribeCluster)): {vpc}, subnets {', '.join(subnets[:2])}, "
        f"security groups {sg}"
    )
    assert made.stdout.splitlines()[1].startswith("note: the NLB shares these security groups")
    lb = admin.elb.describe_load_balancers(Names=["smhp-login-node-lb"])["LoadBalancers"][0]
    assert sorted(z["SubnetId"] for z in lb["AvailabilityZones"]) == sorted(subnets[:2])
    assert (lb["VpcId"], lb["Scheme"]) == (vpc, "internal")
    assert "now points at the target group" in made.stdout

    other = ec2.create_security_group(GroupName="nlb", Description="nlb", VpcId=vpc)["GroupId"]
    override = admin("provision", "--dry-run", "--security-group-id", other)
    assert override.stdout.splitlines()[0].endswith(
        f"(DescribeCluster), with --security-group-id): {vpc}, subnets {', '.join(subnets[:2])}, "
        f"security groups {other}"
    )


def test_cli_provision_without_vpc_id_takes_the_subnets_vpc(admin: Admin) -> None:
    """--subnet-id and --security-group-id without --vpc-id: the VPC is the subnets' own, as the
    help says; the cluster (which moto does not know here) is not asked."""
    vpc, subnet, sg = admin.flags[1], admin.flags[3], admin.flags[5]
    made = admin("provision", "--subnet-id", subnet, "--security-group-id", sg)
    assert made.returncode == 0, made.stderr
    assert made.stdout.splitlines()[0] == (
        f"network (the flags, and the VPC of the subnets): {vpc}, subnets {subnet}, "
        f"security groups {sg}"
    )
    lb = admin.elb.describe_load_balancers(Names=["smhp-login-node-lb"])["LoadBalancers"][0]
    assert lb["VpcId"] == vpc


def test_cli_provision_write_config_on_a_head_node_without_aws_region(
    admin: Admin, server: FakeAws
) -> None:
    """No AWS_REGION and no profile, the example config's placeholder group: the region is the
    instance metadata's (a stand-in IMDS, tests/support/imds.py); once the config points at the
    new group, the group's ARN says it, as it does for the passes; with neither, a one-line
    usage error."""
    region = "eu-central-1"  # not the placeholder's us-west-2, nor the moto fixtures'
    ec2 = FakeAws(server.endpoint_url, region).client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.7.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.7.0.0/18")["Subnet"]["SubnetId"]
    sg = ec2.create_security_group(GroupName="nlb", Description="nlb", VpcId=vpc)["GroupId"]
    flags = ["--subnet-id", subnet, "--security-group-id", sg]
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        admin.env.pop(name, None)
    admin.env["AWS_CONFIG_FILE"] = admin.env["AWS_SHARED_CREDENTIALS_FILE"] = "/nonexistent"
    with instance_metadata(f"{region}b") as endpoint:
        admin.env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = endpoint
        made = admin("provision", *flags, "--write-config")
    assert made.returncode == 0, made.stderr
    arn = next(line.split()[-1] for line in made.stdout.splitlines() if "ARN:" in line)
    assert arn.startswith(f"arn:aws:elasticloadbalancing:{region}:")
    assert load_config(admin.config, {}).target_groups[0].arn == arn

    admin.env["AWS_EC2_METADATA_DISABLED"] = "true"
    again = admin("provision", *flags)
    assert again.returncode == 0, again.stderr
    assert "nothing to change" in again.stdout
    assert admin("once").returncode == 0

    admin.config.write_text(admin.config.read_text().replace(arn, TG_ARN))  # the placeholder
    lost = admin("provision", *flags)
    assert (lost.returncode, lost.stderr.splitlines()[-1]) == (
        2,
        "hpodlb: no AWS region: pass --region, set aws.region or AWS_REGION (no target group in "
        "the config names one, and the instance metadata did not answer)",
    )
