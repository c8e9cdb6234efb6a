"""Draining a login node for maintenance: `hpodlb drain IP` and `hpodlb undrain IP`.

The command only records the admin's word (intents.json, beside but apart from the state cache),
tells the node's users, and counts their sessions; the daemon's next pass does the rest (the
planner takes a drained node out of every target group within the guards, keeps it out, and keeps
its host keys in step). So a drain survives restarts, works the same on a standby head, and never
races the daemon for an AWS write.

On the node, two short root scripts, each in a session pinned to keys hpodlb can vouch for (the
canonical or previous set, or the daemon's own pin for that node): `wall` with the notice, and a
count of the node's authenticated SSH connections (sshd's per-connection `[priv]` processes under
the listener this session came through), hpodlb's own connection excepted. A session count
includes scp, VS Code and other non-terminal connections, which `who` would miss.
"""

from __future__ import annotations

import getpass
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hpodlb.config import Config, target_group_name
from hpodlb.intents import DrainRequest, Intents, intents_path, update_intents
from hpodlb.inventory import InventoryError, LoginNode
from hpodlb.logs import get_logger
from hpodlb.planner import NOT_REGISTERED_STATES
from hpodlb.sshnode import SshConnector, SshError
from hpodlb.state import State, load_state

log = get_logger("hpodlb.drain")

MAX_REASON = 200
POLL_SECONDS = 3.0  # `--wait`: how often the sessions are counted

# Our own connection is the `[priv]` process above this shell; its parent is the listener this
# node's users come through; every other `[priv]` child of that listener is someone's session.
SESSIONS_SCRIPT = rb"""ps -ww -eo pid=,ppid=,args= | awk -v me="$$" '
function priv(p) { return args[p] ~ /^sshd(-session)?: [^ ]+ \[priv\]$/ }
{ pid = $1; parent[pid] = $2; $1 = ""; $2 = ""; sub(/^ +/, ""); args[pid] = $0 }
END {
  p = me; mine = ""
  while ((p in parent) && p > 1) {
    if (priv(p)) { mine = p; break }
    p = parent[p]
  }
  if (mine == "") { print "hpodlb-sessions unknown"; exit }
  n = 0
  for (q in parent) if (parent[q] == parent[mine] && q != mine && priv(q)) n++
  print "hpodlb-sessions " n
}'
"""


class DrainError(Exception):
    """The drain or undrain could not be recorded; the message says why and what to do."""


def check_reason(text: str) -> str:
    """A reason goes to users' terminals (wall) and into the journal: one printable line."""
    text = text.strip()
    if not text:
        raise ValueError("the reason is empty")
    if len(text) > MAX_REASON:
        raise ValueError(f"the reason is longer than {MAX_REASON} characters")
    if any(not ch.isprintable() for ch in text):
        raise ValueError("the reason must be one line of printable characters (no escapes)")
    return text


def notice(node: LoginNode, reason: str) -> str:
    return (
        f"hpodlb: this login node ({node.ip}) is being drained for maintenance: {reason}. "
        "New logins go to the other login nodes; please save your work and log out."
    )


def count_sessions(connector: SshConnector, ip: str, pin: frozenset[str]) -> int:
    """Authenticated SSH connections on the node, hpodlb's own excepted; SshError if unknown."""
    with connector.session(ip, pin) as session:
        rc, out, err = session.run_root(SESSIONS_SCRIPT)
    words = out.split()
    if rc != 0 or len(words) != 2 or words[0] != "hpodlb-sessions" or not words[1].isdigit():
        why = (err.strip().splitlines() or out.strip().splitlines() or [f"exit status {rc}"])[0]
        raise SshError(
            "sessions", f"cannot count them ({why[:200]}; needs ps, awk and a privsep sshd)"
        )
    return int(words[1])


def tell_users(connector: SshConnector, ip: str, pin: frozenset[str], message: str) -> None:
    """`wall` on the node. The message is one printable line (check_reason), so the quoted
    here-document cannot end early and nothing in it reaches a shell."""
    script = f"wall <<'HPODLB_NOTICE'\n{message}\nHPODLB_NOTICE\necho hpodlb-wall-ok\n".encode()
    with connector.session(ip, pin) as session:
        rc, out, err = session.run_root(script)
    if rc != 0 or "hpodlb-wall-ok" not in out:
        why = (err.strip().splitlines() or [f"exit status {rc}"])[0]
        raise SshError("wall", why[:200])


@dataclass
class DrainResult:
    node: LoginNode
    request: DrainRequest
    restored: list[str] = field(default_factory=list)  # drains put back after intents.json loss
    told: str = ""  # why the users could not be told; empty: they were
    note: str = ""  # what the guard check could not see


