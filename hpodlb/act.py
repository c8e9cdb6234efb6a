"""What a pass changes: AWS target writes, key pushes and adoptions started, the key store.

Only what the plan made runnable, each at most once a pass, and only when this pass may act
(`PassContext.acting`: it applies, and this head is the one in control). Leadership is asked again
before every write batch, push, adoption and change to the store (`ctx.leader`, cached at most
leader.CACHE_SECONDS): control can move while a pass waits on a slow AWS or hung nodes, and a head
that lost it must write nothing more. From the first answer that it no longer acts (another head
does, or `scontrol` cannot tell) the pass only observes, as a standby pass does, and says so once
(`leadership_lost`).
AWS writes happen on the pass's own thread, in this order of urgency:
nodes serving the wrong identity leave as soon as that is known, verified nodes join as soon as
they verify (those ready within LINGER_SECONDS of each other share one call), and targets no login
node accounts for leave last, once no probe or push can still claim the deregistration budget.
Pushes and adoptions run as node jobs (`jobs.py`), ahead of the probes still waiting; their
results come back through the sequencer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

from hpodlb.config import target_group_name
from hpodlb.context import KeySide, Known, PassContext, log
from hpodlb.identity import KeyState
from hpodlb.jobs import Job, NodeJobs, failure_text
from hpodlb.keystore import KeySet, KeyStoreError
from hpodlb.planner import Action, Kind, Plan, Target
from hpodlb.record import fingerprints
from hpodlb.targets import BATCH_SIZE, TargetGroup, TargetsError

LINGER_SECONDS = 0.5  # a node ready to register waits this long for others to share the call


class NotInControlError(Exception):
    """A push or adoption job's result when, as its worker took it, this head no longer acted:
    nothing was done on the node, and that is no failure of the node's."""


