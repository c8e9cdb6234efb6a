"""`hpodlb run` as a process, with a stand-in for systemd's notify socket."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.support.slurm import as_host

# SO_TIMESTAMPNS (asm-generic/socket.h; Python's socket module does not name it).
SO_TIMESTAMPNS = 35


def _sent_at(ancillary: list[tuple[int, int, bytes]]) -> float:
    """When the kernel queued the datagram (the daemon's send), on this process's monotonic clock:
    not when the reader thread got to it, which a starved CPU delays."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
            sec, nsec = struct.unpack("qq", data[:16])
            return float(sec + nsec / 1e9) - (time.time() - time.monotonic())
    return time.monotonic()


class NotifySocket:
    """Stands in for systemd's notify socket: records every datagram with the time the daemon sent
    it (the kernel's stamp), so timing assertions judge the daemon, not the test's reader thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._reading = threading.Event()
        self._reading.set()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            if not self._reading.wait(0.2):
                continue
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(16))
            except TimeoutError:
                continue
            except OSError:
                return
            sent = _sent_at(ancillary)
            for field in data.decode().split("\n"):
                self.messages.append((sent, field))

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

    def stall(self) -> None:
        """Stop reading and fill the socket's queue, as a systemd too busy to read would: the
        daemon's next notification then blocks until `resume`."""
        self._reading.clear()
        time.sleep(0.3)  # the reader is back in its wait
        fillers = []
        while True:
            filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            fillers.append(filler)
            try:
                while True:
                    filler.sendto(b"FILLER=1", socket.MSG_DONTWAIT, str(self.path))
            except BlockingIOError:
                pass
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                probe.sendto(b"FILLER=1", socket.MSG_DONTWAIT, str(self.path))
            except BlockingIOError:
                break  # the receiver's queue is full, not just one filler's buffer
            finally:
                probe.close()
        for filler in fillers:
            filler.close()

    def resume(self) -> None:
        self._reading.set()

    def close(self) -> None:
        self._stop.set()
        self._reading.set()
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

    def events_named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if e["event"] == name]

    def wait_event(self, name: str, timeout: float = 30, count: int = 1) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.events() if e["event"] == name]
            if len(found) >= count:
                return found[count - 1]
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.1)
        raise AssertionError(f"no {name} event within {timeout}s:\n{self.log.read_text()[-3000:]}")


def spawn_daemon(
    tmp_path: Path,
    started: list[Daemon],
    config: Path,
    env: dict[str, str],
    args: Sequence[str] = (),
    *,
    journal: bool = False,
    host: str = "",
) -> Daemon:
    """`hpodlb run` as a process with `env` (the caller decides which AWS it sees), its JSON log in
    a file, a stand-in for systemd's notify socket; added to `started` for `stop_daemons`.
    `host`: run as the head of that hostname (`slurm.as_host`)."""
    n = len(started)
    notify = NotifySocket(tmp_path / f"notify{n}.sock")
    log = tmp_path / f"daemon{n}.log"
    out = log.open("wb")
    full_env = {**env, "NOTIFY_SOCKET": str(notify.path)}
    if journal:
        st = os.fstat(out.fileno())
        full_env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    command = [sys.executable, "-m", "hpodlb", "run", *args, "--config", str(config)]
    proc = subprocess.Popen(
        as_host(host, *command) if host else command,
        stdout=out,
        stderr=subprocess.STDOUT,
        env=full_env,
    )
    out.close()
    daemon = Daemon(proc, log, notify)
    started.append(daemon)
    return daemon


def stop_daemons(started: list[Daemon]) -> None:
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
        d.notify.close()
