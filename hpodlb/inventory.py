"""The desired set: which login nodes the resource config lists.

HyperPod owns `/opt/ml/config/resource_config.json` and may rewrite it while we read (in place or by
rename: not documented), so a read is retried until two stats around it agree, and anything short of a
complete, well-formed file is an `InventoryError`. The caller must treat that as "change nothing this
pass": an empty or half-written file must never look like "all login nodes left".
"""

from __future__ import annotations

import functools
import ipaddress
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpodlb.files import (
    FileSignature,
    UntrustedPathError,
    UnusableFileError,
    file_signature,
    read_regular_file,
    require_trusted_file,
)

DEFAULT_LOGIN_GROUP = "login-group"
# HyperPod's files: resource configs of 50 MB exist (large clusters); this bounds a mistake, such
# as a device or a runaway writer, without refusing a real one.
HYPERPOD_FILE_MAX_BYTES = 128 << 20
_READ_ATTEMPTS = 3
_SETTLE_SECONDS = 0.2


class InventoryError(Exception):
    """The resource config cannot be trusted this pass; the message names the file and field."""


@dataclass(frozen=True, order=True)
class LoginNode:
    ip: str
    instance_id: str
    name: str
    group: str

    def label(self) -> str:
        return f"{self.ip} ({self.instance_id})"


Answer = tuple[tuple[str, ...], str]  # (login group names, where that answer came from)


def login_group_names(
    configured: Sequence[str],
    provisioning_parameters: Path,
    from_cluster: Callable[[], Answer | None] = lambda: None,
) -> Answer:
    """Which instance groups hold login nodes, and where that answer came from: the config, else
    provisioning_parameters' login_group, else the cluster's own Login groups (`from_cluster`),
    else "login-group" (the pass then changes nothing if the resource config has no such group)."""
    if configured:
        return tuple(configured), "cluster.login_groups"

    def default(why: str) -> Answer:
        return from_cluster() or ((DEFAULT_LOGIN_GROUP,), f"the default; {why}")

    _require_trusted(provisioning_parameters)
    try:
        raw = read_regular_file(provisioning_parameters, HYPERPOD_FILE_MAX_BYTES)
    except FileNotFoundError:
        return default("no provisioning parameters file")
    except UnusableFileError as exc:
        raise InventoryError(str(exc)) from None
    except OSError as exc:
        raise InventoryError(f"{provisioning_parameters}: cannot read: {exc.strerror}") from None
    data = _parse_json(raw, provisioning_parameters)
    if not isinstance(data, dict):
        raise InventoryError(f"{provisioning_parameters}: expected a JSON object")
    group = data.get("login_group")
    if group is None:
        return default(f"{provisioning_parameters} has no login_group")
    if not isinstance(group, str) or not group:
        raise InventoryError(f"{provisioning_parameters}: login_group: expected a group name")
    return (group,), f"{provisioning_parameters}: login_group"


_cluster_seen: dict[Path, tuple[FileSignature, tuple[str, tuple[str, ...]]]] = {}


def cluster_of(path: Path) -> tuple[str, tuple[str, ...]]:
    """The cluster's ARN (ClusterConfig.ClusterArn, "" if absent) and its instance group names, as
    the resource config lists them: what a DescribeCluster answer is cached under. Read again only
    when the file's signature changed: a pass already reads the (maybe 50 MB) file once."""
    _require_trusted(path)
    signature = file_signature(path)
    seen = _cluster_seen.get(path)
    if signature is not None and seen is not None and seen[0] == signature:
        return seen[1]
    found = _cluster_unchanged(_read_settled(path), path)
    if signature is not None:
        _cluster_seen[path] = (signature, found)
    return found


@functools.lru_cache(maxsize=1)
def _cluster_unchanged(raw: bytes, path: Path) -> tuple[str, tuple[str, ...]]:
    data = _parse_json(raw, path)
    if not isinstance(data, dict):
        raise InventoryError(f"{path}: expected a JSON object at the top level")
    config = data.get("ClusterConfig")
    arn = config.get("ClusterArn") if isinstance(config, dict) else None
    groups = data.get("InstanceGroups")
    names = tuple(
        g["Name"]
        for g in (groups if isinstance(groups, list) else [])
        if isinstance(g, dict) and isinstance(g.get("Name"), str)
    )
    return (arn if isinstance(arn, str) else ""), names


def read_login_nodes(
    path: Path,
    login_groups: Sequence[str],
    allowed: Sequence[ipaddress.IPv4Network],
) -> tuple[LoginNode, ...]:
    """Every instance of the login groups, validated; InventoryError if anything is off."""
    _require_trusted(path)
    return _parse_unchanged(_read_settled(path), path, tuple(login_groups), tuple(allowed))


@functools.lru_cache(maxsize=1)
def _parse_unchanged(
    raw: bytes,
    path: Path,
    login_groups: tuple[str, ...],
    allowed: tuple[ipaddress.IPv4Network, ...],
) -> tuple[LoginNode, ...]:
    """The file is read every pass; parsed again only when its bytes changed (an idle daemon
    at 200 nodes spent a tenth of its pass here). Errors are not cached: they raise."""
    return parse_login_nodes(raw, path, login_groups, allowed)


