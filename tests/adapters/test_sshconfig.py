"""`hpodlb keys ssh-config` (issue 17): the block users paste, read back by OpenSSH's own `ssh -G`,
and used for real: a strict `ssh` through a per-node alias (and through the NLB block) to a
simulated login node, with nothing but the lines of `keys known-hosts` in known_hosts. The NLB and
its target group are moto's; the errors an admin can meet are each built for real.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest

from hpodlb.cli import main
from hpodlb.inventory import LoginNode
from hpodlb.sshconfig import render
from sim.env import SimEnv
from sim.nodes import SIM_USER
from tests.support.aws import credentials_denied, enforce_iam
from tests.support.lab import nodes
from tests.support.process import run_hpodlb

REGION = "us-west-2"
REPO = Path(__file__).resolve().parents[2]
# The fixture resource config's login nodes, in its order.
LOGIN_IPS = ["10.1.71.12", "10.1.72.45", "10.1.70.201"]


def ssh_g(config: Path, host: str) -> dict[str, str]:
    """What OpenSSH makes of `host` with only `config` (`ssh -G`: resolved, nothing connects)."""
    out = subprocess.run(
        ["ssh", "-F", str(config), "-G", host],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def resolved(config: Path, host: str) -> tuple[str, str, str]:
    got = ssh_g(config, host)
    return got["hostname"], got["port"], got["hostkeyalias"]


def login_nlb(*, listener: bool = True) -> tuple[str, str]:
    """In moto: an IP target group and, with `listener`, an internal NLB forwarding to it.
    Returns (target group ARN, the NLB's DNS name or "")."""
    ec2 = boto3.client("ec2", region_name=REGION)
    elb = boto3.client("elbv2", region_name=REGION)
    vpc = ec2.create_vpc(CidrBlock="10.1.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.1.64.0/18", AvailabilityZone=f"{REGION}a")[
        "Subnet"
    ]["SubnetId"]
    tg = elb.create_target_group(
        Name="smhp-login-node-tg", Protocol="TCP", Port=22, VpcId=vpc, TargetType="ip"
    )["TargetGroups"][0]["TargetGroupArn"]
    if not listener:
        return tg, ""
    lb = elb.create_load_balancer(
        Name="smhp-login-node-lb", Subnets=[subnet], Scheme="internal", Type="network"
    )["LoadBalancers"][0]
    elb.create_listener(
        LoadBalancerArn=lb["LoadBalancerArn"],
        Protocol="TCP",
        Port=22,
        DefaultActions=[{"Type": "forward", "TargetGroupArn": tg}],
    )
    return tg, lb["DNSName"]


@pytest.fixture
def admin(
    moto_env: None,
    write_config: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> Callable[..., tuple[int, str, str]]:
    """`hpodlb ARGS --config X` in this process (moto is in-process): (status, stdout, stderr)."""

    def run(
        *args: str, tg: str, store: bool = True, **sections: dict[str, Any]
    ) -> tuple[int, str, str]:
        cfg = str(
            write_config(
                [{"arn": tg, "port": 22}],
                aws={"region": REGION},
                host_keys={"store": str(tmp_path / "host_keys")},
                **sections,
            )
        )
        if store and not (tmp_path / "host_keys").exists():
            assert main(["keys", "generate", "--config", cfg]) == 0
        capsys.readouterr()
        code = main([*args, "--config", cfg])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def errors(stderr: str) -> list[str]:
    """The command's own lines on stderr (not the JSON log events)."""
    return [line for line in stderr.splitlines() if not line.startswith("{")]


def test_the_block_resolves_in_openssh_to_the_nlb_and_each_node(
    admin: Callable[..., tuple[int, str, str]], tmp_path: Path
) -> None:
    """`ssh -G` reads the printed block as meant: NAME at the NLB's DNS name (as moto names it)
    on the listener port, NAME-i at the i-th login node's IP on ssh.port, one HostKeyAlias."""
    tg, dns = login_nlb()
    code, out, err = admin("keys", "ssh-config", "--host", "hpod-login", tg=tg, ssh={"port": 2200})
    assert code == 0, err
    config = tmp_path / "users_ssh_config"
    config.write_text(out)
    assert resolved(config, "hpod-login") == (dns, "22", "hpod-login")
    for index, ip in enumerate(LOGIN_IPS, start=1):
        assert resolved(config, f"hpod-login-{index}") == (ip, "2200", "hpod-login")
    assert ssh_g(config, "hpod-login-1")["checkhostip"] == "no"
    assert ssh_g(config, "hpod-login-4")["hostname"] == "hpod-login-4"  # no such alias
    assert "i-0a1b2c3d4e5f60012 (login-group)" in out
    assert "PRIVATE" not in out and "BEGIN" not in out

    code, out, _ = admin("keys", "ssh-config", "--host", "hpod-login", "--port", "2022", tg=tg)
    config.write_text(out)
    # The name `keys known-hosts --host hpod-login --port 2022` writes its lines under.
    assert resolved(config, "hpod-login") == (dns, "2022", "[hpod-login]:2022")
    assert resolved(config, "hpod-login-2") == (LOGIN_IPS[1], "22", "[hpod-login]:2022")
    assert "`hpodlb keys known-hosts --host hpod-login --port 2022`" in out


def test_nothing_from_the_resource_config_can_add_a_directive(tmp_path: Path) -> None:
    """An instance id with a newline and a ProxyCommand stays inside its comment."""
    node = LoginNode("10.1.71.12", "i-1\nHost *\n  ProxyCommand touch /tmp/owned", "n", "g\n!x")
    config = tmp_path / "users_ssh_config"
    config.write_text(render("hpod-login", 22, "nlb.example", [node], 22))
    assert ssh_g(config, "hpod-login-1").get("proxycommand", "none") == "none"
    assert ssh_g(config, "elsewhere").get("proxycommand", "none") == "none"
    assert "# hpod-login-1: i-1?Host?????ProxyCommand?touch??tmp?owned (g??x)" in config.read_text()


def test_the_dns_name_can_be_given_when_aws_cannot_be_asked(
    admin: Callable[..., tuple[int, str, str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The head node's role denied DescribeLoadBalancers (moto enforcing IAM): exit 1, one line
    naming the call, the permission file and --dns-name; with --dns-name it needs no AWS."""
    tg, dns = login_nlb()
    admin("keys", "show", tg=tg)  # the store, before IAM applies to this test's calls
    key = credentials_denied("elasticloadbalancing:DescribeLoadBalancers")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["aws_secret_access_key"])
    enforce_iam(monkeypatch)
    code, out, err = admin("keys", "ssh-config", "--host", "hpod-login", tg=tg)
    assert (code, out) == (1, "")
    (line,) = errors(err)
    assert line.startswith(
        "hpodlb: cannot find the NLB's DNS name: smhp-login-node-tg: DescribeLoadBalancers "
        "failed: AccessDenied: "
    )
    assert line.endswith("(config/iam-policy.json), or pass the name with --dns-name")

    code, out, err = admin("keys", "ssh-config", "--host", "hpod-login", "--dns-name", dns, tg=tg)
    assert code == 0, err
    config = tmp_path / "users_ssh_config"
    config.write_text(out)
    assert resolved(config, "hpod-login") == (dns, "22", "hpod-login")


def test_unreachable_aws_says_so_in_one_line(
    admin: Callable[..., tuple[int, str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    tg, _ = login_nlb()
    admin("keys", "show", tg=tg)
    with socket.socket() as probe:  # a port nobody listens on once closed
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    code, out, err = admin("keys", "ssh-config", "--host", "hpod-login", tg=tg)
    assert (code, out) == (1, "")
    (line,) = errors(err)
    assert "DescribeTargetGroups failed: EndpointConnectionError" in line
    assert line.endswith("or pass the name with --dns-name")


def test_a_target_group_without_a_load_balancer_is_named_with_the_fix(
    admin: Callable[..., tuple[int, str, str]],
) -> None:
    tg, _ = login_nlb(listener=False)
    code, out, err = admin("keys", "ssh-config", "--host", "hpod-login", tg=tg)
    assert (code, out) == (1, "")
    assert errors(err) == [
        "hpodlb: smhp-login-node-tg: no load balancer forwards to this target group, so users "
        "have no NLB name to reach; add a listener that forwards to it (`hpodlb provision`), or "
        "pass the name with --dns-name"
    ]


def test_without_canonical_keys_there_is_nothing_to_hand_users(
    admin: Callable[..., tuple[int, str, str]], tmp_path: Path
) -> None:
    tg, _ = login_nlb()
    (tmp_path / "host_keys").mkdir(mode=0o700)
    code, out, err = admin("keys", "ssh-config", "--host", "hpod-login", tg=tg, store=False)
    assert (code, out) == (1, "")
    assert errors(err) == [
        f"hpodlb: no host keys for users to trust: {tmp_path / 'host_keys'}: no canonical keys; "
        "run `hpodlb keys generate` or `hpodlb keys adopt --from IP`"
    ]


def test_unreadable_login_nodes_still_give_the_nlb_block(
    admin: Callable[..., tuple[int, str, str]], tmp_path: Path
) -> None:
    """Most users need only the NLB: it is printed, and exit 1 with one line says what is left
    out and why."""
    tg, dns = login_nlb()
    missing = tmp_path / "nowhere.json"
    code, out, err = admin(
        "keys",
        "ssh-config",
        "--host",
        "hpod-login",
        tg=tg,
        cluster={"resource_config": str(missing)},
    )
    assert code == 1
    assert errors(err) == [
        f"hpodlb: per-node aliases left out: the login nodes cannot be read: {missing}: "
        "file not found"
    ]
    config = tmp_path / "users_ssh_config"
    config.write_text(out)
    assert resolved(config, "hpod-login") == (dns, "22", "hpod-login")
    assert "hpod-login-1" not in out


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("hpod login", "is not a host name users can type"),
        ("hpod\nlogin", "is not a host name users can type"),
        ("hpod-*", "is not a host name users can type"),
        ("hpod?", "is not a host name users can type"),
        ("!hpod", "is not a host name users can type"),
        ("a,b", "is not a host name users can type"),
        ("%h", "is not a host name users can type"),
        ("-hpod", "is not a host name users can type"),
        ("", "is not a host name users can type"),
        ("Hpod-Login", "use lowercase (ssh lowercases a HostKeyAlias, not a Host name)"),
    ],
)
def test_a_name_unsafe_to_paste_is_a_usage_error(
    name: str, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["keys", "ssh-config", f"--host={name}"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"hpodlb keys ssh-config: error: argument --host: {name!r}: {why}"
        if why.startswith("use")
        else f"hpodlb keys ssh-config: error: argument --host: {name!r} {why}: letters a-z, digits, "
        "'.', '-', '_', starting and ending with a letter or digit"
    )


# -- a real ssh, through the printed block, to real sshd login nodes ------------------------------


def hpodlb(env: SimEnv, *args: str) -> subprocess.CompletedProcess[str]:
    """This worktree's hpodlb as a process, with the sim's AWS in its environment."""
    return run_hpodlb(
        *args, config=env.config_path, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}
    )


def strict_ssh(
    env: SimEnv, config: Path, known_hosts: Path, host: str, *options: str
) -> subprocess.CompletedProcess[str]:
    """A user's `ssh HOST` with only `config` and `known_hosts`, refusing any key not in it."""
    return subprocess.run(
        [
            "ssh",
            "-F",
            str(config),
            "-i",
            str(env.cluster.client_key),
            "-l",
            SIM_USER,
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            *options,
            host,
            "echo logged-in",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.sshd
def test_strict_ssh_through_the_block_with_the_known_hosts_lines(sim_env: SimEnv) -> None:
    """The two commands agree, on port 22 and off it: the lines of `keys known-hosts --host NAME
    [--port N]` are all a strict client needs to reach each node through its alias (the nodes'
    sshd listen on the sim's own port, not N) and a node through the NLB block (its HostName
    pointed at the node, which is what the NLB's TCP passthrough does). A wrong key under the
    right name, or lines for another port, are refused."""
    env = sim_env
    ips = nodes(env, 2)
    assert env.run_pass().converged
    elb = env.aws.client("elbv2")
    lb = elb.describe_target_groups(TargetGroupArns=[env.arn])["TargetGroups"][0][
        "LoadBalancerArns"
    ][0]
    dns = elb.describe_load_balancers(LoadBalancerArns=[lb])["LoadBalancers"][0]["DNSName"]
    config, known = env.workdir / "users_ssh_config", env.workdir / "users_known_hosts"
    port = str(env.cluster.port)

    def hand_out(*port_flag: str) -> None:
        block = hpodlb(env, "keys", "ssh-config", "--host", "hpod-login", *port_flag)
        assert block.returncode == 0, block.stderr
        config.write_text(block.stdout)
        lines = hpodlb(env, "keys", "known-hosts", "--host", "hpod-login", *port_flag)
        assert lines.returncode == 0, lines.stderr
        known.write_text(lines.stdout)

    hand_out()
    assert resolved(config, "hpod-login") == (dns, "22", "hpod-login")
    assert [resolved(config, f"hpod-login-{i}") for i in (1, 2)] == [
        (ip, port, "hpod-login") for ip in ips
    ]
    for alias in ("hpod-login-1", "hpod-login-2"):
        done = strict_ssh(env, config, known, alias)
        assert done.stdout.strip() == "logged-in", done.stderr
    via_nlb = strict_ssh(
        env, config, known, "hpod-login", "-o", f"HostName={ips[1]}", "-o", f"Port={port}"
    )
    assert via_nlb.stdout.strip() == "logged-in", via_nlb.stderr

    right = known.read_text()
    other = subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(env.workdir / "other")],
        check=True,
    )
    assert other.returncode == 0
    stranger = (env.workdir / "other.pub").read_text().split()[:2]
    known.write_text(f"hpod-login {' '.join(stranger)}\n")
    refused = strict_ssh(env, config, known, "hpod-login-1")
    assert refused.returncode == 255 and "Host key verification failed" in refused.stderr
    known.write_text(right)

    hand_out("--port", "2022")
    assert resolved(config, "hpod-login-1") == (ips[0], port, "[hpod-login]:2022")
    done = strict_ssh(env, config, known, "hpod-login-2")
    assert done.stdout.strip() == "logged-in", done.stderr
    known.write_text(right)  # the port-22 lines: ssh looks up `[hpod-login]:2022`, not these
    refused = strict_ssh(env, config, known, "hpod-login-2")
    assert refused.returncode == 255 and "Host key verification failed" in refused.stderr
