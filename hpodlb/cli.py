"""The `hpodlb` command: argument parsing, exit statuses, and wiring adapters to the core.

Exit statuses are a contract (DESIGN.md): 2 means "could not even evaluate" (bad config, bad usage,
bad inventory for `plan`, an unexpected error), 1 means "evaluated, and something is wrong or
pending", 0 means all is well; 141 (as after SIGPIPE) means whoever read the output stopped reading.
boto3 and paramiko are imported only by the commands that need them, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from hpodlb import __version__

if TYPE_CHECKING:
    from hpodlb.config import Config
    from hpodlb.drain import Drains
    from hpodlb.provision import Network, Provisioner, Report, Spec

EXIT_OK, EXIT_PENDING, EXIT_UNUSABLE = 0, 1, 2
# Killed by SIGPIPE, as a shell reports it: what `yes | head -1` leaves in PIPESTATUS.
EXIT_READER_GONE = 128 + signal.SIGPIPE
EXIT_INTERRUPTED = 128 + signal.SIGINT

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
    return EXIT_OK if outcome.plan.settled else EXIT_PENDING


def cmd_once(config: Config, args: argparse.Namespace) -> int:
    from hpodlb.lock import InstanceLock, LockedError
    from hpodlb.outcome import log_finished
    from hpodlb.record import save_outcome
    from hpodlb.state import load_state

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

        reconciler = build_reconciler(config)
        outcome = reconciler.run_pass(state, apply=True)
        save_outcome(config.state.dir, state, outcome)
        if config.metrics.textfile is not None:  # under the lock: a daemon may own the file
            from hpodlb.metrics import write_once

            write_once(config, state, outcome, reconciler)
    log_finished(outcome)
    if outcome.inventory_error:
        _fail(outcome.inventory_error)
        return EXIT_UNUSABLE
    if outcome.standby:  # another head acts: observing was this pass's whole job
        print(f"{outcome.standby}: observed only, changed nothing; {outcome.summary()}")
        sound = outcome.leadership is not None and outcome.leadership.sound
        return EXIT_OK if sound and not outcome.errors else EXIT_PENDING
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
    if args.live:
        from hpodlb.context import read_boot_id
        from hpodlb.record import record_live_health
        from hpodlb.wiring import Adapters

        # Into the state as read: the state file is not written.
        groups = Adapters(config).groups
        record_live_health(groups, state, read_boot_id(), time.monotonic(), time.time())
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
    from hpodlb.wiring import Adapters

    problems = 0
    for ok, line in run_checks(config, Adapters(config)):
        print(f"{'ok  ' if ok else 'FAIL'}  {line}")
        problems += not ok
    print(f"{problems} problem(s) found" if problems else "configuration is usable")
    return EXIT_PENDING if problems else EXIT_OK


def cmd_doctor(config: Config, args: argparse.Namespace) -> int:
    from hpodlb.doctor import render_json, render_text, run_doctor
    from hpodlb.wiring import Adapters

    report = run_doctor(config, Adapters(config))
    print(render_json(report) if args.json else render_text(report))
    return report.exit_status


def cmd_drain(config: Config, args: argparse.Namespace) -> int:
    from hpodlb.drain import DrainError, Drains

    drains = Drains(config)
    try:
        result = drains.drain(args.ip, args.reason, force=args.force)
    except DrainError as exc:
        _fail(str(exc))
        return EXIT_PENDING
    node, reason = result.node, result.request.reason
    if result.restored:
        print(f"intents.json was gone: restored the drains of {', '.join(result.restored)}")
    if result.unchanged:
        print(f"{node.label()} is drained already ({reason}): nothing changed")
    elif result.forced_now:
        print(f"{node.label()} is drained already ({reason}): now with --force (past the guards)")
    else:
        print(
            f"{node.label()} drained: {reason}. The daemon takes it out of rotation at its next "
            "pass (it sees this within a second), within its guards, and keeps it out until "
            f"`hpodlb undrain {node.ip}`; its host keys are still kept in step."
        )
        if result.note:
            print(f"note: {result.note}")
        if result.told:
            print(f"warning: could not tell its users (wall): {result.told}")
        else:
            print("Its users were told (wall): new logins go to the other login nodes.")
    if args.wait is None:
        return EXIT_OK
    return _wait_drained(drains, node.ip, result.request.requested_at, args.wait)


def _wait_drained(drains: Drains, ip: str, since: float, seconds: float) -> int:
    from hpodlb.sessions import NO_LOGINS

    def say(line: str) -> None:  # each change as it happens, also into a pipe (`| tee`) or a file
        print(line, flush=True)

    try:
        done = drains.wait(ip, since, seconds, say, time.monotonic)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {ip} stays drained (`hpodlb undrain {ip}` to undo)")
        return EXIT_INTERRUPTED
    if not done:
        print(f"{ip}: not yet both out of rotation and empty after {seconds:g}s")
        return EXIT_PENDING
    if drains.counts_sessions:
        print(f"{ip}: out of rotation, and no SSH session left")
    else:
        print(f"{ip}: out of rotation (its sessions are not counted: {NO_LOGINS})")
    return EXIT_OK


def cmd_undrain(config: Config, args: argparse.Namespace) -> int:
    from hpodlb.drain import DrainError, Drains

    try:
        was, restored = Drains(config).undrain(args.ip)
    except DrainError as exc:
        _fail(str(exc))
        return EXIT_PENDING
    if restored:
        print(f"intents.json was gone: restored the drains of {', '.join(restored)}")
    if was:
        print(
            f"{args.ip} undrained: back in rotation at the daemon's next pass, once its host keys "
            "verify."
        )
    else:
        print(f"{args.ip} is not drained: nothing to do")
    return EXIT_OK


def cmd_keys(config: Config, args: argparse.Namespace) -> int:
    from hpodlb import keyadmin

    action = args.keys_command
    try:
        if action == "generate":
            keyadmin.generate_keys(config, force=args.force)
        elif action == "adopt":
            keyadmin.adopt_keys(config, args.from_ip, force=args.force)
        elif action == "rotate":
            keyadmin.rotate_keys(config, args.from_ip)
        elif action == "trust":
            request = keyadmin.trust_node(config, args.ip)
            print(f"{args.ip} ({request.instance_id}): its current keys are accepted once; the")
            print("next pass pushes the canonical keys to it and puts it back in rotation.")
            return EXIT_OK
        elif action == "known-hosts":
            print("\n".join(keyadmin.known_hosts(config, args.host, args.port)))
            return EXIT_OK
        elif action == "ssh-config":
            block = keyadmin.ssh_config(config, args.host, args.port, args.dns_name)
            print(block.text)
            if block.missing:
                _fail(block.missing)
                return EXIT_PENDING
            return EXIT_OK
        listing = keyadmin.show(config)
    except keyadmin.KeyCommandError as exc:
        _fail(str(exc))
        return EXIT_PENDING
    store = keyadmin.store_of(config)
    for label, keys in (("", listing.current), ("previous ", listing.previous)):
        where = store.set_dir("previous" if label else "current")
        for key_type, key in keys.items():
            print(f"{label}{key_type:8} {key.fingerprint}  {where}/ssh_host_{key_type}_key")
    if action == "rotate":
        print("Rotation started: the previous keys stay valid until every login node presents the")
        print("new ones. Hand users the new lines now: hpodlb keys known-hosts --host NLB-NAME")
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
            _fail(
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


def _network(config: Config, args: argparse.Namespace, cluster: str) -> Network:
    """The flags, with what is missing from the cluster's VpcConfig (found by the resource
    config's ClusterArn, else by name)."""
    import boto3

    from hpodlb.hyperpod import HyperPod, sagemaker_client
    from hpodlb.inventory import InventoryError, cluster_of
    from hpodlb.provision import cluster_network
    from hpodlb.targets import boto_config

    region = args.region or config.aws.region or _default_region()
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


