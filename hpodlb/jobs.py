"""The node-job runner: probes, pushes and adoptions on a pool of threads, and maintenance work
(a drained node's session count) in a lane of its own.

A node's job runs with the deadline its step gives (`HostKeys.probe_seconds`, ..., counted from
when a worker takes it, not from when it was queued) behind an exception boundary: whatever it
raises, or a hang past its deadline, is that node's result, never the pass's. The runner starts
jobs and hands their results back; it never acts on them (the sequencer in `reconcile` does), so
it reads an `Action` only to name the job, and knows nothing of state or AWS. While the pass
waits on jobs it beats every BEAT_SECONDS: it is alive, and every job it waits on is bounded.

Jobs are pipelined: a free worker takes the oldest waiting push or adoption before any waiting
probe, so a node's push starts as soon as its probe has come back and been planned, not after
every other node's probe (a cold pass over 200 nodes would otherwise register nobody until the
last probe had run).

Maintenance never shares a worker with that work: a pass's pool is the pass's own, and session
counts go to a `NodeJobs` of MAINTENANCE_WORKERS that the reconciler keeps from pass to pass. A
pass of the daemon does not wait for it (a wedged drained node once held every pass, and every
new node, for the 30 s command deadline); what a count found is taken in by the first pass after
it ends. A node whose count is still running, even past its deadline, gets no second one (`busy`),
so the lane cannot pile up threads behind a node that hangs. Workers end when nothing waits; the
lane's do not hold a stopping daemon (a count cut off there is ended on the node, see sessions).
"""

from __future__ import annotations

import heapq
import math
import os
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import Any

from hpodlb.planner import Action
from hpodlb.sshnode import SshError


