"""What a pass reads before it decides: login groups and nodes, target groups, intents, key facts.

Every read here is of the world or of what an admin asked, never a write to AWS or to a node;
what it finds goes into the pass's `Known` and, for `status`, its state. A read that fails is the
pass's error (said, and kept from converging) and costs only what depended on it: a group that
cannot be read or is refused gets no action; a key store that is refused stops pushes, not the
pass; an SSH key (`ssh.key_file`) that cannot be read fails each login at once, not the pass; an
unusable intents file keeps the drains as last known.

`ClusterAnswers` is what the SageMaker API said (the login groups, HyperPod's status of the login
nodes), kept across passes by whoever asks: the daemon's reconciler, or a command's adapters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from hpodlb.config import Config
from hpodlb.context import KeySide, Known, PassContext, log
from hpodlb.guards import guards_of, recent
from hpodlb.hyperpod import ClusterError, HyperPod
from hpodlb.identity import KEYS_SETTLED, KeyState
from hpodlb.intents import IntentsError, intents_path, load_intents
from hpodlb.inventory import (
    Answer,
    InventoryError,
    LoginNode,
    cluster_of,
    login_group_names,
    read_login_nodes,
)
from hpodlb.keystore import KeyStoreError, identity
from hpodlb.planner import GroupView, KeyFacts, Probe
from hpodlb.sshnode import SshError
from hpodlb.targets import TargetGroup, TargetsError
from hpodlb.targetstate import is_failing_out, registered_ips

CLUSTER_RETRY_SECONDS = 600.0  # DescribeCluster failed: asked again after this long
PLATFORM_SECONDS = 300.0  # ListClusterNodes again after this long, if the same nodes still wait

_Key = tuple[str, tuple[str, ...]]  # (cluster ARN, the resource config's group names)


class ClusterAnswers:
    """DescribeCluster's answer (the login groups) and ListClusterNodes' (the nodes' status)."""

    def __init__(self) -> None:
        # DescribeCluster's answer per (cluster ARN, the resource config's group names): asked at
        # start, on reload (a new owner) and when the groups change, not every pass.
        self._groups: dict[_Key, Answer | None] = {}
        # Failed asks: not again before the monotonic time, and why they failed.
        self._failed: dict[_Key, tuple[float, str]] = {}
        self.kept: dict[str, list[str]] = {}  # by ARN; the state file keeps them too
        self.source = ""  # `login-a (from ...)`, as the last `desired` found it
        self._platform_unknown = False  # ListClusterNodes failed (warned once)
        self._platform_asked: float | None = None  # monotonic, the last ListClusterNodes
        self._platform_for: frozenset[str] = frozenset()  # the nodes it was asked for
        self._statuses: dict[str, str] = {}  # its answer: InstanceId -> status

    def login_groups(
        self, config: Config, hyperpod: HyperPod | None, clock: Callable[[], float]
    ) -> Answer:
        cluster = config.cluster

        def from_cluster() -> Answer | None:
            return self._from_cluster(config, hyperpod, clock)

        return login_group_names(
            cluster.login_groups, cluster.provisioning_parameters, from_cluster
        )

    def desired(
        self, config: Config, hyperpod: HyperPod | None, clock: Callable[[], float]
    ) -> tuple[LoginNode, ...]:
        cluster = config.cluster
        names, source = self.login_groups(config, hyperpod, clock)
        self.source = f"{', '.join(names)} (from {source})"
        return read_login_nodes(cluster.resource_config, names, cluster.networks())

    def _from_cluster(
        self, config: Config, hyperpod: HyperPod | None, clock: Callable[[], float]
    ) -> Answer | None:
        """The cluster's Login instance groups (DescribeCluster), for clusters configured through
        the API. When it cannot be asked (denied, unreachable; then again after
        CLUSTER_RETRY_SECONDS), its last answer as the state file kept it; None when there is
        none, or no group is marked Login."""
        if hyperpod is None:
            return None
        arn, names = cluster_of(config.cluster.resource_config)
        key = (arn, names)
        if not arn:
            return None
        if key in self._groups:
            return self._groups[key]
        failed = self._failed.get(key)
        if failed is not None and clock() < failed[0]:
            return self._remembered(arn, failed[1])
        try:
            groups = hyperpod.login_groups(arn)
        except ClusterError as exc:
            if key not in self._failed:  # warned once, not every pass
                log.warning(
                    "cluster_login_groups_unknown",
                    cluster=arn,
                    error=str(exc),
                    fix="grant sagemaker:DescribeCluster, or set cluster.login_groups",
                    action="DescribeCluster's last answer if the state file has one, else "
                    "login-group if the resource config has it, else no change",
                )
            self._failed[key] = (clock() + CLUSTER_RETRY_SECONDS, str(exc))
            return self._remembered(arn, str(exc))
        self._failed.pop(key, None)
        answer = (groups, f"the cluster's Login instance groups, DescribeCluster {arn}")
        self._groups[key] = answer if groups else None
        if groups:
            self.kept[arn] = list(groups)
        log.info("cluster_login_groups", cluster=arn, groups=list(groups))
        return self._groups[key]

    def _remembered(self, arn: str, error: str) -> Answer | None:
        groups = self.kept.get(arn)
        if not groups:
            return None
        return tuple(groups), f"DescribeCluster's last answer for {arn} (now: {error})"

    def platform(self, ctx: PassContext, hyperpod: HyperPod | None, keys: bool) -> dict[str, str]:
        """HyperPod's status of the login nodes (ListClusterNodes): it explains an unreachable
        node ("being replaced: Pending") and keeps keys from an instance being shut down. Asked
        only while some login node is not known in sync, and then again only when that set
        changes or PLATFORM_SECONDS have passed (a node held for an admin must not cost a
        listing every pass). Denied or unreachable: as if it did not exist. With host keys off
        (`keys` false) nothing is pushed or probed, so nothing needs explaining."""
        records = ctx.state.nodes
        unsettled = frozenset(
            n.ip
            for n in ctx.nodes
            if records[n.ip].key_state not in KEYS_SETTLED
            or records[n.ip].unreachable
            or records[n.ip].instance_id != n.instance_id
        )
        if hyperpod is None or not keys or not unsettled:
            for record in records.values():  # nothing to explain: no stale word stays behind
                record.platform_status = ""
            return {}
        asked = self._platform_asked
        fresh = asked is not None and ctx.now - asked < PLATFORM_SECONDS
        if not (fresh and unsettled == self._platform_for):
            self._platform_asked, self._platform_for = ctx.now, unsettled
            self._statuses = self._list_cluster_nodes(ctx, hyperpod)
        found = {
            n.ip: self._statuses[n.instance_id]
            for n in ctx.nodes
            if n.instance_id in self._statuses
        }
        for ip, record in records.items():
            record.platform_status = found.get(ip, "")
        return found

    def _list_cluster_nodes(self, ctx: PassContext, hyperpod: HyperPod) -> dict[str, str]:
        groups = {n.group for n in ctx.nodes}
        try:
            arn, _ = cluster_of(ctx.config.cluster.resource_config)
            if not arn:
                return {}
            ctx.beat()
            return hyperpod.node_statuses(arn, groups.pop() if len(groups) == 1 else "")
        except (ClusterError, InventoryError) as exc:
            if not self._platform_unknown:
                self._platform_unknown = True
                log.warning(
                    "cluster_node_status_unknown",
                    error=str(exc),
                    fix="grant sagemaker:ListClusterNodes to see why nodes are unreachable",
                )
            return {}


def read_intents(ctx: PassContext, known: Known) -> None:
    """Trust requests and drains. When intents.json cannot be read, or is gone while the last
    pass had drains, the drains this state remembers stay in force and the pass says why:
    a lost file must not put a node under maintenance back in front of users."""
    state_dir = ctx.config.state.dir
    remembered = ctx.state.drains
    try:
        known.intents = load_intents(state_dir)
    except IntentsError as exc:
        ctx.error(str(exc))
        log.error("intents_unusable", error=str(exc), action="drains kept as last known")
        known.drains = dict(remembered)
        return
    known.drains = dict(known.intents.drain)
    if remembered and not intents_path(state_dir).exists():
        ips = ", ".join(sorted(remembered))
        line = (
            f"{intents_path(state_dir)} is gone, but the last pass had {ips} drained: kept out "
            "of rotation as last known; `hpodlb drain IP` confirms a drain (and writes the "
            "file again), `hpodlb undrain IP` puts a node back"
        )
        ctx.error(line)
        log.error("drain_intents_lost", drained=sorted(remembered), error=line)
        known.drains = dict(remembered)
    if ctx.apply:
        ctx.state.drains = dict(known.drains)


def observe_groups(ctx: PassContext, known: Known, groups: Sequence[TargetGroup]) -> None:
    """Each group's targets, whether it may be written to at all, and what its deregistration
    budget has spent."""
    guards = guards_of(ctx.config.reconcile)
    for group in groups:
        ctx.beat()
        try:
            view = group.observe()
            problem = group.problem(ctx.now)
        except TargetsError as exc:
            ctx.error(str(exc))
            ctx.state.target_errors[group.arn] = str(exc)
            log.error(
                "target_group_unreadable",
                target_group=group.name,
                code=exc.code,
                error=str(exc),
                action="no change to this target group this pass",
            )
            continue
        if problem:
            ctx.error(problem)
            log.error("target_group_refused", target_group=group.name, error=problem)
            view = replace(view, problem=problem)
        ctx.state.target_errors.pop(group.arn, None)
        known.views[group.arn] = replace(view, failing=failing(view))
        # max_deregister_fraction's window: what left within it is spent, and was registered as
        # it began.
        spent = len(recent(ctx.state.departures.get(group.arn, []), ctx.now, guards))
        known.start_registered[group.arn] = len(registered_ips(view.targets, view.port)) + spent
        known.spent[group.arn] = spent


def failing(view: GroupView) -> dict[str, str]:
    """Targets leaving and failing their health checks (`unhealthy.draining`), as just read."""
    return {t.ip: t.state for t in view.targets if t.port == view.port and is_failing_out(t.state)}


def key_facts(ctx: PassContext, known: Known, side: KeySide | None) -> KeyFacts:
    """The canonical (and previous) keys, what was verified and trusted, who backs off. Reads the
    store into `known.keyset`; a store that is refused says why, and blocks every push."""
    if side is None:
        return KeyFacts(enabled=False)
    unavailable, current, previous = "", {}, {}
    try:
        if not side.store.is_empty():
            known.keyset = side.store.load()
            current = {t: k.public for t, k in known.keyset.items()}
            previous = {t: k.public for t, k in side.store.load_previous().items()}
    except (KeyStoreError, OSError) as exc:
        unavailable = f"key store refused: {exc}"
        log.error("host_keys_unavailable", store=str(side.store.path), error=str(exc))
    if ctx.apply:
        check_login_key(ctx, side)
    trusted = {ip: (r.instance_id, frozenset(r.keys)) for ip, r in known.intents.trust.items()}
    return KeyFacts(
        enabled=True,
        current=current,
        previous=previous,
        unavailable=unavailable,
        adopt=side.adopt,
        verified={ip: r.verified_instance_id for ip, r in ctx.state.nodes.items()},
        trusted=trusted,
        backing_off=backing_off(ctx),
    )


def check_login_key(ctx: PassContext, side: KeySide) -> None:
    """The head node's SSH key, read as a login would read it: one that cannot be read makes
    the pass not converged, whether or not this pass logs in anywhere (a drained node's session
    count, the next push would fail on it). Each login then fails on it at once, on its own."""
    if side.login is None:
        return
    try:
        side.login.load()
    except SshError as exc:
        ctx.error(str(exc))
        log.error("ssh_key_unusable", key_file=str(side.login.path), error=str(exc))


def backing_off(ctx: PassContext) -> dict[str, str]:
    """Login nodes whose key pushes wait out a backoff, and why."""
    return {
        ip: f"retry in {r.retry_mono - ctx.now:.0f}s after: {r.last_error}"
        for ip, r in ctx.state.nodes.items()
        if ip in ctx.by_ip and r.retry_mono is not None and r.retry_mono > ctx.now
    }


def due_probes(ctx: PassContext, known: Known, side: KeySide) -> list[LoginNode]:
    """The nodes to probe this pass. One verified in sync, against this canonical set, within
    `probe_interval_seconds` is not: its probe is recorded as skipped."""
    verified_set = identity(known.keyset) if known.keyset else ""
    due = []
    for node in ctx.nodes:
        r = ctx.state.nodes[node.ip]
        recent = (
            side.probe_interval_seconds > 0
            and r.key_state == KeyState.IN_SYNC.value
            and r.verified_instance_id == node.instance_id
            and bool(verified_set)
            and r.verified_keys == verified_set
            and r.verified_mono is not None
            and 0 <= ctx.now - r.verified_mono < side.probe_interval_seconds
        )
        if recent:
            known.probes[node.ip] = Probe(skipped=True)
        else:
            due.append(node)
    return due
