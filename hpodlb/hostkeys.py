"""The host-key gate: which nodes present the canonical keys, and putting them there safely.

`assess` probes every login node (handshakes only, no login) and turns what it sees into a
`KeyVerdict` for the planner. `push` installs the canonical keys on the nodes the plan names: one
root shell per node whose script arrives on stdin with the key bytes inside it (never a file in /tmp,
never a command-line argument), writes each file beside its target with umask 077, keeps the old file
as `<name>.hpodlb-previous`, renames into place, and lets sshd reload only if `sshd -t` passes *and*
is silent about host keys; anything else restores the previous files. Then the node is probed again
and only a full match counts. The node's sshd config and authorized keys are never touched, so no
failure can lock anyone out.
"""

from __future__ import annotations

import base64
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from hpodlb.config import Config
from hpodlb.files import write_atomically
from hpodlb.inventory import LoginNode
from hpodlb.keystore import HostKey, KeyStore, KeyStoreError, file_names, public_from_private
from hpodlb.logs import get_logger
from hpodlb.planner import KeyVerdict
from hpodlb.sshnode import (
    KeyTypeMissingError,
    NodeSession,
    SshError,
    SshSettings,
    known_hosts_name,
    probe_host_key,
)
from hpodlb.state import NodeRecord, State

log = get_logger("hpodlb.hostkeys")
T = TypeVar("T")

BACKOFF_FIRST_SECONDS = 10.0
BACKOFF_MAX_SECONDS = 600.0
# Failures at these steps mean "cannot reach it at all": skip its probes until the backoff ends.
UNREACHABLE_STEPS = frozenset({"connect", "handshake"})
SSHD_T_REFUSALS = ("Unable to load host key", "does not match")


def backoff_seconds(failures: int) -> float:
    return min(BACKOFF_FIRST_SECONDS * 2.0 ** max(failures - 1, 0), BACKOFF_MAX_SECONDS)


