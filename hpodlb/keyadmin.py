"""The key commands an admin runs: show, generate, adopt, rotate, trust, known-hosts, ssh-config.

They change the canonical identity users trust, so each one refuses what would silently break
logins: replacing a store in use is a rotation (the old set stays valid until every node presents
the new one), never an overwrite; a node is read only through a session pinned to the keys a
probe just saw; `trust` accepts exactly what a node presents now, for its current instance only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from hpodlb.config import Config
from hpodlb.files import UnusableFileError, read_regular_file
from hpodlb.hostkeys import known_hosts_lines
from hpodlb.intentmodel import Intents, TrustRequest
from hpodlb.intents import update_intents
from hpodlb.inventory import InventoryError
from hpodlb.keystore import KeySet, KeyStore, KeyStoreError, fingerprint, generate
from hpodlb.logs import get_logger
from hpodlb.sshconfig import render
from hpodlb.sshnode import SshError, known_hosts_name
from hpodlb.targets import TargetGroup, TargetsError
from hpodlb.wiring import Adapters, host_keys

log = get_logger("hpodlb.keys")

KNOWN_HOSTS_MAX = 16 << 20  # the daemon's pins: a few hundred bytes a node


class KeyCommandError(Exception):
    """The command could not do what was asked; the message says why and what to do instead."""


@dataclass(frozen=True)
class Listing:
    current: KeySet
    previous: KeySet


def store_of(config: Config) -> KeyStore:
    return KeyStore(config.host_keys.store, config.host_keys.types)


def show(config: Config) -> Listing:
    store = store_of(config)
    try:
        return Listing(store.load(), store.load_previous())
    except KeyStoreError as exc:
        raise KeyCommandError(str(exc)) from None


def known_hosts(config: Config, host: str, port: int) -> list[str]:
    """Lines for users' known_hosts; during a rotation the previous set too, marked as such."""
    listing = show(config)
    lines = known_hosts_lines(listing.current, host, port)
    if listing.previous:
        lines.append("# previous keys: still presented by some nodes until `keys rotate` is done")
        lines += known_hosts_lines(listing.previous, host, port)
    return lines


@dataclass(frozen=True)
class ClientConfig:
    """The block users paste, and why part of it is missing ("" when it is whole)."""

    text: str
    missing: str = ""


def ssh_config(config: Config, host: str, port: int, dns_name: str | None = None) -> ClientConfig:
    """A `~/.ssh/config` block for the NLB (as `host`, on `port`) and one alias per login node.

    Refused (KeyCommandError) when there are no canonical keys: the block tells ssh to expect the
    keys `known-hosts` prints, and without them there is nothing to print. The NLB's DNS name comes
    from the first configured target group's load balancer (an NLB target group belongs to one
    load balancer; `[[target_groups]]` after the first serve other listeners or pools, and users
    need one name), unless the admin passes it. When the login nodes cannot be read, the NLB block
    is still given (most users need only it) and `missing` says why the aliases are not.
    """
    try:
        show(config)  # what `known-hosts` needs to print the lines this block relies on
    except KeyCommandError as exc:
        raise KeyCommandError(f"no host keys for users to trust: {exc}") from None
    adapters = Adapters(config)
    dns_name = dns_name or nlb_dns_name(adapters.groups[0])
    try:
        nodes = adapters.desired()
    except InventoryError as exc:
        return ClientConfig(
            render(host, port, dns_name, (), config.ssh.port),
            f"per-node aliases left out: the login nodes cannot be read: {exc}",
        )
    return ClientConfig(render(host, port, dns_name, nodes, config.ssh.port))


def nlb_dns_name(group: TargetGroup) -> str:
    """The DNS name of the load balancer `group` belongs to; KeyCommandError saying the fix."""
    try:
        balancers = group.load_balancers()
    except TargetsError as exc:
        raise KeyCommandError(
            f"cannot find the NLB's DNS name: {exc}; the head node needs "
            "elasticloadbalancing:DescribeTargetGroups and DescribeLoadBalancers "
            "(config/iam-policy.json), or pass the name with --dns-name"
        ) from None
    if not balancers:
        raise KeyCommandError(
            f"{group.name}: no load balancer forwards to this target group, so users have no "
            "NLB name to reach; add a listener that forwards to it (`hpodlb provision`), or pass "
            "the name with --dns-name"
        )
    return str(balancers[0]["DNSName"])


def generate_keys(config: Config, *, force: bool) -> KeySet:
    """A new set for an empty store (or, with --force, one that is unusable)."""
    store = store_of(config)
    _refuse_replacing(store, force, "hpodlb keys rotate")
    keys = {t: generate(t) for t in store.types}
    _install(store, keys, keep_previous=False)
    log.warning("host_keys_generated", store=str(store.path), fingerprints=_prints(keys))
    return keys


def adopt_keys(config: Config, ip: str, *, force: bool) -> KeySet:
    """The keys of the node at `ip` become the canonical set (empty or unusable store only)."""
    store = store_of(config)
    _refuse_replacing(store, force, f"hpodlb keys rotate --from {ip}")
    keys = read_node_keys(config, ip)
    _install(store, keys, keep_previous=False)
    log.warning(
        "host_keys_adopted",
        ip=ip,
        store=str(store.path),
        fingerprints=_prints(keys),
        why="an admin ran `hpodlb keys adopt`",
    )
    return keys


