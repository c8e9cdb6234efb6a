"""Head nodes for the leadership tests: a real slurmctld (Debian's slurm-wlm, with munge) under a
slurm.conf of the test's choosing, `hpodlb` run as a given head (a UTS namespace with that
hostname), and stand-in `scontrol`s printing what the real one prints.

Two slurmctld cannot both listen on one machine's loopback (each binds its port on every address),
so only the first controller of a slurm.conf runs for real; what the others would answer is played
by a stand-in.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def as_host(name: str, *command: str) -> list[str]:
    """`command` in a UTS namespace whose hostname is `name`: how a second head is played here."""
    return ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', name, *command]


def stand_in(tmp_path: Path, body: str) -> Path:
    """A directory holding an executable `scontrol` with `body` as its script."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "scontrol"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return bin_dir


def ping() -> str:
    """What the real `scontrol ping` prints (SLURM_CONF names the slurm.conf)."""
    return subprocess.run(
        ["scontrol", "ping"], capture_output=True, text=True, timeout=30, check=False
    ).stdout


def once_as(head: str, config: Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """`hpodlb once` as the head named `head`, with this process's environment."""
    return subprocess.run(  # type: ignore[call-overload, no-any-return]  # kwargs: cwd, env
        as_host(head, sys.executable, "-m", "hpodlb", "once", "--config", str(config)),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        **{"env": os.environ.copy(), **kwargs},
    )


class Slurm:
    """munged and a slurm.conf naming `controllers` (SlurmctldHost, in this order, all on
    127.0.0.1); `run(True)` starts the first controller's real slurmctld as host `as_head` and
    waits until `scontrol ping` says the primary is UP, `run(False)` stops it."""

    def __init__(self, base: Path, controllers: Sequence[str], as_head: str) -> None:
        self.base = base
        self.controllers = controllers
        self.as_head = as_head
        self.conf = base / "slurm.conf"
        self._ctld: list[subprocess.Popen[bytes]] = []

    def setup(self) -> None:
        base = self.base
        (base / "state").mkdir(parents=True)
        key = base / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        munged = subprocess.run(
            [
                "munged",
                "--force",
                f"--key-file={key}",
                f"--socket={base}/munge.sock",
                f"--pid-file={base}/munged.pid",
                f"--log-file={base}/munged.log",
                f"--seed-file={base}/seed",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert munged.returncode == 0, munged.stderr
        hosts = "".join(f"SlurmctldHost={name}(127.0.0.1)\n" for name in self.controllers)
        self.conf.write_text(
            f"ClusterName=hpodlb\n{hosts}"
            f"SlurmctldPort={free_port()}\nSlurmdPort={free_port()}\nSlurmUser=root\n"
            f"AuthType=auth/munge\nAuthInfo=socket={base}/munge.sock\nCredType=cred/munge\n"
            f"StateSaveLocation={base}/state\nSlurmctldPidFile={base}/slurmctld.pid\n"
            f"SlurmctldLogFile={base}/slurmctld.log\nSlurmctldTimeout=3\n"
            "ProctrackType=proctrack/linuxproc\n"
            "MpiDefault=none\nSwitchType=switch/none\nTaskPlugin=task/none\n"
            "NodeName=c1 CPUs=1 State=FUTURE\nPartitionName=p Nodes=c1 Default=YES\n"
        )

    def run(self, running: bool) -> None:
        if running:
            self._ctld.append(
                subprocess.Popen(
                    as_host(self.as_head, "slurmctld", "-D", "-f", str(self.conf)),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            deadline = time.monotonic() + 30
            while not ping().partition("\n")[0].endswith(" is UP"):  # the primary's line
                log = self.base / "slurmctld.log"
                assert time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.2)
        else:
            while self._ctld:
                proc = self._ctld.pop()
                proc.terminate()
                proc.wait(timeout=30)

    def teardown(self) -> None:
        self.run(False)
        pid_file = self.base / "munged.pid"
        pid = pid_file.read_text().strip() if pid_file.exists() else ""
        if pid:
            subprocess.run(["kill", pid], check=False)


@contextmanager
def slurm_heads(base: Path, controllers: Sequence[str], as_head: str) -> Iterator[Slurm]:
    """A `Slurm` set up under `base`, with SLURM_CONF set for this process's children (and put
    back after); skips the test where Slurm or munge is not installed."""
    for tool in ("slurmctld", "scontrol", "munged"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            pytest.skip(
                f"needs {tool} (Debian's slurmctld, slurm-client and munge: ./dev installs them)"
            )
    slurm = Slurm(base, controllers, as_head)
    saved = os.environ.get("SLURM_CONF")
    try:
        slurm.setup()
        os.environ["SLURM_CONF"] = str(slurm.conf)
        yield slurm
    finally:
        slurm.teardown()
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
