"""Drains and `keys trust` requests kept as target group tags, against moto in-process.

Two heads are two configs with their own state dirs on one target group; a `Reconciler` is a
head's pass. Every AWS answer is moto's (IAM enforced by moto where a read must be refused).
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest

from hpodlb.config import Config, load_config
from hpodlb.drain import DrainError, Drains
from hpodlb.intentmodel import (
    DRAIN_PREFIX,
    TAG_VALUE_MAX,
    TRUST_PREFIX,
    DrainRequest,
    Intents,
    TrustRequest,
)
from hpodlb.intents import intents_path, load_intents, update_intents
from hpodlb.reconcile import Reconciler
from hpodlb.state import State
from hpodlb.targets import TargetGroup, boto_config
from tests.support.aws import Clock, credentials_denied, enforce_iam, make_group

DRAINED = "10.1.71.12"
LOGIN_NODES = {"10.1.71.12", "10.1.72.45", "10.1.70.201"}
# What a tag value may hold in every AWS service.
TAG_CHARS = set(string.ascii_letters + string.digits + " _.:/=+-@")


def ips_in(elb: Any, arn: str) -> set[str]:
    reply = elb.describe_target_health(TargetGroupArn=arn)
    return {d["Target"]["Id"] for d in reply["TargetHealthDescriptions"]}


def tags_of(elb: Any, arn: str) -> dict[str, str]:
    reply = elb.describe_tags(ResourceArns=[arn])["TagDescriptions"][0]["Tags"]
    return {t["Key"]: t["Value"] for t in reply}


@pytest.fixture
def heads(
    elb: Any, write_config: Callable[..., Path], tmp_path: Path
) -> tuple[str, Config, Config]:
    """(the group's ARN, head1's config, head2's config): one group, two state dirs."""
    arn = make_group(elb)
    configs = [
        load_config(
            write_config([{"arn": arn, "port": 22}], state={"dir": str(tmp_path / name)}), {}
        )
        for name in ("head1", "head2")
    ]
    return arn, configs[0], configs[1]


def reconciler(config: Config, client: Any, clock: Clock) -> Reconciler:
    arn = config.target_groups[0].arn
    return Reconciler(config, [TargetGroup(client, arn, 22)], keys=None, clock=clock, boot_id="b1")


def test_a_drain_made_on_one_head_keeps_the_node_out_on_the_other(
    elb: Any, heads: tuple[str, Config, Config]
) -> None:
    """head1's drain (its own state dir) is read from the tags by head2's pass, which takes the
    node out, keeps it out pass after pass, and caches the drain in its own intents.json."""
    arn, head1, head2 = heads
    clock, state2 = Clock(), State()
    rec2 = reconciler(head2, elb, clock)
    assert rec2.run_pass(state2, apply=True).converged
    assert ips_in(elb, arn) == LOGIN_NODES

    Drains(head1).drain(DRAINED, "disk swap", force=True)
    assert tags_of(elb, arn)[DRAIN_PREFIX + DRAINED].endswith(" r=disk swap")
    assert load_intents(head2.state.dir).drain == {}  # head2 has never heard of it

    registers: list[str] = []
    elb.meta.events.register(
        "provide-client-params.elastic-load-balancing-v2.RegisterTargets",
        lambda params, **_: registers.extend(t["Id"] for t in params["Targets"]),
    )
    for _ in range(3):
        clock.advance(60)
        outcome = rec2.run_pass(state2, apply=True)
        assert outcome.converged, outcome.errors
        assert ips_in(elb, arn) == LOGIN_NODES - {DRAINED}
    assert DRAINED not in registers
    assert load_intents(head2.state.dir).drain[DRAINED].reason == "disk swap"

    Drains(head2).undrain(DRAINED)  # undone on the other head: the tag goes for both
    assert not any(k.startswith(DRAIN_PREFIX) for k in tags_of(elb, arn))
    clock.advance(60)
    assert rec2.run_pass(state2, apply=True).converged
    assert ips_in(elb, arn) == LOGIN_NODES


def test_a_drain_on_a_standby_head_is_recorded_for_the_acting_head(
    elb: Any, heads: tuple[str, Config, Config]
) -> None:
    """`drain` on a head whose last pass was on standby records the drain (the tags) and says
    that the head in control applies it; it used to refuse."""
    from hpodlb.drain import drain_lines
    from hpodlb.state import PassRecord, load_state, save_state

    arn, head1, _ = heads
    state, _ = load_state(head1.state.dir)
    state.last_pass = PassRecord(standby="standby (controller: head2)")
    save_state(head1.state.dir, state)
    result = Drains(head1).drain(DRAINED, "bios", force=True)
    assert DRAIN_PREFIX + DRAINED in tags_of(elb, arn)
    assert "standby (controller: head2)" in drain_lines(result, head1)[1]
    assert "the head in control applies it" in drain_lines(result, head1)[1]


def test_an_old_intents_file_is_carried_into_the_tags_once(
    elb: Any, heads: tuple[str, Config, Config]
) -> None:
    """An intents.json from before the tags (no `shared` mark): the first applying pass writes
    its drains and trust requests to the tags, marks the cache, and the drained node stays out."""
    arn, head1, _ = heads
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
    old = Intents(
        drain={DRAINED: DrainRequest(reason="old drain", requested_by="root", requested_at=5)},
        trust={"10.1.72.45": TrustRequest(instance_id="i-0b", keys=[key], requested_at=7)},
    )
    head1.state.dir.mkdir(mode=0o700, parents=True)
    intents_path(head1.state.dir).write_text(old.model_dump_json(exclude={"shared"}))
    assert "shared" not in json.loads(intents_path(head1.state.dir).read_text())

    clock, state = Clock(), State()
    outcome = reconciler(head1, elb, clock).run_pass(state, apply=True)
    assert outcome.converged, outcome.errors
    tags = tags_of(elb, arn)
    assert tags[DRAIN_PREFIX + DRAINED].endswith(" r=old drain")
    assert tags[TRUST_PREFIX + "10.1.72.45"].startswith("t=7.0 i=i-0b SHA256:")
    assert ips_in(elb, arn) == LOGIN_NODES - {DRAINED}
    assert load_intents(head1.state.dir).shared

    elb.remove_tags(ResourceArns=[arn], TagKeys=[DRAIN_PREFIX + DRAINED])  # undrained elsewhere
    clock.advance(60)
    assert reconciler(head1, elb, clock).run_pass(state, apply=True).converged
    assert DRAINED not in load_intents(head1.state.dir).drain  # carried once, not again


def test_unreadable_tags_keep_drained_nodes_out_and_say_so(
    elb: Any, heads: tuple[str, Config, Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """DescribeTags denied (moto enforcing IAM): the pass keeps the cached drain in force, is not
    converged and names the call; with the cache gone too, the last pass's copy holds it."""
    arn, head1, _ = heads
    clock, state = Clock(), State()
    Drains(head1).drain(DRAINED, "disk", force=True)
    assert reconciler(head1, elb, clock).run_pass(state, apply=True).converged
    assert ips_in(elb, arn) == LOGIN_NODES - {DRAINED}

    key = credentials_denied("elasticloadbalancing:DescribeTags")
    enforce_iam(monkeypatch)
    denied = boto3.client(
        "elbv2",
        region_name="us-west-2",
        config=boto_config(),
        aws_access_key_id=key["aws_access_key_id"],
        aws_secret_access_key=key["aws_secret_access_key"],
    )
    rec = reconciler(head1, denied, clock)
    for lose_the_cache in (False, True):
        if lose_the_cache:
            intents_path(head1.state.dir).unlink()
        clock.advance(60)
        outcome = rec.run_pass(state, apply=True)
        assert not outcome.converged
        assert any("DescribeTags failed: AccessDenied" in e for e in outcome.errors), outcome
        assert ips_in(denied, arn) == LOGIN_NODES - {DRAINED}


def test_the_tag_limit_refuses_a_drain_in_one_line_and_loses_none(
    elb: Any, heads: tuple[str, Config, Config]
) -> None:
    """A group full of tags (moto allows 10 per resource; AWS 50) takes the drains that fit;
    the next is refused by AWS in one line naming the group and the way out, and the drains
    already recorded are all still there."""
    arn, head1, _ = heads
    elb.add_tags(ResourceArns=[arn], Tags=[{"Key": f"team:{i}", "Value": "x"} for i in range(8)])
    drains = Drains(head1)
    for ip in ("10.1.71.12", "10.1.72.45"):
        drains.drain(ip, "disk", force=True)
    before = tags_of(elb, arn)
    with pytest.raises(DrainError) as err:
        drains.drain("10.1.70.201", "disk", force=True)
    line = str(err.value)
    assert "\n" not in line
    assert "smhp-login-node-tg: AWS refused another tag (TooManyTags" in line
    assert "undrain a node or remove other tags from the group" in line
    assert tags_of(elb, arn) == before
    assert set(load_intents(head1.state.dir).drain) == {"10.1.71.12", "10.1.72.45"}


def test_a_reason_becomes_a_short_tag_value_and_reads_back(
    elb: Any, heads: tuple[str, Config, Config]
) -> None:
    """Any printable reason (quotes, semicolons, accents) fits one tag value in AWS's character
    set; a short one reads back exactly, a long one is cut and says so; the drain holds."""
    arn, head1, _ = heads
    odd = 'disk "sdb" failed; ticket #42 {é}'
    update_intents(
        head1.state.dir,
        lambda i: i.drain.update({DRAINED: DrainRequest(reason=odd, requested_by="a b")}),
        [TargetGroup(elb, arn, 22)],
    )
    long = "x" * 150 + "é" * 50
    update_intents(
        head1.state.dir,
        lambda i: i.drain.update({"10.1.72.45": DrainRequest(reason=long)}),
        [TargetGroup(elb, arn, 22)],
    )
    tags = tags_of(elb, arn)
    for ip in (DRAINED, "10.1.72.45"):
        value = tags[DRAIN_PREFIX + ip]
        assert len(value) <= TAG_VALUE_MAX and set(value) <= TAG_CHARS, value
    from hpodlb.intents import read_shared

    shared = read_shared([TargetGroup(elb, arn, 22)]).intents
    assert shared.drain[DRAINED].reason == odd
    assert shared.drain[DRAINED].requested_by == "a b"
    assert shared.drain["10.1.72.45"].reason.startswith("x" * 150)
    assert shared.drain["10.1.72.45"].reason.endswith("...")
