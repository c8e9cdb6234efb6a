"""Prometheus metrics: what an admin alerts on, as `prometheus_client` exposes it.

Each `Metrics` has its own CollectorRegistry (never the library's global one: several daemons run
in one test process, and `once` must not export what some import registered). The families are
defined once, in `Metrics.__init__`; `Metrics.record` sets them from a finished pass (the state,
the pass's outcome, the config) and does no I/O. Nothing in the core imports this module: the AWS
calls are tallied by the adapters (`awscalls.py`) and everything else is read from the outcome.

`Exporter` is the edge: the `/metrics` endpoint of `hpodlb run` (`[metrics] listen`) and
node_exporter's textfile (`[metrics] textfile`), rewritten atomically after each pass of `run` and
`once`. Metrics never cost a pass: an address in use, or a textfile that cannot be written, is
logged once (with what happens next) and retried after each pass; reconciling goes on.

No label ever carries an IP address or an instance id: login nodes are counted by state, targets
by target group (its name, as every log line names it) and health.
"""

from __future__ import annotations

import socket
import time
from collections import Counter as Tally
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from socketserver import ThreadingMixIn
from threading import Condition, Thread
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
    make_wsgi_app,
)

from hpodlb import __version__, health
from hpodlb.awscalls import OUTCOMES
from hpodlb.config import Config, MetricsConfig, listen_address
from hpodlb.files import UntrustedPathError, os_reason, require_trusted_dir, write_atomically
from hpodlb.guards import DEREGISTRATION_GUARDS
from hpodlb.logs import get_logger
from hpodlb.outcome import SOUND_RESULTS, NodeState, PassOutcome, node_states
from hpodlb.planner import Kind

if TYPE_CHECKING:
    from hpodlb.reconcile import Reconciler
    from hpodlb.state import State

log = get_logger("hpodlb.metrics")

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
TEXTFILE_MODE = 0o644  # node_exporter runs as its own user and must read it
# The endpoint's accept loop wakes this often to see whether it should stop. prometheus_client's
# start_http_server wakes every 0.5 s: 0.9 CPU s an hour of an idle daemon's, for nothing. The
# price of 5 s: a reload that moves the endpoint waits up to that long, after its pass.
SERVE_POLL_SECONDS = 5.0
# A scrape renders in a few ms: a connection still open after this long is cut (one that says
# nothing, or a header line every few seconds), no more than MAX_SCRAPES are answered at once and
# no more than MAX_SCRAPES_PER_CLIENT from one address (the others are closed at once). Without
# them, anyone who can reach the port could hold a thread each until the daemon has none left, or
# keep every slot busy and blind the monitoring to the alerts that matter.
SCRAPE_TIMEOUT_SECONDS = 10.0
MAX_SCRAPES = 4
MAX_SCRAPES_PER_CLIENT = 2


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


def take_aws_calls(reconciler: Reconciler) -> Tally[tuple[str, str]]:
    """The AWS calls the reconciler's adapters made since the last take."""
    calls: Tally[tuple[str, str]] = Tally()
    for group in reconciler.groups:
        calls.update(group.calls.take())
    if reconciler.hyperpod is not None:
        calls.update(reconciler.hyperpod.calls.take())
    return calls


