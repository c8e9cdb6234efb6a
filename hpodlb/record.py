"""What a pass writes down: each node's record (verified, failed, backing off, its sessions), each
target's health and since when, what hpodlb registered, absences, the pass itself, and the head
node's own known_hosts pins.

Only the state file (a cache, never the source of truth: see `state.py`) and known_hosts are
written here, never AWS or a node. A node's failure is recorded as that node's, with its backoff;
a state or known_hosts that cannot be written is the pass's error, never a crash.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from hpodlb import health
from hpodlb.config import target_group_name
from hpodlb.context import Known, PassContext, log
from hpodlb.files import UntrustedPathError, make_trusted_dir, os_reason, write_atomically
from hpodlb.guards import guards_of, recent
from hpodlb.identity import KeyState
from hpodlb.intentmodel import Intents
from hpodlb.intents import IntentsError, update_intents
from hpodlb.jobs import Job, failure_text
from hpodlb.keystore import fingerprint, identity
from hpodlb.outcome import SOUND_RESULTS, PassOutcome
from hpodlb.planner import Action, Kind, Plan, Probe
from hpodlb.sshnode import known_hosts_name
from hpodlb.state import AbsenceRecord, NodeRecord, PassRecord, State, save_state
from hpodlb.targets import TargetGroup, TargetsError
from hpodlb.targetstate import HEALTHY

BACKOFF_FIRST_SECONDS = 10.0
BACKOFF_MAX_SECONDS = 600.0


def backoff_seconds(failures: int) -> float:
    return min(BACKOFF_FIRST_SECONDS * 2.0 ** max(failures - 1, 0), BACKOFF_MAX_SECONDS)


def fingerprints(pin: frozenset[str]) -> list[str]:
    return [fingerprint(line) for line in pin]


# -- what node jobs found ---------------------------------------------------------------------


def probed(ctx: PassContext, known: Known, ip: str, probe: Probe | Exception) -> None:
    if isinstance(probe, Exception):
        probe = Probe(error=failure_text(probe, "probe"))
    log.debug(
        "probed",
        ip=ip,
        instance_id=ctx.by_ip[ip].instance_id,
        offers=sorted(probe.offered or ()),
        fingerprints=fingerprints(frozenset((probe.offered or {}).values())),
        error=probe.error,
    )
    record = ctx.state.nodes[ip]
    if probe.offered is None:
        record.unreachable = True
        node_failed(ctx, ip, probe.error, backoff=False)
    elif record.unreachable:  # it answers again: whatever it failed before, retry now
        record.unreachable = False
        record.failures, record.retry_mono, record.retry_at = 0, None, None
        log.info("node_answers_again", ip=ip, instance_id=ctx.by_ip[ip].instance_id)
    known.probes[ip] = probe


def pushed(
    ctx: PassContext, known: Known, action: Action, result: dict[str, str] | Exception
) -> None:
    ip = action.ip
    node, record = ctx.by_ip[ip], ctx.state.nodes[ip]
    if isinstance(result, Exception):
        ctx.outcome.push_failures += 1
        node_failed(ctx, ip, failure_text(result, "push"), backoff=True)
        return
    known.probes[ip] = Probe(offered=result)
    record.failures, record.retry_mono, record.retry_at, record.last_error = 0, None, None, ""
    ctx.outcome.applied.append(action)
    log.info(
        "host_keys_pushed",
        ip=ip,
        instance_id=node.instance_id,
        fingerprints={t: k.fingerprint for t, k in known.keyset.items()},
    )


def counted(ctx: PassContext, job: Job, result: int | Exception) -> None:
    """A drained node's open SSH sessions, as of when its count ended, or why they could not be
    counted: a failed count backs the node off as a failed push does (its next count, and any
    push, wait), without failing the pass, which maintenance never decides."""
    ip = job.ip
    record, node = ctx.state.nodes[ip], ctx.by_ip[ip]
    if isinstance(result, Exception):
        why = failure_text(result, "sessions")  # `connect: ...` when the login failed
        record.sessions, record.sessions_error = None, why
        error = why if why.startswith("sessions:") else f"sessions: {why}"
        if record.failures and not record.last_error.startswith("sessions:"):
            # The node already backs off for another step (a push): its counts wait with it, and
            # that step's error and backoff stay, for that step alone to end.
            log.error(
                "node_failed", ip=ip, instance_id=node.instance_id, step="sessions", error=why
            )
        else:
            node_failed(ctx, ip, error, backoff=True, fails_pass=False)
    else:
        if result != record.sessions:
            log.info("drained_sessions", ip=ip, instance_id=node.instance_id, sessions=result)
        record.sessions, record.sessions_error = result, ""
        _end_count_backoff(record)
    ended = ctx.clock() if job.finished is None else job.finished
    record.sessions_at = ctx.wall() - (ctx.clock() - ended)


def _end_count_backoff(record: NodeRecord) -> None:
    """A count came back, or the node is no longer drained: a backoff its counts caused is over
    (one a push caused is the push's to end)."""
    if record.last_error.startswith("sessions:"):
        record.failures, record.retry_mono, record.retry_at = 0, None, None
        record.last_error = ""


def not_counted(ctx: PassContext, ip: str, why: str) -> None:
    record = ctx.state.nodes[ip]
    record.sessions, record.sessions_at, record.sessions_error = None, None, why


def node_failed(
    ctx: PassContext, ip: str, error: str, *, backoff: bool, fails_pass: bool = True
) -> None:
    """A node's step failed; with `backoff` (a push, a session count), the node's next push and
    count wait, longer each time; with `fails_pass` as well, the pass is not converged."""
    node, record = ctx.by_ip[ip], ctx.state.nodes[ip]
    step = error.split(":", 1)[0]
    record.last_error, record.last_error_at = error, ctx.wall()
    fields: dict[str, object] = {}
    if backoff:
        record.failures += 1
        wait_s = backoff_seconds(record.failures)
        record.retry_mono = ctx.clock() + wait_s
        record.retry_at = ctx.wall() + wait_s
        fields = {"failures": record.failures, "retry_in_seconds": wait_s}
        if fails_pass:
            ctx.error(f"{node.label()}: {error}")
    log.error("node_failed", ip=ip, instance_id=node.instance_id, step=step, error=error, **fields)


# -- at the end of the pass -------------------------------------------------------------------


def remember(ctx: PassContext, known: Known, final: Plan, groups: Sequence[TargetGroup]) -> None:
    """Everything the next pass and `status` need from this one (applying passes only)."""
    s = ctx.state
    _remember_health(ctx, known, groups)
    for arn, view in known.views.items():
        ours = set(s.registered_by_us.get(arn, []))
        for action in ctx.outcome.applied:  # in the order it happened
            if action.target_group != arn:
                continue
            if action.kind is Kind.REGISTER:
                ours.add(action.ip)
            elif action.kind is Kind.DEREGISTER:
                ours.discard(action.ip)
        if not ctx.act:  # what the acting head registered for login nodes is ours too, so
            # that after a takeover with prune = false they can still be removed
            ours |= {t.ip for t in view.targets if t.registered and t.ip in ctx.by_ip}
        s.registered_by_us[arn] = sorted(ours)
        s.absent[arn] = {
            ip: AbsenceRecord(passes=a.passes, since=a.since, instance_id=a.instance_id)
            for ip, a in final.absent.get(arn, {}).items()
        }
    _remember_departures(ctx)
    configured = {g.arn for g in groups}
    for table in (s.registered_by_us, s.absent, s.targets, s.target_errors, s.departures):
        for arn in [a for a in table if a not in configured]:
            del table[arn]
    _remember_nodes(ctx, known, final)
    s.boot_id = ctx.boot_id
    if known.keyset:  # none with host keys off
        _write_known_hosts(ctx, known)


def _remember_departures(ctx: PassContext) -> None:
    """This pass's deregistrations, stamped with its start, beside those of earlier passes still
    inside max_deregister_fraction's window (`guards.recent`): the next pass, however soon it
    comes and whoever runs it, spends the same budget."""
    guards = guards_of(ctx.config.reconcile)
    s = ctx.state
    left = Counter(a.target_group for a in ctx.outcome.applied if a.kind is Kind.DEREGISTER)
    for arn in set(s.departures) | set(left):
        kept = recent(s.departures.get(arn, []), ctx.now, guards) + [ctx.now] * left[arn]
        if kept:
            s.departures[arn] = kept
        else:
            s.departures.pop(arn, None)


def _remember_health(ctx: PassContext, known: Known, groups: Sequence[TargetGroup]) -> None:
    """Each target's state and since when; a login node unhealthy for longer than its group's
    health-check window is warned about once and keeps the pass from converging. Health is
    reported, never acted on."""
    by_arn = {g.arn: g for g in groups}
    now = ctx.now
    for arn, view in known.views.items():
        before = ctx.state.targets.get(arn, [])
        records = health.track(before, view.targets, now, ctx.wall())
        ctx.state.targets[arn] = records
        group = by_arn[arn]
        warned = {r.ip for r in before if r.warned}
        for record in records:
            if record.ip in warned and record.state == HEALTHY:
                log.info("target_healthy_again", ip=record.ip, target_group=group.name)
        window = health.window_seconds(group.info)
        serving = {ip: n for ip, n in ctx.by_ip.items() if ip not in known.drains}
        for record in health.overdue(records, serving, window, now):
            node = ctx.by_ip[record.ip]
            line = (
                f"{node.label()} on {group.name}: {health.describe(record)} for "
                f"{now - (record.since_mono or now):.0f}s (health-check window "
                f"{window:.0f}s); likely fix: {health.likely_fix(record.reason)}"
            )
            ctx.outcome.unhealthy.append(line)
            if not record.warned:
                record.warned = True
                log.warning(
                    "target_unhealthy",
                    ip=record.ip,
                    instance_id=node.instance_id,
                    target_group=group.name,
                    state=record.state,
                    reason=record.reason,
                    description=record.description,
                    window_seconds=window,
                    fix=health.likely_fix(record.reason),
                )


def _remember_nodes(ctx: PassContext, known: Known, final: Plan) -> None:
    """Each login node's record; the nodes no longer listed are forgotten. A node whose keys a
    probe of this pass verified is recorded as verified (and an admin's trust request for it,
    now used, is removed)."""
    keep: dict[str, NodeRecord] = {}
    verified_set = identity(known.keyset) if known.keyset else ""
    consumed: list[str] = []
    for node in ctx.nodes:
        record = ctx.state.nodes[node.ip]
        record.instance_id, record.name, record.group = node.instance_id, node.name, node.group
        drain = known.drains.get(node.ip)
        record.drained = drain.reason if drain else ""
        if drain is None:
            record.sessions, record.sessions_at, record.sessions_error = None, None, ""
            _end_count_backoff(record)
        j = final.judgements.get(node.ip)
        probe = known.probes.get(node.ip)
        if j is not None:
            if j.state is KeyState.UNKNOWN_KEYS and record.key_state != j.state.value:
                log.warning(
                    "host_keys_held", ip=node.ip, instance_id=node.instance_id, why=j.detail
                )
            record.key_state, record.key_detail = j.state.value, j.detail
        if j is not None and j.state is KeyState.IN_SYNC and probe and not probe.skipped:
            if record.verified_instance_id != node.instance_id:
                log.info("host_keys_verified", ip=node.ip, instance_id=node.instance_id)
            record.verified_instance_id, record.verified_keys = node.instance_id, verified_set
            record.verified_at, record.verified_mono = ctx.wall(), ctx.now
            if not record.unreachable and record.retry_mono is None:
                record.last_error = ""
            if node.ip in known.facts.trusted:
                consumed.append(node.ip)
        keep[node.ip] = record
    ctx.state.nodes = keep
    if consumed:

        def forget(intents: Intents) -> None:
            for ip in consumed:
                intents.trust.pop(ip, None)

        try:
            update_intents(ctx.config.state.dir, forget)
        except (IntentsError, OSError) as exc:
            ctx.error(f"cannot update {ctx.config.state.dir}/intents.json: {exc}")


def _write_known_hosts(ctx: PassContext, known: Known) -> None:
    """The head node's own pins: verified nodes and the canonical keys, for an admin's ssh."""
    lines = [
        f"{known_hosts_name(n.ip, ctx.config.ssh.port)} {k.public}"
        for n in ctx.nodes
        if ctx.state.nodes[n.ip].verified_instance_id == n.instance_id
        for k in known.keyset.values()
    ]
    path = ctx.config.state.dir / "known_hosts"
    data = "".join(f"{x}\n" for x in lines).encode()
    try:
        if path.exists() and path.read_bytes() == data:
            return
        make_trusted_dir(path.parent)
        write_atomically(path, data, 0o644)
    except (OSError, UntrustedPathError) as exc:
        ctx.error(f"{path}: cannot write ({os_reason(exc)})")
        log.error("known_hosts_unwritable", path=str(path), error=str(exc))


def held_lines(plan: Plan) -> list[str]:
    return [
        f"{a.kind.value} {a.ip}"
        + (f" on {target_group_name(a.target_group)}" if a.target_group else "")
        + f": held by {a.held_by.value}: {a.reason}"
        for a in plan.held()
        if a.held_by
    ]


def record_pass(state: State, outcome: PassOutcome, started: float, finished: float) -> None:
    """The pass itself, for `status`, `doctor`, `drain --wait` and the metrics after a restart."""
    plan = outcome.plan or Plan()
    errors = [outcome.inventory_error] if outcome.inventory_error else list(outcome.errors)
    state.last_pass = PassRecord(
        started_at=started,
        finished_at=finished,
        ok=outcome.converged,
        summary=outcome.summary(),
        standby=outcome.standby,
        login_groups=outcome.groups_source,
        errors=errors,
        held=held_lines(plan),
        waiting=[f"{w.node.label()}: {w.reason}" for w in plan.waiting],
        unhealthy=list(outcome.unhealthy),
    )
    if state.first_pass_at is None:
        state.first_pass_at = started
    if outcome.result in SOUND_RESULTS:
        state.last_converged_at = finished


def save_outcome(state_dir: Path, state: State, outcome: PassOutcome) -> None:
    """Save the state after a pass; a state that cannot be saved is this pass's error (the pass
    is then not converged, and says so), never a crash."""
    try:
        save_state(state_dir, state)
    except (OSError, UntrustedPathError) as exc:
        error = f"cannot save the state in {state_dir}: {os_reason(exc)}"
        outcome.errors.append(error)
        log.error("state_unwritable", state_dir=str(state_dir), error=error)


# -- times ------------------------------------------------------------------------------------


def rebase(state: State, boot_id: str, now: float) -> None:
    """Monotonic times from another boot mean nothing here: restart windows, retry now; times
    from this boot are capped, so no stored value can hold a node back longer than the backoff."""
    if state.boot_id != boot_id:
        for table in state.absent.values():
            for record in table.values():
                record.since = now
        for targets in state.targets.values():
            for target in targets:
                target.since_mono = now
        for arn, times in state.departures.items():  # still spent: the window starts again
            state.departures[arn] = [now] * len(times)
        for node in state.nodes.values():
            node.verified_mono = None
            node.retry_mono, node.retry_at = None, None
        state.boot_id = boot_id
    for arn, times in state.departures.items():  # none from the future: each window ends
        state.departures[arn] = [min(t, now) for t in times]
    for node in state.nodes.values():
        if node.retry_mono is not None and node.retry_mono > now + BACKOFF_MAX_SECONDS:
            node.retry_mono = now + BACKOFF_MAX_SECONDS
        if node.verified_mono is not None and node.verified_mono > now:
            node.verified_mono = None


def record_live_health(
    groups: Sequence[TargetGroup], state: State, boot_id: str, now: float, wall: float
) -> None:
    """Ask AWS now for every group's targets and fold them into `state` (for `status --live`):
    what changes nothing but the record of what the NLB says."""
    rebase(state, boot_id, now)
    for group in groups:
        try:
            view = group.observe()
        except TargetsError as exc:
            state.target_errors[group.arn] = (
                f"{exc} (asked live: the health shown for this group is the last pass's)"
            )
            continue
        state.target_errors.pop(group.arn, None)
        state.targets[group.arn] = health.track(
            state.targets.get(group.arn, []), view.targets, now, wall
        )
