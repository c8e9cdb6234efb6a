"""Draining a login node for maintenance: `hpodlb drain IP` and `hpodlb undrain IP`.

The command only records the admin's word (intents.json, beside but apart from the state cache),
tells the node's users, and watches the node empty; the daemon's next pass does the rest (the
planner takes a drained node out of every target group within the guards, keeps it out, and keeps
its host keys in step). So a drain survives restarts and never races the daemon for an AWS write.
Each head keeps its own intents, and only the acting head applies them: a standby head refuses.

On the node, two short root scripts (`sessions.py`), each in a session pinned to keys hpodlb can
vouch for (the canonical or previous set, or the daemon's own pin for that node): `wall` with the
notice, and a count of the node's logged-in SSH connections.
"""

from __future__ import annotations

import getpass
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpodlb.config import Config
from hpodlb.drainguard import check_drain, registered_at, unread_group
from hpodlb.intentmodel import DrainRequest, Intents
from hpodlb.intents import IntentsError, intents_path, update_intents
from hpodlb.inventory import InventoryError, LoginNode
from hpodlb.lock import LOCK_FILE, lock_holder
from hpodlb.logs import get_logger
from hpodlb.sessions import NO_LOGINS, count_sessions, tell_users
from hpodlb.sshnode import SshConnector, SshError
from hpodlb.state import State, load_state
from hpodlb.wiring import Adapters

log = get_logger("hpodlb.drain")

MAX_REASON = 200
DEFAULT_REASON = "maintenance"
POLL_SECONDS = 3.0  # `--wait`: how often the sessions are counted


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


def notice(node: LoginNode, reason: str, others: bool | None) -> str:
    """What its users read; `others`: whether other login nodes are in service (None: unknown)."""
    return (
        f"hpodlb: this login node ({node.ip}) is being drained for maintenance: {reason}. "
        f"{elsewhere(others)}; please save your work and log out."
    )


def elsewhere(others: bool | None) -> str:
    """Where new logins go, as far as the last pass tells."""
    return {
        True: "New logins go to the other login nodes",
        False: "No other login node is in service now, so new logins may fail until it is back",
        None: "New logins go to the other login nodes, if any is in service",
    }[others]


@dataclass
class DrainResult:
    node: LoginNode
    request: DrainRequest
    restored: list[str] = field(default_factory=list)  # drains put back after intents.json loss
    told: str = ""  # why the users could not be told; empty: they were
    note: str = ""  # what the guard check could not see
    others: bool | None = None  # other login nodes in service once it is out (None: unknown)
    daemon: Daemon | None = None  # who will apply it
    unchanged: bool = False  # drained already, just so: nothing recorded, nobody told again
    forced_now: bool = False  # only --force was added: recorded, users not told again


@dataclass(frozen=True)
class Daemon:
    """Whether an `hpodlb run` holds this state dir's lock: what applies a drain, and when."""

    pid: str | None  # None: none holds it
    error: str = ""  # why it cannot be told (then `pid` is None too)
    lock: str = ""

    @classmethod
    def of(cls, state_dir: Path) -> Daemon:
        lock = str(state_dir / LOCK_FILE)
        try:
            return cls(lock_holder(state_dir), lock=lock)
        except OSError as exc:
            return cls(None, f"{lock}: {exc.strerror or exc}", lock)

    def when(self) -> str:
        """When the drain (or an undrain) takes effect, as is true now."""
        if self.pid is not None:
            return (
                f"the daemon (pid {self.pid}) applies it at its next pass, within a second or two "
                "(it watches intents.json)"
            )
        if self.error:
            return (
                f"cannot tell whether the daemon runs ({self.error}): it applies at the next pass"
            )
        return (
            f"no hpodlb daemon runs on this head (nothing holds {self.lock}): nothing changes "
            "until a pass runs (`systemctl start hpodlb`, or `hpodlb once`)"
        )


