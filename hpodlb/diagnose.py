"""`hpodlb doctor`'s judgements: the path a user's SSH takes, checked from facts already gathered.

Pure: each function takes AWS's answers (the dicts boto3 returns) or a node's `sshd -T` output and
says PASS, WARN or FAIL with what it found and the fix, so every misconfiguration has a test that
builds it and sees it named. Gathering the facts is `doctor.py`'s job.

The path, outside in: the NLB (internal, active, in every Availability Zone that holds a login node)
-> its listener (TCP, forwarding to the login target group, idle timeout) -> the target group (ip,
TCP, the SSH port, health checks that can pass, attributes that suit long SSH sessions) -> each login
node's security groups (admitting the NLB) -> sshd on the node (the port, the host keys hpodlb
installs, keepalives shorter than the idle timeout). The last two, about each node, are
`diagnosenode.py`'s.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hpodlb.health import likely_fix
from hpodlb.inventory import LoginNode
from hpodlb.targetstate import is_registered, is_serving

NLB_IDLE_TIMEOUT_DEFAULT = 350  # seconds: an NLB TCP listener's default
LONG_SESSION_DELAY = 60  # a deregistration delay shorter than this cuts users' sessions early


class Status(str, enum.Enum):
    PASS = "PASS"  # noqa: S105 (a verdict, not a password)
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Finding:
    area: str  # what was checked: "config", "target group NAME", "node 10.1.2.3", ...
    status: Status
    found: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return {
            "area": self.area,
            "status": self.status.value,
            "found": self.found,
            "fix": self.fix,
        }


def passed(area: str, found: str) -> Finding:
    return Finding(area, Status.PASS, found)


def warn(area: str, found: str, fix: str) -> Finding:
    return Finding(area, Status.WARN, found, fix)


def fail(area: str, found: str, fix: str) -> Finding:
    return Finding(area, Status.FAIL, found, fix)


def attributes(reply: Mapping[str, Any]) -> dict[str, str]:
    """`{"Attributes": [{"Key": k, "Value": v}]}` as a dict."""
    return {a["Key"]: a.get("Value", "") for a in reply.get("Attributes", [])}


# -- the target group ------------------------------------------------------------------------------


def target_group(
    info: Mapping[str, Any],
    attrs: Mapping[str, str] | None,
    port: int,
    node_vpcs: Iterable[str] | None,
) -> list[Finding]:
    """Type, protocol, port, VPC, health checks, and the attributes long SSH sessions depend on.
    None for what could not be read: not judged (the failed read is its own FAIL)."""
    area = f"target group {info.get('TargetGroupName', '?')}"
    out: list[Finding] = []
    kind = (info.get("TargetType"), info.get("Protocol"), info.get("Port"))
    if kind == ("ip", "TCP", port):
        out.append(passed(area, f"type ip, TCP, port {port}"))
    else:
        out.append(
            fail(
                area,
                f"type {kind[0]}, {kind[1]}, port {kind[2]}: hpodlb writes only to an ip/TCP group "
                f"on the configured port {port}",
                "point [[target_groups]] at the login group, or create one with `hpodlb provision`",
            )
        )
    vpcs = sorted(set(node_vpcs or ()))
    vpc = info.get("VpcId", "")
    if vpcs and vpcs != [vpc]:
        out.append(
            fail(
                area,
                f"in {vpc}, but the login nodes are in {', '.join(vpcs)}: IP targets must be in "
                "the group's VPC",
                "create the target group (and its NLB) in the login nodes' VPC",
            )
        )
    elif vpcs:
        out.append(passed(area, f"in the login nodes' VPC {vpc}"))
    out.extend(_health_checks(area, info, port))
    if attrs is not None:
        out.extend(_group_attributes(area, attrs))
    return out


def _health_checks(area: str, info: Mapping[str, Any], port: int) -> list[Finding]:
    if info.get("HealthCheckEnabled") is False:
        return [
            warn(
                area,
                "health checks are disabled: the NLB sends users to nodes whose sshd is down",
                "enable TCP health checks on the traffic port",
            )
        ]
    proto = info.get("HealthCheckProtocol", "TCP")
    hc_port = str(info.get("HealthCheckPort", "traffic-port"))
    timing = (
        f"every {info.get('HealthCheckIntervalSeconds', '?')}s, healthy after "
        f"{info.get('HealthyThresholdCount', '?')}, unhealthy after "
        f"{info.get('UnhealthyThresholdCount', '?')}"
    )
    if proto != "TCP":
        return [
            fail(
                area,
                f"health checks use {proto}: sshd does not answer {proto}, so every target "
                "stays unhealthy",
                "set the health check protocol to TCP",
            )
        ]
    if hc_port not in ("traffic-port", str(port)):
        return [
            warn(
                area,
                f"health checks go to port {hc_port}, not sshd's {port}: a node whose sshd is "
                "down still looks healthy",
                "set the health check port to traffic-port",
            )
        ]
    return [passed(area, f"TCP health checks on the SSH port, {timing}")]


def _group_attributes(area: str, attrs: Mapping[str, str]) -> list[Finding]:
    out: list[Finding] = []
    if attrs.get("proxy_protocol_v2.enabled") == "true":
        out.append(
            fail(
                area,
                "proxy protocol v2 is on: sshd reads the PROXY header as a bad banner and every "
                "login fails",
                "turn proxy_protocol_v2.enabled off",
            )
        )
    delay = int(attrs.get("deregistration_delay.timeout_seconds", "300") or 300)
    cut = attrs.get("deregistration_delay.connection_termination.enabled") == "true"
    if cut and delay < LONG_SESSION_DELAY:
        out.append(
            warn(
                area,
                f"sessions on a node that leaves are cut {delay}s after it is deregistered "
                "(connection termination on)",
                "turn deregistration_delay.connection_termination.enabled off, or raise the delay",
            )
        )
    else:
        kept = f"cut {delay}s after it leaves" if cut else "kept (connection termination off)"
        out.append(passed(area, f"a node leaving gets no new sessions; its open ones are {kept}"))
    if attrs.get("preserve_client_ip.enabled") == "true":
        out.append(
            warn(
                area,
                "client IP preservation is on: a user who runs ssh from a login node to the NLB "
                "name is sent back to that same node, which drops the connection (hairpin), and "
                "login nodes' security groups must admit users' own addresses",
                "turn preserve_client_ip.enabled off (the default for ip targets)",
            )
        )
    return out


def login_targets(
    area: str,
    health: Mapping[str, Any],
    nodes: Sequence[LoginNode],
    port: int,
    drained: Mapping[str, str] | None = None,
) -> list[Finding]:
    """Each login node against the group's targets (DescribeTargetHealth): registered at the port,
    and what the NLB's health checks say, with the likely fix. A node an admin drained (IP ->
    reason) is out on purpose: a warning, so that a drain nobody undid is still seen."""
    by_ip = {
        d["Target"]["Id"]: d.get("TargetHealth", {})
        for d in health.get("TargetHealthDescriptions", [])
        if d.get("Target", {}).get("Port", port) == port
    }
    out: list[Finding] = []
    serving = 0
    drained = drained or {}
    for node in [n for n in nodes if n.ip in drained]:
        state = by_ip.get(node.ip)
        out_now = state is None or not is_registered(state.get("State", ""))
        where = (
            "out of rotation" if out_now else "still registered, leaving at the daemon's next pass"
        )
        out.append(
            warn(
                area,
                f"login node {node.ip} ({node.instance_id}) is drained ({drained[node.ip]}): "
                + where,
                f"`hpodlb undrain {node.ip}` once its maintenance is done",
            )
        )
    if out and len(out) == len(nodes):
        return [
            *out,
            fail(
                area,
                "every login node is drained: the NLB has no login node to send users to",
                "`hpodlb undrain IP` for a node whose maintenance is done",
            ),
        ]
    nodes = [n for n in nodes if n.ip not in drained]
    for node in nodes:
        state = by_ip.get(node.ip)
        if state is None or not is_registered(state.get("State", "")):
            out.append(
                fail(
                    area,
                    f"login node {node.ip} ({node.instance_id}) is not registered at port {port}",
                    "`hpodlb status` says why (keys not verified, a push failing, held back); "
                    "the daemon registers it as soon as it verifies",
                )
            )
            continue
        code, reason = state.get("State", "?"), state.get("Reason", "")
        if is_serving(code, reason):
            serving += 1
        elif code == "initial":
            out.append(
                warn(
                    area,
                    f"login node {node.ip} is passing its first health checks",
                    likely_fix(reason),
                )
            )
        else:
            detail = f"{reason}: {state.get('Description', '')}".rstrip(": ") if reason else code
            out.append(
                fail(
                    area,
                    f"login node {node.ip} ({node.instance_id}) is {code} ({detail}): the NLB "
                    "sends it no users",
                    likely_fix(reason),
                )
            )
    out.insert(0, passed(area, f"{serving}/{len(nodes)} login nodes registered and healthy"))
    return out if serving or not nodes else out[1:]


# -- the load balancer and its listener ------------------------------------------------------------


def load_balancers(
    tg_arn: str,
    tg_name: str,
    lbs: Sequence[Mapping[str, Any]],
    lb_attrs: Mapping[str, Mapping[str, str]],
    listeners: Mapping[str, Sequence[Mapping[str, Any]]],
    listener_attrs: Mapping[str, Mapping[str, str]],
    node_zones: Mapping[str, str] | None,
    tg_cross_zone: str = "",
) -> tuple[list[Finding], int | None]:
    """Each NLB in front of the group; also the shortest idle timeout of a listener forwarding
    to the group (None: no such listener), which sshd's keepalives must beat."""
    if not lbs:
        return [
            fail(
                f"target group {tg_name}",
                "no load balancer forwards to this group: users' SSH never reaches it",
                "create an internal NLB and a TCP listener forwarding to it (`hpodlb provision`)",
            )
        ], None
    out: list[Finding] = []
    timeouts: list[int] = []
    for lb in lbs:
        area = f"load balancer {lb.get('LoadBalancerName', '?')}"
        arn = lb.get("LoadBalancerArn", "")
        cross = lb_attrs.get(arn, {}).get("load_balancing.cross_zone.enabled") == "true"
        if tg_cross_zone in ("true", "false"):  # the group's own setting wins over the NLB's
            cross = tg_cross_zone == "true"
        out.extend(_load_balancer(area, lb, cross, node_zones))
        forwarding = [x for x in listeners.get(arn, []) if tg_arn in _forwarded_groups(x)]
        if not forwarding:
            out.append(
                fail(
                    area,
                    f"no listener forwards to {tg_name}",
                    f"add a TCP listener on the users' SSH port forwarding to {tg_name}",
                )
            )
        for listener in forwarding:
            found, timeout = _listener(area, listener, listener_attrs.get(listener["ListenerArn"]))
            out.append(found)
            timeouts.append(timeout)
    return out, min(timeouts) if timeouts else None


