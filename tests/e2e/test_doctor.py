"""`hpodlb doctor` (issue 15): each misconfiguration of the path a user's SSH takes is built for real,
in moto (target groups, NLBs, listeners, attributes, subnets, security groups, network interfaces)
or on real sshd login nodes, and doctor must name it with its fix.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest

from hpodlb.config import load_config
from hpodlb.diagnose import Finding, Status
from hpodlb.doctor import Report, run_doctor
from hpodlb.lock import InstanceLock
from hpodlb.state import PassRecord, State, save_state
from hpodlb.wiring import build_reconciler
from sim.env import SimEnv
from tests.support.aws import credentials_denied, enforce_iam
from tests.support.lab import nodes
from tests.support.process import run_hpodlb

REGION = "us-west-2"
LOGIN_IPS = ["10.1.71.12", "10.1.72.45", "10.1.70.201"]  # the fixture resource config's
SUBNET_A = "10.1.64.0/18"
SSH_FROM_SUBNET_A: Any = {
    "IpProtocol": "tcp",
    "FromPort": 22,
    "ToPort": 22,
    "IpRanges": [{"CidrIp": SUBNET_A}],
}


@dataclass
class Cloud:
    """A login NLB built in moto the way the manual procedure builds it, and sound: every test
    breaks one thing in it and expects doctor to say so."""

    ec2: Any
    elb: Any
    vpc: str
    subnet_a: str
    login_sg: str
    tg: str
    lb: str
    listener: str


def build_cloud(
    *,
    scheme: Any = "internal",
    nlb_sg: bool = False,
    node_vpc_other: bool = False,
    extra_lb_zone: str = "",
) -> Cloud:
    ec2 = boto3.client("ec2", region_name=REGION)
    elb = boto3.client("elbv2", region_name=REGION)
    vpc = ec2.create_vpc(CidrBlock="10.1.0.0/16")["Vpc"]["VpcId"]
    subnet_a = ec2.create_subnet(VpcId=vpc, CidrBlock=SUBNET_A, AvailabilityZone=f"{REGION}a")[
        "Subnet"
    ]["SubnetId"]
    subnets = [subnet_a]
    if extra_lb_zone:
        subnets.append(
            ec2.create_subnet(VpcId=vpc, CidrBlock="10.1.192.0/20", AvailabilityZone=extra_lb_zone)[
                "Subnet"
            ]["SubnetId"]
        )
    node_vpc, node_subnet = vpc, subnet_a
    if node_vpc_other:
        node_vpc = ec2.create_vpc(CidrBlock="10.1.0.0/16")["Vpc"]["VpcId"]
        node_subnet = ec2.create_subnet(
            VpcId=node_vpc, CidrBlock=SUBNET_A, AvailabilityZone=f"{REGION}a"
        )["Subnet"]["SubnetId"]
    login_sg = ec2.create_security_group(GroupName="login", Description="login", VpcId=node_vpc)[
        "GroupId"
    ]
    ec2.authorize_security_group_ingress(GroupId=login_sg, IpPermissions=[SSH_FROM_SUBNET_A])
    for ip in LOGIN_IPS:
        ec2.create_network_interface(SubnetId=node_subnet, PrivateIpAddress=ip, Groups=[login_sg])
    tg = elb.create_target_group(
        Name="smhp-login-node-tg",
        Protocol="TCP",
        Port=22,
        VpcId=vpc,
        TargetType="ip",
        HealthCheckProtocol="TCP",
    )["TargetGroups"][0]["TargetGroupArn"]
    lb_args: dict[str, Any] = {}
    if nlb_sg:
        lb_args["SecurityGroups"] = [
            ec2.create_security_group(GroupName="nlb", Description="nlb", VpcId=vpc)["GroupId"]
        ]
    lb = elb.create_load_balancer(
        Name="smhp-login-node-lb", Subnets=subnets, Scheme=scheme, Type="network", **lb_args
    )["LoadBalancers"][0]["LoadBalancerArn"]
    listener = elb.create_listener(
        LoadBalancerArn=lb,
        Protocol="TCP",
        Port=22,
        DefaultActions=[{"Type": "forward", "TargetGroupArn": tg}],
    )["Listeners"][0]["ListenerArn"]
    elb.register_targets(TargetGroupArn=tg, Targets=[{"Id": ip, "Port": 22} for ip in LOGIN_IPS])
    return Cloud(ec2, elb, vpc, subnet_a, login_sg, tg, lb, listener)


def doctor(write_config: Callable[..., Path], cloud: Cloud, port: int = 22) -> Report:
    return run_doctor(*_config_and_reconciler(write_config, cloud.tg, port))


def _config_and_reconciler(
    write_config: Callable[..., Path], tg: str, port: int
) -> tuple[Any, Any]:
    config = load_config(write_config([{"arn": tg, "port": port}], aws={"region": REGION}), {})
    return config, build_reconciler(config)


def named(report: Report, status: Status, area: str = "") -> list[Finding]:
    return [f for f in report.findings if f.status is status and f.area.startswith(area)]


def aws_findings(report: Report) -> list[Finding]:
    """What the AWS side found: not the daemon (none runs in these tests), nor the nodes' SSH
    (host keys are off in them)."""
    return [f for f in report.findings if f.area not in ("daemon", "nodes")]


def test_a_sound_path_passes_every_aws_check(
    moto_env: None, write_config: Callable[..., Path]
) -> None:
    report = doctor(write_config, build_cloud())
    bad = [f for f in aws_findings(report) if f.status is not Status.PASS]
    assert bad == []
    found = " | ".join(f.found for f in report.findings)
    assert "(the default; not readable)" not in found  # DescribeListenerAttributes answered
    for expected in (
        "identity arn:aws:sts::123456789012:",
        "type ip, TCP, port 22",
        "in the login nodes' VPC",
        "TCP health checks on the SSH port",
        "internal, active, in us-west-2a",
        "TCP listener on port 22 forwarding to it, idle timeout 350s",
        "3/3 login nodes registered and healthy",
        "admit the NLB on 22",
        "login groups login-group (from ",
    ):
        assert expected in found, expected
    assert named(report, Status.FAIL, "daemon")[0].found.startswith(
        "no hpodlb runs on this head node"
    )
    assert report.exit_status == 1


def without_the_subnet_rule(cloud: Cloud) -> None:
    cloud.ec2.revoke_security_group_ingress(
        GroupId=cloud.login_sg, IpPermissions=[SSH_FROM_SUBNET_A]
    )


# Each: how to break the sound path, and the (status, area, words in what doctor found, in its fix).
BREAKS: dict[str, tuple[Callable[[Cloud], Any], Status, str, str, str]] = {
    "health checks over HTTP": (
        lambda c: c.elb.modify_target_group(
            TargetGroupArn=c.tg, HealthCheckProtocol="HTTP", HealthCheckPath="/"
        ),
        Status.FAIL,
        "target group",
        "health checks use HTTP",
        "set the health check protocol to TCP",
    ),
    "proxy protocol": (
        lambda c: c.elb.modify_target_group_attributes(
            TargetGroupArn=c.tg, Attributes=[{"Key": "proxy_protocol_v2.enabled", "Value": "true"}]
        ),
        Status.FAIL,
        "target group",
        "proxy protocol v2 is on",
        "proxy_protocol_v2.enabled off",
    ),
    "no listener": (
        lambda c: c.elb.delete_listener(ListenerArn=c.listener),
        Status.FAIL,
        "",
        "forwards to",
        "listener",
    ),
    "security group without the NLB": (
        without_the_subnet_rule,
        Status.FAIL,
        "node 10.1.70.201",
        "do not admit the NLB smhp-login-node-lb on TCP 22",
        f"an inbound rule: TCP 22 from {SUBNET_A} (the NLB's subnets)",
    ),
    "security group admits another port": (
        lambda c: (
            without_the_subnet_rule(c),  # type: ignore[func-returns-value]
            c.ec2.authorize_security_group_ingress(
                GroupId=c.login_sg,
                IpPermissions=[
                    {
                        "IpProtocol": "tcp",
                        "FromPort": 2222,
                        "ToPort": 2222,
                        "IpRanges": [{"CidrIp": "10.0.0.0/8"}],
                    }
                ],
            ),
        ),
        Status.FAIL,
        "node 10.1.71.12",
        "do not admit",
        "TCP 22 from",
    ),
    "sessions cut soon after a deregistration": (
        lambda c: c.elb.modify_target_group_attributes(
            TargetGroupArn=c.tg,
            Attributes=[
                {"Key": "deregistration_delay.timeout_seconds", "Value": "10"},
                {"Key": "deregistration_delay.connection_termination.enabled", "Value": "true"},
            ],
        ),
        Status.WARN,
        "target group",
        "cut 10s after it is deregistered",
        "connection_termination",
    ),
    "client IP preservation (hairpin)": (
        lambda c: c.elb.modify_target_group_attributes(
            TargetGroupArn=c.tg, Attributes=[{"Key": "preserve_client_ip.enabled", "Value": "true"}]
        ),
        Status.WARN,
        "target group",
        "hairpin",
        "preserve_client_ip.enabled off",
    ),
    "health checks off": (
        lambda c: c.elb.modify_target_group(TargetGroupArn=c.tg, HealthCheckEnabled=False),
        Status.WARN,
        "target group",
        "health checks are disabled",
        "enable TCP health checks",
    ),
    "health checks on another port": (
        lambda c: c.elb.modify_target_group(TargetGroupArn=c.tg, HealthCheckPort="2222"),
        Status.WARN,
        "target group",
        "health checks go to port 2222",
        "traffic-port",
    ),
    "listener forwarding to another group": (
        lambda c: c.elb.modify_listener(
            ListenerArn=c.listener,
            DefaultActions=[
                {
                    "Type": "forward",
                    "TargetGroupArn": c.elb.create_target_group(
                        Name="other", Protocol="TCP", Port=22, VpcId=c.vpc, TargetType="ip"
                    )["TargetGroups"][0]["TargetGroupArn"],
                }
            ],
        ),
        Status.FAIL,
        "",
        "forwards to",
        "listener",
    ),
    "a login node in a zone the NLB is not in": (
        lambda c: c.ec2.create_network_interface(
            SubnetId=c.ec2.create_subnet(
                VpcId=c.vpc, CidrBlock="10.1.160.0/20", AvailabilityZone=f"{REGION}b"
            )["Subnet"]["SubnetId"],
            PrivateIpAddress="10.1.160.9",
            Groups=[c.login_sg],
        ),
        Status.FAIL,
        "load balancer",
        "no subnet in us-west-2b, where 10.1.160.9 run",
        "add a subnet in us-west-2b",
    ),
}


@pytest.mark.parametrize("name", list(BREAKS))
def test_each_broken_part_of_the_path_is_named_with_its_fix(
    name: str, moto_env: None, write_config: Callable[..., Path], cluster_dir: Path
) -> None:
    breaker, status, area, found, fix = BREAKS[name]
    cloud = build_cloud()
    breaker(cloud)
    if "zone" in name:  # the fourth login node must be listed too
        rc = json.loads((cluster_dir / "resource_config.json").read_text())
        group = next(g for g in rc["InstanceGroups"] if g["Name"] == "login-group")
        group["Instances"].append(
            {"CustomerIpAddress": "10.1.160.9", "InstanceId": "i-0b", "InstanceName": "l4"}
        )
        (cluster_dir / "resource_config.json").write_text(json.dumps(rc))
    report = doctor(write_config, cloud)
    hits = [f for f in named(report, status, area) if found in f.found and fix in f.fix]
    assert hits, (name, [f for f in aws_findings(report) if f.status is not Status.PASS])
    if status is Status.WARN:
        assert named(report, Status.FAIL, "target group") == []


def test_an_internet_facing_nlb_fails(moto_env: None, write_config: Callable[..., Path]) -> None:
    report = doctor(write_config, build_cloud(scheme="internet-facing"))
    (hit,) = named(report, Status.FAIL, "load balancer")
    assert "scheme internet-facing: the login nodes' SSH is exposed" in hit.found


def test_an_nlb_with_security_groups_is_admitted_by_its_group_or_its_subnets(
    moto_env: None, write_config: Callable[..., Path]
) -> None:
    """An NLB with security groups sends from its private IPs, in its subnets: a rule naming its
    group or a CIDR covering its subnets admits it; without either, the fix names its group."""
    cloud = build_cloud(nlb_sg=True)
    assert named(doctor(write_config, cloud), Status.FAIL, "node ") == []  # the subnet's CIDR
    nlb_sg = cloud.elb.describe_load_balancers(LoadBalancerArns=[cloud.lb])["LoadBalancers"][0][
        "SecurityGroups"
    ][0]
    without_the_subnet_rule(cloud)
    report = doctor(write_config, cloud)
    fails = named(report, Status.FAIL, "node ")
    assert len(fails) == 3
    assert (
        fails[0].fix
        == f"add to {cloud.login_sg} an inbound rule: TCP 22 from {nlb_sg} (the NLB's security group)"
    )
    cloud.ec2.authorize_security_group_ingress(
        GroupId=cloud.login_sg,
        IpPermissions=[
            {
                "IpProtocol": "tcp",
                "FromPort": 22,
                "ToPort": 22,
                "UserIdGroupPairs": [{"GroupId": nlb_sg}],
            }
        ],
    )
    assert named(doctor(write_config, cloud), Status.FAIL, "node ") == []


def test_login_nodes_in_another_vpc_and_a_wrong_port_fail(
    moto_env: None, write_config: Callable[..., Path]
) -> None:
    cloud = build_cloud(node_vpc_other=True)
    report = doctor(write_config, cloud)
    vpc = [f for f in named(report, Status.FAIL, "target group") if "login nodes are in" in f.found]
    assert vpc and cloud.vpc in vpc[0].found
    wrong_port = doctor(write_config, cloud, port=2222)
    assert any("on the configured port 2222" in f.found for f in named(wrong_port, Status.FAIL))


def test_a_zone_without_login_nodes_is_said_not_failed(
    moto_env: None, write_config: Callable[..., Path]
) -> None:
    """The NLB drops a zone without healthy targets from DNS: worth saying, not a WARN."""
    report = doctor(write_config, build_cloud(extra_lb_zone=f"{REGION}c"))
    assert named(report, Status.WARN, "load balancer") == []
    (hit,) = [f for f in named(report, Status.PASS, "load balancer") if "internal" in f.found]
    assert "in us-west-2a, us-west-2c; no login node in us-west-2c, cross-zone off" in hit.found


def test_a_denied_read_is_named_and_what_depends_on_it_is_not_judged(
    moto_env: None, write_config: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """moto enforcing IAM, the head node's role denied ec2:DescribeSecurityGroups: one FAIL naming
    the permission and the policy file, and no verdict on any node's security groups."""
    cloud = build_cloud()
    key = credentials_denied("ec2:DescribeSecurityGroups")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["aws_secret_access_key"])
    enforce_iam(monkeypatch)
    report = doctor(write_config, cloud)
    (denied,) = named(report, Status.FAIL, "security groups")
    assert denied.found.startswith("ec2:DescribeSecurityGroups: AccessDenied:")
    assert "config/iam-policy.json" in denied.fix
    assert [f for f in report.findings if f.area.startswith("node ")] == []
    assert named(report, Status.PASS, "target group")  # the rest was still checked
    assert report.exit_status == 1


