"""A login node's SSH sessions, counted on real sshd nodes whose users choose what they run and
what it is called."""

from __future__ import annotations

import socket
import time

import paramiko
import pytest

from hpodlb.sessions import count_sessions
from hpodlb.sshnode import ParamikoConnector
from hpodlb.wiring import ssh_settings
from sim.env import SimEnv
from sim.nodes import SIM_USER
from tests.support.lab import canonical, nodes
from tests.support.nodeside import logged_in, run_as_user, user_processes

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