def _load_balancer(
    area: str, lb: Mapping[str, Any], cross: bool, node_zones: Mapping[str, str] | None
) -> list[Finding]:
    out: list[Finding] = []
    state = lb.get("State", {}).get("Code", "?")
    scheme = lb.get("Scheme", "?")
    if lb.get("Type") != "network":
        out.append(
            fail(area, f"type {lb.get('Type')}: SSH needs a network load balancer", "use an NLB")
        )
    if scheme != "internal":
        out.append(
            fail(
                area,
                f"scheme {scheme}: the login nodes' SSH is exposed to the internet",
                "use an internal NLB (reach it over VPN, Direct Connect or peering)",
            )
        )
    if state != "active":
        out.append(fail(area, f"state {state}", "wait for it to become active, or see its events"))
    zones = {z.get("ZoneName", "") for z in lb.get("AvailabilityZones", [])}
    missing: dict[str, list[str]] = {}
    for ip, zone in sorted((node_zones or {}).items()):
        if zone and zone not in zones:
            missing.setdefault(zone, []).append(ip)
    for zone, ips in sorted(missing.items()):
        out.append(
            fail(
                area,
                f"no subnet in {zone}, where {', '.join(ips)} run: their targets stay unused "
                "(Target.NotInUse)",
                f"add a subnet in {zone} to the NLB",
            )
        )
    # A zone without a login node is harmless: the NLB drops its address from DNS (said, no WARN).
    empty = sorted(zones - set(node_zones.values())) if node_zones else []
    idle = f"; no login node in {', '.join(empty)}" if empty else ""
    if not out:
        out.append(
            passed(
                area,
                f"internal, active, in {', '.join(sorted(zones))}{idle}, cross-zone "
                f"{'on' if cross else 'off'}; DNS {lb.get('DNSName', '?')}",
            )
        )
    return out


