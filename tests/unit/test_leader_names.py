"""Which head is "this head" (issue 23, item 8): names that tell one head from another, never
`localhost`; `scontrol` never taken from the current directory. The rule and the look-ups, in
process; `tests/e2e/test_leader_names.py` runs heads as processes against a real slurmctld."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from hpodlb import leader

CANNOT_TELL = "cannot tell which head is in control: "


def ping_naming(*controllers: str, up: bool = True) -> list[tuple[str, bool]]:
    state = "UP" if up else "DOWN"
    roles = ["primary", "backup", "backup2"][: len(controllers)]
    return leader.controllers(
        "".join(
            f"Slurmctld({r}) at {c} is {state}\n" for r, c in zip(roles, controllers, strict=True)
        )
    )


@pytest.mark.parametrize(
    "name",
    ["localhost", "LOCALHOST", "localhost.localdomain", "127.0.0.1", "::1", "0.0.0.0"],  # noqa: S104  # a name, not a bind
)
def test_a_controller_named_as_every_host_names_itself_cannot_tell(name: str) -> None:
    """A controller in control called `localhost` (or a loopback address) is whichever head reads
    it: no head acts on it, and the standby is a problem (not sound), with the fix."""
    me = {"head1", "localhost", "127.0.0.1"}  # a head whose own names include the ambiguous ones
    for listed in (ping_naming(name), ping_naming(name, "head2", up=False)):
        lead = leader.decide(listed, me)
        assert (lead.acting, lead.sound) == (False, False)
        assert lead.why == (
            f"{CANNOT_TELL}scontrol ping calls it {name}, a name every head has (name the heads "
            "by their hostnames in slurm.conf's SlurmctldHost; on a cluster with one head, set "
            'cluster.leader = "always")'
        )
        assert lead.label == f"standby ({lead.why})"


def test_only_names_that_identify_a_head_count() -> None:
    """An entry with a real name besides `localhost` is that head's; `localhost` elsewhere in the
    list makes no head a controller."""
    assert leader.decide(ping_naming("head1,localhost"), {"head1"}).acting
    backup = leader.decide(ping_naming("head1", "localhost"), {"head2", "localhost"})
    assert (backup.acting, backup.sound) == (False, False)
    assert backup.why.startswith("this host (head2) is none of the controllers")
    assert not leader.decide(ping_naming("localhost", "head2"), {"head2"}).acting


def test_this_head_is_named_by_its_hostname_fqdn_and_addresses() -> None:
    """host_names: the hostname, its short form, the FQDN and every address `hostname -I` lists,
    and never a name every host has; a controller named by any of them is this head."""
    names = leader.host_names()
    hostname = socket.gethostname().lower()
    expected = {hostname, hostname.split(".")[0], socket.getfqdn().lower()}
    addresses = subprocess.run(
        ["hostname", "-I"], capture_output=True, text=True, check=True
    ).stdout.split()
    expected |= set(addresses)
    assert {n for n in expected if leader.identifies(n)} <= names
    assert set(addresses) <= names
    assert not any(n in names for n in ("localhost", "127.0.0.1", "::1"))
    assert all(leader.identifies(n) for n in names)
    for name in sorted(names):
        assert leader.decide(ping_naming(name), names).acting, name


def test_scontrol_is_never_taken_from_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty PATH entry, `.` or a relative entry is the current directory (a user's, under
    `sudo hpodlb doctor`): not searched; absolute entries are."""
    monkeypatch.setattr(leader, "EXTRA_PATHS", ())
    planted = tmp_path / "users-dir"
    (planted / "bin").mkdir(parents=True)
    for script in (planted / "scontrol", planted / "bin" / "scontrol"):
        script.write_text("#!/bin/sh\ntouch ran\n")
        script.chmod(0o755)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(planted)
    for path in ("", ":", f"{empty}:", f":{empty}", f"{empty}::{empty}", ".", "bin", "./bin"):
        monkeypatch.setenv("PATH", path)
        assert leader.find_scontrol() is None, path
    monkeypatch.setenv("PATH", f"{empty}:{planted / 'bin'}")
    assert leader.find_scontrol() == str(planted / "bin" / "scontrol")


def test_a_slurm_conf_naming_a_controller_localhost_cannot_tell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slurm reads `SlurmctldHost=localhost` as the short hostname of whoever reads it, so the
    real `scontrol ping` says `at head1` on head1 and `at head2` on head2 (tests/e2e): the
    slurm.conf scontrol reads is what tells, and no head acts on it. A slurm.conf that names its
    heads, or none that can be read, leaves the decision to the ping."""
    monkeypatch.setattr(leader, "EXTRA_PATHS", ())
    bin_dir = tmp_path / "slurm" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 'Slurmctld(primary) at head1 is UP'\n")
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("SLURM_CONF", raising=False)
    conf = tmp_path / "slurm" / "etc" / "slurm.conf"  # HyperPod's layout: /opt/slurm/{bin,etc}
    conf.parent.mkdir()
    for written in (
        "SlurmctldHost=localhost(127.0.0.1)\n",
        "ClusterName=c\n  slurmctldhost = LOCALHOST  # the only one\n",
        "ControlMachine=head1\nBackupController=localhost\n",
    ):
        conf.write_text(written)
        lead = leader.check("slurmctld", names=lambda: {"head1"})
        assert (lead.acting, lead.sound) == (False, False), written
        assert lead.why.startswith(f"{CANNOT_TELL}{conf} names a controller ")
        assert "which Slurm takes for whichever head asks" in lead.why
    conf.write_text("SlurmctldHost=head1(10.1.33.120)\nSlurmctldHost=head2\n")
    assert leader.check("slurmctld", names=lambda: {"head1"}).acting
    other = tmp_path / "elsewhere.conf"
    other.write_text("SlurmctldHost=localhost\n")
    monkeypatch.setenv("SLURM_CONF", str(other))  # SLURM_CONF first, as Slurm reads it
    assert not leader.check("slurmctld", names=lambda: {"head1"}).acting
    other.unlink()
    assert leader.check("slurmctld", names=lambda: {"head1"}).acting