class Exporter:
    """The endpoint and the textfile, following the config of each pass (`follow`)."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics or Metrics()
        self.listen = ""  # the address asked for; served when `_server` is set
        self.address = ""  # the address actually bound (port 0 asks for any free port)
        self._server: WSGIServer | None = None
        self._thread: Thread | None = None
        self._listen_error = ""
        self.textfile: Path | None = None
        self._textfile_error = ""

    @property
    def problem(self) -> str:
        """What is off although the config asks for it, for STATUS= (empty: all well)."""
        return "; ".join(p for p in (self._listen_error, self._textfile_error) if p)

    def start(self, config: Config, state: State) -> None:
        self.metrics.start(config, state, time.time())
        self.follow(config.metrics)

    def after_pass(
        self,
        config: Config,
        state: State,
        outcome: PassOutcome | None,
        seconds: float,
        reconciler: Reconciler,
    ) -> None:
        """Record the pass, follow the config's [metrics], write the textfile. Never raises: a
        bug here must not cost the daemon (nor be silent)."""
        try:
            self.metrics.record(
                config,
                state,
                outcome,
                seconds=seconds,
                finished=time.time(),
                aws_calls=take_aws_calls(reconciler),
            )
            self.follow(config.metrics)
            if self.textfile is not None:
                self.write_textfile(self.textfile)
        except Exception:
            log.exception("metrics_failed", action="reconciling goes on")

    def follow(self, config: MetricsConfig) -> None:
        """Serve at the configured address (started, moved, stopped, or tried again after a
        failure); a textfile no longer configured is removed, so node_exporter does not go on
        exporting its last numbers as if they were current."""
        if config.listen != self.listen:
            self._stop_server()
            self.listen, self._listen_error = config.listen, ""
        if self.listen and self._server is None:
            self._start_server(self.listen)
        if config.textfile != self.textfile:
            if self.textfile is not None:
                self._remove(self.textfile)
            self.textfile, self._textfile_error = config.textfile, ""

    def write_textfile(self, path: Path) -> None:
        """node_exporter's textfile: a temp file beside it (0644), fsync, rename. The rename
        replaces whatever is at `path`, a symlink included, and never writes through one."""
        try:
            require_trusted_dir(path.parent)
            write_atomically(path, self.metrics.exposition(), TEXTFILE_MODE)
        except (OSError, UntrustedPathError) as exc:
            error = f"cannot write {path}: {os_reason(exc)}"
            if error != self._textfile_error:
                log.error(
                    "metrics_textfile_unwritable",
                    path=str(path),
                    error=error,
                    action="the pass is not affected; tried again after each pass (its "
                    "hpodlb_last_pass_timestamp_seconds stops advancing meanwhile)",
                )
            self._textfile_error = error
            return
        if self._textfile_error:
            log.info("metrics_textfile_written", path=str(path))
        self._textfile_error = ""

    def close(self) -> None:
        self._stop_server()

    def _start_server(self, listen: str) -> None:
        host, port = listen_address(listen)
        try:
            server = make_server(
                host,
                port,
                make_wsgi_app(self.metrics.registry),
                _Server6 if ":" in host else _Server,
                handler_class=_Quiet,
            )
        except OSError as exc:
            error = f"cannot listen on {listen}: {os_reason(exc)}"
            if error != self._listen_error:
                log.error(
                    "metrics_listen_failed",
                    listen=listen,
                    error=error,
                    action="reconciling without the /metrics endpoint; tried again after each pass",
                )
            self._listen_error = error
            return
        thread = Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": SERVE_POLL_SECONDS},
            name="hpodlb-metrics",
            daemon=True,
        )
        thread.start()
        self._server, self._thread, self._listen_error = server, thread, ""
        host, port = str(server.server_address[0]), int(server.server_address[1])
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        log.info("metrics_listening", listen=listen, address=self.address, path="/metrics")

    def _stop_server(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        log.info("metrics_stopped", address=self.address)
        self._server = self._thread = None
        self.address = ""

    def _remove(self, path: Path) -> None:
        try:
            path.unlink(missing_ok=True)  # unlink never follows a symlink
        except OSError as exc:
            log.warning("metrics_textfile_left", path=str(path), error=os_reason(exc))
        else:
            log.info("metrics_textfile_removed", path=str(path), why="no longer configured")


class _Server(ThreadingMixIn, WSGIServer):
    """A thread per scrape (none waited for at exit), at most MAX_SCRAPES at once and
    MAX_SCRAPES_PER_CLIENT from one address, each cut SCRAPE_TIMEOUT_SECONDS after it was accepted
    (one thread for all the deadlines, asleep while no scrape is open: a timer per scrape would
    double the threads, a polling loop would wake an idle daemon for nothing)."""

    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._changed = Condition()
        # -> (client address, deadline; None once cut: its slot is freed when its thread ends)
        self._open: dict[socket.socket, tuple[str, float | None]] = {}
        self._closing = False
        super().__init__(*args, **kwargs)
        Thread(target=self._cut_late, name="hpodlb-metrics-deadlines", daemon=True).start()

    def process_request(self, request: Any, client_address: Any) -> None:
        host = client_address[0]
        with self._changed:
            mine = sum(1 for who, _ in self._open.values() if who == host)
            if len(self._open) >= MAX_SCRAPES or mine >= MAX_SCRAPES_PER_CLIENT:
                self.shutdown_request(request)  # busy: this one is closed, not queued
                return
            self._open[request] = (host, time.monotonic() + SCRAPE_TIMEOUT_SECONDS)
            self._changed.notify()
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread for it: the socketserver closes it, the slot is free
            self._forget(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)

    def server_close(self) -> None:
        """Also cuts the scrapes still open: with the deadline thread gone, nothing else would."""
        with self._changed:
            self._closing = True
            for sock in self._open:
                _cut(sock)
            self._changed.notify()
        super().server_close()

    def _forget(self, request: socket.socket) -> None:
        with self._changed:
            self._open.pop(request, None)

    def _cut_late(self) -> None:
        with self._changed:
            while not self._closing:
                now = time.monotonic()
                for sock, (host, deadline) in list(self._open.items()):
                    if deadline is not None and deadline <= now:
                        _cut(sock)
                        self._open[sock] = (host, None)
                soonest = min((d for _, d in self._open.values() if d is not None), default=None)
                self._changed.wait(None if soonest is None else max(soonest - now, 0.05))


def _cut(sock: socket.socket) -> None:
    """Its handler thread's read or write ends at once; the thread then closes it."""
    with suppress(OSError):  # closed meanwhile
        sock.shutdown(socket.SHUT_RDWR)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Quiet(WSGIRequestHandler):
    """No line on stderr per scrape: the journal is for events. A silent client is dropped."""

    timeout = SCRAPE_TIMEOUT_SECONDS

    def log_message(self, format: str, *args: Any) -> None:
        return


def write_once(config: Config, state: State, outcome: PassOutcome, reconciler: Reconciler) -> None:
    """`hpodlb once`: the textfile, for admins who run passes from cron (no endpoint: the process
    ends). Its counters count this one pass; the gauges and timestamps are what to alert on."""
    if config.metrics.textfile is None:
        return
    config = config.model_copy(update={"metrics": config.metrics.model_copy(update={"listen": ""})})
    exporter = Exporter()
    exporter.metrics.start(config, state, time.time())
    exporter.after_pass(config, state, outcome, outcome.duration_seconds, reconciler)
