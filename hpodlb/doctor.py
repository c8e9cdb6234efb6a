"""`hpodlb doctor`: gather what the path of a user's SSH depends on, and let `diagnose` judge it.

The first thing to run when users say "I can't log in". Read-only everywhere: AWS Describe calls,
an SSH handshake per key type and one `sshd -T` per login node (nothing is sent to a node but the
login), the key store and the state file. AWS is read on this thread while the nodes are checked on
a pool, so 50 nodes answer in a few seconds; every call is bounded (botocore's timeouts, the SSH
connector's deadlines). A call that fails is a FAIL naming the permission or the node, never a
traceback, and the checks that do not depend on it still run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from hpodlb import diagnose
from hpodlb.checks import check_host_keys, check_inventory
from hpodlb.config import Config
from hpodlb.diagnose import Finding, Status, fail, passed, warn
from hpodlb.inventory import InventoryError, LoginNode
from hpodlb.keystore import KeyStore, KeyStoreError
from hpodlb.lock import lock_holder
from hpodlb.reconcile import Reconciler
from hpodlb.state import load_state

WORKERS = 8
FILTER_VALUES = 200  # EC2 takes at most this many values in one filter
SSHD_T = b"PATH=$PATH:/usr/sbin:/sbin; sshd -T 2>&1\n"
IAM_FIX = "grant it to the head node's role (config/iam-policy.json lists what hpodlb needs)"
STALE_INTERVALS = 3  # no pass for this many intervals: the daemon is stuck or stopped


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    evaluated: bool = True  # False: AWS could not be reached at all; most checks are missing

    @property
    def exit_status(self) -> int:
        if not self.evaluated:
            return 2
        return 1 if diagnose.verdict(self.findings) is Status.FAIL else 0


def run_doctor(
    config: Config, reconciler: Reconciler, wall: Callable[[], float] = time.time
) -> Report:
    report = Report([passed("config", "the config file is valid")])
    report.findings += [
        passed("config", line) if ok else fail("config", line, "fix the file or key named")
        for ok, line in check_inventory(config, reconciler)
    ]
    try:
        nodes = reconciler.desired()
    except InventoryError:
        nodes = ()  # said above
    with ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="hpodlb-doctor") as pool:
        ssh = _start_node_checks(pool, config, reconciler, nodes)
        aws = _Aws(config, reconciler)
        report.findings += aws.check(nodes)
        report.evaluated = aws.reachable
        report.findings += _judge_nodes(config, nodes, ssh, aws.idle_timeout)
    report.findings += _key_store(config)
    report.findings += _daemon(config, wall())
    return report


def render_text(report: Report) -> str:
    width = max(len(f.area) for f in report.findings)
    lines = []
    for f in report.findings:
        lines.append(f"{f.status.value}  {f.area.ljust(width)}  {f.found}")
        if f.fix and f.status is not Status.PASS:
            lines.append(f"{'':4}  {'':{width}}  fix: {f.fix}")
    counts = {s: sum(1 for f in report.findings if f.status is s) for s in Status}
    lines.append(
        f"{counts[Status.FAIL]} FAIL, {counts[Status.WARN]} WARN, {counts[Status.PASS]} PASS"
        + ("" if report.evaluated else "; AWS could not be reached: most checks did not run")
    )
    return "\n".join(lines)


def render_json(report: Report) -> str:
    return json.dumps(
        {
            "verdict": diagnose.verdict(report.findings).value,
            "evaluated": report.evaluated,
            "exit_status": report.exit_status,
            "checks": [f.as_dict() for f in report.findings],
        },
        indent=2,
    )


# -- AWS ---------------------------------------------------------------------------------------


class _Aws:
    """AWS's side of the path, read once per doctor run; `reachable` false: no identity at all."""

    def __init__(self, config: Config, reconciler: Reconciler) -> None:
        import boto3

        from hpodlb.targets import boto_config

        self.config = config
        self.groups = reconciler.groups
        region = config.aws.region or (
            config.target_groups[0].region if config.target_groups else ""
        )
        session = boto3.session.Session()
        self.region = region
        self.ec2 = session.client("ec2", region_name=region, config=boto_config())
        self.sts = session.client("sts", region_name=region, config=boto_config())
        self.reachable = True
        self.idle_timeout: int | None = None
        self.findings: list[Finding] = []

    def check(self, nodes: Sequence[LoginNode]) -> list[Finding]:
        me = self._ask("aws", "sts:GetCallerIdentity", self.sts.get_caller_identity)
        if me is None:
            self.reachable = False
            return self.findings
        self.findings.append(passed("aws", f"identity {me.get('Arn', '?')}, region {self.region}"))
        enis = self._enis([n.ip for n in nodes])
        timeouts = []
        for group in self.groups:
            timeout = self._target_group(group.client, group.arn, group.port, enis)
            if timeout is not None:
                timeouts.append(timeout)
        self.idle_timeout = min(timeouts) if timeouts else None
        return self.findings

    def _ask(self, area: str, permission: str, call: Callable[..., Any], **kwargs: Any) -> Any:
        """One read; a failure is a FAIL naming the permission (or the transport's error)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return call(**kwargs)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = error.get("Code", "Unknown")
            denied = "Denied" in code or "Unauthorized" in code
            self.findings.append(
                fail(
                    area,
                    f"{permission}: {code}: {error.get('Message', '')}".rstrip(": "),
                    IAM_FIX if denied else "see the AWS error above",
                )
            )
        except BotoCoreError as exc:
            self.findings.append(
                fail(
                    area,
                    f"{permission}: {type(exc).__name__}: {exc}",
                    "check credentials (the instance role), the region, and the network path to "
                    "AWS (AWS_ENDPOINT_URL, VPC endpoints)",
                )
            )
        return None

    def _enis(self, ips: Sequence[str]) -> dict[str, dict[str, Any] | None]:
        found: dict[str, dict[str, Any] | None] = dict.fromkeys(ips)
        for start in range(0, len(ips), FILTER_VALUES):
            reply = self._ask(
                "security groups",
                "ec2:DescribeNetworkInterfaces",
                self.ec2.describe_network_interfaces,
                Filters=[
                    {
                        "Name": "addresses.private-ip-address",
                        "Values": list(ips[start : start + FILTER_VALUES]),
                    }
                ],
            )
            for eni in (reply or {}).get("NetworkInterfaces", []):
                for address in eni.get("PrivateIpAddresses", []):
                    if address.get("PrivateIpAddress") in found:
                        found[address["PrivateIpAddress"]] = eni
        return found

    def _target_group(
        self, elb: Any, arn: str, port: int, enis: dict[str, dict[str, Any] | None]
    ) -> int | None:
        from hpodlb.config import target_group_name

        name = target_group_name(arn)
        area = f"target group {name}"
        reply = self._ask(
            area,
            "elasticloadbalancing:DescribeTargetGroups",
            elb.describe_target_groups,
            TargetGroupArns=[arn],
        )
        health = self._ask(
            area,
            "elasticloadbalancing:DescribeTargetHealth",
            elb.describe_target_health,
            TargetGroupArn=arn,
        )
        attrs = self._ask(
            area,
            "elasticloadbalancing:DescribeTargetGroupAttributes",
            elb.describe_target_group_attributes,
            TargetGroupArn=arn,
        )
        if not reply or not reply.get("TargetGroups"):
            return None
        info = reply["TargetGroups"][0]
        if health is not None:
            count = len(health.get("TargetHealthDescriptions", []))
            self.findings.append(passed(area, f"targets readable ({count} now)"))
        vpcs = [e["VpcId"] for e in enis.values() if e and e.get("VpcId")]
        self.findings += diagnose.target_group(info, diagnose.attributes(attrs or {}), port, vpcs)
        lbs = self._load_balancers(area, elb, info.get("LoadBalancerArns", []))
        zones = {ip: e.get("AvailabilityZone", "") for ip, e in enis.items() if e}
        lb_attrs, listeners, listener_attrs = self._lb_details(area, elb, lbs)
        found, timeout = diagnose.load_balancers(
            arn, name, lbs, lb_attrs, listeners, listener_attrs, zones
        )
        self.findings += found
        if lbs:
            self.findings += diagnose.security_groups(
                enis, self._security_groups(enis), self._sources(lbs), port
            )
        return timeout

    def _load_balancers(self, area: str, elb: Any, arns: list[str]) -> list[dict[str, Any]]:
        if not arns:
            return []
        reply = self._ask(
            area,
            "elasticloadbalancing:DescribeLoadBalancers",
            elb.describe_load_balancers,
            LoadBalancerArns=arns,
        )
        return list((reply or {}).get("LoadBalancers", []))

    def _lb_details(
        self, area: str, elb: Any, lbs: list[dict[str, Any]]
    ) -> tuple[dict[str, dict[str, str]], dict[str, list[Any]], dict[str, dict[str, str]]]:
        lb_attrs: dict[str, dict[str, str]] = {}
        listeners: dict[str, list[Any]] = {}
        listener_attrs: dict[str, dict[str, str]] = {}
        for lb in lbs:
            arn = lb["LoadBalancerArn"]
            attrs = self._ask(
                area,
                "elasticloadbalancing:DescribeLoadBalancerAttributes",
                elb.describe_load_balancer_attributes,
                LoadBalancerArn=arn,
            )
            lb_attrs[arn] = diagnose.attributes(attrs or {})
            reply = self._ask(
                area,
                "elasticloadbalancing:DescribeListeners",
                elb.describe_listeners,
                LoadBalancerArn=arn,
            )
            listeners[arn] = list((reply or {}).get("Listeners", []))
            for listener in listeners[arn]:
                read = getattr(elb, "describe_listener_attributes", None)  # boto3 >= 1.35
                got = read and self._ask(
                    area,
                    "elasticloadbalancing:DescribeListenerAttributes",
                    read,
                    ListenerArn=listener["ListenerArn"],
                )
                listener_attrs[listener["ListenerArn"]] = diagnose.attributes(got or {})
        return lb_attrs, listeners, listener_attrs

    def _security_groups(self, enis: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
        ids = sorted({g["GroupId"] for e in enis.values() if e for g in e.get("Groups", [])})
        if not ids:
            return {}
        reply = self._ask(
            "security groups",
            "ec2:DescribeSecurityGroups",
            self.ec2.describe_security_groups,
            GroupIds=ids,
        )
        return {g["GroupId"]: g for g in (reply or {}).get("SecurityGroups", [])}

    def _sources(self, lbs: list[dict[str, Any]]) -> list[str]:
        """Where the NLB's traffic (health checks and users' SSH) comes from: its security groups,
        or without them, its subnets' CIDRs."""
        sources: list[str] = []
        subnets: list[str] = []
        for lb in lbs:
            if lb.get("SecurityGroups"):
                sources += [g for g in lb["SecurityGroups"] if g not in sources]
            else:
                subnets += [
                    z["SubnetId"] for z in lb.get("AvailabilityZones", []) if "SubnetId" in z
                ]
        if subnets:
            reply = self._ask(
                "security groups",
                "ec2:DescribeSubnets",
                self.ec2.describe_subnets,
                SubnetIds=sorted(set(subnets)),
            )
            sources += sorted({s["CidrBlock"] for s in (reply or {}).get("Subnets", [])})
        return sources


