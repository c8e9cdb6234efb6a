"""The trust rules, fast: the real executor, planner, key store and moto, with a fake connector.

Beside, never instead of, the real-sshd tests in `test_trust.py`: these pin what hpodlb decides
to do with a node (open a session or not, pinned to what, send anything or not) across many
situations in seconds, with a connector that enforces pins as the real one does.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from hpodlb.config import Config, load_config
from hpodlb.hostkeys import HostKeys
from hpodlb.intentmodel import TrustRequest
from hpodlb.intents import load_intents, update_intents
from hpodlb.keystore import KeyStore
from hpodlb.outcome import PassOutcome
from hpodlb.planner import Kind
from hpodlb.reconcile import Reconciler
from hpodlb.record import backoff_seconds
from hpodlb.sshnode import SshError
from hpodlb.state import State
from hpodlb.targets import TargetGroup, boto_config
from hpodlb.wiring import key_side
from tests.support.aws import Clock, make_group
from tests.support.fakenodes import TYPES, FakeConnector, FakeNode, KeySets

IPS = ("10.1.71.12", "10.1.72.45", "10.1.70.201")  # the fixture's login nodes, in file order


class World:
    """Moto, three fake login nodes, a key store, and passes run by the real reconciler."""

    def __init__(self, config: Config, elb: Any, arn: str) -> None:
        self.config, self.elb, self.arn = config, elb, arn
        self.keysets = KeySets()
        self.nodes = {ip: FakeNode.fresh(self.keysets) for ip in IPS}
        self.connector = FakeConnector(self.nodes)
        self.clock = Clock()
        self.state = State()
        self.writes: list[str] = []
        elb.meta.events.register(
            "before-call.elastic-load-balancing-v2.*",
            lambda model, **_: (
                self.writes.append(model.name) if "Describe" not in model.name else None
            ),
        )

    def run_pass(self) -> PassOutcome:
        nodes = HostKeys(self.connector, TYPES, "/etc/ssh", "true", settle_seconds=0)
        rec = Reconciler(
            self.config,
            [TargetGroup(self.elb, self.arn, 22)],
            key_side(self.config, nodes),
            clock=self.clock,
            boot_id="b1",
        )
        outcome = rec.run_pass(self.state, apply=True)
        self.clock.advance(30)
        return outcome

    def registered(self) -> set[str]:
        reply = self.elb.describe_target_health(TargetGroupArn=self.arn)
        return {d["Target"]["Id"] for d in reply["TargetHealthDescriptions"]}

    def canonical(self) -> set[str]:
        return {k.public for k in self.store().load().values()}

    def store(self) -> KeyStore:
        return KeyStore(self.config.host_keys.store, TYPES)


@pytest.fixture
def world(
    fresh_env: None,
    monkeypatch: pytest.MonkeyPatch,
    write_config: Callable[..., Path],
    tmp_path: Path,
) -> Iterator[World]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        elb = boto3.client("elbv2", region_name="us-west-2", config=boto_config())
        arn = make_group(elb)
        path = write_config(
            [{"arn": arn, "port": 22}],
            host_keys={
                "enabled": True,
                "store": str(tmp_path / "keys"),
                "probe_interval_seconds": 0,
            },
        )
        yield World(load_config(path, {}), elb, arn)


def test_first_pass_adopts_the_first_node_and_pushes_to_the_others(world: World) -> None:
    """The first node in the resource config gives the keys; the others get them, then join."""
    first = world.nodes[IPS[0]]
    outcome = world.run_pass()
    assert outcome.converged, outcome.errors
    assert world.canonical() == {k.public for k in first.keys.values()}
    assert [(a.kind, a.ip) for a in outcome.applied][:1] == [(Kind.ADOPT, IPS[0])]
    assert {a.ip for a in outcome.applied if a.kind is Kind.PUSH_KEYS} == set(IPS[1:])
    assert all(
        {k.public for k in n.keys.values()} == world.canonical() for n in world.nodes.values()
    )
    assert world.registered() == set(IPS)


def test_nothing_is_sent_to_an_endpoint_other_than_the_one_probed(world: World) -> None:
    """A proxy that answers the push session with another host: no script reaches it, the node
    is held (with a backoff) and the error names both fingerprints."""
    impostor = FakeNode.fresh(world.keysets)
    victim = world.nodes[IPS[2]]
    victim.answered_by = impostor
    outcome = world.run_pass()
    assert impostor.scripts == [] and impostor.sessions == 0
    assert IPS[2] not in world.registered()
    (error,) = [e for e in outcome.errors if e.startswith(IPS[2])]
    assert (
        impostor.keys["rsa"].fingerprint in error or impostor.keys["ed25519"].fingerprint in error
    )
    assert victim.keys["ed25519"].fingerprint in error
    assert world.state.nodes[IPS[2]].retry_mono is not None


def test_a_known_instance_with_unknown_keys_gets_no_session_until_trusted(world: World) -> None:
    """Re-imaged in place: out of rotation, not one session in any later pass; `keys trust`
    accepts exactly its current keys once, and the next pass repairs it."""
    assert world.run_pass().converged
    node = world.nodes[IPS[1]]
    node.keys = world.keysets.take()  # same instance id, new keys
    before = node.sessions
    for _ in range(3):
        outcome = world.run_pass()
        assert not outcome.converged
        assert IPS[1] not in world.registered()
    assert node.sessions == before
    assert world.state.nodes[IPS[1]].failures == 0  # held, not failing: no pointless retries
    request = TrustRequest(
        instance_id=world.state.nodes[IPS[1]].instance_id,
        keys=[k.public for k in node.keys.values()],
        requested_at=0,
    )
    update_intents(world.config.state.dir, lambda i: i.trust.__setitem__(IPS[1], request))
    outcome = world.run_pass()
    assert outcome.converged, outcome.errors
    assert node.sessions == before + 1
    assert IPS[1] in world.registered()
    assert load_intents(world.config.state.dir).trust == {}  # consumed


def test_a_trust_request_covers_nothing_but_the_keys_it_names(world: World) -> None:
    """An admin's request for one set of keys does not let a node with other keys through."""
    assert world.run_pass().converged
    node = world.nodes[IPS[1]]
    node.keys = world.keysets.take()
    stale = TrustRequest(
        instance_id=world.state.nodes[IPS[1]].instance_id,
        keys=[world.keysets.key("ed25519").public],
        requested_at=0,
    )
    update_intents(world.config.state.dir, lambda i: i.trust.__setitem__(IPS[1], stale))
    sessions = node.sessions
    world.run_pass()
    assert node.sessions == sessions
    assert IPS[1] not in world.registered()


