"""`hpodlb doctor`'s judgements: the path a user's SSH takes, checked from facts already gathered.

Pure: each function takes AWS's answers (the dicts boto3 returns) or a node's `sshd -T` output and
says PASS, WARN or FAIL with what it found and the fix, so every misconfiguration has a test that
builds it and sees it named. Gathering the facts is `doctor.py`'s job.

The path, outside in: the NLB (internal, active, in every Availability Zone that holds a login node)
-> its listener (TCP, forwarding to the login target group, idle timeout) -> the target group (ip,
TCP, the SSH port, health checks that can pass, attributes that suit long SSH sessions) -> each login
node's security groups (admitting the NLB) -> sshd on the node (the port, the host keys hpodlb
installs, keepalives shorter than the idle timeout).
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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
    info: Mapping[str, Any], attrs: Mapping[str, str], port: int, node_vpcs: Iterable[str]
) -> list[Finding]:
    """Type, protocol, port, VPC, health checks, and the attributes long SSH sessions depend on."""
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
    vpcs = sorted(set(node_vpcs))
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
        what = "cut after" if cut else "kept open, no new ones after"
        out.append(passed(area, f"deregistration: sessions {what} {delay}s"))
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


# -- the load balancer and its listener ------------------------------------------------------------


def load_balancers(
    tg_arn: str,
    tg_name: str,
    lbs: Sequence[Mapping[str, Any]],
    lb_attrs: Mapping[str, Mapping[str, str]],
    listeners: Mapping[str, Sequence[Mapping[str, Any]]],
    listener_attrs: Mapping[str, Mapping[str, str]],
    node_zones: Mapping[str, str],
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
        out.extend(_load_balancer(area, lb, lb_attrs.get(arn, {}), node_zones))
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
    area: str, lb: Mapping[str, Any], attrs: Mapping[str, str], node_zones: Mapping[str, str]
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
    for ip, zone in sorted(node_zones.items()):
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
    cross = attrs.get("load_balancing.cross_zone.enabled") == "true"
    empty = sorted(zones - set(node_zones.values())) if node_zones else []
    if empty and not cross:
        out.append(
            warn(
                area,
                f"cross-zone load balancing is off and {', '.join(empty)} has no login node: "
                "users sent to that zone's NLB address find no target",
                "turn load_balancing.cross_zone.enabled on, or remove that zone's subnet",
            )
        )
    if not out:
        out.append(
            passed(
                area,
                f"internal, active, in {', '.join(sorted(zones))}, cross-zone "
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
    return passed(area, f"TCP listener on port {port}, idle timeout {timeout}s{said}"), timeout


# -- security groups -------------------------------------------------------------------------------


def security_groups(
    enis: Mapping[str, Mapping[str, Any] | None],
    groups: Mapping[str, Mapping[str, Any]],
    sources: Sequence[str],
    port: int,
) -> list[Finding]:
    """Each login node's network interface must admit every source (the NLB's security group ids,
    or its subnets' CIDRs when it has none) on the SSH port, health checks included."""
    out = []
    for ip, eni in sorted(enis.items()):
        area = f"node {ip}"
        if eni is None:
            out.append(
                warn(
                    area,
                    "no network interface with this private IP in this account and region: its "
                    "security groups cannot be checked",
                    "check that aws.region is the cluster's region",
                )
            )
            continue
        ids = [g["GroupId"] for g in eni.get("Groups", [])]
        blocked = [s for s in sources if not any(_admits(groups.get(g, {}), s, port) for g in ids)]
        if blocked:
            first = ids[0] if ids else "its security group"
            out.append(
                fail(
                    area,
                    f"security groups {', '.join(ids) or '(none)'} do not admit "
                    f"{', '.join(blocked)} on TCP {port}: health checks and users' SSH are "
                    "dropped",
                    f"add to {first} an inbound rule: TCP {port} from {blocked[0]}"
                    + (" (the NLB's security group)" if blocked[0].startswith("sg-") else ""),
                )
            )
        else:
            out.append(passed(area, f"security groups {', '.join(ids)} admit the NLB on {port}"))
    return out


