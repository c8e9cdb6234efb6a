"""One pass: read the desired set, observe the world, plan, and (unless dry) apply.

This is the only module that puts inventory, target groups, host keys, planner and state together.
It never decides anything itself (the planner does) and never lets one failure spread: a bad resource
config stops the pass before any AWS write; a target group that cannot be read gets no actions; a node
whose key push fails is simply not registered. Order of writes within a pass: nodes serving the wrong
identity leave first, keys are pushed, verified nodes join, and only then do absent nodes leave.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from hpodlb.config import Config, target_group_name
from hpodlb.inventory import InventoryError, LoginNode, login_group_names, read_login_nodes
from hpodlb.logs import get_logger
from hpodlb.planner import Action, GroupView, Guards, KeyVerdict, Kind, Plan, plan_pass
from hpodlb.state import NodeRecord, PassRecord, State, TargetRecord
from hpodlb.targets import TargetGroup, TargetsError

log = get_logger("hpodlb.pass")


class KeyGate(Protocol):
    """What a pass needs from the host-key side (hpodlb.hostkeys implements it)."""

    def assess(
        self, nodes: Sequence[LoginNode], state: State, now: float, *, dry_run: bool = False
    ) -> dict[str, KeyVerdict]: ...

    def backing_off(
        self, nodes: Sequence[LoginNode], state: State, now: float
    ) -> dict[str, str]: ...

    def push(self, nodes: Sequence[LoginNode], state: State, now: float) -> dict[str, str | None]:
        """Push, reload, re-probe; per IP None when the node now verifies, else the error."""
        ...


@dataclass
class PassOutcome:
    nodes: tuple[LoginNode, ...] = ()
    plan: Plan | None = None
    inventory_error: str | None = None
    errors: list[str] = field(default_factory=list)
    applied: list[Action] = field(default_factory=list)
    duration_seconds: float = 0.0

    @property
    def converged(self) -> bool:
        """Nothing failed, nothing was held back, nothing is left to do after this pass."""
        if self.inventory_error or self.errors or self.plan is None:
            return False
        return (
            not self.plan.held()
            and not self.plan.waiting
            and all(a in self.applied for a in self.plan.runnable())
        )

    def summary(self) -> str:
        if self.inventory_error:
            return f"no change: {self.inventory_error}"
        plan = self.plan or Plan()
        done = {k: sum(1 for a in self.applied if a.kind is k) for k in Kind}
        return (
            f"{len(self.nodes)} login nodes; registered {done[Kind.REGISTER]}, "
            f"deregistered {done[Kind.DEREGISTER]}, keys pushed {done[Kind.PUSH_KEYS]}; "
            f"{len(plan.held())} held back, {len(plan.waiting)} waiting, {len(self.errors)} errors"
        )


class Reconciler:
    """Holds the adapters for one config; `run_pass` is what `plan`, `once` and `run` call."""

    def __init__(
        self,
        config: Config,
        groups: Sequence[TargetGroup],
        gate: KeyGate | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.groups = list(groups)
        self.gate = gate
        self.clock = clock

    def desired(self) -> tuple[LoginNode, ...]:
        cluster = self.config.cluster
        names, _ = login_group_names(cluster.login_groups, cluster.provisioning_parameters)
        return read_login_nodes(cluster.resource_config, names, cluster.networks())

    def run_pass(self, state: State, *, apply: bool) -> PassOutcome:
        """One level-triggered pass; mutates `state` only when `apply` is true."""
        started = self.clock()
        outcome = PassOutcome()
        try:
            outcome.nodes = self.desired()
        except InventoryError as exc:
            outcome.inventory_error = str(exc)
            log.error("inventory_invalid", error=str(exc), action="no change this pass")
            if apply:
                self._record_pass(state, outcome, started)
            return outcome

        views: list[GroupView] = []
        target_errors: dict[str, str] = {}
        for group in self.groups:
            try:
                views.append(group.observe())
            except TargetsError as exc:
                target_errors[group.arn] = str(exc)
                outcome.errors.append(str(exc))
                log.error(
                    "target_group_unreadable",
                    target_group=group.name,
                    code=exc.code,
                    error=str(exc),
                    action="no change to this target group this pass",
                )

        nodes = outcome.nodes
        scratch = state if apply else state.model_copy(deep=True)
        now = self.clock()
        if self.gate is None:
            verdicts = {n.ip: KeyVerdict.IN_SYNC for n in nodes}
            backing_off: dict[str, str] = {}
        else:
            verdicts = self.gate.assess(nodes, scratch, now, dry_run=not apply)
            backing_off = self.gate.backing_off(nodes, scratch, now)
        cfg = self.config.reconcile
        plan = plan_pass(
            nodes,
            views,
            verdicts,
            Guards(
                prune=cfg.prune,
                max_deregister_fraction=cfg.max_deregister_fraction,
                absent_passes_before_deregister=cfg.absent_passes_before_deregister,
                min_in_service=cfg.min_in_service,
            ),
            absent_passes=state.absent_passes,
            registered_by_us=state.registered_by_us,
            backing_off=backing_off,
        )
        outcome.plan = plan
        if apply:
            self._apply(plan, nodes, state, outcome)
            self._remember(state, nodes, views, target_errors, plan, outcome)
            self._record_pass(state, outcome, started)
        outcome.duration_seconds = self.clock() - started
        return outcome

    # -- applying -------------------------------------------------------------------------------

    def _apply(
        self, plan: Plan, nodes: Sequence[LoginNode], state: State, outcome: PassOutcome
    ) -> None:
        desired = {n.ip for n in nodes}
        for action in plan.held():
            log.warning(
                "held_back",
                kind=action.kind.value,
                ip=action.ip,
                instance_id=action.instance_id,
                target_group=target_group_name(action.target_group),
                guard=action.held_by.value if action.held_by else "",
                reason=action.reason,
            )
        deregs = plan.runnable(Kind.DEREGISTER)
        self._change(Kind.DEREGISTER, [a for a in deregs if a.ip in desired], outcome)

        pushes = plan.runnable(Kind.PUSH_KEYS)
        verified: set[str] = set()
        if pushes and self.gate is not None:
            by_ip = {n.ip: n for n in nodes}
            results = self.gate.push([by_ip[a.ip] for a in pushes], state, self.clock())
            for action in pushes:
                error = results.get(action.ip, "no result")
                if error is None:
                    verified.add(action.ip)
                    outcome.applied.append(action)
                else:
                    outcome.errors.append(f"{action.ip} ({action.instance_id}): {error}")
        registers = [
            a for a in plan.runnable(Kind.REGISTER) if not a.after_push or a.ip in verified
        ]
        self._change(Kind.REGISTER, registers, outcome)
        self._change(Kind.DEREGISTER, [a for a in deregs if a.ip not in desired], outcome)

    def _change(self, kind: Kind, actions: Sequence[Action], outcome: PassOutcome) -> None:
        by_group: dict[str, list[Action]] = {}
        for action in actions:
            by_group.setdefault(action.target_group, []).append(action)
        groups = {g.arn: g for g in self.groups}
        for arn, group_actions in by_group.items():
            group = groups[arn]
            ips = [a.ip for a in group_actions]
            try:
                (group.register if kind is Kind.REGISTER else group.deregister)(ips)
            except TargetsError as exc:
                outcome.errors.append(str(exc))
                log.error(
                    f"{kind.value}_failed",
                    target_group=group.name,
                    code=exc.code,
                    ips=ips,
                    error=str(exc),
                )
                continue
            for action in group_actions:
                outcome.applied.append(action)
                log.info(
                    f"{kind.value}ed",
                    ip=action.ip,
                    instance_id=action.instance_id,
                    target_group=group.name,
                    port=action.port,
                    reason=action.reason,
                )

    # -- remembering ----------------------------------------------------------------------------

    def _remember(
        self,
        state: State,
        nodes: Sequence[LoginNode],
        views: Sequence[GroupView],
        target_errors: Mapping[str, str],
        plan: Plan,
        outcome: PassOutcome,
    ) -> None:
        applied = {(a.kind, a.target_group, a.ip) for a in outcome.applied}
        for view in views:
            ours = set(state.registered_by_us.get(view.arn, []))
            targets = {(t.ip, t.port): t.state for t in view.targets}
            for kind, arn, ip in applied:
                if arn != view.arn:
                    continue
                if kind is Kind.REGISTER:
                    ours.add(ip)
                    targets[(ip, view.port)] = "initial"
                elif kind is Kind.DEREGISTER:
                    ours.discard(ip)
                    targets[(ip, view.port)] = "draining"
            state.registered_by_us[view.arn] = sorted(ours)
            state.absent_passes[view.arn] = dict(plan.absent_passes.get(view.arn, {}))
            state.targets[view.arn] = [
                TargetRecord(ip=ip, port=port, state=s) for (ip, port), s in sorted(targets.items())
            ]
        state.target_errors = dict(target_errors)
        configured = {g.arn for g in self.groups}
        for table in (state.registered_by_us, state.absent_passes, state.targets):
            for arn in [a for a in table if a not in configured]:
                del table[arn]
        keep: dict[str, NodeRecord] = {}
        for node in nodes:
            record = state.nodes.get(node.ip) or NodeRecord()
            record.instance_id, record.name, record.group = node.instance_id, node.name, node.group
            if self.gate is None:
                record.key_state = "not checked"
            keep[node.ip] = record
        state.nodes = keep

    def _record_pass(self, state: State, outcome: PassOutcome, started: float) -> None:
        plan = outcome.plan or Plan()
        errors = [outcome.inventory_error] if outcome.inventory_error else list(outcome.errors)
        state.last_pass = PassRecord(
            started_at=started,
            finished_at=self.clock(),
            ok=outcome.converged,
            summary=outcome.summary(),
            errors=errors,
            held=[
                f"{a.kind.value} {a.ip} on {target_group_name(a.target_group)}: {a.held_by.value}"
                for a in plan.held()
                if a.held_by
            ],
        )
