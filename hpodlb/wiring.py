"""The composition root: real adapters (boto3, paramiko, the key store) wired to the core.

The only place that decides which concrete adapter serves a config; the CLI, the daemon, the tests'
simulated head node and the benchmarks all build their reconciler here, so they run the same thing.
"""

from __future__ import annotations

from hpodlb.config import Config
from hpodlb.reconcile import Reconciler


def build_reconciler(config: Config) -> Reconciler:
    """Real adapters for a config: one elbv2 client per region, the host-key gate if enabled."""
    from hpodlb.targets import TargetGroup, elbv2_client

    clients: dict[str, object] = {}
    groups = []
    for tg in config.target_groups:
        region = config.aws.region or tg.region
        if region not in clients:
            clients[region] = elbv2_client(region)
        groups.append(TargetGroup(clients[region], tg.arn, tg.port))
    gate = None
    if config.host_keys.enabled:
        from hpodlb.hostkeys import HostKeyGate

        gate = HostKeyGate(config)
    return Reconciler(config, groups, gate=gate)
