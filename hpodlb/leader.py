"""Clusters with several head nodes: only the head whose slurmctld is in control acts.

HyperPod can run slurmctld on more than one controller node (a primary and backups). Each head runs
hpodlb, and two acting daemons would fight: each pushes from its own key store and registers on its
own schedule. `scontrol ping` lists the controllers in the order Slurm tries them, each UP or DOWN;
the first UP one is in control. The head whose hostname is that controller acts; the others observe
(probe, read AWS, record) and write nothing, and take over on their next pass once control moves.

When no controller is UP (Slurm itself is down), the first listed, the primary, acts: users' logins
do not depend on Slurm. When `scontrol` cannot say (it fails, hangs, prints nothing we know), this
head does not act: pausing one head is recoverable, two heads pushing different keys is not. With no
`scontrol` at all, a single head is assumed, as before this existed.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# HyperPod installs Slurm under /opt/slurm, which is not on systemd's default PATH.
EXTRA_PATHS = ("/opt/slurm/bin",)
# Above Slurm's own MessageTimeout (10 s) plus TCPTimeout (2 s) per controller: an overloaded
# primary that accepts and answers late must read as slow, not as "cannot tell".
TIMEOUT_SECONDS = 30.0
OUTPUT_CAP = 64 << 10
CONFIRM_SECONDS = 2.0  # a backup head taking over asks again after this long, to be sure
PING_LINE = re.compile(r"^Slurmctld\((?P<role>[^)]*)\) at (?P<host>\S+) is (?P<state>UP|DOWN)\b")
THIS_HOST = "localhost"  # what slurm.conf may call the head it runs on


@dataclass(frozen=True)
class Leadership:
    acting: bool
    controller: str = ""  # the controller in control (or presumed), as scontrol names it
    why: str = ""
    primary: str = ""  # the first controller listed
    sound: bool = True  # False: this head stands by because something is wrong, not by design

    @property
    def label(self) -> str:
        """`standby (controller: head1)` for status and STATUS=; empty when acting."""
        if self.acting:
            return ""
        if not self.sound:
            return f"standby ({self.why})"
        return f"standby (controller: {self.controller})"

    @property
    def takes_over(self) -> bool:
        """Acting as a backup: the primary's slurmctld does not answer."""
        return self.acting and bool(self.primary) and self.controller != self.primary


def controllers(ping_output: str) -> list[tuple[str, bool]]:
    """(host, up) per controller, in the order `scontrol ping` lists them (primary, backup,
    backup2, ...)."""
    found = []
    for line in ping_output.splitlines():
        match = PING_LINE.match(line.strip())
        if match:
            found.append((match["host"], match["state"] == "UP"))
    return found


def _is_me(host: str, me: set[str]) -> bool:
    """`host` as scontrol prints it (a name, `localhost`, or several names with commas)."""
    names = {n.strip().lower() for n in host.split(",") if n.strip()}
    return bool(names & (me | {THIS_HOST}))


def decide(listed: Sequence[tuple[str, bool]], me: set[str]) -> Leadership:
    """Pure: whether this head (known by the names in `me`) acts, given `scontrol ping`'s list."""
    up = [host for host, is_up in listed if is_up]
    primary = listed[0][0]
    in_control = up[0] if up else primary
    how = "is in control" if up else "is the primary, and no controller is UP"
    if _is_me(in_control, me):
        return Leadership(True, in_control, f"this head's slurmctld ({in_control}) {how}", primary)
    if not any(_is_me(host, me) for host, _ in listed):
        return Leadership(
            False,
            in_control,
            f"this host ({', '.join(sorted(me))}) is none of the controllers scontrol lists "
            f"({', '.join(h for h, _ in listed)})",
            primary,
            sound=False,
        )
    return Leadership(
        False, in_control, f"slurmctld on {in_control} {how}; this head observes", primary
    )


def host_names() -> set[str]:
    """This host as slurm.conf names it (SlurmctldHost): its hostname and the short form, lower
    case. No DNS lookup: a head node with slow DNS must not stall every pass."""
    name = socket.gethostname()
    return {n.lower() for n in (name, name.split(".")[0]) if n}


def find_scontrol() -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), *EXTRA_PATHS])
    return shutil.which("scontrol", path=path)


def check(
    mode: str,
    run: Callable[..., subprocess.CompletedProcess[bytes]] = subprocess.run,
    names: Callable[[], set[str]] = host_names,
) -> Leadership:
    """The decision for this pass; never raises."""
    if mode == "always":
        return Leadership(True, why="cluster.leader = always")
    scontrol = find_scontrol()
    if scontrol is None:
        return Leadership(True, why="no scontrol here: a single head node is assumed")
    try:
        done = run(
            [scontrol, "ping"],
            capture_output=True,
            timeout=TIMEOUT_SECONDS,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return Leadership(
            False, why=f"cannot tell which head is in control: scontrol ping: {exc}", sound=False
        )
    text = done.stdout[:OUTPUT_CAP].decode(errors="replace")
    listed = controllers(text)
    if not listed:
        said = (done.stderr or done.stdout)[:OUTPUT_CAP].decode(errors="replace").strip()
        first = said.splitlines()[0][:200] if said else f"exit status {done.returncode}"
        return Leadership(
            False, why=f"cannot tell which head is in control: scontrol ping: {first}", sound=False
        )
    return decide(listed, names())
