"""hpodlb's Prometheus families, and what a finished pass sets them to.

Each `Metrics` has its own CollectorRegistry (never the library's global one: several daemons run
in one test process, and `once` must not export what some import registered). The families are
defined once, in `Metrics.__init__`; `Metrics.record` sets them from a finished pass (the state,
the pass's outcome, the config) and does no I/O. Serving them is `metrics.py`'s.

No label ever carries an IP address or an instance id: login nodes are counted by state, targets
by target group (its name, as every log line names it) and health.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Mapping

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from hpodlb import __version__, health
from hpodlb.awscalls import OUTCOMES
from hpodlb.config import Config
from hpodlb.guards import DEREGISTRATION_GUARDS
from hpodlb.outcome import SOUND_RESULTS, NodeState, PassOutcome, node_states
from hpodlb.planner import Kind
from hpodlb.state import State

# `_created` samples would double the counters' series, and no alert or panel reads them.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

PASS_RESULTS = ("converged", "not_converged", "crashed", "standby")
# The NLB's TargetHealth.State values: each group shows all of them, 0 included, so that a panel
# or an alert never meets a series that is missing because nothing was in that state.
TARGET_HEALTH = ("initial", "healthy", "unhealthy", "unhealthy.draining", "unused", "draining",
                 "unavailable")  # fmt: skip
# An idle pass over a few nodes takes 0.1 s; 200 nodes behind a dead AZ, several minutes.
PASS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
AWS_OPERATIONS = ("DescribeTargetHealth", "DescribeTargetGroups", "RegisterTargets",
                  "DeregisterTargets", "DescribeCluster", "ListClusterNodes")  # fmt: skip


class Metrics:
    """The families, in one registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.info = Info("hpodlb", "hpodlb's version.", registry=r)
        self.info.info({"version": __version__})
        self.login_nodes = Gauge(
            "hpodlb_login_nodes",
            "Login nodes in the resource config, by state: in_service (verified keys, healthy in "
            "every target group), waiting (probe, push or health checks pending, or failing), "
            "held (for an admin, or by a guard), drained (by an admin), standby (another head "
            "acts).",
            ["state"],
            registry=r,
        )
        self.healthy = Gauge(
            "hpodlb_login_nodes_healthy",
            "Login nodes taking users now: verified keys, healthy in every target group (what "
            "STATUS= counts); observed on a standby head too.",
            registry=r,
        )
        self.targets = Gauge(
            "hpodlb_targets",
            "Targets of each configured target group by NLB health state, as the last pass read "
            "them.",
            ["target_group", "health"],
            registry=r,
        )
        self.held = Gauge(
            "hpodlb_deregistrations_held",
            "Deregistrations the last pass held back, by the guard that held them.",
            ["guard"],
            registry=r,
        )
        self.duration = Histogram(
            "hpodlb_pass_duration_seconds",
            "How long each pass took.",
            buckets=PASS_BUCKETS,
            registry=r,
        )
        self.passes = Counter(
            "hpodlb_passes",
            "Passes by result: converged, not_converged, crashed, standby (another head acts, "
            "nothing failed).",
            ["result"],
            registry=r,
        )
        self.last_pass = Gauge(
            "hpodlb_last_pass_timestamp_seconds",
            "When the last pass ended (Unix time), whatever its result.",
            registry=r,
        )
        self.last_converged = Gauge(
            "hpodlb_last_converged_timestamp_seconds",
            "When the last pass that converged (or stood by soundly) ended (Unix time), kept in "
            "the state file across restarts; with none yet, when the first pass with this state "
            "file started.",
            registry=r,
        )
        self.aws_calls = Counter(
            "hpodlb_aws_calls",
            "AWS API calls (after botocore's retries) by operation and outcome: ok, throttled, "
            "denied, invalid, unreachable, error.",
            ["operation", "outcome"],
            registry=r,
        )
        self.key_pushes = Counter(
            "hpodlb_key_pushes",
            "Host-key pushes to login nodes by outcome: ok (installed and verified), failed.",
            ["outcome"],
            registry=r,
        )
        self.interval = Gauge(
            "hpodlb_interval_seconds",
            "The configured reconcile.interval_seconds (for the 'no pass' alert).",
            registry=r,
        )
        self.min_in_service = Gauge(
            "hpodlb_min_in_service",
            "The configured reconcile.min_in_service (for the 'too few healthy' alert).",
            registry=r,
        )
        for node_state in NodeState:
            self.login_nodes.labels(node_state.value)
        for result in PASS_RESULTS:
            self.passes.labels(result)
        for guard in DEREGISTRATION_GUARDS:
            self.held.labels(guard.value)
        for operation in AWS_OPERATIONS:
            for outcome in OUTCOMES:
                self.aws_calls.labels(operation, outcome)
        for outcome in ("ok", "failed"):
            self.key_pushes.labels(outcome)
        self._target_labels: set[tuple[str, str]] = set()
        self._since = time.time()

    def start(self, config: Config, state: State, now: float) -> None:
        """Before the first pass: the config, and the times the state file remembers (a restart
        is not a pass, nor a convergence)."""
        self._config(config)
        last = state.last_pass.finished_at if state.last_pass else 0.0
        self.last_pass.set(last or now)
        self._since = now  # with no convergence on record: not converged since this start
        self.last_converged.set(state.last_converged_at or state.first_pass_at or now)
        self._targets(config, state)

    def record(
        self,
        config: Config,
        state: State,
        outcome: PassOutcome | None,
        *,
        seconds: float,
        finished: float,
        aws_calls: Mapping[tuple[str, str], int],
    ) -> None:
        """Everything a finished pass changes. `outcome` None: the pass crashed before it had one.
        `seconds`: how long it took, as its caller measured it; `finished`: wall clock."""
        self._config(config)
        result = outcome.result if outcome is not None else "crashed"
        self.passes.labels(result).inc()
        self.duration.observe(seconds)  # the whole pass, saving the state included
        self.last_pass.set(finished)
        if result in SOUND_RESULTS:
            self.last_converged.set(finished)
        else:
            self.last_converged.set(state.last_converged_at or state.first_pass_at or self._since)
        for (operation, how), count in aws_calls.items():
            self.aws_calls.labels(operation, how).inc(count)
        if outcome is not None:
            pushed = sum(1 for a in outcome.applied if a.kind is Kind.PUSH_KEYS)
            self.key_pushes.labels("ok").inc(pushed)
            self.key_pushes.labels("failed").inc(outcome.push_failures)
            held = Tally(
                a.held_by.value
                for a in (outcome.plan.held() if outcome.plan else ())
                if a.kind is Kind.DEREGISTER and a.held_by is not None
            )
            for guard in DEREGISTRATION_GUARDS:
                self.held.labels(guard.value).set(held[guard.value])
        states = Tally(node_states(state, outcome, config).values())
        for node_state in NodeState:
            self.login_nodes.labels(node_state.value).set(states[node_state.value])
        arns = [tg.arn for tg in config.target_groups]
        self.healthy.set(len(health.taking_users(state, arns)))
        self._targets(config, state)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def _config(self, config: Config) -> None:
        self.interval.set(config.reconcile.interval_seconds)
        self.min_in_service.set(config.reconcile.min_in_service)

    def _targets(self, config: Config, state: State) -> None:
        """Set every (group, health) first, then drop the series of groups no longer configured:
        a scrape in between never sees a configured group missing."""
        counts: Tally[tuple[str, str]] = Tally()
        for tg in config.target_groups:
            for health_state in TARGET_HEALTH:
                counts[tg.name, health_state] += 0
            for record in state.targets.get(tg.arn, []):
                counts[tg.name, record.state] += 1
        for labels, count in counts.items():
            self.targets.labels(*labels).set(count)
        for labels in self._target_labels - set(counts):
            self.targets.remove(*labels)
        self._target_labels = set(counts)