class Drains:
    """The admin's side, for one config: record, undo, notify and count."""

    def __init__(self, config: Config) -> None:
        from hpodlb.wiring import build_reconciler, host_keys

        self.config = config
        self.reconciler = build_reconciler(config)
        self.connector = host_keys(config).connector
        self.state_dir = config.state.dir

    def login_node(self, ip: str) -> LoginNode:
        try:
            nodes = self.reconciler.desired()
        except InventoryError as exc:
            raise DrainError(str(exc)) from None
        node = next((n for n in nodes if n.ip == ip), None)
        if node is None:
            raise DrainError(
                f"{ip} is not a login node in {self.config.cluster.resource_config} "
                f"(login groups: {self.reconciler.groups_source})"
            )
        return node

    def drain(self, ip: str, reason: str, *, force: bool) -> DrainResult:
        node = self.login_node(ip)
        state = self._state()
        note = "" if force else self._guard(ip, state)
        request = DrainRequest(
            reason=reason,
            force=force,
            instance_id=node.instance_id,
            requested_at=time.time(),
            requested_by=_who(),
        )
        restored: list[str] = []

        def add(intents: Intents) -> None:
            restored.extend(self._restore_lost(intents, state))
            intents.drain[ip] = request

        self._update(add)
        log.warning(
            "node_drained",
            ip=ip,
            instance_id=node.instance_id,
            reason=reason,
            force=force,
            by=request.requested_by,
            action="the daemon takes it out of rotation at its next pass",
        )
        result = DrainResult(node, request, restored, note=note)
        try:
            tell_users(self.connector, ip, self._pin(ip), notice(node, reason))
        except SshError as exc:
            result.told = str(exc)
            log.warning("drain_notice_failed", ip=ip, instance_id=node.instance_id, error=str(exc))
        return result

    def undrain(self, ip: str) -> tuple[bool, list[str]]:
        """(whether it was drained, drains restored after an intents.json loss)."""
        state = self._state()
        was: list[bool] = []
        restored: list[str] = []

        def remove(intents: Intents) -> None:
            restored.extend(r for r in self._restore_lost(intents, state) if r != ip)
            was.append(intents.drain.pop(ip, None) is not None)

        self._update(remove)
        if was[0]:
            log.warning(
                "node_undrained",
                ip=ip,
                by=_who(),
                action="back in rotation at the next pass, once its host keys verify",
            )
        return was[0], restored

    def sessions(self, ip: str) -> int:
        return count_sessions(self.connector, ip, self._pin(ip))

    def out_of_rotation(self, ip: str) -> list[str]:
        """Target groups the daemon's last pass still saw the node registered in."""
        state = self._state()
        return [
            target_group_name(tg.arn)
            for tg in self.config.target_groups
            if any(
                t.ip == ip and t.port == tg.port and t.state not in NOT_REGISTERED_STATES
                for t in state.targets.get(tg.arn, [])
            )
        ]

    def wait(
        self, ip: str, seconds: float, say: Callable[[str], Any], clock: Callable[[], float]
    ) -> bool:
        """Count the node's sessions until none are left or `seconds` have passed; True: none."""
        deadline = clock() + seconds
        last: int | str | None = None
        while True:
            try:
                count: int | str = self.sessions(ip)
            except SshError as exc:
                count = str(exc)
            left = max(deadline - clock(), 0)
            if count != last:
                what = f"{count} sessions open" if isinstance(count, int) else f"cannot: {count}"
                say(f"{ip}: {what} ({left:.0f}s left to wait)")
                last = count
            if count == 0:
                return True
            if left <= 0:
                return False
            time.sleep(min(POLL_SECONDS, left))

    def _guard(self, ip: str, state: State) -> str:
        """Refuse a drain that would take a group below min_in_service (as the last pass saw the
        groups); the planner holds such a drain anyway, this says it before anything changes."""
        if state.last_pass is None:
            return "no pass has run yet: the daemon's guards decide when it leaves"
        floor = self.config.reconcile.min_in_service
        others = set(state.drains) | {ip}
        for tg in self.config.target_groups:
            registered = {
                t.ip
                for t in state.targets.get(tg.arn, [])
                if t.port == tg.port and t.state not in NOT_REGISTERED_STATES
            }
            if ip in registered and len(registered - others) < floor:
                raise DrainError(
                    f"draining {ip} would leave {len(registered - others)} registered targets in "
                    f"{tg.name} (reconcile.min_in_service = {floor}); add --force to drain it "
                    "anyway (users may find no login node)"
                )
        return ""

    def _restore_lost(self, intents: Intents, state: State) -> list[str]:
        """intents.json is gone but the last pass had drains: put them back before changing it,
        so that one undrain does not undrain every lost drain."""
        if intents_path(self.state_dir).exists() or not state.drains:
            return []
        lost = sorted(set(state.drains) - set(intents.drain))
        for lost_ip in lost:
            intents.drain[lost_ip] = state.drains[lost_ip]
        log.warning("drain_intents_restored", drained=lost, source="the state file")
        return lost

    def _update(self, change: Callable[[Intents], None]) -> None:
        from hpodlb.intents import IntentsError

        try:
            update_intents(self.state_dir, change)
        except IntentsError as exc:
            raise DrainError(f"{exc}; fix or remove it (drains in it are then lost)") from None
        except OSError as exc:
            raise DrainError(f"{intents_path(self.state_dir)}: cannot write ({exc})") from None

    def _state(self) -> State:
        state, _ = load_state(self.state_dir)
        return state

    def _pin(self, ip: str) -> frozenset[str]:
        from hpodlb.keyadmin import vouched_keys

        return vouched_keys(self.config, [ip])[ip]


def _who() -> str:
    """Who asked, for the journal: the admin behind sudo if there is one."""
    try:
        return os.environ.get("SUDO_USER") or getpass.getuser()
    except (KeyError, OSError):
        return ""