def test_security_group_rules_are_matched_as_ec2_means_them() -> None:
    """All traffic (-1), port ranges, protocol number 6, CIDRs wider than the NLB's subnets, a
    group reference; a prefix list cannot be expanded and is a WARN, never a PASS or a FAIL."""
    from hpodlb.diagnosenode import Source, security_groups

    eni = {"Groups": [{"GroupId": "sg-node"}]}
    nlb = [Source("the NLB x", ("sg-nlb",), ("10.1.64.0/18", "10.1.192.0/20"))]

    def verdict(*rules: dict[str, Any]) -> Status:
        (finding,) = security_groups(
            {"10.1.70.1": eni}, {"sg-node": {"IpPermissions": list(rules)}}, nlb, 22
        )
        return finding.status

    def cidr(proto: str, low: int, high: int, *blocks: str) -> dict[str, Any]:
        return {
            "IpProtocol": proto,
            "FromPort": low,
            "ToPort": high,
            "IpRanges": [{"CidrIp": b} for b in blocks],
        }

    assert verdict({"IpProtocol": "-1", "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}) is Status.PASS
    assert verdict(cidr("tcp", 1, 1024, "10.1.0.0/16")) is Status.PASS
    assert verdict(cidr("6", 22, 22, "10.1.64.0/18", "10.1.192.0/20")) is Status.PASS
    assert verdict(cidr("tcp", 22, 22, "10.1.64.0/18")) is Status.FAIL  # one subnet of two
    assert verdict(cidr("udp", 22, 22, "10.0.0.0/8")) is Status.FAIL
    assert verdict(cidr("tcp", 23, 1024, "10.0.0.0/8")) is Status.FAIL
    assert (
        verdict(
            {
                "IpProtocol": "tcp",
                "FromPort": 22,
                "ToPort": 22,
                "UserIdGroupPairs": [{"GroupId": "sg-nlb"}],
            }
        )
        is Status.PASS
    )
    assert (
        verdict(
            {
                "IpProtocol": "tcp",
                "FromPort": 22,
                "ToPort": 22,
                "PrefixListIds": [{"PrefixListId": "pl-1"}],
            }
        )
        is Status.WARN
    )


def test_unreachable_aws_cannot_be_evaluated(
    write_config: Callable[..., Path], fresh_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No AWS at all (a closed endpoint): exit 2, one FAIL that says where it looked."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    cfg = write_config(
        [
            {
                "arn": "arn:aws:elasticloadbalancing:us-west-2:123456789012:targetgroup/"
                "smhp-login-node-tg/0123456789abcdef",
                "port": 22,
            }
        ]
    )
    out = subprocess.run(
        [sys.executable, "-m", "hpodlb", "doctor", "--json", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 2, out.stderr
    doc = json.loads(out.stdout)
    assert doc["evaluated"] is False and doc["exit_status"] == 2
    (aws,) = [
        c for c in doc["checks"] if "EndpointConnectionError" in c["found"]
    ]  # one line, not one a call
    assert aws["status"] == "FAIL" and aws["found"].startswith(
        "sts:GetCallerIdentity: EndpointConnectionError"
    )
    assert (
        "(and 4 more calls unanswered: ec2:DescribeNetworkInterfaces, elasticloadbalancing:"
        in aws["found"]
    )


def test_the_daemon_check_reads_the_lock_and_the_last_pass(
    moto_env: None, write_config: Callable[..., Path]
) -> None:
    cloud = build_cloud()
    config, reconciler = _config_and_reconciler(write_config, cloud.tg, 22)
    state_dir = config.state.dir
    with InstanceLock(state_dir):  # a real flock holder, as `hpodlb run` is
        save_state(state_dir, State(last_pass=PassRecord(finished_at=time.time() - 5, ok=True)))
        passes = [f.found for f in named(run_doctor(config, reconciler), Status.PASS, "daemon")]
        assert passes[0] == "this head acts: cluster.leader = always"
        assert passes[1].startswith("running (pid ") and passes[1].endswith("ago converged")
        save_state(
            state_dir,
            State(
                last_pass=PassRecord(
                    finished_at=time.time() - 5, standby="standby (controller: head1)"
                )
            ),
        )
        (standby,) = [
            f
            for f in named(run_doctor(config, reconciler), Status.PASS, "daemon")
            if f.found.startswith("running")
        ]
        assert standby.found.endswith("ago: standby (controller: head1)")
        save_state(state_dir, State(last_pass=PassRecord(finished_at=time.time() - 3600, ok=True)))
        (stale,) = named(run_doctor(config, reconciler), Status.FAIL, "daemon")
        assert re.search(r"its last pass ended 360\ds ago \(interval 30s\)", stale.found), (
            stale.found
        )
    (gone,) = named(run_doctor(config, reconciler), Status.FAIL, "daemon")
    assert gone.fix == "systemctl enable --now hpodlb; journalctl -u hpodlb"


# -- the login nodes, over real SSH ---------------------------------------------------------------


def sim_path(env: SimEnv, ips: list[str], **config: dict[str, Any]) -> None:
    """Point the sim at an NLB whose group sends to the nodes' real sshd port (the sim's nodes
    listen on a free port, not 22), and give each node its network interface."""
    arn = env.aws.create_login_nlb(name=f"d{os.getpid()}{len(ips)}", port=env.cluster.port)
    env.arn, env.arns, env.tg_port = arn, [arn], env.cluster.port
    for ip in ips:
        env.aws.attach_login_node(arn, ip)
    env.write_config(**config)


def hpodlb(env: SimEnv, *args: str) -> subprocess.CompletedProcess[str]:
    return run_hpodlb(*args, config=env.config_path)


def test_doctor_passes_a_sound_simulated_cluster_with_its_daemon_running(sim_env: SimEnv) -> None:
    """Real sshd nodes, a real `hpodlb run`: no FAIL, exit 0; the node without keepalives is the
    one WARN, with the sshd_config line to add."""
    ips = nodes(sim_env, 2)
    sim_env.cluster.nodes[ips[1]].write_sshd_config("ClientAliveInterval 60\n")
    sim_env.cluster.nodes[ips[1]].reload()
    sim_path(sim_env, ips, reconcile={"interval_seconds": 5})
    daemon = subprocess.Popen(
        [sys.executable, "-m", "hpodlb", "run", "--config", str(sim_env.config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            last = sim_env.state().last_pass
            if last is not None and last.ok:
                break
            time.sleep(0.2)
        out = hpodlb(sim_env, "doctor", "--json")
        text = hpodlb(sim_env, "doctor")
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
    doc = json.loads(out.stdout)
    assert out.returncode == 0, [c for c in doc["checks"] if c["status"] != "PASS"]
    not_passed = [
        (c["area"], c["status"], c["fix"]) for c in doc["checks"] if c["status"] != "PASS"
    ]
    assert not_passed == [(f"node {ips[0]}", "WARN", "set ClientAliveInterval 60 in sshd_config")]
    found: dict[str, list[str]] = {c["area"]: [] for c in doc["checks"]}
    for c in doc["checks"]:
        found[c["area"]].append(c["found"])
    assert "presents the canonical ecdsa, ed25519, rsa keys" in found[f"node {ips[0]}"]
    assert any("keepalive every 60s (NLB idle timeout 350s)" in f for f in found[f"node {ips[1]}"])
    assert (
        text.returncode == 0
        and text.stdout.splitlines()[-1]
        == "0 FAIL, 1 WARN, " + f"{sum(c['status'] == 'PASS' for c in doc['checks'])} PASS"
    )


def test_broken_login_nodes_are_each_named(sim_env: SimEnv, tmp_path: Path) -> None:
    """Five nodes, five faults, each named with its fix: keys nobody verified (reported, and not
    logged in to), a hung sshd, sudo that wants a password, a keepalive slower than the NLB's idle
    timeout, an sshd whose own config check fails; then, through the config: the target group's
    port not sshd's, host_keys.remote_dir not where sshd reads, a login key the nodes refuse."""
    env = sim_env
    assert hpodlb(env, "keys", "generate").returncode == 0
    canonical = env.store / "current"
    stranger, slow, sudo_ip, hung_ip, broken = (env.cluster.ip(n) for n in range(2, 7))
    env.cluster.add_node(stranger, "i-0000000stranger")  # its own keys
    env.cluster.add_node(slow, "i-00000000000slow", keys_from=canonical)
    env.cluster.add_node(sudo_ip, "i-00000000000sudo", sudo_nopasswd=False, keys_from=canonical)
    env.cluster.silent_listener(hung_ip, "i-00000000000hung")
    env.cluster.add_node(broken, "i-0000000000broken", keys_from=canonical)
    env.cluster.nodes[slow].write_sshd_config("ClientAliveInterval 120\n")
    env.cluster.nodes[slow].reload()
    config = env.cluster.nodes[broken].etc_ssh / "sshd_config"
    config.write_text(config.read_text() + "NoSuchOption yes\n")  # the running sshd keeps serving
    ips = [stranger, slow, sudo_ip, hung_ip, broken]
    env.list_nodes(ips)
    sim_path(env, ips)
    elb = env.aws.client("elbv2")
    lb = elb.describe_target_groups(TargetGroupArns=[env.arn])["TargetGroups"][0][
        "LoadBalancerArns"
    ][0]
    listener = elb.describe_listeners(LoadBalancerArn=lb)["Listeners"][0]["ListenerArn"]
    elb.modify_listener_attributes(
        ListenerArn=listener, Attributes=[{"Key": "tcp.idle_timeout.seconds", "Value": "60"}]
    )

    def findings(ip: str) -> list[Finding]:
        return [
            f for f in report.findings if f.area == f"node {ip}" and f.status is not Status.PASS
        ]

    report = run_doctor(env.config, build_reconciler(env.config))
    assert [(f.status, f.found.split(":")[0]) for f in findings(stranger)] == [
        (Status.FAIL, "presents ecdsa, ed25519, rsa host keys other than the canonical ones"),
        (Status.WARN, "not logged in to"),
    ]
    assert not any(
        f.found.startswith("login as") for f in report.findings if f.area == f"node {stranger}"
    )
    assert [(f.status, f.found.split(":")[0]) for f in findings(hung_ip)] == [
        (Status.FAIL, "unreachable")
    ]
    assert "a hung sshd accepts TCP and says nothing" in findings(hung_ip)[0].fix
    (sudo,) = findings(sudo_ip)
    assert (
        sudo.found.startswith("sudo: ")
        and sudo.fix == f"give {env.config.ssh.user} passwordless sudo on the node"
    )
    (keepalive,) = findings(slow)
    assert (
        "ClientAliveInterval is 120s and the NLB drops a connection idle for 60s" in keepalive.found
    )
    assert keepalive.fix == "set ClientAliveInterval 30 in sshd_config"
    (check,) = findings(broken)
    assert check.found.startswith("sshd-T: ") and "NoSuchOption" in check.found, check.found
    assert report.exit_status == 1

    env.tg_port = 22
    env.write_config()
    report = run_doctor(env.config, build_reconciler(env.config))
    (port,) = [f for f in findings(slow) if "listens" in f.found]
    assert port.found == f"sshd listens on port {env.cluster.port}, the target group sends to 22"

    env.tg_port = env.cluster.port
    env.write_config(host_keys={"remote_dir": "/etc/ssh/hpodlb"})
    report = run_doctor(env.config, build_reconciler(env.config))
    moved = [f for f in findings(slow) if "loads none of" in f.found]
    assert moved and "/etc/ssh/hpodlb/ssh_host_rsa_key" in moved[0].found

    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True
    )
    env.write_config(ssh={"key_file": str(tmp_path / "other")})
    report = run_doctor(env.config, build_reconciler(env.config))
    (auth,) = [f for f in findings(slow) if f.found.startswith("auth")]
    assert auth.fix.startswith(f"install the public half of {tmp_path / 'other'}")


def test_sshd_pinned_by_listen_address_is_judged_where_it_listens(sim_env: SimEnv) -> None:
    """A real sshd whose port is set by `ListenAddress IP:PORT` (and an IPv6 `[::1]:PORT` beside
    it), no `Port` line: `sshd -T` still says `port 22`. doctor passes it on PORT, and fails it on
    22, where it does not listen."""
    env = sim_env
    assert hpodlb(env, "keys", "generate").returncode == 0
    ip = env.cluster.ip(2)
    env.cluster.add_node(ip, "i-0000000000pinned", keys_from=env.store / "current")
    node, port = env.cluster.nodes[ip], env.cluster.port
    node.write_sshd_config("ClientAliveInterval 60\n")  # so that doctor's line on sshd is a PASS
    config = node.etc_ssh / "sshd_config"
    config.write_text(
        config.read_text().replace(
            f"ListenAddress {ip}\nPort {port}\n",
            f"ListenAddress [::1]:{port}\nListenAddress {ip}:{port}\n",
        )
    )
    node.restart_sshd()
    env.list_nodes([ip])
    sim_path(env, [ip], host_keys={"store": str(env.store)})

    def sshd_findings() -> list[tuple[Status, str]]:
        report = run_doctor(env.config, build_reconciler(env.config))
        return [
            (f.status, f.found)
            for f in report.findings
            if f.area == f"node {ip}" and f.found.startswith("sshd ")
        ]

    said = node_sshd_t(env, ip)
    assert "port 22" in said and f"listenaddress {ip}:{port}" in said  # what misled doctor
    found = sshd_findings()
    assert [s for s, _ in found] == [Status.PASS], found
    assert found[0][1].startswith(f"sshd on port {port} with the host keys in /etc/ssh")

    env.tg_port = 22
    env.write_config()
    assert sshd_findings() == [
        (Status.FAIL, f"sshd listens on port {port}, the target group sends to 22")
    ]


def node_sshd_t(env: SimEnv, ip: str) -> str:
    """`sshd -T` as the node's sshd reads its config (in its mount namespace)."""
    keeper = (env.cluster.nodes[ip].dir / "keeper.pid").read_text().strip()
    return subprocess.run(
        ["nsenter", f"--mount=/proc/{keeper}/ns/mnt", "/usr/sbin/sshd", "-T"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_the_head_nodes_own_inputs_are_named(
    moto_env: None, write_config: Callable[..., Path], tmp_path: Path
) -> None:
    """A key store others can read and a resource config that is not there: each a FAIL naming
    the path."""
    cloud = build_cloud()
    store = tmp_path / "host_keys"
    store.mkdir(mode=0o755)
    store.chmod(0o755)
    config = load_config(
        write_config(
            [{"arn": cloud.tg, "port": 22}],
            aws={"region": REGION},
            host_keys={"enabled": True, "store": str(store), "adopt_from_first_node": False},
            ssh={"connect_timeout_seconds": 1, "port": 1},
        ),
        {},
    )
    report = run_doctor(config, build_reconciler(config))
    (keys,) = named(report, Status.FAIL, "key store")[:1]
    assert keys.found.startswith("key store: ") and str(store) in keys.found

    missing = tmp_path / "nowhere.json"
    config = load_config(
        write_config(
            [{"arn": cloud.tg, "port": 22}],
            aws={"region": REGION},
            cluster={"resource_config": str(missing)},
        ),
        {},
    )
    (inventory,) = named(run_doctor(config, build_reconciler(config)), Status.FAIL, "config")
    assert inventory.found == f"resource config: {missing}: file not found"


def test_a_node_on_the_previous_keys_during_a_rotation_is_a_warning() -> None:
    from hpodlb.diagnosenode import host_keys

    new, old = {"ed25519": "ssh-ed25519 NEW"}, {"ed25519": "ssh-ed25519 OLD"}
    assert host_keys("10.0.0.1", old, new, old).status is Status.WARN
    assert host_keys("10.0.0.1", new, new, old).status is Status.PASS
    assert host_keys("10.0.0.1", {"ed25519": "ssh-ed25519 ELSE"}, new, old).status is Status.FAIL


def test_login_nodes_not_registered_or_failing_health_checks_are_named(
    moto_env: None, write_config: Callable[..., Path]
) -> None:
    """What users meet first: a login node missing from the group, one the NLB finds unhealthy
    (AWS's reason and the fix), and a config whose aws.region is not the group's."""
    from sim.aws import nlb_health

    cloud = build_cloud()
    cloud.elb.deregister_targets(
        TargetGroupArn=cloud.tg, Targets=[{"Id": "10.1.72.45", "Port": 22}]
    )
    with nlb_health({"10.1.71.12": ("unhealthy", "Target.Timeout", "Request timed out")}):
        report = doctor(write_config, cloud)
    fails = [f.found for f in named(report, Status.FAIL, "target group")]
    assert fails == [
        "login node 10.1.71.12 (i-0a1b2c3d4e5f60011) is unhealthy (Target.Timeout: Request timed out): "
        "the NLB sends it no users",
        "login node 10.1.72.45 (i-0a1b2c3d4e5f60012) is not registered at port 22",
    ]
    assert "1/3 login nodes registered and healthy" in [f.found for f in named(report, Status.PASS)]
    timeout_fix = named(report, Status.FAIL, "target group")[0].fix
    assert "security group or network ACL" in timeout_fix

    config = load_config(
        write_config([{"arn": cloud.tg, "port": 22}], aws={"region": "eu-west-1"}), {}
    )
    wrong = run_doctor(config, build_reconciler(config))
    assert named(wrong, Status.FAIL, "config")[0].fix == (
        "set aws.region to us-west-2, or leave it empty (each ARN's own region is used)"
    )


def test_a_drained_login_node_is_a_warning_not_a_failure(
    moto_env: None, write_config: Callable[..., Path], tmp_path: Path
) -> None:
    """Out of rotation on purpose: said (so a drain nobody undid is seen), never a FAIL."""
    from hpodlb.intentmodel import DrainRequest
    from hpodlb.intents import update_intents

    cloud = build_cloud()
    cloud.elb.deregister_targets(
        TargetGroupArn=cloud.tg, Targets=[{"Id": "10.1.72.45", "Port": 22}]
    )

    def drain(intents: Any) -> None:
        intents.drain["10.1.72.45"] = DrainRequest(reason="bios update")
        intents.drain["10.1.71.12"] = DrainRequest(reason="disk")

    update_intents(tmp_path / "state", drain)
    report = doctor(write_config, cloud)
    assert not named(report, Status.FAIL, "target group")
    warned = [f.found for f in named(report, Status.WARN, "target group")]
    assert (
        "login node 10.1.72.45 (i-0a1b2c3d4e5f60012) is drained (bios update): out of rotation"
        in warned
    )
    assert (
        "login node 10.1.71.12 (i-0a1b2c3d4e5f60011) is drained (disk): still registered, leaving "
        "at the daemon's next pass"
    ) in warned
    assert "1/1 login nodes registered and healthy" in [f.found for f in named(report, Status.PASS)]
    from hpodlb.intents import update_intents as update

    def all_of_them(intents: Any) -> None:
        for ip in LOGIN_IPS:
            intents.drain[ip] = DrainRequest(reason="cluster upgrade")

    update(tmp_path / "state", all_of_them)
    everything = doctor(write_config, cloud)
    assert [f.found for f in named(everything, Status.FAIL, "target group")] == [
        "every login node is drained: the NLB has no login node to send users to"
    ]
