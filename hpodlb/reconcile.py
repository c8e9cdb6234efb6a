"""One pass: read the desired set, observe the world, and plan and apply as it becomes known.

This is the only module that puts inventory, target groups, host keys, planner and state together.
It decides nothing itself: it asks the pure planner again each time a node's probe or key push
comes back, and applies what became runnable. Each login node runs as its own pipeline (probe,
push, verify, register) on a thread pool: a healthy node is registered as soon as its own probe
verifies, whatever another node's SSH is doing; registrations that become ready together share one
AWS call. AWS writes happen on this thread only, in this order of urgency: nodes serving the wrong
identity leave as soon as that is known, verified nodes join as soon as they verify, and targets no
login node accounts for leave last, once no probe or push can still claim the deregistration budget.

Faults stay where they happen: a bad resource config stops the pass before any AWS write; a target
group that cannot be read, or is not what the config says, gets no action; a node's fault (any
exception, not only the expected ones) is that node's failure; a bug in the pass itself is recorded
as a crashed pass, never a crashed daemon. The outcome says all of it: `converged` only when nothing
failed and nothing is left to do, hold or wait for.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from hpodlb import health
from hpodlb.config import Config, target_group_name
from hpodlb.files import UntrustedPathError, make_trusted_dir, write_atomically
from hpodlb.guards import Guards, guards_of
from hpodlb.hostkeys import HostKeys
from hpodlb.hyperpod import ClusterError, HyperPod
from hpodlb.identity import KEYS_SETTLED, KeyState
from hpodlb.intentmodel import DrainRequest, Intents
from hpodlb.intents import IntentsError, intents_path, load_intents, update_intents
from hpodlb.inventory import (
    Answer,
    InventoryError,
    LoginNode,
    cluster_of,
    login_group_names,
    read_login_nodes,
)
from hpodlb.keystore import KeySet, KeyStore, KeyStoreError, fingerprint, identity
from hpodlb.leader import CONFIRM_SECONDS, Leadership
from hpodlb.logs import get_logger
from hpodlb.planner import (
    Absence,
    Action,
    Drain,
    GroupView,
    KeyFacts,
    Kind,
    Memory,
    Plan,
    Probe,
    Target,
    plan_pass,
)
from hpodlb.sessions import NO_LOGINS, count_seconds, count_sessions
from hpodlb.sshnode import SshError, known_hosts_name
from hpodlb.state import (
    AbsenceRecord,
    NodeRecord,
    PassRecord,
    State,
    save_state,
)
from hpodlb.targets import BATCH_SIZE, TargetGroup, TargetsError
from hpodlb.targetstate import HEALTHY, registered_ips

log = get_logger("hpodlb.pass")

BACKOFF_FIRST_SECONDS = 10.0
BACKOFF_MAX_SECONDS = 600.0
WORKERS = 8  # node pipelines at a time: 8 SSH handshakes keep 2 cores busy
LINGER_SECONDS = 0.5  # a node ready to register waits this long for others to share the call
GATHER_SECONDS = 0.05  # results that come in this close together make one re-plan, not several
BEAT_SECONDS = 0.25  # a pass waiting on node jobs wakes this often, to say it is alive
PROBE = "probe"
SESSIONS = "sessions"  # counting a drained node's SSH connections
CLUSTER_RETRY_SECONDS = 600.0  # DescribeCluster failed: asked again after this long
PLATFORM_SECONDS = 300.0  # ListClusterNodes again after this long, if the same nodes still wait


def backoff_seconds(failures: int) -> float:
    return min(BACKOFF_FIRST_SECONDS * 2.0 ** max(failures - 1, 0), BACKOFF_MAX_SECONDS)


def read_boot_id() -> str:
    """Monotonic times are comparable only within one boot; this names the boot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class KeySide:
    """The host-key side of a pass: the canonical store and the nodes' keys (None: disabled)."""

    store: KeyStore
    nodes: HostKeys
    adopt: bool
    probe_interval_seconds: float
    ssh_port: int
    timeout_seconds: float


@dataclass
class PassOutcome:
    nodes: tuple[LoginNode, ...] = ()
    plan: Plan | None = None  # after applying: what is still to do, held back or waiting
    inventory_error: str | None = None
    errors: list[str] = field(default_factory=list)
    applied: list[Action] = field(default_factory=list)  # in the order it happened
    leadership: Leadership | None = None  # None: not asked (a dry run)
    groups_source: str = ""  # `login-a (from ...)`
    unhealthy: list[str] = field(default_factory=list)  # login nodes' targets unhealthy too long
    duration_seconds: float = 0.0
    crashed: bool = False  # a bug cost this pass (it is in `errors` too)
    push_failures: int = 0  # key pushes that failed (the pushes that worked are in `applied`)

    @property
    def standby(self) -> str:
        """`standby (controller: NAME)` when another head acts and this pass only observed."""
        return self.leadership.label if self.leadership else ""

    @property
    def converged(self) -> bool:
        """Nothing failed, nothing is left to do, held back or waiting after this pass, and no
        login node's target has been unhealthy for longer than its health-check window."""
        if self.inventory_error or self.errors or self.unhealthy or self.plan is None:
            return False
        return self.plan.settled

    @property
    def result(self) -> str:
        """`converged`, `standby` (another head is in control and nothing failed: what `once`
        exits 0 for), `crashed` or `not_converged`: hpodlb_passes_total's label."""
        if self.crashed:
            return "crashed"
        if self.leadership is not None and not self.leadership.acting:
            sound = self.leadership.sound and not self.errors and not self.inventory_error
            return "standby" if sound else "not_converged"
        return "converged" if self.converged else "not_converged"

    def summary(self) -> str:
        if self.inventory_error:
            return f"no change: {self.inventory_error}"
        plan = self.plan or Plan()
        done = Counter(a.kind for a in self.applied)
        drained = f" ({len(plan.drained)} drained)" if plan.drained else ""
        return (
            f"{len(self.nodes)} login nodes{drained}; registered {done[Kind.REGISTER]}, "
            f"deregistered {done[Kind.DEREGISTER]}, keys pushed {done[Kind.PUSH_KEYS]}; "
            f"{len(plan.held())} held back, {len(plan.waiting)} waiting, "
            f"{len(self.unhealthy)} unhealthy, {len(self.errors)} errors"
        )


