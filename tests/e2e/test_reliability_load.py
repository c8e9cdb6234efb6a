"""Load: 200 login nodes (real sshd each) behind 3 target groups, and memory over 1,000 passes.

The figures at scale (idle passes, RSS at 200 nodes) are `./dev bench`'s: `idle200`, `memory`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from hpodlb.keystore import KeyStore
from hpodlb.planner import Kind
from hpodlb.state import State
from hpodlb.wiring import build_reconciler
from sim.env import SimEnv
from sim.nodes import SimCluster
from tests.support.data import FIGURES

pytestmark = [pytest.mark.reliability, pytest.mark.sshd, pytest.mark.slow]
NODES = 200
TYPES = ("rsa", "ecdsa", "ed25519")


@pytest.fixture
def env(sim_env: SimEnv) -> SimEnv:
    return sim_env


def _count_writes(reconciler: Any) -> list[str]:
    writes: list[str] = []
    clients = {id(g.client): g.client for g in reconciler.groups}  # groups share a region's client
    for client in clients.values():
        client.meta.events.register(
            "before-call.elastic-load-balancing-v2.*",
            lambda model, **_: writes.append(model.name) if "Describe" not in model.name else None,
        )
    return writes


def test_200_nodes_3_target_groups(env: SimEnv) -> None:
    """One pass converges 200 nodes into 3 groups (199 key pushes); an idle pass writes nothing."""
    cluster: SimCluster = env.cluster
    ips = [cluster.ip(n) for n in range(1, NODES + 1)]
    first = cluster.add_node(ips[0], "i-0load0000000001")
    shared = first.dir.parent / "shared-keys"
    shared.mkdir()
    cluster.add_node(ips[1], "i-0load0000000002", start=False)
    for t in TYPES:  # every other node starts with one other key set (not the canonical one)
        for suffix in ("", ".pub"):
            shutil.copy2(cluster.nodes[ips[1]].etc_ssh / f"ssh_host_{t}_key{suffix}", shared)
    cluster.nodes[ips[1]].start()
    for n, ip in enumerate(ips[2:], start=3):
        cluster.add_node(ip, f"i-0load{n:010d}", keys_from=shared)
    env.arns += [env.aws.create_login_nlb(name=f"t{uuid.uuid4().hex[:12]}") for _ in range(2)]
    # The default connect timeout: at 200 nodes on 2 cores a handshake queues behind others.
    env.write_config(reconcile={"interval_seconds": 30}, ssh={"connect_timeout_seconds": 10})
    env.list_nodes(ips)

    rec = build_reconciler(env.config)
    writes = _count_writes(rec)
    state = State()
    outcome = rec.run_pass(state, apply=True)
    assert outcome.converged, outcome.errors[:5]
    pushed = sum(1 for a in outcome.applied if a.kind is Kind.PUSH_KEYS)
    assert pushed == NODES - 1
    for arn in env.arns:
        assert {ip for ip, _ in env.aws.targets(arn)} == set(ips)
    # Nodes join as they verify, those ready within LINGER_SECONDS of each other in one call: how
    # many calls depends on how long the pass takes; a call per node (600) would mean no batching.
    calls = writes.count("RegisterTargets")
    FIGURES["200 nodes: RegisterTargets calls in the first pass (3 groups)"] = str(calls)
    assert calls <= 3 * NODES // 2, calls
    canonical = {k.public for k in KeyStore(env.store, TYPES).load().values()}
    for ip in ips[:: NODES // 10]:
        assert cluster.nodes[ip].keyscan() == canonical
    first_pass = outcome.duration_seconds

    writes.clear()
    idle = rec.run_pass(state, apply=True)
    assert idle.converged and idle.applied == []
    assert writes == []
    FIGURES["load"] = (
        f"{NODES} sshd nodes x 3 target groups: first pass {first_pass:.1f} s ({pushed} key pushes, "
        f"{calls} RegisterTargets calls); an idle pass probing all (600 handshakes) "
        f"{idle.duration_seconds:.1f} s, 0 write calls"
    )


MEMORY_NODES = 50


def test_daemon_memory_stays_flat_over_1000_passes(env: SimEnv) -> None:
    """The daemon's RSS grows by less than 5 MB from pass 100 to pass 1000 at 50 nodes (host keys
    on, the default probe interval): what a pass keeps, it keeps per node, not per pass. At 200
    nodes and 3 groups the same figure is `./dev bench memory`'s."""
    cluster: SimCluster = env.cluster
    ips = [cluster.ip(n) for n in range(1, MEMORY_NODES + 1)]
    cluster.add_node(ips[0], "i-0mem00000000001")
    shared = cluster.add_node(ips[1], "i-0mem00000000002").etc_ssh
    for n, ip in enumerate(
        ips[2:], start=3
    ):  # one other key set: every node but the first is pushed to
        cluster.add_node(ip, f"i-0mem{n:011d}", keys_from=shared)
    env.list_nodes(ips)
    env.write_config(
        host_keys={"probe_interval_seconds": 240}, reconcile={"interval_seconds": 0.02}
    )
    log = env.workdir / "daemon.log"
    with log.open("w") as out:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "hpodlb", "run", "--config", str(env.config_path)],
            stdout=out,
            stderr=out,
        )
    try:
        rss: dict[int, int] = {}
        for mark in (100, 1000):
            deadline = time.monotonic() + 600
            while log.read_text().count('"pass_finished"') < mark:
                assert daemon.poll() is None and time.monotonic() < deadline, log.read_text()[
                    -2000:
                ]
                time.sleep(0.2)
            rss[mark] = _rss_kb(daemon.pid)
    finally:
        daemon.terminate()
        daemon.wait(20)
    assert env.registered() == set(ips)
    FIGURES["memory"] = (
        f"daemon RSS, {MEMORY_NODES} nodes, host keys on: {rss[100] / 1024:.0f} MB "
        f"at pass 100, {rss[1000] / 1024:.0f} MB at pass 1000"
    )
    assert rss[1000] - rss[100] < 5 * 1024


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")
