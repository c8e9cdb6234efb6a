"""`hpodlb run`: the daemon's edge. Scheduling, signals, the file trigger and systemd notification.

The core never sees any of this: each pass is `Reconciler.run_pass`, exactly what `hpodlb once`
runs. Three parties, and a wall-clock step (NTP, an admin, a VM resumed) stops none of them:
- APScheduler owns the cadence: one interval job (`max_instances=1`, `coalesce=True`, a misfire
  grace of one interval) whose only work is to *want* a pass. Its trigger runs on the wall clock,
  so the main thread watches the wall clock against the monotonic one and, on a step of more than
  a second, reschedules the job from now; and if no pass started for two intervals anyway, it
  wants one itself (logged: the scheduler's clock went wrong);
- the pass worker runs one pass at a time, each time a pass is wanted. It takes the request before
  it reads anything, so a change seen at any moment leads to a pass that starts after it;
- the main thread never waits for a pass. It wakes twice a second (at once on a signal; signal
  handlers only set flags, kopf's pattern) and:
  - wants a pass at start, once the resource config has changed and been still for a moment (a
    stat poll: no inotify dependency, cheap at 2 Hz), as soon as the admin's intents change (a
    `drain`, `undrain` or `keys trust` takes effect within a second), and after a reload;
  - SIGHUP: reads the config and builds its reconciler at once; the worker swaps them in before its
    next pass. An invalid config is refused and the running one stays in force; a new `state.dir`
    is locked at once (or the reload is refused) and the old dir's lock is let go at the swap, so
    no `hpodlb once` can act beside us with either config;
  - SIGTERM/SIGINT: no new pass; a running one gets STOP_GRACE_SECONDS, then a hard exit 0;
  - WATCHDOG=1 only while passes advance: a running pass beats as it goes (every 0.25 s while
    it waits on node jobs, each bounded by its deadline; before each AWS call), and with none
    running, one finished within `interval_seconds` plus half the watchdog interval. A pass stuck
    in a call for half the watchdog interval, or a dead worker or scheduler, stops the pings, and
    systemd restarts us; a long pass over many slow nodes does not. Before READY=1 each ping also
    extends systemd's start timeout (EXTEND_TIMEOUT_USEC).
The main thread only reads what the worker publishes (times, the last summary line), never the
state the pass is changing.
"""

from __future__ import annotations

import datetime as dt
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import hpodlb
from hpodlb import health
from hpodlb.config import Config, ConfigError, load_config
from hpodlb.files import file_signature
from hpodlb.intents import intents_path
from hpodlb.lock import InstanceLock, LockedError
from hpodlb.logs import get_logger
from hpodlb.outcome import PassOutcome, log_finished
from hpodlb.reconcile import Reconciler
from hpodlb.record import save_outcome
from hpodlb.sdnotify import Notifier
from hpodlb.state import State, load_state

if TYPE_CHECKING:
    from hpodlb.metrics import Exporter

log = get_logger("hpodlb.service")

TICK_SECONDS = 0.5
SETTLE_SECONDS = 0.5  # a resource config must be still this long before it triggers a pass
STOP_GRACE_SECONDS = 8.0  # SIGTERM: how long a running pass may take to finish before a hard exit
CLOCK_STEP_SECONDS = 1.0  # wall minus monotonic moved this much: the wall clock was stepped
JOB_ID = "pass"


class Flags:
    """What signal handlers are allowed to touch, and the main thread's clock-proof nap."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.reload = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def install(self) -> None:
        def on_stop(signum: int, _: FrameType | None) -> None:
            self.stop.set()

        def on_hup(signum: int, _: FrameType | None) -> None:
            self.reload.set()

        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)

    def nap(self, seconds: float) -> None:
        """Sleep, waking early for a signal. select's timeout is relative, so a wall-clock step
        cannot stretch it (Event.wait can, on Pythons older than 3.11)."""
        ready, _, _ = select.select([self._wake_r], [], [], seconds)
        if ready:
            while True:
                try:
                    if not os.read(self._wake_r, 512):
                        return
                except BlockingIOError:
                    return


def summary_line(state: State, outcome: PassOutcome | None, config: Config) -> str:
    """`3/3 login nodes healthy, 0 pending, 0 errors, last pass 0.4 s` for STATUS= and the
    journal. Healthy: verified keys, and the NLB's health checks pass in every target group."""
    head = health.headline(state, [tg.arn for tg in config.target_groups])
    if outcome is not None and outcome.standby:
        head = f"{outcome.standby}; {head}"
    if outcome is None:
        return head
    if outcome.inventory_error:
        return f"{head}; resource config refused, no change"
    plan = outcome.plan
    pending = len(plan.held()) + len(plan.waiting) if plan else 0
    return (
        f"{head}, {pending} pending, {len(outcome.unhealthy)} targets unhealthy too long, "
        f"{len(outcome.errors)} errors, last pass {outcome.duration_seconds:.1f} s"
    )


@dataclass(frozen=True)
class _Generation:
    """A config and the reconciler built for it: what one pass runs with."""

    config: Config
    reconciler: Reconciler