class Reconciler:
    """Holds the adapters for one config; `run_pass` is what `plan`, `once` and `run` call."""

    def __init__(
        self,
        config: Config,
        groups: Sequence[TargetGroup],
        keys: KeySide | None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        boot_id: str | None = None,
        workers: int = WORKERS,
        leader: Callable[[], Leadership] = lambda: Leadership(True, why="one head"),
        hyperpod: HyperPod | None = None,
    ) -> None:
        self.config = config
        self.groups = list(groups)
        self.keys = keys
        self.clock = clock
        self.wall = wall
        self.boot_id = read_boot_id() if boot_id is None else boot_id
        self.workers = workers
        self.leader = leader
        self.sleep = time.sleep
        self.hyperpod = hyperpod
        # DescribeCluster's answer per (cluster ARN, the resource config's group names): asked at
        # start, on reload (a new Reconciler) and when the groups change, not every pass.
        self._cluster_groups: dict[tuple[str, tuple[str, ...]], Answer | None] = {}
        # Failed asks: not again before the monotonic time, and why they failed.
        self._cluster_failed: dict[tuple[str, tuple[str, ...]], tuple[float, str]] = {}
        self.cluster_answers: dict[str, list[str]] = {}  # by ARN; kept in the state file
        self.groups_source = ""  # `login-a (from ...)`, as the last desired() found it
        self.platform_unknown = False  # ListClusterNodes failed (warned once)
        self.platform_asked: float | None = None  # monotonic, the last ListClusterNodes
        self.platform_unsettled: frozenset[str] = frozenset()  # the nodes it was asked for
        self.platform_statuses: dict[str, str] = {}  # its answer: InstanceId -> status
        self.leadership: Leadership | None = None  # the last decision, to log its changes

    def login_groups(self) -> Answer:
        cluster = self.config.cluster
        return login_group_names(
            cluster.login_groups, cluster.provisioning_parameters, self._from_cluster
        )

    def desired(self) -> tuple[LoginNode, ...]:
        cluster = self.config.cluster
        names, source = self.login_groups()
        self.groups_source = f"{', '.join(names)} (from {source})"
        return read_login_nodes(cluster.resource_config, names, cluster.networks())

    def _from_cluster(self) -> Answer | None:
        """The cluster's Login instance groups (DescribeCluster), for clusters configured through
        the API. When it cannot be asked (denied, unreachable; then again after
        CLUSTER_RETRY_SECONDS), its last answer as the state file kept it; None when there is
        none, or no group is marked Login."""
        if self.hyperpod is None:
            return None
        arn, names = cluster_of(self.config.cluster.resource_config)
        key = (arn, names)
        if not arn:
            return None
        if key in self._cluster_groups:
            return self._cluster_groups[key]
        failed = self._cluster_failed.get(key)
        if failed is not None and self.clock() < failed[0]:
            return self._remembered(arn, failed[1])
        try:
            groups = self.hyperpod.login_groups(arn)
        except ClusterError as exc:
            if key not in self._cluster_failed:  # warned once, not every pass
                log.warning(
                    "cluster_login_groups_unknown",
                    cluster=arn,
                    error=str(exc),
                    fix="grant sagemaker:DescribeCluster, or set cluster.login_groups",
                    action="DescribeCluster's last answer if the state file has one, else "
                    "login-group if the resource config has it, else no change",
                )
            self._cluster_failed[key] = (self.clock() + CLUSTER_RETRY_SECONDS, str(exc))
            return self._remembered(arn, str(exc))
        self._cluster_failed.pop(key, None)
        answer = (groups, f"the cluster's Login instance groups, DescribeCluster {arn}")
        self._cluster_groups[key] = answer if groups else None
        if groups:
            self.cluster_answers[arn] = list(groups)
        log.info("cluster_login_groups", cluster=arn, groups=list(groups))
        return self._cluster_groups[key]

    def _remembered(self, arn: str, error: str) -> Answer | None:
        groups = self.cluster_answers.get(arn)
        if not groups:
            return None
        return tuple(groups), f"DescribeCluster's last answer for {arn} (now: {error})"

    def guards(self) -> Guards:
        return guards_of(self.config.reconcile)

    def observe_health(self, state: State) -> None:
        """Ask AWS now for every group's targets and fold them into `state` (for `status --live`):
        what changes nothing but the record of what the NLB says."""
        now, wall = self.clock(), self.wall()
        _rebase(state, self.boot_id, now)
        for group in self.groups:
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

    def _lead(self) -> Leadership:
        """Whether this head acts in this pass; a change is logged once, as it happens. A backup
        head about to take over asks again a moment later: one ping the primary missed under load
        must not make two heads act."""
        lead = self.leader()
        before = self.leadership
        if lead.takes_over and (before is None or not before.acting):
            self.sleep(CONFIRM_SECONDS)
            lead = self.leader()
        if before is None or (lead.acting, lead.controller) != (before.acting, before.controller):
            event = "leadership_acting" if lead.acting else "leadership_standby"
            level = log.info if lead.acting else log.warning
            level(event, controller=lead.controller, why=lead.why)
        self.leadership = lead
        return lead

    def run_pass(
        self, state: State, *, apply: bool, beat: Callable[[], None] = lambda: None
    ) -> PassOutcome:
        """One level-triggered pass; mutates `state` only when `apply` is true.

        `beat` is called whenever the pass advances (and at least every BEAT_SECONDS while it
        waits on node jobs, each bounded by its deadline): the daemon's watchdog follows it, so a
        long pass over many slow nodes is alive, and one stuck in a call is not."""
        started, started_wall = self.clock(), self.wall()
        outcome = PassOutcome()
        if apply:
            outcome.leadership = self._lead()
        work = state if apply else state.model_copy(deep=True)
        self.cluster_answers = {**work.cluster_login_groups, **self.cluster_answers}
        try:
            outcome.nodes = self.desired()
            outcome.groups_source = self.groups_source
        except InventoryError as exc:
            outcome.inventory_error = str(exc)
            log.error("inventory_invalid", error=str(exc), action="no change this pass")
        if outcome.inventory_error is None:
            try:
                acting = outcome.leadership is None or outcome.leadership.acting
                _Pass(self, work, outcome, apply=apply, act=acting, beat=beat).run()
            except Exception as exc:  # a bug must cost one pass, and the pass must say so
                log.exception("pass_crashed")
                outcome.errors.append(f"pass crashed: {type(exc).__name__}: {exc}")
                outcome.crashed = True
        outcome.duration_seconds = self.clock() - started
        if apply:
            work.cluster_login_groups = dict(self.cluster_answers)
            _record_pass(work, outcome, started_wall, self.wall())
        return outcome