def drain_lines(result: DrainResult, config: Config) -> list[str]:
    """What `hpodlb drain` says it did and what will happen when: true of this head now (is a
    daemon running? are host keys on? are other nodes in service?), never a promise it cannot
    keep."""
    node, reason, ip = result.node, result.request.reason, result.node.ip
    if result.unchanged:
        return [f"{node.label()} is drained already ({reason}): nothing changed"]
    if result.forced_now:
        return [f"{node.label()} is drained already ({reason}): now with --force (past the guards)"]
    guards = "past the guards (--force)" if result.request.force else "within the guards"
    keys = (
        "; each pass still keeps its host keys in step"
        if config.host_keys.enabled
        else f" ({NO_LOGINS}: its host keys are not kept in step, its sessions not counted)"
    )
    daemon = result.daemon or Daemon.of(config.state.dir)
    lines = [
        f"{node.label()} drained: {reason}. Out of rotation {guards}, kept out until "
        f"`hpodlb undrain {ip}`{keys}.",
        f"When: {daemon.when()}.",
    ]
    if result.note:
        lines.append(f"note: {result.note}")
    if result.told:
        lines.append(f"warning: could not tell its users (wall): {result.told}")
    else:
        lines.append(f"Its users were told (wall): {elsewhere(result.others)}.")
    return lines


