"""Observing and changing the host keys of login nodes, over an `SshConnector`.

This module decides nothing (`identity.py` and the planner do): it probes what a node presents,
and carries out a push or an adoption the plan asked for, in the session the plan pinned.

The push is one root shell per node whose script arrives on stdin with the key bytes inside it
(never a file in /tmp, never a command-line argument). The script first asks `sshd -T` which host
key files sshd really reads and refuses to touch a node whose sshd reads keys we would not write;
then it writes each file beside its target with umask 077, keeps the node's own keys once as
`<name>.hpodlb-original` (never overwritten) and the last working ones as `<name>.hpodlb-previous`,
renames into place, and lets sshd reload only if `sshd -t` passes *and* is silent about host keys.
After the reload the node is probed again; if it does not present the canonical keys, the previous
files are put back. sshd's config and authorized keys are never touched: no failure locks anyone out.
"""

from __future__ import annotations

import base64
import shlex
import time
from collections.abc import Mapping, Sequence

from hpodlb.keystore import HostKey, KeySet, KeyStoreError, file_names, public_from_private
from hpodlb.planner import Probe
from hpodlb.sshnode import SshConnector, SshError

SSHD_T_REFUSALS = ("Unable to load host key", "does not match")


class HostKeys:
    def __init__(
        self,
        connector: SshConnector,
        types: Sequence[str],
        remote_dir: str,
        reload_command: str,
        settle_seconds: float = 10.0,
    ) -> None:
        self.connector = connector
        self.types = tuple(types)
        self.remote_dir = remote_dir
        self.reload_command = reload_command
        self.settle_seconds = settle_seconds  # how long sshd may take to listen again after reload

    # How long each step may take in all, given the connector's per-step `timeout`: the pass
    # gives a node's job this long (counted from when a worker took it) before it counts the job
    # as that node's failure. Each step bounds its own calls; these only catch a hang none of
    # them caught, so they leave room for every call the step makes.

    def probe_seconds(self, timeout: float) -> float:
        """A connect and a handshake per configured type, each within `timeout`."""
        return 2 * timeout * len(self.types) + 5

    def push_seconds(self, timeout: float) -> float:
        """A login and the push script; probes until sshd listens again after its reload; and,
        when the new keys do not verify, a second login and the restoring script."""
        return 16 * timeout + 90

    def read_keys_seconds(self, timeout: float) -> float:
        """A login and the script that prints the keys (an adoption)."""
        return 12 * timeout + 40

    def probe(self, ip: str, known: Mapping[str, str] | None = None) -> Probe:
        """One handshake per configured type, no login: what the node offers, or why not known.
        `known`: types already seen in a pinned session of this moment, not asked again."""
        offered: dict[str, str] = {}
        for key_type in self.types:
            if known and key_type in known:
                offered[key_type] = known[key_type]
                continue
            try:
                line = self.connector.probe(ip, key_type)
            except SshError as exc:
                return Probe(error=str(exc))
            if line is not None:
                offered[key_type] = line
        return Probe(offered=offered)

    def push(self, ip: str, keys: Mapping[str, HostKey], pin: frozenset[str]) -> dict[str, str]:
        """Install `keys` on the node, reload, verify; what it offers now, or SshError naming
        the failed step.

        A verification that fails puts the previous files back (and reloads), so a node never keeps
        keys that did not verify; the node's own keys stay in `*.hpodlb-original` whatever happens.
        """
        with self.connector.session(ip, pin) as session:
            rc, out, err = session.run_root(push_script(keys, self.remote_dir, self.reload_command))
        if rc != 0 or "hpodlb-ok" not in out:
            raise SshError(*_script_failure(out, err, rc))
        offered, problem = self._verify(ip, keys)
        if problem is None:
            return offered
        canonical = frozenset(k.public for k in keys.values())
        try:
            with self.connector.session(ip, pin | canonical) as session:
                rc, out, err = session.run_root(
                    restore_script(self.types, self.remote_dir, self.reload_command)
                )
            restored = "previous keys restored" if rc == 0 else "restoring the previous keys failed"
        except SshError as exc:
            restored = f"restoring the previous keys failed ({exc})"
        raise SshError("verify", f"{problem}; {restored}")

    def _verify(self, ip: str, keys: Mapping[str, HostKey]) -> tuple[dict[str, str], str | None]:
        """Probe until sshd answers again (it re-executes on reload); no problem: all canonical."""
        deadline = time.monotonic() + self.settle_seconds
        while True:
            seen = self.probe(ip)
            if seen.offered is not None or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        if seen.offered is None:
            return {}, f"no answer after the reload ({seen.error})"
        offered = dict(seen.offered)
        wrong = [t for t, line in offered.items() if line != keys[t].public]
        if wrong:
            return offered, f"still presents other {', '.join(wrong)} key(s) after the reload"
        if not offered:
            return offered, "offers none of the configured key types after the reload"
        return offered, None

    def read_keys(self, ip: str, pin: frozenset[str]) -> KeySet:
        """The node's host keys (bytes in memory only), each checked against what it presents."""
        with self.connector.session(ip, pin) as session:
            rc, out, err = session.run_root(read_script(self.types, self.remote_dir))
        if rc != 0:
            raise SshError(*_script_failure(out, err, rc))
        keys: KeySet = {}
        for line in out.splitlines():
            key_type, _, b64 = line.partition(" ")
            if key_type in self.types and key_type not in keys:
                try:
                    private = base64.b64decode(b64, validate=True)
                    keys[key_type] = HostKey(
                        key_type, private, public_from_private(private, key_type)
                    )
                except (ValueError, KeyStoreError) as exc:
                    raise SshError("read-keys", f"{key_type} key: {exc}") from None
        missing = [t for t in self.types if t not in keys]
        if missing:
            raise SshError(
                "read-keys",
                f"no {', '.join(missing)} host key in {self.remote_dir}; adopt from another node, "
                "or `hpodlb keys generate`, or drop the type from host_keys.types",
            )
        served = {line.split()[0]: line for line in pin}
        for key in keys.values():
            shown = served.get(key.public.split()[0])
            if shown is not None and shown != key.public:
                raise SshError(
                    "read-keys",
                    f"the {key.key_type} key in {self.remote_dir} is not the one sshd presents "
                    "(sshd reads its host keys from elsewhere?)",
                )
        return keys


