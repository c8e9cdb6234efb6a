"""Leadership asked again before every write (issue 24): an answer stands for at most 2 s from
when it was asked, and a `scontrol` that fails mid-pass stops the pass writing (it cannot tell,
which is not "still leading").

`scontrol` is a stand-in script (what the real one prints, or its failure), run for real by
`leader.check`; AWS is moto in-process. The pass's monotonic clock is one the test moves: a pass
outlasting the cache is played by moving it, not by sleeping.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from hpodlb import leader
from hpodlb.config import load_config
from hpodlb.reconcile import Reconciler
from hpodlb.state import State
from hpodlb.targets import TargetGroup
from tests.support.aws import Clock, make_group
from tests.support.slurm import stand_in

HEAD1_UP = "Slurmctld(primary) at head1 is UP\nSlurmctld(backup) at head2 is UP"
MUNGE_DOWN = "echo 'scontrol: error: Munge encode failed' >&2; exit 1"
CACHE_SECONDS = 2.0  # the contract's (shared/DESIGN.md): an answer stands for at most this long
LOGIN_IPS = {"10.1.71.12", "10.1.72.45", "10.1.70.201"}  # the fixture resource config's


def scontrol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *answers: str) -> Path:
    """A stand-in `scontrol` on PATH (and nowhere else) that runs the n-th of `answers` on its
    n-th call (the last one from then on); the file it returns counts its calls."""
    calls = tmp_path / "calls"
    calls.write_text("0")
    cases = "".join(f"  {n}) {body} ;;\n" for n, body in enumerate(answers[:-1]))
    body = (
        f'n=$(cat {calls}); echo $((n + 1)) > {calls}\ncase "$n" in\n{cases}'
        f"  *) {answers[-1]} ;;\nesac"
    )
    monkeypatch.setattr(leader, "EXTRA_PATHS", ())
    monkeypatch.setenv("PATH", f"{stand_in(tmp_path, body)}{os.pathsep}/usr/bin:/bin")
    return calls


def asked(calls: Path) -> int:
    """How often the stand-in ran."""
    return int(calls.read_text())


def as_head1() -> leader.Leadership:
    """What this head decides with the real `check` (its names fixed, so the test's host name does
    not matter)."""
    return leader.check("slurmctld", names=lambda: {"head1"})


def test_an_answer_stands_for_at_most_two_seconds_from_when_it_was_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Within 2 s of a question no second `scontrol ping` runs; at 2 s one does, and an answer
    that was slow to come counts its age from the question, not from the answer."""
    calls = scontrol(tmp_path, monkeypatch, f"echo '{HEAD1_UP}'")
    clock = Clock()
    slow_by = 0.0

    def ask() -> leader.Leadership:
        answer = as_head1()
        clock.advance(slow_by)  # the time the question took, on the pass's clock
        return answer

    asker = leader.Asker(ask, clock)
    assert leader.CACHE_SECONDS <= CACHE_SECONDS
    assert asker().acting and asked(calls) == 1
    clock.advance(leader.CACHE_SECONDS - 0.01)
    assert asker().acting and asked(calls) == 1
    clock.advance(0.01)
    assert asker().acting and asked(calls) == 2
    assert asker.fresh().acting and asked(calls) == 3  # a pass's first question
    slow_by = 1.5  # the next answer comes 1.5 s after its question
    asked_at = clock.now
    assert asker.fresh().acting and asked(calls) == 4
    slow_by = 0.0
    assert asker().acting and asked(calls) == 4
    clock.advance(asked_at + leader.CACHE_SECONDS - clock.now)  # 2 s after the question
    assert asker().acting and asked(calls) == 5  # though only 0.5 s after the answer


def a_reconciler(
    elb: Any, write_config: Callable[..., Path], clock: Clock
) -> tuple[Reconciler, str]:
    arn = make_group(elb)
    config = load_config(
        write_config([{"arn": arn, "port": 22}], cluster={"leader": "slurmctld"}), {}
    )
    rec = Reconciler(
        config, [TargetGroup(elb, arn, 22)], keys=None, clock=clock, boot_id="b", leader=as_head1
    )
    return rec, arn


