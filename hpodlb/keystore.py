"""The canonical SSH host keys on the head node: the one identity every login node must present.

Layout mirrors /etc/ssh (`ssh_host_<type>_key` and `.pub`) so an admin recognises it. The store is
refused, never repaired, when a non-root user could have read or replaced it: the dir must be ours
and 0700, private keys ours and 0600. Keys are generated in memory (cryptography, which paramiko
already needs) and written with their final mode from the first byte, so no key ever sits in a temp
dir or with wider permissions, even for a moment. Only fingerprints and public keys leave this module
in anything meant for humans.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from hpodlb.files import (
    UntrustedPathError,
    UnusableFileError,
    read_regular_file,
    require_trusted,
    write_atomically,
)

# The SSH algorithm names each configured key type may present in a handshake.
ALGORITHMS = {
    "rsa": ("rsa-sha2-512", "rsa-sha2-256"),
    "ecdsa": ("ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521"),
    "ed25519": ("ssh-ed25519",),
}
# The key blob's own type name (what a .pub line starts with), per configured type.
BLOB_TYPES = {
    "rsa": ("ssh-rsa",),
    "ecdsa": ("ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521"),
    "ed25519": ("ssh-ed25519",),
}


class KeyStoreError(Exception):
    """The store is missing, incomplete, unsafe or holds a key that does not parse."""


@dataclass(frozen=True)
class HostKey:
    """One host key pair. `repr` never shows the private half."""

    key_type: str
    private: bytes
    public: str  # "ssh-ed25519 AAAA..." without a comment

    def __repr__(self) -> str:
        return f"HostKey({self.key_type}, {self.fingerprint})"

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public)

    @property
    def blob(self) -> bytes:
        return base64.b64decode(self.public.split()[1])


def fingerprint(public_line: str) -> str:
    """`SHA256:...` as `ssh-keygen -lf` prints it."""
    blob = base64.b64decode(public_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def file_names(key_type: str) -> tuple[str, str]:
    return f"ssh_host_{key_type}_key", f"ssh_host_{key_type}_key.pub"


def public_from_private(private: bytes, key_type: str) -> str:
    """Derive and check the public half; raises KeyStoreError for anything that is not such a key."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_ssh_private_key(private, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyStoreError(
            f"{key_type} private key does not parse ({type(exc).__name__})"
        ) from None
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    if public.split()[0] not in BLOB_TYPES[key_type]:
        raise KeyStoreError(f"the {key_type} key is of type {public.split()[0]}")
    return " ".join(public.split()[:2])


