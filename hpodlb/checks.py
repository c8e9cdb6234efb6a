"""`hpodlb check-config`: every input and permission a pass depends on, checked without changing any.

Each check yields (ok, line); a check never raises, so one broken input does not hide the others.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from hpodlb.config import Config
from hpodlb.inventory import InventoryError
from hpodlb.keystore import KeyStore, KeyStoreError
from hpodlb.targets import TargetsError, check_group

if TYPE_CHECKING:
    from hpodlb.wiring import CommandAdapters

Check = tuple[bool, str]


def run_checks(config: Config, adapters: CommandAdapters) -> Iterator[Check]:
    yield from check_inventory(config, adapters)
    yield from _check_target_groups(adapters)
    yield _check_state_dir(config)
    if config.host_keys.enabled:  # else hpodlb logs in nowhere, and needs neither
        yield from check_host_keys(config)
        yield check_login_key(config)


def check_inventory(config: Config, adapters: CommandAdapters) -> Iterator[Check]:
    cluster = config.cluster
    try:
        groups, source = adapters.login_groups()
    except InventoryError as exc:
        yield False, f"login groups: {exc}"
        return
    yield True, f"login groups {', '.join(groups)} (from {source})"
    try:
        nodes = adapters.desired()
    except InventoryError as exc:
        yield False, f"resource config: {exc}"
        return
    yield True, f"resource config {cluster.resource_config}: {len(nodes)} login node(s)"


def _check_target_groups(adapters: CommandAdapters) -> Iterator[Check]:
    """The same check a pass makes before any write (type ip, TCP, the configured port)."""
    for group in adapters.groups:
        try:
            info = group.describe()
            view = group.observe()
        except TargetsError as exc:
            yield False, str(exc)
            continue
        problem = check_group(info, group.port)
        if problem:
            yield False, problem
            continue
        attached = len(info.get("LoadBalancerArns", []))
        yield (
            True,
            f"{group.name}: type ip, TCP, port {group.port}; {len(view.targets)} target(s), "
            f"{attached} load balancer(s) attached",
        )


def _check_state_dir(config: Config) -> Check:
    from hpodlb.files import UntrustedPathError, require_trusted_dir

    path = config.state.dir
    try:
        require_trusted_dir(path)
    except UntrustedPathError as exc:
        return False, f"state dir: {exc}"
    if path.is_dir():
        if os.access(path, os.W_OK | os.X_OK):
            return True, f"state dir {path} is writable"
        return False, f"state dir {path}: not writable by this user"
    parent = next(p for p in path.parents if p.exists())
    if os.access(parent, os.W_OK | os.X_OK):
        return True, f"state dir {path} does not exist yet; will be created 0700 by the first pass"
    return False, f"state dir {path} does not exist, and {parent} is not writable by this user"


def check_host_keys(config: Config) -> Iterator[Check]:
    from hpodlb.files import UntrustedPathError, require_trusted_dir

    hk = config.host_keys
    store = KeyStore(hk.store, hk.types)
    absent = not hk.store.exists() and not hk.store.is_symlink()
    try:  # where an adoption would write the keys, as the store's own load judges it
        require_trusted_dir(hk.store)
    except UntrustedPathError as exc:
        yield False, f"key store: {exc}"
        return
    if absent and hk.adopt_from_first_node:
        yield (
            True,
            f"key store {hk.store} does not exist yet: the first pass creates it (mode 0700) "
            "and adopts the first login node's keys",
        )
    elif hk.store.is_dir() and store.is_empty() and hk.adopt_from_first_node:
        yield (
            True,
            f"key store {hk.store} is empty: the first pass adopts the first login node's keys",
        )
    else:
        try:
            keys = store.load()
        except KeyStoreError as exc:
            yield False, f"key store: {exc}"
        else:
            prints = ", ".join(f"{t} {k.fingerprint}" for t, k in keys.items())
            yield True, f"key store {hk.store}: {prints}"


def login_key_fix(config: Config) -> str:
    """What to do about an SSH key the head node cannot log in with."""
    user = config.ssh.user
    return (
        f"set ssh.key_file to the private key {user} logs in to the login nodes with (its public "
        f"half in ~{user}/.ssh/authorized_keys there, no passphrase): a regular file owned by "
        f"root or {user}, mode 0600, in directories only root or {user} can write"
    )


def check_login_key(config: Config) -> Check:
    """The head node's SSH key, read exactly as a pass reads it before a login."""
    from hpodlb.keystore import fingerprint
    from hpodlb.sshnode import LoginKey, SshError, key_line

    ssh = config.ssh
    try:
        key = LoginKey(ssh.key_file, ssh.user).load()
    except SshError as exc:
        return False, str(exc).removeprefix("key: ")
    line = key_line(key)
    cert = ", with its certificate" if key.public_blob is not None else ""
    return (
        True,
        f"ssh key {ssh.key_file}: {line.split()[0]} {fingerprint(line)}{cert} "
        f"(login as {ssh.user})",
    )
