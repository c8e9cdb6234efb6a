"""`hpodlb run` as a real process: systemd notifications, file trigger, reload, stop, one instance."""

from __future__ import annotations

import datetime as dt
import fcntl
import glob
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import hpodlb
from hpodlb.keystore import KeyStore, generate
from sim.aws import FakeAws
from tests.support.daemon import Daemon, NotifySocket, spawn_daemon, stop_daemons
from tests.support.data import FIGURES


@pytest.fixture
def start_daemon(aws: FakeAws, tmp_path: Path, fresh_env: None) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(
        config: Path,
        *,
        watchdog_usec: int = 1_000_000,
        journal: bool = False,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> Daemon:
        full_env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("HPODLB_", "AWS_", "NOTIFY", "WATCHDOG", "JOURNAL"))
        }
        full_env.update(aws.env(), WATCHDOG_USEC=str(watchdog_usec))
        full_env.update(env or {})
        return spawn_daemon(tmp_path, started, config, full_env, args, journal=journal)

    yield start
    stop_daemons(started)


def _config(
    write_config: Callable[..., Path], aws: FakeAws, **sections: dict[str, Any]
) -> tuple[Path, str]:
    arn = aws.create_login_nlb(name=f"t{uuid.uuid4().hex[:12]}")
    reconcile = {"interval_seconds": 60, **sections.pop("reconcile", {})}
    return write_config([{"arn": arn, "port": 22}], reconcile=reconcile, **sections), arn


