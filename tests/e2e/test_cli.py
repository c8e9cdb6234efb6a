"""The `hpodlb` command as an admin runs it: a real process, boto3 pointed at a moto server."""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

import pytest

from hpodlb.config import load_config
from sim.aws import FakeAws
from sim.env import SimEnv
from tests.support.daemon import Daemon, spawn_daemon, stop_daemons
from tests.support.data import FIGURES
from tests.support.lab import nodes


@pytest.fixture
def hpodlb(aws: FakeAws, fresh_env: None) -> Callable[..., subprocess.CompletedProcess[str]]:
    def run(
        *args: str, env: dict[str, str] | None = None, stdout: int = subprocess.PIPE
    ) -> subprocess.CompletedProcess[str]:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("HPODLB_", "AWS_"))}
        full_env.update(aws.env())
        full_env.update(env or {})
        return subprocess.run(
            [sys.executable, "-m", "hpodlb", *args],
            env=full_env,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
        )

    return run


# The fixture's login nodes: IP, instance, name.
LOGIN_NODES = [
    ("10.1.70.201", "i-0a1b2c3d4e5f60013", "login-group-3"),
    ("10.1.71.12", "i-0a1b2c3d4e5f60011", "login-group-1"),
    ("10.1.72.45", "i-0a1b2c3d4e5f60012", "login-group-2"),
]


def rows(table: str) -> list[list[str]]:
    """A table as `plan`/`status` print it (columns two or more spaces apart), cell by cell."""
    return [re.split(r" {2,}", line) for line in table.splitlines()]


def listed_commands(help_text: str) -> list[str]:
    """The command names `--help` lists under "positional arguments:" (4-space indented rows)."""
    section = help_text.split("positional arguments:\n", 1)[1].split("\n\n", 1)[0]
    return [m.group(1) for m in re.finditer(r"^    (\S+)", section, re.MULTILINE)]


def description(help_text: str) -> str:
    """The paragraph `--help` prints between the usage block and the first section, on one line."""
    paragraph = help_text.split("\n\n")[1]
    sections = ("options:", "positional arguments:")
    return "" if paragraph.split("\n")[0] in sections else " ".join(paragraph.split())


# Each command's exit statuses (DESIGN.md's contract; every command can also exit 2 on bad usage).
EXIT_STATUSES = {
    "run": {0, 1, 2},
    "once": {0, 1, 2},
    "plan": {0, 1, 2},
    "status": {0, 2},
    "check-config": {0, 1, 2},
    "provision": {0, 1, 2},
    "teardown": {0, 1, 2},
    "doctor": {0, 1, 2},
    "keys show": {0, 1, 2},
    "keys generate": {0, 1, 2},
    "keys adopt": {0, 1, 2},
    "keys known-hosts": {0, 1, 2},
    "keys rotate": {0, 1, 2},
    "keys trust": {0, 1, 2},
    "keys ssh-config": {0, 1, 2},
    "drain": {0, 1, 2},
    "undrain": {0, 1, 2},
    "example": {0, 2},
}


