"""The host-key gate against real OpenSSH login nodes (sshd in mount namespaces) and moto.

Every assertion about what a node presents is checked with OpenSSH's own `ssh-keyscan` or `ssh`
client, not only with paramiko.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hpodlb.cli import main
from hpodlb.hostkeys import push_script
from hpodlb.keystore import HostKey, KeyStore, KeyStoreError, file_names
from hpodlb.logs import setup_logging
from hpodlb.outcome import PassOutcome
from hpodlb.planner import Kind
from hpodlb.sshnode import ParamikoConnector, SshError
from hpodlb.wiring import ssh_settings
from sim.aws import FakeAws
from sim.env import SimEnv
from sim.nodes import SIM_USER, SimCluster, sim_cluster
from tests.support.lab import TYPES, canonical, nodes, run_pass_later

pytestmark = pytest.mark.sshd


@pytest.fixture
def cluster() -> Iterator[SimCluster]:
    # Not under pytest's tmp dir: that is 0700 root, and the login user must reach its home.
    with sim_cluster(Path(tempfile.mkdtemp(prefix="hpodlb-sim-"))) as c:
        yield c


@pytest.fixture
def env(
    aws: FakeAws,
    cluster: SimCluster,
    tmp_path: Path,
    fresh_env: None,
    monkeypatch: pytest.MonkeyPatch,
) -> SimEnv:
    for key, value in aws.env().items():
        monkeypatch.setenv(key, value)
    return SimEnv(aws, cluster, tmp_path)


def test_adopt_then_push_gives_every_node_one_identity(env: SimEnv) -> None:
    """The first node's keys are adopted; 3 others get them; ssh-keyscan sees one identity."""
    ips = nodes(env, 4)
    first_keys = env.cluster.nodes[ips[0]].keyscan()
    assert all(env.cluster.nodes[ip].keyscan() != first_keys for ip in ips[1:])
    outcome = env.run_pass()
    assert outcome.converged, outcome.errors
    assert canonical(env) == first_keys
    for ip in ips:
        assert env.cluster.nodes[ip].keyscan() == first_keys
    assert env.registered() == set(ips)
    pushed = sorted(a.ip for a in outcome.applied if a.kind is Kind.PUSH_KEYS)
    assert pushed == ips[1:]
    again = env.run_pass()
    assert again.converged
    assert again.applied == []
    state = env.state()
    assert {state.nodes[ip].key_state for ip in ips} == {"in-sync"}
    known_hosts = (env.state_dir / "known_hosts").read_text().splitlines()
    assert len(known_hosts) == 4 * 3
    for ip in ips:
        mode = os.stat(env.cluster.nodes[ip].etc_ssh / "ssh_host_ed25519_key").st_mode & 0o777
        assert mode == 0o600