def _wait_registered(aws: FakeAws, arn: str, ip: str, daemon: Daemon, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (ip, 22) not in aws.targets(arn):
        assert time.monotonic() < deadline, (
            f"{ip} not registered in {timeout} s:\n{daemon.log.read_text()[-2000:]}"
        )
        time.sleep(0.1)


def _add_login_node(cluster_dir: Path, ip: str, instance_id: str = "i-0new000000000004") -> None:
    rc = cluster_dir / "resource_config.json"
    data = json.loads(rc.read_text())
    data["InstanceGroups"][1]["Instances"].append(
        {"CustomerIpAddress": ip, "InstanceId": instance_id, "InstanceName": f"login-{instance_id}"}
    )
    tmp = rc.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(rc)


def test_daemon_lifecycle(
    start_daemon: Callable[..., Daemon],
    write_config: Callable[..., Path],
    aws: FakeAws,
    cluster_dir: Path,
) -> None:
    """READY after the first pass, STATUS and WATCHDOG after; a file change is acted on at once;
    a broken config on SIGHUP is refused; a second instance refuses; SIGTERM exits 0."""
    config, arn = _config(write_config, aws)
    daemon = start_daemon(config)
    notify = daemon.notify
    notify.wait_for("READY=1")
    assert len(aws.targets(arn)) == 3
    status = notify.wait_for("STATUS=")[0][1]
    assert status.startswith(
        "STATUS=0/3 login nodes healthy (3 more registered, not healthy yet), 0 pending"
    )
    notify.wait_for("WATCHDOG=1", count=3)

    # The resource config changes: the node is registered long before the 60 s interval (the
    # first pass was just now: within 30 s of the change, only the change can have woken it).
    changed = time.monotonic()
    _add_login_node(cluster_dir, "10.1.74.4")
    deadline = changed + 30
    while ("10.1.74.4", 22) not in aws.targets(arn):
        assert time.monotonic() < deadline, daemon.log.read_text()[-2000:]
        time.sleep(0.1)
    daemon.wait_event("resource_config_changed")

    # A broken config on SIGHUP is refused; the daemon keeps going on the old one.
    good = config.read_text()
    config.write_text(good.replace("interval_seconds = 60", "interval_seconds = -1"))
    daemon.proc.send_signal(signal.SIGHUP)
    refused = daemon.wait_event("reload_refused")
    assert "reconcile.interval_seconds" in refused["error"]
    notify.wait_for("RELOADING=1")
    assert any(f.startswith("MONOTONIC_USEC=") for _, f in notify.messages)
    assert daemon.proc.poll() is None
    # A good one is taken, and a pass follows at once.
    config.write_text(good.replace("interval_seconds = 60", "interval_seconds = 45"))
    daemon.proc.send_signal(signal.SIGHUP)
    assert daemon.wait_event("config_reloaded")["interval_seconds"] == 45

    # One instance per head node: `run` and `once` both refuse, naming the holder's pid.
    second = start_daemon(config)
    assert second.proc.wait(30) == 1
    assert f"pid {daemon.proc.pid}" in second.log.read_text()
    once = subprocess.run(
        [sys.executable, "-m", "hpodlb", "once", "--config", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, **aws.env()},
        check=False,
    )
    assert once.returncode == 1
    assert f"another hpodlb (pid {daemon.proc.pid}) holds" in once.stderr

    stop = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(15) == 0
    assert time.monotonic() - stop < 10
    notify.wait_for("STOPPING=1")
    assert daemon.wait_event("daemon_stopped")


def test_journal_lines_carry_priority_and_are_json(
    start_daemon: Callable[..., Daemon],
    write_config: Callable[..., Path],
    aws: FakeAws,
    cluster_dir: Path,
) -> None:
    """With stdout on the journal, every line is `<N>` + one JSON event, N matching the level; the
    start event names the version that runs."""
    config, _ = _config(write_config, aws)
    (cluster_dir / "resource_config.json").write_text("{")  # an error to log at priority 3
    daemon = start_daemon(config, journal=True)
    daemon.notify.wait_for("READY=1")
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(15) == 0
    lines = daemon.log.read_text().splitlines()
    assert lines
    levels = {"error": "<3>", "warning": "<4>", "info": "<6>", "debug": "<7>"}
    for line in lines:
        assert line[:3] in levels.values(), line
        event = json.loads(line[3:])
        assert levels[event["level"]] == line[:3]
    assert any(line.startswith("<3>") and "inventory_invalid" in line for line in lines)
    started = [json.loads(line[3:]) for line in lines if '"daemon_started"' in line]
    assert [e["version"] for e in started] == [hpodlb.__version__]


def test_a_pass_waiting_on_a_silent_node_keeps_the_watchdog_fed(
    start_daemon: Callable[..., Daemon],
    write_config: Callable[..., Path],
    aws: FakeAws,
    cluster_dir: Path,
    tmp_path: Path,
) -> None:
    """A pass waiting on a peer that never speaks is advancing (the wait is bounded by the node's
    deadline): WATCHDOG pings go on through it, past half the watchdog interval, and the node
    fails alone. (Pings used to stop, so that a dead AZ's slow passes made systemd kill us.)"""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    store = tmp_path / "keys"
    KeyStore(store, ("ed25519",)).install({"ed25519": generate("ed25519")}, keep_previous=False)
    rc = cluster_dir / "resource_config.json"
    data = json.loads(rc.read_text())
    data["InstanceGroups"][1]["Instances"] = [
        {"CustomerIpAddress": "127.0.0.1", "InstanceId": "i-0silent0000000001"}
    ]
    rc.write_text(json.dumps(data))
    config, _ = _config(
        write_config,
        aws,
        cluster={"allowed_cidrs": ["127.0.0.0/8"]},
        ssh={"port": port, "connect_timeout_seconds": 4},
        host_keys={
            "enabled": True,
            "store": str(store),
            "types": ["ed25519"],
            "adopt_from_first_node": False,
        },
    )
    try:
        daemon = start_daemon(config, watchdog_usec=1_000_000)
        ((ready_at, _),) = daemon.notify.wait_for("READY=1", timeout=30)
        assert ready_at - daemon.spawned > 3.5  # the first pass waited out the 4 s handshake
        failed = daemon.wait_event("node_failed")
        assert failed["ip"] == "127.0.0.1"
        assert failed["step"] == "handshake"
        pings = sorted(t for t, _ in daemon.notify.fields("WATCHDOG=1") if t < ready_at)
        # Before READY=1, each ping also extends systemd's start timeout by the watchdog interval.
        extends = [(t, f) for t, f in daemon.notify.fields("EXTEND_TIMEOUT_USEC=") if t < ready_at]
        assert {f for _, f in extends} == {"EXTEND_TIMEOUT_USEC=1000000"}, extends
        assert len(extends) >= len(pings) - 1, (extends, pings)
        assert not [
            t for t, _ in daemon.notify.fields("EXTEND_TIMEOUT_USEC=") if t > ready_at + 0.5
        ]
        # The main loop pings every 0.5 s (its tick) while the pass beats; before, pings stopped
        # for the whole 4 s wait. The bounds leave a busy 2-core CI room for a few late ticks.
        assert pings and pings[-1] > ready_at - 2.5, pings
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) < 3.0, gaps
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(15) == 0
    finally:
        listener.close()


