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

# Every `USER [priv]` process (sshd's monitor of one logged-in connection; `unknown [priv]` has
# not said who it is yet) in this node's mount namespace, except hpodlb's own: those whose
# session runs hpodlb's root shell (ROOT_SHELL, perhaps under `sudo -n`: pushes, counts, doctor,
# from this or another hpodlb of this build or later; a user's own `ssh node sh -s` is counted,
# and so is an older hpodlb's, which ran `sh -s` alone). Not only the listener's children:
# sessions outlive an sshd restart (apt upgrades do that), and are reparented away from the new
# listener. The mount namespace keeps the count to this node where one kernel hosts several (the
# simulated login nodes). A connection of hpodlb's caught before its script starts or after it
# ends is counted: one poll's worth.
SESSIONS_SCRIPT = rb"""mine=$(readlink /proc/$$/ns/mnt)
ps -ww -eo pid=,ppid=,args= | awk '
function priv(p) {
  return args[p] ~ /^sshd(-session)?: [^ ]+ \[priv\]$/ && args[p] !~ /: unknown \[priv\]$/
}
{ pid = $1; parent[pid] = $2; $1 = ""; $2 = ""; sub(/^ +/, ""); args[pid] = $0 }
END {
  for (q in args) if (args[q] ~ /^(sudo -n )?@ROOT_SHELL@$/) {
    p = q
    while ((p in parent) && p > 1) { if (priv(p)) { ours[p] = 1; break }; p = parent[p] }
  }
  for (q in args) if (priv(q) && !(q in ours)) print q
}' | {
  n=0
  while read -r p; do
    ns=$(readlink "/proc/$p/ns/mnt" 2>/dev/null)
    if [ -z "$ns" ] || [ "$ns" = "$mine" ]; then n=$((n + 1)); fi
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
