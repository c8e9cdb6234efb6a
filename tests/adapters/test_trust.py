"""Host-key trust on real OpenSSH login nodes (issue 12): pinned pushes, nodes offering some key
types, rotation without downtime, re-imaged nodes, crash-safe adoption, sshd reading keys from
elsewhere, and the adoption source. Every key a node presents is checked with `ssh-keyscan`.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from hpodlb.cli import main
from hpodlb.intents import load_intents
from hpodlb.keystore import KeyStore, fingerprint
from hpodlb.logs import setup_logging
from hpodlb.planner import Kind
from sim.env import SimEnv
from sim.nodes import SimNode
from tests.support.lab import TYPES, canonical, nodes, run_pass_later

pytestmark = pytest.mark.sshd


@pytest.fixture
def env(sim_env: SimEnv) -> SimEnv:
    return sim_env


def logins(node: SimNode) -> int:
    """Sessions that logged in to this node's sshd so far (its log, LogLevel VERBOSE)."""
    return (node.dir / "sshd.log").read_text().count("Accepted publickey")


def test_no_private_key_goes_to_an_endpoint_other_than_the_one_probed(env: SimEnv) -> None:
    """A proxy that sends the probe to one host and the push session to another: the session is
    refused before login, nothing reaches either host, and the error names both fingerprints."""
    ips = nodes(env, 2)
    probed = env.cluster.add_node(env.cluster.ip(11), "i-0probed00000011")
    other = env.cluster.add_node(env.cluster.ip(12), "i-0other000000012")
    proxy = env.cluster.ip(5)
    env.cluster.switching_relay(
        proxy, probed.ip, other.ip, after=len(TYPES)
    )  # probes: one per type
    env.cluster.nodes[proxy] = SimNode(env.cluster, proxy, "i-0proxied0000005")
    env.list_nodes([*ips, proxy])
    before = {n.ip: n.private_key("ed25519") for n in (probed, other)}
    outcome = env.run_pass()
    assert env.registered() == set(ips)
    assert logins(probed) == 0 and logins(other) == 0
    assert {n.ip: n.private_key("ed25519") for n in (probed, other)} == before
    assert not list(probed.etc_ssh.glob("*.hpodlb-*")) and not list(
        other.etc_ssh.glob("*.hpodlb-*")
    )
    (error,) = [e for e in outcome.errors if e.startswith(proxy)]
    assert "host-key: presents SHA256:" in error and "nothing sent" in error
    shown = {fingerprint(k) for k in other.keyscan()}
    expected = {fingerprint(k) for k in probed.keyscan()}
    assert any(f in error for f in shown) and any(f in error for f in expected)


def test_a_node_offering_only_ed25519_stays_in_service(env: SimEnv) -> None:
    """A registered node whose sshd offers only ed25519, canonical, is in sync and stays in."""
    ips = nodes(env, 2)
    assert env.run_pass().converged
    node = env.cluster.nodes[ips[1]]
    node.write_sshd_config("HostKeyAlgorithms ssh-ed25519\n")
    node.reload()
    assert len(node.keyscan()) == 1
    for _ in range(3):
        outcome = env.run_pass()
        assert outcome.converged, (outcome.errors, outcome.plan)
        assert outcome.applied == []
    assert env.registered() == set(ips)


