"""A login node's SSH sessions, counted on real sshd nodes whose users choose what they run and
what it is called; and the count's own command, which must not outlive its limit or its session."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import paramiko
import pytest

from hpodlb.sessions import count_sessions
from hpodlb.sshnode import ParamikoConnector, Session, SshError
from hpodlb.wiring import ssh_settings
from sim.env import SimEnv
from sim.nodes import SIM_USER
from tests.support.lab import canonical, nodes
from tests.support.nodeside import Hang, logged_in, run_as_user, user_processes

pytestmark = pytest.mark.sshd


@pytest.fixture
def env(sim_env: SimEnv) -> SimEnv:
    return sim_env


def converged(env: SimEnv, count: int) -> tuple[list[str], ParamikoConnector, frozenset[str]]:
    """Login nodes with the canonical keys, a connector as the daemon's, and the pin it uses."""
    ips = nodes(env, count)
    assert env.run_pass().converged
    return ips, ParamikoConnector(ssh_settings(env.config)), frozenset(canonical(env))


def test_a_users_process_named_like_hpodlbs_own_shell_hides_no_session(env: SimEnv) -> None:
    """hpodlb leaves its own session out of the count; a user who runs a process named exactly
    as hpodlb's root shell (`sh -s hpodlb`, or `sudo -n sh -s hpodlb`) is still counted: only a
    process root runs can mark a session as hpodlb's."""
    (ip,), connector, pin = converged(env, 1)
    node = env.cluster.nodes[ip]
    mimics = [
        "sleep 60 | sh -s hpodlb",  # the very command hpodlb runs, as the user
        "perl -e '$0 = \"sudo -n sh -s hpodlb\"; sleep 60'",
    ]
    with logged_in(env.cluster, node, "sleep 60", *mimics):
        assert user_processes(node, "sh -s hpodlb")  # the mimics run, as named
        assert count_sessions(connector, ip, pin) == 3


def test_a_process_named_like_an_sshd_session_is_not_one(env: SimEnv) -> None:
    """A user's process left behind after logout (`setsid`), named as sshd names a logged-in
    session's monitor and even given a child named as its user side, is not a session; nor is a
    connection that named a user but has not authenticated. The one real session is counted."""
    (ip,), connector, pin = converged(env, 1)
    node = env.cluster.nodes[ip]
    fake = (  # a parent titled as sshd titles a session's monitor, its child as the user side
        f'setsid perl -e \'if (fork) {{ $0 = "sshd: {SIM_USER} [priv]" }} '
        f'else {{ $0 = "sshd: {SIM_USER}@notty" }} sleep 60\' </dev/null >/dev/null 2>&1 &'
    )
    run_as_user(env.cluster, node, fake)
    sock = socket.create_connection((ip, env.cluster.port))
    unauthenticated = paramiko.Transport(sock)
    try:
        unauthenticated.start_client(timeout=10)
        with pytest.raises(paramiko.BadAuthenticationType):
            unauthenticated.auth_none(SIM_USER)  # sshd now runs `sshd: USER [priv]` for it
        with logged_in(env.cluster, node, "sleep 60"):
            assert user_processes(node, f"sshd: {SIM_USER} [priv]")  # the fake outlived logout
            # The logout just before may still be ending: wait for it, not for a fixed time.
            deadline = time.monotonic() + 15
            while (counted := count_sessions(connector, ip, pin)) != 1:
                assert time.monotonic() < deadline, f"{counted} sessions counted, 1 is real"
    finally:
        unauthenticated.close()
        sock.close()


class Recording:
    """The real connector, keeping each session it opens, so a test can cut one as the head
    node's deadline does (shut its socket down)."""

    def __init__(self, real: ParamikoConnector) -> None:
        self.real = real
        self.sessions: list[Session] = []

    def probe(self, ip: str, key_type: str) -> str | None:
        return self.real.probe(ip, key_type)

    def session(self, ip: str, pin: frozenset[str]) -> AbstractContextManager[Session]:
        @contextmanager
        def opened() -> Iterator[Session]:
            with self.real.session(ip, pin) as session:
                self.sessions.append(session)
                yield session

        return opened()

    def cut(self) -> None:
        (session,) = self.sessions
        transport = session.client.get_transport()  # type: ignore[attr-defined]
        transport.sock.shutdown(socket.SHUT_RDWR)


def gone(hang: Hang, within: float) -> list[int]:
    """The runs of the hanging tool still alive once `within` seconds have passed (or none is)."""
    deadline = time.monotonic() + within
    while hang.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    return hang.alive()


def test_a_count_that_hangs_on_the_node_is_stopped_there_with_what_it_started(
    env: SimEnv, tmp_path: Path
) -> None:
    """`ps` hangs on the node (a process stuck on a dead NFS mount): the count stops itself
    there after its limit, well inside the head node's command deadline, says so, and leaves
    nothing running."""
    (ip,), connector, pin = converged(env, 1)
    hang = Hang(env.cluster.nodes[ip], "ps", tmp_path / "ps-runs")
    try:
        started = time.monotonic()
        with pytest.raises(SshError) as failed:
            count_sessions(connector, ip, pin)
        took = time.monotonic() - started
        assert str(failed.value) == (
            "sessions: stopped after 10s on the node (a command there hangs: a dead NFS mount?)"
        )
        assert took < ssh_settings(env.config).command_deadline
        assert len(hang.started()) == 1
        assert gone(hang, 2) == []
    finally:
        hang.undo()


def test_a_cut_session_takes_its_command_on_the_node_with_it(env: SimEnv, tmp_path: Path) -> None:
    """The head node shuts a count's connection (its deadline, or the daemon killed) while `ps`
    hangs on the node: sshd gives a command without a terminal no signal, so the count's own
    guard ends what it started, within a second or so, instead of one orphan per pass."""
    (ip,), real, pin = converged(env, 1)
    connector = Recording(real)
    hang = Hang(env.cluster.nodes[ip], "ps", tmp_path / "ps-runs")
    result: list[object] = []
    counting = threading.Thread(
        target=lambda: result.append(_count(connector, ip, pin)), daemon=True
    )
    try:
        counting.start()
        deadline = time.monotonic() + 30
        while not hang.started():
            assert time.monotonic() < deadline and counting.is_alive(), result
            time.sleep(0.05)
        connector.cut()
        counting.join(30)
        assert isinstance(result[0], SshError), result
        assert gone(hang, 3) == []
    finally:
        hang.undo()


def _count(connector: Recording, ip: str, pin: frozenset[str]) -> object:
    try:
        return count_sessions(connector, ip, pin)
    except SshError as exc:
        return exc
