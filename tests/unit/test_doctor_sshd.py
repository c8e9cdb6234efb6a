"""doctor judges the port sshd listens on (issue 23, item 11), from `sshd -T` as OpenSSH prints it:
`ListenAddress IP:PORT` keeps its own port while `port` still says 22. The outputs below are
OpenSSH 9.2's `sshd -T` for the sshd_config named above each (the settings doctor reads);
`tests/e2e/test_doctor.py` runs a real sshd configured so."""

from __future__ import annotations

from hpodlb.diagnose import Status
from hpodlb.diagnosenode import sshd

NODE, NODE6 = "10.0.0.5", "fd00::5"
KEEPALIVE = "clientaliveinterval 60\nhostkey /etc/ssh/ssh_host_ed25519_key\n"
# ListenAddress 10.0.0.5:44461
PINNED = "port 22\naddressfamily any\nlistenaddress 10.0.0.5:44461\n"
# ListenAddress [fd00::5]:44461 / ListenAddress 10.0.0.5
PINNED_V6 = "port 22\naddressfamily any\nlistenaddress [fd00::5]:44461\nlistenaddress 10.0.0.5:22\n"
# (nothing: the defaults)
DEFAULT = "port 22\naddressfamily any\nlistenaddress [::]:22\nlistenaddress 0.0.0.0:22\n"
# ListenAddress 127.0.0.1:44461
LOOPBACK = "port 22\naddressfamily any\nlistenaddress 127.0.0.1:44461\n"
# Port 2222 / Port 2223 / AddressFamily inet
TWO_PORTS = (
    "port 2222\nport 2223\naddressfamily inet\nlistenaddress 0.0.0.0:2222\n"
    "listenaddress 0.0.0.0:2223\n"
)


def judged(ip: str, sshd_t: str, port: int) -> list[tuple[Status, str]]:
    found = sshd(ip, sshd_t + KEEPALIVE, [port], "/etc/ssh", ("ed25519",), 350)
    return [(f.status, f.found) for f in found]


def test_the_port_is_where_sshd_listens_not_the_port_line() -> None:
    """`ListenAddress IP:PORT` on the node's address passes on PORT and fails on 22, whatever
    `port` says; IPv6 `[ADDR]:PORT` likewise, for a node at that address."""
    ok = "sshd on port 44461 with the host keys in /etc/ssh, keepalive every 60s (NLB idle timeout 350s)"
    assert judged(NODE, PINNED, 44461) == [(Status.PASS, ok)]
    assert judged(NODE, PINNED, 22) == [
        (Status.FAIL, "sshd listens on port 44461, the target group sends to 22")
    ]
    assert judged(NODE6, PINNED_V6, 44461) == [(Status.PASS, ok)]
    assert judged(NODE, PINNED_V6, 44461) == [
        (
            Status.FAIL,
            "sshd listens on [fd00::5]:44461, 10.0.0.5:22, not on 10.0.0.5:44461, where the "
            "target group sends",
        )
    ]
    assert judged(NODE, DEFAULT, 22)[0][0] is Status.PASS
    assert judged(NODE6, DEFAULT, 22)[0][0] is Status.PASS
    assert [s for s, _ in judged(NODE, TWO_PORTS, 2223)] == [Status.PASS]


def test_sshd_listening_at_another_address_is_named_with_the_fix() -> None:
    """An sshd bound to loopback (or to IPv6 only) on the right port refuses the NLB: FAIL naming
    the address, and the ListenAddress to set."""
    ((status, found),) = judged(NODE, LOOPBACK, 44461)
    assert (status, found) == (
        Status.FAIL,
        "sshd listens on 127.0.0.1:44461, not on 10.0.0.5:44461, where the target group sends",
    )
    fix = sshd(NODE, LOOPBACK + KEEPALIVE, [44461], "/etc/ssh", ("ed25519",), 350)[0].fix
    assert fix.startswith("make sshd listen on 10.0.0.5:44461 or on every address (ListenAddress")
    v6_only = "port 22\naddressfamily inet6\nlistenaddress [::]:22\n"
    assert judged(NODE, v6_only, 22)[0][0] is Status.FAIL
    assert judged(NODE6, v6_only, 22)[0][0] is Status.PASS
