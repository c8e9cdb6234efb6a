"""Crash anywhere: `hpodlb once` SIGKILLed at random points, then one clean pass converges.

The world keeps changing between kills (nodes re-imaged with new keys, a node joining and leaving),
so the kills land while reading, probing, pushing keys, registering and writing state.
"""

from __future__ import annotations

import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from hpodlb.keystore import KeyStore, KeyStoreError
from hpodlb.planner import Guard
from hpodlb.sshnode import ParamikoConnector
from hpodlb.state import load_state, save_state
from hpodlb.wiring import ssh_settings
from sim.env import SimEnv
from sim.nodes import SimCluster
from tests.support.data import FIGURES
from tests.support.lab import run_pass_later

pytestmark = [pytest.mark.reliability, pytest.mark.sshd]

KILLS = 50
TYPES = ("rsa", "ecdsa", "ed25519")


@pytest.fixture
def env(sim_env: SimEnv) -> SimEnv:
    sim_env.write_config(
        reconcile={"absent_passes_before_deregister": 1, "max_deregister_fraction": 1.0}
    )
    return sim_env


TRIGGERS = ("deregistered", "ssh_trust_on_first_use", "host_keys_pushed", "registered")


def _kill_when(proc: subprocess.Popen[str], event: str | None, delay: float) -> str:
    """SIGKILL `proc` after `delay` seconds, or as soon as it logs `event`; return what it logged."""
    assert proc.stderr is not None
    deadline = time.monotonic() + (delay if event is None else 15)
    lines: list[str] = []
    while time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([proc.stderr], [], [], 0.02)
        if ready:
            line = proc.stderr.readline()
            lines.append(line)
            if event and f'"event": "{event}"' in line:
                break
    proc.send_signal(signal.SIGKILL)
    rest, _ = proc.communicate()[1], None
    return "".join(lines) + (rest or "") if proc.returncode != -signal.SIGKILL else "".join(lines)


# The last event a killed pass logged, and the stage it was in at that moment.
STAGES = {
    "": "reading, probing",
    "state_rebuilt": "reading",
    "host_keys_adopted": "adopting",
    "deregistered": "taking wrong identities out",
    "ssh_trust_on_first_use": "pushing keys",
    "node_failed": "pushing keys",
    "host_keys_pushed": "registering",
    "registered": "registering",
    "held_back": "remembering",
    "host_keys_verified": "writing state",
    "pass_finished": "writing state",
}


def _stage(stderr: str) -> str:
    last = ""
    for line in stderr.splitlines():
        if '"event": "' in line:
            last = line.split('"event": "')[1].split('"')[0]
    return STAGES.get(last, f"after {last}")


@pytest.mark.slow
def test_sigkill_anywhere_then_one_clean_pass_converges(env: SimEnv) -> None:
    """50 SIGKILLs spread over a pass's stages, then one clean pass: groups = nodes, one identity."""
    cluster: SimCluster = env.cluster
    for n in range(2, 7):
        cluster.add_node(env.cluster.ip(n), f"i-0crash{n:012d}")
    core = [env.cluster.ip(n) for n in range(2, 6)]
    env.list_nodes([*core, env.cluster.ip(6)])
    rng = random.Random(42)
    stages: Counter[str] = Counter()
    proc_env = {**os.environ, "HPODLB_CONFIG": str(env.config_path)}
    kill = 0
    while (
        sum(v for k, v in stages.items() if k != "finished before the kill") < KILLS
        and kill < 2 * KILLS
    ):
        kill += 1
        # Change the world a little, so there is always something to do.
        victim = cluster.nodes[rng.choice(core[1:])]
        if rng.random() < 0.5:
            victim.replace(f"i-0crash{kill:04d}{rng.randrange(10**8):08d}")
        listed = [*core, env.cluster.ip(6)] if rng.random() < 0.5 else core
        env.list_nodes(listed)
        if kill % 10 == 3:
            shutil.rmtree(env.state_dir, ignore_errors=True)  # the state dir vanishes
        if kill % 10 == 7 and (env.state_dir / "state.json").exists():
            (env.state_dir / "state.json").write_text('{"nodes": {env.cluster.ip(2): ')  # truncated
        proc = subprocess.Popen(
            [sys.executable, "-m", "hpodlb", "once"],
            env=proc_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Every other kill is at a random time; the rest right after a chosen event, so that the
        # short stages (registering, writing state) are hit too.
        after_event = None if kill % 2 == 0 else TRIGGERS[(kill // 2) % len(TRIGGERS)]
        seen = _kill_when(proc, after_event, rng.uniform(0.1, 1.3))
        stages[
            _stage(seen) if proc.returncode == -signal.SIGKILL else "finished before the kill"
        ] += 1

    # One clean pass (as if the backoff of any node that failed meanwhile had run out).
    final_list = [*core, env.cluster.ip(6)]
    env.list_nodes(final_list)
    outcome = run_pass_later(env, 3600)
    canonical = {k.public for k in KeyStore(env.store, TYPES).load().values()}
    killed = sum(v for k, v in stages.items() if k != "finished before the kill")
    FIGURES["SIGKILLs survived"] = f"{killed} ({dict(stages)})"
    assert outcome.converged, (outcome.errors, outcome.plan)
    assert env.registered() == set(final_list)
    for ip in final_list:
        node = cluster.nodes[ip]
        assert node.keyscan() == canonical, ip
        with ParamikoConnector(ssh_settings(env.config)).session(
            ip, frozenset(canonical)
        ) as session:  # nobody is locked out
            assert session.run_root(b"echo alive\n")[1] == "alive\n"
    state, warning = load_state(env.state_dir)
    assert warning is None
    save_state(env.state_dir, state)
    assert killed >= KILLS
    assert {
        "reading, probing",
        "taking wrong identities out",
        "pushing keys",
        "registering",
    } <= set(stages), stages


def test_key_store_with_wrong_permissions_is_refused_not_fixed(env: SimEnv) -> None:
    """A key store dir opened to group/world stops every push and registration; modes stay as found."""
    env.cluster.add_node(env.cluster.ip(2), "i-0store000000002")
    env.list_nodes([env.cluster.ip(2)])
    assert env.run_pass().converged
    env.store.chmod(0o755)
    env.cluster.nodes[env.cluster.ip(2)].replace("i-0store000000003")
    env.list_nodes([env.cluster.ip(2)])
    outcome = env.run_pass()
    assert not outcome.converged
    # The replaced node is known to be unverified: it would leave, but it is the last one.
    assert outcome.plan is not None
    assert [(a.kind.value, a.held_by) for a in outcome.plan.actions] == [
        ("deregister", Guard.MIN_IN_SERVICE)
    ]
    record = env.state().nodes[env.cluster.ip(2)]
    assert "mode 0755 is wider than 0700; refusing" in record.key_detail
    assert env.store.stat().st_mode & 0o777 == 0o755
    with pytest.raises(KeyStoreError):
        KeyStore(env.store, TYPES).load()
