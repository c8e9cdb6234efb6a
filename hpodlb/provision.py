"""`hpodlb provision` / `teardown`: the login NLB and its target group, from nothing and back.

Replaces the console clicks of the manual procedure (steps 2, 3 and 6). Everything created carries
`hpodlb:managed=true` and `hpodlb:cluster=<ClusterName>`; existing resources are found by name and
only adopted when they carry those tags, so a second run changes nothing and a same-named resource
someone else made is refused, never modified or deleted. Teardown goes listener, NLB, target group.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpodlb.files import write_atomically
from hpodlb.hyperpod import ClusterError, HyperPod
from hpodlb.logs import get_logger

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_elbv2 import ElasticLoadBalancingv2Client
    from mypy_boto3_elbv2.type_defs import TagTypeDef

log = get_logger("hpodlb.provision")

MANAGED = "hpodlb:managed"
CLUSTER = "hpodlb:cluster"
PLACEHOLDER_ID = "0123456789abcdef"  # the example config's target group ID


class ProvisionError(Exception):
    """Refused or failed; the message names the resource and why."""


@dataclass(frozen=True)
class Spec:
    cluster: str
    vpc_id: str
    subnet_ids: tuple[str, ...]
    security_group_ids: tuple[str, ...]
    name_prefix: str = "smhp-login-node"
    port: int = 22
    stickiness: bool = False

    @property
    def tg_name(self) -> str:
        return f"{self.name_prefix}-tg"

    @property
    def lb_name(self) -> str:
        return f"{self.name_prefix}-lb"

    def tags(self) -> list[TagTypeDef]:
        return [{"Key": MANAGED, "Value": "true"}, {"Key": CLUSTER, "Value": self.cluster}]

    def attributes(self) -> dict[str, str]:
        """Login-node friendly: short drain, and a deregistration never cuts live SSH sessions."""
        attrs = {
            "deregistration_delay.timeout_seconds": "30",
            "deregistration_delay.connection_termination.enabled": "false",
        }
        if self.stickiness:
            attrs |= {"stickiness.enabled": "true", "stickiness.type": "source_ip"}
        return attrs


@dataclass
class Report:
    dry_run: bool = False
    changes: list[str] = field(default_factory=list)
    target_group_arn: str = ""
    dns_name: str = ""

    def change(self, what: str) -> None:
        """Record a change: made, or in a dry run only planned, and the log says which."""
        self.changes.append(what)
        if self.dry_run:
            log.info("provision_change", change=f"would {what}", dry_run=True)
        else:
            log.info("provision_change", change=what, dry_run=False)


class Provisioner:
    """Finds or creates (or deletes) the hpodlb resources of one cluster with one elbv2 client."""

    def __init__(
        self, elb: ElasticLoadBalancingv2Client, cluster: str, *, dry_run: bool = False
    ) -> None:
        self.elb = elb
        self.cluster = cluster
        self.dry_run = dry_run

    # -- provision ------------------------------------------------------------------------------

    def provision(self, spec: Spec) -> Report:
        report = Report(dry_run=self.dry_run)
        tg: Mapping[str, Any] | None = self._find("target group", spec.tg_name, self._target_groups)
        if tg is None:
            report.change(
                f"create target group {spec.tg_name} (IP targets, TCP:{spec.port}, TCP health checks)"
            )
            if not self.dry_run:
                tg = self.elb.create_target_group(
                    Name=spec.tg_name,
                    Protocol="TCP",
                    Port=spec.port,
                    VpcId=spec.vpc_id,
                    TargetType="ip",
                    HealthCheckProtocol="TCP",
                    Tags=spec.tags(),
                )["TargetGroups"][0]
        tg_arn = tg["TargetGroupArn"] if tg else f"(new {spec.tg_name})"
        report.target_group_arn = tg_arn
        self._ensure_attributes(tg_arn, spec, report, new=tg is None)

        lb: Mapping[str, Any] | None = self._find(
            "load balancer", spec.lb_name, self._load_balancers
        )
        if lb is None:
            report.change(
                f"create internal network load balancer {spec.lb_name} in {', '.join(spec.subnet_ids)}"
            )
            if not self.dry_run:
                lb = self.elb.create_load_balancer(
                    Name=spec.lb_name,
                    Subnets=list(spec.subnet_ids),
                    SecurityGroups=list(spec.security_group_ids),
                    Scheme="internal",
                    Type="network",
                    Tags=spec.tags(),
                )["LoadBalancers"][0]
        report.dns_name = lb["DNSName"] if lb else f"(new {spec.lb_name})"
        self._ensure_listener(lb, tg_arn, spec, report)
        return report

    def _ensure_attributes(self, tg_arn: str, spec: Spec, report: Report, *, new: bool) -> None:
        wanted = spec.attributes()
        current: dict[str, str] = {}
        if not new:
            reply = self.elb.describe_target_group_attributes(TargetGroupArn=tg_arn)
            current = {a["Key"]: a["Value"] for a in reply["Attributes"]}
        missing = {k: v for k, v in wanted.items() if current.get(k) != v}
        if not missing:
            return
        report.change(
            "set target group attributes " + ", ".join(f"{k}={v}" for k, v in missing.items())
        )
        if not self.dry_run:
            self.elb.modify_target_group_attributes(
                TargetGroupArn=tg_arn,
                Attributes=[{"Key": k, "Value": v} for k, v in missing.items()],
            )

    def _ensure_listener(
        self, lb: Mapping[str, Any] | None, tg_arn: str, spec: Spec, report: Report
    ) -> None:
        listeners = (
            self.elb.describe_listeners(LoadBalancerArn=lb["LoadBalancerArn"])["Listeners"]
            if lb
            else []
        )
        for listener in listeners:
            if listener["Port"] != spec.port:
                continue
            targets = [a.get("TargetGroupArn") for a in listener.get("DefaultActions", [])]
            if targets == [tg_arn]:
                return
            raise ProvisionError(
                f"listener on {spec.lb_name}:{spec.port} forwards to {targets}, not {spec.tg_name}; "
                "refusing to change it"
            )
        report.change(
            f"create listener TCP:{spec.port} on {spec.lb_name} forwarding to {spec.tg_name}"
        )
        if not self.dry_run and lb is not None:
            self.elb.create_listener(
                LoadBalancerArn=lb["LoadBalancerArn"],
                Protocol="TCP",
                Port=spec.port,
                DefaultActions=[{"Type": "forward", "TargetGroupArn": tg_arn}],
                Tags=spec.tags(),
            )

    # -- teardown -------------------------------------------------------------------------------

    def teardown(self, name_prefix: str, confirm: Callable[[Sequence[str]], bool]) -> Report:
        report = Report(dry_run=self.dry_run)
        tg = self._find("target group", f"{name_prefix}-tg", self._target_groups)
        lb = self._find("load balancer", f"{name_prefix}-lb", self._load_balancers)
        plan: list[tuple[str, Callable[..., Any], dict[str, Any]]] = []
        if lb is not None:
            lb_arn, lb_name = lb["LoadBalancerArn"], lb["LoadBalancerName"]
            for listener in self.elb.describe_listeners(LoadBalancerArn=lb_arn)["Listeners"]:
                what = f"delete listener TCP:{listener['Port']} of {lb_name}"
                plan.append(
                    (what, self.elb.delete_listener, {"ListenerArn": listener["ListenerArn"]})
                )
            plan.append((f"delete load balancer {lb_name}", self._delete_lb, {"arn": lb_arn}))
        if tg is not None:
            what = f"delete target group {tg['TargetGroupName']}"
            plan.append(
                (what, self.elb.delete_target_group, {"TargetGroupArn": tg["TargetGroupArn"]})
            )
        if self.dry_run:
            for what, _, _ in plan:
                report.change(what)
            return report
        if not plan or not confirm([what for what, _, _ in plan]):
            return report
        for what, action, kwargs in plan:
            action(**kwargs)
            report.change(what)
        return report

    def _delete_lb(self, arn: str) -> None:
        self.elb.delete_load_balancer(LoadBalancerArn=arn)
        # A target group cannot be deleted while a load balancer still uses it.
        self.elb.get_waiter("load_balancers_deleted").wait(
            LoadBalancerArns=[arn], WaiterConfig={"Delay": 5, "MaxAttempts": 60}
        )

    # -- finding ----------------------------------------------------------------------------------

    def _find(
        self, kind: str, name: str, lookup: Callable[[str], dict[str, Any] | None]
    ) -> dict[str, Any] | None:
        """The named resource if it is ours; None if absent; ProvisionError if someone else's."""
        found = lookup(name)
        if found is None:
            return None
        arn = found.get("TargetGroupArn") or found["LoadBalancerArn"]
        tags = {
            t["Key"]: t["Value"]
            for d in self.elb.describe_tags(ResourceArns=[arn])["TagDescriptions"]
            for t in d.get("Tags", [])
        }
        if tags.get(MANAGED) != "true" or tags.get(CLUSTER) != self.cluster:
            raise ProvisionError(
                f"a {kind} named {name} exists but is not hpodlb's for cluster {self.cluster} "
                f"(tags {MANAGED}=true, {CLUSTER}={self.cluster} missing); refusing to touch it"
            )
        return found

    def _target_groups(self, name: str) -> dict[str, Any] | None:
        return self._by_name("describe_target_groups", "TargetGroups", name, "TargetGroupNotFound")

    def _load_balancers(self, name: str) -> dict[str, Any] | None:
        return self._by_name(
            "describe_load_balancers", "LoadBalancers", name, "LoadBalancerNotFound"
        )

    def _by_name(self, method: str, key: str, name: str, not_found: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            items: list[dict[str, Any]] = getattr(self.elb, method)(Names=[name])[key]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == not_found:
                return None
            raise
        return items[0] if items else None


@dataclass(frozen=True)
class Network:
    """Where the NLB goes: the VPC, its subnets and security groups, and who said so."""

    vpc_id: str
    subnet_ids: tuple[str, ...]
    security_group_ids: tuple[str, ...]
    source: str


def cluster_network(
    hyperpod: HyperPod,
    ec2: EC2Client,
    cluster: str,
    vpc_id: str | None,
    subnet_ids: Sequence[str],
    security_group_ids: Sequence[str],
) -> Network:
    """The flags an admin gave, and for each one missing, the cluster's own: the login groups'
    OverrideVpcConfig if they have one, else the cluster's VpcConfig (DescribeCluster), one
    subnet per Availability Zone (an NLB takes no more); the VPC is always the subnets' own
    unless --vpc-id says (the cluster is not asked for it)."""
    if vpc_id and subnet_ids and security_group_ids:
        return Network(vpc_id, tuple(subnet_ids), tuple(security_group_ids), "the flags")
    if subnet_ids and security_group_ids:
        found = ec2.describe_subnets(SubnetIds=list(subnet_ids)).get("Subnets", [])
        return Network(
            _vpc_of(found, subnet_ids),
            tuple(subnet_ids),
            tuple(security_group_ids),
            "the flags, and the VPC of the subnets",
        )
    flag_vpc = vpc_id
    try:
        described = hyperpod.describe(cluster)
    except ClusterError as exc:
        raise ProvisionError(
            f"cannot take the network from the cluster ({exc}); pass --vpc-id, --subnet-id and "
            "--security-group-id"
        ) from None
    login = [
        g.get("OverrideVpcConfig", {})
        for g in described.get("InstanceGroups", [])
        if g.get("SlurmConfig", {}).get("NodeType") == "Login" and g.get("OverrideVpcConfig")
    ]
    vpc_config = login[0] if login else described.get("VpcConfig", {})
    whose = "login group's OverrideVpcConfig" if login else "VpcConfig"
    subnets = tuple(subnet_ids) or tuple(vpc_config.get("Subnets", []))
    groups = tuple(security_group_ids) or tuple(vpc_config.get("SecurityGroupIds", []))
    if not subnets or not groups:
        raise ProvisionError(
            f"cluster {cluster} has no VpcConfig subnets or security groups; pass --subnet-id and "
            "--security-group-id"
        )
    found = ec2.describe_subnets(SubnetIds=list(subnets)).get("Subnets", [])
    if not subnet_ids:  # the cluster's list may hold several subnets of one zone
        first: dict[str, str] = {}
        for subnet in sorted(found, key=lambda s: subnets.index(s["SubnetId"])):
            first.setdefault(subnet.get("AvailabilityZone", subnet["SubnetId"]), subnet["SubnetId"])
        subnets = tuple(first.values())
    if not vpc_id:
        vpc_id = _vpc_of(found, subnets)
    flags = (
        ("--vpc-id", flag_vpc),
        ("--subnet-id", subnet_ids),
        ("--security-group-id", security_group_ids),
    )
    given = [name for name, value in flags if value]
    source = f"cluster {cluster}'s {whose} (DescribeCluster)"
    if given:
        source += f", with {', '.join(given)}"
    return Network(vpc_id, subnets, groups, source)


def _vpc_of(found: Sequence[Mapping[str, Any]], subnets: Sequence[str]) -> str:
    """The one VPC the described subnets are in (ProvisionError if they span several or none)."""
    vpcs = sorted({str(s["VpcId"]) for s in found})
    if len(vpcs) != 1:
        raise ProvisionError(f"subnets {', '.join(subnets)} are in VPCs {vpcs}; pass --vpc-id")
    return vpcs[0]


def cluster_name(resource_config: Path) -> str:
    """`ClusterConfig.ClusterName` from the resource config (HyperPod writes it on newer clusters)."""
    import json

    try:
        name = json.loads(resource_config.read_text())["ClusterConfig"]["ClusterName"]
    except (OSError, ValueError, KeyError, TypeError):
        name = None
    if not isinstance(name, str) or not name:
        raise ProvisionError(
            f"{resource_config}: no ClusterConfig.ClusterName; pass --cluster-name"
        )
    return name


def is_placeholder(arn: str) -> bool:
    """The example config's target group (`.../smhp-login-node-tg/0123456789abcdef`): a stand-in
    for the one `provision --write-config` makes, naming no real group or region."""
    return arn.endswith(f"/{PLACEHOLDER_ID}")


def add_target_group_to_config(path: Path, arn: str, port: int) -> bool:
    """Point the config at `arn`, editing the text so every comment survives; False if it already is.

    The example config's placeholder ARN is replaced in place; otherwise a table is appended.
    """
    text = path.read_text()
    if arn in text:
        return False
    placeholder = re.search(rf'arn\s*=\s*"arn:aws[^"]*:targetgroup/[^"/]+/{PLACEHOLDER_ID}"', text)
    if placeholder:
        new = text[: placeholder.start()] + f'arn = "{arn}"' + text[placeholder.end() :]
        new = _set_port_after(new, placeholder.start(), port)
    else:
        new = text.rstrip("\n") + f'\n\n[[target_groups]]\narn = "{arn}"\nport = {port}\n'
    from hpodlb.config import load_config

    mode = path.stat().st_mode & 0o777
    write_atomically(path.with_name(f".{path.name}.check"), new.encode(), mode)
    try:
        load_config(path.with_name(f".{path.name}.check"), {})
    finally:
        path.with_name(f".{path.name}.check").unlink(missing_ok=True)
    write_atomically(path, new.encode(), mode)
    return True


def _set_port_after(text: str, start: int, port: int) -> str:
    """Set `port = N` in the [[target_groups]] table that holds position `start`."""
    table_end = text.find("\n[", start)
    table_end = len(text) if table_end == -1 else table_end
    body = text[start:table_end]
    if re.search(r"^port\s*=", body, re.MULTILINE):
        body = re.sub(r"^port\s*=\s*\d+", f"port = {port}", body, count=1, flags=re.MULTILINE)
    else:
        body = body.rstrip("\n") + f"\nport = {port}\n"
    return text[:start] + body + text[table_end:]