def _default_region() -> str:
    import boto3

    return str(boto3.session.Session().region_name or "")


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog="hpodlb",
        parents=[common],
        description="Keep a HyperPod Slurm cluster's login-node NLB target groups and SSH host keys "
        "in step with its resource config.",
        epilog="--config and -v go before or after COMMAND. Every command exits 2 when the config "
        "file is invalid, on a usage error, or on an unexpected error (one line; -v adds the "
        "traceback).",
    )
    parser.add_argument("--version", action="version", version=f"hpodlb {__version__}")
    add = _subcommands(parser, common, dest="command", metavar="COMMAND")
    _add_pass_commands(add)
    _add_aws_commands(add)
    keys = add(
        "keys",
        cmd_keys,
        "the canonical SSH host keys every login node must present",
        "The canonical SSH host keys every login node must present, kept in host_keys.store.",
    )
    _add_keys_commands(_subcommands(keys, common, dest="keys_command", metavar="ACTION"))
    return parser


# add(name, func, summary for the command list, description for its own --help) -> its parser
Adder = Callable[[str, Command, str, str], argparse.ArgumentParser]


def _common_options() -> argparse.ArgumentParser:
    """--config and -v, accepted before and after any command.

    SUPPRESS as the default, at every level: a level that was not given the option leaves the
    namespace alone, so `hpodlb --config X status` is not undone by `status`'s own default.
    """
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
    return common


