"""The canonical SSH host keys on the head node: the one identity every login node must present.

Layout (the key files keep the names they have in /etc/ssh, so an admin recognises them):

    <store>/                      0700, root
      current  -> sets/<id>       the canonical set
      previous -> sets/<id>       the set before `keys rotate`, until every node presents the new one
      sets/<id>/ssh_host_<type>_key[.pub]

A set is written completely into its own directory before one `rename` of a symlink makes it
current, so a crash (or a full disk) leaves either the old set or the new one, never part of one.
A store from before sets (key files directly in <store>) is read as the current set.

The store is refused, never repaired, when a non-root user could have read or replaced it: the dir
must be ours and 0700, private keys ours and 0600. Keys are generated in memory (cryptography, which
paramiko already needs) and written with their final mode from the first byte. Only fingerprints and
public keys leave this module in anything meant for humans.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import stat
import time
from collections.abc import Mapping, Sequence
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
CURRENT, PREVIOUS, SETS = "current", "previous", "sets"
KEY_FILE_MAX_BYTES = 64 * 1024  # an RSA 16384 private key is ~12 KiB


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


KeySet = dict[str, HostKey]


def fingerprint(public_line: str) -> str:
    """`SHA256:...` as `ssh-keygen -lf` prints it."""
    blob = base64.b64decode(public_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def key_type_of(public_line: str) -> str | None:
    """The configured type name (rsa, ecdsa, ed25519) of an `algo base64` line."""
    blob = public_line.split(maxsplit=1)[0]
    return next((t for t, blobs in BLOB_TYPES.items() if blob in blobs), None)


def file_names(key_type: str) -> tuple[str, str]:
    return f"ssh_host_{key_type}_key", f"ssh_host_{key_type}_key.pub"


def public_from_private(private: bytes, key_type: str) -> str:
    """Derive and check the public half; raises KeyStoreError for anything that is not such a key."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_ssh_private_key(private, password=None)
    except TypeError:
        raise KeyStoreError(
            f"the {key_type} private key is passphrase-protected; host keys have no passphrase"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyStoreError(
            f"the {key_type} private key is not an OpenSSH private key ({exc})"
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


def identity(keys: Mapping[str, HostKey]) -> str:
    """A key set in one string: a verification is only good for the set it was made against."""
    return " ".join(sorted(k.fingerprint for k in keys.values()))


class KeyStore:
    """The store directory on the head node."""

    def __init__(self, path: Path, types: Sequence[str]) -> None:
        self.path = path
        self.types = tuple(types)
        self._cache: dict[Path, tuple[tuple[tuple[int, ...], ...], KeySet]] = {}

    # -- reading ------------------------------------------------------------------------------

    def set_dir(self, which: str = CURRENT) -> Path | None:
        """The directory holding the current (or previous) set, None when there is none."""
        link = self.path / which
        if link.is_symlink():
            return self.path / SETS / link.readlink().name
        if which == CURRENT and self._legacy_files():
            return self.path
        return None

    def is_empty(self) -> bool:
        return self.set_dir(CURRENT) is None

    def is_rotating(self) -> bool:
        return self.set_dir(PREVIOUS) is not None

    def load(self) -> KeySet:
        """The current set, every configured type, checked for ownership, mode and consistency.

        Ownership and modes are checked on every call; parsing (about 50 ms of CPU for an RSA key)
        only when a key file changed since the last call, which keeps an idle daemon's cost low.
        """
        self._check_dir()
        where = self.set_dir(CURRENT)
        if where is None:
            raise KeyStoreError(
                f"{self.path}: no canonical keys; run `hpodlb keys generate` or "
                "`hpodlb keys adopt --from IP`"
            )
        return self._load_set(where)

    def load_previous(self) -> KeySet:
        """The previous set during a rotation, else {}."""
        self._check_dir()
        where = self.set_dir(PREVIOUS)
        return self._load_set(where) if where is not None else {}

    def _load_set(self, where: Path) -> KeySet:
        if where != self.path:
            try:
                _require_safe(where, where.lstat(), allowed_mode=0o700)
            except FileNotFoundError:
                raise KeyStoreError(f"{where}: the linked key set is missing") from None
        missing = [t for t in self.types if not (where / file_names(t)[0]).exists()]
        if missing:
            have = [t for t in self.types if t not in missing]
            raise KeyStoreError(
                f"{where}: incomplete key set (has {', '.join(have) or 'no key'}, lacks "
                f"{', '.join(missing)}): an adoption was cut off or a file was removed; replace "
                "the set with `hpodlb keys adopt --from IP --force` or `hpodlb keys generate --force`"
            )
        signature = self._signature(where)
        cached = self._cache.get(where)
        if cached is not None and cached[0] == signature:
            return dict(cached[1])
        keys: KeySet = {}
        for key_type in self.types:
            priv_name, pub_name = file_names(key_type)
            private = _read_key_file(where / priv_name, private=True)
            try:
                public = public_from_private(private, key_type)
            except KeyStoreError as exc:
                raise KeyStoreError(f"{where / priv_name}: {exc}") from None
            pub_path = where / pub_name
            if pub_path.exists():
                text = _read_key_file(pub_path, private=False).decode(errors="replace")
                if text.split()[:2] != public.split():
                    raise KeyStoreError(f"{pub_path}: does not match {priv_name}")
            keys[key_type] = HostKey(key_type, private, public)
        self._cache[where] = (signature, keys)
        return dict(keys)

    def _signature(self, where: Path) -> tuple[tuple[int, ...], ...]:
        """Identity, size, time and mode of every key file; the private ones checked for safety."""
        out: list[tuple[int, ...]] = []
        for key_type in self.types:
            for name in file_names(key_type):
                path = where / name
                try:
                    st = path.lstat()
                except FileNotFoundError:
                    out.append((0,))
                    continue
                if not name.endswith(".pub"):
                    _require_safe(path, st, allowed_mode=0o600)
                out.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode, st.st_uid))
        return tuple(out)

    def _legacy_files(self) -> list[str]:
        return [t for t in self.types if (self.path / file_names(t)[0]).exists()]

    # -- writing --------------------------------------------------------------------------------

    def install(self, keys: Mapping[str, HostKey], *, keep_previous: bool) -> None:
        """Make `keys` the current set, all or nothing; with `keep_previous`, the set it replaces
        becomes the previous one (a rotation)."""
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._check_dir()
            old = self.set_dir(CURRENT)
            new = self._write_set(keys)
            if keep_previous and old is not None:
                self._link(PREVIOUS, self._as_set(old))
            elif not keep_previous:
                self._unlink(PREVIOUS)
            self._link(CURRENT, new)
            self._remove_unreferenced()
        except OSError as exc:
            raise KeyStoreError(f"{self.path}: cannot write keys ({exc.strerror})") from None

    def retire_previous(self) -> None:
        """Every node presents the current set: forget the previous one."""
        try:
            self._unlink(PREVIOUS)
            self._remove_unreferenced()
        except OSError as exc:
            raise KeyStoreError(f"{self.path}: cannot retire the previous set ({exc})") from None

    def _write_set(self, keys: Mapping[str, HostKey]) -> Path:
        sets = self.path / SETS
        sets.mkdir(mode=0o700, exist_ok=True)
        name = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.urandom(3).hex()}"
        staging = sets / f".{name}.tmp"
        staging.mkdir(mode=0o700)
        for key_type in self.types:
            key = keys[key_type]
            priv_name, pub_name = file_names(key_type)
            write_atomically(staging / priv_name, key.private, mode=0o600)
            write_atomically(staging / pub_name, f"{key.public} hpodlb\n".encode(), mode=0o644)
        final = sets / name
        staging.rename(final)
        _fsync_dir(sets)
        return final

    def _as_set(self, where: Path) -> Path:
        """A legacy flat store moved into a set dir, so it can be linked as the previous set."""
        if where != self.path:
            return where
        return self._write_set(self._load_set(where))

    def _link(self, which: str, target: Path) -> None:
        tmp = self.path / f".{which}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(f"{SETS}/{target.name}")
        tmp.replace(self.path / which)
        _fsync_dir(self.path)

    def _unlink(self, which: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.path / which).unlink()
        _fsync_dir(self.path)

    def _remove_unreferenced(self) -> None:
        """Sets no link points at, half-written sets, and a flat layout once `current` exists."""
        keep = {p.name for w in (CURRENT, PREVIOUS) if (p := self.set_dir(w)) is not None}
        sets = self.path / SETS
        for entry in sets.iterdir() if sets.is_dir() else ():
            if entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True)
        if (self.path / CURRENT).is_symlink():
            for key_type in self.types:
                for name in file_names(key_type):
                    with contextlib.suppress(FileNotFoundError):
                        (self.path / name).unlink()

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


def _read_key_file(path: Path, *, private: bool) -> bytes:
    """A key file's bytes: a regular file (never through a symlink, never a FIFO) of key size,
    checked for ownership and mode before a byte of a private key is read."""
    check = (lambda st: _require_safe(path, st, allowed_mode=0o600)) if private else None
    try:
        return read_regular_file(path, KEY_FILE_MAX_BYTES, follow_symlinks=False, check=check)
    except UnusableFileError as exc:
        raise KeyStoreError(str(exc)) from None
    except OSError as exc:
        raise KeyStoreError(f"{path}: cannot read ({exc.strerror})") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _require_safe(path: Path, st: os.stat_result, allowed_mode: int) -> None:
    """Refuse (never fix) a file or dir that someone other than us could read or change."""
    if stat.S_ISLNK(st.st_mode):
        raise KeyStoreError(f"{path}: is a symlink; key files must be regular files")
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
