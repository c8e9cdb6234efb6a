"""`hpodlb provision` and `hpodlb teardown`: the NLB, its target group and listener.

The commands' side only: region and network from the flags and the cluster, what to print, and
the exit status. What is created, found or refused is `provision.py`'s.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from hpodlb.commandline import EXIT_OK, EXIT_PENDING, EXIT_UNUSABLE, fail

if TYPE_CHECKING:
    from hpodlb.config import Config
    from hpodlb.provision import Network, Provisioner, Report, Spec


def _provisioner(config: Config, args: argparse.Namespace) -> tuple[Provisioner, str]:
    from hpodlb.provision import Provisioner, cluster_name
    from hpodlb.targets import elbv2_client

    region = _region(config, args)
    if not region:
        raise UsageError(
            "no AWS region: pass --region, set aws.region or AWS_REGION (no target group in the "
            "config names one, and the instance metadata did not answer)"
        )
    cluster = args.cluster_name or cluster_name(config.cluster.resource_config)
    return Provisioner(elbv2_client(region), cluster, dry_run=args.dry_run), cluster


def cmd_provision(config: Config, args: argparse.Namespace) -> int:
    from hpodlb.config import config_path
    from hpodlb.provision import Spec, add_target_group_to_config

    spec: Spec | None = None

    def provision(prov: Provisioner, cluster: str) -> Report:
        nonlocal spec
        net = _network(config, args, cluster)
        print(
            f"network ({net.source}): {net.vpc_id}, subnets {', '.join(net.subnet_ids)}, "
            f"security groups {', '.join(net.security_group_ids)}"
        )
        if not args.security_group_id:
            print(
                "note: the NLB shares these security groups with the cluster's instances: a rule "
                "added there for users' SSH reaches every instance in them; pass "
                "--security-group-id with a group of its own to keep them apart"
            )
        spec = Spec(
            cluster,
            net.vpc_id,
            net.subnet_ids,
            net.security_group_ids,
            args.name_prefix,
            args.port,
            args.stickiness,
        )
        return prov.provision(spec)

    code, report, cluster = _with_provisioner(config, args, provision)
    if report is None or spec is None:
        return code
    verb = "would " if args.dry_run else ""
    for change in report.changes:
        print(f"{verb}{change}")
    if not report.changes:
        print(
            f"nothing to change: {spec.lb_name} and {spec.tg_name} of cluster {cluster} are in place"
        )
    print(f"target group ARN: {report.target_group_arn}")
    print(f"NLB DNS name:     {report.dns_name}")
    print(
        f"users connect:    ssh USER@{report.dns_name}"
        + (f" -p {spec.port}" if spec.port != 22 else "")
    )
    port = f" --port {spec.port}" if spec.port != 22 else ""
    print(f"their known_hosts: hpodlb keys known-hosts --host {report.dns_name}{port}")
    if args.write_config and not args.dry_run:
        path = config_path(getattr(args, "config", None))
        added = add_target_group_to_config(path, report.target_group_arn, spec.port)
        print(f"{path}: {'now points at the target group' if added else 'already points at it'}")
    return EXIT_OK


def cmd_teardown(config: Config, args: argparse.Namespace) -> int:
    declined = False

    def confirm(steps: Sequence[str]) -> bool:
        nonlocal declined
        if args.yes:
            print("\n".join(steps))
            return True
        print("\n".join(f"would {step}" for step in steps))
        if not sys.stdin.isatty():
            fail(
                "refusing to delete without --yes (standard input is not a terminal); nothing deleted"
            )
        elif input(f"Delete these {len(steps)} resource(s)? [y/N] ").strip().lower() in (
            "y",
            "yes",
        ):
            return True
        else:
            print("nothing deleted")
        declined = True
        return False

    code, report, cluster = _with_provisioner(
        config, args, lambda prov, _: prov.teardown(args.name_prefix, confirm)
    )
    if report is None:
        return code
    if declined:  # what was asked for did not happen: 1, as for any refusal
        return EXIT_PENDING
    if args.dry_run:
        print("\n".join(f"would {c}" for c in report.changes) or "nothing to delete")
    elif report.changes:
        print(f"deleted {len(report.changes)} resource(s) of cluster {cluster}")
    else:
        print("nothing to delete")
    return EXIT_OK


class UsageError(Exception):
    """The command line does not say enough to act on (exit 2)."""


def _with_provisioner(
    config: Config, args: argparse.Namespace, act: Callable[[Provisioner, str], Report]
) -> tuple[int, Report | None, str]:
    """Run `act` with a provisioner; turn the ways it can fail into a message and an exit status."""
    from botocore.exceptions import BotoCoreError, ClientError

    from hpodlb.provision import ProvisionError

    try:
        prov, cluster = _provisioner(config, args)
        return EXIT_OK, act(prov, cluster), cluster
    except UsageError as exc:
        fail(str(exc))
        return EXIT_UNUSABLE, None, ""
    except (ProvisionError, ClientError, BotoCoreError) as exc:
        fail(str(exc))
        return EXIT_PENDING, None, ""


def _network(config: Config, args: argparse.Namespace, cluster: str) -> Network:
    """The flags, with what is missing from the cluster's VpcConfig (found by the resource
    config's ClusterArn, else by name)."""
    import boto3

    from hpodlb.hyperpod import HyperPod, sagemaker_client
    from hpodlb.inventory import InventoryError, cluster_of
    from hpodlb.provision import cluster_network
    from hpodlb.targets import boto_config

    region = _region(config, args)
    arn = ""
    if not args.cluster_name:  # the resource config's ARN names the cluster exactly
        try:
            arn = cluster_of(config.cluster.resource_config)[0]
        except InventoryError:
            arn = ""
    ec2 = boto3.session.Session().client("ec2", region_name=region, config=boto_config())
    hyperpod = HyperPod(sagemaker_client(region))
    return cluster_network(
        hyperpod, ec2, arn or cluster, args.vpc_id, args.subnet_id, args.security_group_id
    )


def _region(config: Config, args: argparse.Namespace) -> str:
    """--region; else as the passes ask (`Config.region_for`: aws.region, else the configured
    target group's own region), the example config's placeholder group aside; else boto3's chain
    (AWS_REGION, the profile); else the instance metadata, which a head node has where the README's
    `provision --write-config` runs without AWS_REGION."""
    import boto3
    import botocore.session
    from botocore.utils import IMDSRegionProvider

    from hpodlb.provision import is_placeholder

    if args.region:
        return str(args.region)
    real = [tg for tg in config.target_groups if not is_placeholder(tg.arn)]
    if config.aws.region or real:
        return config.region_for(real[0] if real else None)
    region = boto3.session.Session().region_name
    if not region:
        region = IMDSRegionProvider(botocore.session.get_session()).provide()
    return str(region or "")