def test_a_pass_stuck_in_a_call_stops_the_watchdog(
    start_daemon: Callable[..., Daemon],
    write_config: Callable[..., Path],
    aws: FakeAws,
) -> None:
    """An AWS endpoint that accepts and never answers holds the pass in one call (up to botocore's
    15 s read timeout): the pass does not advance, so WATCHDOG pings stop within half the watchdog
    interval, and systemd would restart us; SIGTERM still ends the daemon."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(listener.accept()[0]), daemon=True).start()
    config, _ = _config(write_config, aws)
    try:
        daemon = start_daemon(
            config,
            watchdog_usec=1_000_000,
            env={
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{listener.getsockname()[1]}",
                "AWS_MAX_ATTEMPTS": "1",
            },
        )
        daemon.wait_event("daemon_started")
        deadline = time.monotonic() + 10
        while not held and time.monotonic() < deadline:
            time.sleep(0.1)
        assert held, "the pass never called AWS"
        stuck_at = time.monotonic()
        time.sleep(4)
        late = [t for t, _ in daemon.notify.fields("WATCHDOG=1") if t > stuck_at + 1.0]
        assert late == [], late
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(15) == 0
    finally:
        listener.close()
        for conn in held:
            conn.close()


# -- the daemon at its edges (issue #13) ------------------------------------------------------------


def _libfaketime() -> str:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not found:
        pytest.skip("needs libfaketime (Debian's faketime package, which ./dev installs)")
    return found[0]


def _passes(notify: NotifySocket) -> list[float]:
    """When each pass's READY=1/STATUS= arrived (the first pass sends READY=1 with its STATUS)."""
    return [t for t, f in notify.fields("STATUS=") if "login nodes healthy" in f]


def _late_pings(notify: NotifySocket, allowed: float) -> list[float]:
    """How long after the last finished pass each WATCHDOG=1 came, for those that came later than
    `allowed` (plus a second for delivery and this test's own scheduling on a busy machine)."""
    passes = _passes(notify)
    late = []
    for ping, _ in notify.fields("WATCHDOG=1"):
        since = ping - max((t for t in passes if t <= ping), default=ping)
        if since >= allowed + 1.0:
            late.append(since)
    return late


def _timestamps(daemon: Daemon, event: str) -> list[dt.datetime]:
    return [
        dt.datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00"))
        for e in daemon.events()
        if e["event"] == event
    ]