def _subcommands(
    parser: argparse.ArgumentParser, common: argparse.ArgumentParser, *, dest: str, metavar: str
) -> Adder:
    sub = parser.add_subparsers(dest=dest, required=True, metavar=metavar)

    def add(name: str, func: Command, summary: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=summary, description=description)
        p.set_defaults(func=func)
        return p

    return add


def _add_pass_commands(add: Adder) -> None:
    add(
        "run",
        cmd_run,
        "the daemon (what the systemd unit starts)",
        "The daemon: a pass at start, then every interval_seconds and soon after the resource "
        "config changes; SIGHUP re-reads the config. "
        "Exit status: 0 stopped by SIGTERM, 1 another instance holds the lock, 2 config or usage "
        "error.",
    )
    add(
        "once",
        cmd_once,
        "one pass",
        "Run one pass: read the login nodes, observe the target groups and host keys, apply the "
        "plan, save the state. Exit status: 0 converged, 1 something failed, is held back or "
        "waits, 2 config, usage or resource-config error.",
    )
    p = add(
        "plan",
        cmd_plan,
        "what a pass would do; changes nothing",
        "Show what a pass would do and change nothing (it reads AWS and probes host keys). "
        "Exit status: 0 nothing to do, 1 changes pending, 2 could not plan (config, inventory or "
        "AWS error).",
    )
    p.add_argument("--json", action="store_true", help="machine-readable plan")
    p = add(
        "status",
        cmd_status,
        "login nodes, their keys, targets and NLB health",
        "Login nodes and targets as of the last pass, read from the state file (no AWS call): "
        "key state, target state and NLB health (with AWS's reason, and since when) per target "
        "group, what is held back or waiting. --live asks AWS for the targets' health now. "
        "Exit status: 0 shown, 2 config or usage error.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable status")
    p.add_argument(
        "--live",
        action="store_true",
        help="ask AWS for the targets' health now, instead of showing the last pass's",
    )
    add(
        "check-config",
        cmd_check_config,
        "check every input and permission a pass needs",
        "Check the config file, resource config, login groups, AWS access to each target group, "
        "state dir, key store and SSH key; change nothing. "
        "Exit status: 0 usable, 1 problems listed, 2 the config file itself is invalid.",
    )
    p = add(
        "doctor",
        cmd_doctor,
        "check the whole path a user's SSH takes, with the fix for each problem",
        "Check the path of a user's SSH end to end, read-only: config and login nodes; AWS "
        "identity and every read hpodlb needs; each target group (type, port, VPC, health "
        "checks, attributes for long sessions); its NLB (internal, active, a listener forwarding "
        "to it, a subnet in every login node's zone, idle timeout); the login nodes' security "
        "groups; sshd on each node (reachable, sudo, host keys, keepalive); the key store; the "
        "daemon. Each line is PASS, WARN or FAIL with the fix. Exit status: 0 no FAIL, 1 some "
        "FAIL, 2 could not evaluate (config invalid, or AWS not reachable at all).",
    )
    p.add_argument("--json", action="store_true", help="machine-readable checklist")
    p = add(
        "drain",
        cmd_drain,
        "take a login node out of rotation for maintenance",
        "Take the login node at IP out of rotation until `hpodlb undrain IP`: recorded in the "
        "state dir (intents.json; kept across restarts), applied by the daemon's next pass "
        "within the guards (a drain that would leave fewer than min_in_service registered "
        "targets is refused without --force). Its users get a wall notice; its host keys are "
        "still kept in step. --wait then follows the daemon's passes and the node's SSH sessions "
        "until it is out of rotation and empty. A standby head refuses (drains are per head). "
        "Exit status: 0 drained (with --wait: out and empty), 1 refused, not a login node, or "
        "not out and empty when --wait ran out, 2 config or usage error, 130 interrupted "
        "(the drain stays).",
    )
    p.add_argument("ip", type=_ipv4, metavar="IP", help="the login node's IP")
    p.add_argument(
        "--reason",
        type=_checked("hpodlb.drain", "check_reason"),
        metavar="TEXT",
        help="shown to its users and in status (one line; default: the reason it is drained "
        "for already, else maintenance)",
    )
    p.add_argument(
        "--wait",
        type=_seconds,
        metavar="SECONDS",
        help="then report whether it is out of rotation and its SSH sessions, until it is out "
        "and none is left, or SECONDS pass",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="drain even below min_in_service and past max_deregister_fraction",
    )
    p = add(
        "undrain",
        cmd_undrain,
        "put a drained login node back in rotation",
        "Forget the drain of the login node at IP: the daemon's next pass registers it again "
        "once its host keys verify. Exit status: 0 undrained or not drained, 1 the intents "
        "file cannot be changed, 2 config or usage error.",
    )
    p.add_argument("ip", type=_ipv4, metavar="IP", help="the login node's IP")


