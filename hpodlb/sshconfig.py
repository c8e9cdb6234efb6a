"""Pure: the `~/.ssh/config` block `hpodlb keys ssh-config` hands users, from facts gathered elsewhere.

Users reach the login pool through the NLB, so every connection may land on another node; some
must reach one node (VS Code Remote-SSH, a tmux to reattach). Without help, OpenSSH looks a host
key up under the name or address typed, so the NLB's DNS name and each node's IP would each need
known_hosts lines of their own. `HostKeyAlias` makes it look up one name for all of them, and
every node presents the same canonical keys, so one set of lines serves the NLB and every node.

The alias is exactly the name `hpodlb keys known-hosts --host NAME --port N` writes: NAME on port
22, `[NAME]:N` on any other. With `HostKeyAlias` set, OpenSSH looks the alias up verbatim and does
not append the port (OpenSSH 9.2: `HostKeyAlias [x]:2022` matches a `[x]:2022` line; `HostKeyAlias
x` with `Port 2022` looks up `x`, not `[x]:2022`). So the lines from the same `--host`/`--port`
match the NLB block and every node alias, whatever port a node's sshd listens on (`ssh.port`,
which may differ from the NLB's listener port).

NAME is lowercase on purpose: OpenSSH lowercases a `HostKeyAlias` before the lookup but matches a
`Host` pattern against what the user typed, so a mixed-case NAME would either miss its own block
or not match the known_hosts lines printed for it. Everything printed is a validated hostname, IP
or port, or a comment reduced to plain characters: a resource config cannot smuggle a directive
(`ProxyCommand`) into a file users paste.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from hpodlb.inventory import LoginNode
from hpodlb.sshnode import known_hosts_name

# A name users type: what a hostname label allows, lowercase, and `_`; no whitespace, no ssh
# pattern characters (`*`, `?`, `!`, `,`), nothing ssh would expand (`%`).
_NAME = re.compile(r"[a-z0-9](?:[a-z0-9._-]{0,200}[a-z0-9])?")
_DNS_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
_PLAIN = re.compile(r"[^A-Za-z0-9._:-]")


def check_name(text: str) -> str:
    """`text` if it is a safe NAME for `Host` and `HostKeyAlias`, else ValueError saying why."""
    if _NAME.fullmatch(text):
        return text
    if _NAME.fullmatch(text.lower()):
        raise ValueError(
            f"{text!r}: use lowercase (ssh lowercases a HostKeyAlias, not a Host name)"
        )
    raise ValueError(
        f"{text!r} is not a host name users can type: letters a-z, digits, '.', '-', '_', "
        "starting and ending with a letter or digit"
    )


def check_dns_name(text: str) -> str:
    """`text` if it is a DNS name fit for `HostName`, else ValueError."""
    if _DNS_NAME.fullmatch(text) and ".." not in text:
        return text
    raise ValueError(f"{text!r} is not a DNS name")


def host_key_alias(name: str, port: int) -> str:
    """The one name ssh looks the keys up under: the name `keys known-hosts` writes for NAME, N."""
    return known_hosts_name(name, port)


def render(name: str, port: int, dns_name: str, nodes: Sequence[LoginNode], node_port: int) -> str:
    """The NLB block (`Host NAME`, `HostName dns_name`, `Port port`), then `Host NAME-i` for the
    i-th login node in `nodes` (the resource config's order), at its IP and `node_port`.

    `CheckHostIP no`: the NLB's addresses are AWS's and change; clients before OpenSSH 8.5 check
    the address by default and would add each one to the user's known_hosts, and warn when AWS
    gives it to another load balancer.
    """
    alias = host_key_alias(name, port)
    flag = f" --port {port}" if port != 22 else ""
    lines = [
        f"# For ~/.ssh/config, above any `Host *` block (hpodlb keys ssh-config --host {name}{flag}).",
        f"# Host keys: the lines of `hpodlb keys known-hosts --host {name}{flag}` in ~/.ssh/known_hosts.",
        *_block(name, check_dns_name(dns_name), port, alias),
    ]
    for index, node in enumerate(nodes, start=1):
        lines.append("")
        if index == 1:
            lines.append("# One alias per login node, in the resource config's order (it changes")
            lines.append("# as login nodes come and go: hand the block out again then).")
        lines.append(f"# {name}-{index}: {_plain(node.instance_id)} ({_plain(node.group)})")
        lines += _block(f"{name}-{index}", node.ip, node_port, alias)
    return "\n".join(lines)


def _block(host: str, hostname: str, port: int, alias: str) -> list[str]:
    return [
        f"Host {host}",
        f"    HostName {hostname}",
        f"    Port {port}",
        f"    HostKeyAlias {alias}",
        "    CheckHostIP no",
    ]


def _plain(text: str) -> str:
    """For a comment: the resource config's text with anything but plain characters as `?`."""
    return _PLAIN.sub("?", text)[:80]