def test_wall_clock_steps_change_neither_the_schedule_nor_the_watchdog(
    start_daemon: Callable[..., Daemon],
    write_config: Callable[..., Path],
    aws: FakeAws,
    tmp_path: Path,
) -> None:
    """After the wall clock steps back an hour, and forward again, passes go on every
    interval_seconds, and each WATCHDOG=1 follows a pass that finished on schedule."""
    spec = tmp_path / "faketime"
    spec.write_text("+0\n")
    clock = {
        "LD_PRELOAD": _libfaketime(),
        "FAKETIME_TIMESTAMP_FILE": str(spec),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
    interval, watchdog = 2.0, 2.0
    config, _ = _config(write_config, aws, reconcile={"interval_seconds": interval})
    daemon = start_daemon(config, watchdog_usec=int(watchdog * 1e6), env=clock)
    notify = daemon.notify
    notify.wait_for("READY=1")
    while len(_passes(notify)) < 2:
        time.sleep(0.1)

    spec.write_text("-1h\n")  # settimeofday as NTP or an admin would do it; CLOCK_MONOTONIC goes on
    stepped = time.monotonic()
    before = len(_passes(notify))
    while len(_passes(notify)) < before + 3 and time.monotonic() < stepped + 8 * interval:
        time.sleep(0.1)
    after = len(_passes(notify)) - before
    FIGURES["passes after the wall clock stepped back 1 h (interval 2 s)"] = (
        f"{after} in {time.monotonic() - stepped:.1f} s"
    )
    late = _late_pings(notify, interval + watchdog / 2)
    assert (after, late) == (3, []), (
        f"{after} passes in {time.monotonic() - stepped:.0f} s after the clock stepped back; "
        f"WATCHDOG=1 sent up to {max(late, default=0):.1f} s after the last pass finished"
    )
    finished = _timestamps(daemon, "pass_finished")
    assert finished[-1] < finished[0] - dt.timedelta(minutes=50)  # the daemon's wall clock did step

    spec.write_text("+0\n")
    before = len(_passes(notify))
    deadline = time.monotonic() + 8 * interval
    while len(_passes(notify)) < before + 3:
        assert time.monotonic() < deadline, "passes stopped after the clock stepped forward"
        time.sleep(0.1)
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(15) == 0

    assert _late_pings(notify, interval + watchdog / 2) == []
    assert len([t for t, _ in notify.fields("WATCHDOG=1") if t > stepped]) >= 4


def test_sighup_during_a_pass_blocks_neither_reload_nor_stop(
    start_daemon: Callable[..., Daemon],
    write_config: Callable[..., Path],
    aws: FakeAws,
    cluster_dir: Path,
    tmp_path: Path,
) -> None:
    """While a pass hangs on a silent node, SIGHUP is answered at once (RELOADING=1, READY=1),
    and a SIGTERM one second later ends the daemon within the 8 s stop grace."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    store = tmp_path / "keys"
    KeyStore(store, ("ed25519",)).install({"ed25519": generate("ed25519")}, keep_previous=False)
    rc = cluster_dir / "resource_config.json"
    data = json.loads(rc.read_text())
    data["InstanceGroups"][1]["Instances"] = []
    rc.write_text(json.dumps(data))
    config, _ = _config(
        write_config,
        aws,
        cluster={"allowed_cidrs": ["127.0.0.0/8"]},
        ssh={"port": listener.getsockname()[1], "connect_timeout_seconds": 60},
        host_keys={
            "enabled": True,
            "store": str(store),
            "types": ["ed25519"],
            "adopt_from_first_node": False,
        },
    )
    try:
        daemon = start_daemon(config, watchdog_usec=0)
        notify = daemon.notify
        notify.wait_for("READY=1")
        _add_login_node(
            cluster_dir, "127.0.0.1", "i-0silent0000000001"
        )  # the next pass hangs on it
        daemon.wait_event("resource_config_changed")
        time.sleep(1)

        config.write_text(
            config.read_text().replace("interval_seconds = 60", "interval_seconds = 45")
        )
        hup = time.monotonic()
        daemon.proc.send_signal(signal.SIGHUP)
        assert daemon.wait_event("config_reloaded", timeout=5)["interval_seconds"] == 45
        ((reloading, _),) = notify.wait_for("RELOADING=1", timeout=5)
        ready = notify.wait_for("READY=1", count=2, timeout=5)[-1][0]
        assert hup < reloading <= ready < hup + 5
        FIGURES["SIGHUP to READY=1 during a hung pass"] = f"{ready - hup:.2f} s"
        assert not daemon.events_named("node_failed")  # the pass was still running

        time.sleep(max(0.0, hup + 1 - time.monotonic()))
        term = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(15) == 0
        stopped = time.monotonic() - term
        assert stopped < 10, f"stopped {stopped:.1f} s after SIGTERM"
        assert daemon.events_named("pass_abandoned")
        FIGURES["stop after SIGHUP+SIGTERM during a hung pass"] = f"{stopped:.1f} s"
    finally:
        listener.close()


def test_reload_that_moves_the_state_dir_moves_the_lock(
    start_daemon: Callable[..., Daemon],
    write_config: Callable[..., Path],
    aws: FakeAws,
    cluster_dir: Path,
    tmp_path: Path,
) -> None:
    """After a reload that moves state.dir, `hpodlb once` with the new config is refused, the old
    dir's lock is let go, and a reload to a dir someone else has locked is refused."""
    config, _ = _config(write_config, aws, state={"dir": str(tmp_path / "state-a")})
    daemon = start_daemon(config)
    daemon.notify.wait_for("READY=1")

    moved = tmp_path / "state-b"
    config.write_text(config.read_text().replace(str(tmp_path / "state-a"), str(moved)))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_event("config_reloaded")
    daemon.wait_event("pass_finished", count=2)  # a reload wants a pass at once
    assert (moved / "state.json").exists()
    once = subprocess.run(
        [sys.executable, "-m", "hpodlb", "once", "--config", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, **aws.env()},
        check=False,
    )
    assert once.returncode == 1, once.stdout + once.stderr
    assert f"another hpodlb (pid {daemon.proc.pid}) holds {moved / 'hpodlb.lock'}" in once.stderr
    with (tmp_path / "state-a" / "hpodlb.lock").open("rb") as old:
        fcntl.flock(old, fcntl.LOCK_EX | fcntl.LOCK_NB)  # let go: nothing acts on that dir now

    taken = tmp_path / "state-c"
    taken.mkdir(mode=0o700)
    with (taken / "hpodlb.lock").open("wb") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        config.write_text(config.read_text().replace(str(moved), str(taken)))
        daemon.proc.send_signal(signal.SIGHUP)
        refused = daemon.wait_event("reload_refused")
        assert str(taken / "hpodlb.lock") in refused["error"]
    passes = len(daemon.events_named("pass_finished"))
    (moved / "state.json").unlink()
    _add_login_node(cluster_dir, "10.1.74.9")
    daemon.wait_event("pass_finished", count=passes + 1)
    assert (moved / "state.json").exists()  # still the dir in force
    assert not (taken / "state.json").exists()
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(15) == 0


def test_a_change_seen_while_a_pass_ends_is_never_lost(
    start_daemon: Callable[..., Daemon],
    write_config: Callable[..., Path],
    aws: FakeAws,
    cluster_dir: Path,
) -> None:
    """A resource-config change seen while the previous pass is still finishing (its STATUS=
    held up by a busy systemd) leads to a pass that reads it, not one an interval later."""
    config, arn = _config(write_config, aws)  # interval 60 s
    daemon = start_daemon(config, watchdog_usec=0)
    notify = daemon.notify
    notify.wait_for("READY=1")
    notify.stall()
    _add_login_node(cluster_dir, "10.1.74.4", "i-0new000000000004")
    _wait_registered(aws, arn, "10.1.74.4", daemon)  # that pass now waits to send its STATUS=
    time.sleep(0.5)
    _add_login_node(cluster_dir, "10.1.74.5", "i-0new000000000005")
    daemon.wait_event("resource_config_changed", count=2)
    time.sleep(1.5)  # whatever the daemon does about it while the pass is still finishing
    notify.resume()
    _wait_registered(aws, arn, "10.1.74.5", daemon, timeout=15)
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(15) == 0


def test_a_drain_and_an_undrain_are_acted_on_at_once(
    start_daemon: Callable[..., Daemon],
    write_config: Callable[..., Path],
    aws: FakeAws,
) -> None:
    """`hpodlb drain` writes intents.json; the running daemon sees it within a second and passes,
    instead of an interval (60 s) later; STATUS= says the node is drained; undrain likewise."""
    config, arn = _config(write_config, aws)
    daemon = start_daemon(config, watchdog_usec=0)
    notify = daemon.notify
    notify.wait_for("READY=1")
    ips = sorted(ip for ip, _ in aws.targets(arn))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HPODLB_", "AWS_"))}
    env.update(aws.env())
    drain = subprocess.run(
        [
            sys.executable,
            "-m",
            "hpodlb",
            "--config",
            str(config),
            "drain",
            ips[0],
            "--reason",
            "firmware",
        ],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert drain.returncode == 0, drain.stderr
    assert "could not tell its users" in drain.stdout  # host keys off here: nobody to vouch for
    deadline = time.monotonic() + 10
    while (ips[0], 22) in aws.targets(arn):
        assert time.monotonic() < deadline, daemon.log.read_text()[-2000:]
        time.sleep(0.1)
    daemon.wait_event("intents_changed")
    deadline = time.monotonic() + 10
    while not any(", 1 drained" in line for _, line in notify.fields("STATUS=")):
        assert time.monotonic() < deadline, notify.messages
        time.sleep(0.1)
    undrain = subprocess.run(
        [sys.executable, "-m", "hpodlb", "--config", str(config), "undrain", ips[0]],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert undrain.returncode == 0, undrain.stderr
    _wait_registered(aws, arn, ips[0], daemon)
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(15) == 0


def test_verbose_logs_never_carry_aws_credentials(
    start_daemon: Callable[..., Daemon],
    write_config: Callable[..., Path],
    aws: FakeAws,
) -> None:
    """With -v, no line of the daemon's output holds the access key id, secret or session token."""
    marker = uuid.uuid4().hex
    secrets = {
        "AWS_ACCESS_KEY_ID": f"AKIA{marker[:16].upper()}",
        "AWS_SECRET_ACCESS_KEY": f"secret{marker}",
        "AWS_SESSION_TOKEN": f"token{marker}",
    }
    config, arn = _config(write_config, aws)
    daemon = start_daemon(config, args=["-v"], env=secrets)
    daemon.notify.wait_for("READY=1")
    assert len(aws.targets(arn)) == 3  # it did sign and send its requests
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(15) == 0
    lines = daemon.log.read_text().splitlines()
    assert any('"level": "debug"' in line for line in lines)  # -v still means hpodlb's debug events
    for line in lines:
        for name, value in secrets.items():
            assert value not in line, f"{name} in: {line[:200]}"


def _library_lines(daemon: Daemon) -> list[dict[str, Any]]:
    """The events a library (not hpodlb) logged through the daemon's renderer."""
    return [e for e in daemon.events() if not str(e.get("logger", "")).startswith("hpodlb")]


def test_libraries_log_warnings_only_unless_verbose(
    start_daemon: Callable[..., Daemon],
    write_config: Callable[..., Path],
    aws: FakeAws,
) -> None:
    """APScheduler's two lines per interval ("Running job ...", "... executed successfully", at
    info) would be 5,760 journal lines a day at the default interval: without -v, a library's
    line reaches the journal only at warning or above, over passes the interval job asked for;
    with -v its info lines are shown too, never its debug output (botocore's holds signed
    requests)."""
    config, _ = _config(write_config, aws, reconcile={"interval_seconds": 1})
    quiet = start_daemon(config)
    quiet.wait_event("pass_finished", count=4)  # the start's pass, then the interval job's
    quiet.proc.send_signal(signal.SIGTERM)
    assert quiet.proc.wait(15) == 0
    chatter = [e for e in _library_lines(quiet) if e["level"] not in ("warning", "error")]
    assert chatter == []
    assert "Running job" not in quiet.log.read_text()

    verbose = start_daemon(config, args=["-v"])
    verbose.wait_event("pass_finished", count=3)
    verbose.proc.send_signal(signal.SIGTERM)
    assert verbose.proc.wait(15) == 0
    shown = _library_lines(verbose)
    assert any(e["logger"].startswith("apscheduler") and e["level"] == "info" for e in shown)
    assert not [e for e in shown if e["level"] == "debug"]


def _output_on_a_terminal(argv: Sequence[str], env: dict[str, str], until: bytes) -> bytes:
    """What `argv` writes with stdout and stderr on a pseudo-terminal (as in an admin's shell),
    up to `until` and then to its exit after a SIGTERM."""
    import pty
    import select

    main, sub = pty.openpty()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=sub, stderr=sub, env=env)
    os.close(sub)
    out, deadline, stopped = b"", time.monotonic() + 30, False
    try:
        while True:
            if not stopped and until in out:
                proc.send_signal(signal.SIGTERM)
                stopped = True
            assert time.monotonic() < deadline, out[-2000:]
            if not select.select([main], [], [], 0.2)[0]:
                continue
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the terminal's last writer has gone
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(main)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return out


def test_no_color_turns_colour_off_on_a_terminal(
    write_config: Callable[..., Path], aws: FakeAws, fresh_env: None
) -> None:
    """On a terminal the log is the readable console, in colour; with NO_COLOR set to anything
    but the empty string (no-color.org), the same console without an escape sequence."""
    config, _ = _config(write_config, aws)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HPODLB_", "AWS_", "NOTIFY", "WATCHDOG", "JOURNAL", "NO_COLOR"))
    }
    env.update(aws.env())
    argv = [sys.executable, "-m", "hpodlb", "run", "--config", str(config)]
    escape = b"\x1b["
    for no_color, coloured in ((None, True), ("", True), ("1", False), ("false", False)):
        run_env = env if no_color is None else {**env, "NO_COLOR": no_color}
        out = _output_on_a_terminal(argv, run_env, until=b"daemon_started")
        assert b"daemon_started" in out and not out.lstrip().startswith(b"{"), out[:500]
        assert (escape in out) is coloured, (no_color, out[:500])