def parse_login_nodes(
    raw: bytes,
    path: Path,
    login_groups: Sequence[str],
    allowed: Sequence[ipaddress.IPv4Network],
) -> tuple[LoginNode, ...]:
    data = _parse_json(raw, path)
    if not isinstance(data, dict):
        raise InventoryError(f"{path}: expected a JSON object at the top level")
    groups = data.get("InstanceGroups")
    if not isinstance(groups, list):
        raise InventoryError(f"{path}: InstanceGroups: expected a list")
    found: dict[str, list[Any]] = {}
    named: dict[str, str] = {}
    for index, group in enumerate(groups):
        where = f"InstanceGroups[{index}]"
        if not isinstance(group, dict) or not isinstance(group.get("Name"), str):
            raise InventoryError(f"{path}: {where}.Name: expected an object with a string Name")
        if group["Name"] in named:
            # Which of the two is the truth cannot be told: an empty twin must not read as "gone".
            raise InventoryError(
                f"{path}: {where}.Name: group {group['Name']!r} is listed twice "
                f"(also {named[group['Name']]})"
            )
        named[group["Name"]] = where
        if group["Name"] in login_groups:
            instances = group.get("Instances")
            if not isinstance(instances, list):
                raise InventoryError(f"{path}: {where}.Instances: expected a list")
            found[group["Name"]] = [(f"{where}.Instances[{i}]", x) for i, x in enumerate(instances)]
    missing = [g for g in login_groups if g not in found]
    if missing:
        # A renamed or mistyped group would otherwise read as "every login node left".
        raise InventoryError(f"{path}: InstanceGroups: no group named {', '.join(missing)}")
    nodes: list[LoginNode] = []
    seen: dict[str, str] = {}
    for group_name, instances in found.items():
        for where, instance in instances:
            node = _login_node(instance, group_name, f"{path}: {where}", allowed)
            if node.ip in seen:
                raise InventoryError(
                    f"{path}: {where}.CustomerIpAddress: {node.ip} is listed twice "
                    f"(also {seen[node.ip]})"
                )
            seen[node.ip] = where
            nodes.append(node)
    # The resource config's own order: "the first login node" (the adoption source) is its first.
    return tuple(nodes)


def _login_node(
    instance: Any, group: str, where: str, allowed: Sequence[ipaddress.IPv4Network]
) -> LoginNode:
    if not isinstance(instance, dict):
        raise InventoryError(f"{where}: expected an object")
    ip_text = instance.get("CustomerIpAddress")
    if not isinstance(ip_text, str):
        raise InventoryError(f"{where}.CustomerIpAddress: expected a string")
    try:
        ip = ipaddress.ip_address(ip_text)
    except ValueError:
        raise InventoryError(
            f"{where}.CustomerIpAddress: {ip_text!r} is not an IP address"
        ) from None
    if ip.version != 4:
        raise InventoryError(
            f"{where}.CustomerIpAddress: {ip} is IPv6; NLB IP targets here are IPv4"
        )
    if not any(ip in net for net in allowed):
        raise InventoryError(
            f"{where}.CustomerIpAddress: {ip} is outside cluster.allowed_cidrs "
            f"({', '.join(str(n) for n in allowed)})"
        )
    instance_id = instance.get("InstanceId")
    name = instance.get("InstanceName")
    for field, value in (("InstanceId", instance_id), ("InstanceName", name)):
        if value is not None and (not isinstance(value, str) or not value):
            raise InventoryError(f"{where}.{field}: expected a non-empty string")
    if instance_id is None and name is None:
        raise InventoryError(f"{where}: needs an InstanceId or an InstanceName")
    return LoginNode(
        ip=str(ip), instance_id=str(instance_id or name), name=str(name or instance_id), group=group
    )


def _require_trusted(path: Path) -> None:
    try:
        require_trusted_file(path)
    except (UntrustedPathError, UnusableFileError) as exc:
        raise InventoryError(str(exc)) from None


class _RepeatedKeyError(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's default keeps the last of repeated keys; two `InstanceGroups` are no inventory."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _RepeatedKeyError(key)
        out[key] = value
    return out


def _parse_json(raw: bytes, path: Path) -> Any:
    if not raw.strip():
        raise InventoryError(f"{path}: file is empty")
    try:
        return json.loads(raw, object_pairs_hook=_unique_keys)
    except _RepeatedKeyError as exc:
        raise InventoryError(f"{path}: key {exc.args[0]!r} appears twice in one object") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise InventoryError(f"{path}: not valid JSON: {exc}") from None


def _read_settled(path: Path) -> bytes:
    """Read until the file's identity and size/mtime are the same before and after the read."""
    last_error = "changed while being read"
    for attempt in range(_READ_ATTEMPTS):
        if attempt:
            time.sleep(_SETTLE_SECONDS)
        try:
            before = file_signature(path)
            raw = read_regular_file(path, HYPERPOD_FILE_MAX_BYTES)
            after = file_signature(path)
        except FileNotFoundError:
            last_error = "file not found"
            continue
        except UnusableFileError as exc:
            raise InventoryError(str(exc)) from None
        except OSError as exc:
            raise InventoryError(f"{path}: cannot read: {exc.strerror}") from None
        if before is not None and before == after and len(raw) == after.size:
            return raw
    raise InventoryError(f"{path}: {last_error}")