def test_rotation_updates_every_node_in_place_and_retires_the_old_set(
    env: SimEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    """`keys rotate`: no node leaves rotation, every node presents the new set after one pass,
    users get both sets of lines meanwhile, and the previous set is retired at the end."""
    ips = nodes(env, 3)
    assert env.run_pass().converged
    old = canonical(env)
    cfg = ["--config", str(env.config_path)]
    capsys.readouterr()
    assert main(["keys", "rotate", *cfg]) == 0
    assert "Rotation started" in capsys.readouterr().out
    new = canonical(env)
    assert new.isdisjoint(old)
    assert main(["keys", "known-hosts", "--host", "login.example", *cfg]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert {" ".join(x.split()[1:]) for x in lines if not x.startswith("#")} == old | new
    assert main(["keys", "rotate", *cfg]) == 1  # one rotation at a time
    assert "rotation is still in progress" in capsys.readouterr().err
    log = io.StringIO()
    setup_logging(stream=log)
    outcome = env.run_pass()
    assert outcome.converged, (outcome.errors, outcome.plan)
    assert [a.kind for a in outcome.applied if a.kind is Kind.DEREGISTER] == []
    assert env.registered() == set(ips)
    for ip in ips:
        assert env.cluster.nodes[ip].keyscan() == new
    assert not KeyStore(env.store, TYPES).is_rotating()
    assert '"event": "host_keys_rotation_done"' in log.getvalue()


def test_a_reimaged_node_is_held_without_retries_until_an_admin_trusts_it(
    env: SimEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    """Same instance, new keys: out of rotation, no login attempted pass after pass, status says
    what to run; `hpodlb keys trust IP` lets the next pass repair it."""
    ips = nodes(env, 3)
    assert env.run_pass().converged
    node = env.cluster.nodes[ips[2]]
    node.new_host_keys()
    node.reload()
    before = logins(node)
    held = env.run_pass()
    assert not held.converged
    assert ips[2] not in env.registered()
    for seconds in (700, 1400):
        run_pass_later(env, seconds)
    assert logins(node) == before
    record = env.state().nodes[ips[2]]
    assert record.key_state == "unknown-keys" and record.failures == 0
    status = subprocess.run(
        [sys.executable, "-m", "hpodlb", "status", "--config", str(env.config_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"run `hpodlb keys trust {ips[2]}`" in status
    capsys.readouterr()
    assert main(["keys", "trust", ips[2], "--config", str(env.config_path)]) == 0
    assert ips[2] in capsys.readouterr().out
    repaired = env.run_pass()
    assert repaired.converged, repaired.errors
    assert node.keyscan() == canonical(env)
    assert env.registered() == set(ips)
    assert load_intents(env.state_dir).trust == {}


def test_keys_trust_refuses_an_ip_that_is_not_a_login_node(
    env: SimEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    """`keys trust` works only for login nodes of the resource config."""
    nodes(env, 1)
    assert main(["keys", "trust", "10.9.9.9", "--config", str(env.config_path)]) == 1
    assert "10.9.9.9 is not a login node in " in capsys.readouterr().err


def test_adoption_killed_at_any_moment_never_leaves_a_partial_store(env: SimEnv) -> None:
    """SIGKILL during the first pass's adoption: the store is empty or whole, never partial, and
    the next pass converges."""
    nodes(env, 2)
    rng = random.Random(3)
    proc_env = {**os.environ, "HPODLB_CONFIG": str(env.config_path)}
    for _ in range(8):
        shutil.rmtree(env.store, ignore_errors=True)
        proc = subprocess.Popen(
            [sys.executable, "-m", "hpodlb", "once"],
            env=proc_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.3, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        store = KeyStore(env.store, TYPES)
        if not store.is_empty():
            assert set(store.load()) == set(TYPES)  # whole, never part of a set
    assert env.run_pass().converged


def test_an_incomplete_legacy_store_is_reported_with_its_repair(env: SimEnv) -> None:
    """A store holding only some key files (a cut-off adoption of an older version) registers
    nothing and names the exact repair."""
    ips = nodes(env, 1)
    env.store.mkdir(mode=0o700)
    rsa = env.cluster.nodes[ips[0]].etc_ssh / "ssh_host_rsa_key"
    shutil.copy(rsa, env.store / "ssh_host_rsa_key")
    os.chmod(env.store / "ssh_host_rsa_key", 0o600)
    outcome = env.run_pass()
    assert env.registered() == set()
    detail = env.state().nodes[ips[0]].key_detail
    assert "incomplete key set (has rsa, lacks ecdsa, ed25519)" in detail
    assert "`hpodlb keys adopt --from IP --force`" in detail
    assert not outcome.converged
    assert (
        main(["keys", "adopt", "--from", ips[0], "--force", "--config", str(env.config_path)]) == 0
    )
    assert env.run_pass().converged


def test_sshd_reading_keys_from_elsewhere_is_refused_up_front(env: SimEnv) -> None:
    """sshd_config pointing HostKey elsewhere: nothing is written, the node's keys are intact, and
    the message names the path and what to change."""
    ips = nodes(env, 1)
    node = env.cluster.add_node(env.cluster.ip(9), "i-0altkeys0000009", start=False)
    alt = node.etc_ssh / "alt"
    alt.mkdir()
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(alt / "ssh_host_ed25519_key")],
        check=True,
    )
    config = (
        (node.etc_ssh / "sshd_config")
        .read_text()
        .replace(
            "HostKey /etc/ssh/ssh_host_ed25519_key", "HostKey /etc/ssh/alt/ssh_host_ed25519_key"
        )
    )
    (node.etc_ssh / "sshd_config").write_text(config)
    node.start()
    files = {p.name: p.read_bytes() for p in node.etc_ssh.iterdir() if p.is_file()}
    env.list_nodes([*ips, node.ip])
    env.run_pass()
    assert env.registered() == set(ips)
    error = env.state().nodes[node.ip].last_error
    assert error == (
        "sshd-config: sshd reads its ed25519 host key from /etc/ssh/alt/ssh_host_ed25519_key, not "
        "from /etc/ssh/ssh_host_ed25519_key where hpodlb writes it: change HostKey in sshd_config "
        "or set host_keys.remote_dir"
    ), error
    after = {
        p.name: p.read_bytes()
        for p in node.etc_ssh.iterdir()
        if p.is_file() and p.name != "sshd.pid"
    }
    assert after == {k: v for k, v in files.items() if k != "sshd.pid"}


def test_a_push_that_does_not_verify_is_rolled_back_and_the_originals_survive_retries(
    env: SimEnv,
) -> None:
    """A node that still presents its own keys after the reload (something on it puts them back):
    the pushed files are rolled back, and however often it is retried, `.hpodlb-original` still
    holds the node's own keys."""
    ips = nodes(env, 1)
    node = env.cluster.add_node(env.cluster.ip(9), "i-0stubborn000009")
    (node.etc_ssh / "revert-on-reload").touch()
    own = node.private_key("ed25519")
    env.list_nodes([*ips, node.ip])
    for seconds in (0, 700, 1400):
        run_pass_later(env, seconds)
        error = env.state().nodes[node.ip].last_error
        assert error == (
            "verify: still presents other rsa, ecdsa, ed25519 key(s) after the reload; previous keys "
            "restored"
        ), error
        assert node.private_key("ed25519") == own
        assert (node.etc_ssh / "ssh_host_ed25519_key.hpodlb-original").read_bytes() == own
    assert node.ip not in env.registered()


def test_the_first_node_of_the_resource_config_gives_its_keys(env: SimEnv) -> None:
    """Adoption takes the first login node as listed, not the lowest IP, and `plan` says so first."""
    low = env.cluster.add_node(env.cluster.ip(2), "i-0low00000000002")
    first = env.cluster.add_node(env.cluster.ip(8), "i-0first000000008")
    env.list_nodes([first.ip, low.ip])
    plan = subprocess.run(
        [sys.executable, "-m", "hpodlb", "plan", "--json", "--config", str(env.config_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    doc = json.loads(plan.stdout)
    assert doc["actions"][0]["kind"] == "adopt-keys" and doc["actions"][0]["ip"] == first.ip
    first_keys = first.keyscan()
    assert env.run_pass().converged
    assert canonical(env) == first_keys
    assert low.keyscan() == first_keys
