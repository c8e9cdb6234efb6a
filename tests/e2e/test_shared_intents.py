"""Two heads, one truth for drains (issue 24): two real `hpodlb run` daemons, each with its own
state dir and its own hostname (a UTS namespace), on one moto server's target group and real sshd
login nodes. Control is moved by a stand-in `scontrol` both heads run (see `test_leader.py` for
why a stand-in): its answer is a file the test rewrites.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.support.lab import nodes
from tests.support.slurm import as_host, stand_in

HEAD1_IN_CONTROL = "Slurmctld(primary) at head1 is UP\nSlurmctld(backup) at head2 is UP\n"
HEAD2_IN_CONTROL = "Slurmctld(primary) at head1 is DOWN\nSlurmctld(backup) at head2 is UP\n"


class Head:
    """One `hpodlb run` as host `name`, its JSON log in a file."""

    def __init__(self, name: str, config: Path, log: Path) -> None:
        self.name, self.config, self.log = name, config, log
        out = log.open("wb")
        self.proc = subprocess.Popen(
            as_host(name, sys.executable, "-m", "hpodlb", "run", "--config", str(config)),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
        )
        out.close()

    def events(self, name: str = "") -> list[dict[str, Any]]:
        lines = self.log.read_text(errors="replace").splitlines()
        found = [json.loads(x) for x in lines if x.startswith("{")]
        return [e for e in found if not name or e["event"] == name]

    def hpodlb(self, *args: str) -> subprocess.CompletedProcess[str]:
        """A command on this head (its config, its hostname)."""
        return subprocess.run(
            as_host(self.name, sys.executable, "-m", "hpodlb", *args, "--config", str(self.config)),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env=os.environ.copy(),
        )

    def acting_passes_since(self, since: float) -> int:
        """Passes this head finished acting (not on standby) that began after `since` (its own
        timestamps: a pass in flight when control moved does not count)."""
        return sum(
            1
            for e in self.events("pass_finished")
            if not e.get("standby") and when(e) - float(e.get("seconds", 0)) > since
        )


def when(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


@pytest.fixture
def two_heads(
    sim_env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Any, Path, Head, Head]]:
    """(the sim env, the stand-in's answer file, head1, head2), head1 in control."""
    env = sim_env
    said = tmp_path / "ping.txt"
    said.write_text(HEAD1_IN_CONTROL)
    path = f"{stand_in(tmp_path, f'cat {said}')}{os.pathsep}{os.environ['PATH']}"
    monkeypatch.setenv("PATH", path)
    heads = []
    for name in ("head1", "head2"):
        env.write_config(
            cluster={"leader": "slurmctld"},
            reconcile={"interval_seconds": 1},
            state={"dir": str(tmp_path / name)},
        )
        config = tmp_path / f"{name}.toml"
        shutil.copy(env.config_path, config)
        heads.append(config)
    env.ips = nodes(env, 3)
    started = [
        Head(n, c, tmp_path / f"{n}.log") for n, c in zip(("head1", "head2"), heads, strict=True)
    ]
    try:
        yield env, said, started[0], started[1]
    finally:
        for head in started:
            head.proc.terminate()
            head.proc.wait(timeout=30)


def wait_for(check: Callable[[], bool], heads: tuple[Head, Head], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        assert all(h.proc.poll() is None for h in heads), [h.log.read_text()[-2000:] for h in heads]
        time.sleep(0.1)


def test_a_drain_survives_failovers_both_ways(two_heads: tuple[Any, Path, Head, Head]) -> None:
    """A drain made on head1 is applied by head2 once control moves to it, and by head1 again on
    failback: 0 registrations of the drained node on either head across both failovers; a drain
    given on the standby head is applied by the acting one; an undrain on either puts it back."""
    env, said, head1, head2 = two_heads
    heads = (head1, head2)
    drained, other, _ = env.ips
    wait_for(lambda: env.registered() == set(env.ips), heads, 90)

    done = head1.hpodlb("drain", drained, "--reason", "disk swap", "--force")
    assert done.returncode == 0, done.stderr
    wait_for(lambda: env.registered() == set(env.ips) - {drained}, heads)
    drained_at = time.time()

    said.write_text(HEAD2_IN_CONTROL)
    moved = time.time()
    wait_for(lambda: head2.acting_passes_since(moved) >= 3, heads)
    assert env.registered() == set(env.ips) - {drained}

    # On the standby head now: recorded on the tags, applied by head2.
    done = head1.hpodlb("drain", other, "--reason", "bios", "--force")
    assert done.returncode == 0, done.stderr
    assert "the head in control applies it" in done.stdout
    wait_for(lambda: env.registered() == set(env.ips) - {drained, other}, heads)

    said.write_text(HEAD1_IN_CONTROL)
    back = time.time()
    wait_for(lambda: head1.acting_passes_since(back) >= 3, heads)
    assert env.registered() == set(env.ips) - {drained, other}

    undrain_at = time.time()
    undone = head2.hpodlb("undrain", drained)  # on the standby head
    assert undone.returncode == 0, undone.stderr
    wait_for(lambda: drained in env.registered(), heads)

    registrations = [
        (head.name, when(e) < undrain_at)
        for head in heads
        for e in head.events("registered")
        if e.get("ip") == drained and when(e) > drained_at
    ]
    assert registrations == [("head1", False)]  # the undrain's, and none while drained
    from tests.support.data import FIGURES

    FIGURES["re-registrations of a drained node over failovers both ways (two daemons)"] = "0"
