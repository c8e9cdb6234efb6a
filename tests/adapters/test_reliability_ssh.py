"""SSH faults beyond the host-key suite's: a full disk on the node, and a node that dies between
the push and the verification. Each leaves the node with working keys and out of rotation until
it verifies. And a node flooding stderr, which the output cap bounds as it does stdout."""

from __future__ import annotations

import subprocess
import time

import pytest

from hpodlb.keystore import KeyStore
from sim.env import SimEnv
from tests.support.data import FIGURES
from tests.support.lab import run_pass_later

pytestmark = [pytest.mark.reliability, pytest.mark.sshd]
TYPES = ("rsa", "ecdsa", "ed25519")
SURVIVED: list[str] = []


@pytest.fixture
def env(sim_env: SimEnv) -> SimEnv:
    return sim_env


def _survived(fault: str) -> None:
    SURVIVED.append(fault)
    FIGURES[
        "SSH faults survived here (test_hostkeys.py covers refused, silent, auth, sudo, "
        "sshd -t, reload, corrupt key)"
    ] = ", ".join(SURVIVED)


def _canonical(env: SimEnv) -> set[str]:
    return {k.public for k in KeyStore(env.store, TYPES).load().values()}


def test_disk_full_on_the_node_rolls_back(env: SimEnv) -> None:
    """/etc/ssh on a tiny full tmpfs: the write fails, old keys stay, the node stays out; later it joins."""
    env.cluster.add_node(env.cluster.ip(2), "i-0disk00000000002")
    node = env.cluster.add_node(env.cluster.ip(3), "i-0disk00000000003", start=False)
    saved = {p.name: p.read_bytes() for p in node.etc_ssh.iterdir()}
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(node.etc_ssh)],
        check=True,
    )
    try:
        for name, data in saved.items():
            (node.etc_ssh / name).write_bytes(data)
            (node.etc_ssh / name).chmod(
                0o600 if not name.endswith(".pub") and name != "sshd_config" else 0o644
            )
        node.start()  # before the disk fills up: sshd writes its pid file there
        filler = node.etc_ssh / "filler"
        try:
            with filler.open("wb") as f:
                while True:
                    f.write(b"\0" * 1024)
                    f.flush()
        except OSError:
            pass  # full: exactly what this test wants
        env.list_nodes([env.cluster.ip(2), env.cluster.ip(3)])
        before = node.private_key("ed25519")
        outcome = env.run_pass()
        assert env.registered() == {env.cluster.ip(2)}
        error = env.state().nodes[env.cluster.ip(3)].last_error
        assert error.startswith(("write: cannot write", "backup: cannot back up")), error
        assert node.private_key("ed25519") == before
        assert node.keyscan() and node.keyscan() != _canonical(env)
        assert not list(node.etc_ssh.glob(".hpodlb-new.*"))
        assert not outcome.converged
        filler.unlink()
        later = run_pass_later(env, 700)
        assert later.converged, later.errors
        assert node.keyscan() == _canonical(env)
        _survived("disk full")
    finally:
        node.stop()
        subprocess.run(["umount", str(node.etc_ssh)], check=False)


def test_node_dying_between_push_and_verify_stays_out_then_joins(env: SimEnv) -> None:
    """sshd dies on reload: verification fails, the node stays out; restarted, it verifies and joins."""
    env.cluster.add_node(env.cluster.ip(2), "i-0die000000000002")
    node = env.cluster.add_node(env.cluster.ip(3), "i-0die000000000003")
    (node.etc_ssh / "die-on-reload").touch()
    env.list_nodes([env.cluster.ip(2), env.cluster.ip(3)])
    outcome = env.run_pass()
    assert env.registered() == {env.cluster.ip(2)}
    assert any(
        e.startswith(f"{env.cluster.ip(3)} (i-0die000000000003): verify: ") for e in outcome.errors
    ), outcome.errors
    (node.etc_ssh / "die-on-reload").unlink()
    node.start()  # the node comes back; its keys on disk are the canonical ones now
    later = run_pass_later(env, 700)
    assert later.converged, later.errors
    assert node.keyscan() == _canonical(env)
    assert env.registered() == {env.cluster.ip(2), env.cluster.ip(3)}
    _survived("dies between push and verify")


def test_slow_nodes_join_within_timeouts_and_too_slow_ones_stay_out(env: SimEnv) -> None:
    """A node behind a slow path (0.1 s per packet) still verifies and joins; one slower than the
    SSH timeout (6 s per packet, timeout 4 s) is bounded, stays out, and the others go in. (4 s,
    not the lab's 2 s: the slow path's handshake must fit with room on a machine running 4 tests
    on 2 cores; what the test shows is the ratio, a per-packet delay past the timeout.)"""
    env.write_config(ssh={"connect_timeout_seconds": 4})
    env.cluster.add_node(env.cluster.ip(2), "i-0slow00000000002")
    env.cluster.add_node(env.cluster.ip(12), "i-0slow00000000012")  # reached through .3
    env.cluster.add_node(env.cluster.ip(14), "i-0slow00000000014")  # reached through .4
    env.cluster.slow_relay(env.cluster.ip(3), env.cluster.ip(12), 0.1)
    env.cluster.slow_relay(env.cluster.ip(4), env.cluster.ip(14), 6.0)
    env.cluster.nodes[env.cluster.ip(3)] = env.cluster.nodes[env.cluster.ip(12)]
    env.cluster.nodes[env.cluster.ip(4)] = env.cluster.nodes[env.cluster.ip(14)]
    env.list_nodes([env.cluster.ip(2), env.cluster.ip(3), env.cluster.ip(4)])
    outcome = env.run_pass()
    assert env.registered() == {env.cluster.ip(2), env.cluster.ip(3)}
    assert env.cluster.nodes[env.cluster.ip(12)].keyscan() == _canonical(env)
    record = env.state().nodes[env.cluster.ip(4)]
    assert record.last_error.startswith("handshake: "), record.last_error
    assert outcome.duration_seconds < 30
    _survived(f"slow path (joined), too slow (bounded, pass {outcome.duration_seconds:.0f} s)")


def test_a_node_flooding_stderr_is_cut_off_at_the_output_cap(env: SimEnv) -> None:
    """A remote command that floods stderr (not stdout) fails at the output cap as quickly as a
    stdout flood does: stderr counts toward the 256 KiB, or such a node is read until its command
    deadline (an earlier build read 4.5 GiB in 3 s)."""
    from hpodlb.sshnode import ParamikoConnector, SshError
    from hpodlb.wiring import ssh_settings
    from tests.support.lab import canonical, nodes

    (ip,) = nodes(env, 1)
    assert env.run_pass().converged
    settings = ssh_settings(env.config)
    started = time.monotonic()
    with (
        ParamikoConnector(settings).session(ip, frozenset(canonical(env))) as session,
        pytest.raises(SshError) as failed,
    ):
        session.run_root(b"exec yes hpodlb-floods-stderr >&2\n")
    took = time.monotonic() - started
    assert str(failed.value) == "command: output exceeded 256 KiB; stopped reading"
    assert took < settings.command_deadline / 3, took
    _survived(f"stderr flood (cut at the cap in {took:.1f} s)")
