"""`hpodlb doctor`'s AWS side: everything the path of a user's SSH depends on in AWS, read once.

Describe calls only (STS, EC2, ELBv2), each bounded by botocore's timeouts; `diagnose` judges
what they return. A read that fails is a FAIL naming the permission (or the transport's error,
said once however many calls it cost), and what depended on it is not judged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from hpodlb import diagnose, diagnosenode
from hpodlb.config import Config
from hpodlb.diagnose import Finding, fail, passed, warn
from hpodlb.inventory import LoginNode
from hpodlb.targets import TargetGroup

if TYPE_CHECKING:
    from mypy_boto3_elbv2 import ElasticLoadBalancingv2Client

FILTER_VALUES = 200  # EC2 takes at most this many values in one filter
NOT_FOUND_FIX = "check [[target_groups]].arn, and that aws.region is empty or the ARN's region"
IAM_FIX = "grant it to the head node's role (config/iam-policy.json lists what hpodlb needs)"


class AwsPath:
    """AWS's side of the path, read once per doctor run. A read that fails is its own FAIL, and
    what depended on it is not judged (rather than judged on a guess)."""

    def __init__(
        self, config: Config, groups: Sequence[TargetGroup], drained: Mapping[str, str]
    ) -> None:
        import boto3

        from hpodlb.targets import boto_config

        self.groups = groups
        self.region = config.region_for()
        session = boto3.session.Session()
        self.ec2 = session.client("ec2", region_name=self.region, config=boto_config())
        self.sts = session.client("sts", region_name=self.region, config=boto_config())
        self.answered = 0  # calls AWS answered (even with an error): none means nothing evaluated
        self.unanswered: Finding | None = None  # the first call AWS did not answer at all
        self.also_unanswered: list[str] = []
        self.idle_timeout: int | None = None
        self.findings: list[Finding] = []
        self.drained = drained  # IP -> reason: out of rotation on purpose

    @property
    def reachable(self) -> bool:
        return self.answered > 0

    def check(self, nodes: Sequence[LoginNode]) -> list[Finding]:
        me = self._ask("aws", "sts:GetCallerIdentity", self.sts.get_caller_identity)
        if me is not None:
            self.findings.append(
                passed("aws", f"identity {me.get('Arn', '?')}, region {self.region}")
            )
        enis = self._enis([n.ip for n in nodes])
        timeouts = []
        for group in self.groups:
            timeout = self._target_group(group.client, group.arn, group.port, nodes, enis)
            if timeout is not None:
                timeouts.append(timeout)
        self.idle_timeout = min(timeouts) if timeouts else None
        return self.findings

    def _ask(self, area: str, permission: str, call: Callable[..., Any], **kwargs: Any) -> Any:
        """One read; a failure is a FAIL naming the permission (or the transport's error)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            reply = call(**kwargs)
        except ClientError as exc:
            self.answered += 1
            error = exc.response.get("Error", {})
            code = error.get("Code", "Unknown")
            denied = "Denied" in code or "Unauthorized" in code
            self.findings.append(
                fail(
                    area,
                    f"{permission}: {code}: {error.get('Message', '')}".rstrip(": "),
                    IAM_FIX if denied else NOT_FOUND_FIX if "NotFound" in code else "see the error",
                )
            )
            return None
        except BotoCoreError as exc:
            if self.unanswered is None:
                self.unanswered = fail(
                    area,
                    f"{permission}: {type(exc).__name__}: {exc}",
                    "check credentials (the instance role), the region, and the network path to "
                    "AWS (AWS_ENDPOINT_URL, VPC endpoints)",
                )
                self.findings.append(self.unanswered)
            else:  # one line for AWS not answering, not one per call
                self.also_unanswered.append(permission)
                index = self.findings.index(self.unanswered)
                first = self.unanswered.found.split(" (and ", 1)[0]
                self.unanswered = replace(
                    self.unanswered,
                    found=f"{first} (and {len(self.also_unanswered)} more calls unanswered: "
                    f"{', '.join(self.also_unanswered)})",
                )
                self.findings[index] = self.unanswered
            return None
        self.answered += 1
        return reply

    def _enis(self, ips: Sequence[str]) -> dict[str, list[dict[str, Any]]] | None:
        """Every network interface holding each IP (10.x ranges repeat across VPCs: the target
        group's VPC picks among them); None: they could not be read."""
        found: dict[str, list[dict[str, Any]]] = {ip: [] for ip in ips}
        for start in range(0, len(ips), FILTER_VALUES):
            chunk = list(ips[start : start + FILTER_VALUES])
            reply = self._ask(
                "security groups",
                "ec2:DescribeNetworkInterfaces",
                self.ec2.describe_network_interfaces,
                Filters=[{"Name": "addresses.private-ip-address", "Values": chunk}],
            )
            if reply is None:
                return None
            for eni in reply.get("NetworkInterfaces", []):
                for address in eni.get("PrivateIpAddresses", []):
                    if address.get("PrivateIpAddress") in found:
                        found[address["PrivateIpAddress"]].append(eni)
        return found

    def _target_group(
        self,
        elb: ElasticLoadBalancingv2Client,
        arn: str,
        port: int,
        nodes: Sequence[LoginNode],
        all_enis: dict[str, list[dict[str, Any]]] | None,
    ) -> int | None:
        from hpodlb.config import target_group_name

        name = target_group_name(arn)
        area = f"target group {name}"
        elb_ = "elasticloadbalancing:"
        reply = self._ask(
            area, elb_ + "DescribeTargetGroups", elb.describe_target_groups, TargetGroupArns=[arn]
        )
        health = self._ask(
            area, elb_ + "DescribeTargetHealth", elb.describe_target_health, TargetGroupArn=arn
        )
        attrs = self._ask(
            area,
            elb_ + "DescribeTargetGroupAttributes",
            elb.describe_target_group_attributes,
            TargetGroupArn=arn,
        )
        if not reply or not reply.get("TargetGroups"):
            return None
        info = reply["TargetGroups"][0]
        if health is not None:
            self.findings += diagnose.login_targets(area, health, nodes, port, self.drained)
        enis = None if all_enis is None else self._in_vpc(all_enis, info.get("VpcId", ""))
        group_attrs = None if attrs is None else diagnose.attributes(attrs)
        vpcs = None if enis is None else [e["VpcId"] for e in enis.values() if e and "VpcId" in e]
        self.findings += diagnose.target_group(info, group_attrs, port, vpcs)
        lbs = self._load_balancers(area, elb, info.get("LoadBalancerArns", []))
        zones = None
        if enis is not None:
            zones = {ip: e.get("AvailabilityZone", "") for ip, e in enis.items() if e}
        lb_attrs, listeners, listener_attrs = self._lb_details(area, elb, lbs)
        cross = (group_attrs or {}).get("load_balancing.cross_zone.enabled", "")
        found, timeout = diagnose.load_balancers(
            arn, name, lbs, lb_attrs, listeners, listener_attrs, zones, cross
        )
        self.findings += found
        if lbs and enis is not None:
            groups, sources = self._security_groups(enis), self._sources(lbs)
            if groups is not None and sources is not None:  # else their read's FAIL says why
                self.findings += diagnosenode.security_groups(enis, groups, sources, port)
        return timeout

    def _in_vpc(
        self, all_enis: dict[str, list[dict[str, Any]]], vpc: str
    ) -> dict[str, dict[str, Any] | None]:
        """Each IP's interface: the one in the group's VPC, else any (the VPC check then fails)."""
        chosen: dict[str, dict[str, Any] | None] = {}
        for ip, found in all_enis.items():
            here = [e for e in found if e.get("VpcId") == vpc]
            if len(here) > 1:
                self.findings.append(
                    warn(
                        f"node {ip}",
                        f"{len(here)} network interfaces in {vpc} hold this IP; the first is judged",
                        "check which instance owns the address",
                    )
                )
            chosen[ip] = (here or found)[0] if here or found else None
        return chosen

    def _load_balancers(
        self, area: str, elb: ElasticLoadBalancingv2Client, arns: list[str]
    ) -> list[dict[str, Any]]:
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
            read = getattr(elb, "describe_listener_attributes", None)  # boto3 >= 1.35
            for listener in listeners[arn]:
                got = read and self._ask(
                    area,
                    "elasticloadbalancing:DescribeListenerAttributes",
                    read,
                    ListenerArn=listener["ListenerArn"],
                )
                listener_attrs[listener["ListenerArn"]] = diagnose.attributes(got or {})
        return lb_attrs, listeners, listener_attrs

    def _security_groups(self, enis: dict[str, dict[str, Any] | None]) -> dict[str, Any] | None:
        ids = sorted({g["GroupId"] for e in enis.values() if e for g in e.get("Groups", [])})
        if not ids:
            return {}
        reply = self._ask(
            "security groups",
            "ec2:DescribeSecurityGroups",
            self.ec2.describe_security_groups,
            GroupIds=ids,
        )
        if reply is None:
            return None
        return {g["GroupId"]: g for g in reply.get("SecurityGroups", [])}

    def _sources(self, lbs: list[dict[str, Any]]) -> list[diagnosenode.Source] | None:
        """Where each NLB's traffic (health checks and users' SSH) comes from: its security groups
        if it has any, and its subnets' CIDRs (its private addresses are in them)."""
        subnet_ids = sorted(
            {
                z["SubnetId"]
                for lb in lbs
                for z in lb.get("AvailabilityZones", [])
                if "SubnetId" in z
            }
        )
        cidrs: dict[str, str] = {}
        if subnet_ids:
            reply = self._ask(
                "security groups",
                "ec2:DescribeSubnets",
                self.ec2.describe_subnets,
                SubnetIds=subnet_ids,
            )
            if reply is None and not all(lb.get("SecurityGroups") for lb in lbs):
                return None
            for subnet in (reply or {}).get("Subnets", []):
                if "CidrBlock" in subnet:  # an IPv6-only subnet has none
                    cidrs[subnet["SubnetId"]] = subnet["CidrBlock"]
        sources = []
        for lb in lbs:
            zones = lb.get("AvailabilityZones", [])
            sources.append(
                diagnosenode.Source(
                    name=f"the NLB {lb.get('LoadBalancerName', '?')}",
                    groups=tuple(lb.get("SecurityGroups", [])),
                    cidrs=tuple(
                        sorted({cidrs[z["SubnetId"]] for z in zones if z.get("SubnetId") in cidrs})
                    ),
                )
            )
        return sources
