"""What the guards would do with a drain, checked before it is recorded: `hpodlb drain` refuses
up front what the pass would hold for good (too few login nodes left in service, a fraction that
lets none leave), and says what it cannot see. It reads only the last pass's state (and the
clock, for the fraction's window), and counts with the planner's own `guards.in_service` and
`Ledger`."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hpodlb.config import Config, ReconcileConfig, TargetGroupConfig
from hpodlb.context import read_boot_id
from hpodlb.guards import Ledger, guards_of, in_service, out_of_service, recent
from hpodlb.inventory import LoginNode
from hpodlb.state import State, TargetRecord
from hpodlb.targetstate import is_registered, registered_ips


@dataclass
class Seen:
    """The guard check's findings: why it refuses (empty: it does not), what it could not see,
    and whether other login nodes stay in service (None: not known of every group)."""

    refusal: str = ""
    unread: str = ""  # a group it knows nothing of
    later: str = ""  # a group whose budget is spent for now
    others: bool | None = None

    @property
    def note(self) -> str:
        return "; ".join(x for x in (self.unread, self.later) if x)


def _too_few(
    ip: str,
    tg: TargetGroupConfig,
    keys: Mapping[str, str],
    targets: Sequence[TargetRecord],
    staying: set[str],
    drained: set[str],
    rc: ReconcileConfig,
) -> str:
    """The refusal, with the count and the nodes behind it: which are in service, and why each
    other registered target is not."""
    left = staying - {ip}
    shown = ", ".join(sorted(staying)) or "none"
    out = [
        f"{t.ip} ({'drained' if t.ip in drained else out_of_service(keys, t)})"
        for t in targets
        if t.port == tg.port and is_registered(t.state) and t.ip not in staying
    ]
    return (
        f"draining {ip} would leave {len(left)} login nodes in service in {tg.name} "
        f"(reconcile.min_in_service = {rc.min_in_service}); in service now: {shown}"
        + (f"; registered but not in service: {', '.join(out)}" if out else "")
        + "; add --force to drain it anyway (users may find no login node)"
    )


def _window_spent(state: State, tg: TargetGroupConfig, registered: int, rc: ReconcileConfig) -> str:
    """What to say when this window's deregistration budget is spent already (the pass then
    holds the drain until the window ends), as the state file keeps the window."""
    if state.boot_id != read_boot_id():  # the monotonic times are another boot's
        return ""
    guards = guards_of(rc)
    spent = recent(state.departures.get(tg.arn, []), time.monotonic(), guards)
    if not Ledger(guards, serving=0, base=registered + len(spent), spent=len(spent)).fraction_spent:
        return ""
    return (
        f"{len(spent)} targets left {tg.name} within the last {guards.fraction_window_seconds:g}s, "
        f"all that reconcile.max_deregister_fraction = {rc.max_deregister_fraction:g} lets go "
        "in that time: it leaves at the first pass after that"
    )


def registered_at(state: State, tg: TargetGroupConfig) -> set[str]:
    """The IPs registered at the group's port as the daemon's last pass read them."""
    return registered_ips(state.targets.get(tg.arn, []), tg.port)


def unread_group(state: State, groups: Sequence[TargetGroupConfig]) -> str:
    """A target group the last pass could not read (or none ever read): nothing is known of it."""
    for tg in groups:
        if tg.arn in state.target_errors:
            return f"the last pass could not read {tg.name} ({state.target_errors[tg.arn]})"
        if tg.arn not in state.targets:
            return f"no pass has read {tg.name} yet"
    return ""


def check_drain(
    config: Config, ip: str, nodes: Sequence[LoginNode], state: State, drained: set[str]
) -> Seen:
    """What the guards would do with this drain, as the last pass saw the groups: refuse one
    that would leave fewer than min_in_service login nodes in service (`guards.in_service`,
    as the planner counts), or that max_deregister_fraction never lets leave. The planner
    holds such a drain anyway; this says so before anything changes. What it cannot see, it
    says."""
    if state.last_pass is None:
        return Seen(unread="no pass has run yet: the guards decide when it leaves, at a pass")
    rc = config.reconcile
    keys = {n.ip: state.nodes[n.ip].key_state for n in nodes if n.ip in state.nodes}
    seen = Seen(others=False)
    for tg in config.target_groups:
        why = unread_group(state, [tg])
        if why:
            seen.unread = seen.unread or f"{why}: the guards decide when it leaves, at a pass"
            seen.others = None if seen.others is False else seen.others
            continue
        targets = state.targets.get(tg.arn, [])
        # The other drains leave too.
        staying = in_service(keys, targets, tg.port) - (drained - {ip})
        if staying - {ip}:
            seen.others = True
        registered = registered_at(state, tg)
        if ip not in registered or seen.refusal:
            continue
        ledger = Ledger(guards_of(rc), serving=len(staying), base=len(registered))
        if ledger.too_few(in_service=ip in staying):
            seen.refusal = _too_few(ip, tg, keys, targets, staying, drained, rc)
        elif ledger.fraction_spent:
            seen.refusal = (
                f"{tg.name} has {len(registered)} registered targets and "
                f"reconcile.max_deregister_fraction = {rc.max_deregister_fraction:g} lets "
                "none leave within reconcile.interval_seconds; add --force to drain it anyway"
            )
        else:
            seen.later = seen.later or _window_spent(state, tg, len(registered), rc)
    return seen
