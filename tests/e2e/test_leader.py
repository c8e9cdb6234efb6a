"""Several head nodes (issue 16): only the head whose slurmctld is in control acts; the others
observe and say "standby (controller: NAME)", and take over within one interval when control moves.

Against a real `slurmctld` (Debian's slurm-wlm, with munge) started as host `head1` in a UTS
namespace of its own, and the real `scontrol`; each `hpodlb` runs in a UTS namespace named as the
head it plays. Two slurmctld cannot both listen on one machine's loopback (each binds its port on
every address), so the move of control to the backup is played by a stand-in `scontrol` printing
what the real one prints (the lines below were copied from Slurm 22.05's `scontrol ping`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hpodlb import leader
from hpodlb.config import load_config
from hpodlb.state import load_state
from sim.aws import FakeAws
from tests.support.slurm import as_host, once_as, ping, slurm_heads, stand_in

# Copied from Slurm 22.05.8's `scontrol ping` (exit status 0, then 1 with its banner).
BOTH_UP = "Slurmctld(primary) at head1 is UP\nSlurmctld(backup) at head2 is UP\n"
BOTH_DOWN = (
    "Slurmctld(primary) at head1 is DOWN\nSlurmctld(backup) at head2 is DOWN\n"
    "*****************************************\n** RESTORE SLURMCTLD DAEMON TO SERVICE **\n"
    "*****************************************\n"
)
BACKUP_IN_CONTROL = "Slurmctld(primary) at head1 is DOWN\nSlurmctld(backup) at head2 is UP\n"
LOGIN_IPS = {"10.1.71.12", "10.1.72.45", "10.1.70.201"}


# -- the rule -------------------------------------------------------------------------------------


def test_the_first_controller_up_is_in_control_and_the_primary_when_none_is() -> None:
    assert leader.controllers(BOTH_DOWN) == [("head1", False), ("head2", False)]
    assert leader.decide(leader.controllers(BOTH_UP), {"head1"}).acting
    standby = leader.decide(leader.controllers(BOTH_UP), {"head2"})
    assert (standby.acting, standby.label) == (False, "standby (controller: head1)")
    assert leader.decide(leader.controllers(BACKUP_IN_CONTROL), {"head2"}).acting
    assert not leader.decide(leader.controllers(BACKUP_IN_CONTROL), {"head1"}).acting
    assert leader.decide(leader.controllers(BOTH_DOWN), {"head1"}).acting  # the primary's head
    assert not leader.decide(leader.controllers(BOTH_DOWN), {"head2"}).acting
    single = "Slurmctld(primary) at ip-10-1-33-120 is UP\n"
    assert leader.decide(leader.controllers(single), {"ip-10-1-33-120"}).acting
    # A second backup, a controller slurm.conf calls localhost, several names in one entry.
    three = BOTH_DOWN.replace("head2 is DOWN", "head2 is DOWN\nSlurmctld(backup2) at head3 is UP")
    assert leader.decide(leader.controllers(three), {"head3"}).takes_over
    assert not leader.decide(
        leader.controllers("Slurmctld(primary) at localhost is UP\n"), {"h", "localhost"}
    ).acting  # every head is localhost: tests/e2e/test_leader_names.py
    assert leader.decide(
        leader.controllers("Slurmctld(primary) at a,head1 is UP\n"), {"head1"}
    ).acting
    stranger = leader.decide(leader.controllers(BOTH_UP), {"login-1"})  # not a controller at all
    assert (stranger.acting, stranger.sound) == (False, False)
    assert stranger.label.startswith("standby (this host (login-1) is none of the controllers")


def test_when_scontrol_cannot_say_this_head_does_not_act(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hung or failing scontrol is no licence to act (two heads pushing keys is worse than a
    paused one); no scontrol at all is a single head; `always` skips the question."""
    monkeypatch.setattr(leader, "EXTRA_PATHS", ())
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert leader.check("slurmctld").why == "no scontrol here: a single head node is assumed"
    assert leader.check("slurmctld").acting
    monkeypatch.setenv(
        "PATH",
        str(
            stand_in(
                tmp_path, "echo 'scontrol: fatal: Unable to process configuration file' >&2; exit 1"
            )
        ),
    )
    failing = leader.check("slurmctld")
    assert not failing.acting
    assert failing.why == (
        "cannot tell which head is in control: scontrol ping: scontrol: fatal: "
        "Unable to process configuration file"
    )
    monkeypatch.setattr(leader, "TIMEOUT_SECONDS", 0.5)
    monkeypatch.setenv("PATH", str(stand_in(tmp_path, "exec /bin/sleep 30")))
    started = time.monotonic()
    hung = leader.check("slurmctld")
    assert not hung.acting and "timed out" in hung.why and time.monotonic() - started < 20
    assert leader.check("always").acting


