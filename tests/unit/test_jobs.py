"""The node-job runner: which waiting job a free worker takes, deadlines, and its boundary."""

from __future__ import annotations

import threading
import time
from functools import partial

from hpodlb.jobs import PROBE, SESSIONS, Job, NodeJobs, default_workers
from hpodlb.sshnode import SshError


def test_a_push_goes_before_the_probes_still_waiting() -> None:
    """One worker busy, three probes waiting, then a push: the push runs next, the probes after
    it in the order they came."""
    jobs = NodeJobs(1, time.monotonic, lambda: None)
    release, order = threading.Event(), list[str]()
    try:
        jobs.submit(Job(PROBE, "10.0.0.1", 30), lambda: release.wait(10))
        for n in (2, 3, 4):
            jobs.submit(Job(PROBE, f"10.0.0.{n}", 30), partial(order.append, f"probe {n}"))
        jobs.submit(Job("push-keys", "10.0.0.5", 30), partial(order.append, "push 5"), urgent=True)
        release.set()
        done: list[str] = []
        while len(done) < 5:
            done += [job.ip for job, _ in jobs.collect()]
    finally:
        jobs.close()
    assert order == ["push 5", "probe 2", "probe 3", "probe 4"]


def test_a_job_is_its_nodes_failure_whatever_it_raises_or_however_long_it_hangs() -> None:
    """An exception is the job's result; a job past its deadline (counted from when a worker
    took it) is handed back as that node's SshError while the others go on."""
    jobs = NodeJobs(2, time.monotonic, lambda: None)
    stuck = threading.Event()
    try:
        jobs.submit(Job(PROBE, "10.0.0.1", 0.2), lambda: stuck.wait(10))
        jobs.submit(Job(PROBE, "10.0.0.2", 30), lambda: 1 / 0)
        results: dict[str, object] = {}
        while len(results) < 2:
            results.update((job.ip, result) for job, result in jobs.collect())
    finally:
        stuck.set()
        jobs.close()
    assert isinstance(results["10.0.0.2"], ZeroDivisionError)
    assert isinstance(results["10.0.0.1"], SshError)
    assert str(results["10.0.0.1"]) == "probe: did not finish within its deadline"


def test_the_worker_count_follows_the_cores_within_bounds() -> None:
    """4 a core (2 cores: the 8 that keep them busy), never fewer than 4 nor more than 32."""
    assert [default_workers(n) for n in (1, 2, 4, 64)] == [4, 8, 16, 32]


def test_a_node_stays_busy_until_its_job_returns_even_past_its_deadline() -> None:
    """The maintenance lane starts no second count of a node whose first still hangs: the job
    is handed back as failed at its deadline, but the node is busy until its call returns."""
    jobs = NodeJobs(2, time.monotonic, lambda: None)
    stuck = threading.Event()
    try:
        jobs.submit(Job(SESSIONS, "10.0.0.1", 0.1), lambda: stuck.wait(10))
        assert jobs.busy("10.0.0.1") and not jobs.busy("10.0.0.2")
        ((_, result),) = jobs.collect()
        assert str(result) == "sessions: did not finish within its deadline"
        assert jobs.busy("10.0.0.1") and not jobs
    finally:
        stuck.set()
        jobs.close()
    deadline = time.monotonic() + 5
    while jobs.busy("10.0.0.1"):
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_poll_hands_back_what_is_done_without_waiting_and_idle_workers_end() -> None:
    """A lane kept from pass to pass: each pass takes what is done and never waits for the
    rest; once nothing waits, no worker thread is left (a process that ends is not held)."""
    jobs = NodeJobs(2, time.monotonic, lambda: None, name="hpodlb-test-lane")
    release = threading.Event()
    try:
        jobs.submit(Job(SESSIONS, "10.0.0.1", 30), lambda: release.wait(10) and 3)
        jobs.submit(Job(SESSIONS, "10.0.0.2", 30), lambda: 0)
        deadline = time.monotonic() + 5
        while jobs.busy("10.0.0.2"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        started = time.monotonic()
        assert [(job.ip, result) for job, result in jobs.poll()] == [("10.0.0.2", 0)]
        assert time.monotonic() - started < 0.05 and len(jobs) == 1
        release.set()
        assert [(job.ip, result) for job, result in jobs.collect()] == [("10.0.0.1", 3)]
    finally:
        release.set()
        jobs.close()
    deadline = time.monotonic() + 5
    while any(t.name.startswith("hpodlb-test-lane") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "a worker outlived the work"
        time.sleep(0.01)
