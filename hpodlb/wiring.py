"""The composition root: real adapters (boto3, paramiko, the key store) wired to the core.

The only place that decides which concrete adapter serves a config. The CLI, the daemon, the
tests' simulated head node and the benchmarks build their reconciler here, so they run the same
thing; the commands take an `Adapters`, which builds each adapter the first time it is used, so a
command that only reads files (`drain`, `keys trust`) builds no AWS client.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import cached_property, partial
from typing import Any, Protocol

from hpodlb import leader
from hpodlb.config import Config
from hpodlb.context import KeySide
from hpodlb.hostkeys import HostKeys
from hpodlb.hyperpod import HyperPod, sagemaker_client
from hpodlb.inventory import Answer, LoginNode
from hpodlb.keystore import KeyStore
from hpodlb.observe import ClusterAnswers
from hpodlb.reconcile import Reconciler
from hpodlb.sshnode import LoginKey, ParamikoConnector, SshSettings
from hpodlb.targets import TargetGroup


class CommandAdapters(Protocol):
    """What a command reads through adapters. `Adapters` is the commands' own; the daemon's
    `Reconciler` offers the same, with the answers its passes have cached."""

    @property
    def groups(self) -> Sequence[TargetGroup]: ...

    @property
    def keys(self) -> KeySide | None: ...

    def login_groups(self) -> Answer: ...

    def desired(self) -> tuple[LoginNode, ...]: ...


def ssh_settings(config: Config) -> SshSettings:
    s = config.ssh
    return SshSettings(s.user, s.port, str(s.key_file), s.sudo, s.connect_timeout_seconds)


def host_keys(config: Config, connector: ParamikoConnector | None = None) -> HostKeys:
    """The nodes' side of the host keys, over paramiko."""
    hk = config.host_keys
    connector = connector or ParamikoConnector(ssh_settings(config))
    return HostKeys(connector, hk.types, str(hk.remote_dir), hk.reload_command)


def key_side(config: Config, host_keys: HostKeys, login: LoginKey | None = None) -> KeySide:
    """`login`: the key the connector of `host_keys` logs in with, which each pass reads."""
    hk = config.host_keys
    return KeySide(
        store=KeyStore(hk.store, hk.types),
        nodes=host_keys,
        adopt=hk.adopt_from_first_node,
        probe_interval_seconds=hk.probe_interval_seconds,
        timeout_seconds=config.ssh.connect_timeout_seconds,
        login=login,
    )


def target_groups(config: Config) -> list[TargetGroup]:
    """One elbv2 client per region, shared by the groups in it."""
    from hpodlb.targets import elbv2_client

    clients: dict[str, Any] = {}
    groups = []
    for tg in config.target_groups:
        region = config.region_for(tg)
        if region not in clients:
            clients[region] = elbv2_client(region)
        groups.append(TargetGroup(clients[region], tg.arn, tg.port))
    return groups


class Adapters:
    """The real adapters for one config, each built the first time it is used."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.cluster = ClusterAnswers()

    @cached_property
    def groups(self) -> list[TargetGroup]:
        return target_groups(self.config)

    @cached_property
    def connector(self) -> ParamikoConnector:
        return ParamikoConnector(ssh_settings(self.config))

    @cached_property
    def host_keys(self) -> HostKeys:
        return host_keys(self.config, self.connector)

    @cached_property
    def keys(self) -> KeySide | None:
        """The host-key side, None when host keys are off (and then no login anywhere)."""
        if not self.config.host_keys.enabled:
            return None
        return key_side(self.config, self.host_keys, self.connector.login_key)

    @cached_property
    def hyperpod(self) -> HyperPod:
        """Builds its SageMaker client on first call, if the login groups need DescribeCluster."""
        return HyperPod(sagemaker_client(self.config.aws.region))

    def login_groups(self) -> Answer:
        return self.cluster.login_groups(self.config, self.hyperpod, time.monotonic)

    def desired(self) -> tuple[LoginNode, ...]:
        return self.cluster.desired(self.config, self.hyperpod, time.monotonic)

    @property
    def groups_source(self) -> str:
        """`login-a (from ...)`, as the last `desired` found it."""
        return self.cluster.source

    def reconciler(self) -> Reconciler:
        return Reconciler(
            self.config,
            self.groups,
            self.keys,
            leader=partial(leader.check, self.config.cluster.leader),
            hyperpod=self.hyperpod,
        )


def build_reconciler(config: Config) -> Reconciler:
    """Real adapters for a config: one elbv2 client per region, the host-key side if enabled."""
    return Adapters(config).reconciler()
