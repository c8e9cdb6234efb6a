"""The measurements behind `python -m bench`. Each returns rows: (what, figure, goal, met)."""

from __future__ import annotations

import io
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from hpodlb.keystore import KeyStore
from hpodlb.logs import setup_logging
from hpodlb.state import State
from hpodlb.wiring import build_reconciler
from sim.aws import moto_server
from sim.env import SimEnv
from sim.faultproxy import FaultPlan, fault_proxy
from sim.nodes import SIM_USER, sim_cluster

Row = tuple[str, str, str, str]
TYPES = ("rsa", "ecdsa", "ed25519")
WRITES = ("RegisterTargets", "DeregisterTargets")


def render(rows: list[Row]) -> str:
    header = ("measurement", "figure", "goal", "met")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def ok(met: bool) -> str:
    return "yes" if met else "NO"


@contextmanager
def world(nodes: int, *, through_proxy: bool = False) -> Iterator[tuple[SimEnv, FaultPlan | None]]:
    """moto server (optionally behind a counting proxy), `nodes` sshd login nodes, a config.

    The first node has its own keys (it becomes canonical by adoption); the others share one
    other set, so every one of them needs a push, and creating 50 of them takes seconds.
    """
    workdir = Path(tempfile.mkdtemp(prefix="hpodlb-bench-"))
    with moto_server() as aws, sim_cluster(Path(tempfile.mkdtemp(prefix="hpodlb-sim-"))) as cluster:
        os.environ.update(aws.env())
        plan = FaultPlan(seed=0) if through_proxy else None
        with fault_proxy(aws.endpoint_url, plan) if plan else _nothing() as proxy:
            if proxy:
                os.environ["AWS_ENDPOINT_URL"] = proxy
            ips = [cluster.ip(n) for n in range(1, nodes + 1)]
            cluster.add_node(ips[0], "i-0bench0000000000")
            shared: Path | None = None
            for n, ip in enumerate(ips[1:], start=1):
                node = cluster.add_node(ip, f"i-0bench{n:010d}", keys_from=shared)
                if shared is None:
                    shared = node.dir.parent / "shared-keys"
                    shared.mkdir()
                    for t in TYPES:
                        for suffix in ("", ".pub"):
                            shutil.copy2(node.etc_ssh / f"ssh_host_{t}_key{suffix}", shared)
            env = SimEnv(aws, cluster, workdir)
            env.list_nodes(ips)
            try:
                yield env, plan
            finally:
                os.environ["AWS_ENDPOINT_URL"] = aws.endpoint_url
    shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


