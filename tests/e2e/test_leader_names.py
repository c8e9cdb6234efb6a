"""Several head nodes told `localhost` (issue 23, item 8): no head acts on a controller every head
calls itself, and `scontrol` is never taken from the directory hpodlb was started in.

Each `hpodlb` runs as a process in a UTS namespace named as the head it plays; the first test runs
a real slurmctld whose slurm.conf says `SlurmctldHost=localhost`, and the real `scontrol`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hpodlb.config import load_config
from sim.aws import FakeAws
from tests.support.data import FIGURES
from tests.support.process import run_hpodlb
from tests.support.slurm import as_host, once_as, ping, slurm_heads, stand_in

pytestmark = pytest.mark.slurmctld
CANNOT_TELL = "standby (cannot tell which head is in control: "


def aws_env(aws: FakeAws, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in aws.env().items():
        monkeypatch.setenv(key, value)


def test_with_a_real_slurmctld_named_localhost_no_head_acts(
    tmp_path: Path,
    aws: FakeAws,
    arn: str,
    write_config: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """slurm.conf says `SlurmctldHost=localhost`: the real scontrol names each head as the
    controller (`at head1` on head1, `at head2` on head2), so both heads would act; each says it
    cannot tell, exits 1 and writes nothing."""
    aws_env(aws, monkeypatch)
    config = write_config([{"arn": arn, "port": 22}], cluster={"leader": "slurmctld"})
    with slurm_heads(tmp_path / "slurm", ["localhost"], "head1") as slurm:
        slurm.run(True)
        said = {
            head: subprocess.run(
                as_host(head, "scontrol", "ping"), capture_output=True, text=True, check=False
            ).stdout
            for head in ("head1", "head2")
        }
        assert said == {h: f"Slurmctld(primary) at {h} is UP\n" for h in said}, ping()
        for head in ("head1", "head2"):
            done = once_as(head, config)
            assert done.returncode == 1, done.stdout + done.stderr
            assert done.stdout.startswith(
                f"{CANNOT_TELL}{slurm.conf} names a controller localhost, which Slurm takes for "
                "whichever head asks (name the heads by their hostnames in SlurmctldHost; on a "
                'cluster with one head, set cluster.leader = "always")): '
                "observed only, changed nothing"
            ), done.stdout
    assert aws.targets(arn) == set()


def test_two_daemons_told_the_controller_is_localhost_write_nothing(
    tmp_path: Path,
    aws: FakeAws,
    arn: str,
    write_config: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`hpodlb run` on head1 and on head2, `scontrol ping` answering `at localhost is UP` (a
    stand-in): three passes each, every one a standby that cannot tell, and no write to AWS."""
    aws_env(aws, monkeypatch)
    said = stand_in(tmp_path, "echo 'Slurmctld(primary) at localhost is UP'")
    monkeypatch.setenv("PATH", f"{said}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("SLURM_CONF", raising=False)
    first = write_config(
        [{"arn": arn, "port": 22}],
        cluster={"leader": "slurmctld"},
        reconcile={"interval_seconds": 1},
    )
    configs = {"head1": tmp_path / "head1.toml", "head2": tmp_path / "head2.toml"}
    for head, path in configs.items():
        path.write_text(first.read_text().replace(str(tmp_path / "state"), str(tmp_path / head)))
        path.chmod(0o600)
    logs = {head: tmp_path / f"{head}.log" for head in configs}
    daemons = []
    for head, path in configs.items():
        with logs[head].open("wb") as out:
            daemons.append(
                subprocess.Popen(
                    as_host(head, sys.executable, "-m", "hpodlb", "run", "--config", str(path)),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=os.environ.copy(),
                )
            )
    try:
        deadline = time.monotonic() + 60
        while min(len(finished(logs[h])) for h in logs) < 3:
            assert time.monotonic() < deadline and all(d.poll() is None for d in daemons)
            time.sleep(0.1)
    finally:
        for daemon in daemons:
            daemon.terminate()
            daemon.wait(timeout=30)
    for head, log in logs.items():
        passes = finished(log)
        assert all(p["standby"].startswith(CANNOT_TELL) for p in passes), (head, passes)
        assert all("calls it localhost, a name every head has" in p["standby"] for p in passes)
        assert load_config(configs[head], {}).state.dir == tmp_path / head
    assert aws.targets(arn) == set()
    FIGURES["two heads told the controller is localhost: writes to AWS in 3 passes each"] = "0"


def finished(log: Path) -> list[dict[str, Any]]:
    events = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    return [e for e in events if e["event"] == "pass_finished"]


def test_a_scontrol_in_the_current_directory_is_never_run(
    tmp_path: Path,
    aws: FakeAws,
    arn: str,
    write_config: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`hpodlb once` and `hpodlb doctor` started in a user's directory holding an `scontrol` (and
    a `bin/scontrol`), PATH with an empty entry, `.` and `bin`: neither runs it; with no other
    scontrol, a single head is assumed."""
    aws_env(aws, monkeypatch)
    config = write_config([{"arn": arn, "port": 22}], cluster={"leader": "slurmctld"})
    users = tmp_path / "users-dir"
    (users / "bin").mkdir(parents=True)
    ran = tmp_path / "ran"
    for script in (users / "scontrol", users / "bin" / "scontrol"):
        script.write_text(
            f"#!/bin/sh\necho $0 >> {ran}\necho 'Slurmctld(primary) at head1 is UP'\n"
        )
        script.chmod(0o755)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PATH": f":{empty}:.:bin"}
    env.pop("SLURM_CONF", None)

    def hpodlb(*args: str) -> subprocess.CompletedProcess[str]:
        return run_hpodlb(*args, config=config, cwd=users, env=env)

    once = hpodlb("once")
    doctor = hpodlb("doctor", "--json")
    assert not ran.exists(), ran.read_text()
    assert once.returncode == 0, once.stdout + once.stderr
    assert len(aws.targets(arn)) == 3  # it acted: the single head it is
    checks = json.loads(doctor.stdout)["checks"]
    assert {
        "area": "daemon",
        "status": "PASS",
        "found": "this head acts: no scontrol here: a single head node is assumed",
        "fix": "",
    } in checks, checks
