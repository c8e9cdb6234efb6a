"""Scripts run on a login node about its users: how many SSH sessions it has, and `wall`.

Used by `hpodlb drain` (tell the users, watch the node empty) and by the pass (a drained node's
open sessions, for `status` and `drain --wait`), so the core never imports a command for them.
Each runs as root in a session pinned to keys the caller can vouch for; this module never
decides what to pin, and never logs a script or its output.

The count includes scp, VS Code and other connections without a terminal, which `who` would miss.
"""

from __future__ import annotations

from hpodlb.sshnode import ROOT_SHELL, SshConnector, SshError

# Without host keys hpodlb has nothing to pin a session to, so it logs in to no node.
NO_LOGINS = "host_keys.enabled = false: hpodlb logs in to no node"

# A node's SSH sessions are read from what only root and sshd can write, never from a name a user
# chooses. A logged-in connection is a process that:
# - runs as root (real uid 0: no user can start one, and a setuid program keeps the user's), from
#   sshd's own program (`/proc/PID/exe`: sshd, or sshd-session since OpenSSH 9.8; "(deleted)"
#   after an upgrade), titled by sshd `sshd: USER [priv]` (the monitor of one connection);
# - has a child titled `sshd: USER@...` (its user side, forked by the monitor once USER has
#   authenticated: a connection still authenticating has a `[net]` child, and is not counted).
# Not only the listener's children: sessions outlive an sshd restart (apt upgrades do that), and
# are reparented away from the new listener. hpodlb's own sessions (this count's, and a push or
# doctor of this or another head) are those with a root-run `sh -s hpodlb` below their monitor:
# root's processes are not a user's to start or rename. A user's `sh -s hpodlb` is theirs, and
# counted; so is an older hpodlb's session (it ran `sh -s` alone). The mount namespace keeps the
# count to this node where one kernel hosts several (the simulated login nodes).
SESSIONS_SCRIPT = rb"""[ "$(id -u)" = 0 ] || { echo "counting sessions needs root" >&2; exit 1; }
mine=$(readlink /proc/$$/ns/mnt)
ps -ww -eo pid=,ppid=,ruid=,args= | awk '
{ pid = $1; parent[pid] = $2; uid[pid] = $3; $1 = ""; $2 = ""; $3 = ""; sub(/^ +/, ""); args[pid] = $0 }
END {
  for (p in args) if (uid[p] == 0 && args[p] ~ /^sshd(-session)?: [^ ]+ \[priv\]$/) {
    who = args[p]; sub(/^[^ ]+ /, "", who); sub(/ \[priv\]$/, "", who); monitor[p] = who
  }
  for (c in args) {
    p = parent[c]; side = args[c]
    if ((p in monitor) && sub(/^sshd(-session)?: /, "", side) && index(side, monitor[p] "@") == 1)
      session[p] = 1
  }
  for (q in args) if (uid[q] == 0 && args[q] == "@ROOT_SHELL@") {
    p = q
    while ((p in parent) && p > 1) { if (p in session) { ours[p] = 1; break }; p = parent[p] }
  }
  for (p in session) if (!(p in ours)) print p
}' | {
  n=0
  while read -r p; do
    exe=$(readlink "/proc/$p/exe") || continue
    case ${exe% (deleted)} in */sshd | */sshd-session) ;; *) continue ;; esac
    [ "$(readlink "/proc/$p/ns/mnt")" = "$mine" ] && n=$((n + 1))
  done
  echo "hpodlb-sessions $n"
}
""".replace(b"@ROOT_SHELL@", ROOT_SHELL.encode())


def count_seconds(timeout: float) -> float:
    """How long counting may take in all: a login (a connect and key exchange, authentication,
    each within `timeout`), one short command (SshSettings.command_deadline), and slack."""
    return 2 * timeout + max(30.0, 3 * timeout) + 10


def count_sessions(connector: SshConnector, ip: str, pin: frozenset[str]) -> int:
    """Authenticated SSH connections on the node, hpodlb's own excepted; SshError if unknown."""
    with connector.session(ip, pin) as session:
        rc, out, err = session.run_root(SESSIONS_SCRIPT)
    words = out.split()
    if rc != 0 or len(words) != 2 or words[0] != "hpodlb-sessions" or not words[1].isdigit():
        why = (err.strip().splitlines() or out.strip().splitlines() or [f"exit status {rc}"])[0]
        raise SshError("sessions", f"cannot count them ({why[:200]}; needs ps and awk)")
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
