"""`hpodlb run`: the daemon's edge. Scheduling, signals, the file trigger and systemd notification.

The core never sees any of this: each pass is `Reconciler.run_pass`, exactly what `hpodlb once`
runs. APScheduler owns the clock (one interval job, `max_instances=1`, `coalesce=True`, a misfire
grace near the interval); the main thread owns everything else in a small loop that wakes every
half second. Signal handlers only set flags (kopf's pattern); the loop acts on them:
- SIGHUP: re-read the config; an invalid one is refused and the running one stays in force;
- SIGTERM/SIGINT: stop scheduling, give a running pass a few seconds, then exit 0 (a hard exit
  bounds a pass that will not end);
- a change of the resource config (a stat poll: no inotify dependency, cheap at 2 Hz) triggers a
  pass once the file has been still for a moment, so a burst of writes is one pass.
WATCHDOG=1 is sent only while passes advance: a pass stuck longer than half the watchdog interval
stops the pings, and systemd restarts us.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from hpodlb.config import Config, ConfigError, load_config
from hpodlb.files import file_signature
from hpodlb.logs import get_logger
from hpodlb.reconcile import PassOutcome, Reconciler
from hpodlb.sdnotify import Notifier
from hpodlb.state import State, load_state, save_state

log = get_logger("hpodlb.service")

TICK_SECONDS = 0.5
SETTLE_SECONDS = 0.5  # a resource config must be still this long before it triggers a pass
STOP_GRACE_SECONDS = 8.0  # SIGTERM: how long a running pass may take to finish before a hard exit
JOB_ID = "pass"


class Flags:
    """What signal handlers are allowed to touch."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.reload = threading.Event()

    def install(self) -> None:
        def on_stop(signum: int, _: FrameType | None) -> None:
            self.stop.set()

        def on_hup(signum: int, _: FrameType | None) -> None:
            self.reload.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)


def summary_line(state: State, outcome: PassOutcome | None, config: Config) -> str:
    """`3/3 login nodes in service, 0 pending, last pass 0.4 s` for STATUS= and the journal."""
    arns = [tg.arn for tg in config.target_groups]
    serving = 0
    for ip, record in state.nodes.items():
        in_every_group = all(
            any(t.ip == ip and t.state != "draining" for t in state.targets.get(arn, []))
            for arn in arns
        )
        keys_ok = record.key_state in ("in-sync", "not checked")
        serving += in_every_group and keys_ok
    total = len(state.nodes)
    if outcome is None:
        return f"{serving}/{total} login nodes in service"
    if outcome.inventory_error:
        return f"{serving}/{total} login nodes in service; resource config refused, no change"
    plan = outcome.plan
    pending = len(plan.held()) + len(plan.waiting) if plan else 0
    return (
        f"{serving}/{total} login nodes in service, {pending} pending, {len(outcome.errors)} errors, "
        f"last pass {outcome.duration_seconds:.1f} s"
    )


