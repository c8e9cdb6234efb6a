"""The canonical key store on its own: whole sets, rotation, the legacy layout, and what it says
about keys it will not use."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from hpodlb.keystore import KeyStore, KeyStoreError, file_names, generate

TYPES = ("rsa", "ecdsa", "ed25519")


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore(tmp_path / "keys", ("ed25519", "ecdsa"))


def fresh(store: KeyStore) -> dict[str, str]:
    keys = {t: generate(t) for t in store.types}
    store.install(keys, keep_previous=False)
    return {t: k.public for t, k in keys.items()}


def test_a_set_becomes_current_whole_and_a_rotation_keeps_the_previous_one(store: KeyStore) -> None:
    """install writes a whole set then links it; with keep_previous the old set stays readable
    until it is retired, and nothing else is left behind."""
    first = fresh(store)
    assert {t: k.public for t, k in store.load().items()} == first
    assert not store.is_rotating()
    second = {t: generate(t) for t in store.types}
    store.install(second, keep_previous=True)
    assert {t: k.public for t, k in store.load().items()} == {
        t: k.public for t, k in second.items()
    }
    assert {t: k.public for t, k in store.load_previous().items()} == first
    store.retire_previous()
    assert store.load_previous() == {}
    assert len(list((store.path / "sets").iterdir())) == 1  # only the current set remains


def test_a_set_left_half_written_is_never_current(store: KeyStore) -> None:
    """A staging dir a crash left behind is not a set: the store is still empty, and the next
    install cleans it up."""
    (store.path / "sets" / ".20260101T000000Z-abc.tmp").mkdir(parents=True, mode=0o700)
    store.path.chmod(0o700)
    (store.path / "sets").chmod(0o700)
    assert store.is_empty()
    fresh(store)
    assert [p.name.startswith(".") for p in (store.path / "sets").iterdir()] == [False]


def test_a_legacy_flat_store_is_read_and_moved_into_sets_on_rotation(tmp_path: Path) -> None:
    """Key files directly in the store (older hpodlb) are the current set; a rotation keeps them
    as the previous set and removes the flat files."""
    path = tmp_path / "keys"
    path.mkdir(mode=0o700)
    keys = {t: generate(t) for t in ("ed25519",)}
    for t, key in keys.items():
        priv, pub = file_names(t)
        (path / priv).write_bytes(key.private)
        os.chmod(path / priv, 0o600)
        (path / pub).write_text(f"{key.public} old\n")
    store = KeyStore(path, ("ed25519",))
    assert store.load()["ed25519"].public == keys["ed25519"].public
    store.install({"ed25519": generate("ed25519")}, keep_previous=True)
    assert store.load_previous()["ed25519"].public == keys["ed25519"].public
    assert not (path / "ssh_host_ed25519_key").exists()


def test_a_passphrase_protected_key_is_called_that(store: KeyStore, tmp_path: Path) -> None:
    """A private key with a passphrase is refused as such, not as 'does not parse (TypeError)'."""
    fresh(store)
    current = store.set_dir()
    assert current is not None
    protected = tmp_path / "protected"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(protected)], check=True
    )
    (current / "ssh_host_ed25519_key").write_bytes(protected.read_bytes())
    (current / "ssh_host_ed25519_key.pub").unlink()
    with pytest.raises(
        KeyStoreError,
        match="the ed25519 private key is passphrase-protected; host keys have no passphrase",
    ):
        KeyStore(store.path, store.types).load()


def test_a_symlinked_private_key_is_called_a_symlink(store: KeyStore, tmp_path: Path) -> None:
    """A private key that is a symlink is refused as a symlink, not as 'mode 0777'."""
    fresh(store)
    current = store.set_dir()
    assert current is not None
    elsewhere = tmp_path / "elsewhere"
    (current / "ssh_host_ed25519_key").rename(elsewhere)
    (current / "ssh_host_ed25519_key").symlink_to(elsewhere)
    with pytest.raises(KeyStoreError, match="is a symlink; key files must be regular files"):
        KeyStore(store.path, store.types).load()


def test_a_set_a_link_points_at_that_is_gone_says_so(store: KeyStore) -> None:
    """`current` pointing at a set that was deleted by hand is reported, not taken as empty."""
    fresh(store)
    current = store.set_dir()
    assert current is not None
    for child in current.iterdir():
        child.unlink()
    current.rmdir()
    with pytest.raises(KeyStoreError, match="the linked key set is missing"):
        store.load()
