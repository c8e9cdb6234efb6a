"""`hpodlb doctor`'s judgements about each login node: its security groups admitting the NLB,
sshd's own settings, and the host keys it presents.

Pure, as `diagnose.py` (whose `Finding`s these are): AWS's answers about the node's network
interfaces and security groups, or its `sshd -T` output and probed keys, in; PASS, WARN or FAIL
with what was found and the fix, out.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hpodlb.diagnose import NLB_IDLE_TIMEOUT_DEFAULT, Finding, fail, passed, warn

# -- security groups -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Where one NLB's traffic comes from: its security groups (if any) and its subnets' CIDRs. A
    node admits it through a rule naming one of the groups, or rules covering every subnet."""

    name: str
    groups: tuple[str, ...]
    cidrs: tuple[str, ...]

    def rule_to_add(self, port: int) -> str:
        if self.groups:
            return f"TCP {port} from {self.groups[0]} (the NLB's security group)"
        return f"TCP {port} from {', '.join(self.cidrs)} (the NLB's subnets)"


def security_groups(
    enis: Mapping[str, Mapping[str, Any] | None],
    groups: Mapping[str, Mapping[str, Any]],
    sources: Sequence[Source],
    port: int,
) -> list[Finding]:
    """Each login node's network interface must admit every NLB in front of it on the SSH port,
    health checks included (they come from the same addresses)."""
    out = []
    for ip, eni in sorted(enis.items()):
        area = f"node {ip}"
        if eni is None:
            out.append(
                warn(
                    area,
                    "no network interface with this private IP in this account and region: its "
                    "security groups cannot be checked",
                    "check that aws.region is the cluster's region, that hpodlb runs in the "
                    "cluster's account, and that the resource config's IP is current",
                )
            )
            continue
        ids = [g["GroupId"] for g in eni.get("Groups", [])]
        rules = [r for g in ids for r in _on_port(groups.get(g, {}), port)]
        for source in sources:
            if _admits(rules, source):
                continue
            lists = sorted(
                {p.get("PrefixListId", "") for r in rules for p in r.get("PrefixListIds", [])}
            )
            if lists:
                out.append(
                    warn(
                        area,
                        f"security groups {', '.join(ids)} admit TCP {port} only through prefix "
                        f"list {', '.join(lists)}, which doctor cannot expand: is {source.name} in it?",
                        f"make sure the prefix list holds the NLB's subnets, or add {source.rule_to_add(port)}",
                    )
                )
                continue
            out.append(
                fail(
                    area,
                    f"security groups {', '.join(ids) or '(none)'} do not admit {source.name} "
                    f"on TCP {port}: health checks and users' SSH are dropped",
                    f"add to {ids[0] if ids else 'its security group'} an inbound rule: "
                    + source.rule_to_add(port),
                )
            )
            break
        else:
            if not any(f.area == area for f in out):
                out.append(
                    passed(area, f"security groups {', '.join(ids)} admit the NLB on {port}")
                )
    return out


def _on_port(group: Mapping[str, Any], port: int) -> list[Mapping[str, Any]]:
    """The inbound rules of a group that let TCP `port` in (all traffic, TCP, or a range)."""
    out = []
    for rule in group.get("IpPermissions", []):
        proto = str(rule.get("IpProtocol", ""))
        if proto == "-1" or (
            proto in ("tcp", "6") and rule.get("FromPort", 0) <= port <= rule.get("ToPort", 65535)
        ):
            out.append(rule)
    return out


