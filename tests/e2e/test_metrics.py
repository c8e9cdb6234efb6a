"""Prometheus metrics: a real `hpodlb run` scraped over HTTP, node_exporter's textfile, the config's
[metrics] keys; the alert rules, docs/metrics.md and the Grafana dashboard name only real metrics.

Every exposition is read with prometheus_client's own parser, as Prometheus would read it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import hpodlb
from hpodlb.config import ConfigError, load_config, target_group_name
from hpodlb.identity import KeyState
from hpodlb.inventory import LoginNode
from hpodlb.leader import Leadership
from hpodlb.metricfamilies import Metrics
from hpodlb.outcome import PassOutcome, node_states
from hpodlb.planner import Action, Guard, Kind, Plan
from hpodlb.state import NodeRecord, State, TargetRecord
from sim.aws import FakeAws
from sim.env import SimEnv
from tests.support.aws import TG_ARN
from tests.support.daemon import Daemon, spawn_daemon, stop_daemons
from tests.support.data import FIGURES

REPO = Path(__file__).resolve().parents[2]
DOTTED_QUAD = re.compile(r"\b\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, by (name, labels), through prometheus_client's parser."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name, frozenset(sample.labels.items())] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        assert reply.status == 200
        return str(reply.read().decode())


def scrape_when_free(address: str) -> str:
    """A scrape, retried while the endpoint still has no free slot (closed at once) for 10 s."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return scrape(address)
        except (urllib.error.URLError, ConnectionError):
            assert time.monotonic() < deadline
            time.sleep(0.2)


@pytest.fixture
def run_daemon(tmp_path: Path, fresh_env: None) -> Iterator[Callable[..., Daemon]]:
    """`hpodlb run` (see spawn_daemon), with AWS as this process's environment (or `env`) says."""
    started: list[Daemon] = []

    def start(config: Path, env: dict[str, str] | None = None) -> Daemon:
        full_env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("HPODLB_", "NOTIFY", "WATCHDOG"))
        }
        full_env.update(env or {})
        return spawn_daemon(tmp_path, started, config, full_env)

    yield start
    stop_daemons(started)


