"""One node's fault costs that node only (issue 11), on real sshd login nodes and a moto server.

Each fault is real: sshd refusing channels (`MaxSessions 0`), a remote command that trickles or
floods (`ForceCommand`), a peer that never speaks, a node that is down for a while. The healthy
nodes around it must be registered, the faulty one must fail with a message naming the step, and
the outcome must say the truth about it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paramiko
import pytest

from hpodlb.logs import setup_logging
from hpodlb.sshnode import ParamikoConnector, SshError
from hpodlb.state import load_state, save_state
from hpodlb.wiring import build_reconciler, ssh_settings
from sim.env import SimEnv
from tests.support.lab import canonical, nodes

pytestmark = pytest.mark.sshd


@pytest.fixture
def env(sim_env: SimEnv) -> SimEnv:
    return sim_env


def events(log: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.getvalue().splitlines() if line.startswith("{")]


def faulty(env: SimEnv, sshd_extra: str, n: int = 9) -> str:
    """A login node (listed last, so never the adoption source) whose sshd has `sshd_extra`."""
    ip = env.cluster.ip(n)
    node = env.cluster.add_node(ip, f"i-0faulty{n:09d}", start=False)
    node.write_sshd_config(sshd_extra)
    node.start()
    return ip


def test_a_node_refusing_channels_fails_alone_and_the_pass_is_recorded(env: SimEnv) -> None:
    """sshd with MaxSessions 0 makes paramiko raise ChannelException: that node fails with a
    backoff, the others join, and the pass (and its state) is saved as not converged."""
    ips = nodes(env, 2)
    bad = faulty(env, "MaxSessions 0\n")
    env.list_nodes([*ips, bad])
    outcome = env.run_pass()
    assert env.registered() == set(ips)
    assert not outcome.converged
    record = env.state().nodes[bad]
    assert record.last_error.startswith("command: "), record.last_error
    assert record.retry_at and record.retry_at > time.time()
    state = env.state()
    assert state.last_pass is not None and not state.last_pass.ok
    assert any(
        e.startswith(f"{bad} (i-0faulty000000009): command: ") for e in state.last_pass.errors
    )


def test_a_flooding_node_is_cut_off_at_the_output_cap(env: SimEnv) -> None:
    """A node whose remote command floods output fails at the cap; memory does not follow it."""
    ips = nodes(env, 2)
    bad = faulty(env, f"Match User {env.config.ssh.user}\n  ForceCommand yes\n")
    env.list_nodes([*ips, bad])
    outcome = env.run_pass()
    assert env.registered() == set(ips)
    error = env.state().nodes[bad].last_error
    assert error == "command: output exceeded 256 KiB; stopped reading", error
    assert not outcome.converged


@pytest.mark.slow
def test_a_trickling_node_is_bounded_by_its_deadline(env: SimEnv) -> None:
    """A remote command that writes a byte every 3 s (never a per-read timeout) ends at the total
    deadline; the healthy nodes were registered long before."""
    ips = nodes(env, 2)
    bad = faulty(
        env,
        f"Match User {env.config.ssh.user}\n  ForceCommand while :; do printf x; sleep 3; done\n",
    )
    env.list_nodes([*ips, bad])
    started = time.monotonic()
    outcome = env.run_pass()
    took = time.monotonic() - started
    assert env.registered() == set(ips)
    error = env.state().nodes[bad].last_error
    assert error == "command: no exit status within 30s (node too slow)", error
    assert took < 60  # one deadline (30 s), not one per byte
    assert not outcome.converged


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


@pytest.mark.slow
def test_a_node_that_freezes_mid_command_is_bounded_by_the_command_deadline(
    env: SimEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node that freezes once its channel is open (its sshd processes SIGSTOPped, as a frozen VM
    is): paramiko waits for exec_command's answer with no timeout; the command must fail at its
    deadline and free the thread. The freeze is real; only its moment is chosen, by wrapping
    paramiko's own exec_command, as no outside timing could hit the gap between two packets."""
    (ip,) = nodes(env, 1)
    node = env.cluster.nodes[ip]
    assert node.proc is not None
    listener, frozen = node.proc.pid, []
    real_exec = paramiko.Channel.exec_command

    def freeze_then_exec(channel: paramiko.Channel, command: str) -> None:
        frozen.extend(_descendants(listener))
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        real_exec(channel, command)

    settings = ssh_settings(env.config)
    outcome: list[BaseException | tuple[int, str, str]] = []

    def run() -> None:
        with ParamikoConnector(settings).session(ip, frozenset(node.keyscan())) as session:
            monkeypatch.setattr(paramiko.Channel, "exec_command", freeze_then_exec)
            try:
                outcome.append(session.run_root(b"echo never\n"))
            except BaseException as exc:
                outcome.append(exc)

    hard = settings.command_deadline + 5
    worker = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    worker.start()
    try:
        worker.join(hard + 15)
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    took = time.monotonic() - started
    assert frozen, "no sshd process served the session"
    assert not worker.is_alive(), f"run_root still waiting after {took:.0f}s"
    (failed,) = outcome
    assert isinstance(failed, SshError), failed
    assert str(failed) == f"command: timed out after {hard:.0f}s in total", failed