def push_script(keys: Mapping[str, HostKey], remote_dir: str, reload_command: str) -> bytes:
    """The root script for one node. Key bytes are `printf` (a shell builtin) arguments only."""
    files: list[tuple[str, str, bytes]] = []  # (name, mode, content), .pub first as sshd reads it
    for key_type, key in keys.items():
        priv, pub = file_names(key_type)
        files += [(pub, "0644", f"{key.public} hpodlb\n".encode()), (priv, "0600", key.private)]
    names = " ".join(shlex.quote(name) for name, _, _ in files)
    managed = "|".join(f'"$dir/{file_names(t)[0]}"' for t in keys)
    types = " ".join(keys)
    lines = [
        *_preamble(remote_dir),
        'cleanup() { rm -f "$dir"/.hpodlb-new.*; }',
        "cleanup  # leftovers of a push that was cut off (hpodlb killed, connection lost)",
        # A key sshd reads from elsewhere would never verify: refuse up front, say what to change.
        'paths=$(sshd -T 2>&1) || fail sshd-config "sshd -T failed: $(printf %s "$paths" | head -c 200)"',
        'for p in $(printf "%s\\n" "$paths" | awk \'$1 == "hostkey" { print $2 }\'); do',
        f'  case "$p" in {managed}) continue;; esac',
        "  t=$(ssh-keygen -l -f \"$p\" 2>/dev/null | awk '{ print tolower($NF) }' | tr -d '()')",
        f'  case " {types} " in *" $t "*) fail sshd-config "sshd reads its $t host key from $p, '
        "not from $dir/ssh_host_${t}_key where hpodlb writes it: change HostKey in sshd_config "
        'or set host_keys.remote_dir";; esac',
        "done",
    ]
    for n, (name, mode, content) in enumerate(files):
        b64 = base64.b64encode(content).decode()
        lines += [
            f't{n}=$(mktemp "$dir/.hpodlb-new.XXXXXX") || {{ cleanup; fail write "cannot create a file in $dir"; }}',
            f"printf '%s' '{b64}' | base64 -d > \"$t{n}\" && [ -s \"$t{n}\" ] "
            f'|| {{ cleanup; fail write "cannot write {name} (disk full?)"; }}',
            f'chown root:root "$t{n}" && chmod {mode} "$t{n}" || {{ cleanup; fail write "cannot chown/chmod {name}"; }}',
        ]
    lines += [
        f"for f in {names}; do",
        '  [ -e "$dir/$f" ] || { rm -f "$dir/$f.hpodlb-previous"; continue; }',
        '  [ -e "$dir/$f.hpodlb-original" ] || cp -p "$dir/$f" "$dir/$f.hpodlb-original" || { cleanup; fail backup "cannot back up $f"; }',
        '  cp -p "$dir/$f" "$dir/$f.hpodlb-previous" || { cleanup; fail backup "cannot back up $f"; }',
        "done",
        *_restore_function(names),
    ]
    for n, (name, _, _) in enumerate(files):
        lines.append(
            f'mv -f "$t{n}" "$dir/{name}" || {{ restore; cleanup; fail rename "cannot rename {name}"; }}'
        )
    lines += [
        *_sshd_test("restore; "),
        f"sh -c {shlex.quote(reload_command)} >/dev/null 2>&1 || {{ restore; "
        f'sh -c {shlex.quote(reload_command)} >/dev/null 2>&1; fail reload "reload command failed; '
        'previous keys restored"; }',
        "echo hpodlb-ok",
    ]
    return ("\n".join(lines) + "\n").encode()