def test_openssh_client_with_known_hosts_output_logs_in_everywhere(
    env: SimEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    """`keys known-hosts` is all a strict OpenSSH client needs to log in to every node."""
    ips = nodes(env, 3)
    assert env.run_pass().converged
    capsys.readouterr()
    assert (
        main(
            [
                "keys",
                "known-hosts",
                "--host",
                "login.cluster.internal",
                "--config",
                str(env.config_path),
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out
    known = env.workdir / "users_known_hosts"
    known.write_text(lines)
    assert all(line.startswith("login.cluster.internal ") for line in lines.splitlines())
    for ip in ips:
        done = subprocess.run(
            [
                "ssh",
                "-i",
                str(env.cluster.client_key),
                "-p",
                str(env.cluster.port),
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                f"UserKnownHostsFile={known}",
                "-o",
                "GlobalKnownHostsFile=/dev/null",
                "-o",
                "HostKeyAlias=login.cluster.internal",
                "-o",
                "BatchMode=yes",
                f"{SIM_USER}@{ip}",
                "echo logged-in",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.stdout.strip() == "logged-in", done.stderr


def test_known_hosts_lines_use_bracket_form_off_port_22(
    env: SimEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    """Users reaching the NLB on another port get `[NAME]:PORT` lines."""
    assert main(["keys", "generate", "--config", str(env.config_path)]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "keys",
                "known-hosts",
                "--host",
                "nlb.example",
                "--port",
                "2022",
                "--config",
                str(env.config_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in out] == [
        ["[nlb.example]:2022", "ssh-rsa"],
        ["[nlb.example]:2022", "ecdsa-sha2-nistp256"],
        ["[nlb.example]:2022", "ssh-ed25519"],
    ]


def test_replaced_node_leaves_rotation_is_repaired_and_returns(env: SimEnv) -> None:
    """Same IP, new instance, new keys: deregistered first, keys pushed, registered again."""
    ips = nodes(env, 3)
    assert env.run_pass().converged
    victim = env.cluster.nodes[ips[2]]
    victim.replace("i-0replacement00001")
    env.list_nodes(ips)
    assert victim.keyscan() != canonical(env)
    outcome = env.run_pass()
    assert outcome.converged, outcome.errors
    steps = [a.kind for a in outcome.applied if a.ip == victim.ip]
    assert steps == [Kind.DEREGISTER, Kind.PUSH_KEYS, Kind.REGISTER]
    assert victim.keyscan() == canonical(env)
    assert env.registered() == set(ips)
    assert env.state().nodes[victim.ip].verified_instance_id == "i-0replacement00001"


def _faulty_pass(
    env: SimEnv, fault: Callable[[SimCluster, str], None], sudo: bool = True
) -> tuple[str, PassOutcome, bytes]:
    """Two healthy nodes and a third with a fault; returns the third's IP, the pass, its old key."""
    ips = nodes(env, 2)
    bad = env.cluster.ip(9)
    env.cluster.add_node(bad, "i-0faulty000000009", sudo_nopasswd=sudo)
    fault(env.cluster, bad)
    env.list_nodes([*ips, bad])
    old = env.cluster.nodes[bad].private_key("ed25519")
    return bad, env.run_pass(), old


def _deny_login(cluster: SimCluster, ip: str) -> None:
    cluster.nodes[ip].write_sshd_config(f"DenyUsers {SIM_USER}\n")
    cluster.nodes[ip].reload()


FAULTS: dict[str, tuple[Callable[[SimCluster, str], None], str, bool]] = {
    "auth refused": (_deny_login, "auth: login as hpodlbsim refused", True),
    "sudo refused": (
        lambda c, ip: None,
        "sudo: a password is required (ssh.user hpodlbsim needs passwordless sudo)",
        False,
    ),
    "sshd config broken": (
        lambda c, ip: c.nodes[ip].write_sshd_config("BogusOption yes\n"),
        "sshd-config: sshd -T failed: /etc/ssh/sshd_config: line",
        True,
    ),
    "reload fails": (
        lambda c, ip: (c.nodes[ip].etc_ssh / "fail-reload").touch(),
        "reload: reload command failed; previous keys restored",
        True,
    ),
}


@pytest.mark.parametrize("name", list(FAULTS))
def test_a_failing_node_keeps_its_keys_stays_out_and_recovers(env: SimEnv, name: str) -> None:
    """A node that cannot take the keys keeps its working ones, stays out, others go in; later it recovers."""
    fault, message, sudo = FAULTS[name]
    bad, outcome, old_key = _faulty_pass(env, fault, sudo)
    node = env.cluster.nodes[bad]
    assert not outcome.converged
    assert env.registered() == {env.cluster.ip(2), env.cluster.ip(3)}
    assert any(e.startswith(f"{bad} (i-0faulty000000009): {message}") for e in outcome.errors), (
        outcome.errors
    )
    assert node.private_key("ed25519") == old_key
    assert node.keyscan() and node.keyscan() != canonical(env)
    assert not list(node.etc_ssh.glob(".hpodlb-new.*"))
    record = env.state().nodes[bad]
    assert record.last_error.startswith(message)
    assert record.retry_at and record.last_error_at and record.retry_at - record.last_error_at >= 5
    # Inside the backoff nothing is retried (a pass 5 s before it ends, however slow this machine
    # was to get here); once the fault is gone and the backoff over, it joins.
    assert record.retry_mono is not None
    assert run_pass_later(env, record.retry_mono - 5 - time.monotonic()).applied == []
    node.write_sshd_config()
    (node.etc_ssh / "fail-reload").unlink(missing_ok=True)
    (node.dir / "sudoers").write_text(f"root ALL=(ALL) ALL\n{SIM_USER} ALL=(ALL) NOPASSWD: ALL\n")
    node.reload()
    later = run_pass_later(env, 700)
    assert later.converged, later.errors
    assert node.keyscan() == canonical(env)
    assert env.registered() == {env.cluster.ip(2), env.cluster.ip(3), bad}


def test_unreachable_and_silent_nodes_are_bounded_and_skipped(env: SimEnv) -> None:
    """A stopped node and one that accepts TCP but never speaks cost a timeout, not the pass."""
    ips = nodes(env, 2)
    env.cluster.add_node(env.cluster.ip(8), "i-0stopped00000008", start=False)
    env.cluster.silent_listener(env.cluster.ip(9), "i-0silent000000009")
    env.list_nodes([*ips, env.cluster.ip(8), env.cluster.ip(9)])
    started = time.monotonic()
    outcome = env.run_pass()
    assert time.monotonic() - started < 15
    assert env.registered() == set(ips)
    assert {w.node.ip for w in outcome.plan.waiting} == {env.cluster.ip(8), env.cluster.ip(9)}  # type: ignore[union-attr]
    state = env.state()
    assert state.nodes[env.cluster.ip(8)].last_error.startswith("connect: ")
    assert state.nodes[env.cluster.ip(9)].last_error.startswith("handshake: ")
    assert state.nodes[env.cluster.ip(9)].key_state == "unreachable"


def test_rollback_when_sshd_rejects_a_key_with_exit_status_0(env: SimEnv) -> None:
    """Real `sshd -t` exits 0 on an unloadable host key; its stderr alone triggers the rollback."""
    ips = nodes(env, 1)
    node = env.cluster.nodes[ips[0]]
    before = node.keyscan()
    good = {t: HostKey(t, node.private_key(t), node.public_key(t)) for t in TYPES}
    broken = dict(
        good,
        ed25519=HostKey(
            "ed25519",
            b"-----BEGIN OPENSSH PRIVATE KEY-----\ngarbage\n-----END OPENSSH PRIVATE KEY-----\n",
            good["ed25519"].public,
        ),
    )
    connector = ParamikoConnector(ssh_settings(env.config))
    with connector.session(node.ip, frozenset(before)) as session:
        rc, out, _ = session.run_root(
            push_script(broken, "/etc/ssh", "kill -HUP $(cat /etc/ssh/sshd.pid)")
        )
    assert rc == 1
    assert out.startswith("hpodlb-failed sshd-t: ")
    assert "Unable to load host key" in out
    assert node.private_key("ed25519") == good["ed25519"].private
    assert node.keyscan() == before


def test_sudo_that_refuses_before_reading_the_script_is_named_as_sudo(env: SimEnv) -> None:
    """`sudo -n` that wants a password exits before it reads the script; a script bigger than the
    channel's window keeps hpodlb sending while the node has already closed the channel (the race
    a busy head node loses at any size). The error is sudo's, not "Socket is closed"."""
    ips = nodes(env, 1, sudo_nopasswd=False)
    node = env.cluster.nodes[ips[0]]
    connector = ParamikoConnector(ssh_settings(env.config))
    script = b"true\n" + b"#" * (8 << 20) + b"\n"  # 8 MiB: past paramiko's 2 MiB window
    with (
        connector.session(node.ip, frozenset(node.keyscan())) as session,
        pytest.raises(SshError) as err,
    ):
        session.run_root(script)
    assert err.value.step == "sudo", str(err.value)
    assert "password" in str(err.value)


def test_no_key_material_in_logs_command_lines_status_or_tmp(
    env: SimEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    """Private key bytes appear in no log line, process command line, status output or /tmp file."""
    ips = nodes(env, 3)
    log = io.StringIO()
    setup_logging(stream=log)
    seen_cmdlines: set[str] = set()
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    with contextlib.suppress(OSError):
                        seen_cmdlines.add(
                            Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                        )

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.time()
    try:
        assert env.run_pass().converged
    finally:
        stop.set()
        sampler.join()
    main(["status", "--json", "--config", str(env.config_path)])
    main(["keys", "show", "--config", str(env.config_path)])
    out = capsys.readouterr().out
    secrets = _secret_fragments(KeyStore(env.store, TYPES).load())
    assert any(
        "sudo -n sh -s hpodlb" in c for c in seen_cmdlines
    )  # the sampler did see the remote shell
    for text in (log.getvalue(), out, *seen_cmdlines):
        assert not any(s in text for s in secrets)
    for path in _files_changed_since(Path("/tmp"), started, skip=(env.cluster.base, env.workdir)):
        data = path.read_bytes()
        assert not any(s.encode() in data for s in secrets), path
    for ip in ips:
        assert not list(env.cluster.nodes[ip].etc_ssh.glob(".hpodlb-new.*"))


def _secret_fragments(keys: dict[str, HostKey]) -> list[str]:
    """Lines of each private key's PEM body and of its base64 form (how it travels in the script)."""
    out = []
    for key in keys.values():
        body = [ln for ln in key.private.decode().splitlines() if ln and not ln.startswith("-----")]
        out += [ln for ln in body if len(ln) >= 40][1:3]
        b64 = base64.b64encode(key.private).decode()
        out.append(b64[100:160])
    return out


def _files_changed_since(root: Path, since: float, skip: tuple[Path, ...]) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [
            d for d in dirnames if not any(Path(dirpath, d).resolve() == s.resolve() for s in skip)
        ]
        for name in filenames:
            path = Path(dirpath, name)
            try:
                if path.is_file() and path.stat().st_mtime >= since:
                    yield path
            except OSError:
                continue


def test_key_store_modes_and_refusals(env: SimEnv, capsys: pytest.CaptureFixture[str]) -> None:
    """Generated keys: dirs 0700, private 0600, .pub 0644; a store in use is not overwritten; a
    widened key is refused, never fixed, and a pass with it registers nothing and says why."""
    assert main(["keys", "generate", "--config", str(env.config_path)]) == 0
    current = KeyStore(env.store, TYPES).set_dir()
    assert current is not None
    for d in (env.store, env.store / "sets", current):
        assert os.stat(d).st_mode & 0o777 == 0o700
    for t in TYPES:
        priv, pub = file_names(t)
        assert os.stat(current / priv).st_mode & 0o777 == 0o600
        assert os.stat(current / pub).st_mode & 0o777 == 0o644
    capsys.readouterr()
    assert main(["keys", "show", "--config", str(env.config_path)]) == 0
    shown = capsys.readouterr().out.splitlines()
    for t in TYPES:
        real = subprocess.run(
            ["ssh-keygen", "-lf", str(current / file_names(t)[1])],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()[1]
        assert f"{t:8} {real}  {current / file_names(t)[0]}" in shown
    before = (current / "ssh_host_rsa_key").read_bytes()
    for force in ([], ["--force"]):
        assert main(["keys", "generate", *force, "--config", str(env.config_path)]) == 1
        assert "run `hpodlb keys rotate`" in capsys.readouterr().err
        assert (current / "ssh_host_rsa_key").read_bytes() == before
    os.chmod(current / "ssh_host_ed25519_key", 0o644)
    with pytest.raises(KeyStoreError, match=re.escape("mode 0644 is wider than 0600; refusing")):
        KeyStore(env.store, TYPES).load()
    assert os.stat(current / "ssh_host_ed25519_key").st_mode & 0o777 == 0o644
    # A pass with an unusable store registers nothing and says why, for every node.
    ips = nodes(env, 1)
    outcome = env.run_pass()
    assert env.registered() == set()
    record = env.state().nodes[ips[0]]
    assert record.key_state == "no-canonical-keys"
    assert record.key_detail.startswith("key store refused: ") and "refusing" in record.key_detail
    assert not outcome.converged


def test_adopt_command_copies_a_nodes_keys(env: SimEnv, capsys: pytest.CaptureFixture[str]) -> None:
    """`keys adopt --from IP` stores exactly the keys that node presents."""
    ips = nodes(env, 2)
    assert main(["keys", "adopt", "--from", ips[1], "--config", str(env.config_path)]) == 0
    assert canonical(env) == env.cluster.nodes[ips[1]].keyscan()
    assert env.run_pass().converged
    assert env.cluster.nodes[ips[0]].keyscan() == env.cluster.nodes[ips[1]].keyscan()


def _connections(env: SimEnv) -> int:
    """TCP connections every sim node's sshd has accepted so far (its log, LogLevel VERBOSE)."""
    return sum(
        (n.dir / "sshd.log").read_text().count("Connection from ")
        for n in env.cluster.nodes.values()
    )


def test_probe_interval_skips_verified_nodes_but_never_new_or_replaced_ones(env: SimEnv) -> None:
    """With probe_interval_seconds, a verified node is not probed again until the interval ends;
    a replaced node is probed (and repaired) at once; a key changed by hand shows after it."""
    ips = nodes(env, 3)
    env.write_config(host_keys={"probe_interval_seconds": 600})
    assert env.run_pass().converged
    before = _connections(env)
    idle = env.run_pass()
    assert idle.converged and idle.applied == []
    assert _connections(env) == before  # not one handshake
    # A replaced node (new instance id) is probed and repaired at once, interval or not.
    env.cluster.nodes[ips[1]].replace("i-0probeint0000001")
    env.list_nodes(ips)
    repaired = env.run_pass()
    assert [a.kind for a in repaired.applied if a.ip == ips[1]] == [
        Kind.DEREGISTER,
        Kind.PUSH_KEYS,
        Kind.REGISTER,
    ]
    # Keys changed by hand on a live node (same instance): seen once the interval has passed; it
    # leaves rotation and, being a verified node with an unexpected key, is reported, not trusted.
    node = env.cluster.nodes[ips[2]]
    node.new_host_keys()
    node.reload()
    assert env.run_pass().applied == []
    later = run_pass_later(env, 700)
    assert [a.kind for a in later.applied if a.ip == ips[2]] == [Kind.DEREGISTER]
    record = env.state().nodes[ips[2]]
    assert record.key_state == "unknown-keys"
    assert f"run `hpodlb keys trust {ips[2]}`" in record.key_detail
    assert ips[2] not in env.registered()
