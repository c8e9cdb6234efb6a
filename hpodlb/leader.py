"""Clusters with several head nodes: only the head whose slurmctld is in control acts.

HyperPod can run slurmctld on more than one controller node (a primary and backups). Each head runs
hpodlb, and two acting daemons would fight: each pushes from its own key store and registers on its
own schedule. `scontrol ping` lists the controllers in the order Slurm tries them, each UP or DOWN;
the first UP one is in control. The head that controller names acts; the others observe (probe,
read AWS, record) and write nothing, and take over on their next pass once control moves.

A head is named by what tells it from the other heads: its hostname (and short form), its FQDN and
its own addresses. Never by `localhost` (or a loopback address): Slurm lets any host whose
slurm.conf says `SlurmctldHost=localhost` play that controller, so every head would take it for
itself. An answer whose controller in control is named only so cannot tell which head acts; so
does a slurm.conf naming a controller so, since Slurm's own tools then print, on every head, that
head's own name for it (`scontrol ping` says `at head2` on head2 and `at head1` on head1).

When no controller is UP (Slurm itself is down), the first listed, the primary, acts: users' logins
do not depend on Slurm. When `scontrol` cannot say (it fails, hangs, prints nothing we know), this
head does not act: pausing one head is recoverable, two heads pushing different keys is not. With no
`scontrol` at all, a single head is assumed, as before this existed. `scontrol` is looked up in
absolute directories only: `sudo hpodlb doctor` typed in a user's directory must not run that
user's `./scontrol` as root (an empty PATH entry, `.` or a relative one would).

Control can move in the middle of a pass (a pass over hung nodes or a slow AWS lasts minutes), so
the pass asks again before every AWS write batch and every push or adoption (`Asker`), trusting an
answer for at most CACHE_SECONDS from when it was asked: a head that lost control makes no write
later than that, plus the one call already in flight.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from hpodlb.files import UnusableFileError, read_regular_file

# HyperPod installs Slurm under /opt/slurm, which is not on systemd's default PATH.
EXTRA_PATHS = ("/opt/slurm/bin",)
# Above Slurm's own MessageTimeout (10 s) plus TCPTimeout (2 s) per controller: an overloaded
# primary that accepts and answers late must read as slow, not as "cannot tell".
TIMEOUT_SECONDS = 30.0
OUTPUT_CAP = 64 << 10
CONFIRM_SECONDS = 2.0  # a backup head taking over asks again after this long, to be sure
# How long an answer stands for the writes of a pass: each `scontrol ping` is a few milliseconds
# and an RPC to slurmctld, so asking before every write is cheap; 2 s bounds how late a head that
# lost control can still write, and spares slurmctld a ping per node on a pass of many pushes.
CACHE_SECONDS = 2.0
PING_LINE = re.compile(r"^Slurmctld\((?P<role>[^)]*)\) at (?P<host>\S+) is (?P<state>UP|DOWN)\b")
# What every host calls itself: a controller named so is no head in particular.
ANY_HOST = frozenset(
    {"localhost", "localhost.localdomain", "localhost6", "ip6-localhost", "ip6-loopback"}
)
FQDN_SECONDS = 1.0  # a resolver that answers later is asked again next pass, not waited for
# slurm.conf's lines naming controllers (SlurmctldHost, and the names before Slurm 18.08).
CONTROLLER_LINE = re.compile(
    r"^\s*(?:SlurmctldHost|ControlMachine|BackupController)\s*=\s*([^\s#(]+)", re.I | re.M
)
SLURM_CONF_CAP = 4 << 20


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


class Asker:
    """Leadership for one pass, asked again once the last answer is CACHE_SECONDS old.

    An answer's age counts from when it was asked, not when it came: what `scontrol ping` said
    was true at some moment after the question, and no later. Thread-safe (pushes ask from node
    workers); callers that find the answer stale wait for the one question in flight.
    """

    def __init__(self, ask: Callable[[], Leadership], clock: Callable[[], float]) -> None:
        self._ask = ask
        self._clock = clock
        self._lock = threading.Lock()
        self._answer: Leadership | None = None
        self._asked_at = 0.0

    def fresh(self) -> Leadership:
        """Ask now, whatever the last answer's age (a pass's first question, a takeover's
        second)."""
        with self._lock:
            return self._fresh()

    def __call__(self) -> Leadership:
        """The last answer while it is younger than CACHE_SECONDS, else a new one."""
        with self._lock:
            if self._answer is None or self._clock() - self._asked_at >= CACHE_SECONDS:
                return self._fresh()
            return self._answer

    def _fresh(self) -> Leadership:
        asked_at = self._clock()
        self._answer = self._ask()
        self._asked_at = asked_at
        return self._answer


def controllers(ping_output: str) -> list[tuple[str, bool]]:
    """(host, up) per controller, in the order `scontrol ping` lists them (primary, backup,
    backup2, ...)."""
    found = []
    for line in ping_output.splitlines():
        match = PING_LINE.match(line.strip())
        if match:
            found.append((match["host"], match["state"] == "UP"))
    return found


def identifies(name: str) -> bool:
    """Whether `name` can tell one host from another: not `localhost` or a name like it, not a
    loopback, unspecified or link-local address (every host has those)."""
    name = name.strip().lower().rstrip(".")
    if not name or name in ANY_HOST or name.endswith(".localhost"):
        return False
    try:
        address = ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return True
    return not (address.is_loopback or address.is_unspecified or address.is_link_local)


def _names(host: str) -> set[str]:
    """The names of `host` as scontrol prints it (one, or several with commas) that identify a
    host, lower case."""
    return {n.strip().lower().rstrip(".") for n in host.split(",") if identifies(n)}


def decide(listed: Sequence[tuple[str, bool]], me: set[str]) -> Leadership:
    """Pure: whether this head (known by the names in `me`) acts, given `scontrol ping`'s list."""
    up = [host for host, is_up in listed if is_up]
    primary = listed[0][0]
    in_control = up[0] if up else primary
    how = "is in control" if up else "is the primary, and no controller is UP"
    me = {n for n in me if identifies(n)}
    if not _names(in_control):
        return Leadership(
            False,
            in_control,
            f"cannot tell which head is in control: scontrol ping calls it {in_control}, a name "
            "every head has (name the heads by their hostnames in slurm.conf's SlurmctldHost; "
            'on a cluster with one head, set cluster.leader = "always")',
            primary,
            sound=False,
        )
    if _names(in_control) & me:
        return Leadership(True, in_control, f"this head's slurmctld ({in_control}) {how}", primary)
    if not any(_names(host) & me for host, _ in listed):
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
    """The names slurm.conf may give this head (SlurmctldHost): its hostname and the short form
    (what slurmctld itself compares), its FQDN, and its own addresses; lower case, and only those
    that identify it (`identifies`)."""
    name = socket.gethostname()
    found = {name, name.split(".")[0], _fqdn(name), *_own_addresses()}
    return {n.lower() for n in found if identifies(n)}


