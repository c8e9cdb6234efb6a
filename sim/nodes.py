"""Simulated login nodes: real OpenSSH `sshd` processes, one per loopback address.

Each simulated cluster holds a /24 of 127.0.0.0/8 and a port of its own (an flock per block under
/run/lock, so two test runs on one machine never share an address), and a node counts as started
only when the sshd answering at its address presents one of that node's own host keys.

Each node runs in its own mount namespace (`unshare -m`) with a private dir bind-mounted on
`/etc/ssh`, so `sshd -t`, host-key files and the reload command behave per node exactly as on a
login node. Each namespace also sees its own `/etc/passwd`, `/etc/shadow`, `/etc/group` and
`/etc/sudoers` (the host's plus one login user with key auth and passwordless sudo), and its own
`/run` (a tmpfs: sshd's privsep dir and a utmp, so `wall` reaches this node's terminals only), so
nothing on the host changes. Those files live in a private `/etc` (a directory mounted over the
host's, every other entry a symlink to the host's own): a bind mount of a single file is detached
when the host renames a new file over it (any `useradd`), which made the login user vanish from
running nodes. The login user's home (and `authorized_keys`) is shared by every node, as HyperPod's FSx
home is. Needs root.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

SIM_USER = "hpodlbsim"
SIM_UID = 64321
LOCK_DIR = Path("/run/lock")
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
KEY_TYPES = ("rsa", "ecdsa", "ed25519")
# The simulated nodes' reload: SIGHUP to their sshd. Marker files in a node's /etc/ssh inject
# faults: `fail-reload` makes the command fail, `die-on-reload` kills sshd instead (a node that
# dies between push and verify), `revert-on-reload` puts the previous key files back first (config
# management on the node that owns the keys), so the node keeps presenting its own keys.
RELOAD_COMMAND = (
    "if [ -e /etc/ssh/die-on-reload ]; then kill -TERM $(cat /etc/ssh/sshd.pid); "
    "else if [ -e /etc/ssh/revert-on-reload ]; then for f in /etc/ssh/*.hpodlb-previous; do "
    'cp -p "$f" "${f%.hpodlb-previous}"; done; fi; '
    "test ! -e /etc/ssh/fail-reload && kill -HUP $(cat /etc/ssh/sshd.pid); fi"
)


class AddressBlock:
    """127.A.B.0/24 and a port, held by this process alone until `release` (or its death)."""

    def __init__(self) -> None:
        rng = random.SystemRandom()
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        for _ in range(1000):
            a, b = rng.randrange(1, 255), rng.randrange(0, 256)
            fd = os.open(LOCK_DIR / f"hpodlb-sim-127.{a}.{b}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.fd: int | None = fd
            self.prefix = f"127.{a}.{b}"
            # Below the kernel's ephemeral range, so no outgoing connection ever holds it.
            self.port = rng.randrange(10000, 30000)
            return
        raise RuntimeError(f"no free simulated address block under {LOCK_DIR}")

    def ip(self, n: int) -> str:
        """The n-th address of the block (1..254)."""
        if not 1 <= n <= 254:
            raise ValueError(f"address {n} is outside the block")
        return f"{self.prefix}.{n}"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class SimNode:
    """One login node: an sshd in its own mount namespace on `ip:cluster.port`."""

    def __init__(self, cluster: SimCluster, ip: str, instance_id: str) -> None:
        self.cluster = cluster
        self.ip = ip
        self.instance_id = instance_id
        self.dir = cluster.base / "nodes" / ip
        self.etc_ssh = self.dir / "etc-ssh"
        self.proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle ----------------------------------------------------------------------------------

    def create(self, *, sudo_nopasswd: bool = True, keys_from: Path | None = None) -> None:
        self.etc_ssh.mkdir(parents=True, mode=0o755)
        self.write_sshd_config()
        if keys_from is None:
            self.new_host_keys()
        else:  # many nodes for a load test: copying is 100x faster than generating
            for t in KEY_TYPES:
                for suffix in ("", ".pub"):
                    shutil.copy2(keys_from / f"ssh_host_{t}_key{suffix}", self.etc_ssh)
        sudoers = self.dir / "sudoers"
        rule = "NOPASSWD: ALL" if sudo_nopasswd else "ALL"
        sudoers.write_text(
            f"Defaults secure_path=/usr/sbin:/usr/bin:/sbin:/bin\nroot ALL=(ALL) ALL\n{SIM_USER} ALL=(ALL) {rule}\n"
        )
        sudoers.chmod(0o440)

    def write_sshd_config(self, extra: str = "") -> None:
        (self.etc_ssh / "sshd_config").write_text(
            f"ListenAddress {self.ip}\nPort {self.cluster.port}\n"
            + "".join(f"HostKey /etc/ssh/ssh_host_{t}_key\n" for t in KEY_TYPES)
            + "PidFile /etc/ssh/sshd.pid\nUsePAM no\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
            "AuthorizedKeysFile .ssh/authorized_keys\nPermitRootLogin no\nStrictModes no\n"
            "MaxStartups 200:30:400\nLogLevel VERBOSE\nSubsystem sftp internal-sftp\n" + extra
        )

    def new_host_keys(self) -> None:
        """What a re-imaged root volume brings: a set of host keys no other node of this cluster
        has held (made once per process and reused by later clusters: ssh-keygen's RSA-3072 costs
        about half a CPU-second, and the tests need keys that differ, not keys never seen)."""
        fresh = self.dir / "fresh-keys"
        shutil.rmtree(fresh, ignore_errors=True)
        fresh.mkdir(mode=0o700)
        for t, (private, public) in self.cluster.next_keyset().items():
            name = f"ssh_host_{t}_key"
            (fresh / name).write_bytes(private)
            (fresh / name).chmod(0o600)
            (fresh / f"{name}.pub").write_bytes(public)
            # Renamed into place: a push still running on the node cannot make ssh-keygen prompt.
            for suffix in (".pub", ""):
                (fresh / f"{name}{suffix}").replace(self.etc_ssh / f"{name}{suffix}")
        fresh.rmdir()

    def start(self) -> None:
        c = self.cluster
        script = " && ".join(
            [
                # The host's /etc stays reachable for the private /etc's symlinks; both are
                # directory mounts, which nothing the host does to a file in /etc detaches.
                f"mount --bind /etc {c.host_etc}",
                f"mount --bind {c.etc} /etc",
                f"mount --bind {self.etc_ssh} /etc/ssh",
                f"mount --bind {self.dir / 'sudoers'} /etc/sudoers",
                # Its own /run: sshd's privsep dir, and a utmp of its own, so that `who` and
                # `wall` on this node see only the terminals of its own sessions.
                "mount -t tmpfs -o mode=755,size=4m hpodlb-sim-run /run",
                "mkdir -m 755 /run/sshd",
                "install -m 664 /dev/null /run/utmp",
                # Holds the namespace for `restart_sshd` (sessions outlive their listener).
                f"{{ sleep 2147483647 & echo $! > {self.dir / 'keeper.pid'}; }}",
                f"exec {SSHD} -D -e -f /etc/ssh/sshd_config",
            ]
        )
        log = (self.dir / "sshd.log").open("ab")
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        self.wait_ready()

    def restart_sshd(self) -> None:
        """What `systemctl restart ssh` does (an openssh-server upgrade): a new listener in the
        same namespace; logged-in sessions keep running, no longer children of the listener."""
        self._end_listener()
        keeper = (self.dir / "keeper.pid").read_text().strip()
        log = (self.dir / "sshd.log").open("ab")
        self.proc = subprocess.Popen(
            [
                "nsenter",
                f"--mount=/proc/{keeper}/ns/mnt",
                SSHD,
                "-D",
                "-e",
                "-f",
                "/etc/ssh/sshd_config",
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        self.wait_ready()

    def stop(self) -> None:
        self._end_listener()
        keeper = self.dir / "keeper.pid"
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(keeper.read_text()), signal.SIGKILL)
            keeper.unlink()

    def _end_listener(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def replace(self, instance_id: str) -> None:
        """HyperPod replaces the node: same IP, new instance id, new root volume (new host keys)."""
        self.stop()
        self.instance_id = instance_id
        self.new_host_keys()
        self.start()

    def reload(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGHUP)
        time.sleep(0.3)
        self.wait_ready()

    def wait_ready(self, timeout: float = 10) -> None:
        """Until this node's own sshd answers: one of its host keys, not just any SSH banner."""
        assert self.proc is not None
        own = {k.split()[1] for k in self.presentable_keys()}
        deadline = time.monotonic() + timeout
        seen = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd on {self.ip} exited with {self.proc.returncode}")
            seen = _presented_key(self.ip, self.cluster.port)
            if seen and seen in own:
                return
            time.sleep(0.05)
        what = "another sshd (not this node's host key)" if seen else "nothing"
        raise RuntimeError(f"{self.ip}:{self.cluster.port}: {what} answered within {timeout}s")

    def presentable_keys(self) -> set[str]:
        """`type base64` of every public key in this node's /etc/ssh."""
        return {
            " ".join(p.read_text().split()[:2]) for p in self.etc_ssh.rglob("ssh_host_*_key.pub")
        }

    # -- what the node holds ----------------------------------------------------------------------

    def public_key(self, key_type: str) -> str:
        return " ".join((self.etc_ssh / f"ssh_host_{key_type}_key.pub").read_text().split()[:2])

    def private_key(self, key_type: str) -> bytes:
        return (self.etc_ssh / f"ssh_host_{key_type}_key").read_bytes()

    def keyscan(self) -> set[str]:
        """The host keys as OpenSSH's own `ssh-keyscan` sees them (`type base64`)."""
        out = subprocess.run(
            [
                "ssh-keyscan",
                "-p",
                str(self.cluster.port),
                "-T",
                "5",
                "-t",
                ",".join(KEY_TYPES),
                self.ip,
            ],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        return {
            " ".join(line.split()[1:3])
            for line in out.splitlines()
            if line and not line.startswith("#")
        }


_KEYSETS: list[dict[str, tuple[bytes, bytes]]] = []
_KEYSETS_LOCK = threading.Lock()


def _keyset(n: int) -> dict[str, tuple[bytes, bytes]]:
    """The n-th host key set of this process ((private, public) per type), made on first use."""
    with _KEYSETS_LOCK:
        while len(_KEYSETS) <= n:
            made: dict[str, tuple[bytes, bytes]] = {}
            with tempfile.TemporaryDirectory(prefix="hpodlb-sim-keys-") as tmp:
                for t in KEY_TYPES:
                    key = Path(tmp) / t
                    subprocess.run(
                        ["ssh-keygen", "-q", "-t", t, "-N", "", "-C", "hpodlb-sim", "-f", str(key)],
                        check=True,
                    )
                    made[t] = (key.read_bytes(), key.with_suffix(".pub").read_bytes())
            _KEYSETS.append(made)
        return _KEYSETS[n]


class SimCluster:
    """A set of login nodes sharing one login user and home, under `base` (a temp dir)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.block = AddressBlock()
        self.port = self.block.port
        self.etc = base / "etc"
        self.host_etc = base / "host-etc"
        self.home = base / "home" / SIM_USER
        self.client_key = base / "client" / "id_ed25519"
        self.nodes: dict[str, SimNode] = {}
        self._silent: list[socket.socket] = []
        self._keysets = itertools.count()

    def next_keyset(self) -> dict[str, tuple[bytes, bytes]]:
        """A host key set that no node of this cluster has been given before."""
        return _keyset(next(self._keysets))

    def ip(self, n: int) -> str:
        """The n-th loopback address of this cluster's own block (1..254)."""
        return self.block.ip(n)

    def setup(self) -> None:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        self.base.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)  # the login user must reach its home below it
        self.etc.mkdir(parents=True)
        self._link_host_etc()
        passwd = Path("/etc/passwd").read_text()
        (self.etc / "passwd").write_text(
            passwd + f"{SIM_USER}:x:{SIM_UID}:{SIM_UID}::{self.home}:/bin/sh\n"
        )
        group = Path("/etc/group").read_text()
        (self.etc / "group").write_text(group + f"{SIM_USER}:x:{SIM_UID}:\n")
        shadow = Path("/etc/shadow").read_text() if Path("/etc/shadow").exists() else ""
        (self.etc / "shadow").write_text(shadow + f"{SIM_USER}:*:19000:0:99999:7:::\n")
        (self.etc / "shadow").chmod(0o640)
        self.client_key.parent.mkdir(parents=True, mode=0o700)
        subprocess.run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "hpodlb-head-node",
                "-f",
                str(self.client_key),
            ],
            check=True,
        )
        ssh_dir = self.home / ".ssh"
        ssh_dir.mkdir(parents=True, mode=0o700)
        shutil.copy(self.client_key.with_suffix(".pub"), ssh_dir / "authorized_keys")
        for path in (self.home, ssh_dir, ssh_dir / "authorized_keys"):
            os.chown(path, SIM_UID, SIM_UID)

    def _link_host_etc(self) -> None:
        """The private /etc: a symlink to the host's entry for everything but what the nodes
        own (the user database, sudoers, /etc/ssh), so a file the host replaces is still seen."""
        self.host_etc.mkdir(mode=0o755)
        (self.etc / "ssh").mkdir(mode=0o755)
        (self.etc / "sudoers").touch(mode=0o440)
        own = {"passwd", "group", "shadow", "sudoers", "ssh"}
        for entry in Path("/etc").iterdir():
            if entry.name in own:
                continue
            if entry.is_symlink():  # e.g. mtab -> ../proc/self/mounts: kept, made absolute
                target = os.path.normpath(Path("/etc") / entry.readlink())
            else:
                target = str(self.host_etc / entry.name)
            (self.etc / entry.name).symlink_to(target)
        self.etc.chmod(0o755)

    def add_node(
        self,
        ip: str,
        instance_id: str,
        *,
        start: bool = True,
        sudo_nopasswd: bool = True,
        keys_from: Path | None = None,
    ) -> SimNode:
        node = SimNode(self, ip, instance_id)
        node.create(sudo_nopasswd=sudo_nopasswd, keys_from=keys_from)
        if start:
            node.start()
        self.nodes[ip] = node
        return node

    def silent_listener(self, ip: str, instance_id: str) -> None:
        """A peer that accepts TCP on the SSH port and never says a word (a hung sshd), listed
        among the nodes (never started) so a resource config can name it."""
        self.nodes[ip] = SimNode(self, ip, instance_id)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ip, self.port))
        sock.listen(64)
        self._silent.append(sock)
        held: list[socket.socket] = []

        def accept() -> None:
            while True:
                try:
                    conn, _ = sock.accept()
                except OSError:
                    return
                held.append(conn)

        threading.Thread(target=accept, daemon=True).start()

    def slow_relay(self, ip: str, upstream: str, delay: float) -> None:
        """A slow network path: `ip` relays to node `upstream`, holding each chunk `delay` s."""
        self.relay(ip, lambda _: upstream, delay)

    def switching_relay(self, ip: str, first: str, then: str, after: int) -> None:
        """A forwarding proxy that switches backends: its first `after` connections go to node
        `first`, every later one to node `then` (another host answering at the same address)."""
        count = iter(range(1 << 30))
        self.relay(ip, lambda _: first if next(count) < after else then, 0.0)

    def relay(self, ip: str, upstream_for: Callable[[socket.socket], str], delay: float) -> None:
        """TCP from `ip` to the node `upstream_for(connection)` picks, each chunk held `delay` s."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ip, self.port))
        sock.listen(64)
        self._silent.append(sock)

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    time.sleep(delay)
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)

        def accept() -> None:
            while True:
                try:
                    conn, _ = sock.accept()
                    far = socket.create_connection((upstream_for(conn), self.port))
                except OSError:
                    return
                threading.Thread(target=pump, args=(conn, far), daemon=True).start()
                threading.Thread(target=pump, args=(far, conn), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()

    def teardown(self) -> None:
        for node in self.nodes.values():
            node.stop()
        for sock in self._silent:
            sock.close()
        shutil.rmtree(self.base, ignore_errors=True)
        self.block.release()


@contextmanager
def sim_cluster(base: Path) -> Iterator[SimCluster]:
    cluster = SimCluster(base)
    cluster.setup()
    try:
        yield cluster
    finally:
        cluster.teardown()


def _presented_key(ip: str, port: int) -> str:
    """The base64 host key an SSH server at ip:port presents (handshake only), or ''."""
    import paramiko

    try:
        sock = socket.create_connection((ip, port), timeout=1)
    except OSError:
        return ""
    transport = paramiko.Transport(sock)
    try:
        transport.start_client(timeout=2)
        return str(transport.get_remote_server_key().get_base64())
    except (paramiko.SSHException, OSError, EOFError):
        return ""
    finally:
        transport.close()
        sock.close()