def restore_script(types: Sequence[str], remote_dir: str, reload_command: str) -> bytes:
    """Put the `.hpodlb-previous` files back and reload: the pushed keys did not verify."""
    names = " ".join(shlex.quote(n) for t in types for n in file_names(t))
    lines = [
        *_preamble(remote_dir),
        *_restore_function(names),
        "restore",
        *_sshd_test(""),
        f'sh -c {shlex.quote(reload_command)} >/dev/null 2>&1 || fail reload "reload command failed"',
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


def _preamble(remote_dir: str) -> list[str]:
    return [
        "set -u",
        "umask 077",
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        f"dir={shlex.quote(remote_dir)}",
        'fail() { echo "hpodlb-failed $1: $2"; exit 1; }',
        '[ -d "$dir" ] || fail write "$dir is not a directory"',
    ]


def _restore_function(names: str) -> list[str]:
    return [
        "restore() {",
        f"  for f in {names}; do",
        '    if [ -e "$dir/$f.hpodlb-previous" ]; then',
        '      cp -p "$dir/$f.hpodlb-previous" "$dir/.hpodlb-new.restore" && mv -f "$dir/.hpodlb-new.restore" "$dir/$f"',
        '    else rm -f "$dir/$f"; fi',
        "  done",
        "}",
    ]


def _sshd_test(on_failure: str) -> list[str]:
    """`sshd -t` must exit 0 *and* say nothing about host keys (it exits 0 on unloadable ones)."""
    refusals = "|".join(f"*{shlex.quote(s)}*" for s in SSHD_T_REFUSALS)
    return [
        "out=$(sshd -t 2>&1); rc=$?",
        f'case "$out" in {refusals}) rc=99;; esac',
        f'if [ "$rc" -ne 0 ]; then {on_failure}fail sshd-t "$(printf %s "$out" | head -c 300 | tr "\\n" " ")"; fi',
    ]


def _script_failure(out: str, err: str, rc: int) -> tuple[str, str]:
    """(step, reason) from a script's `hpodlb-failed STEP: REASON` line, or its stderr."""
    for line in out.splitlines():
        if line.startswith("hpodlb-failed "):
            step, _, reason = line.removeprefix("hpodlb-failed ").partition(": ")
            return step, reason
    detail = (err.strip().splitlines() or [f"exit status {rc}"])[0][:200]
    return "script", detail


def known_hosts_lines(keys: Mapping[str, HostKey], host: str, port: int) -> list[str]:
    """What an admin hands users: `NAME type key` per canonical key, `[NAME]:PORT` off port 22."""
    from hpodlb.sshnode import known_hosts_name

    name = known_hosts_name(host, port)
    return [f"{name} {key.public}" for key in keys.values()]