class Daemon:
    def __init__(
        self,
        config_path: Path,
        config: Config,
        build: Callable[[Config], Reconciler],
        notifier: Notifier | None = None,
    ) -> None:
        self.config_path = config_path
        self.config = config
        self.build = build
        self.reconciler = build(config)
        self.notifier = notifier or Notifier()
        self.flags = Flags()
        self.state, warning = load_state(config.state.dir)
        if warning:
            log.warning("state_rebuilt", warning=warning)
        self.passes = 0
        self.pass_started: float | None = None  # monotonic, while a pass runs
        self.pass_lock = threading.Lock()
        self.trigger_pending = False
        self.scheduler: Any = None

    # -- the pass, run by APScheduler's worker ----------------------------------------------------

    def run_pass(self) -> None:
        with self.pass_lock:
            if self.flags.stop.is_set():
                return
            self.pass_started = time.monotonic()
            try:
                outcome = self.reconciler.run_pass(self.state, apply=True)
                save_state(self.config.state.dir, self.state)
            except Exception:  # a bug must cost one pass, never the daemon
                log.exception("pass_crashed")
                outcome = None
            finally:
                self.pass_started = None
            self.passes += 1
        line = summary_line(self.state, outcome, self.config)
        if outcome is not None:
            log.info(
                "pass_finished",
                converged=outcome.converged,
                summary=outcome.summary(),
                seconds=round(outcome.duration_seconds, 3),
            )
        if self.passes == 1:
            self.notifier.ready(line)
        else:
            self.notifier.status(line)

    # -- the main thread ----------------------------------------------------------------------------

    def serve(self) -> int:
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler

        self.flags.install()
        self.scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=1)}, timezone=dt.timezone.utc
        )
        self._schedule(first_run=dt.datetime.now(dt.timezone.utc))
        self.scheduler.start()
        log.info(
            "daemon_started",
            config=str(self.config_path),
            pid=os.getpid(),
            interval_seconds=self.config.reconcile.interval_seconds,
            target_groups=[tg.name for tg in self.config.target_groups],
        )
        watched = file_signature(self.config.cluster.resource_config)
        changed_at: float | None = None
        last_ping = 0.0
        while not self.flags.stop.wait(TICK_SECONDS):
            if self.flags.reload.is_set():
                self.flags.reload.clear()
                self._reload()
                watched = file_signature(self.config.cluster.resource_config)
            now = time.monotonic()
            current = file_signature(self.config.cluster.resource_config)
            if current != watched:
                watched, changed_at = current, now
            elif changed_at is not None and now - changed_at >= SETTLE_SECONDS:
                changed_at = None
                log.info("resource_config_changed", path=str(self.config.cluster.resource_config))
                self.trigger_pending = True
            if self.trigger_pending and self.pass_started is None:
                self.trigger_pending = False
                self._run_soon()
            wd = self.notifier.watchdog_seconds
            if wd and now - last_ping >= wd / 4 and self._advancing(wd / 2):
                self.notifier.watchdog()
                last_ping = now
        return self._stop()

    def _advancing(self, stall_seconds: float) -> bool:
        started = self.pass_started
        return started is None or time.monotonic() - started < stall_seconds

    def _schedule(self, first_run: dt.datetime | None = None) -> None:
        interval = self.config.reconcile.interval_seconds
        kwargs: dict[str, Any] = {"next_run_time": first_run} if first_run else {}
        self.scheduler.add_job(
            self.run_pass,
            "interval",
            seconds=interval,
            id=JOB_ID,
            replace_existing=True,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=max(1, int(interval)),
            **kwargs,
        )

    def _run_soon(self) -> None:
        self.scheduler.modify_job(JOB_ID, next_run_time=dt.datetime.now(dt.timezone.utc))

    def _reload(self) -> None:
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error(
                "reload_refused",
                path=str(self.config_path),
                error=str(exc),
                action="keeping the running config",
            )
            self.notifier.ready(f"reload refused: {str(exc).splitlines()[0]}")
            return
        with self.pass_lock:  # never swap adapters under a running pass
            self.config = new
            self.reconciler = self.build(new)
        self._schedule(first_run=dt.datetime.now(dt.timezone.utc))
        log.info(
            "config_reloaded",
            path=str(self.config_path),
            interval_seconds=new.reconcile.interval_seconds,
        )
        self.notifier.ready(summary_line(self.state, None, new))

    def _stop(self) -> int:
        log.info("daemon_stopping", reason="signal")
        self.notifier.stopping()
        self.scheduler.shutdown(wait=False)
        if not self.pass_lock.acquire(timeout=STOP_GRACE_SECONDS):
            log.warning(
                "pass_abandoned",
                after_seconds=STOP_GRACE_SECONDS,
                why="a pass did not finish in time; the next start converges from here",
            )
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        self.pass_lock.release()
        log.info("daemon_stopped", passes=self.passes)
        return 0