def wait_converged_passes(daemon: Daemon, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while sum(1 for e in daemon.events_named("pass_finished") if e["converged"]) < count:
        assert daemon.proc.poll() is None, daemon.log.read_text()[-3000:]
        assert time.monotonic() < deadline, daemon.log.read_text()[-3000:]
        time.sleep(0.1)


def free_port() -> int:
    """A port nobody listens on now (the kernel's pick): never a fixed one, so that two runs of
    the suite at once do not meet."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def metrics_dir(tmp_path: Path) -> Path:
    """A root-owned 0755 dir, as node_exporter's textfile directory is."""
    d = tmp_path / "node-exporter"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    return d


# -- the daemon, scraped ---------------------------------------------------------------------------


@pytest.mark.sshd
@pytest.mark.slow
def test_a_running_daemon_serves_what_an_admin_alerts_on(
    sim_env: SimEnv, run_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """Two real sshd login nodes (one needs a key push), `hpodlb run` on port 0: its /metrics,
    parsed by prometheus_client, counts both nodes in service and healthy in the target group,
    converged passes, the push, the AWS calls, recent heartbeats, and names no IP or instance;
    the textfile says the same, 0644, no temp file left."""
    env = sim_env
    ips = [env.cluster.ip(1), env.cluster.ip(2)]
    env.cluster.add_node(ips[0], "i-0metrics0000001")  # adopted: its keys become canonical
    env.cluster.add_node(ips[1], "i-0metrics0000002")  # its own keys: pushed the canonical ones
    env.list_nodes(ips)
    textfile = metrics_dir(tmp_path) / "hpodlb.prom"
    config = env.write_config(
        reconcile={"interval_seconds": 1},
        metrics={"listen": "127.0.0.1:0", "textfile": str(textfile)},
    )
    daemon = run_daemon(config)
    address = daemon.wait_event("metrics_listening")["address"]
    assert address.startswith("127.0.0.1:") and not address.endswith(":0")
    early = parse(scrape(address))  # before or during the first pass: the endpoint answers
    assert value(early, "hpodlb_info", version=hpodlb.__version__) == 1

    wait_converged_passes(daemon, 2)  # the second one reads the targets healthy
    text = scrape(address)
    now = time.time()
    got = parse(text)
    assert value(got, "hpodlb_login_nodes", state="in_service") == 2
    for other in ("waiting", "held", "drained", "standby"):
        assert value(got, "hpodlb_login_nodes", state=other) == 0
    assert value(got, "hpodlb_login_nodes_healthy") == 2
    group = target_group_name(env.arn)
    assert value(got, "hpodlb_targets", target_group=group, health="healthy") == 2
    assert value(got, "hpodlb_targets", target_group=group, health="unhealthy") == 0
    assert value(got, "hpodlb_passes_total", result="converged") >= 1
    assert value(got, "hpodlb_passes_total", result="crashed") == 0
    assert value(got, "hpodlb_pass_duration_seconds_count") >= 2
    assert value(got, "hpodlb_pass_duration_seconds_bucket", le="+Inf") >= 2
    assert now - value(got, "hpodlb_last_pass_timestamp_seconds") < 10
    assert now - value(got, "hpodlb_last_converged_timestamp_seconds") < 10
    assert value(got, "hpodlb_key_pushes_total", outcome="ok") == 1
    assert value(got, "hpodlb_key_pushes_total", outcome="failed") == 0
    assert value(got, "hpodlb_aws_calls_total", operation="RegisterTargets", outcome="ok") >= 1
    assert value(got, "hpodlb_aws_calls_total", operation="DescribeTargetHealth", outcome="ok") >= 2
    assert (
        value(got, "hpodlb_aws_calls_total", operation="DescribeTargetHealth", outcome="denied")
        == 0
    )
    assert value(got, "hpodlb_deregistrations_held", guard="min_in_service") == 0
    assert value(got, "hpodlb_interval_seconds") == 1
    assert value(got, "hpodlb_min_in_service") == 1
    assert not DOTTED_QUAD.search(text.replace(address, "")), "an IP address in the exposition"
    assert "i-0metrics" not in text

    # The textfile: written after each pass, atomically, readable by node_exporter.
    assert stat.S_IMODE(textfile.stat().st_mode) == 0o644
    assert textfile.stat().st_uid == 0
    assert sorted(p.name for p in textfile.parent.iterdir()) == ["hpodlb.prom"]
    written = parse(textfile.read_text())
    assert value(written, "hpodlb_login_nodes", state="in_service") == 2
    assert now - value(written, "hpodlb_last_pass_timestamp_seconds") < 10
    assert not DOTTED_QUAD.search(textfile.read_text())

    # A drain: the node counts as drained once the daemon (woken by intents.json) took it out.
    from hpodlb.cli import main

    assert main(["--config", str(config), "drain", ips[1], "--reason", "metrics test"]) == 0
    deadline = time.monotonic() + 15
    while value(parse(scrape(address)), "hpodlb_login_nodes", state="drained") != 1:
        assert time.monotonic() < deadline, daemon.log.read_text()[-2000:]
        time.sleep(0.2)
    drained = parse(scrape(address))
    assert value(drained, "hpodlb_login_nodes", state="in_service") == 1
    assert value(drained, "hpodlb_targets", target_group=group, health="healthy") == 1

    # SIGHUP moves the endpoint and drops the textfile: the old port stops answering, and the
    # old file goes, so node_exporter does not export stale numbers as current.
    moved = f"127.0.0.1:{free_port()}"
    config.write_text(
        config.read_text()
        .replace(f'textfile = "{textfile}"', 'textfile = ""')
        .replace('listen = "127.0.0.1:0"', f'listen = "{moved}"')
    )
    daemon.proc.send_signal(signal.SIGHUP)
    assert daemon.wait_event("metrics_listening", count=2)["address"] == moved
    assert value(parse(scrape(moved)), "hpodlb_passes_total", result="converged") >= 2  # kept
    with pytest.raises(urllib.error.URLError):
        scrape(address)
    daemon.wait_event("metrics_textfile_removed")
    assert not textfile.exists()

    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(15) == 0


def test_an_address_in_use_costs_the_endpoint_not_the_passes(
    run_daemon: Callable[..., Daemon], write_config: Callable[..., Path], aws: FakeAws
) -> None:
    """Another process holds the port: the daemon says so (event naming the address, STATUS=),
    reconciles on, and serves as soon as the port is free again."""
    arn = aws.create_login_nlb(name="metrics-busy")
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    listen = f"127.0.0.1:{blocker.getsockname()[1]}"
    config = write_config(
        [{"arn": arn, "port": 22}], reconcile={"interval_seconds": 1}, metrics={"listen": listen}
    )
    daemon = run_daemon(config, aws.env())
    try:
        failed = daemon.wait_event("metrics_listen_failed")
        assert failed["listen"] == listen
        assert failed["error"].startswith(f"cannot listen on {listen}: ")
        assert "reconciling" in failed["action"]
        daemon.notify.wait_for("READY=1")
        assert len(aws.targets(arn)) == 3  # the pass did its job regardless
        status = daemon.notify.wait_for("STATUS=")[-1][1]
        assert f"metrics: cannot listen on {listen}" in status
        daemon.wait_event("pass_finished", count=3)
        assert len(daemon.events_named("metrics_listen_failed")) == 1  # said once, not each pass
    finally:
        blocker.close()
    assert daemon.wait_event("metrics_listening")["address"] == listen
    got = parse(scrape(listen))
    assert value(got, "hpodlb_passes_total", result="converged") >= 1
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(15) == 0


def _silent_from(address: str, sources: list[str], count: int) -> list[socket.socket]:
    """`count` connections that say nothing, spread over `sources`: the slot-holding attack."""
    host, port = address.rsplit(":", 1)
    return [
        socket.create_connection((host, int(port)), source_address=(sources[n % len(sources)], 0))
        for n in range(count)
    ]


def test_the_allowed_scraper_is_answered_while_other_addresses_try_to_hold_every_slot(
    run_daemon: Callable[..., Daemon], write_config: Callable[..., Path], aws: FakeAws, arn: str
) -> None:
    """The issue's case on a real `hpodlb run`: two other loopback addresses open as many silent
    connections as there are slots, again and again; `[metrics] allow` names 127.0.0.1 only, so
    theirs are closed as they are accepted (none holds a slot) and every scrape from 127.0.0.1 is
    answered on its first try."""
    from hpodlb.metrics import MAX_SCRAPES

    config = write_config(
        [{"arn": arn, "port": 22}],
        metrics={"listen": "127.0.0.1:0", "allow": ["127.0.0.1"]},
    )
    daemon = run_daemon(config, aws.env())
    listening = daemon.wait_event("metrics_listening")
    assert listening["allow"] == ["127.0.0.1/32"]
    address = listening["address"]
    rounds, slowest = 20, 0.0
    for _ in range(rounds):
        others = _silent_from(address, ["127.0.0.2", "127.0.0.3"], MAX_SCRAPES)
        started = time.monotonic()
        body = _scrape_from(address, "127.0.0.1")  # the first try, no retry
        slowest = max(slowest, time.monotonic() - started)
        assert value(parse(body), "hpodlb_info", version=hpodlb.__version__) == 1
        for sock in others:
            assert_cut(sock, within=2)
            sock.close()
    FIGURES["metrics scrapes answered from the allowed address, others holding every slot"] = (
        f"{rounds}/{rounds}, slowest {slowest * 1000:.0f} ms"
    )
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(15) == 0


def test_a_client_that_resets_mid_request_prints_no_traceback(
    run_daemon: Callable[..., Daemon], write_config: Callable[..., Path], aws: FakeAws, arn: str
) -> None:
    """A scraper that sends half a request and resets the connection (as one killed mid-scrape
    does) costs that scrape only: no Python traceback on the daemon's stderr, and the endpoint
    answers the next scrape."""
    config = write_config([{"arn": arn, "port": 22}], metrics={"listen": "127.0.0.1:0"})
    daemon = run_daemon(config, aws.env())
    address = daemon.wait_event("metrics_listening")["address"]
    host, port = address.rsplit(":", 1)
    for _ in range(3):
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")
        time.sleep(0.2)  # its handler is reading the headers
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # linger 0: a reset, not a FIN
    assert value(parse(scrape(address)), "hpodlb_info", version=hpodlb.__version__) == 1
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(15) == 0
    output = daemon.log.read_text()  # stdout and stderr
    assert "Traceback" not in output, output[-3000:]
    assert "Exception occurred" not in output, output[-3000:]


# -- `once` and the textfile ---------------------------------------------------------------------


def once(config: Path, aws: FakeAws) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPODLB_")}
    return subprocess.run(
        [sys.executable, "-m", "hpodlb", "once", "--config", str(config)],
        capture_output=True,
        text=True,
        env={**env, **aws.env()},
        check=False,
        timeout=60,
    )


def test_once_writes_the_textfile_atomically_and_never_through_a_symlink(
    write_config: Callable[..., Path], aws: FakeAws, arn: str, tmp_path: Path, fresh_env: None
) -> None:
    """`hpodlb once` (from cron) leaves node_exporter's file: 0644, no temp file beside it; a
    symlink planted at its name is replaced, its target untouched; the last converged time is
    the state file's, across processes."""
    directory = metrics_dir(tmp_path)
    textfile = directory / "hpodlb.prom"
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    textfile.symlink_to(victim)
    config = write_config([{"arn": arn, "port": 22}], metrics={"textfile": str(textfile)})

    first = once(config, aws)
    assert first.returncode == 0, first.stderr
    assert victim.read_text() == "untouched\n"
    assert not textfile.is_symlink()
    assert stat.S_IMODE(textfile.stat().st_mode) == 0o644
    assert sorted(p.name for p in directory.iterdir()) == ["hpodlb.prom"]
    got = parse(textfile.read_text())
    assert value(got, "hpodlb_login_nodes", state="waiting") == 3  # registered, not healthy yet
    assert value(got, "hpodlb_login_nodes", state="in_service") == 0
    assert value(got, "hpodlb_targets", target_group=target_group_name(arn), health="initial") == 3
    assert value(got, "hpodlb_passes_total", result="converged") == 1
    assert value(got, "hpodlb_aws_calls_total", operation="RegisterTargets", outcome="ok") == 1
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert value(got, "hpodlb_last_converged_timestamp_seconds") == pytest.approx(
        state["last_converged_at"], abs=1
    )

    second = once(config, aws)
    assert second.returncode == 0, second.stderr
    got = parse(textfile.read_text())
    assert value(got, "hpodlb_login_nodes", state="in_service") == 3
    assert value(got, "hpodlb_passes_total", result="converged") == 1  # this process's one pass
    assert value(got, "hpodlb_aws_calls_total", operation="RegisterTargets", outcome="ok") == 0
    later = json.loads((tmp_path / "state" / "state.json").read_text())
    assert later["last_converged_at"] > state["last_converged_at"]
    assert later["first_pass_at"] == state["first_pass_at"]


def _events(stderr: str, name: str) -> list[dict[str, Any]]:
    """The JSON events named `name` that a command wrote on stderr."""
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [e for e in events if e["event"] == name]


def test_a_textfile_dir_a_user_replaced_with_a_symlink_is_refused(
    write_config: Callable[..., Path], aws: FakeAws, arn: str, tmp_path: Path, fresh_env: None
) -> None:
    """A textfile dir in an ordinary user's home is refused; once that user replaces it with a
    symlink to a root-owned dir it is refused all the same (the user can re-point the link at any
    moment): `once` names the user's dir, writes nothing where the link points, and converges."""
    nobody = 65534
    home = tmp_path / "home"  # an ordinary user's, as /home/ubuntu is
    home.mkdir(mode=0o755)
    os.chown(home, nobody, nobody)
    textdir = home / "node-exporter"
    textdir.mkdir(mode=0o755)
    os.chown(textdir, nobody, nobody)
    config = write_config([{"arn": arn, "port": 22}], metrics={"textfile": str(textdir / "x.prom")})

    owned = once(config, aws)
    assert owned.returncode == 0, owned.stderr
    (refused,) = _events(owned.stderr, "metrics_textfile_unwritable")
    assert f"{textdir} is owned by uid {nobody}, not root" in refused["error"]

    # The user swaps their dir for a symlink to a dir that root owns and trusts.
    textdir.rmdir()
    rootdir = metrics_dir(tmp_path)
    textdir.symlink_to(rootdir)
    os.lchown(textdir, nobody, nobody)
    linked = once(config, aws)
    assert linked.returncode == 0, linked.stderr
    assert sorted(rootdir.iterdir()) == []
    (refused,) = _events(linked.stderr, "metrics_textfile_unwritable")
    assert refused["path"] == str(textdir / "x.prom")
    assert f"{home} is owned by uid {nobody}, not root" in refused["error"]


def test_a_textfile_that_cannot_be_written_costs_the_pass_nothing(
    run_daemon: Callable[..., Daemon],
    write_config: Callable[..., Path],
    aws: FakeAws,
    arn: str,
    tmp_path: Path,
) -> None:
    """The textfile's dir is opened to everyone while the daemon runs: passes go on converging,
    the refusal is logged once and shown in STATUS=, nothing is written there; once the dir is
    trusted again, the file is written again."""
    directory = metrics_dir(tmp_path)
    textfile = directory / "hpodlb.prom"
    config = write_config(
        [{"arn": arn, "port": 22}],
        reconcile={"interval_seconds": 1},
        metrics={"textfile": str(textfile)},
    )
    daemon = run_daemon(config, aws.env())
    daemon.notify.wait_for("READY=1")
    assert textfile.exists()
    textfile.unlink()
    directory.chmod(0o777)
    refused = daemon.wait_event("metrics_textfile_unwritable")
    assert refused["path"] == str(textfile)
    assert "writable by group or others" in refused["error"]
    passes = len(daemon.events_named("pass_finished"))
    daemon.wait_event("pass_finished", count=passes + 2)
    assert all(e["converged"] for e in daemon.events_named("pass_finished"))
    assert len(daemon.events_named("metrics_textfile_unwritable")) == 1
    assert "metrics: cannot write" in daemon.notify.fields("STATUS=")[-1][1]
    assert sorted(directory.iterdir()) == []
    directory.chmod(0o755)
    daemon.wait_event("metrics_textfile_written")
    assert value(parse(textfile.read_text()), "hpodlb_passes_total", result="converged") >= passes
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(15) == 0


# -- the config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "problem"),
    [
        ("9818", "is not HOST:PORT"),
        (":9818", "is not HOST:PORT"),
        ("127.0.0.1:http", "is not HOST:PORT"),
        ("127.0.0.1:70000", "is not HOST:PORT"),
        ("prometheus.example:9818", "is not HOST:PORT"),
        ("::1:9818", "is not HOST:PORT"),
        ("[127.0.0.1]:9818", "is not HOST:PORT"),
    ],
)
def test_a_bad_listen_address_names_file_key_and_problem(
    tmp_path: Path, listen: str, problem: str
) -> None:
    """An address that is not IP:PORT is refused on one line naming the file and metrics.listen."""
    path = tmp_path / "c.toml"
    path.write_text(f'[metrics]\nlisten = "{listen}"\n[[target_groups]]\narn = "{TG_ARN}"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, {})
    assert str(err.value).startswith(f"{path}: metrics.listen: {listen!r} {problem}")
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:9818", "0.0.0.0:0", "[::1]:9818", "localhost:9818", ""]
)
def test_good_listen_addresses_load(tmp_path: Path, listen: str) -> None:
    """IPv4, IPv6 in brackets, localhost, port 0 (any free port) and empty (off) are accepted."""
    path = tmp_path / "c.toml"
    path.write_text(f'[metrics]\nlisten = "{listen}"\n[[target_groups]]\narn = "{TG_ARN}"\n')
    assert load_config(path, {}).metrics.listen == listen


def test_textfile_problems_name_file_key_and_problem(tmp_path: Path) -> None:
    """A relative path, a name node_exporter ignores: each is one line naming the file and
    metrics.textfile. A missing or untrusted dir is not a config error (it would stop the daemon
    and every command): the write says it, and the metrics carry the problem."""
    from hpodlb.metrics import Exporter

    path = tmp_path / "c.toml"
    cases = {
        "hpodlb.prom": "is not an absolute path",
        str(tmp_path / "hpodlb.txt"): "node_exporter reads only files named *.prom",
    }
    for textfile, problem in cases.items():
        path.write_text(
            f'[metrics]\ntextfile = "{textfile}"\n[[target_groups]]\narn = "{TG_ARN}"\n'
        )
        with pytest.raises(ConfigError) as err:
            load_config(path, {})
        assert str(err.value).startswith(f"{path}: metrics.textfile: ") and problem in str(
            err.value
        )
        assert len(str(err.value).splitlines()) == 1
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    unwritable: dict[Path, str] = {
        tmp_path / "missing" / "hpodlb.prom": "No such file or directory",
        open_dir / "hpodlb.prom": "is writable by group or others (mode 0777)",
    }
    for prom, problem in unwritable.items():
        path.write_text(f'[metrics]\ntextfile = "{prom}"\n[[target_groups]]\narn = "{TG_ARN}"\n')
        assert load_config(path, {}).metrics.textfile == prom
        exporter = Exporter()
        exporter.write_textfile(prom)
        assert problem in exporter.problem and str(prom) in exporter.problem
        assert not prom.exists()


def test_the_environment_overrides_metrics_keys(write_config: Callable[..., Path]) -> None:
    """HPODLB_METRICS__LISTEN works like any override, and a bad one names the variable."""
    path = write_config()
    assert (
        load_config(path, {"HPODLB_METRICS__LISTEN": "127.0.0.1:9900"}).metrics.listen
        == "127.0.0.1:9900"
    )
    with pytest.raises(
        ConfigError, match=r"^HPODLB_METRICS__LISTEN \(overrides .*\): metrics.listen: 'nope'"
    ):
        load_config(path, {"HPODLB_METRICS__LISTEN": "nope"})


def test_a_bad_metrics_key_makes_commands_exit_2_with_one_line(
    write_config: Callable[..., Path],
) -> None:
    """`hpodlb run` and `once` with a bad [metrics] key: exit 2, one line, before any pass."""
    path = write_config(metrics={"listen": "localhost"})
    for command in ("run", "once"):
        done = subprocess.run(
            [sys.executable, "-m", "hpodlb", command, "--config", str(path)],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        assert done.returncode == 2, done
        assert done.stderr.strip().endswith(
            f"{path}: metrics.listen: 'localhost' is not HOST:PORT "
            "(e.g. 127.0.0.1:9818, 0.0.0.0:9818, [::1]:9818)"
        )


@pytest.mark.parametrize(
    ("allow", "problem"),
    [
        (["prometheus.example"], "'prometheus.example' is not an IP address or CIDR"),
        (["10.0.0.0/33"], "'10.0.0.0/33' is not an IP address or CIDR"),
        (["127.0.0.1", ""], "'' is not an IP address or CIDR"),
    ],
)
def test_a_bad_allow_entry_names_file_key_and_problem(
    tmp_path: Path, allow: list[str], problem: str
) -> None:
    """An allow entry that is not an address or a CIDR is refused on one line naming the file,
    metrics.allow and the entry: a typo must not open (or close) the endpoint unseen."""
    path = tmp_path / "c.toml"
    path.write_text(
        f'[metrics]\nallow = {json.dumps(allow)}\n[[target_groups]]\narn = "{TG_ARN}"\n'
    )
    with pytest.raises(ConfigError) as err:
        load_config(path, {})
    assert str(err.value).startswith(f"{path}: metrics.allow: {problem}")
    assert len(str(err.value).splitlines()) == 1


def test_allow_admits_addresses_and_networks_of_either_family(tmp_path: Path) -> None:
    """Addresses and CIDRs, IPv4 and IPv6, from the file or HPODLB_METRICS__ALLOW; an IPv4
    client of an IPv6 endpoint is judged by its IPv4 address; empty admits every client."""
    from hpodlb.config import MetricsConfig
    from hpodlb.metrics import client_allowed

    path = tmp_path / "c.toml"
    path.write_text(
        '[metrics]\nallow = ["10.0.5.17", "10.0.6.0/28", "fd00::/8"]\n'
        f'[[target_groups]]\narn = "{TG_ARN}"\n'
    )
    allowed = load_config(path, {}).metrics.allowed_networks()
    for client in ("10.0.5.17", "10.0.6.15", "::ffff:10.0.5.17", "fd00::9"):
        assert client_allowed(allowed, client), client
    for client in ("10.0.5.18", "10.0.6.16", "127.0.0.1", "::1", "::ffff:10.0.5.18", "x"):
        assert not client_allowed(allowed, client), client
    overridden = load_config(path, {"HPODLB_METRICS__ALLOW": "127.0.0.1, ::1"}).metrics
    assert overridden.allow == ("127.0.0.1", "::1")
    assert client_allowed(MetricsConfig().allowed_networks(), "203.0.113.9")


def test_the_example_config_serves_localhost() -> None:
    """config/hpodlb.toml turns the endpoint on for localhost only; the code's default is off."""
    config = load_config(REPO / "config" / "hpodlb.toml", {})
    assert config.metrics.listen == "127.0.0.1:9818"
    assert config.metrics.textfile is None
    from hpodlb.config import MetricsConfig

    assert MetricsConfig().listen == ""


# -- what the families say, from plain data ------------------------------------------------------


NODES = ("10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.4")


def _world() -> tuple[Any, State]:
    from hpodlb.config import Config

    config = Config.model_validate({"target_groups": [{"arn": TG_ARN}]})
    state = State(
        nodes={ip: NodeRecord(key_state=KeyState.IN_SYNC.value) for ip in NODES},
        targets={TG_ARN: [TargetRecord(ip=ip, port=22, state="healthy") for ip in NODES[:3]]},
    )
    state.nodes[NODES[2]].key_state = KeyState.UNKNOWN_KEYS.value
    return config, state


def test_each_login_node_has_one_state() -> None:
    """In service (healthy, verified), held (for an admin or by a guard), waiting (not healthy
    yet); a standby head counts every node standby."""
    config, state = _world()
    nodes = tuple(LoginNode(ip, f"i-{n}", f"login-{n}", "login") for n, ip in enumerate(NODES))
    held = Action(Kind.DEREGISTER, NODES[1], "wrong keys", TG_ARN, 22, held_by=Guard.MIN_IN_SERVICE)
    outcome = PassOutcome(nodes=nodes, plan=Plan(actions=(held,)), leadership=Leadership(True))
    assert node_states(state, outcome, config) == {
        NODES[0]: "in_service",
        NODES[1]: "held",
        NODES[2]: "held",
        NODES[3]: "waiting",
    }
    state.nodes[NODES[3]].drained = "kernel update"  # out, by an admin (its keys in question too)
    state.nodes[NODES[2]].drained = "disk"
    assert node_states(state, outcome, config)[NODES[3]] == "drained"
    assert node_states(state, outcome, config)[NODES[2]] == "drained"
    state.nodes[NODES[1]].drained = "bios"  # its deregistration held: still in rotation
    assert node_states(state, outcome, config)[NODES[1]] == "held"
    for ip in NODES:
        state.nodes[ip].drained = ""
    outcome.leadership = Leadership(False, controller="head2")
    assert set(node_states(state, outcome, config).values()) == {"standby"}

    metrics = Metrics()
    outcome.leadership = Leadership(True)
    metrics.record(config, state, outcome, seconds=0.2, finished=1000.0, aws_calls={})
    got = parse(metrics.exposition().decode())
    assert value(got, "hpodlb_login_nodes", state="held") == 2
    assert value(got, "hpodlb_deregistrations_held", guard="min_in_service") == 1
    assert value(got, "hpodlb_deregistrations_held", guard="max_deregister_fraction") == 0
    assert value(got, "hpodlb_passes_total", result="not_converged") == 1
    assert value(got, "hpodlb_login_nodes_healthy") == 2  # node 3's keys are in question
    assert value(got, "hpodlb_pass_duration_seconds_bucket", le="0.25") == 1
    assert value(got, "hpodlb_pass_duration_seconds_bucket", le="0.1") == 0


def test_results_and_heartbeats() -> None:
    """A sound standby pass counts as standby and as converged in time; a crash (no outcome) as
    crashed, and the last converged time stays the state file's (with none ever, the first
    pass's start, so "not converged for 10 minutes" does not count from 1970)."""
    config, state = _world()
    metrics = Metrics()
    standby = PassOutcome(plan=Plan(), leadership=Leadership(False, controller="head2"))
    metrics.record(config, state, standby, seconds=0.1, finished=2000.0, aws_calls={})
    state.last_converged_at = 2000.0
    metrics.record(
        config,
        state,
        None,
        seconds=3.0,
        finished=2100.0,
        aws_calls={("DescribeTargetHealth", "throttled"): 2},
    )
    got = parse(metrics.exposition().decode())
    assert value(got, "hpodlb_passes_total", result="standby") == 1
    assert value(got, "hpodlb_passes_total", result="crashed") == 1
    assert value(got, "hpodlb_last_pass_timestamp_seconds") == 2100.0
    assert value(got, "hpodlb_last_converged_timestamp_seconds") == 2000.0
    assert (
        value(got, "hpodlb_aws_calls_total", operation="DescribeTargetHealth", outcome="throttled")
        == 2
    )
    fresh = State(first_pass_at=1500.0)  # never converged with this state file
    metrics.record(
        config, fresh, PassOutcome(inventory_error="bad"), seconds=1, finished=2200.0, aws_calls={}
    )
    assert (
        value(parse(metrics.exposition().decode()), "hpodlb_last_converged_timestamp_seconds")
        == 1500.0
    )
    unsound = PassOutcome(
        plan=Plan(), leadership=Leadership(False, why="scontrol failed", sound=False)
    )
    assert unsound.result == "not_converged"


def test_a_target_group_no_longer_configured_leaves_the_exposition() -> None:
    """After a reload drops a group, its series go; the remaining group keeps all its states."""
    config, state = _world()
    other = TG_ARN.replace("smhp-login-node-tg", "second-tg").replace(
        "0123456789abcdef", "fedcba9876543210"
    )
    from hpodlb.config import Config

    two = Config.model_validate({"target_groups": [{"arn": TG_ARN}, {"arn": other}]})
    metrics = Metrics()
    metrics.record(two, state, None, seconds=1, finished=1.0, aws_calls={})
    assert (
        value(
            parse(metrics.exposition().decode()),
            "hpodlb_targets",
            target_group="second-tg",
            health="healthy",
        )
        == 0
    )
    metrics.record(config, state, None, seconds=1, finished=2.0, aws_calls={})
    text = metrics.exposition().decode()
    assert "second-tg" not in text
    assert (
        value(parse(text), "hpodlb_targets", target_group="smhp-login-node-tg", health="healthy")
        == 3
    )


# -- the alert rules, docs/metrics.md and the dashboard only name metrics that exist -------------


def known_names() -> set[str]:
    names = set()
    for family in Metrics().registry.collect():
        names |= {s.name for s in family.samples}
        if family.type == "gauge":
            names.add(family.name)  # a labelled gauge with no series yet
    return names


def referenced(expr: str) -> set[str]:
    return set(re.findall(r"\bhpodlb_[a-z0-9_]+\b", expr))


def test_the_alert_rules_use_only_existing_metrics() -> None:
    """config/alerts.yml's three rules parse as Prometheus rule YAML and name real metrics;
    docs/metrics.md's scrape job scrapes /metrics at the example config's address, and its table
    lists every family."""
    section = (REPO / "docs" / "metrics.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)
    docs = [yaml.safe_load(b) for b in blocks]
    alerts = yaml.safe_load((REPO / "config" / "alerts.yml").read_text())
    rules = [r for g in alerts["groups"] for r in g["rules"]]
    assert len(rules) == 3
    names = known_names()
    for rule in rules:
        used = referenced(rule["expr"])
        assert used, rule
        assert used <= names, used - names
        assert rule["alert"] and rule["annotations"]["summary"]
    jobs = [j for d in docs if "scrape_configs" in d for j in d["scrape_configs"]]
    assert jobs[0]["job_name"] == "hpodlb"
    assert jobs[0]["static_configs"][0]["targets"] == ["127.0.0.1:9818"]
    assert set(jobs[0]["static_configs"][0]["labels"]) == {"cluster", "head"}  # heads apart
    families = {f.name for f in Metrics().registry.collect()}
    for family in families:
        shown = (
            family + "_total"
            if family in ("hpodlb_passes", "hpodlb_aws_calls", "hpodlb_key_pushes")
            else family
        )
        shown = "hpodlb_info" if family == "hpodlb" else shown
        assert f"`{shown}" in section, f"{shown} missing from docs/metrics.md's table"


def test_the_grafana_dashboard_queries_only_existing_metrics() -> None:
    """config/grafana-dashboard.json is a dashboard whose every panel query names real metrics."""
    dashboard = json.loads((REPO / "config" / "grafana-dashboard.json").read_text())
    assert dashboard["title"] and dashboard["panels"] and dashboard["schemaVersion"] >= 30
    names = known_names()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 5
    for expr in exprs:
        used = referenced(expr)
        assert used, expr
        assert used <= names, used - names
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(set(ids)) == len(ids)


def test_idle_connections_cannot_take_the_daemons_threads() -> None:
    """Anyone who can reach the port may open connections and say nothing, from several addresses:
    at most MAX_SCRAPES threads answer at once (the rest are closed), each silent one is dropped
    after a timeout, and scrapes are answered again as soon as they go."""
    import threading

    from hpodlb.config import MetricsConfig
    from hpodlb.metrics import MAX_SCRAPES, Exporter

    exporter = Exporter()
    exporter.follow(MetricsConfig(listen="127.0.0.1:0"))
    try:
        host, port = exporter.address.rsplit(":", 1)
        before = threading.active_count()
        idle = [
            socket.create_connection((host, int(port)), source_address=(f"127.0.0.{1 + n % 6}", 0))
            for n in range(60)
        ]
        time.sleep(1)
        assert threading.active_count() - before <= MAX_SCRAPES
        for sock in idle:
            sock.close()
        assert (
            value(
                parse(scrape_when_free(exporter.address)), "hpodlb_info", version=hpodlb.__version__
            )
            == 1
        )
    finally:
        exporter.close()


def _scrape_from(address: str, source: str) -> str:
    """A scrape from another loopback address than urllib's (a second client, as far as the
    endpoint can tell)."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5, source_address=(source, 0)) as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        reply = b"".join(iter(lambda: sock.recv(65536), b""))
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head[:100]
    return body.decode()


@contextlib.contextmanager
def dripping(address: str, count: int) -> Iterator[list[socket.socket]]:
    """Slowloris clients: each sends a request line, then a header line every second (each read
    short of the per-read timeout), until the block ends."""
    import threading

    host, port = address.rsplit(":", 1)
    socks = [socket.create_connection((host, int(port))) for _ in range(count)]
    stop = threading.Event()

    def drip() -> None:
        while not stop.wait(1.0):
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.sendall(b"X-Slow: 1\r\n")

    for sock in socks:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")
    thread = threading.Thread(target=drip)
    thread.start()
    try:
        yield socks
    finally:
        stop.set()
        thread.join()
        for sock in socks:
            sock.close()


def assert_cut(sock: socket.socket, within: float) -> None:
    """The endpoint closed it (or refused it at once: no slot for it); never cut: TimeoutError."""
    sock.settimeout(within)
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(1024) == b""


def test_slow_clients_are_cut_and_one_address_cannot_take_every_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Slowloris: a header line every second keeps each read short of the read timeout, so only
    a deadline for the whole request ends it; and while one address holds its share of slots,
    a scrape from another is still answered."""
    from hpodlb import metrics
    from hpodlb.config import MetricsConfig

    monkeypatch.setattr(metrics, "SCRAPE_TIMEOUT_SECONDS", 3.0)
    exporter = metrics.Exporter()
    exporter.follow(MetricsConfig(listen="127.0.0.1:0"))
    try:
        with dripping(exporter.address, metrics.MAX_SCRAPES) as slow:
            time.sleep(0.5)
            # 127.0.0.1 has its MAX_SCRAPES_PER_CLIENT; the other address is answered all the same.
            assert (
                value(
                    parse(_scrape_from(exporter.address, "127.0.0.2")),
                    "hpodlb_info",
                    version=hpodlb.__version__,
                )
                == 1
            )
            for sock in slow:
                assert_cut(sock, 20)
        # Their slots are free again (once their threads have ended): the same address is answered.
        assert (
            value(
                parse(scrape_when_free(exporter.address)), "hpodlb_info", version=hpodlb.__version__
            )
            == 1
        )
    finally:
        exporter.close()


def test_a_reload_changes_who_is_admitted_without_moving_the_endpoint() -> None:
    """A changed `allow` applies from the next connection on, at the same address: a client
    admitted before is closed at accept after, the one now named is answered."""
    from hpodlb.config import MetricsConfig
    from hpodlb.metrics import Exporter

    exporter = Exporter()
    exporter.follow(MetricsConfig(listen="127.0.0.1:0"))
    try:
        address = exporter.address
        assert "hpodlb_info" in _scrape_from(address, "127.0.0.2")
        exporter.follow(MetricsConfig(listen="127.0.0.1:0", allow=("127.0.0.1/32", "::1")))
        assert exporter.address == address
        (refused,) = _silent_from(address, ["127.0.0.2"], 1)
        assert_cut(refused, within=2)
        refused.close()
        assert "hpodlb_info" in _scrape_from(address, "127.0.0.1")
    finally:
        exporter.close()


def test_a_client_silent_past_the_read_timeout_prints_no_traceback(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """A client that sends half a request and goes silent is dropped when its read times out,
    and nothing reaches stderr (socketserver prints a traceback there by default). The read
    timeout is set below the whole-request deadline here, so that it is what ends the scrape."""
    from hpodlb import metrics
    from hpodlb.config import MetricsConfig

    monkeypatch.setattr(metrics, "SCRAPE_TIMEOUT_SECONDS", 60.0)
    monkeypatch.setattr(metrics._Quiet, "timeout", 0.5)
    exporter = metrics.Exporter()
    exporter.follow(MetricsConfig(listen="127.0.0.1:0"))
    try:
        host, port = exporter.address.rsplit(":", 1)
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")
            assert_cut(sock, within=20)
        assert value(parse(scrape(exporter.address)), "hpodlb_info", version=hpodlb.__version__)
    finally:
        exporter.close()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err, err


def test_a_moved_endpoint_cuts_the_scrapes_the_old_one_had_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reload that moves the endpoint closes the old server; a dripping client of the old one
    must not keep its thread (nothing would cut it once the old server's deadlines are gone)."""
    from hpodlb import metrics
    from hpodlb.config import MetricsConfig

    monkeypatch.setattr(metrics, "SCRAPE_TIMEOUT_SECONDS", 120.0)  # not what cuts it here
    exporter = metrics.Exporter()
    exporter.follow(MetricsConfig(listen="127.0.0.1:0"))
    try:
        with dripping(exporter.address, 1) as (
            client,
        ):  # the per-read timeout (10 s) never ends it
            time.sleep(0.3)
            exporter.follow(MetricsConfig(listen="127.0.0.2:0"))
            assert exporter.address.startswith("127.0.0.2:")
            assert_cut(client, 30)
    finally:
        exporter.close()


def test_once_never_opens_the_endpoint(tmp_path: Path) -> None:
    """`once` writes the textfile and exits: a listen address in the same config is the
    daemon's, not something `once` opens for the moment it lives."""
    import threading

    from hpodlb.metrics import write_once

    config, state = _world()
    directory = metrics_dir(tmp_path)
    config = config.model_copy(
        update={
            "metrics": config.metrics.model_copy(
                update={"listen": "127.0.0.1:0", "textfile": directory / "hpodlb.prom"}
            )
        }
    )
    outcome = PassOutcome(plan=Plan(), leadership=Leadership(True))

    class NoAdapters:
        groups: tuple[Any, ...] = ()
        hyperpod = None

    write_once(config, state, outcome, NoAdapters())  # type: ignore[arg-type]
    assert (directory / "hpodlb.prom").exists()
    assert not [t for t in threading.enumerate() if t.name == "hpodlb-metrics"]
