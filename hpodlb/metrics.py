"""Prometheus metrics served: what an admin alerts on, as `prometheus_client` exposes it.

What the families are and what a pass sets them to is `metricfamilies.py`'s (`Metrics`). Nothing
in the core imports either module: the AWS calls are tallied by the adapters (`awscalls.py`) and
everything else is read from the outcome.

`Exporter` is the edge: the `/metrics` endpoint of `hpodlb run` (`[metrics] listen`, answering
the clients `[metrics] allow` admits) and node_exporter's textfile (`[metrics] textfile`),
rewritten atomically after each pass of `run` and `once`. Metrics never cost a pass: an address in
use, or a textfile that cannot be written, is logged once (with what happens next) and retried
after each pass; reconciling goes on. A scrape's failure (a client that reset, went silent, was
cut) is the client's: never a traceback on stderr.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
import time
from collections import Counter as Tally
from contextlib import suppress
from pathlib import Path
from socketserver import ThreadingMixIn
from threading import Condition, Thread
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

from hpodlb.config import Config, MetricsConfig, Network, listen_address
from hpodlb.files import UntrustedPathError, os_reason, require_trusted_dir, write_atomically
from hpodlb.logs import get_logger
from hpodlb.metricfamilies import Metrics
from hpodlb.outcome import PassOutcome

if TYPE_CHECKING:
    from hpodlb.reconcile import Reconciler
    from hpodlb.state import State

log = get_logger("hpodlb.metrics")

TEXTFILE_MODE = 0o644  # node_exporter runs as its own user and must read it
# The endpoint's accept loop wakes this often to see whether it should stop. prometheus_client's
# start_http_server wakes every 0.5 s: 0.9 CPU s an hour of an idle daemon's, for nothing. The
# price of 5 s: a reload that moves the endpoint waits up to that long, after its pass.
SERVE_POLL_SECONDS = 5.0
# A scrape renders in a few ms: a connection still open after this long is cut (one that says
# nothing, or a header line every few seconds), no more than MAX_SCRAPES are answered at once and
# no more than MAX_SCRAPES_PER_CLIENT from one address (the others are closed at once). Without
# them, anyone who can reach the port could hold a thread each until the daemon has none left, or
# keep every slot busy and blind the monitoring to the alerts that matter. A client `[metrics]
# allow` does not admit is closed before it is counted: it takes no slot at all.
SCRAPE_TIMEOUT_SECONDS = 10.0
MAX_SCRAPES = 4
MAX_SCRAPES_PER_CLIENT = 2


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
        self._server: _Server | None = None
        self._allowed: tuple[Network, ...] = ()  # `[metrics] allow`; empty: every client
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
        allowed = config.allowed_networks()
        if allowed != self._allowed:
            self._allowed = allowed
            if self._server is not None:  # from its next accept; open scrapes end by their deadline
                self._server.allowed = allowed
                log.info("metrics_allow_changed", address=self.address, allow=_shown(allowed))
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
            server.allowed = self._allowed
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
        log.info(
            "metrics_listening",
            listen=listen,
            address=self.address,
            path="/metrics",
            allow=_shown(self._allowed),
        )

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


def client_allowed(allowed: tuple[Network, ...], host: str) -> bool:
    """Whether `[metrics] allow` admits a client at `host` (empty: everyone). An IPv4 client of an
    IPv6 socket (`::ffff:10.0.5.17`) is judged by its IPv4 address, as an admin wrote it."""
    if not allowed:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in allowed)


def _shown(allowed: tuple[Network, ...]) -> list[str] | str:
    return [str(n) for n in allowed] or "any client that can reach it"


class _Server(ThreadingMixIn, WSGIServer):
    """A thread per scrape (none waited for at exit), only for clients `allowed` admits (the
    others are closed at accept, before they count), at most MAX_SCRAPES at once and
    MAX_SCRAPES_PER_CLIENT from one address, each cut SCRAPE_TIMEOUT_SECONDS after it was accepted
    (one thread for all the deadlines, asleep while no scrape is open: a timer per scrape would
    double the threads, a polling loop would wake an idle daemon for nothing)."""

    daemon_threads = True
    allowed: tuple[Network, ...] = ()  # replaced whole on a reload: read without a lock

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._changed = Condition()
        # -> (client address, deadline; None once cut: its slot is freed when its thread ends)
        self._open: dict[socket.socket, tuple[str, float | None]] = {}
        self._closing = False
        super().__init__(*args, **kwargs)
        Thread(target=self._cut_late, name="hpodlb-metrics-deadlines", daemon=True).start()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """socketserver closes the connection of a client this refuses, before process_request."""
        if client_allowed(self.allowed, client_address[0]):
            return True
        log.debug("metrics_client_refused", client=client_address[0], why="not in [metrics] allow")
        return False

    def handle_error(self, request: Any, client_address: Any) -> None:
        """socketserver's own prints a traceback on stderr. A client that reset, went silent past
        the read timeout or was cut is the client's doing, and the scrape's alone: debug at most.
        Anything else is a bug of ours: one event, with its traceback, in the journal."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            log.debug("metrics_scrape_dropped", client=client_address[0], error=str(exc))
        else:
            log.error("metrics_scrape_failed", client=client_address[0], exc_info=True)

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
