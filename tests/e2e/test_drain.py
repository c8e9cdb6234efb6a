"""`hpodlb drain` / `undrain` (issue 17) on real OpenSSH login nodes and a moto server: the node
leaves every target group and stays out across passes and restarts, its users get a `wall` notice
on their terminals, its SSH sessions are counted (real `ssh` sessions held open), the guards still
apply, a lost intents file never puts a drained node back, and `undrain` brings it back."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from hpodlb.cli import main
from hpodlb.intents import intents_path, load_intents
from hpodlb.planner import Kind
from hpodlb.report import status_text
from sim.aws import nlb_health
from sim.env import SimEnv
from sim.nodes import SimNode
from tests.support.daemon import Daemon, spawn_daemon, stop_daemons
from tests.support.lab import canonical, nodes, run_pass_later
from tests.support.nodeside import logins, ssh_as_user
from tests.support.process import run_hpodlb

FAILING = ("unhealthy", "Target.FailedHealthChecks", "Health checks failed")

pytestmark = pytest.mark.sshd


@pytest.fixture
def env(sim_env: SimEnv) -> SimEnv:
    return sim_env


class Held:
    """Real `ssh -tt` sessions held open on a node, as users' terminals are."""

    def __init__(self, procs: list[subprocess.Popen[bytes]]) -> None:
        self.procs = procs

    def close(self, count: int | None = None) -> None:
        for proc in self.procs[:count]:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(5)

    def output(self) -> list[bytes]:
        """What each terminal showed, without whitespace: wall breaks lines at 79 columns."""
        self.close()
        return [b"".join((p.stdout.read() if p.stdout else b"").split()) for p in self.procs]


