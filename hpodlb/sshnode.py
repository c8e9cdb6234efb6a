"""The SSH adapter (paramiko): probe the host key a node presents, and run a root script on it.

Every network step is bounded by `ssh.connect_timeout_seconds` (connect, banner, handshake, auth)
and every remote command by a few times that, so a node that accepts TCP and never speaks costs one
timeout, never a hung pass. Key bytes only ever travel inside the SSH channel, on the remote
script's stdin; nothing here logs a script or its output, only the step that failed.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hpodlb.keystore import ALGORITHMS, fingerprint
from hpodlb.logs import get_logger

if TYPE_CHECKING:
    import paramiko

log = get_logger("hpodlb.ssh")


class SshError(Exception):
    """A node could not be reached or refused us; `step` says where (connect, auth, sudo, ...)."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step


class KeyTypeMissingError(Exception):
    """The node answered but offers no host key of this type (it needs the canonical one)."""


@dataclass(frozen=True)
class SshSettings:
    user: str
    port: int
    key_file: str
    sudo: bool
    timeout: float

    @property
    def command_timeout(self) -> float:
        return max(30.0, 3 * self.timeout)


def known_hosts_name(ip: str, port: int) -> str:
    return ip if port == 22 else f"[{ip}]:{port}"


def probe_host_key(ip: str, port: int, key_type: str, timeout: float) -> str:
    """One handshake restricted to `key_type`, no login: the public key line the node presents."""
    import paramiko

    others = [a for t, algs in ALGORITHMS.items() if t != key_type for a in algs]
    try:
        sock = socket.create_connection((ip, port), timeout=timeout)
    except OSError as exc:
        raise SshError("connect", _why(exc)) from None
    transport = paramiko.Transport(sock, disabled_algorithms={"keys": others})
    transport.banner_timeout = timeout
    transport.handshake_timeout = timeout
    try:
        transport.start_client(timeout=timeout)
        key = transport.get_remote_server_key()
    except paramiko.SSHException as exc:
        if "no acceptable host key" in str(exc) or "Incompatible" in str(exc):
            raise KeyTypeMissingError(key_type) from None
        raise SshError("handshake", _why(exc)) from None
    except (OSError, EOFError) as exc:
        raise SshError("handshake", _why(exc)) from None
    finally:
        transport.close()
        sock.close()
    return f"{key.get_name()} {key.get_base64()}"


class NodeSession:
    """A logged-in SSH session to one node, trusting only the host keys it is told to."""

    def __init__(
        self, ip: str, settings: SshSettings, pinned: Sequence[str] | None, instance_id: str = ""
    ) -> None:
        """`pinned`: public key lines the node must present; None is trust-on-first-use (logged)."""
        self.ip = ip
        self.instance_id = instance_id
        self.settings = settings
        self.pinned = pinned
        self.client: paramiko.SSHClient | None = None

    def __enter__(self) -> NodeSession:
        import paramiko

        client = paramiko.SSHClient()
        name = known_hosts_name(self.ip, self.settings.port)
        if self.pinned is None:
            client.set_missing_host_key_policy(_TrustOnFirstUse(self.ip, self.instance_id))
        else:
            for line in self.pinned:
                kind, blob = line.split()[:2]
                client.get_host_keys().add(
                    name, kind, paramiko.PKey.from_type_string(kind, _b64(blob))
                )
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        s = self.settings
        try:
            client.connect(
                self.ip,
                port=s.port,
                username=s.user,
                key_filename=s.key_file,
                timeout=s.timeout,
                banner_timeout=s.timeout,
                auth_timeout=s.timeout,
                channel_timeout=s.timeout,
                look_for_keys=False,
                allow_agent=False,
            )
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise SshError(
                "host-key",
                f"presents {fingerprint(_line(exc.key))}, not the verified key; not trusted",
            ) from None
        except paramiko.AuthenticationException as exc:
            client.close()
            raise SshError("auth", f"login as {s.user} refused ({exc})") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            client.close()
            raise SshError("connect", _why(exc)) from None
        self.client = client
        return self

    def __exit__(self, *exc: object) -> None:
        if self.client is not None:
            self.client.close()

    def run_root_script(self, script: bytes) -> tuple[int, str, str]:
        """Run `sh -s` as root (through `sudo -n` when configured), the script on stdin only."""
        assert self.client is not None
        command = "sudo -n sh -s" if self.settings.sudo else "sh -s"
        timeout = self.settings.command_timeout
        try:
            stdin, stdout, stderr = self.client.exec_command(command, timeout=timeout)
            stdin.write(script)
            stdin.flush()
            stdin.channel.shutdown_write()
            out = stdout.read().decode(errors="replace")
            err = stderr.read().decode(errors="replace")
            if not stdout.channel.status_event.wait(timeout):
                raise SshError("command", f"no exit status within {timeout:.0f}s")
            rc = stdout.channel.recv_exit_status()
        except (OSError, EOFError) as exc:
            raise SshError("command", _why(exc)) from None
        if self.settings.sudo and rc == 1 and err.startswith("sudo:"):
            raise SshError("sudo", err.strip().splitlines()[0])
        return rc, out, err


class _TrustOnFirstUse:
    """paramiko policy for a node listed in the root-owned resource config but never verified."""

    def __init__(self, ip: str, instance_id: str) -> None:
        self.ip = ip
        self.instance_id = instance_id

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
        log.warning(
            "ssh_trust_on_first_use",
            ip=self.ip,
            instance_id=self.instance_id,
            fingerprint=fingerprint(f"{key.get_name()} {key.get_base64()}"),
            why="node listed in the resource config, host keys not verified yet",
        )


def _line(key: Any) -> str:
    return f"{key.get_name()} {key.get_base64()}"


def _b64(text: str) -> bytes:
    import base64

    return base64.b64decode(text)


def _why(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    return text.splitlines()[0][:200]
