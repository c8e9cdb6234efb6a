"""`hpodlb run` as a real process: systemd notifications, file trigger, reload, stop, one instance."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hpodlb.keystore import KeyStore, generate
from sim.aws import FakeAws, moto_server


@pytest.fixture(scope="module")
def aws() -> Iterator[FakeAws]:
    with moto_server() as fake:
        yield fake


class NotifySocket:
    """Stands in for systemd's notify socket: records every datagram with its arrival time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            for field in data.decode().split("\n"):
                self.messages.append((time.monotonic(), field))

    def fields(self, prefix: str) -> list[tuple[float, str]]:
        return [(t, f) for t, f in self.messages if f.startswith(prefix)]

    def wait_for(self, prefix: str, count: int = 1, timeout: float = 30) -> list[tuple[float, str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.fields(prefix)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"no {count}x {prefix!r} within {timeout}s; got {self.messages}")

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


class Daemon:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path, notify: NotifySocket) -> None:
        self.proc = proc
        self.log = log
        self.notify = notify
        self.spawned = time.monotonic()

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text().splitlines():
            text = line[3:] if line.startswith("<") and line[2] == ">" else line
            if text.startswith("{"):
                out.append(json.loads(text))
        return out

    def wait_event(self, name: str, timeout: float = 30, count: int = 1) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.events() if e["event"] == name]
            if len(found) >= count:
                return found[count - 1]
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.1)
        raise AssertionError(f"no {name} event within {timeout}s:\n{self.log.read_text()[-3000:]}")


@pytest.fixture
def start_daemon(aws: FakeAws, tmp_path: Path, fresh_env: None) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(config: Path, *, watchdog_usec: int = 1_000_000, journal: bool = False) -> Daemon:
        n = len(started)
        notify = NotifySocket(tmp_path / f"notify{n}.sock")
        log = tmp_path / f"daemon{n}.log"
        out = log.open("wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HPODLB_", "AWS_", "NOTIFY", "WATCHDOG", "JOURNAL"))}
        env.update(aws.env(), NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC=str(watchdog_usec))
        if journal:
            st = os.fstat(out.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        proc = subprocess.Popen([sys.executable, "-m", "hpodlb", "run", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
        out.close()
        daemon = Daemon(proc, log, notify)
        started.append(daemon)
        return daemon

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
        d.notify.close()


def _config(write_config: Callable[..., Path], aws: FakeAws, **sections: dict[str, Any]) -> tuple[Path, str]:
    arn = aws.create_login_nlb(name=f"t{uuid.uuid4().hex[:12]}")
    reconcile = {"interval_seconds": 60, **sections.pop("reconcile", {})}
    return write_config([{"arn": arn, "port": 22}], reconcile=reconcile, **sections), arn


def _add_login_node(cluster_dir: Path, ip: str) -> None:
    rc = cluster_dir / "resource_config.json"
    data = json.loads(rc.read_text())
    data["InstanceGroups"][1]["Instances"].append(
        {"CustomerIpAddress": ip, "InstanceId": "i-0new000000000004", "InstanceName": "login-group-4"})
    tmp = rc.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(rc)


def test_daemon_lifecycle(
    start_daemon: Callable[..., Daemon], write_config: Callable[..., Path], aws: FakeAws, cluster_dir: Path
) -> None:
    """READY after the first pass, STATUS and WATCHDOG after; a file change is acted on at once;
    a broken config on SIGHUP is refused; a second instance refuses; SIGTERM exits 0."""
    config, arn = _config(write_config, aws)
    daemon = start_daemon(config)
    notify = daemon.notify
    notify.wait_for("READY=1")
    assert len(aws.targets(arn)) == 3
    status = notify.wait_for("STATUS=")[0][1]
    assert status.startswith("STATUS=3/3 login nodes in service, 0 pending")
    notify.wait_for("WATCHDOG=1", count=3)

    # The resource config changes: the node is registered long before the 60 s interval.
    changed = time.monotonic()
    _add_login_node(cluster_dir, "10.1.74.4")
    deadline = changed + 10
    while ("10.1.74.4", 22) not in aws.targets(arn):
        assert time.monotonic() < deadline, daemon.log.read_text()[-2000:]
        time.sleep(0.1)
    assert time.monotonic() - changed < 5
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
    once = subprocess.run([sys.executable, "-m", "hpodlb", "once", "--config", str(config)],
                          capture_output=True, text=True, env={**os.environ, **aws.env()}, check=False)
    assert once.returncode == 1
    assert f"another hpodlb (pid {daemon.proc.pid}) holds" in once.stderr

    stop = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(15) == 0
    assert time.monotonic() - stop < 10
    notify.wait_for("STOPPING=1")
    assert daemon.wait_event("daemon_stopped")


def test_journal_lines_carry_priority_and_are_json(
    start_daemon: Callable[..., Daemon], write_config: Callable[..., Path], aws: FakeAws, cluster_dir: Path
) -> None:
    """With stdout on the journal, every line is `<N>` + one JSON event, N matching the level."""
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


def test_a_silent_node_stops_the_watchdog_but_not_the_daemon(
    start_daemon: Callable[..., Daemon], write_config: Callable[..., Path], aws: FakeAws,
    cluster_dir: Path, tmp_path: Path,
) -> None:
    """A pass stuck on a peer that never speaks stops WATCHDOG pings, and is bounded by timeouts."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    store = tmp_path / "keys"
    KeyStore(store, ("ed25519",)).install({"ed25519": generate("ed25519")}, keep_previous=False)
    rc = cluster_dir / "resource_config.json"
    data = json.loads(rc.read_text())
    data["InstanceGroups"][1]["Instances"] = [
        {"CustomerIpAddress": "127.0.0.1", "InstanceId": "i-0silent0000000001"}]
    rc.write_text(json.dumps(data))
    config, _ = _config(
        write_config, aws,
        cluster={"allowed_cidrs": ["127.0.0.0/8"]},
        ssh={"port": port, "connect_timeout_seconds": 4},
        host_keys={"enabled": True, "store": str(store), "types": ["ed25519"], "adopt_from_first_node": False},
    )
    try:
        daemon = start_daemon(config, watchdog_usec=1_000_000)
        ((ready_at, _),) = daemon.notify.wait_for("READY=1", timeout=30)
        assert ready_at - daemon.spawned > 3.5  # the first pass waited out the 4 s handshake
        pings = [t for t, _ in daemon.notify.fields("WATCHDOG=1")]
        # Pings stop once the pass has run for half the watchdog interval (0.5 s) and while it hangs.
        assert not [t for t in pings if daemon.spawned + 2.5 < t < ready_at - 0.1], pings
        failed = daemon.wait_event("node_failed")
        assert failed["ip"] == "127.0.0.1"
        assert failed["step"] == "handshake"
        daemon.notify.wait_for("WATCHDOG=1", count=len(pings) + 2)  # pings resume after the pass
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(15) == 0
    finally:
        listener.close()