@contextmanager
def sessions(env: SimEnv, node: SimNode, count: int, command: str = "sleep 120") -> Iterator[Held]:
    before = logins(node)
    procs = [
        subprocess.Popen(
            ssh_as_user(env.cluster, node, command, terminal=True),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(count)
    ]
    held = Held(procs)
    try:
        deadline = time.monotonic() + 30
        while logins(node) < before + count:
            assert time.monotonic() < deadline, f"{count} ssh sessions to {node.ip} did not log in"
            time.sleep(0.05)
        time.sleep(0.3)  # the session's pty and utmp entry follow the login
        yield held
    finally:
        held.close()


def cli(env: SimEnv, *args: str) -> int:
    return main(["--config", str(env.config_path), *args])


def converged(env: SimEnv, count: int) -> list[str]:
    ips = nodes(env, count)
    outcome = env.run_pass()
    assert outcome.converged, outcome.errors
    assert env.registered() == set(ips)
    return ips


def test_drain_takes_a_node_out_tells_its_users_and_undrain_brings_it_back(
    env: SimEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, c = converged(env, 3)
    node_a, node_b = env.cluster.nodes[a], env.cluster.nodes[b]
    with sessions(env, node_a, 2) as on_a, sessions(env, node_b, 1) as on_b:
        assert cli(env, "drain", a, "--reason", "kernel update 6.8") == 0
        said = capsys.readouterr().out
        assert "drained: kernel update 6.8" in said and "users were told" in said
        intent = load_intents(env.state_dir).drain[a]
        assert (intent.reason, intent.instance_id, intent.force) == (
            "kernel update 6.8",
            node_a.instance_id,
            False,
        )

        outcome = env.run_pass()
        assert outcome.converged, outcome.errors
        assert [(x.kind, x.ip) for x in outcome.applied] == [(Kind.DEREGISTER, a)]
        assert "drained by an admin: kernel update 6.8" in outcome.applied[0].reason
        assert env.registered() == {b, c}
        state = env.state()
        assert state.nodes[a].drained == "kernel update 6.8"
        assert state.nodes[a].sessions == 2  # hpodlb's own connection is not counted
        assert state.nodes[b].sessions is None  # only drained nodes are counted
        shown = status_text(state, env.arns, time.time())
        assert f"drained: {a} ({node_a.instance_id}): kernel update 6.8, 2 sessions" in shown
        assert ", 1 drained" in shown.splitlines()[1]

        # Kept out: pass after pass, and by a new reconciler (a restarted daemon).
        for _ in range(2):
            again = env.run_pass()
            assert again.converged and not again.applied, again.errors
        assert env.registered() == {b, c}

        a_saw, b_saw = on_a.output(), on_b.output()
    assert all(b"kernelupdate6.8" in out and b"drainedformaintenance" in out for out in a_saw)
    assert all(b"kernelupdate6.8" not in out for out in b_saw)  # wall on a reaches a only

    assert cli(env, "undrain", a) == 0
    assert "undrained" in capsys.readouterr().out
    back = env.run_pass()
    assert back.converged, back.errors
    assert env.registered() == {a, b, c}
    assert env.state().nodes[a].drained == "" and env.state().nodes[a].sessions is None
    assert cli(env, "undrain", a) == 0
    assert "is not drained: nothing to do" in capsys.readouterr().out


@contextmanager
def passes(env: SimEnv) -> Iterator[None]:
    """The daemon's part, played in the background: a pass every half second."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            env.run_pass()
            stop.wait(0.5)

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(60)


def test_drain_wait_reports_rotation_and_sessions_until_out_and_empty(
    env: SimEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    a, _, _ = converged(env, 3)
    node = env.cluster.nodes[a]
    with sessions(env, node, 2) as held:
        # No pass since the drain (no daemon): the node is still in rotation, whatever its sessions.
        assert cli(env, "drain", a, "--wait", "1") == 1
        out = capsys.readouterr().out
        assert "no pass since the drain: no hpodlb daemon runs" in out and "2 sessions open" in out
        assert "not yet both out of rotation and empty after 1s" in out

        codes: list[int] = []
        said = ""
        with passes(env):
            waiter = threading.Thread(
                target=lambda: codes.append(cli(env, "drain", a, "--wait", "90"))
            )
            waiter.start()
            # Each session closes only once the waiter has said the count before it: on a loaded
            # machine one poll can take longer than any fixed sleep (CI once missed the 1).
            for closing, seen in ((1, "; 2 sessions open"), (None, "; 1 sessions open")):
                deadline = time.monotonic() + 45
                while seen not in said:
                    assert time.monotonic() < deadline, (seen, said)
                    time.sleep(0.2)
                    said += capsys.readouterr().out
                held.close(closing)
            waiter.join(90)
    assert codes == [0]
    said += capsys.readouterr().out
    lines = [line for line in said.splitlines() if line.startswith(f"{a}: ")]
    counts = [int(line.split("; ")[1].split()[0]) for line in lines if "sessions open" in line]
    # In order, with perhaps a count between them: a connection hpodlb (the background passes
    # here, the daemon for real) is just opening or closing as the count is taken is counted once.
    rest = iter(counts)
    assert all(any(c == want for c in rest) for want in (2, 1, 0)) and counts[-1] == 0, lines
    assert "out of rotation in every target group" in lines[-2]
    assert env.registered() == set(env.listed) - {a}


def test_sessions_are_counted_across_an_sshd_restart_and_hpodlbs_own_are_not(env: SimEnv) -> None:
    """An openssh-server upgrade restarts sshd: the sessions it had are still users on the node.
    hpodlb's other connections (a push, doctor, the daemon's count) are not users; a user's own
    `ssh node sh -s` is."""
    from hpodlb.drain import Drains
    from hpodlb.sessions import count_sessions

    a, b = converged(env, 2)
    node = env.cluster.nodes[a]
    drains = Drains(env.config)
    with (
        sessions(env, node, 1),
        sessions(env, node, 1, "sh -s"),
        sessions(env, env.cluster.nodes[b], 1),
    ):
        assert drains.sessions(a) == 2
        node.restart_sshd()
        assert drains.sessions(a) == 2
        pin = frozenset(canonical(env))
        running, done = env.workdir / "script-running", env.workdir / "count-taken"
        busy = threading.Thread(target=lambda: _run_in_session(drains, a, pin, running, done))
        busy.start()
        deadline = time.monotonic() + 30
        while not running.exists():  # hpodlb's own session is inside its `sh -s hpodlb`
            assert time.monotonic() < deadline and busy.is_alive()
            time.sleep(0.05)
        assert count_sessions(drains.connector, a, pin) == 2
        done.touch()
        busy.join(30)
        assert drains.sessions(b) == 1


def _run_in_session(
    drains: object, ip: str, pin: frozenset[str], running: Path, done: Path
) -> None:
    """A script of hpodlb's that runs until the test has counted (at most 20 s)."""
    script = f"touch '{running}'; i=0; while [ ! -e '{done}' ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done"
    with drains.connector.session(ip, pin) as session:  # type: ignore[attr-defined]
        session.run_root(script.encode())


def test_drain_below_min_in_service_is_refused_unless_forced(
    env: SimEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    (a,) = converged(env, 1)
    assert cli(env, "drain", a) == 1
    err = capsys.readouterr().err
    assert "would leave 0 login nodes in service" in err and "min_in_service = 1" in err
    assert "--force" in err
    assert load_intents(env.state_dir).drain == {}
    assert env.run_pass().converged and env.registered() == {a}

    assert cli(env, "drain", a, "--force", "--reason", "replace the root volume") == 0
    outcome = env.run_pass()
    assert env.registered() == set()  # the admin said so, past min_in_service and the fraction
    assert outcome.converged, outcome.errors


def test_an_unforced_drain_is_still_held_by_the_guards_in_the_pass(
    env: SimEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    """With no pass on record the command cannot check min_in_service; the pass still keeps it."""
    a, b = converged(env, 2)
    env.write_config(reconcile={"max_deregister_fraction": 1.0})
    (env.state_dir / "state.json").unlink()
    assert cli(env, "drain", a) == 0
    assert cli(env, "drain", b) == 0
    assert "no pass has run yet" in capsys.readouterr().out
    outcome = env.run_pass()
    assert env.registered() == {b}
    assert not outcome.converged
    (held,) = env.state().last_pass.held  # type: ignore[union-attr]
    assert held.startswith(f"deregister {b}") and "held by min_in_service" in held
    from hpodlb.drain import Drains

    out, where = Drains(env.config).rotation(b, since=0)
    assert not out and where.startswith(f"still in rotation: deregister {b}")


def test_the_guard_check_counts_drains_no_pass_has_applied_yet(
    env: SimEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = converged(env, 2)
    assert cli(env, "drain", a) == 0
    assert cli(env, "drain", b) == 1  # a is not out yet, but it will be: b would be the last
    assert "would leave 0 login nodes in service" in capsys.readouterr().err
    env.write_config(reconcile={"max_deregister_fraction": 0.4})
    assert cli(env, "undrain", a) == 0
    assert cli(env, "drain", a) == 1  # 0.4 x 2 registered: nothing may leave in an interval
    assert "lets none leave within reconcile.interval_seconds" in capsys.readouterr().err


def test_a_standby_head_refuses_to_drain(env: SimEnv, capsys: pytest.CaptureFixture[str]) -> None:
    from hpodlb.state import save_state

    a, _ = converged(env, 2)
    state = env.state()
    assert state.last_pass is not None
    state.last_pass.standby = "standby (controller: head2)"
    save_state(env.state_dir, state)
    assert cli(env, "drain", a) == 1
    err = capsys.readouterr().err
    assert "standby (controller: head2)" in err and "acting head" in err
    assert load_intents(env.state_dir).drain == {}


def test_a_lost_intents_file_keeps_drained_nodes_out_and_says_so(
    env: SimEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, c, d = converged(env, 4)
    assert cli(env, "drain", a, "--reason", "disk") == 0
    assert cli(env, "drain", b, "--reason", "bios") == 0
    env.run_pass()
    assert env.registered() == {c, d}
    intents_path(env.state_dir).unlink()

    outcome = env.run_pass()
    assert env.registered() == {c, d}  # not put back by accident
    assert not outcome.converged
    assert any("intents.json is gone" in e and a in e and b in e for e in outcome.errors)

    capsys.readouterr()
    assert cli(env, "undrain", a) == 0  # restores b's drain, forgets a's
    out = capsys.readouterr().out
    assert f"restored the drains of {b}" in out and f"{a} undrained" in out
    assert set(load_intents(env.state_dir).drain) == {b}
    assert load_intents(env.state_dir).drain[b].reason == "bios"
    back = env.run_pass()
    assert back.converged, back.errors
    assert env.registered() == {a, c, d}


def test_any_writer_of_a_lost_intents_file_keeps_the_drains(env: SimEnv) -> None:
    """Not only drain/undrain: a `keys trust`, or the daemon consuming one, writes the file too."""
    from hpodlb.intents import update_intents

    a, _, _ = converged(env, 3)
    assert cli(env, "drain", a, "--reason", "disk") == 0
    env.run_pass()
    intents_path(env.state_dir).unlink()
    update_intents(env.state_dir, lambda intents: None)  # what any other writer does
    assert load_intents(env.state_dir).drain[a].reason == "disk"
    outcome = env.run_pass()
    assert outcome.converged, outcome.errors
    assert a not in env.registered()


def test_a_drained_node_still_gets_its_keys_repaired_but_is_not_registered(env: SimEnv) -> None:
    a, _, _ = converged(env, 3)
    assert cli(env, "drain", a) == 0
    env.run_pass()
    node = env.cluster.nodes[a]
    node.replace("i-0replaced000000a")  # HyperPod replaced it during maintenance: new host keys
    env.list_nodes(env.listed)
    outcome = env.run_pass()
    assert [x.kind for x in outcome.applied] == [Kind.PUSH_KEYS]
    assert node.keyscan() == canonical(env)
    assert a not in env.registered()
    assert outcome.converged, outcome.errors


def test_drain_refuses_what_is_not_a_login_node_and_bad_reasons(
    env: SimEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    converged(env, 2)
    stranger = env.cluster.ip(99)
    assert cli(env, "drain", stranger) == 1
    assert f"{stranger} is not a login node" in capsys.readouterr().err
    for bad in ("two\nlines", "\x1b[31mred", "x" * 201, "  "):
        with pytest.raises(SystemExit) as exc:
            cli(env, "drain", env.listed[0], "--reason", bad)
        assert exc.value.code == 2
    with pytest.raises(SystemExit):
        cli(env, "drain", "not-an-ip")
    assert load_intents(env.state_dir).drain == {}


def test_users_of_a_node_hpodlb_cannot_vouch_for_are_not_told(
    env: SimEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    """Drain still records the intent, but sends nothing to a node presenting unknown keys."""
    a, _, _ = converged(env, 3)
    node = env.cluster.nodes[a]
    node.stop()
    node.new_host_keys()  # same instance, other keys: an impostor or a re-image
    node.start()
    before = logins(node)
    assert cli(env, "drain", a, "--reason", "suspicious") == 0
    out = capsys.readouterr().out
    assert "could not tell its users (wall): host-key:" in out
    assert logins(node) == before
    assert a in load_intents(env.state_dir).drain


def test_draining_again_changes_only_what_was_asked(
    env: SimEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    """`drain IP --wait N` on a drained node (to watch it) keeps its reason and its start, and
    tells nobody again; a new reason is recorded and told."""
    a, _, _ = converged(env, 3)
    node = env.cluster.nodes[a]
    assert cli(env, "drain", a, "--reason", "kernel 6.8") == 0
    first = load_intents(env.state_dir).drain[a]
    seen = logins(node)
    assert cli(env, "drain", a) == 0
    assert "is drained already (kernel 6.8): nothing changed" in capsys.readouterr().out
    assert load_intents(env.state_dir).drain[a] == first
    assert logins(node) == seen  # no second wall
    assert cli(env, "drain", a, "--reason", "kernel 6.9") == 0
    again = load_intents(env.state_dir).drain[a]
    assert (again.reason, again.requested_at) == ("kernel 6.9", first.requested_at)
    assert logins(node) == seen + 1  # told the new reason
    assert cli(env, "drain", a, "--force") == 0  # adding --force is recorded, nobody told again
    assert "now with --force" in capsys.readouterr().out
    assert load_intents(env.state_dir).drain[a].force
    assert load_intents(env.state_dir).drain[a].reason == "kernel 6.9"
    assert logins(node) == seen + 1


def test_an_unusable_intents_file_keeps_drains_as_last_known(
    env: SimEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Half-written, hostile or odd intents.json: no pass crashes (deep nesting made json recurse
    past Python's limit), the drained node stays out, and `drain` names the file in one line."""
    a, b, c, d = converged(env, 4)
    assert cli(env, "drain", a, "--reason", "disk") == 0
    env.run_pass()
    path = intents_path(env.state_dir)
    good = path.read_bytes()
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_bytes(good)
    bad: dict[str, Callable[[], object]] = {
        "half-written": lambda: path.write_bytes(good[: len(good) // 2]),
        "deeply nested": lambda: path.write_text('{"drain":' + "[" * 100_000 + "]" * 100_000 + "}"),
        "wrong types": lambda: path.write_text('{"drain": {"10.0.0.1": {"reason": 5}}}'),
        "over 1 MiB": lambda: path.write_text(" " * (2 << 20) + "{}"),
        "a FIFO": lambda: os.mkfifo(path),
        "a symlink": lambda: path.symlink_to(elsewhere),
    }
    for what, make in bad.items():
        path.unlink()
        make()
        outcome = env.run_pass()
        assert not outcome.crashed and not outcome.converged, what
        assert any(str(path) in e for e in outcome.errors), (what, outcome.errors)
        assert env.registered() == {b, c, d}, what
        assert cli(env, "drain", b) == 1, what
        said = [
            line for line in capsys.readouterr().err.splitlines() if line.startswith("hpodlb: ")
        ]
        assert len(said) == 1 and str(path) in said[0] and "fix or remove it" in said[0], said
    path.unlink()
    path.write_bytes(good)
    assert env.run_pass().converged
    assert env.registered() == {b, c, d}


def test_wait_does_not_call_a_node_out_of_a_group_no_pass_could_read(
    env: SimEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    """A target group no pass could read (just added, and not found; or a deleted state cache,
    then AWS unreachable): nothing is known of it, so the node is not "out of rotation"."""
    from hpodlb.drain import Drains

    a, b, _ = converged(env, 3)
    assert cli(env, "drain", a) == 0
    since = load_intents(env.state_dir).drain[a].requested_at
    env.arns = [env.arn, env.arn.rsplit("/", 1)[0] + "/0123456789abcdef"]
    env.write_config()
    outcome = env.run_pass()
    assert a not in env.registered()
    assert any("TargetGroupNotFound" in e for e in outcome.errors), outcome.errors
    out, why = Drains(env.config).rotation(a, since)
    assert not out and "could not read" in why, why
    capsys.readouterr()
    assert cli(env, "drain", b) == 0  # the group it can see allows it; of the other it says so
    said = capsys.readouterr().out
    assert "note: the last pass could not read" in said and "could not tell" not in said, said


def test_without_host_keys_drain_says_it_cannot_tell_or_count_and_waits_on_rotation(
    env: SimEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    a, _, _ = converged(env, 3)
    node = env.cluster.nodes[a]
    env.write_config(host_keys={"enabled": False})
    seen = logins(node)
    with passes(env):
        assert cli(env, "drain", a, "--wait", "60") == 0
    out = capsys.readouterr().out
    assert "could not tell its users (wall): host_keys.enabled = false" in out
    assert "sessions not counted (host_keys.enabled = false" in out
    assert f"{a}: out of rotation (its sessions are not counted" in out
    assert logins(node) == seen  # no login at all
    assert a not in env.registered()
    assert "host_keys.enabled = false" in env.state().nodes[a].sessions_error


def test_ctrl_c_during_wait_keeps_the_drain_and_says_so(env: SimEnv) -> None:
    import signal

    a, _, _ = converged(env, 3)
    # Into a pipe, as `| tee` would read it: Python buffers a pipe unless told otherwise, and
    # --wait's lines must arrive as they are said.
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    # As from a terminal: a suite run as a background job of a non-interactive shell (`./.ci/run &`)
    # ignores SIGINT, and an ignored signal stays ignored across exec (Python then leaves it so).
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hpodlb",
            "--config",
            str(env.config_path),
            "drain",
            a,
            "--wait",
            "120",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**environ, **env.aws.env()},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()  # the drain is recorded before it starts waiting
    while "left to wait" not in first and first:
        first = proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, (out, err)
    assert f"interrupted: {a} stays drained" in out and "Traceback" not in err, (out, err)
    assert a in load_intents(env.state_dir).drain


# -- issue 23: one "in service", and messages that say what is true -----------------------------


def hpodlb(env: SimEnv, *args: str) -> subprocess.CompletedProcess[str]:
    """The real `hpodlb` command, as an admin types it on the head node."""
    return run_hpodlb(*args, config=env.config_path)


@pytest.mark.parametrize("other", ["gone from the resource config", "unhealthy", "added by hand"])
def test_draining_the_last_node_in_service_is_refused_whatever_else_is_registered(
    env: SimEnv, other: str
) -> None:
    """Nodes A and B registered, B not in service (left the resource config and still inside the
    absence window, failing its health checks, or a target added by hand): `drain A` would
    leave no login node in service, so it is refused, saying how many are in service and why B
    is not; nothing is recorded."""
    if other == "added by hand":
        (a,) = converged(env, 1)
        b = env.cluster.ip(50)
        env.aws.client("elbv2").register_targets(
            TargetGroupArn=env.arn, Targets=[{"Id": b, "Port": env.tg_port}]
        )
    else:
        a, b = converged(env, 2)
    if other == "gone from the resource config":
        env.list_nodes([a])
    with nlb_health({b: FAILING} if other == "unhealthy" else {}):
        env.run_pass()
    assert env.registered() == {a, b}

    done = hpodlb(env, "drain", a)
    assert done.returncode == 1, done.stdout
    (line,) = done.stderr.splitlines()
    assert f"draining {a} would leave 0 login nodes in service" in line, line
    assert "min_in_service = 1" in line and f"in service now: {a};" in line
    why = {"unhealthy": "unhealthy"}.get(other, "not a login node of the resource config")
    assert f"registered but not in service: {b} ({why})" in line and "--force" in line
    assert load_intents(env.state_dir).drain == {}


def test_a_forced_drain_of_the_last_node_says_so_and_the_dead_target_waits_for_a_live_one(
    env: SimEnv,
) -> None:
    """The A+B case of issue 23 end to end: with --force, A's drain is recorded and its users are
    told no other login node is in service (not "the other login nodes"); A leaves; B, gone from
    the resource config, is held by min_in_service (nothing is in service) instead of emptying
    the group; after `undrain A`, A is back and B leaves."""
    a, b = converged(env, 2)
    env.list_nodes([a])
    env.run_pass()
    node = env.cluster.nodes[a]
    with sessions(env, node, 1) as held:
        done = hpodlb(env, "drain", a, "--force", "--reason", "bios")
        assert done.returncode == 0, done.stderr
        assert "past the guards (--force)" in done.stdout
        assert "No other login node is in service now" in done.stdout
        assert "go to the other login nodes" not in done.stdout
        (told,) = held.output()
    assert b"Nootherloginnodeisinservicenow" in told and b"gototheother" not in told

    outcome = run_pass_later(env, 60)  # past the absence window of B
    assert (Kind.DEREGISTER, a) in [(x.kind, x.ip) for x in outcome.applied]
    assert env.registered() == {b}
    (held_b,) = env.state().last_pass.held  # type: ignore[union-attr]
    assert held_b.startswith(f"deregister {b}") and "held by min_in_service" in held_b

    assert hpodlb(env, "undrain", a).returncode == 0
    run_pass_later(env, 120)  # A joins (B's leave was budgeted on the group as the pass began)
    run_pass_later(env, 180)
    assert env.registered() == {a}


def test_drain_says_what_is_true_with_and_without_a_daemon(env: SimEnv, tmp_path: Path) -> None:
    """No daemon holds the lock: `drain` says nothing changes until a pass runs (no "within a
    second"). Host keys off and a daemon running: it names the daemon's pid, says the node's
    host keys are not kept in step, and the daemon takes the node out; once the window's
    deregistration budget is spent, a drain says it waits for the window to end."""
    a, b, c, _ = converged(env, 4)
    alone = hpodlb(env, "drain", a)
    assert alone.returncode == 0, alone.stderr
    assert "no hpodlb daemon runs on this head (nothing holds" in alone.stdout, alone.stdout
    assert "nothing changes until a pass runs" in alone.stdout
    assert "within a second" not in alone.stdout
    assert "each pass still keeps its host keys in step" in alone.stdout
    assert "Its users were told (wall): New logins go to the other login nodes" in alone.stdout

    env.write_config(host_keys={"enabled": False}, reconcile={"interval_seconds": 300})
    started: list[Daemon] = []
    try:
        daemon = spawn_daemon(tmp_path, started, env.config_path, dict(os.environ))
        daemon.wait_event("pass_finished", timeout=60)  # a leaves: 1 of the window's 2
        done = hpodlb(env, "drain", b)
        assert done.returncode == 0, done.stderr
        assert f"the daemon (pid {daemon.proc.pid}) applies it at its next pass" in done.stdout
        assert "its host keys are not kept in step" in done.stdout
        assert "keeps its host keys in step" not in done.stdout
        deadline = time.monotonic() + 30
        while b in env.registered():
            assert time.monotonic() < deadline, daemon.log.read_text()[-2000:]
            time.sleep(0.1)
        daemon.wait_event("pass_finished", timeout=30, count=2)
        spent = hpodlb(env, "drain", c)
        assert spent.returncode == 0, spent.stderr
        assert "note: 2 targets left" in spent.stdout, spent.stdout
        assert "it leaves at the first pass after that" in spent.stdout
        held = daemon.wait_event("held_back", timeout=30)
        assert (held["ip"], held["guard"]) == (c, "max_deregister_fraction")
    finally:
        stop_daemons(started)