class Daemon:
    """`hpodlb run` as a process, with its log and its CPU time."""

    def __init__(self, config: Path) -> None:
        self.log = config.with_name(f"daemon-{uuid.uuid4().hex[:6]}.log")
        out = self.log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hpodlb", "run", "--config", str(config)],
            stdout=out,
            stderr=out,
            env=os.environ.copy(),
        )
        out.close()

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if name is None or event["event"] == name:
                    out.append(event)
        return out

    def wait_passes(self, count: int, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while len(self.events("pass_finished")) < count:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(self.log.read_text()[-2000:])
            time.sleep(0.05)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


def _ssh_counts(env: SimEnv) -> tuple[int, int]:
    """(connections, logins) all sim nodes' sshd have seen so far, from their own logs."""
    connections = logins = 0
    for node in env.cluster.nodes.values():
        text = (node.dir / "sshd.log").read_text(errors="replace")
        logins += text.count("Accepted publickey")
        connections += len(re.findall(r"^Connection from ", text, re.MULTILINE))  # LogLevel VERBOSE
    return connections, logins


# -- 1. idle cost -------------------------------------------------------------------------------


def idle(quick: bool = False) -> list[Row]:
    """20 idle passes (10 min at 30 s), 3 login nodes, 1 target group; with and without probes."""
    passes = 8 if quick else 20
    rows: list[Row] = []
    configs = (
        ("host keys off", False, 0.0),
        ("probes every pass", True, 0.0),
        # The default probe_interval_seconds (240) is 8 passes at 30 s; this run's passes are 0.5 s.
        ("default probe_interval, 240 s = 8 passes", True, 4.0),
    )
    for label, probes, probe_interval in configs:
        with world(3, through_proxy=True) as (env, plan):
            assert plan is not None
            env.write_config(
                reconcile={"interval_seconds": 0.5},
                host_keys={"enabled": probes, "probe_interval_seconds": probe_interval},
            )
            daemon = Daemon(env.config_path)
            try:
                daemon.wait_passes(1)
                time.sleep(0.2)
                calls0, cpu0, ssh0 = dict(plan.actions), daemon.cpu_seconds(), _ssh_counts(env)
                daemon.wait_passes(1 + passes)
                calls = {k: v - calls0.get(k, 0) for k, v in plan.actions.items()}
                cpu, ssh1 = daemon.cpu_seconds() - cpu0, _ssh_counts(env)
                rss = daemon.rss_mb()
            finally:
                daemon.stop()
            # Calls per pass over the daemon's whole life: a pass that had started when the
            # window above closed would otherwise count in one and not the other.
            describe = plan.actions["DescribeTargetHealth"] / len(daemon.events("pass_finished"))
        writes = sum(calls.get(w, 0) for w in WRITES)
        per_hour = cpu / passes * 120
        rows.append(
            (f"DescribeTargetHealth per pass ({label})", f"{describe:.2f}", "1", ok(describe == 1))
        )
        rows.append(
            (f"write calls in {passes} idle passes ({label})", str(writes), "0", ok(writes == 0))
        )
        if probes:
            conns, logins = ssh1[0] - ssh0[0], ssh1[1] - ssh0[1]
            rows.append(
                (
                    f"SSH connections per pass ({label}; 3 nodes x 3 types)",
                    f"{conns / passes:.1f}",
                    "probes only",
                    ok(True),
                )
            )
            rows.append(
                (f"SSH logins in {passes} idle passes ({label})", str(logins), "0", ok(logins == 0))
            )
            rows.append(
                (f"CPU s/hour at a 30 s interval ({label})", f"{per_hour:.1f}", "(no goal)", "-")
            )
        else:
            rows.append(
                (
                    "CPU s/hour at a 30 s interval, excluding probes",
                    f"{per_hour:.2f}",
                    "< 1",
                    ok(per_hour < 1),
                )
            )
        rows.append((f"daemon RSS ({label})", f"{rss:.0f} MB", "< 80 MB", ok(rss < 80)))
    return rows


# -- 2. change-to-service latency ----------------------------------------------------------------


def _ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def latency(quick: bool = False) -> list[Row]:
    """A new node (own keys) appears in the resource config: how long until it is registered."""
    trials = 2 if quick else 5
    totals: list[float] = []
    healthy: list[float] = []
    steps: dict[str, list[float]] = {
        "noticed": [],
        "probed (push starts)": [],
        "pushed+verified": [],
        "registered": [],
    }
    with world(3) as (env, _):
        env.write_config(reconcile={"interval_seconds": 30})
        daemon = Daemon(env.config_path)
        try:
            daemon.wait_passes(1)
            for trial in range(trials):
                ip = env.cluster.ip(200 + trial)
                env.cluster.add_node(ip, f"i-0late{trial:011d}")
                time.sleep(1.5)  # let the daemon's file poll settle before the change we time
                t0 = time.time()
                env.list_nodes([*env.listed, ip])
                while ip not in env.registered():
                    time.sleep(0.01)
                totals.append(time.time() - t0)
                while _health(env, ip) != "healthy":
                    time.sleep(0.01)
                healthy.append(time.time() - t0)
                daemon.wait_passes(2 + trial)
                marks = {
                    "noticed": [
                        e for e in daemon.events("resource_config_changed") if _ts(e) >= t0
                    ],
                    "probed (push starts)": [
                        e for e in daemon.events("ssh_trust_on_first_use") if e["ip"] == ip
                    ],
                    "pushed+verified": [
                        e for e in daemon.events("host_keys_pushed") if e["ip"] == ip
                    ],
                    "registered": [e for e in daemon.events("registered") if e["ip"] == ip],
                }
                for name, found in marks.items():
                    steps[name].append(_ts(found[0]) - t0 if found else float("nan"))
        finally:
            daemon.stop()
    median = statistics.median(totals)
    rows = [
        (
            "resource config change -> registered with canonical keys (median)",
            f"{median:.2f} s",
            "< 3 s",
            ok(median < 3),
        ),
        (
            "resource config change -> healthy in the NLB (median; moto: healthy on registration)",
            f"{statistics.median(healthy):.2f} s",
            "",
            "",
        ),
    ]
    for name, values in steps.items():
        rows.append(
            (
                f"  ... {name} at (median, from the change)",
                f"{statistics.median(values):.2f} s",
                "",
                "",
            )
        )
    return rows


def _health(env: SimEnv, ip: str) -> str:
    reply = env.aws.client("elbv2").describe_target_health(TargetGroupArn=env.arn)
    states = [
        d["TargetHealth"]["State"]
        for d in reply["TargetHealthDescriptions"]
        if d["Target"]["Id"] == ip
    ]
    return states[0] if states else "absent"


# -- 3. parallel key push vs the manual procedure --------------------------------------------------


MANUAL = r"""
set -eu
ssh_() { ssh $OPTS -p $PORT "$@"; }
src=$1; shift
ssh_ $USER@$src "sudo mkdir -p /tmp/hostkeys-src && sudo cp /etc/ssh/ssh_host_* /tmp/hostkeys-src/ && sudo chown -R $USER /tmp/hostkeys-src"
for node in "$@"; do
  scp $OPTS -P $PORT -3 -q -r $USER@$src:/tmp/hostkeys-src $USER@$node:/tmp/hostkeys-$node
  ssh_ $USER@$node "sudo chown root:root /tmp/hostkeys-$node/* && sudo mv /tmp/hostkeys-$node/* /etc/ssh/ && rm -rf /tmp/hostkeys-$node"
done
ssh_ $USER@$src "sudo rm -rf /tmp/hostkeys-src"
"""


def push(quick: bool = False) -> list[Row]:
    """N new nodes at once: hpodlb's parallel push + verify + register, against a faithful port of
    the manual procedure's sequential ssh/scp-through-/tmp loop, on the same nodes, same run."""
    rows: list[Row] = []
    for n in (1, 10) if quick else (1, 10, 50):
        with world(n + 1) as (env, _):
            src, others = env.listed[0], env.listed[1:]
            store = KeyStore(env.store, TYPES)
            shared = {
                t: (env.cluster.nodes[others[0]].etc_ssh / f"ssh_host_{t}_key").read_bytes()
                for t in TYPES
            }
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "hpodlb",
                    "keys",
                    "adopt",
                    "--from",
                    src,
                    "--config",
                    str(env.config_path),
                ],
                check=True,
                capture_output=True,
            )
            started = time.monotonic()
            done = subprocess.run(
                [sys.executable, "-m", "hpodlb", "once", "--config", str(env.config_path)],
                capture_output=True,
                text=True,
                check=False,
            )
            ours = time.monotonic() - started
            converged = done.returncode == 0 and env.registered() == set(env.listed)
            canonical = {k.public for k in store.load().values()}
            assert all(env.cluster.nodes[ip].public_key("ed25519") in canonical for ip in others)
            # Put the other keys back on disk, then the manual procedure on the same nodes.
            for ip in others:
                for t in TYPES:
                    (env.cluster.nodes[ip].etc_ssh / f"ssh_host_{t}_key").write_bytes(shared[t])
            opts = (
                f"-i {env.cluster.client_key} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
                "-o BatchMode=yes -o LogLevel=ERROR"
            )
            started = time.monotonic()
            subprocess.run(
                ["bash", "-c", MANUAL, "manual", src, *others],
                check=True,
                env={**os.environ, "OPTS": opts, "PORT": str(env.cluster.port), "USER": SIM_USER},
            )
            manual = time.monotonic() - started
        rows.append(
            (
                f"N={n}: hpodlb once (push, sshd -t, reload, verify, register)",
                f"{ours:.1f} s",
                "",
                ok(converged),
            )
        )
        rows.append(
            (f"N={n}: manual loop (copy only: no reload, no check)", f"{manual:.1f} s", "", "")
        )
        goal = "hpodlb >= 5x faster" if n == 50 else ""
        rows.append(
            (
                f"N={n}: manual / hpodlb",
                f"{manual / ours:.1f}x",
                goal,
                ok(manual / ours >= 5) if n == 50 else "",
            )
        )
    return rows