def test_nodes_queued_behind_silent_ones_get_their_whole_deadline(env: SimEnv) -> None:
    """More silent nodes than workers (an AZ whose nodes hang): a healthy node queued behind them
    is still probed and joins; its deadline starts when a worker takes it, not when it queued."""
    ips = nodes(env, 2)
    env.write_config(ssh={"connect_timeout_seconds": 1})
    env.list_nodes(ips[:1])
    assert env.run_pass().converged
    silent = [env.cluster.ip(n) for n in range(20, 36)]
    for ip in silent:
        env.cluster.silent_listener(ip, f"i-0silent{ip.split('.')[-1]:0>8}")
    env.list_nodes([ips[0], *silent, ips[1]])
    rec = build_reconciler(env.config)
    rec.workers = 1  # 16 silent probes of >= 1 s each ahead of it: past its 11 s probe budget
    state, _ = load_state(env.state_dir)
    outcome = rec.run_pass(state, apply=True)
    save_state(env.state_dir, state)
    assert env.registered() == set(ips), outcome.errors
    assert all(state.nodes[ip].last_error.startswith("handshake: ") for ip in silent)


def test_a_silent_node_delays_no_other_node(env: SimEnv) -> None:
    """Healthy nodes are registered before a silent node's probe has even timed out (10 s: on a
    loaded machine the other three's adoption, pushes and registrations took 2 s of a 4 s one)."""
    ips = nodes(env, 3)
    env.write_config(ssh={"connect_timeout_seconds": 10})
    silent = env.cluster.ip(9)
    env.cluster.silent_listener(silent, "i-0silent000000009")
    env.list_nodes([*ips, silent])
    log = io.StringIO()
    setup_logging(stream=log)
    outcome = env.run_pass()
    seen = events(log)
    registered_at = [e["timestamp"] for e in seen if e["event"] == "registered"]
    (failed,) = [e for e in seen if e["event"] == "node_failed" and e["ip"] == silent]
    assert len(registered_at) == 3
    assert max(registered_at) < failed["timestamp"]  # ISO timestamps sort as times
    assert failed["step"] == "handshake"
    assert env.registered() == set(ips)
    assert not outcome.converged


def test_a_node_that_answers_again_is_noticed_at_once(env: SimEnv) -> None:
    """A node down for several passes (booting after a replacement) is probed every pass, and
    joins on the first pass after it answers: being unreachable never backs its probes off."""
    ips = nodes(env, 2)
    late = env.cluster.add_node(env.cluster.ip(7), "i-0late0000000007", start=False)
    env.list_nodes([*ips, late.ip])
    for _ in range(4):
        outcome = env.run_pass()
        assert late.ip not in env.registered()
        assert env.state().nodes[late.ip].last_error.startswith("connect: ")
    late.start()
    outcome = env.run_pass()
    assert env.registered() == {*ips, late.ip}
    assert late.keyscan() == canonical(env)
    assert outcome.converged, outcome.errors