_FQDN: dict[str, str] = {}  # hostname -> its FQDN, once the resolver has said
_RESOLVING: dict[str, threading.Thread] = {}


def _fqdn(name: str) -> str:
    """`name`'s FQDN, or "" while the resolver has not said within FQDN_SECONDS: a head node with
    slow DNS must not stall every pass. One lookup at a time per name; its answer is kept."""
    if name not in _FQDN:
        lookup = _RESOLVING.get(name)
        if lookup is None or not lookup.is_alive():
            lookup = threading.Thread(
                target=lambda: _FQDN.setdefault(name, socket.getfqdn(name)),
                name="hpodlb-fqdn",
                daemon=True,
            )
            _RESOLVING[name] = lookup
            lookup.start()
        lookup.join(FQDN_SECONDS)
    return _FQDN.get(name, "")


def _own_addresses(proc: Path = Path("/proc/net")) -> Iterator[str]:
    """This host's addresses, from the kernel's own tables (no DNS, no subprocess): the local
    routes of `fib_trie` (IPv4) and `if_inet6`."""
    try:
        trie = (proc / "fib_trie").read_text().splitlines()
    except OSError:
        trie = []
    for line, after in itertools.pairwise(trie):
        if line.strip().startswith("|--") and after.strip().startswith("/32 host LOCAL"):
            yield line.strip()[3:].strip()
    try:
        rows = (proc / "if_inet6").read_text().splitlines()
    except OSError:
        rows = []
    for row in rows:
        word = row.split()[0] if row.split() else ""
        if len(word) == 32:
            yield str(ipaddress.IPv6Address(int(word, 16)))


def find_scontrol() -> str | None:
    """`scontrol` on PATH or in EXTRA_PATHS, in absolute directories only: an empty PATH entry,
    `.` or a relative one is the current directory, maybe a user's (`sudo hpodlb doctor`)."""
    entries = [*os.environ.get("PATH", os.defpath).split(os.pathsep), *EXTRA_PATHS]
    absolute = [e for e in entries if Path(e).is_absolute()]
    return shutil.which("scontrol", path=os.pathsep.join(absolute)) if absolute else None


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
    conf = slurm_conf(scontrol)
    anonymous = anonymous_controllers(conf)
    if anonymous:
        return Leadership(
            False,
            why=f"cannot tell which head is in control: {conf} names a controller "
            f"{anonymous[0]}, which Slurm takes for whichever head asks (name the heads by "
            "their hostnames in SlurmctldHost; on a cluster with one head, set cluster.leader = "
            '"always")',
            sound=False,
        )
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


def slurm_conf(scontrol: str) -> Path:
    """The slurm.conf `scontrol` reads: SLURM_CONF, else its own installation's (HyperPod's
    /opt/slurm/etc), else the distribution's /etc/slurm."""
    if os.environ.get("SLURM_CONF"):
        return Path(os.environ["SLURM_CONF"])
    beside = Path(scontrol).resolve().parent.parent / "etc" / "slurm.conf"
    return beside if beside.is_file() else Path("/etc/slurm/slurm.conf")


def anonymous_controllers(conf: Path) -> list[str]:
    """The controllers `conf` names only by a name every host has (`localhost`): Slurm reads
    `localhost` as the short hostname of the host reading it, so each head's `scontrol ping`
    calls that controller by the head's own name. [] when `conf` cannot be read: the ping is
    then all there is, as before."""
    try:
        text = read_regular_file(conf, SLURM_CONF_CAP).decode(errors="replace")
    except (OSError, UnusableFileError):
        return []
    named = (n for match in CONTROLLER_LINE.finditer(text) for n in match[1].split(","))
    return [n for n in named if n and not identifies(n)]
