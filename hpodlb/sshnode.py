"""The SSH adapter (paramiko): what host key a node presents, and a root script run on it.

`SshConnector` is the seam the host-key side is written against; `ParamikoConnector` is the real
one, tests may pass another. Two promises hold for every call:
- **Bounded.** Each step has a *total* deadline (a timer that closes the socket), not only a
  per-read timeout, so a node that trickles one byte every few seconds costs one deadline; remote
  output is capped, so a node that floods costs a few hundred KiB, never the daemon's memory.
- **Pinned.** A logged-in session trusts exactly the public keys it is given (`pin`) and nothing
  else: the caller decides what it can vouch for (see `identity.py`), this module only enforces it.
  A session to an endpoint presenting another key fails before anything is sent.
Key bytes only ever travel inside the SSH channel, on the remote script's stdin; nothing here logs a
script or its output, only the step that failed.
"""

from __future__ import annotations

import contextlib
import heapq
import io
import pwd
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from hpodlb.files import (
    UntrustedPathError,
    UnusableFileError,
    os_reason,
    read_trusted_file,
)
from hpodlb.keystore import ALGORITHMS, BLOB_TYPES, KEY_FILE_MAX_BYTES, fingerprint

if TYPE_CHECKING:
    import paramiko

OUTPUT_CAP_BYTES = 256 * 1024
ROOT_SHELL = "sh -s hpodlb"  # how hpodlb runs its scripts on a node (see _ParamikoSession.run_root)


