"""The command line's surface: every command, option and help text, the exit statuses, and how
a command says it failed.

Exit statuses are a contract (DESIGN.md): 2 means "could not even evaluate" (bad config, bad usage,
bad inventory for `plan`, an unexpected error), 1 means "evaluated, and something is wrong or
pending", 0 means all is well; 141 (as after SIGPIPE) means whoever read the output stopped reading.
Each command's help says which it returns. Nothing here imports boto3, paramiko or the core, so
`--help` stays fast; an option's own check is imported only when the option is used.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hpodlb.config import Config

EXIT_OK, EXIT_PENDING, EXIT_UNUSABLE = 0, 1, 2
# Killed by SIGPIPE, as a shell reports it: what `yes | head -1` leaves in PIPESTATUS.
EXIT_READER_GONE = 128 + signal.SIGPIPE
EXIT_INTERRUPTED = 128 + signal.SIGINT

Command = Callable[["Config", argparse.Namespace], int]


def fail(line: str) -> None:
    """One line on stderr; `<3>` (err) first when stderr is the journal, for `journalctl -p err`."""
    from hpodlb.logs import stream_is_journal

    priority = "<3>" if stream_is_journal(sys.stderr) else ""
    print(f"{priority}hpodlb: {line}", file=sys.stderr)


def build_parser(commands: Mapping[str, Command]) -> argparse.ArgumentParser:
    """Every command, option and help text; each command's parser carries `func`, its entry in
    `commands` (the `keys` actions all share `commands["keys"]`)."""
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
    parser.add_argument("--version", action=_Version, help="print hpodlb's version and exit")
    add = _subcommands(parser, common, commands.__getitem__, dest="command", metavar="COMMAND")
    _add_pass_commands(add)
    _add_aws_commands(add)
    keys = add(
        "keys",
        "the canonical SSH host keys every login node must present",
        "The canonical SSH host keys every login node must present, kept in host_keys.store.",
    )
    keys_command = commands["keys"]
    _add_keys_commands(
        _subcommands(keys, common, lambda _: keys_command, dest="keys_command", metavar="ACTION")
    )
    p = add(
        "example",
        "print a file hpodlb ships: unit, config, iam-policy, alerts, dashboard",
        "Print a file that ships inside the package, exactly as shipped, so that the package "
        "alone is enough to install hpodlb: unit (the systemd unit, for "
        "/etc/systemd/system/hpodlb.service), config (the example config, every key with its "
        "default and why, for /etc/hpodlb/config.toml), iam-policy (the head node's IAM "
        "policy), alerts (Prometheus alert rules), dashboard (a Grafana dashboard). Reads no "
        "config. Exit status: 0 printed, 2 usage error.",
    )
    p.add_argument("name", choices=list(EXAMPLES), metavar="NAME", help=", ".join(EXAMPLES))
    return parser


# `hpodlb example NAME`: the files an admin installs, shipped inside the package (hpodlb/examples/
# links to systemd/ and config/, resolved when the wheel is built), so a wheel alone installs it.
EXAMPLES = {
    "unit": "hpodlb.service",
    "config": "hpodlb.toml",
    "iam-policy": "iam-policy.json",
    "alerts": "alerts.yml",
    "dashboard": "grafana-dashboard.json",
}


class _Version(argparse.Action):
    """--version: the installed package's version, read from its metadata only when asked."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        from hpodlb import __version__

        print(f"hpodlb {__version__}")
        parser.exit()


# add(name, summary for the command list, description for its own --help) -> its parser
Adder = Callable[[str, str, str], argparse.ArgumentParser]


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
    parser: argparse.ArgumentParser,
    common: argparse.ArgumentParser,
    func_of: Callable[[str], Command],
    *,
    dest: str,
    metavar: str,
) -> Adder:
    sub = parser.add_subparsers(dest=dest, required=True, metavar=metavar)

    def add(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=summary, description=description)
        p.set_defaults(func=func_of(name))
        return p

    return add