def test_a_rotation_updates_every_node_in_place(world: World) -> None:
    """After `keys rotate`, nodes presenting the previous set are pushed the new one without
    leaving rotation, and the previous set is retired once all present the new one."""
    assert world.run_pass().converged
    world.writes.clear()
    store = world.store()
    store.install(world.keysets.take(), keep_previous=True)
    assert store.is_rotating()
    outcome = world.run_pass()
    assert outcome.converged, outcome.errors
    assert "DeregisterTargets" not in world.writes
    assert world.registered() == set(IPS)
    assert all(
        {k.public for k in n.keys.values()} == world.canonical() for n in world.nodes.values()
    )
    assert not store.is_rotating()
    assert [a.kind for a in outcome.applied].count(Kind.RETIRE_PREVIOUS) == 1


def test_a_rotation_waits_for_a_node_that_cannot_be_reached(world: World) -> None:
    """The previous set stays valid while some node may still present it."""
    assert world.run_pass().converged
    store = world.store()
    store.install(world.keysets.take(), keep_previous=True)
    world.nodes[IPS[2]].probe_error = OSError("no route to host")
    world.run_pass()
    assert store.is_rotating()
    world.nodes[IPS[2]].probe_error = None
    assert world.run_pass().converged
    assert not store.is_rotating()


def test_any_exception_in_a_node_job_is_that_nodes_failure(world: World) -> None:
    """A probe or a session raising something unexpected fails that node; the others join."""
    world.nodes[IPS[1]].probe_error = RuntimeError("boom")
    world.nodes[IPS[2]].session_error = ValueError("odd channel")
    outcome = world.run_pass()
    assert world.registered() == {IPS[0]}
    assert world.state.nodes[IPS[1]].last_error == "probe: RuntimeError: boom"
    assert world.state.nodes[IPS[2]].last_error == "push: ValueError: odd channel"
    assert not outcome.converged
    assert world.state.last_pass is not None and len(world.state.last_pass.errors) == 1


def test_a_push_that_failed_late_backs_off_from_when_it_failed(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push that fails after a long wait is retried a backoff after it failed, not after the
    pass began (or a push that used its whole deadline is tried again on the very next pass)."""
    slow, real = IPS[1], world.connector.session

    @contextmanager
    def session(ip: str, pin: frozenset[str]) -> Iterator[Any]:
        if ip == slow:
            world.clock.advance(100)  # the push waited this long, then failed
            raise SshError("command", "timed out after 100s in total")
        with real(ip, pin) as s:
            yield s

    monkeypatch.setattr(world.connector, "session", session)
    failed_at = world.clock.now + 100
    world.run_pass()
    record = world.state.nodes[slow]
    assert record.failures == 1
    assert record.retry_mono == failed_at + backoff_seconds(1)


def test_an_adoption_the_store_cannot_take_fails_that_pass_quietly(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writing the adopted set fails with something unexpected (a full disk): the adoption failed
    and says why; the pass is not crashed, nothing is registered, the next pass adopts."""

    def full(*_: object, **__: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(KeyStore, "install", full)
        outcome = world.run_pass()
    assert not outcome.converged
    assert outcome.errors == [
        f"adopting the keys of {IPS[0]} (i-0a1b2c3d4e5f60011) failed: "
        "adopt: OSError: [Errno 28] No space left on device"
    ], outcome.errors
    assert not any(e.startswith("pass crashed") for e in outcome.errors)
    assert world.registered() == set()
    assert world.run_pass().converged  # adopts now; the others are pushed and join
    assert world.registered() == set(IPS)
    assert world.canonical() == {world.nodes[IPS[0]].keys[t].public for t in TYPES}