class SshError(Exception):
    """A node could not be reached or refused us; `step` says where (connect, auth, sudo, ...)."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step


@dataclass(frozen=True)
class SshSettings:
    user: str
    port: int
    key_file: str
    sudo: bool
    timeout: float

    @property
    def login_deadline(self) -> float:
        """Connect, banner, key exchange and authentication together."""
        return 2 * self.timeout

    @property
    def command_deadline(self) -> float:
        """A remote script from start to exit status (sshd -t and a reload take a few seconds)."""
        return max(30.0, 3 * self.timeout)


class Session(Protocol):
    def run_root(self, script: bytes) -> tuple[int, str, str]:
        """Run `script` as root; (exit status, stdout, stderr), bounded and capped."""
        ...


class SshConnector(Protocol):
    def probe(self, ip: str, key_type: str) -> str | None:
        """The `algo base64` key the node presents for `key_type`, None when it offers none."""
        ...

    def session(self, ip: str, pin: frozenset[str]) -> AbstractContextManager[Session]:
        """A logged-in `Session` that trusts only `pin`, closed when the block ends."""
        ...


def known_hosts_name(host: str, port: int) -> str:
    """`host`, or `[host]:port` off port 22, as OpenSSH writes known_hosts."""
    return host if port == 22 else f"[{host}]:{port}"


def key_line(key: Any) -> str:
    """`algo base64` of a paramiko key (no comment)."""
    return f"{key.get_name()} {key.get_base64()}"


class LoginKey:
    """The head node's own SSH key (`ssh.key_file`), read as every file hpodlb trusts is
    (`files.py`): a regular file of key size, opened without blocking, so a FIFO put in its place
    costs one error, not a worker thread for good, and a link to /dev/zero is not read without
    end; owned by root or by the login user (the default lives in /home/ubuntu/.ssh), and
    writable by nobody else, all the way up. paramiko is handed the loaded key, never the path.
    A certificate beside it (`KEY-cert.pub`) is taken along, as ssh and paramiko do."""

    def __init__(self, path: str | Path, user: str) -> None:
        self.path = Path(path)
        self.user = user
        self._owners = _login_user(user)
        self._lock = threading.Lock()
        self._parsed: tuple[bytes, bytes | None, Any] | None = None

    def load(self) -> paramiko.PKey:
        """The key, read again each call and parsed again only when its bytes changed (an RSA
        key costs ~50 ms of CPU); SshError at step `key`, naming the file and the problem."""
        data = self._read(self.path)
        cert_path = Path(f"{self.path}-cert.pub")
        cert = self._read(cert_path) if cert_path.exists() or cert_path.is_symlink() else None
        with self._lock:
            if self._parsed is not None and self._parsed[:2] == (data, cert):
                return self._parsed[2]
        key = _parse_login_key(data, self.path)
        if cert is not None:
            try:
                key.load_certificate(cert.decode(errors="replace"))
            except (ValueError, IndexError, TypeError) as exc:
                raise SshError(
                    "key", f"ssh.key_file {cert_path}: not a certificate of this key ({exc})"
                ) from None
        with self._lock:
            self._parsed = (data, cert, key)
        return key

    def _read(self, path: Path) -> bytes:
        try:
            return read_trusted_file(path, KEY_FILE_MAX_BYTES, self._owners)
        except FileNotFoundError:
            raise SshError("key", f"ssh.key_file {path}: file not found") from None
        except (UntrustedPathError, UnusableFileError) as exc:
            raise SshError("key", f"ssh.key_file {exc}") from None
        except OSError as exc:
            raise SshError("key", f"ssh.key_file {path}: cannot read ({os_reason(exc)})") from None


def _login_user(user: str) -> dict[int, str]:
    """The login user as a further owner of its key, when it is an account on this head node."""
    try:
        return {pwd.getpwnam(user).pw_uid: user}
    except KeyError:
        return {}


def _parse_login_key(data: bytes, path: Path) -> paramiko.PKey:
    """An OpenSSH or PEM private key (RSA, ECDSA, Ed25519) as paramiko's key class for it; no
    part of the key is ever in a message."""
    import paramiko
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    loaded: object
    try:
        try:
            loaded = serialization.load_ssh_private_key(data, password=None)
        except ValueError:
            loaded = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography's word for "a password is needed"
        raise SshError(
            "key", f"ssh.key_file {path} is passphrase-protected; hpodlb needs a key without one"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise SshError(
            "key", f"ssh.key_file {path}: not an SSH private key (OpenSSH or PEM)"
        ) from None
    classes: tuple[tuple[type, type[paramiko.PKey]], ...] = (
        (rsa.RSAPrivateKey, paramiko.RSAKey),
        (ec.EllipticCurvePrivateKey, paramiko.ECDSAKey),
        (ed25519.Ed25519PrivateKey, paramiko.Ed25519Key),
    )
    cls = next((c for kind, c in classes if isinstance(loaded, kind)), None)
    if cls is None:
        raise SshError(
            "key",
            f"ssh.key_file {path}: a {type(loaded).__name__}, not an RSA, ECDSA or Ed25519 key",
        )
    try:
        return cls.from_private_key(io.StringIO(data.decode()))
    except (paramiko.SSHException, ValueError):
        raise SshError("key", f"ssh.key_file {path}: paramiko cannot use this key") from None


class ParamikoConnector:
    """The real connector: paramiko over TCP, with deadlines and pins."""

    def __init__(self, settings: SshSettings, output_cap: int = OUTPUT_CAP_BYTES) -> None:
        self.settings = settings
        self.output_cap = output_cap
        self.login_key = LoginKey(settings.key_file, settings.user)

    def probe(self, ip: str, key_type: str) -> str | None:
        import paramiko

        others = [a for t, algs in ALGORITHMS.items() if t != key_type for a in algs]
        timeout = self.settings.timeout
        sock = _connect(ip, self.settings.port, timeout)
        transport = paramiko.Transport(sock, disabled_algorithms={"keys": others})
        transport.banner_timeout = timeout
        transport.handshake_timeout = timeout
        try:
            with _deadline(sock, timeout) as expired:
                try:
                    transport.start_client(timeout=timeout)
                    if not transport.initial_kex_done:  # start_client gives up silently
                        raise SshError("handshake", f"timed out after {timeout:.0f}s")
                    return key_line(transport.get_remote_server_key())
                except paramiko.SSHException as exc:
                    if "no acceptable host key" in str(exc) or "Incompatible" in str(exc):
                        return None
                    raise SshError("handshake", _why(exc, expired, timeout)) from None
                except (OSError, EOFError) as exc:
                    raise SshError("handshake", _why(exc, expired, timeout)) from None
        finally:
            transport.close()
            sock.close()

    @contextmanager
    def session(self, ip: str, pin: frozenset[str]) -> Iterator[Session]:
        client = _login(ip, self.settings, pin, self.login_key)
        try:
            yield _ParamikoSession(client, self.settings, self.output_cap)
        finally:
            client.close()


class _NotPinnedError(Exception):
    def __init__(self, key: Any) -> None:
        super().__init__()
        self.line = key_line(key)


class _Pinned:
    """paramiko policy: accept exactly the pinned keys (the client holds no known_hosts)."""

    def __init__(self, pin: frozenset[str]) -> None:
        self.pin = pin

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
        if key_line(key) not in self.pin:
            raise _NotPinnedError(key)


def _login(ip: str, s: SshSettings, pin: frozenset[str], key: LoginKey) -> paramiko.SSHClient:
    import paramiko

    if not pin:
        raise SshError("host-key", "no verified host key to pin this session to; nothing sent")
    pkey = key.load()  # before any connection: a key that cannot be used costs the node nothing
    pinned_types = {line.split()[0] for line in pin}
    # Offer only algorithms of pinned key types, so the server cannot pick one we cannot check.
    disabled = [
        a for t, algs in ALGORITHMS.items() if not pinned_types & set(BLOB_TYPES[t]) for a in algs
    ]
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(_Pinned(pin))
    sock = _connect(ip, s.port, s.timeout)
    try:
        with _deadline(sock, s.login_deadline) as expired:
            try:
                client.connect(
                    ip,
                    port=s.port,
                    username=s.user,
                    pkey=pkey,
                    sock=sock,
                    timeout=s.timeout,
                    banner_timeout=s.timeout,
                    auth_timeout=s.timeout,
                    channel_timeout=s.timeout,
                    look_for_keys=False,
                    allow_agent=False,
                    disabled_algorithms={"keys": disabled},
                )
            except _NotPinnedError as exc:
                expected = ", ".join(sorted(fingerprint(p) for p in pin))
                raise SshError(
                    "host-key",
                    f"presents {fingerprint(exc.line)}, expected {expected}; not trusted, "
                    "nothing sent",
                ) from None
            except paramiko.AuthenticationException as exc:
                raise SshError("auth", f"login as {s.user} refused ({exc})") from None
            except (paramiko.SSHException, OSError, EOFError, ValueError) as exc:
                raise SshError("connect", _why(exc, expired, s.login_deadline)) from None
    except BaseException:
        client.close()
        sock.close()
        raise
    return client


class _ParamikoSession:
    def __init__(self, client: paramiko.SSHClient, settings: SshSettings, cap: int) -> None:
        self.client = client
        self.settings = settings
        self.cap = cap

    def server_key(self) -> str:
        """The host key this session's server proved it holds (`algo base64`): pinned, so trusted."""
        transport = self.client.get_transport()
        if transport is None:
            raise SshError("command", "connection closed")
        return key_line(transport.get_remote_server_key())

    def run_root(self, script: bytes) -> tuple[int, str, str]:
        """`sh -s hpodlb` as root (through `sudo -n` when configured), the script on stdin only.
        The `hpodlb` argument ($1, unused) marks the process, so that counting a node's users
        can leave out hpodlb's own connections without leaving out a user's `ssh node sh -s`."""
        command = f"sudo -n {ROOT_SHELL}" if self.settings.sudo else ROOT_SHELL
        limit = self.settings.command_deadline
        transport = self.client.get_transport()
        if transport is None:
            raise SshError("command", "connection closed")
        # paramiko waits for the answer to exec_command, and for window space in sendall, with
        # no timeout: a node that freezes after login would hold this thread for good. Past the
        # command's own deadline (and a grace for its message), the connection is shut.
        hard = limit + 5
        with _deadline(transport.sock, hard) as expired:
            try:
                channel = transport.open_session(timeout=self.settings.timeout)
                try:
                    channel.fileno()  # arms the pipe that select() waits on, before any data
                    channel.exec_command(command)
                    _send_script(channel, script)
                    rc, out, err = _collect(channel, time.monotonic() + limit, limit, self.cap)
                finally:
                    channel.close()
            except SshError:
                raise
            except Exception as exc:  # paramiko: ChannelException, SSHException, OSError, EOFError
                raise SshError("command", _why(exc, expired, hard)) from None
        if self.settings.sudo and rc == 1 and err.startswith("sudo:"):
            reason = err.strip().splitlines()[0].removeprefix("sudo:").strip()
            raise SshError(
                "sudo", f"{reason} (ssh.user {self.settings.user} needs passwordless sudo)"
            )
        return rc, out, err