def test_help_lists_the_commands(hpodlb: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    """`hpodlb --help` and `hpodlb keys --help` list exactly the commands that exist, in order."""
    top = hpodlb("--help")
    assert top.returncode == 0
    assert listed_commands(top.stdout) == [
        "run",
        "once",
        "plan",
        "status",
        "check-config",
        "doctor",
        "drain",
        "undrain",
        "provision",
        "teardown",
        "keys",
        "example",
    ]
    assert listed_commands(hpodlb("keys", "--help").stdout) == [
        "show",
        "generate",
        "adopt",
        "rotate",
        "trust",
        "known-hosts",
        "ssh-config",
    ]


@pytest.mark.parametrize("command", sorted(EXIT_STATUSES))
def test_each_command_describes_itself_and_its_exit_statuses(
    hpodlb: Callable[..., subprocess.CompletedProcess[str]], command: str
) -> None:
    """Each command's --help has a whole-sentence description ending in its exit statuses."""
    out = hpodlb(*command.split(), "--help")
    assert out.returncode == 0
    match = re.fullmatch(r"[A-Z][^\n]*\. Exit status: (.*)\.", description(out.stdout))
    assert match, description(out.stdout)
    assert {int(n) for n in re.findall(r"(?:^|, )(\d) ", match.group(1))} == EXIT_STATUSES[command]


def test_config_and_verbose_go_before_or_after_the_command(
    hpodlb: Callable[..., subprocess.CompletedProcess[str]],
    write_config: Callable[..., Path],
    arn: str,
    tmp_path: Path,
) -> None:
    """`hpodlb --config X -v plan` and `hpodlb plan --config X -v` read X and log at debug level."""
    store = tmp_path / "no-store"
    cfg = str(write_config([{"arn": arn, "port": 22}], host_keys={"store": str(store)}))
    runs = {
        "before": hpodlb("--config", cfg, "-v", "plan", "--json"),
        "after": hpodlb("plan", "--json", "--config", cfg, "-v"),
        "nested": hpodlb("--config", cfg, "-v", "keys", "show"),
    }
    for run in (runs["before"], runs["after"]):
        assert run.returncode == 1, run.stderr
        assert len(json.loads(run.stdout)["actions"]) == 3
        levels = {json.loads(ln)["level"] for ln in run.stderr.splitlines() if ln.startswith("{")}
        assert "debug" in levels
    nested = runs["nested"]
    assert nested.returncode == 1  # X was read: it names a key store that does not exist
    assert nested.stderr.splitlines()[-1] == f"hpodlb: {store}: key store does not exist"


@pytest.mark.parametrize(
    "args",
    [
        ("keys", "known-hosts", "--host", "nlb.example", "--port", "0"),
        ("keys", "known-hosts", "--host", "nlb.example", "--port", "65536"),
        ("keys", "ssh-config", "--host", "hpod-login", "--port", "0"),
        (
            "provision",
            "--vpc-id",
            "vpc-1",
            "--subnet-id",
            "s-1",
            "--security-group-id",
            "sg-1",
            "--port",
            "70000",
        ),
    ],
)
def test_ports_out_of_range_are_usage_errors(
    hpodlb: Callable[..., subprocess.CompletedProcess[str]],
    write_config: Callable[..., Path],
    args: tuple[str, ...],
) -> None:
    """A --port outside 1..65535 is a usage error (exit 2) naming the option; nothing runs."""
    out = hpodlb(*args, "--config", str(write_config()))
    assert out.returncode == 2
    prog = "hpodlb " + " ".join(a for a in args[:2] if not a.startswith("-"))
    assert out.stderr.splitlines()[-1] == (
        f"{prog}: error: argument --port: '{args[-1]}' is not a port (1..65535)"
    )


@pytest.mark.parametrize("host", ["NLB.Example", "nlb example", "nlb.*", "-oProxyCommand=x"])
def test_known_hosts_names_users_cannot_type_are_usage_errors(
    hpodlb: Callable[..., subprocess.CompletedProcess[str]],
    write_config: Callable[..., Path],
    host: str,
) -> None:
    """ssh lowercases the name users type and matches known_hosts against it: a line for a name
    with capitals, spaces or patterns would never match (or match too much)."""
    out = hpodlb("keys", "known-hosts", "--host", host, "--config", str(write_config()))
    assert out.returncode == 2
    assert "argument --host:" in out.stderr.splitlines()[-1]


def test_plan_once_status_round_trip(
    hpodlb: Callable[..., subprocess.CompletedProcess[str]],
    write_config: Callable[..., Path],
    aws: FakeAws,
    arn: str,
) -> None:
    """plan shows pending registrations (1), once applies them (0), then plan is clean (0) and
    status shows the pass converged and each node registered."""
    cfg = str(write_config([{"arn": arn, "port": 22}]))
    tg = arn.split("/")[1]
    plan = hpodlb("plan", "--config", cfg)
    assert plan.returncode == 1, plan.stderr
    assert rows(plan.stdout) == [["ACTION", "TARGET GROUP", "IP", "INSTANCE", "WHY"]] + [
        ["register", f"{tg}:22", ip, iid, "login node not registered"] for ip, iid, _ in LOGIN_NODES
    ]
    assert aws.targets(arn) == set()

    plan_json = json.loads(hpodlb("plan", "--json", "--config", cfg).stdout)
    assert sorted(
        (a["kind"], a["ip"], a["instance_id"], a["held_by"]) for a in plan_json["actions"]
    ) == [("register", ip, iid, None) for ip, iid, _ in LOGIN_NODES]

    once = hpodlb("once", "--config", cfg)
    assert once.returncode == 0, once.stderr
    assert aws.targets(arn) == {(ip, 22) for ip, _, _ in LOGIN_NODES}
    events = [json.loads(line) for line in once.stderr.splitlines()]
    registered = [e for e in events if e["event"] == "registered"]
    assert sorted((e["ip"], e["instance_id"], e["target_group"]) for e in registered) == [
        (ip, iid, tg) for ip, iid, _ in LOGIN_NODES
    ]

    again = hpodlb("plan", "--config", cfg)
    assert again.returncode == 0
    assert again.stdout == "Nothing to do: 3 login nodes in step with every target group.\n"

    status = hpodlb("status", "--config", cfg)
    assert status.returncode == 0
    first, headline, *table, groups = status.stdout.splitlines()
    assert groups.startswith("login groups: login-group (from ") and groups.endswith(
        ": login_group)"
    )
    assert re.fullmatch(
        r"Last pass \d+s ago: converged: 3 login nodes; registered 3, deregistered 0, "
        r"keys pushed 0; 0 held back, 0 waiting, 0 unhealthy, 0 errors",
        first,
    ), first
    assert rows(re.sub(r" for \d+s", " for Ns", "\n".join(table))) == [
        ["IP", "INSTANCE", "NAME", "GROUP", "KEYS", "VERIFIED", "PUSH RETRY", tg, "LAST ERROR"]
    ] + [
        [
            ip,
            iid,
            name,
            "login-group",
            "not checked",
            "-",
            "-",
            "initial (Elb.RegistrationInProgress) for Ns",
            "-",
        ]
        for ip, iid, name in LOGIN_NODES
    ]
    # Registered, health checks not passed yet (moto answers healthy only when asked again).
    assert headline == "0/3 login nodes healthy (3 more registered, not healthy yet)"
    doc = json.loads(hpodlb("status", "--json", "--config", cfg).stdout)
    assert {n["ip"]: n["targets"][arn] for n in doc["nodes"]} == {
        "10.1.71.12": "initial",
        "10.1.72.45": "initial",
        "10.1.70.201": "initial",
    }


def test_held_back_deregistration_exits_1_and_shows_in_status(
    hpodlb: Callable[..., subprocess.CompletedProcess[str]],
    write_config: Callable[..., Path],
    aws: FakeAws,
    arn: str,
) -> None:
    """A stray target waits for the absence guard: once exits 1 and status names the guard."""
    cfg = str(write_config([{"arn": arn, "port": 22}], reconcile={"interval_seconds": 1}))
    aws.client("elbv2").register_targets(
        TargetGroupArn=arn, Targets=[{"Id": "10.1.9.9", "Port": 22}]
    )
    first = hpodlb("once", "--config", cfg)
    assert first.returncode == 1
    status = hpodlb("status", "--config", cfg).stdout.splitlines()
    assert status[0].split(": ", 1)[1] == (
        "NOT converged: 3 login nodes; registered 3, deregistered 0, keys pushed 0; 1 held back, 0 waiting, 0 unhealthy, 0 errors"
    )
    assert rows(status[6])[0][:2] == ["10.1.9.9", "(not a login node)"]
    assert status[7:] == [
        f"held back: deregister 10.1.9.9 on {arn.split('/')[1]}: held by absent_passes_before_deregister: "
        "not in the resource config for 1/2 passes and 0/1 s",
        f"login groups: login-group (from {Path(cfg).parent / 'opt-ml-config' / 'provisioning_parameters.json'}: "
        "login_group)",
    ]
    time.sleep(1.1)  # 2 passes, an interval apart
    second = hpodlb("once", "--config", cfg)
    assert second.returncode == 0, second.stderr
    assert ("10.1.9.9", 22) not in aws.targets(arn)


def test_missing_resource_config_changes_nothing(
    hpodlb: Callable[..., subprocess.CompletedProcess[str]],
    write_config: Callable[..., Path],
    cluster_dir: Path,
    aws: FakeAws,
    arn: str,
) -> None:
    """No resource config: plan and once exit 2 naming the file, and no target is touched."""
    cfg = str(write_config([{"arn": arn, "port": 22}]))
    assert hpodlb("once", "--config", cfg).returncode == 0
    before = aws.targets(arn)
    (cluster_dir / "resource_config.json").unlink()
    rc = cluster_dir / "resource_config.json"
    plan = hpodlb("plan", "--config", cfg)
    assert plan.returncode == 2
    assert [ln for ln in plan.stderr.splitlines() if not ln.startswith("{")] == [
        f"hpodlb: cannot plan: {rc}: file not found"
    ]
    once = hpodlb("once", "--config", cfg)
    assert once.returncode == 2
    assert [ln for ln in once.stderr.splitlines() if not ln.startswith("{")] == [
        f"hpodlb: {rc}: file not found"
    ]
    assert aws.targets(arn) == before
    status = hpodlb("status", "--config", cfg).stdout.splitlines()
    assert status[0].split(": ", 1)[1] == f"NOT converged: no change: {rc}: file not found"


def test_bad_config_exits_2_with_one_line(
    hpodlb: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    """Every command refuses a bad config with exit 2 and one line per problem naming file, key and
    problem, and nothing else on stderr."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[reconcile]\nmax_deregister_fraction = 2\n[[target_groups]]\narn = "x"\n')
    for command in ("once", "plan", "status", "check-config"):
        out = hpodlb(command, "--config", str(bad))
        assert out.returncode == 2
        assert sorted(out.stderr.splitlines()) == [
            f"hpodlb: config error: {bad}: reconcile.max_deregister_fraction: Input should be less than or equal to 1",
            f"hpodlb: config error: {bad}: target_groups[0].arn: 'x' is not a target group ARN "
            "(arn:aws:elasticloadbalancing:REGION:ACCOUNT:targetgroup/NAME/ID)",
        ]
    missing = hpodlb("plan", "--config", str(tmp_path / "none.toml"))
    assert missing.returncode == 2
    assert missing.stderr.splitlines() == [
        f"hpodlb: config error: {tmp_path / 'none.toml'}: file not found"
    ]
    via_env = hpodlb("plan", env={"HPODLB_CONFIG": str(tmp_path / "env.toml")})
    assert via_env.stderr.splitlines() == [
        f"hpodlb: config error: {tmp_path / 'env.toml'}: file not found"
    ]


def test_errors_carry_err_priority_in_the_journal(
    hpodlb: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    """When stderr is the journal (JOURNAL_STREAM names it), an error line starts with <3>, so
    `journalctl -p err` shows why the service would not start."""
    journal = tmp_path / "journal"
    missing = tmp_path / "none.toml"
    with journal.open("w") as stream:
        st = os.fstat(stream.fileno())
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("HPODLB_", "AWS_"))}
        done = subprocess.run(
            [sys.executable, "-m", "hpodlb", "status", "--config", str(missing)],
            env={**full_env, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
            stdout=subprocess.DEVNULL,
            stderr=stream,
            timeout=60,
            check=False,
        )
    assert done.returncode == 2
    assert journal.read_text().splitlines() == [
        f"<3>hpodlb: config error: {missing}: file not found"
    ]


@pytest.mark.parametrize("command", ["plan", "once", "check-config"])
def test_an_unexpected_error_is_one_line_and_exit_2(
    hpodlb: Callable[..., subprocess.CompletedProcess[str]],
    write_config: Callable[..., Path],
    arn: str,
    command: str,
) -> None:
    """An exception no command handles (botocore refusing AWS_DEFAULTS_MODE=bogus, a setting
    hpodlb knows nothing of) exits 2, never plan's "changes pending" 1, with one line naming it;
    -v adds the traceback."""
    cfg = str(write_config([{"arn": arn, "port": 22}]))
    error = (
        "InvalidDefaultsMode: Client configured with invalid defaults mode: bogus. Valid "
        "defaults modes include: legacy, auto, standard, in-region, cross-region, mobile."
    )
    quiet = hpodlb(command, "--config", cfg, env={"AWS_DEFAULTS_MODE": "bogus"})
    assert quiet.returncode == 2
    assert quiet.stderr.splitlines() == [
        f"hpodlb: unexpected error: {error} (run with -v for the traceback)"
    ]
    verbose = hpodlb(command, "--config", cfg, "-v", env={"AWS_DEFAULTS_MODE": "bogus"})
    assert verbose.returncode == 2
    lines = verbose.stderr.splitlines()
    assert lines[-2:] == [f"botocore.exceptions.{error}", f"hpodlb: unexpected error: {error}"]
    assert "Traceback (most recent call last):" in lines


@pytest.mark.parametrize("command", ["plan", "once", "check-config"])
@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("AWS_MAX_ATTEMPTS", "five", "expected a whole number of attempts >= 1"),
        ("AWS_RETRY_MODE", "bogus", "expected one of standard, adaptive, legacy"),
    ],
)
def test_a_bad_aws_retry_setting_is_a_config_error(
    hpodlb: Callable[..., subprocess.CompletedProcess[str]],
    write_config: Callable[..., Path],
    arn: str,
    command: str,
    variable: str,
    value: str,
    expected: str,
) -> None:
    """AWS_MAX_ATTEMPTS=five or AWS_RETRY_MODE=bogus is the admin's setting, not a bug: exit 2
    with one line naming it."""
    cfg = str(write_config([{"arn": arn, "port": 22}]))
    done = hpodlb(command, "--config", cfg, env={variable: value})
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"hpodlb: config error: {variable}={value!r}: {expected}"]


@pytest.mark.parametrize("command", ["plan", "status"])
def test_output_into_a_closed_pipe_ends_quietly(
    hpodlb: Callable[..., subprocess.CompletedProcess[str]],
    write_config: Callable[..., Path],
    arn: str,
    command: str,
) -> None:
    """`hpodlb plan --json | head -1` (the reader gone before the output): no traceback, exit 141
    as a SIGPIPE would end it."""
    cfg = str(write_config([{"arn": arn, "port": 22}]))
    reader, writer = os.pipe()
    os.close(reader)
    try:
        out = hpodlb(command, "--json", "--config", cfg, stdout=writer)
    finally:
        os.close(writer)
    assert out.returncode == 141
    assert [ln for ln in out.stderr.splitlines() if not ln.startswith("{")] == []


def test_usage_error_exits_2(hpodlb: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    """An unknown command is a usage error: exit 2, and the last line names it."""
    out = hpodlb("frobnicate")
    assert out.returncode == 2
    assert out.stderr.splitlines()[-1].startswith(
        "hpodlb: error: argument COMMAND: invalid choice: 'frobnicate' "
    )


def test_check_config(
    hpodlb: Callable[..., subprocess.CompletedProcess[str]],
    write_config: Callable[..., Path],
    cluster_dir: Path,
    arn: str,
) -> None:
    """check-config passes on a good setup and lists a missing target group as a problem."""
    good = hpodlb("check-config", "--config", str(write_config([{"arn": arn, "port": 22}])))
    assert good.returncode == 0, good.stdout + good.stderr
    tg = arn.split("/")[1]
    lines = good.stdout.splitlines()
    assert lines[1:3] == [
        f"ok    resource config {cluster_dir / 'resource_config.json'}: 3 login node(s)",
        f"ok    {tg}: type ip, TCP, port 22; 0 target(s), 1 load balancer(s) attached",
    ]
    assert lines[-1] == "configuration is usable"
    wrong = arn[:-16] + "0" * 16
    bad = hpodlb("check-config", "--config", str(write_config([{"arn": wrong, "port": 22}])))
    assert bad.returncode == 1
    assert bad.stdout.splitlines()[2] == (
        f"FAIL  {tg}: DescribeTargetGroups failed: TargetGroupNotFound: One or more target groups not found"
    )
    assert bad.stdout.splitlines()[-1] == "1 problem(s) found"


def test_check_config_says_what_is_true_of_the_key_store(
    hpodlb: Callable[..., subprocess.CompletedProcess[str]],
    write_config: Callable[..., Path],
    arn: str,
    tmp_path: Path,
) -> None:
    """check-config says a missing key store does not exist yet (the first pass creates it), and
    an existing empty one is empty; either is refused under a dir others can write, as the first
    pass would refuse it."""
    store = tmp_path / "etc" / "host_keys"
    store.parent.mkdir(mode=0o700)
    key_file = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key_file)], check=True)
    cfg = str(
        write_config(
            [{"arn": arn, "port": 22}],
            host_keys={"enabled": True, "store": str(store)},
            ssh={"key_file": str(key_file)},
        )
    )

    def store_line(returncode: int = 0) -> str:
        out = hpodlb("check-config", "--config", cfg)
        assert out.returncode == returncode, out.stdout + out.stderr
        return next(
            ln
            for ln in out.stdout.splitlines()
            if ln.startswith(("ok    key store", "FAIL  key store"))
        )

    assert store_line() == (
        f"ok    key store {store} does not exist yet: the first pass creates it "
        "(mode 0700) and adopts the first login node's keys"
    )
    store.mkdir(mode=0o700)
    assert (
        store_line()
        == f"ok    key store {store} is empty: the first pass adopts the first login node's keys"
    )
    store.parent.chmod(0o770)
    unsafe = f"{store.parent} is writable by group or others (mode 0770); refusing to trust it"
    assert store_line(1) == f"FAIL  key store: {store}: {unsafe}"
    store.rmdir()
    assert store_line(1) == f"FAIL  key store: {unsafe}"


def test_unreachable_aws_makes_plan_exit_2(
    hpodlb: Callable[..., subprocess.CompletedProcess[str]],
    write_config: Callable[..., Path],
    arn: str,
) -> None:
    """With AWS out of reach, plan cannot plan (2) and once changes nothing and exits 1."""
    cfg = str(write_config([{"arn": arn, "port": 22}]))
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1"}
    plan = hpodlb("plan", "--config", cfg, env=env)
    assert plan.returncode == 2
    assert [ln for ln in plan.stderr.splitlines() if not ln.startswith("{")] == [
        f"hpodlb: cannot plan: {arn.split('/')[1]}: DescribeTargetHealth failed: EndpointConnectionError: "
        'Could not connect to the endpoint URL: "http://127.0.0.1:9/"'
    ]
    once = hpodlb("once", "--config", cfg, env=env)
    assert once.returncode == 1


@pytest.mark.sshd
@pytest.mark.slow
def test_the_demos_kept_work_dir_serves_status(fresh_env: None) -> None:
    """`./dev demo --keep` ends with the exact `hpodlb status --config ...` command, and that
    command shows the demo's last pass once the emulator and the login nodes are gone."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    demo = subprocess.run(
        [sys.executable, "-m", "sim.demo", "--keep"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    last = demo.stdout.splitlines()[-1]
    match = re.fullmatch(r"Work dir kept; what the last pass saw: (.+ status --config (\S+))", last)
    assert match, demo.stdout[-3000:] + demo.stderr[-3000:]
    config = Path(match.group(2))
    try:
        assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
        status = subprocess.run(
            shlex.split(match.group(1)),
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert status.returncode == 0, status.stderr
        assert re.fullmatch(
            r"Last pass .+: converged: 4 login nodes; .+", status.stdout.splitlines()[0]
        )
        as_json = subprocess.run(
            [*shlex.split(match.group(1)), "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert [n["key_state"] for n in json.loads(as_json.stdout)["nodes"]] == ["in-sync"] * 4
        kept = load_config(config, {})
        assert kept.ssh.key_file.is_file()
        assert kept.cluster.resource_config.is_file()
        assert kept.host_keys.store.is_dir()
    finally:
        shutil.rmtree(config.parent, ignore_errors=True)


# -- ssh.key_file: read as every file is, on real sshd login nodes -----------------------------------


def _limit_memory() -> None:
    # A read without end (a key file linked to /dev/zero) fails fast here, not by swapping.
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def _run_in(env: SimEnv, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`hpodlb ARGS --config` the simulated head node's config, as root runs it."""
    return subprocess.run(
        [sys.executable, "-m", "hpodlb", *args, "--config", str(env.config_path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("HPODLB_")},
        preexec_fn=_limit_memory,
    )


def _events(text: str, name: str) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, re.findall(r"^\{.*\}$", text, re.M)) if e["event"] == name]


def _threads(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]


def _fifo_key(path: Path) -> None:
    os.mkfifo(path, 0o600)


def _dev_zero_key(path: Path) -> None:
    path.symlink_to("/dev/zero")


@pytest.mark.parametrize(
    ("plant", "kind"), [(_fifo_key, "a FIFO"), (_dev_zero_key, "a character device")]
)
def test_once_with_an_ssh_key_it_cannot_read_fails_at_once(
    sim_env: SimEnv, plant: Callable[[Path], None], kind: str
) -> None:
    """A FIFO or a link to /dev/zero as ssh.key_file (the default is in the login user's home):
    `once` neither hangs on it nor reads it without end; the pass that needs a login (adopting
    the first node's keys) fails in seconds, names the key, and exits 1."""
    nodes(sim_env, 2)
    key = sim_env.workdir / "id_ed25519"
    plant(key)
    sim_env.write_config(ssh={"key_file": str(key)})
    out = _run_in(sim_env, "once")
    assert out.returncode == 1, out.stdout + out.stderr
    said = f"ssh.key_file {key}: cannot read: not a regular file ({kind})"
    (unusable,) = _events(out.stderr, "ssh_key_unusable")
    assert (unusable["key_file"], unusable["error"]) == (str(key), f"key: {said}")
    (finished,) = _events(out.stderr, "pass_finished")
    assert finished["converged"] is False
    assert finished["seconds"] < 10  # a hang waits out the job's deadline (> 100 s) or for good
    FIGURES[f"`once` with {kind} as ssh.key_file"] = f"exit 1 after a {finished['seconds']} s pass"
    assert "MemoryError" not in out.stderr
    assert _events(out.stderr, "host_keys_adoption_failed")[0]["error"] == f"key: {said}"


def test_the_daemon_with_an_ssh_key_it_cannot_read_is_not_converged_and_keeps_no_thread(
    sim_env: SimEnv, tmp_path: Path
) -> None:
    """A converged cluster, then a FIFO where ssh.key_file was: `drain` (which tells the node's
    users) ends at once and says why; each of the daemon's passes (which count the drained
    node's sessions over SSH) is quick and not converged, STATUS counts the error, and no pass
    leaves a thread behind."""
    a, _ = nodes(sim_env, 2)
    assert sim_env.run_pass().converged
    key = sim_env.workdir / "id_fifo"
    _fifo_key(key)
    sim_env.write_config(ssh={"key_file": str(key)}, reconcile={"interval_seconds": 1})
    said = f"ssh.key_file {key}: cannot read: not a regular file (a FIFO)"
    drain = _run_in(sim_env, "drain", a, "--reason", "kernel", timeout=30)
    assert drain.returncode == 0, drain.stderr
    assert f"warning: could not tell its users (wall): key: {said}" in drain.stdout

    started: list[Daemon] = []
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HPODLB_")}
        daemon = spawn_daemon(tmp_path, started, sim_env.config_path, env)
        threads = []
        for n in range(1, 13):
            finished = daemon.wait_event("pass_finished", count=n, timeout=60)
            assert finished["converged"] is False, finished
            assert finished["seconds"] < 10, finished  # a hung session count costs > 30 s
            threads.append(_threads(daemon.proc.pid))
        assert [e["error"] for e in daemon.events_named("ssh_key_unusable")][:6] == [
            f"key: {said}"
        ] * 6
        assert sim_env.state().nodes[a].sessions_error == f"key: {said}"
        _, status = daemon.notify.wait_for("STATUS=")[-1]
        assert re.search(r", [1-9]\d* errors, ", status), status
        # No growth: a sample may catch a pass's workers ending (+2 here), and the first passes
        # start the daemon's lasting threads; a thread left per pass would add 6 in between.
        assert median(threads[-4:]) <= median(threads[2:6]) + 2, threads
        seconds = [e["seconds"] for e in daemon.events_named("pass_finished")[:12]]
        FIGURES["daemon passes with a FIFO as ssh.key_file"] = (
            f"12 not converged, longest {max(seconds)} s, threads {threads}"
        )
    finally:
        stop_daemons(started)


def test_doctor_files_an_ssh_key_it_cannot_use_under_the_ssh_login(
    hpodlb: Callable[..., subprocess.CompletedProcess[str]],
    write_config: Callable[..., Path],
    arn: str,
    tmp_path: Path,
) -> None:
    """A missing ssh.key_file is a FAIL of the SSH login, with a fix about that key, not a key
    store problem pointing at `hpodlb keys --help` (that is about the nodes' host keys)."""
    key = tmp_path / "ssh" / "id_rsa"
    cfg = write_config(
        [{"arn": arn, "port": 22}],
        host_keys={"enabled": True, "store": str(tmp_path / "host_keys")},
        ssh={"key_file": str(key), "connect_timeout_seconds": 1, "port": 1},
    )
    out = hpodlb("doctor", "--json", "--config", str(cfg))
    assert out.returncode == 1, out.stderr
    checks = json.loads(out.stdout)["checks"]
    assert [(c["area"], c["status"], c["found"]) for c in checks if "key_file" in c["found"]] == [
        ("ssh login", "FAIL", f"ssh.key_file {key}: file not found")
    ]
    (fix,) = [c["fix"] for c in checks if c["area"] == "ssh login"]
    assert fix.startswith("set ssh.key_file to the private key ubuntu logs in to the login nodes")
    assert all("keys --help" not in c["fix"] for c in checks if c["status"] != "PASS")


def test_a_directory_as_the_config_is_named_a_directory(
    hpodlb: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    """`--config /tmp` (sticky, world-writable) says what is wrong: it is a directory."""
    assert Path("/tmp").stat().st_mode & 0o1777 == 0o1777
    out = hpodlb("check-config", "--config", "/tmp")
    assert (out.returncode, out.stderr) == (
        2,
        "hpodlb: config error: /tmp: cannot read: not a regular file (a directory)\n",
    )