def generate(key_type: str) -> HostKey:
    """A new key pair, in memory only (RSA 3072 as ssh-keygen's default, ECDSA P-256)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if key_type == "rsa":
        key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey = (
            rsa.generate_private_key(public_exponent=65537, key_size=3072)
        )
    elif key_type == "ecdsa":
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    return HostKey(key_type, private, public_from_private(private, key_type))


class KeyStore:
    """The store directory on the head node."""

    def __init__(self, path: Path, types: Sequence[str]) -> None:
        self.path = path
        self.types = tuple(types)
        self._cache: tuple[tuple[tuple[int, ...], ...], dict[str, HostKey]] | None = None

    def is_empty(self) -> bool:
        return not any((self.path / file_names(t)[0]).exists() for t in self.types)

    def load(self) -> dict[str, HostKey]:
        """Every configured type, checked for ownership, mode and consistency.

        Ownership and modes are checked on every call; parsing (about 50 ms of CPU for an RSA key)
        only when a key file changed since the last call, which keeps an idle daemon's cost low.
        """
        self._check_dir()
        missing = [t for t in self.types if not (self.path / file_names(t)[0]).exists()]
        if missing:
            raise KeyStoreError(
                f"{self.path}: no {', '.join(missing)} key; run `hpodlb keys generate` or "
                "`hpodlb keys adopt --from IP`"
            )
        signature = self._signature()
        if self._cache is not None and self._cache[0] == signature:
            return dict(self._cache[1])
        keys: dict[str, HostKey] = {}
        for key_type in self.types:
            priv_name, pub_name = file_names(key_type)
            private = self._read_private(self.path / priv_name)
            public = public_from_private(private, key_type)
            pub_path = self.path / pub_name
            if (
                pub_path.exists()
                and _read_key_file(pub_path).split()[:2] != public.encode().split()
            ):
                raise KeyStoreError(f"{pub_path}: does not match {priv_name}")
            keys[key_type] = HostKey(key_type, private, public)
        self._cache = (signature, keys)
        return dict(keys)

    def _signature(self) -> tuple[tuple[int, ...], ...]:
        """Identity, size, time and mode of every key file; the private ones checked for safety."""
        out: list[tuple[int, ...]] = []
        for key_type in self.types:
            for name in file_names(key_type):
                path = self.path / name
                try:
                    st = path.lstat()
                except FileNotFoundError:
                    out.append((0,))
                    continue
                if not name.endswith(".pub"):
                    _require_safe(path, st, allowed_mode=0o600)
                out.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode, st.st_uid))
        return tuple(out)

    def save(self, keys: Mapping[str, HostKey], *, overwrite: bool) -> None:
        """Write a full set atomically, private keys 0600 from creation, `.pub` 0644."""
        if not overwrite and not self.is_empty():
            raise KeyStoreError(f"{self.path}: already holds keys; use --force to replace them")
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._check_dir()
            for key_type in self.types:
                key = keys[key_type]
                priv_name, pub_name = file_names(key_type)
                write_atomically(self.path / priv_name, key.private, mode=0o600)
                write_atomically(
                    self.path / pub_name, f"{key.public} hpodlb\n".encode(), mode=0o644
                )
        except OSError as exc:
            raise KeyStoreError(f"{self.path}: cannot write keys ({exc.strerror})") from None

    def _check_dir(self) -> None:
        try:
            require_trusted(self.path)
        except UntrustedPathError as exc:
            raise KeyStoreError(str(exc)) from None
        try:
            st = self.path.stat()
        except FileNotFoundError:
            raise KeyStoreError(f"{self.path}: key store does not exist") from None
        if not stat.S_ISDIR(st.st_mode):
            raise KeyStoreError(f"{self.path}: not a directory")
        _require_safe(self.path, st, allowed_mode=0o700)

    @staticmethod
    def _read_private(path: Path) -> bytes:
        return _read_key_file(
            path, nofollow=True, check=lambda st: _require_safe(path, st, allowed_mode=0o600)
        )


KEY_FILE_MAX_BYTES = 64 << 10  # an RSA 16384 private key is 12 KiB


def _read_key_file(
    path: Path, *, nofollow: bool = False, check: Callable[[os.stat_result], None] | None = None
) -> bytes:
    """A key file's bytes: a regular file of key size, or a KeyStoreError naming it."""
    try:
        return read_regular_file(
            path, KEY_FILE_MAX_BYTES, follow_symlinks=not nofollow, check=check
        )
    except UnusableFileError as exc:
        raise KeyStoreError(str(exc)) from None
    except OSError as exc:
        raise KeyStoreError(f"{path}: cannot read ({exc.strerror})") from None


def _require_safe(path: Path, st: os.stat_result, allowed_mode: int) -> None:
    """Refuse (never fix) a file or dir that someone other than us could read or change."""
    if st.st_uid != os.geteuid():
        raise KeyStoreError(
            f"{path}: owned by uid {st.st_uid}, not {os.geteuid()}; refusing to use it"
        )
    extra = stat.S_IMODE(st.st_mode) & ~allowed_mode
    if extra:
        raise KeyStoreError(
            f"{path}: mode {stat.S_IMODE(st.st_mode):04o} is wider than {allowed_mode:04o}; "
            "refusing to use it (fix the mode by hand if it is yours)"
        )
