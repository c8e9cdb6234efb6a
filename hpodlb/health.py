"""NLB target health: since when each target has been in its state, and what it most likely means.

Registered is not serving: a target takes users only once the NLB's health checks pass, and the
commonest reasons users cannot log in (a security group that blocks the checks, an AZ the NLB is not
in) show up here first. This module is pure: it carries each target's `since` across passes, says
which login nodes have been unhealthy for longer than their group's health-check window, and turns
AWS's reason code into the fix an admin would try first. Health never decides a deregistration:
an SG mistake makes every target unhealthy, and emptying the group would make it worse.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

from hpodlb.identity import KEYS_SETTLED
from hpodlb.planner import Target
from hpodlb.state import State, TargetRecord
from hpodlb.targetstate import is_registered, is_serving

# NLB defaults, for a group whose description is not known yet.
DEFAULT_INTERVAL_SECONDS = 30
DEFAULT_HEALTHY_THRESHOLD = 5

# AWS's TargetHealth.Reason codes for network load balancers, and what an admin tries first.
FIXES = {
    "Elb.InitialHealthChecking": (
        "still passing its first health checks; if it stays here, the checks do not reach the "
        "node (see Target.FailedHealthChecks)"
    ),
    "Elb.RegistrationInProgress": "registration in progress; wait one health-check interval",
    "Target.FailedHealthChecks": (
        "the NLB's health checks fail: the login node's security group must admit the NLB "
        "(its security groups, or its subnets' CIDRs) on the health-check port, and sshd must "
        "listen there; `hpodlb doctor` checks both"
    ),
    "Target.Timeout": (
        "health checks time out: a security group or network ACL drops them; admit the NLB's "
        "subnets on the health-check port (`hpodlb doctor`)"
    ),
    "Target.NotInUse": (
        "the NLB has no subnet in this node's Availability Zone (cross-zone load balancing does "
        "not change that): add one; `hpodlb doctor` names the zone"
    ),
    "Target.IpUnusable": "the IP is not usable as a target (it is the NLB's own, or in use)",
    "Target.InvalidState": "the instance is stopped or terminated",
    "Target.HealthCheckDisabled": "health checks are disabled on the target group",
    "Elb.InternalError": "an AWS-side error; it usually passes, else contact AWS support",
}


def window_seconds(info: Mapping[str, Any]) -> float:
    """How long a healthy target takes to pass its health checks from scratch (interval x healthy
    threshold), from a DescribeTargetGroups entry; past it, unhealthy is not a transient."""
    interval = int(info.get("HealthCheckIntervalSeconds") or DEFAULT_INTERVAL_SECONDS)
    threshold = int(info.get("HealthyThresholdCount") or DEFAULT_HEALTHY_THRESHOLD)
    return float(interval * threshold)


def track(
    before: Iterable[TargetRecord], targets: Iterable[Target], now: float, wall: float
) -> list[TargetRecord]:
    """This pass's records: a target still in the state it was in keeps its `since` (and whether
    it was already warned about); one that changed state starts again now."""
    old = {(r.ip, r.port): r for r in before}
    out = []
    for t in sorted(targets, key=lambda t: (t.ip, t.port)):
        prev = old.get((t.ip, t.port))
        same = prev is not None and prev.state == t.state and prev.since_mono is not None
        out.append(
            TargetRecord(
                ip=t.ip,
                port=t.port,
                state=t.state,
                reason=t.reason,
                description=t.description,
                since=prev.since if same and prev else wall,
                since_mono=prev.since_mono if same and prev else now,
                warned=prev.warned if same and prev else False,
            )
        )
    return out


def overdue(
    records: Sequence[TargetRecord], login_ips: Collection[str], window: float, now: float
) -> list[TargetRecord]:
    """Login nodes' targets that are registered and not healthy for longer than `window`."""
    return [
        r
        for r in records
        if r.ip in login_ips
        and not serving(r)
        and is_registered(r.state)
        and r.since_mono is not None
        and now - r.since_mono > window
    ]


def serving(record: TargetRecord) -> bool:
    """The NLB sends it users (see `targetstate.is_serving`)."""
    return is_serving(record.state, record.reason)


def likely_fix(reason: str) -> str:
    return FIXES.get(reason, "see the target group's health in the EC2 console")


def describe(record: TargetRecord) -> str:
    """`unhealthy (Target.Timeout: Request timed out)`, for status cells and log lines."""
    if not record.reason:
        return record.state
    detail = f"{record.reason}: {record.description}" if record.description else record.reason
    return f"{record.state} ({detail})"


def healthy_nodes(
    targets: Mapping[str, Sequence[TargetRecord]], groups: Sequence[str], ips: Iterable[str]
) -> set[str]:
    """The login nodes healthy in every configured group: the ones that take users now."""
    return _in_every(targets, groups, ips, serving)


def taking_users(state: State, groups: Sequence[str]) -> set[str]:
    """Login nodes whose keys are not in question and that pass the NLB's health checks in every
    group: what STATUS= and the metrics call healthy."""
    keys_ok = [ip for ip, r in state.nodes.items() if r.key_state in KEYS_SETTLED]
    return healthy_nodes(state.targets, groups, keys_ok)


def registered_nodes(
    targets: Mapping[str, Sequence[TargetRecord]], groups: Sequence[str], ips: Iterable[str]
) -> set[str]:
    """The login nodes registered (healthy or not, but not leaving) in every configured group."""
    return _in_every(targets, groups, ips, lambda r: is_registered(r.state))


def _in_every(
    targets: Mapping[str, Sequence[TargetRecord]],
    groups: Sequence[str],
    ips: Iterable[str],
    accept: Callable[[TargetRecord], bool],
) -> set[str]:
    ok = {arn: {r.ip for r in targets.get(arn, []) if accept(r)} for arn in groups}
    return {ip for ip in ips if groups and all(ip in ok[arn] for arn in groups)}


def headline(state: State, groups: Sequence[str]) -> str:
    """`2/3 login nodes healthy (1 more registered, not healthy yet), 1 drained`: healthy means
    verified keys and passing the NLB's health checks in every target group; the rest is still
    being checked, or drained by an admin."""
    serving = taking_users(state, groups)
    keys_ok = [ip for ip, r in state.nodes.items() if r.key_state in KEYS_SETTLED]
    registered = registered_nodes(state.targets, groups, keys_ok)
    line = f"{len(serving)}/{len(state.nodes)} login nodes healthy"
    if registered - serving:
        line += f" ({len(registered - serving)} more registered, not healthy yet)"
    drained = sum(1 for r in state.nodes.values() if r.drained)
    if drained:
        line += f", {drained} drained"
    return line