def _add_aws_commands(add: Adder) -> None:
    p = add(
        "provision",
        cmd_provision,
        "find or create the login target group, internal NLB and listener",
        "Find or create the target group PREFIX-tg (IP targets, TCP), the internal NLB PREFIX-lb "
        "and its listener, tagged hpodlb:managed=true and hpodlb:cluster=<ClusterName>; a second "
        "run changes nothing and a same-named resource without those tags is refused. "
        "Exit status: 0 done or nothing to change, 1 refused or AWS error, 2 config or usage "
        "error.",
    )
    _aws_options(p)
    p.add_argument("--vpc-id", help="default: the VPC of the subnets")
    p.add_argument(
        "--subnet-id",
        action="append",
        default=[],
        help="repeat for more subnets (default: the cluster's VpcConfig subnets, DescribeCluster)",
    )
    p.add_argument(
        "--security-group-id",
        action="append",
        default=[],
        help="repeat for more (default: the cluster's VpcConfig security groups)",
    )
    p.add_argument(
        "--port", type=_port, default=22, metavar="N", help="listener and target port (default 22)"
    )
    p.add_argument("--stickiness", action="store_true", help="source-IP stickiness")
    p.add_argument(
        "--write-config",
        action="store_true",
        help="point the config file at the target group (comments kept)",
    )
    p = add(
        "teardown",
        cmd_teardown,
        "delete what provision made (only if it carries hpodlb's tags)",
        "Delete the listener, the NLB and the target group, in that order, and only those that "
        "carry hpodlb's tags for this cluster. Lists what it would delete and asks first; without "
        "a terminal it deletes only with --yes. Exit status: 0 deleted or nothing to delete, "
        "1 refused, declined or AWS error, 2 config or usage error.",
    )
    _aws_options(p)
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")


def _aws_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name-prefix", default="smhp-login-node", help="NAME-tg and NAME-lb")
    p.add_argument(
        "--cluster-name", help="default: ClusterConfig.ClusterName of the resource config"
    )
    p.add_argument("--region", help="default: aws.region, else boto3's (AWS_REGION, profile)")
    p.add_argument("--dry-run", action="store_true", help="say what would change; change nothing")