# -- 4. scale of a pass ---------------------------------------------------------------------------


def scale(quick: bool = False) -> list[Row]:
    """1, 100, 1,000 targets (NLB's per-group limit) against the moto server, host keys off."""
    from hpodlb.guards import Guards
    from hpodlb.inventory import LoginNode
    from hpodlb.planner import GroupView, KeyFacts, Target, plan_pass

    rows: list[Row] = []
    with world(1, through_proxy=True) as (env, plan):
        assert plan is not None
        for n in (1, 100) if quick else (1, 100, 1000):
            nodes = [
                LoginNode(f"10.3.{i // 250}.{i % 250 + 1}", f"i-{i}", f"n{i}", "login-group")
                for i in range(n)
            ]
            keys_off = KeyFacts()  # host keys off: every node counts as verified
            empty = GroupView("arn", 22, ())
            full = GroupView("arn", 22, tuple(Target(x.ip, 22, "healthy") for x in nodes))
            planner_ms = _median_ms(partial(plan_pass, nodes, [empty], keys_off, Guards()), 20)
            idle_ms = _median_ms(partial(plan_pass, nodes, [full], keys_off, Guards()), 20)
            rows.append(
                (
                    f"N={n}: planner, all new / all in step",
                    f"{planner_ms:.2f} / {idle_ms:.2f} ms",
                    "< 10 ms at 1,000",
                    ok(max(planner_ms, idle_ms) < 10) if n == 1000 else "",
                )
            )
            env.arns = [env.aws.create_login_nlb(name=f"s{uuid.uuid4().hex[:12]}")]
            env.rc.write_text(
                json.dumps(
                    {
                        "InstanceGroups": [
                            {
                                "Name": "login-group",
                                "Instances": [
                                    {"CustomerIpAddress": x.ip, "InstanceId": x.instance_id}
                                    for x in nodes
                                ],
                            }
                        ]
                    }
                )
            )
            env.write_config(
                host_keys={"enabled": False}, cluster={"allowed_cidrs": ["10.0.0.0/8"]}
            )
            rec, state = build_reconciler(env.config), State()
            before = dict(plan.actions)
            first = rec.run_pass(state, apply=True)
            writes = sum(plan.actions.get(w, 0) - before.get(w, 0) for w in WRITES)
            idle_pass = statistics.median(
                rec.run_pass(state, apply=True).duration_seconds for _ in range(3)
            )
            want = -(-n // 200)
            rows.append(
                (
                    f"N={n}: write calls for {n} registrations",
                    str(writes),
                    f"ceil(N/200) = {want}",
                    ok(writes == want and first.converged),
                )
            )
            rows.append(
                (
                    f"N={n}: pass wall time, first / idle",
                    f"{first.duration_seconds:.2f} / {idle_pass:.2f} s",
                    "",
                    "",
                )
            )
    return rows


def _median_ms(func: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        func()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


# -- 5. one node's fault costs that node only ----------------------------------------------------------


TRICKLE = "Match User {user}\n  ForceCommand while :; do printf x; sleep 3; done\n"


def _bad_nodes(env: SimEnv) -> list[str]:
    """A silent peer (TCP, never a banner), a trickling node and one refusing channels."""
    cluster = env.cluster
    silent, trickle, refuse = cluster.ip(251), cluster.ip(252), cluster.ip(253)
    cluster.silent_listener(silent, "i-0silent00000251")
    for ip, extra in ((trickle, TRICKLE.format(user=SIM_USER)), (refuse, "MaxSessions 0\n")):
        node = cluster.add_node(ip, f"i-0bad{ip.rsplit('.', 1)[1]:0>12}", start=False)
        node.write_sshd_config(extra)
        node.start()
    return [silent, trickle, refuse]


def isolation(quick: bool = False) -> list[Row]:
    """Healthy nodes' join latency beside a silent, a trickling and a channel-refusing node, and
    the same healthy nodes alone, side by side in one run; then a node that answers again after
    15 minutes of failures."""
    trials = 1 if quick else 3
    joined: dict[str, list[float]] = {"alone": [], "beside 3 bad nodes": []}
    for _ in range(trials):
        for label, times_of in joined.items():
            with world(7) as (env, _):
                env.write_config(ssh={"connect_timeout_seconds": 10})  # the default timeout
                healthy = list(env.listed)
                env.list_nodes(healthy + (_bad_nodes(env) if label != "alone" else []))
                log = io.StringIO()
                setup_logging(stream=log)
                started = time.time()
                env.run_pass()
                times = [
                    _ts(e)
                    for e in _events(log)
                    if e["event"] == "registered" and e["ip"] in healthy
                ]
                times_of.append(
                    max(times) - started if len(times) == len(healthy) else float("inf")
                )
    alone, beside = (statistics.median(joined[k]) for k in joined)
    rows: list[Row] = [
        ("7 healthy nodes registered, alone (median)", f"{alone:.2f} s", "", ""),
        (
            "same, beside a silent, a trickling and a refusing node",
            f"{beside:.2f} s",
            "within 1 s of alone",
            ok(beside - alone < 1),
        ),
    ]
    with world(3) as (env, _):
        late = env.cluster.add_node(env.cluster.ip(240), "i-0late000000240", start=False)
        env.list_nodes([*env.listed, late.ip])
        env.write_config(reconcile={"interval_seconds": 30})
        rec, state = build_reconciler(env.config), State()
        for n in range(30):  # 15 minutes of passes at 30 s, the node refusing connections
            rec.clock = partial(lambda k: time.monotonic() + 30 * k, n)
            rec.run_pass(state, apply=True)
        late.start()
        rec.clock = lambda: time.monotonic() + 30 * 30
        rec.run_pass(state, apply=True)
        registered = late.ip in env.registered()
    rows.append(
        (
            "a node answering after 15 min of failures: registered by the next pass",
            "yes" if registered else "no",
            "within one interval",
            ok(registered),
        )
    )
    return rows


def _events(log: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(x) for x in log.getvalue().splitlines() if x.startswith("{")]


def idle200(quick: bool = False) -> list[Row]:
    """An idle daemon at 200 login nodes: its CPU share of one core at a 30 s interval and its wall
    time per pass, probing every pass against the default probe_interval_seconds (240 s).

    Passes here are 2 s apart, so 240 s at a 30 s interval is 8 passes, 16 s. How many probe rounds
    fall in a window depends on its phase; so the probing pass's cost is measured on its own
    (probing every pass), the idle pass's is what is left of the default run once its probe rounds
    (counted from the nodes' sshd logs) are taken out, and the steady share is one probing pass in
    every 8."""
    nodes = 60 if quick else 200
    passes = 16 if quick else 40
    cost: dict[str, tuple[float, int, list[float]]] = {}  # label -> (CPU s, probe rounds, walls)
    for label, probe_interval in (("probing every pass", 0.0), ("default probe interval", 16.0)):
        with world(nodes) as (env, _):
            env.write_config(
                ssh={"connect_timeout_seconds": 10},
                reconcile={"interval_seconds": 2},
                host_keys={"probe_interval_seconds": probe_interval},
            )
            daemon = Daemon(env.config_path)
            try:
                daemon.wait_passes(2)  # converged, then the first idle pass
                cpu0, seen = daemon.cpu_seconds(), len(daemon.events("pass_finished"))
                conn0 = _ssh_counts(env)[0]
                daemon.wait_passes(seen + passes)
                cpu = daemon.cpu_seconds() - cpu0
                rounds = round((_ssh_counts(env)[0] - conn0) / (3 * nodes))
                walls = [e["seconds"] for e in daemon.events("pass_finished")[seen : seen + passes]]
            finally:
                daemon.stop()
        cost[label] = (cpu, rounds, walls)
    probing_pass = cost["probing every pass"][0] / passes
    cpu, rounds, _ = cost["default probe interval"]
    idle_pass = max(0.0, (cpu - rounds * probing_pass) / max(1, passes - rounds))
    every = probing_pass / 30 * 100
    steady = (probing_pass + 7 * idle_pass) / (8 * 30) * 100
    rows: list[Row] = [
        (
            f"{nodes} nodes, probing every pass: CPU share of one core at a 30 s interval",
            f"{every:.2f} %",
            "",
            "",
        ),
        (
            f"{nodes} nodes, default probe interval (one probing pass in 8): CPU share",
            f"{steady:.2f} %",
            "< 1 %",
            ok(steady < 1),
        ),
        (
            "  ... an idle pass / a probing pass, CPU",
            f"{idle_pass:.3f} / {probing_pass:.2f} s",
            "",
            "",
        ),
        (f"  ... measured over {passes} passes with {rounds} probe rounds", "", "", ""),
    ]
    for label, (_, _, walls) in cost.items():
        rows.append(
            (
                f"{nodes} nodes, {label}: wall time per pass, median / max",
                f"{statistics.median(walls):.2f} / {max(walls):.2f} s",
                "",
                "",
            )
        )
    return rows


def memory(quick: bool = False) -> list[Row]:
    """The daemon's RSS over 1,000 passes at 200 login nodes and 3 target groups, host keys on with
    the default probe interval: growth from pass 100 to the last must stay under 5 MB."""
    nodes = 40 if quick else 200
    last = 300 if quick else 1000
    with world(nodes) as (env, _):
        env.arns += [env.aws.create_login_nlb(name=f"m{n}{os.getpid()}") for n in range(2)]
        env.write_config(
            ssh={"connect_timeout_seconds": 10},
            reconcile={"interval_seconds": 0.02},
            host_keys={"probe_interval_seconds": 240},
        )
        daemon = Daemon(env.config_path)
        try:
            daemon.wait_passes(100, timeout=1200)
            at100 = daemon.rss_mb()
            daemon.wait_passes(last, timeout=3600)
            at_last = daemon.rss_mb()
        finally:
            daemon.stop()
    growth = at_last - at100
    return [
        (
            f"daemon RSS at pass 100 / {last} ({nodes} nodes, 3 groups)",
            f"{at100:.0f} / {at_last:.0f} MB",
            "",
            "",
        ),
        (f"RSS growth, pass 100 to {last}", f"{growth:.1f} MB", "< 5 MB", ok(growth < 5)),
    ]


# -- 5b. a cold pass at 200 nodes ------------------------------------------------------------------


def cold200(quick: bool = False) -> list[Row]:
    """A first pass over 200 login nodes (60 with --quick) from nothing: no state, an empty key
    store, every node presenting keys of its own (the first is adopted, the other 199 are pushed
    to). `hpodlb once` as a process: how soon the first node is registered and when the last is,
    from the pass's start, against what the steps allow; and hpodlb's CPU per node.

    The steps are timed alone on the first node before the pass (a probe, reading its keys, and a
    push of its own keys back to it). The critical path of the first registration is a probe, the
    adoption, one push, and the linger that lets nodes ready together share one AWS call; all of
    them cannot be registered sooner than the jobs' total time spread over the workers."""
    from hpodlb.act import LINGER_SECONDS
    from hpodlb.reconcile import Reconciler
    from hpodlb.wiring import host_keys

    nodes = 60 if quick else 200
    with world(nodes) as (env, _):
        env.write_config(ssh={"connect_timeout_seconds": 10})
        first = env.listed[0]
        side = host_keys(env.config)
        probes = []
        for _ in range(3):
            started = time.monotonic()
            offered = side.probe(first).offered
            probes.append(time.monotonic() - started)
        assert offered, f"{first} does not answer"
        pin = frozenset(offered.values())
        started = time.monotonic()
        keys = side.read_keys(first, pin)
        read = time.monotonic() - started
        started = time.monotonic()
        side.push(first, keys, pin)  # its own keys back: a whole push, nothing changed
        push = time.monotonic() - started
        probe = statistics.median(probes)
        workers = Reconciler(env.config, [], None).workers
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(
            [sys.executable, "-m", "hpodlb", "-v", "once", "--config", str(env.config_path)],
            capture_output=True,
            text=True,
            check=False,
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        events = [json.loads(x) for x in done.stderr.splitlines() if x.startswith("{")]
        begun = min(_ts(e) for e in events if e["event"] == "pass_started")
        joined = sorted(_ts(e) - begun for e in events if e["event"] == "registered")
        converged = done.returncode == 0 and env.registered() == set(env.listed)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    critical = probe + read + push + LINGER_SECONDS
    work = (nodes * probe + read + (nodes - 1) * push) / workers
    first_at = joined[0] if joined else float("inf")
    last_at = joined[-1] if joined else float("inf")
    return [
        (
            f"cold pass, {nodes} nodes: first node registered (from the pass's start)",
            f"{first_at:.1f} s",
            "",
            "",
        ),
        (
            "  ... its critical path: probe + adoption + push + linger",
            f"{critical:.1f} s ({probe:.2f} + {read:.2f} + {push:.2f} + {LINGER_SECONDS})",
            "",
            "",
        ),
        (f"cold pass, {nodes} nodes: all registered", f"{last_at:.1f} s", "", ok(converged)),
        (f"  ... the jobs' total time over {workers} workers", f"{work:.1f} s", "", ""),
        ("hpodlb CPU per node (the whole `once` process)", f"{cpu / nodes * 1000:.0f} ms", "", ""),
    ]


# -- 6. startup -----------------------------------------------------------------------------------


def startup(quick: bool = False) -> list[Row]:
    runs = 3 if quick else 7

    def wall(args: list[str], env: dict[str, str] | None = None) -> float:
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "hpodlb", *args], capture_output=True, env=env, check=False
            )
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    help_s = wall(["--help"])
    with world(3) as (env, _):
        env.write_config(host_keys={"enabled": False})
        plan_s = wall(["plan", "--config", str(env.config_path)], os.environ.copy())
    return [
        ("hpodlb --help (median)", f"{help_s * 1000:.0f} ms", "< 300 ms", ok(help_s < 0.3)),
        (
            "hpodlb plan, 3 nodes, host keys off (median)",
            f"{plan_s * 1000:.0f} ms",
            "(no goal)",
            "-",
        ),
    ]


# -- 8. doctor --------------------------------------------------------------------------------------


def doctor(quick: bool = False) -> list[Row]:
    """`hpodlb doctor` on 50 login nodes (an sshd each) behind the emulated NLB: the whole checklist,
    wall time of the real command, median of 3."""
    n = 10 if quick else 50
    with world(n) as (env, _):
        arn = env.aws.create_login_nlb(name=f"doc{uuid.uuid4().hex[:8]}", port=env.cluster.port)
        env.arn, env.arns, env.tg_port = arn, [arn], env.cluster.port
        for ip in env.listed:
            env.aws.attach_login_node(arn, ip)
        env.write_config()
        command = [
            sys.executable,
            "-m",
            "hpodlb",
            "doctor",
            "--json",
            "--config",
            str(env.config_path),
        ]
        subprocess.run([*command[:3], "once", *command[5:]], capture_output=True, check=False)
        times, doc = [], {}
        for _ in range(3):
            started = time.monotonic()
            out = subprocess.run(command, capture_output=True, text=True, check=False)
            times.append(time.monotonic() - started)
            doc = json.loads(out.stdout)
    checks = doc.get("checks", [])
    fails = [c for c in checks if c["status"] == "FAIL" and c["area"] != "daemon"]
    median = statistics.median(times)
    return [
        (
            f"hpodlb doctor, {n} login nodes (median of 3)",
            f"{median:.2f} s",
            "< 5 s",
            ok(median < 5 and not fails),
        ),
        (
            "  ... checks run / FAIL (besides the daemon, not running here)",
            f"{len(checks)} / {len(fails)}",
            "",
            "",
        ),
    ]


# -- 8. metrics -----------------------------------------------------------------------------------


class _Pair:
    """The two daemons of `metrics`, metrics off and on, on one simulated head node."""

    def __init__(self, env: SimEnv) -> None:
        self.env = env
        textdir = env.workdir / "node-exporter"
        textdir.mkdir(mode=0o755)
        self.sections: dict[str, dict[str, Any]] = {
            "off": {},
            "on": {"listen": "127.0.0.1:0", "textfile": str(textdir / "hpodlb.prom")},
        }
        self.daemons: dict[str, Daemon] = {}
        self.address = ""
        self.scrapes: list[float] = []
        self.size = 0

    def configure(self, interval: float) -> dict[str, Path]:
        paths = {}
        for label, section in self.sections.items():
            path = self.env.write_config(
                reconcile={"interval_seconds": interval},
                host_keys={"enabled": False},
                state={"dir": str(self.env.workdir / f"state-{label}")},
                metrics=section,
            )
            paths[label] = path.rename(path.with_name(f"config-{label}.toml"))
        return paths

    def start(self, interval: float) -> None:
        self.daemons = {label: Daemon(path) for label, path in self.configure(interval).items()}
        for daemon in self.daemons.values():
            daemon.wait_passes(2)  # registered, then healthy: idle from here
        self.address = self.daemons["on"].events("metrics_listening")[0]["address"]

    def scrape(self) -> None:
        began = time.perf_counter()
        with urllib.request.urlopen(f"http://{self.address}/metrics", timeout=5) as reply:
            self.size = len(reply.read())
        self.scrapes.append(time.perf_counter() - began)

    def cpu(self) -> dict[str, float]:
        return {k: d.cpu_seconds() for k, d in self.daemons.items()}

    def passes(self) -> dict[str, int]:
        return {k: len(d.events("pass_finished")) for k, d in self.daemons.items()}

    def per_pass(self, passes: int) -> dict[str, float]:
        """CPU seconds per pass over the next `passes` passes, scraping once a pass."""
        cpu0, passes0 = self.cpu(), self.passes()
        seen = passes0["on"]
        while min(n - passes0[k] for k, n in self.passes().items()) < passes:
            if self.passes()["on"] > seen:
                seen = self.passes()["on"]
                self.scrape()
            time.sleep(0.02)
        cpu1, passes1 = self.cpu(), self.passes()
        return {k: (cpu1[k] - cpu0[k]) / (passes1[k] - passes0[k]) for k in self.daemons}

    def per_hour(self, interval: float, window: float) -> dict[str, float]:
        """Reloaded to `interval`: CPU seconds an hour, over `window` s, scraping every 30 s."""
        self.configure(interval)
        before = self.passes()
        for daemon in self.daemons.values():
            daemon.proc.send_signal(signal.SIGHUP)
        for label, daemon in self.daemons.items():
            daemon.wait_passes(before[label] + 1)  # the pass a reload asks for
        time.sleep(1)
        cpu0, began = self.cpu(), time.monotonic()
        next_scrape = began
        while time.monotonic() < began + window:
            if time.monotonic() >= next_scrape:
                self.scrape()
                next_scrape += 30
            time.sleep(0.1)
        elapsed = time.monotonic() - began
        return {k: (v - cpu0[k]) / elapsed * 3600 for k, v in self.cpu().items()}

    def stop(self) -> None:
        for daemon in self.daemons.values():
            daemon.stop()


def metrics(quick: bool = False) -> list[Row]:
    """The idle cost of [metrics]: two daemons side by side on the same 3 login nodes and target
    group, one with metrics off, one with the endpoint and the textfile on; CPU from /proc over the
    same windows. First passes 0.5 s apart, the endpoint scraped once a pass (the cost per pass);
    then, reloaded to the default 30 s interval, a few minutes as deployed (scraped every 30 s;
    this also counts the endpoint's own idle wake-ups between passes)."""
    passes = 10 if quick else 40
    window = 60.0 if quick else 180.0
    with world(3) as (env, _):
        pair = _Pair(env)
        try:
            pair.start(0.5)
            per_pass = pair.per_pass(passes)
            per_hour = pair.per_hour(30.0, window)
            rss = {k: d.rss_mb() for k, d in pair.daemons.items()}
        finally:
            pair.stop()
    extra = per_pass["on"] - per_pass["off"]
    hourly = per_hour["on"] - per_hour["off"]
    return [
        (
            "CPU per idle pass, metrics off / on (scraped once a pass, textfile)",
            f"{per_pass['off'] * 1000:.1f} / {per_pass['on'] * 1000:.1f} ms",
            "",
            "",
        ),
        (
            "  ... metrics' cost per idle pass",
            f"{extra * 1000:.1f} ms",
            "< 5 ms",
            ok(extra < 0.005),
        ),
        (
            f"CPU s/hour at a 30 s interval, off / on (measured over {window:.0f} s)",
            f"{per_hour['off']:.2f} / {per_hour['on']:.2f} s",
            "",
            "",
        ),
        ("  ... metrics' cost per hour as deployed", f"{hourly:.2f} s", "< 1 s", ok(hourly < 1)),
        ("daemon RSS, metrics off / on", f"{rss['off']:.0f} / {rss['on']:.0f} MB", "", ""),
        (
            f"scrape of /metrics ({pair.size} bytes), median wall",
            f"{statistics.median(pair.scrapes) * 1000:.1f} ms",
            "",
            "",
        ),
    ]
