"""`hpodlb check-config`: every input and permission a pass depends on, checked without changing any.

Each check yields (ok, line); a check never raises, so one broken input does not hide the others.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from hpodlb.config import Config
from hpodlb.inventory import InventoryError, login_group_names
from hpodlb.reconcile import Reconciler
from hpodlb.targets import TargetsError

Check = tuple[bool, str]


def run_checks(config: Config, reconciler: Reconciler) -> Iterator[Check]:
    yield from _check_inventory(config, reconciler)
    yield from _check_target_groups(reconciler)
    yield _check_state_dir(config)


def _check_inventory(config: Config, reconciler: Reconciler) -> Iterator[Check]:
    cluster = config.cluster
    try:
        groups, source = login_group_names(cluster.login_groups, cluster.provisioning_parameters)
    except InventoryError as exc:
        yield False, f"login groups: {exc}"
        return
    yield True, f"login groups {', '.join(groups)} (from {source})"
    try:
        nodes = reconciler.desired()
    except InventoryError as exc:
        yield False, f"resource config: {exc}"
        return
    yield True, f"resource config {cluster.resource_config}: {len(nodes)} login node(s)"


def _check_target_groups(reconciler: Reconciler) -> Iterator[Check]:
    for group in reconciler.groups:
        try:
            info = group.describe()
            view = group.observe()
        except TargetsError as exc:
            yield False, str(exc)
            continue
        problems = []
        if info.get("TargetType") != "ip":
            problems.append(f"target type is {info.get('TargetType')!r}, hpodlb registers IPs")
        if info.get("Protocol") not in ("TCP", "TCP_UDP"):
            problems.append(f"protocol is {info.get('Protocol')!r}, SSH needs TCP")
        if problems:
            yield False, f"{group.name}: " + "; ".join(problems)
        else:
            attached = len(info.get("LoadBalancerArns", []))
            yield (
                True,
                (
                    f"{group.name}: {len(view.targets)} target(s), port {group.port}, "
                    f"{attached} load balancer(s) attached"
                ),
            )


def _check_state_dir(config: Config) -> Check:
    path = config.state.dir
    probe = path if path.exists() else path.parent
    if os.access(probe, os.W_OK | os.X_OK):
        return True, f"state dir {path} is writable"
    return False, f"state dir {path}: not writable by this user"