def registered(elb: Any, arn: str) -> set[str]:
    found = elb.describe_target_health(TargetGroupArn=arn)["TargetHealthDescriptions"]
    return {d["Target"]["Id"] for d in found}


def slow_questions(rec: Reconciler, clock: Clock, seconds: float) -> None:
    """Each question to `scontrol` takes `seconds` on the pass's clock: a pass that outlasts the
    cache between its first question and its first write."""
    ask = rec.leader

    def slow() -> leader.Leadership:
        answer = ask()
        clock.advance(seconds)
        return answer

    rec.leader = slow


def test_scontrol_failing_mid_pass_stops_the_pass_writing(
    elb: Any,
    write_config: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """head1 is in control as the pass begins; by its write (the answer 2.5 s old) `scontrol`
    fails: the write is not made, the pass ends as a standby that cannot tell (not converged),
    `leadership_lost` says why, and the next pass logs no second change."""
    calls = scontrol(tmp_path, monkeypatch, f"echo '{HEAD1_UP}'", MUNGE_DOWN)
    clock = Clock()
    rec, arn = a_reconciler(elb, write_config, clock)
    slow_questions(rec, clock, CACHE_SECONDS + 0.5)
    with capture_logs() as logs:
        outcome = rec.run_pass(State(), apply=True)
    assert registered(elb, arn) == set() and outcome.applied == []
    assert asked(calls) == 2  # as the pass began, and before its one write
    assert outcome.result == "not_converged"
    assert outcome.standby == (
        "standby (cannot tell which head is in control: scontrol ping: "
        "scontrol: error: Munge encode failed)"
    )
    lost = [e for e in logs if e["event"] == "leadership_lost"]
    assert [(e["controller"], e["why"]) for e in lost] == [("", outcome.leadership.why)]  # type: ignore[union-attr]
    with capture_logs() as logs:
        again = rec.run_pass(State(), apply=True)
    assert again.standby == outcome.standby
    assert [e["event"] for e in logs if e["event"].startswith("leadership")] == []


def test_a_head_still_in_control_writes_and_asks_at_most_every_two_seconds(
    elb: Any,
    write_config: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same slow pass with `scontrol` answering head1 throughout registers every login node
    (asked again before the write); a pass within the cache asks once."""
    calls = scontrol(tmp_path, monkeypatch, f"echo '{HEAD1_UP}'")
    clock = Clock()
    rec, arn = a_reconciler(elb, write_config, clock)
    fast = rec.run_pass(State(), apply=True)
    assert fast.standby == ""
    assert registered(elb, arn) == LOGIN_IPS and asked(calls) == 1
    elb.deregister_targets(TargetGroupArn=arn, Targets=[{"Id": ip} for ip in sorted(LOGIN_IPS)])
    slow_questions(rec, clock, CACHE_SECONDS + 0.5)
    slow = rec.run_pass(State(), apply=True)
    assert slow.standby == "" and asked(calls) == 3
    assert {a.ip for a in slow.applied} == LOGIN_IPS


def test_control_moving_mid_pass_is_a_calm_standby_naming_the_controller(
    elb: Any,
    write_config: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Control moves to head2 between the pass's first question and its write: nothing written,
    the pass a standby (controller: head2), its result `standby`, not an error."""
    moved = "Slurmctld(primary) at head1 is DOWN\nSlurmctld(backup) at head2 is UP"
    scontrol(tmp_path, monkeypatch, f"echo '{HEAD1_UP}'", f"echo '{moved}'")
    clock = Clock()
    rec, arn = a_reconciler(elb, write_config, clock)
    slow_questions(rec, clock, CACHE_SECONDS + 0.5)
    with capture_logs() as logs:
        outcome = rec.run_pass(State(), apply=True)
    assert registered(elb, arn) == set()
    assert (outcome.standby, outcome.result) == ("standby (controller: head2)", "standby")
    assert [(e["event"], e.get("controller")) for e in logs if "leadership" in e["event"]] == [
        ("leadership_acting", "head1"),
        ("leadership_lost", "head2"),
    ]
