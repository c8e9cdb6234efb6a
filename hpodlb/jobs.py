"""The node-job runner: probes, pushes, adoptions and session counts on a pool of threads.

A node's job runs with the deadline its step gives (`HostKeys.probe_seconds`, ..., counted from
when a worker takes it, not from when it was queued) behind an exception boundary: whatever it
raises, or a hang past its deadline, is that node's result, never the pass's. The runner starts
jobs and hands their results back; it never acts on them (the sequencer in `reconcile` does), so
it reads an `Action` only to name the job, and knows nothing of state or AWS. While the pass waits on jobs it beats every BEAT_SECONDS:
it is alive, and every job it waits on is bounded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from hpodlb.planner import Action
from hpodlb.sshnode import SshError

WORKERS = 8  # node jobs at a time: 8 SSH handshakes keep 2 cores busy
GATHER_SECONDS = 0.05  # results that come in this close together make one re-plan, not several
BEAT_SECONDS = 0.25  # a pass waiting on node jobs wakes this often, to say it is alive
PROBE = "probe"
SESSIONS = "sessions"  # counting a drained node's SSH connections


@dataclass
class Job:
    what: str  # PROBE, SESSIONS, or the Kind of the action
    ip: str
    budget: float  # seconds from the job's start: past them, the node's job counts as failed
    action: Action | None = None
    started: float | None = None  # monotonic; set by the worker that runs it

    @property
    def deadline(self) -> float:
        """Counted from when a worker took the job, not from when it was queued: nodes queued
        behind slow ones (an AZ down) must not time out before they were even tried."""
        return math.inf if self.started is None else self.started + self.budget


class NodeJobs:
    """The jobs of one pass, `workers` at a time."""

    def __init__(self, workers: int, clock: Callable[[], float], beat: Callable[[], None]) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hpodlb-node")
        self._running: dict[Future[Any], Job] = {}
        self._clock = clock
        self._beat = beat

    def __len__(self) -> int:
        return len(self._running)

    def submit(self, job: Job, call: Callable[[], Any]) -> None:
        self._running[self._pool.submit(_boundary, call, job, self._clock)] = job

    def only(self, what: str) -> bool:
        """Every job still running is a `what` (true when none runs)."""
        return all(job.what == what for job in self._running.values())

    def collect(self, wake_by: float | None = None) -> list[tuple[Job, Any]]:
        """Wait for at least one job (or its deadline, or `wake_by`), then hand back every job
        that is done, with its result: what it returned, or the exception that ended it."""
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
        """Jobs not started are dropped; running ones are not waited for (each is bounded)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


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