# -- login nodes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _NodeFacts:
    offered: dict[str, str] | None = None
    sshd_t: str = ""
    error: str = ""  # `step: reason` of the first step that failed


def _start_node_checks(
    pool: ThreadPoolExecutor, config: Config, reconciler: Reconciler, nodes: Sequence[LoginNode]
) -> dict[str, Future[_NodeFacts]]:
    if reconciler.keys is None:
        return {}
    side = reconciler.keys.nodes
    return {n.ip: pool.submit(_node_facts, side, n.ip) for n in nodes}


def _node_facts(side: Any, ip: str) -> _NodeFacts:
    """A probe, then a login pinned to what the probe showed, running `sshd -T` as root."""
    from hpodlb.sshnode import SshError

    probe = side.probe(ip)
    if probe.offered is None:
        return _NodeFacts(error=probe.error)
    try:
        with side.connector.session(ip, frozenset(probe.offered.values())) as session:
            rc, out, err = session.run_root(SSHD_T)
    except SshError as exc:
        return _NodeFacts(offered=probe.offered, error=str(exc))
    except Exception as exc:  # a node's fault is that node's line, never doctor's crash
        return _NodeFacts(offered=probe.offered, error=f"ssh: {type(exc).__name__}: {exc}")
    if rc != 0:
        first = (out.strip() or err.strip() or f"exit status {rc}").splitlines()[0][:200]
        return _NodeFacts(offered=probe.offered, error=f"sshd-T: {first}")
    return _NodeFacts(offered=probe.offered, sshd_t=out)


