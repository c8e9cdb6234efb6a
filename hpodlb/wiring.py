"""The composition root: real adapters (boto3, paramiko, the key store) wired to the core.

The only place that decides which concrete adapter serves a config; the CLI, the daemon, the tests'
simulated head node and the benchmarks all build their reconciler here, so they run the same thing.
"""

from __future__ import annotations

from functools import partial

from hpodlb import leader
from hpodlb.config import Config
from hpodlb.hostkeys import HostKeys
from hpodlb.hyperpod import HyperPod, sagemaker_client
from hpodlb.reconcile import Reconciler, key_side
from hpodlb.sshnode import ParamikoConnector, SshSettings


def ssh_settings(config: Config) -> SshSettings:
    s = config.ssh
    return SshSettings(s.user, s.port, str(s.key_file), s.sudo, s.connect_timeout_seconds)


def host_keys(config: Config) -> HostKeys:
    """The nodes' side of the host keys, over paramiko."""
    hk = config.host_keys
    connector = ParamikoConnector(ssh_settings(config))
    return HostKeys(connector, hk.types, str(hk.remote_dir), hk.reload_command)


def build_reconciler(config: Config) -> Reconciler:
    """Real adapters for a config: one elbv2 client per region, the host-key side if enabled."""
    from hpodlb.targets import TargetGroup, elbv2_client

    clients: dict[str, object] = {}
    groups = []
    for tg in config.target_groups:
        region = config.aws.region or tg.region
        if region not in clients:
            clients[region] = elbv2_client(region)
        groups.append(TargetGroup(clients[region], tg.arn, tg.port))
    keys = key_side(config, host_keys(config)) if config.host_keys.enabled else None
    return Reconciler(
        config,
        groups,
        keys,
        leader=partial(leader.check, config.cluster.leader),
        hyperpod=HyperPod(sagemaker_client(config.aws.region)),
    )
