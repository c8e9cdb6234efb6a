"""Scripts run on a login node about its users: how many SSH sessions it has, and `wall`.

Used by `hpodlb drain` (tell the users, watch the node empty) and by the pass (a drained node's
open sessions, for `status` and `drain --wait`), so the core never imports a command for them.
Each runs as root in a session pinned to keys the caller can vouch for; this module never
decides what to pin, and never logs a script or its output. This is maintenance work: each script
stops itself on the node after SCRIPT_SECONDS or when its session goes, with all it started.

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
# count to this node where one kernel hosts several (the simulated login nodes). Not utmp (only
# sessions with a terminal are in it: scp and VS Code are not), nor logind (only where sshd runs
# pam_systemd): sshd's own processes are there for every logged-in connection.
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

SCRIPT_SECONDS = 10.0  # a count or a `wall` on the node: well under a second unless it hangs

# What a maintenance script says on stderr when its limit stopped it.
STOPPED = "stopped after {seconds:.0f}s on the node (a command there hangs: a dead NFS mount?)"

# Started first by a maintenance script, in the background: the script ends with its SSH session
# and within its limit, with everything it started (its process group, which sshd made for the
# command: sudo and the root shell are in it). sshd sends no signal to a command without a
# terminal when the connection goes, so a count whose `ps` hangs (a process stuck on a dead NFS
# mount) would otherwise stay on the node for good, one more every pass. The session is gone when
# the nearest sshd process above the script is. The guard reads clocks and /proc with shell
# builtins only, and ends with the script (its EXIT trap), so a count takes no longer for it.
# Pushes are not run under it: a push cut between its renames is better finished than killed.
_GUARD = """hpodlb_guard() {
  read -r s < /proc/$$/stat && set -- ${s##*)} && pg=$3 && link=$$ || return
  while [ "$link" -gt 1 ]; do
    read -r s < "/proc/$link/stat" && set -- ${s##*)} && link=$2 || break
    read -r c < "/proc/$link/comm" || break
    case $c in sshd | sshd-session) break ;; esac
  done
  read -r up _ < /proc/uptime
  end=$((${up%.*}${up#*.} + @CENTISECONDS@))
  while kill -0 $$ 2>/dev/null; do
    read -r up _ < /proc/uptime
    if [ "${up%.*}${up#*.}" -ge "$end" ]; then
      echo "hpodlb: @STOPPED@" >&2
      kill -KILL -"$pg"
      return
    fi
    if [ "$link" -gt 1 ] && ! kill -0 "$link" 2>/dev/null; then kill -KILL -"$pg"; return; fi
    sleep 0.2 2>/dev/null
  done
}
hpodlb_guard </dev/null >/dev/null &
trap "kill $! 2>/dev/null" EXIT
"""


def bounded(script: bytes, seconds: float) -> bytes:
    """`script` run so that it ends, with all it started, after `seconds` or with its session."""
    guard = _GUARD.replace("@CENTISECONDS@", str(round(seconds * 100)))
    return guard.replace("@STOPPED@", STOPPED.format(seconds=seconds)).encode() + script


def _said(rc: int, out: str, err: str, seconds: float) -> tuple[bool, str]:
    """(whether its limit stopped the script, what it said): the limit's own words, or the first
    line the script wrote (stderr first)."""
    stopped = STOPPED.format(seconds=seconds)
    said = err.strip().splitlines() or out.strip().splitlines() or [f"exit status {rc}"]
    if f"hpodlb: {stopped}" in said:
        return True, stopped
    return False, said[0][:200]


def count_seconds(timeout: float) -> float:
    """How long counting may take in all: a login (a connect and key exchange, authentication,
    each within `timeout`), the script within SCRIPT_SECONDS, and slack."""
    return 2 * timeout + SCRIPT_SECONDS + 10


def count_sessions(
    connector: SshConnector, ip: str, pin: frozenset[str], seconds: float = SCRIPT_SECONDS
) -> int:
    """Authenticated SSH connections on the node, hpodlb's own excepted; SshError if unknown."""
    with connector.session(ip, pin) as session:
        rc, out, err = session.run_root(bounded(SESSIONS_SCRIPT, seconds))
    words = out.split()
    if rc != 0 or len(words) != 2 or words[0] != "hpodlb-sessions" or not words[1].isdigit():
        stopped, said = _said(rc, out, err, seconds)
        raise SshError(
            "sessions", said if stopped else f"cannot count them ({said}; needs ps and awk)"
        )
    return int(words[1])


def tell_users(
    connector: SshConnector,
    ip: str,
    pin: frozenset[str],
    message: str,
    seconds: float = SCRIPT_SECONDS,
) -> None:
    """`wall` on the node. The message is one printable line (check_reason), so the quoted
    here-document cannot end early and nothing in it reaches a shell."""
    script = f"wall <<'HPODLB_NOTICE'\n{message}\nHPODLB_NOTICE\necho hpodlb-wall-ok\n".encode()
    with connector.session(ip, pin) as session:
        rc, out, err = session.run_root(bounded(script, seconds))
    if rc != 0 or "hpodlb-wall-ok" not in out:
        raise SshError("wall", _said(rc, out, err, seconds)[1])