class Daemon:
    def __init__(
        self,
        config_path: Path,
        config: Config,
        build: Callable[[Config], Reconciler],
        notifier: Notifier | None = None,
        lock: InstanceLock | None = None,
    ) -> None:
        self.config_path = config_path
        self.config = config  # the latest accepted config: what the main thread schedules by
        self.build = build
        self.notifier = notifier or Notifier()
        self.flags = Flags()
        self.state, warning = load_state(config.state.dir)  # the worker's alone once it runs
        if warning:
            log.warning("state_rebuilt", warning=warning)
        # The worker's generation, and the next one a reload left for it. `_swap` guards `_next`
        # and `_locks` and is never held for longer than a few assignments.
        self._current = _Generation(config, build(config))
        self._next: _Generation | None = None
        self._locks: dict[Path, InstanceLock] = {config.state.dir: lock} if lock else {}
        self._swap = threading.Lock()
        self.wanted = threading.Event()
        # Published by the worker for the main thread (monotonic seconds); plain attributes, each
        # written by one thread only.
        self.pass_started: float | None = None  # while a pass runs
        self.pass_beat = 0.0  # when the running pass last advanced
        self.last_started: float | None = None
        self.last_finished = time.monotonic()
        self.last_summary = summary_line(self.state, None, config)
        self.passes = 0
        self.scheduler: Any = None
        # Metrics: built the first time a config asks for them (prometheus_client is not imported
        # otherwise); then only the worker touches them, after each pass.
        self.exporter: Exporter | None = None

    # -- the pass worker ----------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            self.wanted.wait()  # no timeout: the main thread keeps the clock
            self.pass_beat = time.monotonic()
            self.pass_started = self.last_started = self.pass_beat
            self.wanted.clear()  # before the pass reads anything: a later change wants another
            if self.flags.stop.is_set():  # checked after clear(): _stop's wake-up is never lost
                self.pass_started = None
                return
            try:
                self._run_pass()
            except Exception:  # a bug must cost one pass, never the daemon
                log.exception("pass_crashed")
            finally:
                self.pass_started = None
                self.last_finished = time.monotonic()

    def _run_pass(self) -> None:
        generation = self._take_next()
        config = generation.config
        outcome: PassOutcome | None = None
        started = time.monotonic()
        try:
            outcome = generation.reconciler.run_pass(  # counts: taken in by a later pass
                self.state, apply=True, beat=self._beat, wait_for_counts=False
            )
            save_outcome(config.state.dir, self.state, outcome)
        except Exception:  # a bug must cost one pass, never the daemon
            log.exception("pass_crashed")
        self.passes += 1
        line = summary_line(self.state, outcome, config)
        exporter = self._metrics(config)
        if exporter is not None:
            seconds = time.monotonic() - started
            exporter.after_pass(config, self.state, outcome, seconds, generation.reconciler)
            if exporter.problem:  # systemctl status says what is off
                line = f"{line}; metrics: {exporter.problem}"
        self.last_summary = line
        if outcome is not None:
            log_finished(outcome)
        if self.passes == 1:
            self.notifier.ready(line)
        else:
            self.notifier.status(line)

    def _beat(self) -> None:
        self.pass_beat = time.monotonic()

    def _metrics(self, config: Config) -> Exporter | None:
        if self.exporter is None and (config.metrics.listen or config.metrics.textfile):
            from hpodlb.metrics import Exporter

            self.exporter = Exporter()
            self.exporter.start(config, self.state)
        return self.exporter

    def _take_next(self) -> _Generation:
        """The generation this pass runs with: a reload's, if one is waiting; then only the lock
        of the state dir in use is kept."""
        with self._swap:
            if self._next is not None:
                self._current, self._next = self._next, None
                in_use = self._current.config.state.dir
                for path in [p for p in self._locks if p != in_use]:
                    self._locks.pop(path).release()
            return self._current

    # -- the main thread ----------------------------------------------------------------------------

    def serve(self) -> int:
        from apscheduler.schedulers.background import BackgroundScheduler

        self.flags.install()
        self._metrics(self.config)  # the endpoint answers during a long first pass too
        worker = threading.Thread(target=self._work, name="hpodlb-pass", daemon=True)
        self._want("start")
        worker.start()
        self.scheduler = BackgroundScheduler(timezone=dt.timezone.utc)
        self._schedule()
        self.scheduler.start()
        log.info(
            "daemon_started",
            version=hpodlb.__version__,
            config=str(self.config_path),
            pid=os.getpid(),
            interval_seconds=self.config.reconcile.interval_seconds,
            target_groups=[tg.name for tg in self.config.target_groups],
        )
        watched = file_signature(self.config.cluster.resource_config)
        intents = file_signature(intents_path(self.config.state.dir))
        changed_at: float | None = None
        last_ping = 0.0
        offset = time.time() - time.monotonic()
        while True:
            self.flags.nap(TICK_SECONDS)
            if self.flags.stop.is_set():
                break
            if self.flags.reload.is_set():
                self.flags.reload.clear()
                self._reload()
                watched = file_signature(self.config.cluster.resource_config)
            now = time.monotonic()
            asked = file_signature(intents_path(self.config.state.dir))
            if asked != intents:  # written atomically by the commands: no need to let it settle
                intents = asked
                log.info("intents_changed", path=str(intents_path(self.config.state.dir)))
                self._want("intents_changed")
            current = file_signature(self.config.cluster.resource_config)
            if current != watched:
                watched, changed_at = current, now
            elif changed_at is not None and now - changed_at >= SETTLE_SECONDS:
                changed_at = None
                log.info("resource_config_changed", path=str(self.config.cluster.resource_config))
                self._want("resource_config_changed")
            offset = self._clock_watch(offset)
            started = self.last_started
            interval = self.config.reconcile.interval_seconds
            idle = self.pass_started is None and not self.wanted.is_set()
            if started is not None and idle and now - started >= 2 * interval:
                log.warning("pass_overdue", seconds_since_last=round(now - started, 1))
                self._want("overdue")
            wd = self.notifier.watchdog_seconds
            if wd and now - last_ping >= wd / 4 and self._advancing(now, wd / 2):
                self.notifier.watchdog()
                if self.passes == 0:  # READY=1 waits for the first pass, however long it is
                    self.notifier.extend_timeout(wd)
                last_ping = now
        return self._stop(worker)

    def _schedule(self) -> None:
        """The interval job, first due one interval from now (start and reload want a pass now)."""
        interval = self.config.reconcile.interval_seconds
        self.scheduler.add_job(
            self._want,
            "interval",
            args=("interval",),
            seconds=interval,
            id=JOB_ID,
            replace_existing=True,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=max(1, int(interval)),
        )

    def _clock_watch(self, offset: float) -> float:
        """APScheduler counts in wall-clock time: after a step, its next run is restarted from now."""
        now = time.time() - time.monotonic()
        if abs(now - offset) > CLOCK_STEP_SECONDS:
            log.warning("wall_clock_stepped", seconds=round(now - offset, 1), action="rescheduled")
            self._schedule()
            self._want("wall_clock_stepped")
        return now

    def _want(self, reason: str) -> None:
        if not self.wanted.is_set():
            log.debug("pass_wanted", reason=reason)
            self.wanted.set()

    def _advancing(self, now: float, stall_seconds: float) -> bool:
        """A running pass beat lately; with none running, one finished within an interval and a bit.
        (A pass's length is no sign of trouble: 200 nodes behind a dead AZ make a long one.)"""
        if self.pass_started is not None:
            return now - self.pass_beat < stall_seconds
        return now - self.last_finished < self.config.reconcile.interval_seconds + stall_seconds

    def _reload(self) -> None:
        ready = self.passes > 0  # before READY=1, systemd must not hear RELOADING=1
        if ready:
            self.notifier.reloading()
        try:
            new = load_config(self.config_path)
            self._offer(new, self.build(new))
        except (ConfigError, LockedError) as exc:
            self._refuse(str(exc), ready=ready)
            return
        except Exception as exc:  # building adapters for a config must not end the daemon
            log.exception("reload_failed")
            self._refuse(f"cannot build the new config's adapters: {exc}", ready=ready)
            return
        self.config = new
        self._schedule()
        self._want("reload")
        log.info(
            "config_reloaded",
            path=str(self.config_path),
            interval_seconds=new.reconcile.interval_seconds,
            state_dir=str(new.state.dir),
            takes_effect="at the next pass",
        )
        if ready:
            self.notifier.ready(self.last_summary)

    def _offer(self, config: Config, reconciler: Reconciler) -> None:
        """Leave a new generation for the worker's next pass. When it moves `state.dir`, its lock
        is taken now (LockedError if it cannot be), under `_swap` so that the worker cannot let go
        of a lock this generation needs between the check and the hand-over."""
        with self._swap:
            state_dir = config.state.dir
            if self._locks and state_dir not in self._locks:
                self._locks[state_dir] = InstanceLock(state_dir).acquire()
            self._next = _Generation(config, reconciler)

    def _refuse(self, error: str, *, ready: bool) -> None:
        log.error(
            "reload_refused",
            path=str(self.config_path),
            error=error,
            action="keeping the running config",
        )
        if ready:
            self.notifier.ready(f"reload refused: {error.splitlines()[0]}")

    def _stop(self, worker: threading.Thread) -> int:
        log.info("daemon_stopping", reason="signal")
        self.notifier.stopping()
        self.scheduler.shutdown(wait=False)
        self.wanted.set()  # wakes an idle worker, which sees the stop flag and ends
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while worker.is_alive() and time.monotonic() < deadline:
            self.flags.nap(0.05)
        if worker.is_alive():
            log.warning(
                "pass_abandoned",
                after_seconds=STOP_GRACE_SECONDS,
                why="a pass did not finish in time; the next start converges from here",
            )
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        log.info("daemon_stopped", passes=self.passes)
        return 0