def rotate_keys(config: Config, from_ip: str | None = None) -> KeySet:
    """A new canonical set; the one it replaces stays valid as the previous set."""
    store = store_of(config)
    try:
        store.load()
    except KeyStoreError as exc:
        raise KeyCommandError(f"nothing to rotate: {exc}") from None
    if store.is_rotating():
        raise KeyCommandError(
            f"{store.path}: a rotation is still in progress (some node may still present the "
            "previous keys); `hpodlb status` shows which; rotate again once it is done"
        )
    keys = read_node_keys(config, from_ip) if from_ip else {t: generate(t) for t in store.types}
    _install(store, keys, keep_previous=True)
    log.warning(
        "host_keys_rotated",
        store=str(store.path),
        fingerprints=_prints(keys),
        source=from_ip or "generated",
    )
    return keys


def trust_node(config: Config, ip: str) -> TrustRequest:
    """Accept, once, the keys the node at `ip` presents now, for its current instance."""
    adapters = Adapters(config)  # reads files; AWS only if the login groups need it
    try:
        nodes = adapters.desired()
    except InventoryError as exc:
        raise KeyCommandError(str(exc)) from None
    node = next((n for n in nodes if n.ip == ip), None)
    if node is None:
        raise KeyCommandError(f"{ip} is not a login node in {config.cluster.resource_config}")
    probe = adapters.host_keys.probe(ip)
    if probe.offered is None:
        raise KeyCommandError(f"{node.label()}: cannot see its host keys: {probe.error}")
    if not probe.offered:
        raise KeyCommandError(f"{node.label()}: offers none of the configured key types")
    request = TrustRequest(
        instance_id=node.instance_id, keys=sorted(probe.offered.values()), requested_at=time.time()
    )

    def add(intents: Intents) -> None:
        intents.trust[ip] = request

    update_intents(config.state.dir, add)
    log.warning(
        "host_keys_trusted_by_admin",
        ip=ip,
        instance_id=node.instance_id,
        fingerprints=sorted(fingerprint(k) for k in request.keys),
        why="an admin ran `hpodlb keys trust`; the next pass pushes the canonical keys to it",
    )
    return request


def read_node_keys(config: Config, ip: str) -> KeySet:
    """A node's keys, read in a session pinned to what a probe of it shows right now."""
    nodes = host_keys(config)
    probe = nodes.probe(ip)
    if probe.offered is None:
        raise KeyCommandError(f"{ip}: {probe.error}")
    if not probe.offered:
        raise KeyCommandError(f"{ip}: offers none of the configured key types")
    log.warning(
        "ssh_trust_on_first_use",
        ip=ip,
        fingerprints=sorted(fingerprint(k) for k in probe.offered.values()),
        why="an admin named this node; the session must present what this probe showed",
    )
    try:
        return nodes.read_keys(ip, frozenset(probe.offered.values()))
    except SshError as exc:
        raise KeyCommandError(f"{ip}: {exc}") from None


def _refuse_replacing(store: KeyStore, force: bool, instead: str) -> None:
    """A complete store is in use: replacing it would break every user's known_hosts at once."""
    if store.is_empty():
        return
    try:
        store.load()
    except KeyStoreError as exc:
        if not force:
            raise KeyCommandError(f"{exc}\n(add --force to replace the unusable set)") from None
        return
    raise KeyCommandError(
        f"{store.path}: holds the canonical keys users trust; to replace them without breaking "
        f"logins run `{instead}` (the old keys stay valid until every node presents the new ones)"
    )


def _install(store: KeyStore, keys: KeySet, *, keep_previous: bool) -> None:
    try:
        store.install(keys, keep_previous=keep_previous)
    except KeyStoreError as exc:
        raise KeyCommandError(str(exc)) from None


def _prints(keys: KeySet) -> dict[str, str]:
    return {t: k.fingerprint for t, k in keys.items()}


def vouched_keys(config: Config, ips: Sequence[str]) -> dict[str, frozenset[str]]:
    """The keys a login may trust for each node: the canonical and previous sets, and what the
    daemon pinned for it after verifying it (known_hosts in the state dir). Doctor never trusts a
    node on first sight, nor does `drain`: such a node is reported, and sent nothing."""
    store = store_of(config)
    sets: set[str] = set()
    try:
        sets |= {k.public for k in store.load().values()}
        sets |= {k.public for k in store.load_previous().values()}
    except (KeyStoreError, OSError):
        pass
    pinned: dict[str, set[str]] = {}
    try:
        text = read_regular_file(
            config.state.dir / "known_hosts", KNOWN_HOSTS_MAX, follow_symlinks=False
        )
    except (OSError, UnusableFileError):
        text = b""
    for line in text.decode(errors="replace").splitlines():
        host, _, key = line.partition(" ")
        pinned.setdefault(host, set()).add(key.strip())
    port = config.ssh.port
    return {ip: frozenset(sets | pinned.get(known_hosts_name(ip, port), set())) for ip in ips}