class Actor:
    """Applies one pass's plans as they become runnable."""

    def __init__(
        self,
        ctx: PassContext,
        known: Known,
        groups: Sequence[TargetGroup],
        side: KeySide | None,
        jobs: NodeJobs,
    ) -> None:
        self.ctx = ctx
        self.known = known
        self.groups = {g.arn: g for g in groups}
        self.side = side
        self.jobs = jobs
        self.attempted: set[tuple[Kind, str, str]] = set()
        self.ready_since: dict[tuple[str, str], float] = {}  # (group, ip) ready to register
        self._losing = threading.Lock()  # node workers ask too: the loss is taken in once

    def step(self, plan: Plan) -> bool:
        """Start or apply what became runnable and was not tried yet; True if anything was."""
        if not self.ctx.acting:
            return False

        def fresh(kind: Kind) -> list[Action]:
            return [
                a
                for a in plan.runnable(kind)
                if (a.kind, a.target_group, a.ip) not in self.attempted
            ]

        adopt = plan.runnable(Kind.ADOPT)
        if adopt:  # nothing else until the canonical keys exist
            if not fresh(Kind.ADOPT):
                return False
            self._start_adoption(adopt[0])
            return True
        # Wrong identities leave before anything else happens to them; pushes start; the
        # verified join. Deregistrations first, so each re-plan counts them against the budget.
        did = self._write(
            Kind.DEREGISTER, [a for a in fresh(Kind.DEREGISTER) if a.ip in self.ctx.by_ip]
        )
        for action in fresh(Kind.PUSH_KEYS):
            self._start_push(action, plan)
            did = True
        joining = [a for a in fresh(Kind.REGISTER) if not a.after_push]
        if self._ready_to_join(joining):
            did = self._write(Kind.REGISTER, joining) or did
        if not self.jobs:  # last, with what is left of the budget, once no probe or push can
            # claim it
            strays = [a for a in fresh(Kind.DEREGISTER) if a.ip not in self.ctx.by_ip]
            did = self._write(Kind.DEREGISTER, strays) or did
            for action in fresh(Kind.RETIRE_PREVIOUS):
                self._retire_previous(action)
                did = True
        return did

    def wake_by(self) -> float | None:
        """When the pass must look again even if no node job ends: a ready node's linger ends."""
        return min(self.ready_since.values()) + LINGER_SECONDS if self.ready_since else None

    def in_control(self) -> bool:
        """Asked before every AWS write batch, push, adoption and store change. The first answer
        that this head does not act ends its acting for the rest of the pass (even if a later
        answer says otherwise: the pass began on one decision, and one change is all it takes in),
        and the outcome then says what a standby pass says."""
        if not self.ctx.acting:
            return False
        lead = self.ctx.leader()
        if not lead.acting:
            with self._losing:
                if self.ctx.act:
                    self.ctx.act = False
                    self.ctx.outcome.leadership = lead
                    log.warning(
                        "leadership_lost",
                        controller=lead.controller,
                        why=lead.why,
                        action="no more writes or pushes this pass",
                    )
        return self.ctx.acting

    def _if_in_control(self, call: Callable[[], Any]) -> Any:
        """A node job's call, made only if this head still acts as a worker takes the job (it may
        have waited behind slow probes)."""
        if not self.in_control():
            raise NotInControlError
        return call()

    def _attempt(self, action: Action) -> None:
        self.attempted.add((action.kind, action.target_group, action.ip))

    def _ready_to_join(self, joining: Sequence[Action]) -> bool:
        """Nodes ready close together join in one call: a ready node waits at most LINGER_SECONDS
        for company while other nodes' jobs run, never for those jobs to end."""
        now = self.ctx.clock()
        keys = {(a.target_group, a.ip) for a in joining}
        self.ready_since = {k: t for k, t in self.ready_since.items() if k in keys}
        for key in keys:
            self.ready_since.setdefault(key, now)
        if not joining:
            return False
        oldest = min(self.ready_since.values())
        return not self.jobs or len(joining) >= BATCH_SIZE or now - oldest >= LINGER_SECONDS

    # -- AWS --------------------------------------------------------------------------------------

    def _write(self, kind: Kind, actions: Sequence[Action]) -> bool:
        """Apply registrations or deregistrations, one call per group (batched by the adapter)."""
        by_group: dict[str, list[Action]] = {}
        for action in actions:
            self._attempt(action)
            by_group.setdefault(action.target_group, []).append(action)
        for arn, group_actions in by_group.items():
            if not self.in_control():
                break
            group = self.groups[arn]
            self.ctx.beat()
            write = group.register if kind is Kind.REGISTER else group.deregister
            result = write([a.ip for a in group_actions])
            done = set(result.done)
            for action in group_actions:
                if action.ip in done:
                    self._applied_to_group(kind, action)
            for ip, reason in result.refused.items():
                self.ctx.error(f"{group.name}: AWS refused {kind.value} of {ip}: {reason}")
                log.error(f"{kind.value}_refused", target_group=group.name, ip=ip, reason=reason)
            if result.error is not None:
                self.ctx.error(str(result.error))
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
        """The group as AWS now has it, for the next plan: what it reports for a target just
        registered (`initial`) or deregistered (`draining`)."""
        view = self.known.views[action.target_group]
        state, why = (
            ("initial", "Elb.RegistrationInProgress")
            if kind is Kind.REGISTER
            else ("draining", "Target.DeregistrationInProgress")
        )
        others = tuple(t for t in view.targets if (t.ip, t.port) != (action.ip, view.port))
        updated = replace(view, targets=(*others, Target(action.ip, view.port, state, why)))
        self.known.views[view.arn] = updated
        if kind is Kind.DEREGISTER:
            self.known.spent[view.arn] += 1
        self.ctx.outcome.applied.append(action)
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
            problem = group.problem(self.ctx.clock())
        except TargetsError as exc:
            problem = str(exc)
        if problem:
            self.known.views[group.arn] = replace(self.known.views[group.arn], problem=problem)
            self.ctx.error(problem)

    # -- host keys --------------------------------------------------------------------------------

    def _keys(self) -> KeySide:
        """The plan asks for key actions only when host keys are on."""
        assert self.side is not None
        return self.side

    def _start_push(self, action: Action, plan: Plan) -> None:
        self._attempt(action)
        side = self._keys()
        if plan.judgements[action.ip].state is KeyState.NEW_INSTANCE:
            log.warning(
                "ssh_trust_on_first_use",
                ip=action.ip,
                instance_id=action.instance_id,
                fingerprints=sorted(fingerprints(action.pin)),
                why="a new instance: the push session must present exactly what its probe showed",
            )
        budget = side.nodes.push_seconds(side.timeout_seconds)
        job = Job(action.kind.value, action.ip, budget, action)
        call = partial(side.nodes.push, action.ip, dict(self.known.keyset), action.pin)
        # Before the probes still waiting.
        self.jobs.submit(job, partial(self._if_in_control, call), urgent=True)

    def _start_adoption(self, action: Action) -> None:
        self._attempt(action)
        side = self._keys()
        budget = side.nodes.read_keys_seconds(side.timeout_seconds)
        job = Job(action.kind.value, action.ip, budget, action)
        call = partial(side.nodes.read_keys, action.ip, action.pin)
        self.jobs.submit(job, partial(self._if_in_control, call), urgent=True)

    def adopted(self, action: Action, result: KeySet | Exception) -> None:
        """The first login node's keys, read by an adoption job, into the store."""
        ip, store = action.ip, self._keys().store
        node = self.ctx.by_ip[ip]
        if not self.in_control():
            return  # another head acts now: its store is the one that counts
        error = _adoption_error(result) if isinstance(result, Exception) else self._install(result)
        if error is not None:
            why = f"adopting the keys of {node.label()} failed: {error}"
            self.ctx.error(why)
            log.error("host_keys_adoption_failed", ip=ip, instance_id=node.instance_id, error=error)
            self.known.facts = replace(self.known.facts, unavailable=why)
            return
        self.ctx.outcome.applied.append(action)
        keyset = self.known.keyset
        log.warning(
            "host_keys_adopted",
            ip=ip,
            instance_id=node.instance_id,
            store=str(store.path),
            fingerprints={t: k.fingerprint for t, k in keyset.items()},
        )
        self.known.facts = replace(
            self.known.facts, current={t: k.public for t, k in keyset.items()}
        )

    def _install(self, keys: KeySet) -> str | None:
        """The adopted set into the store; what went wrong, if anything (disk full, refused)."""
        store = self._keys().store
        try:
            store.install(keys, keep_previous=False)
            self.known.keyset = store.load()
        except Exception as exc:  # this adoption failed, not the pass
            return _adoption_error(exc)
        return None

    def _retire_previous(self, action: Action) -> None:
        self._attempt(action)
        if not self.in_control():
            return
        try:
            self._keys().store.retire_previous()
        except KeyStoreError as exc:
            self.ctx.error(str(exc))
            return
        self.ctx.outcome.applied.append(action)
        self.known.facts = replace(self.known.facts, previous={})
        log.warning("host_keys_rotation_done", reason=action.reason)


def _adoption_error(exc: Exception) -> str:
    return str(exc) if isinstance(exc, KeyStoreError) else failure_text(exc, "adopt")
