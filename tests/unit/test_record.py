"""What a pass writes down about a node's failures: one backoff per node, and each step ends only
the backoff it caused."""

from __future__ import annotations

from hpodlb.config import Config
from hpodlb.context import PassContext
from hpodlb.inventory import LoginNode
from hpodlb.jobs import SESSIONS, Job
from hpodlb.outcome import PassOutcome
from hpodlb.record import counted, node_failed
from hpodlb.sshnode import SshError
from hpodlb.state import NodeRecord, State
from tests.support.aws import TG_ARN

NODE = LoginNode(ip="10.1.0.5", instance_id="i-5", name="login-5", group="login-group")


def a_pass(state: State, now: float) -> PassContext:
    config = Config.model_validate({"target_groups": [{"arn": TG_ARN, "port": 22}]})
    return PassContext(
        config=config,
        state=state,
        outcome=PassOutcome(nodes=(NODE,)),
        boot_id="boot",
        clock=lambda: now,
        wall=lambda: 1_000_000 + now,
        beat=lambda: None,
        apply=True,
        act=True,
    )


def count(state: State, now: float, result: int | Exception) -> None:
    job = Job(SESSIONS, NODE.ip, budget=30, started=now, finished=now)
    counted(a_pass(state, now), job, result)


def test_a_count_neither_deepens_nor_ends_a_push_backoff() -> None:
    """A drained node whose push failed backs off for the push; a count failing meanwhile adds
    no failure of its own, and a count that works again does not end the push's backoff (it
    did: the next good count wiped it, and the failing push was retried at once)."""
    state = State(nodes={NODE.ip: NodeRecord(instance_id="i-5", drained="kernel")})
    node_failed(a_pass(state, 100), NODE.ip, "push: sshd -t failed", backoff=True)
    record = state.nodes[NODE.ip]
    pushed = (record.failures, record.retry_mono, record.last_error)
    assert pushed == (1, 110.0, "push: sshd -t failed")

    count(state, 101, SshError("connect", "timed out"))
    assert (record.failures, record.retry_mono, record.last_error) == pushed
    assert (record.sessions, record.sessions_error) == (None, "connect: timed out")

    count(state, 102, 3)
    assert (record.failures, record.retry_mono, record.last_error) == pushed
    assert (record.sessions, record.sessions_error) == (3, "")


def test_a_failing_count_backs_off_and_a_good_one_ends_its_own_backoff() -> None:
    state = State(nodes={NODE.ip: NodeRecord(instance_id="i-5", drained="kernel")})
    record = state.nodes[NODE.ip]
    count(state, 100, SshError("connect", "timed out"))
    count(state, 111, SshError("connect", "timed out"))
    assert (record.failures, record.retry_mono) == (2, 131.0)
    assert record.last_error == "sessions: connect: timed out"
    count(state, 140, 0)
    assert (record.failures, record.retry_mono, record.last_error) == (0, None, "")