def _admits(group: Mapping[str, Any], source: str, port: int) -> bool:
    for rule in group.get("IpPermissions", []):
        proto = str(rule.get("IpProtocol", ""))
        if proto not in ("-1", "tcp", "6"):
            continue
        if proto != "-1" and not (rule.get("FromPort", 0) <= port <= rule.get("ToPort", 65535)):
            continue
        if source.startswith("sg-"):
            if any(p.get("GroupId") == source for p in rule.get("UserIdGroupPairs", [])):
                return True
        elif any(_covers(r.get("CidrIp", ""), source) for r in rule.get("IpRanges", [])):
            return True
    return False


def _covers(cidr: str, source: str) -> bool:
    try:
        inner = ipaddress.IPv4Network(source, strict=False)
        return inner.subnet_of(ipaddress.IPv4Network(cidr, strict=False))
    except ValueError:
        return False


# -- sshd on a node --------------------------------------------------------------------------------


def sshd(
    ip: str,
    sshd_t: str,
    ports: Sequence[int],
    remote_dir: str,
    types: Sequence[str],
    idle: int | None,
) -> list[Finding]:
    """From `sshd -T`: it listens on the target port, reads the host keys hpodlb installs, and
    sends keepalives more often than the NLB drops idle connections."""
    area = f"node {ip}"
    settings: dict[str, list[str]] = {}
    for line in sshd_t.splitlines():
        key, _, value = line.strip().partition(" ")
        settings.setdefault(key.lower(), []).append(value.strip())
    out: list[Finding] = []
    listening = settings.get("port", [])
    for port in ports:
        if str(port) not in listening:
            out.append(
                fail(
                    area,
                    f"sshd listens on port {', '.join(listening) or '?'}, the target group sends "
                    f"to {port}",
                    f"make sshd listen on {port}, or fix the target group's port",
                )
            )
    wanted = [f"{remote_dir.rstrip('/')}/ssh_host_{t}_key" for t in types]
    missing = [w for w in wanted if w not in settings.get("hostkey", [])]
    if missing:
        out.append(
            fail(
                area,
                f"sshd does not load {', '.join(missing)}: keys hpodlb installs there are not "
                "the ones users see",
                "add HostKey lines for them to sshd_config, or set host_keys.remote_dir",
            )
        )
    alive = int(_first_number(settings.get("clientaliveinterval", ["0"])))
    limit = idle or NLB_IDLE_TIMEOUT_DEFAULT
    if alive <= 0 or alive >= limit:
        now = "off" if alive <= 0 else f"{alive}s"
        out.append(
            warn(
                area,
                f"ClientAliveInterval is {now} and the NLB drops a connection idle for {limit}s: "
                "idle SSH sessions are cut silently",
                f"set ClientAliveInterval {min(60, limit // 2)} in sshd_config",
            )
        )
    if not out:
        out.append(
            passed(
                area,
                f"sshd on port {', '.join(listening)} with the host keys in {remote_dir}, "
                f"keepalive every "
                f"{alive}s (NLB idle timeout {limit}s)",
            )
        )
    return out


def _first_number(values: Sequence[str]) -> str:
    match = re.match(r"\d+", values[0] if values else "")
    return match.group(0) if match else "0"


def host_keys(ip: str, offered: Mapping[str, str], canonical: Mapping[str, str]) -> Finding:
    area = f"node {ip}"
    if not canonical:
        return warn(area, "no canonical keys to compare with", "see the key store check")
    other = sorted(t for t, line in offered.items() if canonical.get(t) != line)
    if other or not offered:
        what = ", ".join(other) if other else "none of the configured types"
        return fail(
            area,
            f"presents {what} host keys other than the canonical ones: users would see "
            "REMOTE HOST IDENTIFICATION HAS CHANGED",
            "let hpodlb push the canonical keys (`hpodlb status` says why it has not)",
        )
    return passed(area, f"presents the canonical {', '.join(sorted(offered))} keys")


def verdict(findings: Iterable[Finding]) -> Status:
    statuses = {f.status for f in findings}
    for s in (Status.FAIL, Status.WARN):
        if s in statuses:
            return s
    return Status.PASS
