"""What happens on a simulated login node besides hpodlb: its users' real `ssh` logins (what they
run there is theirs to choose, names included), and a tool on the node that hangs (a process stuck
on a dead NFS mount), bind-mounted over the real one in that node's mount namespace only."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sim.nodes import SIM_USER, SimCluster, SimNode


def logins(node: SimNode) -> int:
    """Logins sshd has accepted on the node so far (its own log says so)."""
    return (node.dir / "sshd.log").read_text().count("Accepted publickey")


def ssh_as_user(
    cluster: SimCluster, node: SimNode, command: str, *, terminal: bool = False
) -> list[str]:
    """The `ssh` command line of the login user running `command` on the node (with a terminal,
    as an interactive user's, only if asked: `wall` writes to terminals)."""
    return [
        "ssh",
        *(["-tt"] if terminal else []),
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "BatchMode=yes",
        "-i",
        str(cluster.client_key),
        "-p",
        str(cluster.port),
        f"{SIM_USER}@{node.ip}",
        command,
    ]


@contextmanager
def logged_in(cluster: SimCluster, node: SimNode, *commands: str) -> Iterator[None]:
    """One user session per command, held open while the block runs (each command must run that
    long); sshd has accepted each of them before the block starts."""
    before = logins(node)
    procs = [
        subprocess.Popen(
            ssh_as_user(cluster, node, command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for command in commands
    ]
    try:
        deadline = time.monotonic() + 30
        while logins(node) < before + len(commands):
            assert time.monotonic() < deadline, f"ssh sessions to {node.ip} did not log in"
            assert all(p.poll() is None for p in procs), "a user session ended early"
            time.sleep(0.05)
        time.sleep(0.3)  # the command the session runs is started just after the login
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)


def run_as_user(cluster: SimCluster, node: SimNode, command: str) -> None:
    """Log in, run `command` (which may leave processes behind, as `setsid ... &` does), log out."""
    subprocess.run(
        ssh_as_user(cluster, node, command),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
        check=True,
    )


def user_processes(node: SimNode, marker: str) -> list[int]:
    """PIDs on the whole machine whose command line contains `marker` (the nodes share one)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if marker.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
    return found


class Hang:
    """`tool` on one node hangs: each run appends `PID WALL-CLOCK-SECONDS` to `runs` and then
    sleeps for an hour as `TOOL-hangs`. `started()` says when each run began and `alive()`
    which of them are still there (a command hpodlb left behind on the node)."""

    def __init__(self, node: SimNode, tool: str, runs: Path) -> None:
        self.node = node
        self.runs = runs
        self.wrapper = node.dir / f"hang-{tool}"
        lines = [
            "#!/bin/bash",
            f'echo "$$ $(date +%s.%N)" >> {runs}',
            f"exec -a {tool}-hangs sleep 3600",
        ]
        self.wrapper.write_text("\n".join(lines) + "\n")
        self.wrapper.chmod(0o755)
        runs.touch()
        self.target = subprocess.run(
            ["sh", "-c", f"command -v {tool}"], capture_output=True, text=True, check=True
        ).stdout.strip()
        self._in_node("mount", "--bind", str(self.wrapper), os.path.realpath(self.target))

    def _in_node(self, *command: str) -> None:
        assert self.node.proc is not None, "the node is not running"
        subprocess.run(
            ["nsenter", f"--mount=/proc/{self.node.proc.pid}/ns/mnt", *command],
            check=True,
            capture_output=True,
        )

    def started(self) -> list[tuple[int, float]]:
        """(PID, wall-clock seconds) of each run so far, as the node stamped them."""
        lines = self.runs.read_text().split("\n")
        return [(int(p), float(t)) for p, t in (x.split() for x in lines if x.strip())]

    def alive(self) -> list[int]:
        return [pid for pid, _ in self.started() if running(pid)]

    def undo(self) -> None:
        """The real tool again, and no run left sleeping (whatever hpodlb did about them)."""
        for pid in self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.CalledProcessError, AssertionError):
            self._in_node("umount", os.path.realpath(self.target))


def running(pid: int) -> bool:
    """The process exists and is not a zombie (one killed may wait a moment to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