def _add_keys_commands(add: Adder) -> None:
    add(
        "show",
        cmd_keys,
        "type and SHA256 fingerprint of each canonical key",
        "Type, SHA256 fingerprint (as ssh-keygen -lf prints it) and file of each canonical key. "
        "Exit status: 0 shown, 1 store missing or unsafe, 2 config or usage error.",
    )
    p = add(
        "generate",
        cmd_keys,
        "create a new canonical set",
        "Create a new canonical set in memory and write it to an empty store, private keys 0600 "
        "from the first byte. A store in use is never replaced: that is `keys rotate`; --force "
        "replaces only a set that is unusable (incomplete, unparsable). "
        "Exit status: 0 written, 1 store in use or unsafe, 2 config or usage error.",
    )
    p.add_argument("--force", action="store_true", help="replace an unusable set")
    p = add(
        "adopt",
        cmd_keys,
        "copy a login node's host keys into the store",
        "Copy the host keys of the login node at IP into an empty store, through an SSH session "
        "pinned to the keys a probe of it shows. A store in use is never replaced: that is "
        "`keys rotate --from IP`; --force replaces only an unusable set. "
        "Exit status: 0 copied, 1 node or store problem, 2 config or usage error.",
    )
    p.add_argument("--from", dest="from_ip", required=True, metavar="IP")
    p.add_argument("--force", action="store_true", help="replace an unusable set")
    p = add(
        "rotate",
        cmd_keys,
        "a new canonical set; the old one stays valid until every node presents the new one",
        "Make a new canonical set (generated, or --from a login node) and keep the current one as "
        "the previous set. Nodes presenting the previous set are updated in place, without "
        "leaving rotation; once every login node presents the new set, the previous one is "
        "retired. Hand users the new `keys known-hosts` lines first. "
        "Exit status: 0 rotated, 1 no usable store or a rotation still in progress, 2 config or "
        "usage error.",
    )
    p.add_argument("--from", dest="from_ip", metavar="IP", help="take the new set from this node")
    p = add(
        "trust",
        cmd_keys,
        "accept, once, the keys a re-imaged login node presents now",
        "A login node that hpodlb verified before and that now presents other keys for the same "
        "instance (re-imaged in place, or an impostor) is held out of rotation and nothing is "
        "pushed to it. If you re-imaged it on purpose, this accepts exactly the keys it presents "
        "now, for its current instance only; the next pass pushes the canonical keys to it and "
        "puts it back. Exit status: 0 accepted, 1 not a login node or not reachable, 2 config or "
        "usage error.",
    )
    p.add_argument("ip", metavar="IP", help="the login node's IP (as in the resource config)")
    p = add(
        "known-hosts",
        cmd_keys,
        "known_hosts lines to hand users for the NLB name",
        "Lines for users' ~/.ssh/known_hosts: the canonical keys under the NLB's DNS name "
        "([NAME]:N when N is not 22); during a rotation the previous keys too, after a comment. "
        "Exit status: 0 printed, 1 store missing or unsafe, 2 config or usage error.",
    )
    _nlb_name_options(p, "the NLB DNS name users connect to (lowercase, as ssh matches it)")

    p = add(
        "ssh-config",
        cmd_keys,
        "a ~/.ssh/config block for users: the NLB and one alias per login node",
        "A block for users' ~/.ssh/config: Host NAME at the DNS name of the first target group's "
        "load balancer on port N, and Host NAME-1, NAME-2, ... at each login node's IP and "
        "ssh.port, in the resource config's order, all with the HostKeyAlias that the lines of "
        "`keys known-hosts --host NAME --port N` match. Without the login nodes it still prints "
        "the NLB block. Exit status: 0 printed, 1 no canonical keys, no load balancer, AWS "
        "denied or unreachable, or the login nodes unreadable (the NLB block only), 2 config or "
        "usage error.",
    )
    _nlb_name_options(p, "the short name users type, e.g. hpod-login (lowercase)")
    p.add_argument(
        "--dns-name",
        type=_checked("hpodlb.sshconfig", "check_dns_name"),
        metavar="DNS",
        help="the NLB's DNS name (default: asked of AWS, from the first target group)",
    )


def _nlb_name_options(p: argparse.ArgumentParser, host_help: str) -> None:
    """--host NAME and --port N of the commands whose output users' ssh matches by that name
    (known-hosts and ssh-config must agree on both, or the lines would not match the block)."""
    p.add_argument(
        "--host",
        required=True,
        type=_checked("hpodlb.sshconfig", "check_name"),
        metavar="NAME",
        help=host_help,
    )
    p.add_argument(
        "--port", type=_port, default=22, metavar="N", help="the NLB port users connect to"
    )