def _send_script(channel: Any, script: bytes) -> None:
    """The script on stdin, then EOF. A command that ends without reading it (`sudo -n` refusing:
    a password is required) may have closed the channel first; on a busy head node that race is
    common. What it said and its exit status are still there to read, so that is the answer,
    not the closed socket."""
    try:
        channel.sendall(script)
        channel.shutdown_write()
    except OSError:
        if not channel.exit_status_ready():
            raise


def _collect(channel: Any, deadline: float, limit: float, cap: int) -> tuple[int, str, str]:
    """Read stdout and stderr until exit, within the deadline and the output cap.

    The cap counts both streams together and is checked at every read, each read asking for no
    more than is left of it: a node that writes faster than we read keeps the receive loops
    going, so a check after them would let it fill memory first."""
    out, err = bytearray(), bytearray()
    streams = (
        (channel.recv_ready, channel.recv, out),
        (channel.recv_stderr_ready, channel.recv_stderr, err),
    )
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise SshError("command", f"no exit status within {limit:.0f}s (node too slow)")
        select.select([channel], [], [], min(left, 0.5))
        for ready, receive, into in streams:
            while ready():
                into.extend(receive(min(65536, cap + 1 - len(out) - len(err))))
                if len(out) + len(err) > cap:
                    raise SshError("command", f"output exceeded {cap // 1024} KiB; stopped reading")
        drained = not channel.recv_ready() and not channel.recv_stderr_ready()
        if channel.exit_status_ready() and drained:
            break
    return (
        channel.recv_exit_status(),
        out.decode(errors="replace"),
        err.decode(errors="replace"),
    )


