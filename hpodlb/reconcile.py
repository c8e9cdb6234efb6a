"""One pass: read the desired set, observe the world, and plan and apply as it becomes known.

This module only sequences the pieces of a pass around the pure planner; it decides nothing
itself. `observe` reads (login nodes, target groups, intents, key facts), `jobs` runs each login
node's probe, push or adoption on a pool, `act` applies what became runnable and `record` writes
down what was learned. Each time a node job comes back the planner is asked again, with all that
is known so far: a healthy node is registered as soon as its own probe verifies, whatever another
node's SSH is doing. Maintenance (counting a drained node's sessions) runs in the reconciler's own
lane, which no pass of the daemon waits for: a wedged drained node delays nothing.

Faults stay where they happen: a bad resource config stops the pass before any AWS write; a target
group that cannot be read, or is not what the config says, gets no action; a node's fault (any
exception, not only the expected ones) is that node's failure; a bug in the pass itself is recorded
as a crashed pass, never a crashed daemon. The outcome says all of it: `converged` only when nothing
failed and nothing is left to do, hold or wait for.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

from hpodlb import observe, record
from hpodlb.act import Actor, NotInControlError
from hpodlb.config import Config, target_group_name
from hpodlb.context import KeySide, Known, PassContext, log, read_boot_id
from hpodlb.guards import Guards, guards_of
from hpodlb.hyperpod import HyperPod
from hpodlb.inventory import Answer, InventoryError, LoginNode
from hpodlb.jobs import MAINTENANCE_WORKERS, PROBE, SESSIONS, WORKERS, Job, NodeJobs
from hpodlb.leader import CONFIRM_SECONDS, Asker, Leadership
from hpodlb.outcome import PassOutcome
from hpodlb.planner import Absence, Drain, Kind, Memory, Plan, plan_pass
from hpodlb.sessions import NO_LOGINS, count_seconds, count_sessions
from hpodlb.state import NodeRecord, State
from hpodlb.targets import TargetGroup


class Reconciler:
    """The adapters for one config and what passes learn from each other; `run_pass` is what
    `plan`, `once` and `run` call."""

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
        self.cluster = observe.ClusterAnswers()
        self.leadership: Leadership | None = None  # the last decision, to log its changes
        # Session counts, kept from pass to pass: a count a pass did not wait for is taken in by
        # a later one.
        self.maintenance = NodeJobs(
            MAINTENANCE_WORKERS, self._now, lambda: None, "hpodlb-maintenance", detached=True
        )

    def _now(self) -> float:
        """`clock` as it is at each call (tests move it after construction)."""
        return self.clock()

    def login_groups(self) -> Answer:
        return self.cluster.login_groups(self.config, self.hyperpod, self.clock)

    def desired(self) -> tuple[LoginNode, ...]:
        return self.cluster.desired(self.config, self.hyperpod, self.clock)

    @property
    def groups_source(self) -> str:
        """`login-a (from ...)`, as the last `desired` found it."""
        return self.cluster.source

    def guards(self) -> Guards:
        return guards_of(self.config.reconcile)

    def _lead(self, ask: Asker) -> Leadership:
        """Whether this head acts in this pass; a change is logged once, as it happens. A backup
        head about to take over asks again a moment later: one ping the primary missed under load
        must not make two heads act."""
        lead = ask.fresh()
        before = self.leadership
        if lead.takes_over and (before is None or not before.acting):
            self.sleep(CONFIRM_SECONDS)
            lead = ask.fresh()
        if before is None or (lead.acting, lead.controller) != (before.acting, before.controller):
            event = "leadership_acting" if lead.acting else "leadership_standby"
            level = log.info if lead.acting else log.warning
            level(event, controller=lead.controller, why=lead.why)
        self.leadership = lead
        return lead

    def run_pass(
        self,
        state: State,
        *,
        apply: bool,
        beat: Callable[[], None] = lambda: None,
        wait_for_counts: bool = True,
    ) -> PassOutcome:
        """One level-triggered pass; mutates `state` only when `apply` is true.

        `beat` is called whenever the pass advances (and at least every BEAT_SECONDS while it
        waits on node jobs, each bounded by its deadline): the daemon's watchdog follows it, so a
        long pass over many slow nodes is alive, and one stuck in a call is not.

        `wait_for_counts`: a pass that is the last of its process (`once`) waits, once all else
        is done, for the session counts it started; the daemon's do not (a later pass takes them
        in), so that a count that hangs never holds back the next pass."""
        started, started_wall = self.clock(), self.wall()
        outcome = PassOutcome()
        ask = Asker(self.leader, self.clock)  # asked again before each write (`act`)
        if apply:
            outcome.leadership = self._lead(ask)
        work = state if apply else state.model_copy(deep=True)
        self.cluster.kept = {**work.cluster_login_groups, **self.cluster.kept}
        try:
            outcome.nodes = self.desired()
            outcome.groups_source = self.groups_source
        except InventoryError as exc:
            outcome.inventory_error = str(exc)
            log.error("inventory_invalid", error=str(exc), action="no change this pass")
        if outcome.inventory_error is None:
            try:
                acting = outcome.leadership is None or outcome.leadership.acting
                ctx = PassContext(
                    self.config,
                    work,
                    outcome,
                    self.boot_id,
                    self.clock,
                    self.wall,
                    beat,
                    apply=apply,
                    act=acting,
                    leader=ask,
                )
                _Pass(self, ctx, wait_for_counts).run()
            except Exception as exc:  # a bug must cost one pass, and the pass must say so
                log.exception("pass_crashed")
                outcome.errors.append(f"pass crashed: {type(exc).__name__}: {exc}")
                outcome.crashed = True
        outcome.duration_seconds = self.clock() - started
        if apply:
            self.leadership = outcome.leadership  # control lost mid-pass was logged then
            work.cluster_login_groups = dict(self.cluster.kept)
            record.record_pass(work, outcome, started_wall, self.wall())
        return outcome


class _Pass:
    """One pass in progress: observe, then plan, act and take in node results until nothing is
    left running or runnable, then record."""

    def __init__(self, rec: Reconciler, ctx: PassContext, wait_for_counts: bool) -> None:
        self.rec = rec
        self.ctx = ctx
        self.known = Known()
        self.side = rec.keys
        self.wait_for_counts = wait_for_counts

    def run(self) -> None:
        ctx, known, side = self.ctx, self.known, self.side
        log.debug("pass_started", login_nodes=len(ctx.nodes), apply=ctx.apply)
        record.rebase(ctx.state, ctx.boot_id, ctx.now)
        for node in ctx.nodes:
            ctx.state.nodes.setdefault(node.ip, NodeRecord())
        observe.read_intents(ctx, known)
        observe.observe_groups(ctx, known, self.rec.groups)
        facts = observe.key_facts(ctx, known, side)
        known.facts = replace(
            facts, platform=self.rec.cluster.platform(ctx, self.rec.hyperpod, side is not None)
        )
        jobs = NodeJobs(max(1, min(self.rec.workers, len(ctx.nodes))), self.rec.clock, ctx.beat)
        actor = Actor(ctx, known, self.rec.groups, side, jobs)
        lane = self.rec.maintenance
        self._take_counts(lane.poll())
        try:
            self._start_probes(jobs)
            self._start_session_counts(lane)
            while True:
                ctx.beat()
                if actor.step(self._plan()):
                    continue
                if not jobs:
                    break
                for job, result in jobs.collect(actor.wake_by()):
                    self._take(actor, job, result)
                known.facts = replace(
                    known.facts, probes=dict(known.probes), backing_off=observe.backing_off(ctx)
                )
        finally:
            jobs.close()
        while self.wait_for_counts and lane:
            self._take_counts(lane.collect())
        self._take_counts(lane.poll())
        final = self._plan()
        ctx.outcome.plan = final
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
        if ctx.apply:
            record.remember(ctx, known, final, self.rec.groups)

    def _plan(self) -> Plan:
        s, known = self.ctx.state, self.known
        memory = Memory(
            absent={
                arn: {ip: Absence(r.passes, r.since, r.instance_id) for ip, r in table.items()}
                for arn, table in s.absent.items()
            },
            registered_by_us=s.registered_by_us,
            last_instance={ip: r.instance_id for ip, r in s.nodes.items() if r.instance_id},
            start_registered=known.start_registered,
            spent=known.spent,
        )
        drained = {ip: Drain(d.reason, d.force) for ip, d in known.drains.items()}
        return plan_pass(
            self.ctx.nodes,
            list(known.views.values()),
            known.facts,
            self.rec.guards(),
            memory,
            self.ctx.now,
            drained,
        )

    def _start_probes(self, jobs: NodeJobs) -> None:
        side = self.side
        if side is not None:
            budget = side.nodes.probe_seconds(side.timeout_seconds)
            for node in observe.due_probes(self.ctx, self.known, side):
                jobs.submit(Job(PROBE, node.ip, budget), partial(side.nodes.probe, node.ip))
        self.known.facts = replace(self.known.facts, probes=dict(self.known.probes))

    def _start_session_counts(self, lane: NodeJobs) -> None:
        """A drained node's open SSH connections, for `status` and `drain --wait` readers: counted
        in a session pinned to the canonical keys (current or previous), never to anything else;
        not while a count of it still runs, nor while the node backs off."""
        ctx, side, facts = self.ctx, self.side, self.known.facts
        if not ctx.acting:  # a dry run, or a standby head: no logins for this
            return
        pin = frozenset(facts.current.values()) | frozenset(facts.previous.values())
        for ip in sorted(set(self.known.drains) & set(ctx.by_ip)):
            if side is None or not pin:
                why = NO_LOGINS if side is None else "no canonical host keys to vouch for the node"
                record.not_counted(ctx, ip, why)
                continue
            retry = ctx.state.nodes[ip].retry_mono
            if lane.busy(ip) or (retry is not None and retry > ctx.now):
                continue
            job = Job(SESSIONS, ip, count_seconds(side.timeout_seconds))
            lane.submit(job, partial(count_sessions, side.nodes.connector, ip, pin))

    def _take_counts(self, results: list[tuple[Job, Any]]) -> None:
        """Counts that came back, into the record of nodes that are still drained login nodes
        (one undrained or gone meanwhile has no count to show)."""
        for job, result in results:
            if job.ip in self.ctx.by_ip and job.ip in self.known.drains:
                record.counted(self.ctx, job, result)

    def _take(self, actor: Actor, job: Job, result: Any) -> None:
        """A node job's result, into the record, the known world, or (an adoption) the store."""
        if isinstance(result, NotInControlError):
            return  # not made: this head lost control (`act`), which is no node's fault
        if job.action is None:
            record.probed(self.ctx, self.known, job.ip, result)
        elif job.action.kind is Kind.PUSH_KEYS:
            record.pushed(self.ctx, self.known, job.action, result)
        else:
            actor.adopted(job.action, result)