class _Pass:
    """One pass in progress: what is known so far, what was done, what is still running."""

    def __init__(
        self,
        rec: Reconciler,
        state: State,
        outcome: PassOutcome,
        *,
        apply: bool,
        act: bool = True,
        beat: Callable[[], None],
    ):
        self.rec = rec
        self.beat = beat
        self.state = state
        self.outcome = outcome
        self.apply = apply
        self.act = act  # False: another head acts; this pass observes and records only
        self.nodes = outcome.nodes
        self.by_ip = {n.ip: n for n in self.nodes}
        self.now = rec.clock()
        self.views: dict[str, GroupView] = {}
        self.start_registered: dict[str, int] = {}
        self.spent: Counter[str] = Counter()
        self.attempted: set[tuple[Kind, str, str]] = set()
        self.probes: dict[str, Probe] = {}
        self.jobs: dict[Future[Any], _Job] = {}
        self.ready_since: dict[tuple[str, str], float] = {}  # (group, ip) ready to register
        self.keyset: KeySet = {}
        self.facts = KeyFacts()
        self.intents = Intents()
        self.drains: dict[str, DrainRequest] = {}  # the admin's drains in force this pass, by IP

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> None:
        log.debug("pass_started", login_nodes=len(self.nodes), apply=self.apply)
        _rebase(self.state, self.rec.boot_id, self.now)
        for node in self.nodes:
            self.state.nodes.setdefault(node.ip, NodeRecord())
        self._read_intents()
        self._observe_groups()
        self.facts = replace(self._key_facts(), platform=self._platform())
        pool = ThreadPoolExecutor(
            max_workers=max(1, min(self.rec.workers, len(self.nodes))),
            thread_name_prefix="hpodlb-node",
        )
        try:
            self._start_probes(pool)
            self._start_session_counts(pool)
            while True:
                self.beat()
                plan = self._plan()
                if self.apply and self.act and self._act(plan, pool):
                    continue
                if not self.jobs:
                    break
                self._collect()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        final = self._plan()
        self.outcome.plan = final
        for action in final.held():
            log.warning(
                "held_back",
                kind=action.kind.value,
                ip=action.ip,
                instance_id=action.instance_id,
                target_group=target_group_name(action.target_group),
                guard=action.held_by.value if action.held_by else "",
                reason=action.reason,
            )
        if self.apply:
            self._remember(final)

    def _plan(self) -> Plan:
        s = self.state
        memory = Memory(
            absent={
                arn: {ip: Absence(r.passes, r.since, r.instance_id) for ip, r in table.items()}
                for arn, table in s.absent.items()
            },
            registered_by_us=s.registered_by_us,
            last_instance={ip: r.instance_id for ip, r in s.nodes.items() if r.instance_id},
            start_registered=self.start_registered,
            spent=self.spent,
        )
        drained = {ip: Drain(d.reason, d.force) for ip, d in self.drains.items()}
        return plan_pass(
            self.nodes,
            list(self.views.values()),
            self.facts,
            self.rec.guards(),
            memory,
            self.now,
            drained,
        )

    def _act(self, plan: Plan, pool: ThreadPoolExecutor) -> bool:
        """Start or apply what became runnable and was not tried yet; True if anything was."""

        def fresh(kind: Kind) -> list[Action]:
            return [
                a
                for a in plan.runnable(kind)
                if (a.kind, a.target_group, a.ip) not in self.attempted
            ]

        def start(action: Action) -> None:
            self.attempted.add((action.kind, action.target_group, action.ip))

        adopt = plan.runnable(Kind.ADOPT)
        if adopt:  # nothing else until the canonical keys exist
            if not fresh(Kind.ADOPT):
                return False
            start(adopt[0])
            self._submit(pool, adopt[0], self._adopt_job(adopt[0]))
            return True
        # Wrong identities leave before anything else happens to them; pushes start; the
        # verified join. Deregistrations first, so each re-plan counts them against the budget.
        leaving = [a for a in fresh(Kind.DEREGISTER) if a.ip in self.by_ip]
        for action in leaving:
            start(action)
        did = self._write(Kind.DEREGISTER, leaving)
        for action in fresh(Kind.PUSH_KEYS):
            start(action)
            self._submit(pool, action, self._push_job(action, plan))
            did = True
        joining = [a for a in fresh(Kind.REGISTER) if not a.after_push]
        if self._ready_to_join(joining):
            for action in joining:
                start(action)
            did = self._write(Kind.REGISTER, joining) or did
        if all(job.what == SESSIONS for job in self.jobs.values()):  # last, with what is left
            # of the budget, once no probe or push can claim it (a session count cannot)
            strays = [a for a in fresh(Kind.DEREGISTER) if a.ip not in self.by_ip]
            for action in strays:
                start(action)
            did = self._write(Kind.DEREGISTER, strays) or did
            for action in fresh(Kind.RETIRE_PREVIOUS):
                start(action)
                self._retire_previous(action)
                did = True
        return did

    def _ready_to_join(self, joining: Sequence[Action]) -> bool:
        """Nodes ready close together join in one call: a ready node waits at most LINGER_SECONDS
        for company while other nodes' jobs run, never for those jobs to end."""
        now = self.rec.clock()
        keys = {(a.target_group, a.ip) for a in joining}
        self.ready_since = {k: t for k, t in self.ready_since.items() if k in keys}
        for key in keys:
            self.ready_since.setdefault(key, now)
        if not joining:
            return False
        oldest = min(self.ready_since.values())
        return not self.jobs or len(joining) >= BATCH_SIZE or now - oldest >= LINGER_SECONDS

    # -- the admin's intents ----------------------------------------------------------------------

    def _read_intents(self) -> None:
        """Trust requests and drains. When intents.json cannot be read, or is gone while the last
        pass had drains, the drains this state remembers stay in force and the pass says why:
        a lost file must not put a node under maintenance back in front of users."""
        state_dir = self.rec.config.state.dir
        remembered = self.state.drains
        try:
            self.intents = load_intents(state_dir)
        except IntentsError as exc:
            self._error(str(exc))
            log.error("intents_unusable", error=str(exc), action="drains kept as last known")
            self.drains = dict(remembered)
            return
        self.drains = dict(self.intents.drain)
        if remembered and not intents_path(state_dir).exists():
            ips = ", ".join(sorted(remembered))
            line = (
                f"{intents_path(state_dir)} is gone, but the last pass had {ips} drained: kept out "
                "of rotation as last known; `hpodlb drain IP` confirms a drain (and writes the "
                "file again), `hpodlb undrain IP` puts a node back"
            )
            self._error(line)
            log.error("drain_intents_lost", drained=sorted(remembered), error=line)
            self.drains = dict(remembered)
        if self.apply:
            self.state.drains = dict(self.drains)

    def _start_session_counts(self, pool: ThreadPoolExecutor) -> None:
        """A drained node's open SSH connections, for `status` and `drain --wait` readers: counted
        in a session pinned to the canonical keys (current or previous), never to anything else."""
        side = self.rec.keys
        if not (self.apply and self.act):  # a dry run, or a standby head: no logins for this
            return
        pin = frozenset(self.facts.current.values()) | frozenset(self.facts.previous.values())
        for ip in sorted(set(self.drains) & set(self.by_ip)):
            record = self.state.nodes[ip]
            if side is None or not pin:
                record.sessions, record.sessions_at = None, None
                record.sessions_error = (
                    NO_LOGINS if side is None else "no canonical host keys to vouch for the node"
                )
                continue
            job = partial(count_sessions, side.nodes.connector, ip, pin)
            self._submit(pool, ip, job, what=SESSIONS)

    def _counted(self, ip: str, result: int | Exception) -> None:
        record, node = self.state.nodes[ip], self.by_ip[ip]
        if isinstance(result, Exception):
            record.sessions, record.sessions_error = None, _error_text(result, SESSIONS)
        else:
            if result != record.sessions:
                log.info("drained_sessions", ip=ip, instance_id=node.instance_id, sessions=result)
            record.sessions, record.sessions_error = result, ""
        record.sessions_at = self.rec.wall()

    # -- target groups ----------------------------------------------------------------------------

    def _observe_groups(self) -> None:
        for group in self.rec.groups:
            self.beat()
            try:
                view = group.observe()
                problem = group.problem(self.now)
            except TargetsError as exc:
                self.outcome.errors.append(str(exc))
                self.state.target_errors[group.arn] = str(exc)
                log.error(
                    "target_group_unreadable",
                    target_group=group.name,
                    code=exc.code,
                    error=str(exc),
                    action="no change to this target group this pass",
                )
                continue
            if problem:
                self.outcome.errors.append(problem)
                log.error("target_group_refused", target_group=group.name, error=problem)
                view = replace(view, problem=problem)
            self.state.target_errors.pop(group.arn, None)
            self.views[group.arn] = view
            self.start_registered[group.arn] = len(registered_ips(view.targets, view.port))

    def _write(self, kind: Kind, actions: Sequence[Action]) -> bool:
        """Apply registrations or deregistrations, one call per group (batched by the adapter)."""
        by_group: dict[str, list[Action]] = {}
        for action in actions:
            by_group.setdefault(action.target_group, []).append(action)
        groups = {g.arn: g for g in self.rec.groups}
        for arn, group_actions in by_group.items():
            group = groups[arn]
            self.beat()
            write = group.register if kind is Kind.REGISTER else group.deregister
            result = write([a.ip for a in group_actions])
            done = set(result.done)
            for action in group_actions:
                if action.ip in done:
                    self._applied_to_group(kind, action)
            for ip, reason in result.refused.items():
                self._error(f"{group.name}: AWS refused {kind.value} of {ip}: {reason}")
                log.error(f"{kind.value}_refused", target_group=group.name, ip=ip, reason=reason)
            if result.error is not None:
                self._error(str(result.error))
                log.error(
                    f"{kind.value}_failed",
                    target_group=group.name,
                    code=result.error.code,
                    ips=sorted(result.failed),
                    error=str(result.error),
                )
            if result.refused:
                self._recheck(group)
        return bool(actions)

    def _applied_to_group(self, kind: Kind, action: Action) -> None:
        view = self.views[action.target_group]
        state, why = (
            ("initial", "Elb.RegistrationInProgress")
            if kind is Kind.REGISTER
            else ("draining", "Target.DeregistrationInProgress")
        )
        others = tuple(t for t in view.targets if (t.ip, t.port) != (action.ip, view.port))
        updated = replace(view, targets=(*others, Target(action.ip, view.port, state, why)))
        self.views[view.arn] = updated
        if kind is Kind.DEREGISTER:
            self.spent[view.arn] += 1
        self.outcome.applied.append(action)
        log.info(
            f"{kind.value}ed",
            ip=action.ip,
            instance_id=action.instance_id,
            target_group=target_group_name(action.target_group),
            port=action.port,
            reason=action.reason,
        )

    def _recheck(self, group: TargetGroup) -> None:
        """AWS refused a target as invalid: make sure the group itself is still what we think."""
        try:
            problem = group.problem(self.rec.clock())
        except TargetsError as exc:
            problem = str(exc)
        if problem:
            self.views[group.arn] = replace(self.views[group.arn], problem=problem)
            self._error(problem)

    # -- the platform -----------------------------------------------------------------------------

    def _platform(self) -> dict[str, str]:
        """HyperPod's status of the login nodes (ListClusterNodes): it explains an unreachable
        node ("being replaced: Pending") and keeps keys from an instance being shut down. Asked
        only while some login node is not known in sync, and then again only when that set
        changes or PLATFORM_SECONDS have passed (a node held for an admin must not cost a
        listing every pass). Denied or unreachable: as if it did not exist."""
        rec, records = self.rec, self.state.nodes
        unsettled = frozenset(
            n.ip
            for n in self.nodes
            if records[n.ip].key_state not in KEYS_SETTLED
            or records[n.ip].unreachable
            or records[n.ip].instance_id != n.instance_id
        )
        if rec.hyperpod is None or rec.keys is None or not unsettled:
            for record in records.values():  # nothing to explain: no stale word stays behind
                record.platform_status = ""
            return {}  # with host keys off nothing is pushed, and nothing is probed
        fresh = rec.platform_asked is not None and self.now - rec.platform_asked < PLATFORM_SECONDS
        if not (fresh and unsettled == rec.platform_unsettled):
            rec.platform_asked, rec.platform_unsettled = self.now, unsettled
            rec.platform_statuses = self._list_cluster_nodes()
        found = {
            n.ip: rec.platform_statuses[n.instance_id]
            for n in self.nodes
            if n.instance_id in rec.platform_statuses
        }
        for ip, record in records.items():
            record.platform_status = found.get(ip, "")
        return found

    def _list_cluster_nodes(self) -> dict[str, str]:
        hyperpod = self.rec.hyperpod
        assert hyperpod is not None
        groups = {n.group for n in self.nodes}
        try:
            arn, _ = cluster_of(self.rec.config.cluster.resource_config)
            if not arn:
                return {}
            self.beat()
            return hyperpod.node_statuses(arn, groups.pop() if len(groups) == 1 else "")
        except (ClusterError, InventoryError) as exc:
            if not self.rec.platform_unknown:
                self.rec.platform_unknown = True
                log.warning(
                    "cluster_node_status_unknown",
                    error=str(exc),
                    fix="grant sagemaker:ListClusterNodes to see why nodes are unreachable",
                )
            return {}

    # -- host keys --------------------------------------------------------------------------------

    def _key_facts(self) -> KeyFacts:
        side = self.rec.keys
        if side is None:
            return KeyFacts(enabled=False)
        unavailable, current, previous = "", {}, {}
        try:
            if not side.store.is_empty():
                self.keyset = side.store.load()
                current = {t: k.public for t, k in self.keyset.items()}
                previous = {t: k.public for t, k in side.store.load_previous().items()}
        except (KeyStoreError, OSError) as exc:
            unavailable = f"key store refused: {exc}"
            log.error("host_keys_unavailable", store=str(side.store.path), error=str(exc))
        trusted = {ip: (r.instance_id, frozenset(r.keys)) for ip, r in self.intents.trust.items()}
        records = self.state.nodes
        return KeyFacts(
            enabled=True,
            current=current,
            previous=previous,
            unavailable=unavailable,
            adopt=side.adopt,
            verified={ip: r.verified_instance_id for ip, r in records.items()},
            trusted=trusted,
            backing_off=self._backing_off(),
        )

    def _backing_off(self) -> dict[str, str]:
        return {
            ip: f"retry in {r.retry_mono - self.now:.0f}s after: {r.last_error}"
            for ip, r in self.state.nodes.items()
            if ip in self.by_ip and r.retry_mono is not None and r.retry_mono > self.now
        }

    def _start_probes(self, pool: ThreadPoolExecutor) -> None:
        side = self.rec.keys
        if side is None:
            return
        verified_set = identity(self.keyset) if self.keyset else ""
        for node in self.nodes:
            r = self.state.nodes[node.ip]
            recent = (
                side.probe_interval_seconds > 0
                and r.key_state == KeyState.IN_SYNC.value
                and r.verified_instance_id == node.instance_id
                and bool(verified_set)
                and r.verified_keys == verified_set
                and r.verified_mono is not None
                and 0 <= self.now - r.verified_mono < side.probe_interval_seconds
            )
            if recent:
                self.probes[node.ip] = Probe(skipped=True)
            else:
                self._submit(pool, node.ip, partial(side.nodes.probe, node.ip))
        self.facts = replace(self.facts, probes=dict(self.probes))

    def _push_job(self, action: Action, plan: Plan) -> Callable[[], Any]:
        assert self.rec.keys is not None
        nodes, keys = self.rec.keys.nodes, dict(self.keyset)
        if plan.judgements[action.ip].state is KeyState.NEW_INSTANCE:
            log.warning(
                "ssh_trust_on_first_use",
                ip=action.ip,
                instance_id=action.instance_id,
                fingerprints=sorted(_fingerprints(action.pin)),
                why="a new instance: the push session must present exactly what its probe showed",
            )
        return partial(nodes.push, action.ip, keys, action.pin)

    def _adopt_job(self, action: Action) -> Callable[[], Any]:
        assert self.rec.keys is not None
        nodes = self.rec.keys.nodes
        return partial(nodes.read_keys, action.ip, action.pin)

    def _submit(
        self,
        pool: ThreadPoolExecutor,
        subject: Action | str,
        job: Callable[[], Any],
        what: str = PROBE,
    ) -> None:
        """Run a node's job on the pool; `subject` is the action, or the IP for a probe (or for
        what `what` names)."""
        assert self.rec.keys is not None
        t = self.rec.keys.timeout_seconds
        if isinstance(subject, str) and what == SESSIONS:  # a login, then one short command
            ip, action, budget = subject, None, count_seconds(t)
        elif isinstance(subject, str):  # each type: a connect and a handshake, each within t
            types = len(self.rec.config.host_keys.types)
            what, ip, action, budget = PROBE, subject, None, 2 * t * types + 5
        else:
            what, ip, action = subject.kind.value, subject.ip, subject
            budget = 12 * t + 40 if subject.kind is Kind.ADOPT else 16 * t + 90
        record = _Job(what, ip, budget, action)
        self.jobs[pool.submit(_boundary, job, record, self.rec.clock)] = record

    def _collect(self) -> None:
        """Wait for at least one node job, then take in everything that is done. While it waits,
        the pass beats every BEAT_SECONDS: it is alive, and every job it waits on is bounded."""
        done: set[Future[Any]] = set()
        pending: set[Future[Any]] = set(self.jobs)
        while True:
            now = self.rec.clock()
            nearest = min(job.deadline for job in self.jobs.values())
            if self.ready_since:  # wake up in time to register what lingers
                nearest = min(nearest, min(self.ready_since.values()) + LINGER_SECONDS)
            if now >= nearest:
                break
            done, pending = wait(
                pending, timeout=min(nearest - now, BEAT_SECONDS), return_when=FIRST_COMPLETED
            )
            if done:
                break
            self.beat()
        if done and pending:  # what finishes in the next moment is taken in with it: one re-plan
            done |= wait(pending, timeout=GATHER_SECONDS)[0]
        now = self.rec.clock()
        for future, job in list(self.jobs.items()):
            if future in done:
                result = future.result()
            elif now >= job.deadline:  # a hang no step's own deadline caught: the node's, not ours
                result = SshError(job.what, "did not finish within its deadline")
            else:
                continue
            del self.jobs[future]
            self._take(job, result)
        self.facts = replace(self.facts, probes=dict(self.probes), backing_off=self._backing_off())

    def _take(self, job: _Job, result: Any) -> None:
        if job.what == SESSIONS:
            self._counted(job.ip, result)
        elif job.action is None:
            self._probed(job.ip, result)
        elif job.action.kind is Kind.PUSH_KEYS:
            self._pushed(job.action, result)
        else:
            self._adopted(job.action, result)

    def _probed(self, ip: str, probe: Probe | Exception) -> None:
        if isinstance(probe, Exception):
            probe = Probe(error=_error_text(probe, "probe"))
        log.debug(
            "probed",
            ip=ip,
            instance_id=self.by_ip[ip].instance_id,
            offers=sorted(probe.offered or ()),
            fingerprints=_fingerprints(frozenset((probe.offered or {}).values())),
            error=probe.error,
        )
        record = self.state.nodes[ip]
        if probe.offered is None:
            record.unreachable = True
            self._node_failed(ip, probe.error, backoff=False)
        elif record.unreachable:  # it answers again: whatever it failed before, retry now
            record.unreachable = False
            record.failures, record.retry_mono, record.retry_at = 0, None, None
            log.info("node_answers_again", ip=ip, instance_id=self.by_ip[ip].instance_id)
        self.probes[ip] = probe

    def _pushed(self, action: Action, result: dict[str, str] | Exception) -> None:
        ip = action.ip
        node, record = self.by_ip[ip], self.state.nodes[ip]
        if isinstance(result, Exception):
            self.outcome.push_failures += 1
            self._node_failed(ip, _error_text(result, "push"), backoff=True)
        else:
            self.probes[ip] = Probe(offered=result)
            record.failures, record.retry_mono, record.retry_at, record.last_error = (
                0,
                None,
                None,
                "",
            )
            self.outcome.applied.append(action)
            log.info(
                "host_keys_pushed",
                ip=ip,
                instance_id=node.instance_id,
                fingerprints={t: k.fingerprint for t, k in self.keyset.items()},
            )

    def _adopted(self, action: Action, result: KeySet | Exception) -> None:
        assert self.rec.keys is not None
        ip = action.ip
        node, store = self.by_ip[ip], self.rec.keys.store
        error = _adoption_error(result) if isinstance(result, Exception) else self._install(result)
        if error is not None:
            why = f"adopting the keys of {node.label()} failed: {error}"
            self._error(why)
            log.error("host_keys_adoption_failed", ip=ip, instance_id=node.instance_id, error=error)
            self.facts = replace(self.facts, unavailable=why)
            return
        self.outcome.applied.append(action)
        log.warning(
            "host_keys_adopted",
            ip=ip,
            instance_id=node.instance_id,
            store=str(store.path),
            fingerprints={t: k.fingerprint for t, k in self.keyset.items()},
        )
        self.facts = replace(self.facts, current={t: k.public for t, k in self.keyset.items()})

    def _install(self, keys: KeySet) -> str | None:
        """The adopted set into the store; what went wrong, if anything (disk full, refused)."""
        assert self.rec.keys is not None
        try:
            self.rec.keys.store.install(keys, keep_previous=False)
            self.keyset = self.rec.keys.store.load()
        except Exception as exc:  # this adoption failed, not the pass
            return _adoption_error(exc)
        return None

    def _retire_previous(self, action: Action) -> None:
        assert self.rec.keys is not None
        try:
            self.rec.keys.store.retire_previous()
        except KeyStoreError as exc:
            self._error(str(exc))
            return
        self.outcome.applied.append(action)
        self.facts = replace(self.facts, previous={})
        log.warning("host_keys_rotation_done", reason=action.reason)

    def _node_failed(self, ip: str, error: str, *, backoff: bool) -> None:
        node, record = self.by_ip[ip], self.state.nodes[ip]
        step = error.split(":", 1)[0]
        record.last_error, record.last_error_at = error, self.rec.wall()
        fields: dict[str, Any] = {}
        if backoff:
            record.failures += 1
            wait_s = backoff_seconds(record.failures)
            record.retry_mono = self.rec.clock() + wait_s
            record.retry_at = self.rec.wall() + wait_s
            fields = {"failures": record.failures, "retry_in_seconds": wait_s}
            self._error(f"{node.label()}: {error}")
        log.error(
            "node_failed", ip=ip, instance_id=node.instance_id, step=step, error=error, **fields
        )

    def _error(self, line: str) -> None:
        self.outcome.errors.append(line)

    # -- remembering ------------------------------------------------------------------------------

    def _remember(self, final: Plan) -> None:
        s = self.state
        self._remember_health()
        for arn in self.views:
            ours = set(s.registered_by_us.get(arn, []))
            for action in self.outcome.applied:  # in the order it happened
                if action.target_group != arn:
                    continue
                if action.kind is Kind.REGISTER:
                    ours.add(action.ip)
                elif action.kind is Kind.DEREGISTER:
                    ours.discard(action.ip)
            if not self.act:  # what the acting head registered for login nodes is ours too, so
                # that after a takeover with prune = false they can still be removed
                ours |= {
                    t.ip for t in self.views[arn].targets if t.registered and t.ip in self.by_ip
                }
            s.registered_by_us[arn] = sorted(ours)
            s.absent[arn] = {
                ip: AbsenceRecord(passes=a.passes, since=a.since, instance_id=a.instance_id)
                for ip, a in final.absent.get(arn, {}).items()
            }
        configured = {g.arn for g in self.rec.groups}
        for table in (s.registered_by_us, s.absent, s.targets, s.target_errors):
            for arn in [a for a in table if a not in configured]:
                del table[arn]
        self._remember_nodes(final)
        s.boot_id = self.rec.boot_id
        if self.rec.keys is not None and self.keyset:
            self._write_known_hosts()

    def _remember_health(self) -> None:
        """Each target's state and since when; a login node unhealthy for longer than its group's
        health-check window is warned about once and keeps the pass from converging. Health is
        reported, never acted on."""
        groups = {g.arn: g for g in self.rec.groups}
        for arn, view in self.views.items():
            before = self.state.targets.get(arn, [])
            records = health.track(before, view.targets, self.now, self.rec.wall())
            self.state.targets[arn] = records
            group = groups[arn]
            warned = {r.ip for r in before if r.warned}
            for record in records:
                if record.ip in warned and record.state == HEALTHY:
                    log.info("target_healthy_again", ip=record.ip, target_group=group.name)
            window = health.window_seconds(group.info)
            serving = {ip: n for ip, n in self.by_ip.items() if ip not in self.drains}
            for record in health.overdue(records, serving, window, self.now):
                node = self.by_ip[record.ip]
                line = (
                    f"{node.label()} on {group.name}: {health.describe(record)} for "
                    f"{self.now - (record.since_mono or self.now):.0f}s (health-check window "
                    f"{window:.0f}s); likely fix: {health.likely_fix(record.reason)}"
                )
                self.outcome.unhealthy.append(line)
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

    def _remember_nodes(self, final: Plan) -> None:
        keep: dict[str, NodeRecord] = {}
        verified_set = identity(self.keyset) if self.keyset else ""
        consumed: list[str] = []
        for node in self.nodes:
            record = self.state.nodes[node.ip]
            record.instance_id, record.name, record.group = node.instance_id, node.name, node.group
            drain = self.drains.get(node.ip)
            record.drained = drain.reason if drain else ""
            if drain is None:
                record.sessions, record.sessions_at, record.sessions_error = None, None, ""
            j = final.judgements.get(node.ip)
            probe = self.probes.get(node.ip)
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
                record.verified_at, record.verified_mono = self.rec.wall(), self.now
                if not record.unreachable and record.retry_mono is None:
                    record.last_error = ""
                if node.ip in self.facts.trusted:
                    consumed.append(node.ip)
            keep[node.ip] = record
        self.state.nodes = keep
        if consumed:

            def forget(intents: Intents) -> None:
                for ip in consumed:
                    intents.trust.pop(ip, None)

            try:
                update_intents(self.rec.config.state.dir, forget)
            except (IntentsError, OSError) as exc:
                self._error(f"cannot update {self.rec.config.state.dir}/intents.json: {exc}")

    def _write_known_hosts(self) -> None:
        """The head node's own pins: verified nodes and the canonical keys, for an admin's ssh."""
        side = self.rec.keys
        assert side is not None
        lines = [
            f"{known_hosts_name(n.ip, side.ssh_port)} {k.public}"
            for n in self.nodes
            if self.state.nodes[n.ip].verified_instance_id == n.instance_id
            for k in self.keyset.values()
        ]
        path = self.rec.config.state.dir / "known_hosts"
        data = "".join(f"{x}\n" for x in lines).encode()
        try:
            if path.exists() and path.read_bytes() == data:
                return
            make_trusted_dir(path.parent)
            write_atomically(path, data, 0o644)
        except (OSError, UntrustedPathError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            self._error(f"{path}: cannot write ({why})")
            log.error("known_hosts_unwritable", path=str(path), error=str(exc))


@dataclass
class _Job:
    what: str  # PROBE, or the Kind of the action
    ip: str
    budget: float  # seconds from the job's start: past them, the node's job counts as failed
    action: Action | None = None
    started: float | None = None  # monotonic; set by the worker that runs it

    @property
    def deadline(self) -> float:
        """Counted from when a worker took the job, not from when it was queued: nodes queued
        behind slow ones (an AZ down) must not time out before they were even tried."""
        return math.inf if self.started is None else self.started + self.budget


def _boundary(job: Callable[[], Any], record: _Job, clock: Callable[[], float]) -> Any:
    """A node's fault is that node's failure: any exception becomes its result, never ours."""
    record.started = clock()
    try:
        return job()
    except Exception as exc:
        return exc


def _adoption_error(exc: Exception) -> str:
    return str(exc) if isinstance(exc, KeyStoreError) else _error_text(exc, "adopt")


def _error_text(exc: Exception, step: str) -> str:
    if isinstance(exc, SshError):
        return str(exc)
    return f"{step}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def _fingerprints(pin: frozenset[str]) -> list[str]:
    return [fingerprint(line) for line in pin]


def _rebase(state: State, boot_id: str, now: float) -> None:
    """Monotonic times from another boot mean nothing here: restart windows, retry now; times
    from this boot are capped, so no stored value can hold a node back longer than the backoff."""
    if state.boot_id != boot_id:
        for table in state.absent.values():
            for record in table.values():
                record.since = now
        for targets in state.targets.values():
            for target in targets:
                target.since_mono = now
        for node in state.nodes.values():
            node.verified_mono = None
            node.retry_mono, node.retry_at = None, None
        state.boot_id = boot_id
    for node in state.nodes.values():
        if node.retry_mono is not None and node.retry_mono > now + BACKOFF_MAX_SECONDS:
            node.retry_mono = now + BACKOFF_MAX_SECONDS
        if node.verified_mono is not None and node.verified_mono > now:
            node.verified_mono = None


def _record_pass(state: State, outcome: PassOutcome, started: float, finished: float) -> None:
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
        held=[
            f"{a.kind.value} {a.ip}"
            + (f" on {target_group_name(a.target_group)}" if a.target_group else "")
            + f": held by {a.held_by.value}: {a.reason}"
            for a in plan.held()
            if a.held_by
        ],
        waiting=[f"{w.node.label()}: {w.reason}" for w in plan.waiting],
        unhealthy=list(outcome.unhealthy),
    )
    if state.first_pass_at is None:
        state.first_pass_at = started
    if outcome.result in ("converged", "standby"):
        state.last_converged_at = finished


def save_outcome(state_dir: Path, state: State, outcome: PassOutcome) -> None:
    """Save the state after a pass; a state that cannot be saved is this pass's error (the pass
    is then not converged, and says so), never a crash."""
    try:
        save_state(state_dir, state)
    except (OSError, UntrustedPathError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        error = f"cannot save the state in {state_dir}: {why}"
        outcome.errors.append(error)
        log.error("state_unwritable", state_dir=str(state_dir), error=error)


def key_side(config: Config, host_keys: HostKeys) -> KeySide:
    hk = config.host_keys
    return KeySide(
        store=KeyStore(hk.store, hk.types),
        nodes=host_keys,
        adopt=hk.adopt_from_first_node,
        probe_interval_seconds=hk.probe_interval_seconds,
        ssh_port=config.ssh.port,
        timeout_seconds=config.ssh.connect_timeout_seconds,
    )
