"""What a pass leaves for its readers: the outcome `once`, the daemon and the metrics read.

`PassOutcome` is filled by the pass (`reconcile.py` and its pieces) and read here and nowhere else
for what it means: whether the pass converged, its one-word result, its summary line, each login
node's one state for the metrics, and the `pass_finished` event that `once` and the daemon log.
Pure: no I/O besides that one log line.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from hpodlb import health
from hpodlb.config import Config
from hpodlb.identity import KEYS_HELD
from hpodlb.inventory import LoginNode
from hpodlb.leader import Leadership
from hpodlb.logs import get_logger
from hpodlb.planner import Action, Kind, Plan
from hpodlb.state import State

# Results after which "converged since" moves on: nothing to do, or another head acts and
# nothing failed here.
SOUND_RESULTS = frozenset({"converged", "standby"})


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


def log_finished(outcome: PassOutcome) -> None:
    """`pass_finished`, the one event that says a pass (of `once` or the daemon) is over: logged
    after the state is saved and the metrics are written, so whoever waits for it sees both."""
    get_logger("hpodlb.pass").info(
        "pass_finished",
        converged=outcome.converged,
        standby=outcome.standby,
        summary=outcome.summary(),
        seconds=round(outcome.duration_seconds, 3),
    )


class NodeState(str, enum.Enum):
    """A login node's one state for `hpodlb_login_nodes`."""

    IN_SERVICE = "in_service"
    WAITING = "waiting"
    HELD = "held"
    DRAINED = "drained"
    STANDBY = "standby"


def node_states(state: State, outcome: PassOutcome | None, config: Config) -> dict[str, str]:
    """Each login node's one state, by IP (the IPs stay here: only the counts are exported). The
    first that applies: standby (this head only observes), held (an action held back by a guard,
    a drain's deregistration included: it is still in rotation), drained (by an admin, and out),
    held (keys nobody vouches for), in_service (verified keys, healthy in every target group),
    waiting (anything else: a probe, a push or health checks pending, or failing)."""
    if outcome is not None and not outcome.inventory_error:
        ips: Iterable[str] = [node.ip for node in outcome.nodes]
    else:  # no word on the desired set this pass: the nodes the last good pass knew
        ips = list(state.nodes)
    standby = (
        outcome is not None and outcome.leadership is not None and not outcome.leadership.acting
    )
    drained = {ip for ip, record in state.nodes.items() if record.drained}  # as the pass kept them
    plan = outcome.plan if outcome is not None else None
    held_back = {a.ip for a in plan.held()} if plan is not None else set()
    serving = health.taking_users(state, [tg.arn for tg in config.target_groups])
    out: dict[str, str] = {}
    for ip in ips:
        record = state.nodes.get(ip)
        if standby:
            one = NodeState.STANDBY
        elif ip in held_back:
            one = NodeState.HELD
        elif ip in drained:
            one = NodeState.DRAINED
        elif record is not None and record.key_state in KEYS_HELD:
            one = NodeState.HELD
        elif ip in serving:
            one = NodeState.IN_SERVICE
        else:
            one = NodeState.WAITING
        out[ip] = one.value
    return out