def test_a_registered_node_that_cannot_be_reached_is_not_converged(env: SimEnv) -> None:
    """A registered node the head node cannot reach keeps its target (the NLB's health check covers
    it) but the pass is not converged, and status says why."""
    ips = nodes(env, 2)
    assert env.run_pass().converged
    env.cluster.nodes[ips[1]].stop()
    outcome = env.run_pass()
    assert env.registered() == set(ips)
    assert not outcome.converged
    assert outcome.plan is not None
    (waiting,) = outcome.plan.waiting
    assert waiting.reason.startswith("registered, but its host keys cannot be verified: connect: ")
    status = subprocess.run(
        [sys.executable, "-m", "hpodlb", "status", "--config", str(env.config_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"waiting: {ips[1]} (" in status
    assert "NOT converged" in status


def test_a_known_hosts_file_that_cannot_be_written_fails_the_pass_not_the_daemon(
    env: SimEnv,
) -> None:
    """The head node's known_hosts cannot be written: the pass still plans and registers, and
    says it is not converged (it used to crash before planning, every pass)."""
    ips = nodes(env, 2)
    env.state_dir.mkdir(parents=True, exist_ok=True)
    (env.state_dir / "known_hosts").mkdir()  # renaming a file onto a dir fails like a full disk
    outcome = env.run_pass()
    assert env.registered() == set(ips)
    assert not outcome.converged
    assert any("known_hosts: cannot write" in e for e in outcome.errors), outcome.errors


def test_an_unreachable_node_is_one_log_event_not_a_traceback(env: SimEnv) -> None:
    """A node that refuses connections gives one error event with step and reason per pass, and no
    library traceback lines."""
    ips = nodes(env, 1)
    down = env.cluster.add_node(env.cluster.ip(8), "i-0down00000000008", start=False)
    silent = env.cluster.ip(9)
    env.cluster.silent_listener(silent, "i-0silent000000009")
    env.list_nodes([*ips, down.ip, silent])
    log = io.StringIO()
    setup_logging(stream=log)
    env.run_pass()
    lines = log.getvalue().splitlines()
    assert all(line.startswith("{") for line in lines), [x for x in lines if not x.startswith("{")][
        :5
    ]
    errors = [e for e in events(log) if e["level"] in ("error", "critical")]
    assert sorted((e["event"], e.get("ip"), e.get("step")) for e in errors) == [
        ("node_failed", down.ip, "connect"),
        ("node_failed", silent, "handshake"),
    ]


def test_plan_names_the_true_cause_when_keys_cannot_be_checked(env: SimEnv) -> None:
    """`plan` with an empty store says it would adopt from the first node; with a refused store it
    says the store is refused, not that nodes are unreachable."""
    ips = nodes(env, 2)
    cmd = [sys.executable, "-m", "hpodlb", "plan", "--config", str(env.config_path)]
    empty = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert empty.returncode == 1, empty.stderr
    (adopt,) = [line for line in empty.stdout.splitlines() if line.startswith("adopt-keys")]
    assert ips[0] in adopt and "the first login node in the resource config" in adopt
    assert "unreachable" not in empty.stdout
    assert env.run_pass().converged
    os.chmod(env.store, 0o755)
    refused = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert refused.returncode == 1
    waiting = [line for line in refused.stdout.splitlines() if line.startswith("waiting")]
    assert len(waiting) == 2
    assert all("key store refused: " in line and "0755" in line for line in waiting)
    assert os.stat(env.store).st_mode & 0o777 == 0o755  # refused, never fixed


def test_a_state_dir_that_cannot_be_written_makes_once_exit_1(env: SimEnv) -> None:
    """`hpodlb once` whose state cannot be saved says so and exits 1 (it acted; it is not converged)."""
    ips = nodes(env, 1)
    env.state_dir.mkdir(parents=True, exist_ok=True)
    (env.state_dir / "state.json").mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "hpodlb", "once", "--config", str(env.config_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert f"cannot save the state in {env.state_dir}" in done.stderr
    assert env.registered() == set(ips)