def _admits(rules: Sequence[Mapping[str, Any]], source: Source) -> bool:
    named = {p.get("GroupId") for r in rules for p in r.get("UserIdGroupPairs", [])}
    if named & set(source.groups):
        return True
    ranges = [x.get("CidrIp", "") for r in rules for x in r.get("IpRanges", [])]
    return bool(source.cidrs) and all(any(_covers(c, s) for c in ranges) for s in source.cidrs)


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
    """From `sshd -T`: it listens on the target port at the node's address, reads the host keys
    hpodlb installs, and sends keepalives more often than the NLB drops idle connections."""
    area = f"node {ip}"
    settings: dict[str, list[str]] = {}
    for line in sshd_t.splitlines():
        key, _, value = line.strip().partition(" ")
        settings.setdefault(key.lower(), []).append(value.strip())
    out: list[Finding] = []
    bound = _listening(settings)
    here = sorted({port for host, port in bound if _takes(host, ip)})
    listening = [str(port) for port in here]
    for port in ports:
        if port in here:
            continue
        if not here or any(p == port for _, p in bound):
            found = f"sshd listens on {', '.join(_spelled(h, p) for h, p in bound) or '?'}"
            out.append(
                fail(
                    area,
                    f"{found}, not on {_spelled(ip, port)}, where the target group sends",
                    f"make sshd listen on {_spelled(ip, port)} or on every address "
                    "(ListenAddress in sshd_config), or fix the target group's port",
                )
            )
            continue
        out.append(
            fail(
                area,
                f"sshd listens on port {', '.join(listening)}, the target group sends to {port}",
                f"make sshd listen on {port}, or fix the target group's port",
            )
        )
    wanted = {t: f"{remote_dir.rstrip('/')}/ssh_host_{t}_key" for t in types}
    loaded = settings.get("hostkey", [])
    missing = [path for path in wanted.values() if path not in loaded]
    if len(missing) == len(wanted):
        out.append(
            fail(
                area,
                f"sshd loads none of {', '.join(missing)} (it loads {', '.join(loaded) or 'none'}): "
                "keys hpodlb installs there are not the ones users see",
                "point sshd_config's HostKey lines at them, or set host_keys.remote_dir",
            )
        )
    elif missing:  # a node may serve fewer types (ed25519 only, say): it is in sync with fewer
        out.append(
            warn(
                area,
                f"sshd does not load {', '.join(missing)}: that key type is not served",
                "add the HostKey line if users' known_hosts expect that type",
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


def _listening(settings: Mapping[str, Sequence[str]]) -> list[tuple[str, int]]:
    """(address, port) sshd listens on ("" = every address): its `listenaddress` lines, where a
    `ListenAddress IP:PORT` in sshd_config keeps its own port while `port` still says 22; `port`
    alone only from an sshd that prints no `listenaddress`."""
    found = []
    for value in settings.get("listenaddress", []):
        words = value.split()  # `rdomain NAME` may follow
        host, colon, port = (words[0] if words else "").rpartition(":")
        if colon and port.isdigit():
            found.append((host.removeprefix("[").removesuffix("]"), int(port)))
    if found:
        return found
    return [("", int(port)) for port in settings.get("port", []) if port.isdigit()]


def _takes(host: str, ip: str) -> bool:
    """Whether a socket sshd bound to `host` accepts connections to the node's `ip`: the same
    address, or the wildcard of its family (sshd binds `::` IPv6-only). A name doctor cannot
    judge is given the benefit of the doubt."""
    try:
        address, target = ipaddress.ip_address(host), ipaddress.ip_address(ip)
    except ValueError:
        return True
    return address.version == target.version and (address.is_unspecified or address == target)


def _spelled(host: str, port: int) -> str:
    """`HOST:PORT` as sshd_config's ListenAddress spells it (`[v6]:PORT`)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _first_number(values: Sequence[str]) -> str:
    match = re.match(r"\d+", values[0] if values else "")
    return match.group(0) if match else "0"


def host_keys(
    ip: str,
    offered: Mapping[str, str],
    canonical: Mapping[str, str],
    previous: Mapping[str, str] | None = None,
) -> Finding:
    area = f"node {ip}"
    if not canonical:
        return warn(area, "no canonical keys to compare with", "see the key store check")
    if previous and offered and all(previous.get(t) == line for t, line in offered.items()):
        return warn(
            area,
            "presents the previous canonical keys (a rotation is in progress)",
            "nothing: the next pass updates it in place",
        )
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