class HostKeyGate:
    """Implements reconcile.KeyGate over a key store and paramiko."""

    def __init__(self, config: Config, workers: int = 8) -> None:
        hk = config.host_keys
        self.types = hk.types
        self.store = KeyStore(hk.store, hk.types)
        self.remote_dir = str(hk.remote_dir)
        self.reload_command = hk.reload_command
        self.adopt = hk.adopt_from_first_node
        self.probe_interval = hk.probe_interval_seconds
        self.state_dir = config.state.dir
        s = config.ssh
        self.ssh = SshSettings(s.user, s.port, str(s.key_file), s.sudo, s.connect_timeout_seconds)
        self.workers = workers
        self.keys: dict[str, HostKey] = {}

    # -- observe ----------------------------------------------------------------------------------

    def assess(
        self, nodes: Sequence[LoginNode], state: State, now: float, *, dry_run: bool = False
    ) -> dict[str, KeyVerdict]:
        records = {n.ip: state.nodes.setdefault(n.ip, NodeRecord()) for n in nodes}
        try:
            self.keys = self._canonical_keys(nodes, dry_run=dry_run)
        except (KeyStoreError, SshError) as exc:
            log.error(
                "host_keys_unavailable",
                store=str(self.store.path),
                error=str(exc),
                action="no node is registered until canonical keys exist",
            )
            for record in records.values():
                record.key_state, record.key_detail = "unknown", f"no canonical keys: {exc}"
            # Without canonical keys nothing can be verified; a node replaced since it was
            # verified is still known to be unverified, so it leaves rotation all the same.
            return {n.ip: _unverified(n, records[n.ip]) for n in nodes}

        identity = self._identity()

        def recently_verified(node: LoginNode, record: NodeRecord) -> bool:
            """In sync, same instance, same canonical keys, probed less than the interval ago."""
            return (
                record.key_state == "in-sync"
                and record.verified_instance_id == node.instance_id
                and record.verified_keys == identity
                and now - (record.verified_at or 0) < self.probe_interval
            )

        def probe_one(node: LoginNode) -> tuple[LoginNode, dict[str, str] | SshError | None]:
            record = records[node.ip]
            skip = (record.backoff_until or 0) > now and record.last_error.split(":")[
                0
            ] in UNREACHABLE_STEPS
            return node, None if skip else self._probe(node.ip)

        verdicts: dict[str, KeyVerdict] = {}
        due = []
        for node in nodes:
            if recently_verified(node, records[node.ip]):
                verdicts[node.ip] = KeyVerdict.IN_SYNC
            else:
                due.append(node)
        for node, seen in self._parallel(probe_one, due):
            record = records[node.ip]
            verdicts[node.ip] = self._verdict(node, record, seen, now)
        if not dry_run:
            self._write_known_hosts(nodes, state)
        return verdicts

    def _wrong_types(self, seen: dict[str, str]) -> list[str]:
        """Configured types whose presented key (`type base64`) is not the canonical one."""
        return [t for t in self.types if seen[t].split()[1:2] != self.keys[t].public.split()[1:2]]

    def _mark_verified(self, node: LoginNode, record: NodeRecord, now: float) -> None:
        """This instance presents exactly the canonical set: remember which set, and when."""
        record.key_state, record.key_detail = "in-sync", ""
        record.verified_instance_id, record.verified_at = node.instance_id, now
        record.verified_keys = self._identity()

    def _identity(self) -> str:
        """The canonical key set in one string: a verification is only good for the set it saw."""
        return " ".join(sorted(k.fingerprint for k in self.keys.values()))

    def backing_off(self, nodes: Sequence[LoginNode], state: State, now: float) -> dict[str, str]:
        out: dict[str, str] = {}
        for node in nodes:
            record = state.nodes.get(node.ip)
            if record and (record.backoff_until or 0) > now:
                out[node.ip] = (
                    f"retry in {record.backoff_until - now:.0f}s after: {record.last_error}"  # type: ignore[operator]
                )
        return out

    def _probe(self, ip: str) -> dict[str, str] | SshError:
        """Presented public key per type ('' when the node has none of that type)."""
        seen: dict[str, str] = {}
        for key_type in self.types:
            try:
                seen[key_type] = probe_host_key(ip, self.ssh.port, key_type, self.ssh.timeout)
            except KeyTypeMissingError:
                seen[key_type] = ""
            except SshError as exc:
                return exc
        return seen

    def _probe_after_reload(self, ip: str) -> dict[str, str] | SshError:
        """sshd re-executes itself on reload: give it up to one timeout to listen again."""
        deadline = time.monotonic() + self.ssh.timeout
        while True:
            seen = self._probe(ip)
            if not isinstance(seen, SshError) or time.monotonic() >= deadline:
                return seen
            time.sleep(0.2)

    def _verdict(
        self,
        node: LoginNode,
        record: NodeRecord,
        seen: dict[str, str] | SshError | None,
        now: float,
    ) -> KeyVerdict:
        replaced = _replaced(node, record)
        if seen is None or isinstance(seen, SshError):
            if isinstance(seen, SshError):
                self._failed(node, record, seen.step, str(seen), now)
            record.key_state = "unreachable"
            record.key_detail = record.last_error
            return _unverified(node, record)
        wrong = self._wrong_types(seen)
        if not wrong:
            if record.verified_instance_id != node.instance_id:
                log.info("host_keys_verified", ip=node.ip, instance_id=node.instance_id)
            self._mark_verified(node, record, now)
            if record.last_error.split(":")[0] in UNREACHABLE_STEPS:
                self._recovered(record)
            return KeyVerdict.IN_SYNC
        record.key_state = "mismatch"
        record.key_detail = ", ".join(f"{t}{'' if seen[t] else ' (none)'}" for t in wrong)
        if record.verified_instance_id == node.instance_id:
            record.verified_at = None  # it was ours; it is not any more
        log.warning(
            "host_keys_mismatch",
            ip=node.ip,
            instance_id=node.instance_id,
            types=wrong,
            replaced=replaced,
        )
        return KeyVerdict.NEEDS_KEYS

    # -- act --------------------------------------------------------------------------------------

    def push(self, nodes: Sequence[LoginNode], state: State, now: float) -> dict[str, str | None]:
        def push_one(node: LoginNode) -> tuple[LoginNode, str | None]:
            return node, self._push(node, state.nodes.setdefault(node.ip, NodeRecord()))

        results: dict[str, str | None] = {}
        for node, error in self._parallel(push_one, nodes):
            record = state.nodes[node.ip]
            if error is None:
                self._mark_verified(node, record, now)
                self._recovered(record)
                log.info(
                    "host_keys_pushed",
                    ip=node.ip,
                    instance_id=node.instance_id,
                    fingerprints={t: k.fingerprint for t, k in self.keys.items()},
                )
            else:
                self._failed(node, record, error.split(":")[0], error, now)
            results[node.ip] = error
        self._write_known_hosts(nodes, state)
        return results

    def _push(self, node: LoginNode, record: NodeRecord) -> str | None:
        pinned = None
        if record.verified_instance_id == node.instance_id:
            pinned = [k.public for k in self.keys.values()]
        try:
            with NodeSession(node.ip, self.ssh, pinned, node.instance_id) as session:
                rc, out, err = session.run_root_script(
                    push_script(self.keys, self.remote_dir, self.reload_command)
                )
        except SshError as exc:
            return str(exc)
        if rc != 0 or "hpodlb-ok" not in out:
            return _script_failure(out, err, rc)
        seen = self._probe_after_reload(node.ip)
        if isinstance(seen, SshError):
            return f"verify: {seen}"
        wrong = self._wrong_types(seen)
        if wrong:
            return f"verify: still presents other {', '.join(wrong)} key(s) after reload"
        return None

    def adopt_from(self, ip: str, instance_id: str = "") -> dict[str, HostKey]:
        """Read a node's host keys (bytes in memory only) and check each private/public pair."""
        with NodeSession(ip, self.ssh, None, instance_id) as session:
            rc, out, err = session.run_root_script(read_script(self.types, self.remote_dir))
        if rc != 0:
            raise SshError("read-keys", _script_failure(out, err, rc))
        keys: dict[str, HostKey] = {}
        for line in out.splitlines():
            key_type, _, b64 = line.partition(" ")
            if key_type in self.types:
                try:
                    private = base64.b64decode(b64, validate=True)
                except ValueError:
                    raise SshError("read-keys", f"{key_type} key came back garbled") from None
                keys[key_type] = HostKey(key_type, private, public_from_private(private, key_type))
        missing = [t for t in self.types if t not in keys]
        if missing:
            raise SshError("read-keys", f"node has no {', '.join(missing)} host key")
        return keys

    # -- helpers ----------------------------------------------------------------------------------

    def _canonical_keys(self, nodes: Sequence[LoginNode], *, dry_run: bool) -> dict[str, HostKey]:
        if not self.store.is_empty() or not self.adopt or not nodes:
            return self.store.load()
        first = nodes[0]
        if dry_run:
            raise KeyStoreError(
                f"{self.store.path} is empty; a pass would adopt {first.label()}'s keys"
            )
        keys = self.adopt_from(first.ip, first.instance_id)
        self.store.save(keys, overwrite=False)
        log.warning(
            "host_keys_adopted",
            ip=first.ip,
            instance_id=first.instance_id,
            store=str(self.store.path),
            fingerprints={t: k.fingerprint for t, k in keys.items()},
        )
        return self.store.load()

    def _parallel(self, func: Callable[[LoginNode], T], nodes: Sequence[LoginNode]) -> list[T]:
        """Run per-node work on a bounded pool: one slow node holds one worker, not the others."""
        if not nodes:
            return []
        with ThreadPoolExecutor(
            max_workers=min(self.workers, len(nodes)), thread_name_prefix="hpodlb-ssh"
        ) as pool:
            return list(pool.map(func, nodes))

    def _failed(
        self, node: LoginNode, record: NodeRecord, step: str, error: str, now: float
    ) -> None:
        record.failures += 1
        wait = backoff_seconds(record.failures)
        record.backoff_until = now + wait
        record.last_error, record.last_error_at = error, now
        log.error(
            "node_failed",
            ip=node.ip,
            instance_id=node.instance_id,
            step=step,
            error=error,
            failures=record.failures,
            retry_in_seconds=wait,
        )

    @staticmethod
    def _recovered(record: NodeRecord) -> None:
        record.failures, record.backoff_until, record.last_error = 0, None, ""

    def _write_known_hosts(self, nodes: Sequence[LoginNode], state: State) -> None:
        """The head node's own pins: verified nodes and the canonical keys (state dir, 0644)."""
        lines = [
            f"{known_hosts_name(n.ip, self.ssh.port)} {k.public}"
            for n in nodes
            if state.nodes.get(n.ip, NodeRecord()).verified_instance_id == n.instance_id
            for k in self.keys.values()
        ]
        self.state_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(
            self.state_dir / "known_hosts", "".join(f"{x}\n" for x in lines).encode(), 0o644
        )