def _connect(ip: str, port: int, timeout: float) -> socket.socket:
    try:
        return socket.create_connection((ip, port), timeout=timeout)
    except OSError as exc:
        raise SshError("connect", _why(exc, False, timeout)) from None


class _Reaper:
    """One thread that shuts sockets down at their deadline: a timer thread per SSH step would
    cost a thread start each, a quarter of a probe's CPU."""

    def __init__(self) -> None:
        self._due: list[tuple[float, int, socket.socket, threading.Event]] = []
        self._count = 0
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(
        self, sock: socket.socket, seconds: float
    ) -> tuple[float, int, socket.socket, threading.Event]:
        with self._wake:
            self._count += 1
            entry = (time.monotonic() + seconds, self._count, sock, threading.Event())
            heapq.heappush(self._due, entry)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="hpodlb-deadlines", daemon=True
                )
                self._thread.start()
            self._wake.notify()
        return entry

    def remove(self, entry: tuple[float, int, socket.socket, threading.Event]) -> None:
        with self._wake, contextlib.suppress(ValueError):
            self._due.remove(entry)
            heapq.heapify(self._due)

    def _run(self) -> None:
        with self._wake:
            while True:
                now = time.monotonic()
                while self._due and self._due[0][0] <= now:
                    _, _, sock, expired = heapq.heappop(self._due)
                    expired.set()
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                self._wake.wait(self._due[0][0] - now if self._due else None)


_REAPER = _Reaper()


@contextmanager
def _deadline(sock: socket.socket, seconds: float) -> Iterator[threading.Event]:
    """Close `sock` for reading and writing once `seconds` have passed; the event says it did."""
    entry = _REAPER.add(sock, seconds)
    try:
        yield entry[3]
    finally:
        _REAPER.remove(entry)


def _why(exc: BaseException, expired: bool | threading.Event, seconds: float) -> str:
    if expired is True or (isinstance(expired, threading.Event) and expired.is_set()):
        return f"timed out after {seconds:.0f}s in total"
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
