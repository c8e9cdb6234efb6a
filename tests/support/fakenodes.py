"""A fake SSH connector for fast tests of the trust rules, *beside* their real-sshd tests.

It is a fake, so it proves only what hpodlb decides and asks for (which node gets a session,
pinned to what, and whether anything is sent), never that paramiko or sshd behave: that is what
`test_trust.py` and `test_hostkeys.py` do on real OpenSSH nodes. It enforces a session's pin the
way `sshnode.ParamikoConnector` does, and understands hpodlb's own push and read scripts well
enough to change what a node presents.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache

from hpodlb.keystore import (
    HostKey,
    KeyStoreError,
    fingerprint,
    generate,
    key_type_of,
    public_from_private,
)
from hpodlb.sshnode import SshError

TYPES = ("rsa", "ecdsa", "ed25519")


@cache
def _premade(n: int) -> dict[str, HostKey]:
    return {t: generate(t) for t in TYPES}


class KeySets:
    """Distinct key sets for one test, made once per session and shared by every test after:
    an RSA-3072 key costs ~0.5 s to make, and what these tests need is only that keys differ."""

    def __init__(self) -> None:
        self._next = 0

    def take(self) -> dict[str, HostKey]:
        self._next += 1
        return dict(_premade(self._next - 1))

    def key(self, key_type: str) -> HostKey:
        return self.take()[key_type]


@dataclass
class FakeNode:
    """A login node: the keys it holds and presents, and everything sent to it."""

    keys: dict[str, HostKey]
    offered: tuple[str, ...] = TYPES
    probe_error: Exception | None = None
    session_error: Exception | None = None
    answered_by: FakeNode | None = None  # another host answering logged-in sessions (a proxy)
    scripts: list[bytes] = field(default_factory=list)
    sessions: int = 0

    @classmethod
    def fresh(cls, keysets: KeySets, **kw: object) -> FakeNode:
        return cls(keys=keysets.take(), **kw)  # type: ignore[arg-type]

    def presents(self, key_type: str) -> str | None:
        return self.keys[key_type].public if key_type in self.offered else None


class FakeConnector:
    def __init__(self, nodes: dict[str, FakeNode]) -> None:
        self.nodes = nodes

    def probe(self, ip: str, key_type: str) -> str | None:
        node = self.nodes.get(ip)
        if node is None:
            raise SshError("connect", "Connection refused")
        if node.probe_error is not None:
            raise node.probe_error
        return node.presents(key_type)

    @contextmanager
    def session(self, ip: str, pin: frozenset[str]) -> Iterator[FakeSession]:
        endpoint = self.nodes[ip].answered_by or self.nodes[ip]
        if endpoint.session_error is not None:
            raise endpoint.session_error
        pinned_types = {key_type_of(line) for line in pin}
        shown = next(
            endpoint.presents(t) for t in TYPES if t in pinned_types and endpoint.presents(t)
        )
        if shown not in pin:
            raise SshError(
                "host-key",
                f"presents {fingerprint(shown or '')}, expected "
                f"{', '.join(sorted(fingerprint(p) for p in pin))}; not trusted, nothing sent",
            )
        endpoint.sessions += 1
        yield FakeSession(endpoint)


class FakeSession:
    def __init__(self, node: FakeNode) -> None:
        self.node = node

    def run_root(self, script: bytes) -> tuple[int, str, str]:
        self.node.scripts.append(script)
        text = script.decode()
        if "base64 -w0" in text:  # the read script (adoption)
            lines = [
                f"{t} {base64.b64encode(k.private).decode()}" for t, k in self.node.keys.items()
            ]
            return 0, "\n".join(lines) + "\n", ""
        payloads = [
            base64.b64decode(b) for b in re.findall(r"printf '%s' '([A-Za-z0-9+/=]+)'", text)
        ]
        privates = [p for p in payloads if p.startswith(b"-----BEGIN")]
        for private in privates:
            for key_type in TYPES:
                try:
                    public = public_from_private(private, key_type)
                except KeyStoreError:
                    continue  # not a key of this type
                self.node.keys[key_type] = HostKey(key_type, private, public)
        return 0, "hpodlb-ok\n", ""