def _replaced(node: LoginNode, record: NodeRecord) -> bool:
    """A new instance at an IP whose keys were verified for another one."""
    return bool(record.verified_instance_id) and record.verified_instance_id != node.instance_id


def _unverified(node: LoginNode, record: NodeRecord) -> KeyVerdict:
    """The verdict for a node whose keys cannot be looked at this pass."""
    return KeyVerdict.REPLACED_UNREACHABLE if _replaced(node, record) else KeyVerdict.UNREACHABLE


def push_script(keys: Mapping[str, HostKey], remote_dir: str, reload_command: str) -> bytes:
    """The root script for one node. Key bytes are `printf` (a shell builtin) arguments only."""
    d = shlex.quote(remote_dir)
    files: list[tuple[str, str, bytes]] = []  # (name, mode, content), .pub first as sshd reads it
    for key_type, key in keys.items():
        priv, pub = file_names(key_type)
        files += [(pub, "0644", f"{key.public} hpodlb\n".encode()), (priv, "0600", key.private)]
    lines = [
        "set -u",
        "umask 077",
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        f"dir={d}",
        'fail() { echo "hpodlb-failed $1: $2"; exit 1; }',
        'cleanup() { rm -f "$dir"/.hpodlb-new.*; }',
        '[ -d "$dir" ] || fail write "$dir is not a directory"',
        "cleanup  # leftovers of a push that was cut off (hpodlb killed, connection lost)",
    ]
    for n, (name, mode, content) in enumerate(files):
        b64 = base64.b64encode(content).decode()
        lines += [
            f't{n}=$(mktemp "$dir/.hpodlb-new.XXXXXX") || {{ cleanup; fail write "cannot create a file in $dir"; }}',
            f"printf '%s' '{b64}' | base64 -d > \"$t{n}\" && [ -s \"$t{n}\" ] "
            f'|| {{ cleanup; fail write "cannot write {name} (disk full?)"; }}',
            f'chown root:root "$t{n}" && chmod {mode} "$t{n}" || {{ cleanup; fail write "cannot chown/chmod {name}"; }}',
        ]
    names = " ".join(shlex.quote(name) for name, _, _ in files)
    lines += [
        f"for f in {names}; do",
        '  if [ -e "$dir/$f" ]; then cp -p "$dir/$f" "$dir/$f.hpodlb-previous" || { cleanup; fail backup "cannot back up $f"; }',
        '  else rm -f "$dir/$f.hpodlb-previous"; fi',
        "done",
        "restore() {",
        f"  for f in {names}; do",
        '    if [ -e "$dir/$f.hpodlb-previous" ]; then',
        '      cp -p "$dir/$f.hpodlb-previous" "$dir/.hpodlb-new.restore" && mv -f "$dir/.hpodlb-new.restore" "$dir/$f"',
        '    else rm -f "$dir/$f"; fi',
        "  done",
        "}",
    ]
    for n, (name, _, _) in enumerate(files):
        lines.append(
            f'mv -f "$t{n}" "$dir/{name}" || {{ restore; cleanup; fail rename "cannot rename {name}"; }}'
        )
    lines += [
        "out=$(sshd -t 2>&1); rc=$?",
        'case "$out" in '
        + "|".join(f"*{shlex.quote(s)}*" for s in SSHD_T_REFUSALS)
        + ") rc=99;; esac",
        'if [ "$rc" -ne 0 ]; then restore; fail sshd-t "$(printf %s "$out" | head -c 300 | tr "\\n" " ")"; fi',
        f'sh -c {shlex.quote(reload_command)} >/dev/null 2>&1 || {{ restore; sh -c {shlex.quote(reload_command)} >/dev/null 2>&1; fail reload "reload command failed; previous keys restored"; }}',
        "echo hpodlb-ok",
    ]
    return ("\n".join(lines) + "\n").encode()


def read_script(types: Sequence[str], remote_dir: str) -> bytes:
    """Print `<type> <base64 of the private key>` per type; the output stays in our memory."""
    lines = ["set -u", f"dir={shlex.quote(remote_dir)}"]
    for key_type in types:
        priv = file_names(key_type)[0]
        lines.append(
            f'if [ -s "$dir/{priv}" ]; then printf "{key_type} "; base64 -w0 "$dir/{priv}"; echo; fi'
        )
    return ("\n".join(lines) + "\n").encode()


def _script_failure(out: str, err: str, rc: int) -> str:
    for line in out.splitlines():
        if line.startswith("hpodlb-failed "):
            return line.removeprefix("hpodlb-failed ")
    detail = (err.strip().splitlines() or [f"exit status {rc}"])[0][:200]
    return f"script: {detail}"


def known_hosts_lines(keys: Mapping[str, HostKey], host: str, port: int) -> list[str]:
    """What an admin hands users: `NAME type key` per canonical key, `[NAME]:PORT` off port 22."""
    name = host if port == 22 else f"[{host}]:{port}"
    return [f"{name} {key.public}" for key in keys.values()]
