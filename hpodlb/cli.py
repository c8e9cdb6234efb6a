"""The `hpodlb` command: argument parsing, exit statuses, and wiring adapters to the core.

Exit statuses are a contract (DESIGN.md): 2 means "could not even evaluate" (bad config, bad usage,
bad inventory for `plan`), 1 means "evaluated, and something is wrong or pending", 0 means all is well.
boto3 and paramiko are imported only by the commands that need them, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from hpodlb import __version__

if TYPE_CHECKING:
    from hpodlb.config import Config
    from hpodlb.provision import Provisioner, Report, Spec

EXIT_OK, EXIT_PENDING, EXIT_UNUSABLE = 0, 1, 2

Command = Callable[["Config", argparse.Namespace], int]


def cmd_plan(config: Config, args: argparse.Namespace) -> int:
    from hpodlb import report
    from hpodlb.state import load_state

    state, warning = load_state(config.state.dir)
    if warning:
        _log().warning("state_rebuilt", warning=warning)
    from hpodlb.wiring import build_reconciler

    outcome = build_reconciler(config).run_pass(state, apply=False)
    if outcome.inventory_error:
        _fail(f"cannot plan: {outcome.inventory_error}")
        return EXIT_UNUSABLE
    if outcome.errors:
        for error in outcome.errors:
            _fail(f"cannot plan: {error}")
        return EXIT_UNUSABLE
    assert outcome.plan is not None
    render = report.plan_json if args.json else report.plan_text
    print(render(outcome.plan, outcome.nodes))
    return EXIT_OK if outcome.plan.converged else EXIT_PENDING


def cmd_once(config: Config, args: argparse.Namespace) -> int:
    from hpodlb.lock import InstanceLock, LockedError
    from hpodlb.state import load_state, save_state

    try:
        lock = InstanceLock(config.state.dir).acquire()
    except LockedError as exc:
        _fail(str(exc))
        return EXIT_PENDING
    with lock:
        state, warning = load_state(config.state.dir)
        if warning:
            _log().warning("state_rebuilt", warning=warning)
        from hpodlb.wiring import build_reconciler

        outcome = build_reconciler(config).run_pass(state, apply=True)
        save_state(config.state.dir, state)
    _log().info(
        "pass_finished",
        converged=outcome.converged,
        summary=outcome.summary(),
        seconds=round(outcome.duration_seconds, 3),
    )
    if outcome.inventory_error:
        _fail(outcome.inventory_error)
        return EXIT_UNUSABLE
    print(outcome.summary())
    return EXIT_OK if outcome.converged else EXIT_PENDING


def cmd_run(config: Config, args: argparse.Namespace) -> int:
    from hpodlb.lock import InstanceLock, LockedError
    from hpodlb.logs import setup_logging
    from hpodlb.service import Daemon
    from hpodlb.wiring import build_reconciler

    setup_logging(verbose=getattr(args, "verbose", False), stream=sys.stdout)
    try:
        lock = InstanceLock(config.state.dir).acquire()
    except LockedError as exc:
        _fail(str(exc))
        _log().error("daemon_refused", error=str(exc))
        return EXIT_PENDING
    with lock:
        from hpodlb.config import config_path

        path = config_path(getattr(args, "config", None))
        return Daemon(path, config, build_reconciler, lock=lock).serve()


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    import json

    from hpodlb import report
    from hpodlb.state import load_state

    state, warning = load_state(config.state.dir)
    arns = [tg.arn for tg in config.target_groups]
    if args.json:
        doc = report.status_doc(state, arns, time.time())
        doc["state_warning"] = warning
        print(json.dumps(doc, indent=2))
    else:
        if warning:
            print(warning)
        print(report.status_text(state, arns, time.time()))
    return EXIT_OK


def cmd_check_config(config: Config, args: argparse.Namespace) -> int:
    from hpodlb.checks import run_checks
    from hpodlb.wiring import build_reconciler

    problems = 0
    for ok, line in run_checks(config, build_reconciler(config)):
        print(f"{'ok  ' if ok else 'FAIL'}  {line}")
        problems += not ok
    print(f"{problems} problem(s) found" if problems else "configuration is usable")
    return EXIT_PENDING if problems else EXIT_OK


def cmd_keys(config: Config, args: argparse.Namespace) -> int:
    from hpodlb.hostkeys import HostKeyGate, known_hosts_lines
    from hpodlb.keystore import KeyStore, KeyStoreError, generate
    from hpodlb.sshnode import SshError

    store = KeyStore(config.host_keys.store, config.host_keys.types)
    try:
        if args.keys_command == "generate":
            store.save({t: generate(t) for t in store.types}, overwrite=args.force)
            _log().warning("host_keys_generated", store=str(store.path))
        elif args.keys_command == "adopt":
            keys = HostKeyGate(config).adopt_from(args.from_ip)
            store.save(keys, overwrite=args.force)
            _log().warning("host_keys_adopted", ip=args.from_ip, store=str(store.path))
        keys = store.load()
    except (KeyStoreError, SshError) as exc:
        _fail(str(exc))
        return EXIT_PENDING
    if args.keys_command == "known-hosts":
        print("\n".join(known_hosts_lines(keys, args.host, args.port)))
    else:
        for key_type, key in keys.items():
            print(f"{key_type:8} {key.fingerprint}  {store.path / f'ssh_host_{key_type}_key'}")
    return EXIT_OK


def _provisioner(config: Config, args: argparse.Namespace) -> tuple[Provisioner, str]:
    from hpodlb.provision import Provisioner, cluster_name
    from hpodlb.targets import elbv2_client

    region = args.region or config.aws.region or _default_region()
    if not region:
        raise _UsageError("no AWS region: pass --region, set aws.region or AWS_REGION")
    cluster = args.cluster_name or cluster_name(config.cluster.resource_config)
    return Provisioner(elbv2_client(region), cluster, dry_run=args.dry_run), cluster


def cmd_provision(config: Config, args: argparse.Namespace) -> int:
    from hpodlb.config import config_path
    from hpodlb.provision import Spec, add_target_group_to_config

    spec: Spec | None = None

    def provision(prov: Provisioner, cluster: str) -> Report:
        nonlocal spec
        spec = Spec(
            cluster,
            args.vpc_id,
            tuple(args.subnet_id),
            tuple(args.security_group_id),
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
    def confirm(steps: Sequence[str]) -> bool:
        print("\n".join(steps))
        if args.yes:
            return True
        if not sys.stdin.isatty():
            _fail("refusing to delete without --yes (standard input is not a terminal)")
            return False
        return input("Delete these? [y/N] ").strip().lower() in ("y", "yes")

    code, report, cluster = _with_provisioner(
        config, args, lambda prov, _: prov.teardown(args.name_prefix, confirm)
    )
    if report is None:
        return code
    if args.dry_run:
        print("\n".join(f"would {c}" for c in report.changes) or "nothing to delete")
    elif report.changes:
        print(f"deleted {len(report.changes)} resource(s) of cluster {cluster}")
    else:
        print("nothing deleted")
    return EXIT_OK


class _UsageError(Exception):
    pass


def _with_provisioner(
    config: Config, args: argparse.Namespace, act: Callable[[Provisioner, str], Report]
) -> tuple[int, Report | None, str]:
    """Run `act` with a provisioner; turn the ways it can fail into a message and an exit status."""
    from botocore.exceptions import BotoCoreError, ClientError

    from hpodlb.provision import ProvisionError

    try:
        prov, cluster = _provisioner(config, args)
        return EXIT_OK, act(prov, cluster), cluster
    except _UsageError as exc:
        _fail(str(exc))
        return EXIT_UNUSABLE, None, ""
    except (ProvisionError, ClientError, BotoCoreError) as exc:
        _fail(str(exc))
        return EXIT_PENDING, None, ""


def _default_region() -> str:
    import boto3

    return str(boto3.session.Session().region_name or "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpodlb",
        description="Keep a HyperPod Slurm cluster's login-node NLB target groups and SSH host keys "
        "in step with its resource config.",
    )
    parser.add_argument("--version", action="version", version=f"hpodlb {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        metavar="PATH",
        help="config file (default: $HPODLB_CONFIG or /etc/hpodlb/config.toml)",
    )
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Command, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    add(
        "run",
        cmd_run,
        "the daemon: a pass at start, every interval_seconds and soon after the resource config "
        "changes; SIGHUP re-reads the config; exit 0 on SIGTERM",
    )
    add("once", cmd_once, "run one pass; exit 0 converged, 1 failed or held back, 2 unusable input")
    p = add(
        "plan",
        cmd_plan,
        "show what a pass would do and change nothing; exit 0 nothing to do, "
        "1 changes pending, 2 could not plan",
    )
    p.add_argument("--json", action="store_true", help="machine-readable plan")
    p = add("status", cmd_status, "login nodes and targets as of the last pass (no AWS calls)")
    p.add_argument("--json", action="store_true", help="machine-readable status")
    add(
        "check-config",
        cmd_check_config,
        "validate the config, resource config, AWS access and key store; exit 0 ok, 1 problems",
    )
    for name, func, text in (
        (
            "provision",
            cmd_provision,
            "find or create the login target group, internal NLB and listener",
        ),
        ("teardown", cmd_teardown, "delete them (listener, NLB, target group), only if hpodlb's"),
    ):
        p = add(name, func, text)
        p.add_argument("--name-prefix", default="smhp-login-node", help="NAME-tg and NAME-lb")
        p.add_argument(
            "--cluster-name", help="default: ClusterConfig.ClusterName of the resource config"
        )
        p.add_argument("--region", help="default: aws.region, else boto3's (AWS_REGION, profile)")
        p.add_argument(
            "--dry-run", action="store_true", help="say what would change; change nothing"
        )
        if name == "provision":
            p.add_argument("--vpc-id", required=True)
            p.add_argument(
                "--subnet-id", required=True, action="append", help="repeat for more subnets"
            )
            p.add_argument("--security-group-id", required=True, action="append")
            p.add_argument(
                "--port", type=int, default=22, help="listener and target port (default 22)"
            )
            p.add_argument("--stickiness", action="store_true", help="source-IP stickiness")
            p.add_argument(
                "--write-config",
                action="store_true",
                help="point the config file at the target group (comments kept)",
            )
        else:
            p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    keys = add("keys", cmd_keys, "the canonical SSH host keys every login node must present")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    keys_sub.add_parser(
        "show", parents=[common], help="type and SHA256 fingerprint of each canonical key"
    )
    gen = keys_sub.add_parser(
        "generate",
        parents=[common],
        help="create a new set (refuses to replace one without --force)",
    )
    gen.add_argument("--force", action="store_true", help="replace the existing keys")
    adopt = keys_sub.add_parser(
        "adopt", parents=[common], help="copy a login node's host keys into the store"
    )
    adopt.add_argument("--from", dest="from_ip", required=True, metavar="IP")
    adopt.add_argument("--force", action="store_true", help="replace the existing keys")
    kh = keys_sub.add_parser(
        "known-hosts", parents=[common], help="known_hosts lines to hand users for the NLB name"
    )
    kh.add_argument(
        "--host", required=True, metavar="NAME", help="the NLB DNS name users connect to"
    )
    kh.add_argument(
        "--port", type=int, default=22, metavar="N", help="the NLB port users connect to"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from hpodlb.config import ConfigError, config_path, load_config
    from hpodlb.logs import setup_logging

    setup_logging(verbose=getattr(args, "verbose", False), stream=sys.stderr)
    path = config_path(getattr(args, "config", None))
    try:
        config = load_config(path, os.environ)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            _fail(f"config error: {line}")
        _log().error("config_invalid", path=str(path), error=str(exc))
        return EXIT_UNUSABLE
    func: Command = args.func
    return func(config, args)


def _fail(line: str) -> None:
    print(f"hpodlb: {line}", file=sys.stderr)


def _log() -> Any:
    from hpodlb.logs import get_logger

    return get_logger("hpodlb.cli")