class Drains:
    """The admin's side, for one config: record, undo, notify, and watch the node empty."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.adapters = Adapters(config)  # reads files; AWS only if the login groups need it
        self.state_dir = config.state.dir
        self.counts_sessions = config.host_keys.enabled

    @property
    def connector(self) -> SshConnector:
        return self.adapters.host_keys.connector

    def login_nodes(self) -> tuple[LoginNode, ...]:
        try:
            return self.adapters.desired()
        except InventoryError as exc:
            raise DrainError(str(exc)) from None

    def login_node(self, ip: str, nodes: Sequence[LoginNode] | None = None) -> LoginNode:
        nodes = self.login_nodes() if nodes is None else nodes
        node = next((n for n in nodes if n.ip == ip), None)
        if node is None:
            raise DrainError(
                f"{ip} is not a login node in {self.config.cluster.resource_config} "
                f"(login groups: {self.adapters.groups_source})"
            )
        return node

    def drain(self, ip: str, reason: str | None, *, force: bool) -> DrainResult:
        """Record the drain (`reason` None: the one it has, else "maintenance") and tell the
        node's users. Draining a drained node again changes only what was asked: its reason (its
        users are told again), or --force (recorded, nobody told again); otherwise nothing, and
        `since` stays the first one."""
        nodes = self.login_nodes()
        node = self.login_node(ip, nodes)
        state = self._state()
        if state.last_pass is not None and state.last_pass.standby:
            raise DrainError(
                f"this head is on {state.last_pass.standby}: each head keeps its own drains, and "
                "only the acting head applies them; run `hpodlb drain` on the head whose "
                "slurmctld is in control"
            )
        restored = self._lost(state, ip)
        result: list[DrainResult] = []

        def add(intents: Intents) -> None:
            old = intents.drain.get(ip)
            why = reason or (old.reason if old else DEFAULT_REASON)
            if old is not None and old.reason == why and (old.force or not force):
                result.append(DrainResult(node, old, restored, unchanged=True))
                return
            # Under the intents lock: two drains cannot both pass.
            seen = check_drain(
                self.config, ip, nodes, state, set(intents.drain) | set(state.drains)
            )
            if not force and old is None and seen.refusal:
                raise DrainError(seen.refusal)
            request = DrainRequest(
                reason=why,
                force=force or bool(old and old.force),
                instance_id=node.instance_id,
                requested_at=old.requested_at if old else time.time(),
                requested_by=_who(),
            )
            intents.drain[ip] = request
            forced_now = old is not None and old.reason == why
            result.append(
                DrainResult(
                    node,
                    request,
                    restored,
                    note=seen.note,
                    forced_now=forced_now,
                    others=seen.others,
                    daemon=Daemon.of(self.state_dir),
                )
            )

        self._update(add)
        done = result[0]
        if done.unchanged:
            return done
        request = done.request
        log.warning(
            "node_drained",
            ip=ip,
            instance_id=node.instance_id,
            reason=request.reason,
            force=request.force,
            by=request.requested_by,
            action=(done.daemon or Daemon.of(self.state_dir)).when(),
        )
        if done.forced_now:
            return done
        if not self.counts_sessions:
            done.told = NO_LOGINS
            return done
        try:
            text = notice(node, request.reason, done.others)
            tell_users(self.connector, ip, self._pin(ip), text)
        except SshError as exc:
            done.told = str(exc)
            log.warning("drain_notice_failed", ip=ip, instance_id=node.instance_id, error=str(exc))
        return done

    def undrain(self, ip: str) -> tuple[bool, list[str]]:
        """(whether it was drained, drains restored after an intents.json loss)."""
        restored = self._lost(self._state(), ip)
        was: list[bool] = []
        self._update(lambda intents: was.append(intents.drain.pop(ip, None) is not None))
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

    def rotation(self, ip: str, since: float) -> tuple[bool, str]:
        """(out of every target group, what the daemon's passes say of it): from a pass that
        started after `since` (the drain), so an older pass cannot answer for it."""
        state = self._state()
        last = state.last_pass
        if last is None or last.started_at < since:
            daemon = Daemon.of(self.state_dir)
            if daemon.pid is not None:
                return False, f"waiting for the next pass of the daemon (pid {daemon.pid})"
            return False, f"no pass since the drain: {daemon.when()}"
        held = [h for h in last.held if h.startswith(f"deregister {ip} ")]
        if held:
            return False, f"still in rotation: {held[0]}"
        unread = unread_group(state, self.config.target_groups)
        if unread:
            return False, f"not known to be out: {unread}"
        still = [tg.name for tg in self.config.target_groups if ip in registered_at(state, tg)]
        if still:
            return False, f"still registered in {', '.join(still)}"
        return True, "out of rotation in every target group"

    def wait(
        self,
        ip: str,
        since: float,
        seconds: float,
        say: Callable[[str], Any],
        clock: Callable[[], float],
    ) -> bool:
        """Until the node is out of rotation and none of its SSH sessions is left, or `seconds`
        have passed; says each change. True: out, and empty (without host keys, where sessions
        cannot be counted: out)."""
        deadline = clock() + seconds
        said: tuple[str, str] = ("", "")
        while True:
            out, where = self.rotation(ip, since)
            try:
                if not self.counts_sessions:
                    count, open_now = 0, f"sessions not counted ({NO_LOGINS})"
                else:
                    count = self.sessions(ip)
                    open_now = f"{count} sessions open"
            except SshError as exc:
                count, open_now = -1, f"sessions unknown ({exc})"
            left = max(deadline - clock(), 0)
            if (where, open_now) != said:
                say(f"{ip}: {where}; {open_now} ({left:.0f}s left to wait)")
                said = (where, open_now)
            if out and count == 0:
                return True
            if left <= 0:
                return False
            time.sleep(min(POLL_SECONDS, left))

    def _lost(self, state: State, ip: str) -> list[str]:
        """Drains that intents.json lost and the next write puts back (from the daemon's copy)."""
        if intents_path(self.state_dir).exists():
            return []
        return sorted(set(state.drains) - {ip})

    def _update(self, change: Callable[[Intents], None]) -> None:
        try:
            update_intents(self.state_dir, change)
        except IntentsError as exc:
            raise DrainError(
                f"{exc}; fix or remove it (the drains the daemon has applied are kept and put "
                "back; one recorded since its last pass must be given again)"
            ) from None
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