def _forwarded_groups(listener: Mapping[str, Any]) -> set[str]:
    found = set()
    for action in listener.get("DefaultActions", []):
        if action.get("TargetGroupArn"):
            found.add(action["TargetGroupArn"])
        for tg in action.get("ForwardConfig", {}).get("TargetGroups", []):
            found.add(tg.get("TargetGroupArn", ""))
    return found


def _listener(
    area: str, listener: Mapping[str, Any], attrs: Mapping[str, str] | None
) -> tuple[Finding, int]:
    port, proto = listener.get("Port"), listener.get("Protocol")
    if proto != "TCP":
        return fail(
            area,
            f"listener {port} is {proto}: SSH needs a TCP listener",
            "forward SSH with a TCP listener",
        ), NLB_IDLE_TIMEOUT_DEFAULT
    raw = (attrs or {}).get("tcp.idle_timeout.seconds", "")
    timeout = int(raw) if raw.isdigit() else NLB_IDLE_TIMEOUT_DEFAULT
    said = "" if raw.isdigit() else " (the default; not readable)"
    return (
        passed(
            area, f"TCP listener on port {port} forwarding to it, idle timeout {timeout}s{said}"
        ),
        timeout,
    )


def verdict(findings: Iterable[Finding]) -> Status:
    statuses = {f.status for f in findings}
    for s in (Status.FAIL, Status.WARN):
        if s in statuses:
            return s
    return Status.PASS