def _add_pass_commands(add: Adder) -> None:
    add(
        "run",
        "the daemon (what the systemd unit starts)",
        "The daemon: a pass at start, then every interval_seconds and soon after the resource "
        "config changes; SIGHUP re-reads the config. "
        "Exit status: 0 stopped by SIGTERM, 1 another instance holds the lock, 2 config or usage "
        "error.",
    )
    add(
        "once",
        "one pass",
        "Run one pass: read the login nodes, observe the target groups and host keys, apply the "
        "plan, save the state. Exit status: 0 converged, 1 something failed, is held back or "
        "waits, 2 config, usage or resource-config error.",
    )
    p = add(
        "plan",
        "what a pass would do; changes nothing",
        "Show what a pass would do and change nothing (it reads AWS and probes host keys). "
        "Exit status: 0 nothing to do, 1 changes pending, 2 could not plan (config, inventory or "
        "AWS error).",
    )
    p.add_argument("--json", action="store_true", help="machine-readable plan")
    p = add(
        "status",
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
        "check every input and permission a pass needs",
        "Check the config file, resource config, login groups, AWS access to each target group, "
        "state dir, key store and SSH key; change nothing. "
        "Exit status: 0 usable, 1 problems listed, 2 the config file itself is invalid.",
    )
    p = add(
        "doctor",
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
        "take a login node out of rotation for maintenance",
        "Take the login node at IP out of rotation until `hpodlb undrain IP`: recorded in the "
        "state dir (intents.json; kept across restarts), applied by the next pass (the "
        "daemon's, which it says is running or not, or `hpodlb once`) within the guards (a drain "
        "that would leave fewer than min_in_service login nodes in service is refused without "
        "--force). Its users get a wall notice; with host keys on, its host keys are still kept "
        "in step. --wait then follows the passes and the node's SSH sessions "
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
        "put a drained login node back in rotation",
        "Forget the drain of the login node at IP: the daemon's next pass registers it again "
        "once its host keys verify. Exit status: 0 undrained or not drained, 1 the intents "
        "file cannot be changed, 2 config or usage error.",
    )
    p.add_argument("ip", type=_ipv4, metavar="IP", help="the login node's IP")


def _add_aws_commands(add: Adder) -> None:
    p = add(
        "provision",
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
    p.add_argument(
        "--region",
        help="default: aws.region, else the configured target group's, else AWS_REGION or the "
        "profile's, else the instance metadata's",
    )
    p.add_argument("--dry-run", action="store_true", help="say what would change; change nothing")


def _add_keys_commands(add: Adder) -> None:
    add(
        "show",
        "type and SHA256 fingerprint of each canonical key",
        "Type, SHA256 fingerprint (as ssh-keygen -lf prints it) and file of each canonical key. "
        "Exit status: 0 shown, 1 store missing or unsafe, 2 config or usage error.",
    )
    p = add(
        "generate",
        "create a new canonical set",
        "Create a new canonical set in memory and write it to an empty store, private keys 0600 "
        "from the first byte. A store in use is never replaced: that is `keys rotate`; --force "
        "replaces only a set that is unusable (incomplete, unparsable). "
        "Exit status: 0 written, 1 store in use or unsafe, 2 config or usage error.",
    )
    p.add_argument("--force", action="store_true", help="replace an unusable set")
    p = add(
        "adopt",
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
        "known_hosts lines to hand users for the NLB name",
        "Lines for users' ~/.ssh/known_hosts: the canonical keys under the NLB's DNS name "
        "([NAME]:N when N is not 22); during a rotation the previous keys too, after a comment. "
        "Exit status: 0 printed, 1 store missing or unsafe, 2 config or usage error.",
    )
    _nlb_name_options(p, "the NLB DNS name users connect to (lowercase, as ssh matches it)")

    p = add(
        "ssh-config",
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