def default_workers(cpus: int | None = None) -> int:
    """Node jobs at a time: 4 per core this process may run on (a job mostly waits on the
    network and the node; what it spends here is mostly SSH key exchange, so 8 keep 2 cores
    busy), at least 4, at most 32 (each holds a thread and a connection)."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(4, min(32, 4 * (cpus or 1)))


WORKERS = default_workers()
MAINTENANCE_WORKERS = 2  # session counts at a time, apart from `WORKERS`: drained nodes are few
GATHER_SECONDS = 0.05  # results that come in this close together make one re-plan, not several
BEAT_SECONDS = 0.25  # a pass waiting on node jobs wakes this often, to say it is alive
PROBE = "probe"
SESSIONS = "sessions"  # counting a drained node's SSH connections (maintenance)
# Which waiting job a free worker takes first (lower first; the oldest among equals): what moves
# a node closer to users goes before what only looks at one.
URGENT, ROUTINE = 0, 1


@dataclass
class Job:
    what: str  # PROBE, SESSIONS, or the Kind of the action
    ip: str
    budget: float  # seconds from the job's start: past them, the node's job counts as failed
    action: Action | None = None
    started: float | None = None  # monotonic; set by the worker that runs it
    finished: float | None = None  # monotonic; when its call returned (what it found is of then)

    @property
    def deadline(self) -> float:
        """Counted from when a worker took the job, not from when it was queued: nodes queued
        behind slow ones (an AZ down) must not time out before they were even tried."""
        return math.inf if self.started is None else self.started + self.budget


class NodeJobs:
    """Jobs, `workers` at a time, the urgent first: a pass's, or the maintenance lane's."""

    def __init__(
        self,
        workers: int,
        clock: Callable[[], float],
        beat: Callable[[], None],
        name: str = "hpodlb-node",
        *,
        detached: bool = False,
    ) -> None:
        self._workers = workers
        self._name = name
        self._detached = detached  # the process may end without waiting for these workers
        self._threads = 0
        self._waiting: list[tuple[int, int, Future[Any], Callable[[], Any], Job]] = []  # a heap
        self._count = 0
        self._lock = threading.Lock()
        self._running: dict[Future[Any], Job] = {}  # not yet handed back
        self._busy: Counter[str] = Counter()  # by IP: queued, or its call has not returned
        self._clock = clock
        self._beat = beat

    def __len__(self) -> int:
        return len(self._running)

    def submit(self, job: Job, call: Callable[[], Any], *, urgent: bool = False) -> None:
        """Run `call` as `job`; `urgent` (a push, an adoption) before every probe still waiting."""
        future: Future[Any] = Future()
        with self._lock:
            self._count += 1
            entry = (URGENT if urgent else ROUTINE, self._count, future, call, job)
            heapq.heappush(self._waiting, entry)
            self._busy[job.ip] += 1
            if self._threads < self._workers:  # a worker a job, up to the limit
                self._threads += 1
                name = f"{self._name}_{self._threads - 1}"
                threading.Thread(target=self._work, name=name, daemon=self._detached).start()
        self._running[future] = job

    def busy(self, ip: str) -> bool:
        """A job for `ip` waits, or runs: handed back at its deadline or not, until it returns."""
        with self._lock:
            return self._busy[ip] > 0

    def poll(self) -> list[tuple[Job, Any]]:
        """Every job done or past its deadline, as `collect` hands them back, without waiting."""
        return self._hand_back({f for f in self._running if f.done()})

    def collect(self, wake_by: float | None = None) -> list[tuple[Job, Any]]:
        """Wait for at least one job (or its deadline, or `wake_by`), then hand back every job
        that is done, with its result: what it returned, or the exception that ended it."""
        if not self._running:
            return []
        done: set[Future[Any]] = set()
        pending: set[Future[Any]] = set(self._running)
        while True:
            now = self._clock()
            nearest = min(job.deadline for job in self._running.values())
            if wake_by is not None:
                nearest = min(nearest, wake_by)
            if now >= nearest:
                break
            done, pending = wait(
                pending, timeout=min(nearest - now, BEAT_SECONDS), return_when=FIRST_COMPLETED
            )
            if done:
                break
            self._beat()
        if done and pending:  # what finishes in the next moment is taken in with it: one re-plan
            done |= wait(pending, timeout=GATHER_SECONDS)[0]
        return self._hand_back(done)

    def _hand_back(self, done: set[Future[Any]]) -> list[tuple[Job, Any]]:
        now = self._clock()
        results: list[tuple[Job, Any]] = []
        for future, job in list(self._running.items()):
            if future in done:
                result = future.result()
            elif now >= job.deadline:  # a hang no step's own deadline caught: the node's, not ours
                result = SshError(job.what, "did not finish within its deadline")
            else:
                continue
            del self._running[future]
            results.append((job, result))
        return results

    def close(self) -> None:
        """Jobs not started are dropped; running ones are not waited for (each is bounded), and
        their workers end once they are done."""
        with self._lock:
            for _, _, future, _, job in self._waiting:
                future.cancel()
                self._busy[job.ip] -= 1
            self._waiting.clear()

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._waiting:  # nothing waits: this worker ends (submit starts another)
                    self._threads -= 1
                    return
                _, _, future, call, job = heapq.heappop(self._waiting)
            if future.set_running_or_notify_cancel():
                result = _boundary(call, job, self._clock)
                job.finished = self._clock()
                with self._lock:  # before the result shows: a pass that sees it may start anew
                    self._busy[job.ip] -= 1
                future.set_result(result)


def _boundary(call: Callable[[], Any], job: Job, clock: Callable[[], float]) -> Any:
    """A node's fault is that node's failure: any exception becomes its result, never ours."""
    job.started = clock()
    try:
        return call()
    except Exception as exc:
        return exc


def failure_text(exc: Exception, step: str) -> str:
    """`step: reason` of a node job that raised: SshError says its own step; anything else is
    named with its type (a bug in a step is still that node's failure, and says so)."""
    if isinstance(exc, SshError):
        return str(exc)
    return f"{step}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