def _checked(module: str, check: str) -> Callable[[str], str]:
    """An argparse type from `module.check(text) -> text` (ValueError saying why), imported only
    when the option is used, so `--help` stays fast."""

    def convert(text: str) -> str:
        import importlib

        try:
            return str(getattr(importlib.import_module(module), check)(text))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _ipv4(text: str) -> str:
    import ipaddress

    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 address") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 7 * 86400:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0..604800)")
    return value


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1..65535)")
    return port


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, load the config, run the command: the one boundary every command's failure crosses.

    An exception no command handles is a bug or an environment hpodlb cannot use (e.g.
    AWS_DEFAULTS_MODE=bogus): it exits 2, "could not even evaluate", never 1, which `plan` and `once`
    use for "changes pending". One line names it; -v adds the traceback. Output into a pipe whose
    reader has gone (`hpodlb plan --json | head -1`) ends quietly, as a SIGPIPE would end it.
    """
    verbose = False
    try:
        try:
            args = build_parser().parse_args(argv)  # --help and usage errors exit here
            verbose = bool(getattr(args, "verbose", False))
            from hpodlb.logs import setup_logging

            setup_logging(verbose=verbose, stream=sys.stderr)
            return _load_config_and_run(args)
        finally:
            # Output still buffered for a reader that went away fails here, not at interpreter exit.
            sys.stdout.flush()
    except BrokenPipeError as exc:
        if not _reader_gone(sys.stdout) and not _reader_gone(sys.stderr):
            return _unexpected(exc, verbose=verbose)  # a socket's EPIPE is no closed pipe of ours
        return _quiet_after_reader_gone()
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback
        _fail("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:  # the boundary: anything left becomes one line and exit 2
        return _unexpected(exc, verbose=verbose)


def _load_config_and_run(args: argparse.Namespace) -> int:
    from hpodlb.config import ConfigError, config_path, load_config

    path = config_path(getattr(args, "config", None))
    func: Command = args.func
    try:
        return func(load_config(path, os.environ), args)
    except ConfigError as exc:  # the file, an override, or a setting read later (AWS_MAX_ATTEMPTS)
        # One line per problem and nothing else: a log event beside it said the same thing twice.
        for line in str(exc).splitlines():
            _fail(f"config error: {line}")
        return EXIT_UNUSABLE


def _reader_gone(stream: TextIO) -> bool:
    """True when `stream` is a pipe whose reading end is closed (`hpodlb plan | head -1`)."""
    import select

    try:
        poller = select.poll()
        poller.register(stream.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):  # no file descriptor (pytest's capture), or already closed
        return False


def _quiet_after_reader_gone() -> int:
    """Stop writing, say nothing, exit as a process killed by SIGPIPE would.

    Whoever closed the pipe has all it wanted (`head -1`); a traceback would only be noise. Output
    still buffered would fail again when the interpreter flushes it at exit (and turn the status
    into 120), so the stream that broke now points at /dev/null. 141 rather than 0 or 1 because the command did
    not finish saying what it had to say: `plan`'s 0 or 1 would claim a verdict nobody read. 141
    is what a shell reports for any Unix tool whose reader went away (`yes | head -1`), so
    `set -o pipefail` scripts already know it.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        if _reader_gone(stream):
            os.dup2(devnull, stream.fileno())
    os.close(devnull)
    return EXIT_READER_GONE


def _unexpected(exc: BaseException, *, verbose: bool) -> int:
    if verbose:
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    first = next(iter(str(exc).splitlines()), "")
    hint = "" if verbose else " (run with -v for the traceback)"
    _fail(f"unexpected error: {type(exc).__name__}: {first}{hint}")
    return EXIT_UNUSABLE


def _fail(line: str) -> None:
    """One line on stderr; `<3>` (err) first when stderr is the journal, for `journalctl -p err`."""
    from hpodlb.logs import stream_is_journal

    priority = "<3>" if stream_is_journal(sys.stderr) else ""
    print(f"{priority}hpodlb: {line}", file=sys.stderr)


def _log() -> Any:
    from hpodlb.logs import get_logger

    return get_logger("hpodlb.cli")