def _judge_nodes(
    config: Config,
    nodes: Sequence[LoginNode],
    ssh: dict[str, Future[_NodeFacts]],
    idle_timeout: int | None,
) -> Iterator[Finding]:
    if not ssh:
        if nodes:
            yield warn(
                "nodes",
                "host_keys.enabled = false: login nodes are not checked over SSH",
                "enable host_keys to have hpodlb keep and check the nodes' host keys",
            )
        return
    canonical = _canonical(config)
    hk = config.host_keys
    for node in nodes:
        facts = ssh[node.ip].result()
        area = f"node {node.ip}"
        if facts.offered is None:
            yield fail(area, f"unreachable: {facts.error}", _ssh_fix(facts.error, config))
            continue
        yield diagnose.host_keys(node.ip, facts.offered, canonical)
        if facts.error:
            yield fail(area, facts.error, _ssh_fix(facts.error, config))
            continue
        yield passed(area, f"login as {config.ssh.user} and `sudo -n` work")
        yield from diagnose.sshd(
            node.ip,
            facts.sshd_t,
            sorted({tg.port for tg in config.target_groups}),
            str(hk.remote_dir),
            hk.types,
            idle_timeout,
        )


def _ssh_fix(error: str, config: Config) -> str:
    step = error.split(":", 1)[0]
    return {
        "connect": f"check that the node is up and its sshd listens on {config.ssh.port}, and "
        "that its security group admits the head node",
        "auth": f"install the public half of {config.ssh.key_file} in "
        f"~{config.ssh.user}/.ssh/authorized_keys on the node",
        "sudo": f"give {config.ssh.user} passwordless sudo on the node",
    }.get(step, "see the error; `hpodlb status` shows the last pass's view of this node")


