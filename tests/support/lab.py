"""Passes against the simulated login nodes: nodes listed in the resource config, passes run as
if time had gone by, the canonical set as the store holds it."""

from __future__ import annotations

import time

from hpodlb.keystore import KeyStore
from hpodlb.outcome import PassOutcome
from hpodlb.state import load_state, save_state
from hpodlb.wiring import build_reconciler
from sim.env import SimEnv

TYPES = ("rsa", "ecdsa", "ed25519")


def nodes(env: SimEnv, count: int, *, sudo_nopasswd: bool = True) -> list[str]:
    ips = [env.cluster.ip(i) for i in range(2, 2 + count)]
    for ip in ips:
        env.cluster.add_node(ip, f"i-{ip.split('.')[-1]:0>17}", sudo_nopasswd=sudo_nopasswd)
    env.list_nodes(ips)
    return ips


def run_pass_later(env: SimEnv, seconds: float) -> PassOutcome:
    """A pass as if `seconds` had gone by (past every backoff), without sleeping; negative: as if
    it ran that much earlier."""
    state, _ = load_state(env.state_dir)
    rec = build_reconciler(env.config)
    rec.clock = lambda: time.monotonic() + seconds
    outcome = rec.run_pass(state, apply=True)
    save_state(env.state_dir, state)
    return outcome


def canonical(env: SimEnv) -> set[str]:
    return {k.public for k in KeyStore(env.store, TYPES).load().values()}
