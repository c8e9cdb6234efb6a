"""Maintenance work (counting a drained node's SSH sessions) never delays a push or a
registration: a drained node that is wedged (`ps` hangs on it, as on a dead NFS mount) or silent
(accepts TCP, never speaks) costs its own count, which backs off, and nothing else. On real sshd
login nodes, moto over HTTP, and `hpodlb run` as a process."""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from hpodlb.intentmodel import DrainRequest, Intents
from hpodlb.intents import update_intents
from hpodlb.logs import setup_logging
from sim.env import SimEnv
from tests.support.daemon import Daemon, spawn_daemon, stop_daemons
from tests.support.data import FIGURES
from tests.support.lab import nodes
from tests.support.nodeside import Hang

pytestmark = [pytest.mark.reliability, pytest.mark.sshd]


@pytest.fixture
def env(sim_env: SimEnv) -> SimEnv:
    return sim_env


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    stop_daemons(started)


def drain(env: SimEnv, *ips: str) -> None:
    """Drained as `hpodlb drain --force` records it (its `wall` is not what these tests are about)."""

    def add(intents: Intents) -> None:
        for ip in ips:
            intents.drain[ip] = DrainRequest(reason="maintenance", force=True)

    update_intents(env.state_dir, add)


def when(event: dict[str, Any]) -> float:
    """An event's own timestamp (the daemon's wall clock), in seconds."""
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def first(daemon: Daemon, name: str, timeout: float = 60, **fields: Any) -> dict[str, Any]:
    """The daemon's first `name` event with these fields."""
    deadline = time.monotonic() + timeout
    while True:
        found = [
            e for e in daemon.events_named(name) if all(e.get(k) == v for k, v in fields.items())
        ]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no {name} {fields}: {daemon.log.read_text()[-3000:]}"
        assert daemon.proc.poll() is None, daemon.log.read_text()[-3000:]
        time.sleep(0.1)


def test_a_wedged_drained_node_delays_no_new_node_and_its_count_backs_off(
    env: SimEnv, tmp_path: Path, daemons: list[Daemon]
) -> None:
    """`ps` hangs on a drained node: while its count hangs, a login node added to the resource
    config is registered as soon as it verifies (the issue saw 25 s); the count stops on the node
    with all it started, and the next count waits out the node's backoff, not the next pass."""
    a, b = nodes(env, 2)
    assert env.run_pass().converged
    drain(env, b)
    hang = Hang(env.cluster.nodes[b], "ps", tmp_path / "ps-runs")
    try:
        env.write_config(reconcile={"interval_seconds": 2})
        daemon = spawn_daemon(tmp_path, daemons, env.config_path, dict(os.environ))
        deadline = time.monotonic() + 60
        while not hang.started():  # the drained node's count now hangs on it
            assert time.monotonic() < deadline and daemon.proc.poll() is None
            time.sleep(0.05)
        c = env.cluster.ip(4)
        env.cluster.add_node(c, "i-0new000000000004")
        listed_at = time.time()
        env.list_nodes([a, b, c])
        took = when(first(daemon, "registered", ip=c)) - listed_at
        FIGURES["new node registered while a drained node's count hangs (daemon, interval 2 s)"] = (
            f"{took:.1f} s"
        )
        assert took < 10, took  # the count's limit is 10 s, the command deadline 30 s

        failed = first(daemon, "node_failed", ip=b, step="sessions")
        assert failed["error"].startswith("sessions: stopped after 10s on the node"), failed
        assert (failed["failures"], failed["retry_in_seconds"]) == (1, 10.0), failed
        deadline = time.monotonic() + 5
        while hang.alive():  # stopped on the node, with what it started
            assert time.monotonic() < deadline, hang.alive()
            time.sleep(0.1)
        deadline = time.monotonic() + 60
        while len(hang.started()) < 2:
            assert time.monotonic() < deadline and daemon.proc.poll() is None
            time.sleep(0.1)
        (_, run1), (_, run2) = hang.started()[:2]
        assert run2 - when(failed) >= 9.5, (run1, when(failed), run2)  # backed off, not next pass
        passes = [e for e in daemon.events_named("pass_finished") if when(e) < run2]
        assert len(passes) >= 4, len(passes)  # passes went on meanwhile, without counting again
    finally:
        stop_daemons(daemons)
        hang.undo()


def test_drained_silent_nodes_do_not_queue_ahead_of_a_new_nodes_push(env: SimEnv) -> None:
    """Two drained nodes that accept TCP and never speak: their session counts wait for a login
    that cannot come, but never in the workers a new node's push needs; the new node joins before
    the silent nodes' own probes have even timed out (the issue saw 6.2 s against 2.5 s)."""
    (a,) = nodes(env, 1)
    assert env.run_pass().converged
    env.write_config(ssh={"connect_timeout_seconds": 8})  # margin for a loaded machine
    silent = [env.cluster.ip(20), env.cluster.ip(21)]
    for ip in silent:
        env.cluster.silent_listener(ip, f"i-0silent{ip.split('.')[-1]:0>8}")
    drain(env, *silent)
    c = env.cluster.ip(5)
    env.cluster.add_node(c, "i-0new000000000005")
    env.list_nodes([a, *silent, c])
    log = io.StringIO()
    setup_logging(stream=log)
    began = time.time()
    env.run_pass()
    seen = [json.loads(x) for x in log.getvalue().splitlines() if x.startswith("{")]
    (joined,) = [e for e in seen if e["event"] == "registered" and e["ip"] == c]
    failed = [e for e in seen if e["event"] == "node_failed" and e["ip"] in silent]
    FIGURES["new node registered beside 2 drained silent nodes (one pass, timeout 8 s)"] = (
        f"{when(joined) - began:.1f} s"
    )
    assert when(joined) < min(when(e) for e in failed if e["step"] == "handshake"), failed
    assert c in env.registered()
    # Each silent node's count failed as a login does, and backs off as any node step.
    counts = [e for e in failed if e["step"] == "sessions"]
    assert sorted(e["ip"] for e in counts) == sorted(silent), failed
    assert all(e["retry_in_seconds"] == 10.0 for e in counts), counts