def _canonical(config: Config) -> dict[str, str]:
    store = KeyStore(config.host_keys.store, config.host_keys.types)
    try:
        return {t: k.public for t, k in store.load().items()}
    except (KeyStoreError, OSError):
        return {}


# -- the head node -----------------------------------------------------------------------------


def _key_store(config: Config) -> list[Finding]:
    if not config.host_keys.enabled:
        return []
    return [
        passed("key store", line) if ok else fail("key store", line, "see `hpodlb keys --help`")
        for ok, line in check_host_keys(config)
    ]


def _daemon(config: Config, now: float) -> list[Finding]:
    state_dir = config.state.dir
    holder = lock_holder(state_dir)
    if holder is None:
        return [
            fail(
                "daemon",
                f"no hpodlb runs on this head node (nothing holds {state_dir}/hpodlb.lock)",
                "systemctl enable --now hpodlb; journalctl -u hpodlb",
            )
        ]
    state, warning = load_state(state_dir)
    last = state.last_pass
    if last is None:
        why = warning or "no pass recorded yet"
        return [warn("daemon", f"running (pid {holder}); {why}", "wait for its first pass")]
    age = now - last.finished_at
    interval = config.reconcile.interval_seconds
    if age > STALE_INTERVALS * interval:
        return [
            fail(
                "daemon",
                f"running (pid {holder}), but its last pass ended {age:.0f}s ago "
                f"(interval {interval}s)",
                "journalctl -u hpodlb: a pass is stuck, or the state dir cannot be written",
            )
        ]
    if not last.ok:
        return [
            warn(
                "daemon",
                f"running (pid {holder}); last pass {age:.0f}s ago NOT converged: {last.summary}",
                "`hpodlb status` says what is held back, waiting or failing",
            )
        ]
    return [passed("daemon", f"running (pid {holder}); last pass {age:.0f}s ago converged")]