# -- a real slurmctld -----------------------------------------------------------------------------


@pytest.fixture
def slurm(tmp_path: Path) -> Iterator[Callable[[bool], None]]:
    """munged and a slurm.conf naming two controllers, head1 then head2; the fixture's function
    starts or stops the real slurmctld of head1. SLURM_CONF is set for this process's children."""
    with slurm_heads(tmp_path / "slurm", ("head1", "head2"), "head1") as heads:
        yield heads.run


def test_with_a_real_slurmctld_only_the_head_in_control_acts(
    slurm: Callable[[bool], None],
    aws: FakeAws,
    arn: str,
    write_config: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key, value in aws.env().items():
        monkeypatch.setenv(key, value)
    config = write_config([{"arn": arn, "port": 22}], cluster={"leader": "slurmctld"})
    slurm(True)
    assert ping() == BOTH_UP  # the real output this file's stand-in copies

    elb = aws.client("elbv2")
    elb.register_targets(
        TargetGroupArn=arn, Targets=[{"Id": ip, "Port": 22} for ip in sorted(LOGIN_IPS)[:2]]
    )
    standby = once_as("head2", config)
    assert standby.returncode == 0, standby.stderr
    assert standby.stdout.startswith(
        "standby (controller: head1): observed only, changed nothing; "
    )
    assert {ip for ip, _ in aws.targets(arn)} == set(sorted(LOGIN_IPS)[:2])  # nothing written
    state_dir = load_config(config, {}).state.dir
    last = load_state(state_dir)[0].last_pass
    assert last is not None and last.standby == "standby (controller: head1)"
    status = subprocess.run(
        [sys.executable, "-m", "hpodlb", "status", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    assert status.splitlines()[0].split(": ", 1)[1].startswith("standby (controller: head1): ")
    events = [json.loads(line) for line in standby.stderr.splitlines() if line.startswith("{")]
    assert [e["event"] for e in events if e["event"].startswith("leadership")] == [
        "leadership_standby"
    ]

    acting = once_as("head1", config)
    assert acting.returncode == 0, acting.stderr
    assert {ip for ip, _ in aws.targets(arn)} == LOGIN_IPS
    assert load_state(state_dir)[0].last_pass.standby == ""  # type: ignore[union-attr]

    slurm(False)  # Slurm down on every head: the primary's head still keeps logins going
    assert ping() == BOTH_DOWN
    gone = sorted(LOGIN_IPS)[0]
    elb.deregister_targets(TargetGroupArn=arn, Targets=[{"Id": gone, "Port": 22}])
    assert "standby (controller: head1)" in once_as("head2", config).stdout
    assert gone not in {ip for ip, _ in aws.targets(arn)}
    assert once_as("head1", config).returncode == 0
    assert gone in {ip for ip, _ in aws.targets(arn)}


def test_the_backup_head_takes_over_within_one_interval(
    aws: FakeAws,
    arn: str,
    write_config: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`hpodlb run` on head2 observes while head1's slurmctld is in control, and registers the
    login nodes on its first pass after control moves to head2 (stand-in scontrol, see above)."""
    for key, value in aws.env().items():
        monkeypatch.setenv(key, value)
    said = tmp_path / "ping.txt"
    said.write_text(BOTH_UP)
    monkeypatch.setenv(
        "PATH", f"{stand_in(tmp_path, f'cat {said}')}{os.pathsep}{os.environ['PATH']}"
    )
    config = write_config(
        [{"arn": arn, "port": 22}],
        cluster={"leader": "slurmctld"},
        reconcile={"interval_seconds": 1},
    )
    state_dir = load_config(config, {}).state.dir
    log = (tmp_path / "daemon.log").open("w")
    daemon = subprocess.Popen(
        as_host("head2", sys.executable, "-m", "hpodlb", "run", "--config", str(config)),
        stdout=log,
        stderr=log,
        env=os.environ.copy(),
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            last = load_state(state_dir)[0].last_pass
            if last is not None and last.standby:
                break
            assert time.monotonic() < deadline and daemon.poll() is None
            time.sleep(0.1)
        time.sleep(2.5)  # two more intervals of observing
        assert aws.targets(arn) == set()
        assert last.standby == "standby (controller: head1)"
        said.write_text(BACKUP_IN_CONTROL)
        moved, moved_at = time.monotonic(), time.time()
        while {ip for ip, _ in aws.targets(arn)} != LOGIN_IPS:
            assert time.monotonic() - moved < 30 and daemon.poll() is None
            time.sleep(0.05)
        took = time.monotonic() - moved
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
        log.close()
    events = [
        json.loads(x)
        for x in (tmp_path / "daemon.log").read_text().splitlines()
        if x.startswith("{")
    ]
    finished = [e for e in events if e["event"] == "pass_finished"]
    after = [e["standby"] for e in finished if _when(e) > moved_at]
    # The pass in flight when control moved may still observe; the next one acts.
    assert after.index("") <= 1, after
    assert [e["controller"] for e in events if e["event"] == "leadership_acting"] == ["head2"]
    from tests.support.data import FIGURES

    FIGURES["control moved to this head -> login nodes registered (interval 1 s)"] = f"{took:.2f} s"


def _when(event: dict[str, str]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def test_a_head_that_cannot_tell_stands_by_and_says_it_is_not_converged(
    aws: FakeAws,
    arn: str,
    write_config: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """scontrol failing (munge down, say): `once` writes nothing, exits 1 and says why; `status`
    says NOT converged, not a calm standby."""
    for key, value in aws.env().items():
        monkeypatch.setenv(key, value)
    failing = stand_in(tmp_path, 'echo "scontrol: error: Munge encode failed" >&2; exit 1')
    monkeypatch.setenv("PATH", f"{failing}{os.pathsep}{os.environ['PATH']}")
    config = write_config([{"arn": arn, "port": 22}], cluster={"leader": "slurmctld"})
    done = once_as("head1", config)
    assert done.returncode == 1
    assert done.stdout.startswith(
        "standby (cannot tell which head is in control: scontrol ping: "
        "scontrol: error: Munge encode failed): observed only, changed nothing"
    )
    assert aws.targets(arn) == set()
    status = subprocess.run(
        [sys.executable, "-m", "hpodlb", "status", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    assert (
        status.splitlines()[0].split(": ", 1)[1].startswith("NOT converged: standby (cannot tell")
    )


def test_a_backup_head_asks_twice_before_it_takes_over(
    elb: Any, write_config: Callable[..., Path]
) -> None:
    """One answer saying the primary is down is not enough: the pass asks again CONFIRM_SECONDS
    later and acts only if the backup is still the one in control."""
    from hpodlb.reconcile import Reconciler
    from hpodlb.state import State
    from hpodlb.targets import TargetGroup
    from tests.support.aws import make_group

    answers = [BACKUP_IN_CONTROL, BOTH_UP, BACKUP_IN_CONTROL, BACKUP_IN_CONTROL]
    asked: list[str] = []

    def scontrol() -> leader.Leadership:
        asked.append(answers[len(asked)])
        return leader.decide(leader.controllers(asked[-1]), {"head2"})

    tg = make_group(elb)
    config = load_config(write_config([{"arn": tg, "port": 22}]), {})
    rec = Reconciler(config, [TargetGroup(elb, tg, 22)], keys=None, boot_id="b", leader=scontrol)
    slept: list[float] = []
    rec.sleep = slept.append  # type: ignore[assignment]  # records the waits instead of waiting
    blip = rec.run_pass(State(), apply=True)  # asked twice: the primary answered the second time
    assert (blip.standby, blip.applied, slept) == (
        "standby (controller: head1)",
        [],
        [leader.CONFIRM_SECONDS],
    )
    moved = rec.run_pass(State(), apply=True)  # asked twice, the backup both times: it acts
    assert moved.standby == "" and len(moved.applied) == 3 and len(asked) == 4


def test_a_standby_head_logs_in_nowhere_and_learns_what_the_acting_head_registered(
    sim_env: Any,
) -> None:
    """Host keys on, an empty store that would adopt, nodes with keys of their own: a standby pass
    probes (observes) but adopts nothing, pushes nothing, logs in to no node and writes no target;
    it counts the acting head's registrations of login nodes as hpodlb's (prune = false after a
    takeover must still be able to remove them)."""
    from hpodlb.keystore import KeyStore
    from hpodlb.state import State
    from hpodlb.wiring import build_reconciler
    from tests.support.lab import nodes

    env = sim_env
    ips = nodes(env, 2)
    before = {ip: env.cluster.nodes[ip].keyscan() for ip in ips}
    env.aws.client("elbv2").register_targets(
        TargetGroupArn=env.arn, Targets=[{"Id": ips[0], "Port": 22}]
    )
    rec = build_reconciler(env.config)
    rec.leader = lambda: leader.Leadership(
        False, "head1", "slurmctld on head1 is in control", "head1"
    )
    state = State()
    outcome = rec.run_pass(state, apply=True)
    assert outcome.standby == "standby (controller: head1)" and outcome.applied == []
    assert KeyStore(env.store, ("rsa", "ecdsa", "ed25519")).is_empty()
    assert {ip: env.cluster.nodes[ip].keyscan() for ip in ips} == before
    logins = sum(
        (env.cluster.nodes[ip].dir / "sshd.log").read_text().count("Accepted publickey")
        for ip in ips
    )
    assert logins == 0
    assert env.registered() == {ips[0]}
    assert state.registered_by_us[env.arn] == [ips[0]]


def test_a_standby_head_counts_no_sessions_even_on_drained_nodes(sim_env: Any) -> None:
    """A drained node is the one a pass logs in to (to count its users' sessions for `status`
    and `drain --wait`); a standby head logs in to it no more than to any other node: no login
    in its sshd log, no count recorded."""
    from hpodlb.intentmodel import DrainRequest, Intents
    from hpodlb.intents import update_intents
    from hpodlb.wiring import build_reconciler
    from tests.support.lab import nodes
    from tests.support.nodeside import logins

    env = sim_env
    ips = nodes(env, 2)
    assert env.run_pass().converged  # acting: the canonical keys, that a count is pinned to

    def drain(intents: Intents) -> None:
        intents.drain[ips[1]] = DrainRequest(reason="kernel update", force=True)

    update_intents(env.state_dir, drain)
    before = {ip: logins(env.cluster.nodes[ip]) for ip in ips}
    rec = build_reconciler(env.config)
    rec.leader = lambda: leader.Leadership(
        False, "head1", "slurmctld on head1 is in control", "head1"
    )
    state = env.state()
    outcome = rec.run_pass(state, apply=True)
    assert outcome.standby == "standby (controller: head1)" and outcome.applied == []
    assert {ip: logins(env.cluster.nodes[ip]) for ip in ips} == before
    drained = state.nodes[ips[1]]
    assert (drained.drained, drained.sessions, drained.sessions_at) == ("kernel update", None, None)
