"""`hpodlb doctor`: gather what the path of a user's SSH depends on, and let `diagnose` judge it.

The first thing to run when users say "I can't log in". Read-only everywhere: AWS Describe calls,
an SSH handshake per key type and one `sshd -T` per login node (nothing is sent to a node but the
login), the key store and the state file. AWS is read on this thread while the nodes are checked on
a pool (`doctoraws.py` reads AWS's side), so 50 nodes answer in a few seconds; every call is
bounded (botocore's timeouts, the SSH connector's deadlines). A call that fails is a FAIL naming
the permission or the node, never a traceback, and the checks that do not depend on it still run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpodlb import diagnose, diagnosenode
from hpodlb.checks import check_host_keys, check_inventory, check_login_key, login_key_fix
from hpodlb.config import Config
from hpodlb.diagnose import Finding, Status, fail, passed, warn
from hpodlb.doctoraws import AwsPath
from hpodlb.inventory import InventoryError, LoginNode
from hpodlb.keyadmin import vouched_keys
from hpodlb.keystore import KeyStore, KeyStoreError
from hpodlb.lock import lock_holder
from hpodlb.state import load_state

if TYPE_CHECKING:
    from hpodlb.wiring import CommandAdapters

WORKERS = 8
SSHD_T = b"PATH=$PATH:/usr/sbin:/sbin; sshd -T 2>&1\n"
INVENTORY_FIX = (
    "check cluster.resource_config and the login groups (is this the head node?); a file that "
    "is half-written is HyperPod rewriting it: run doctor again in a minute"
)
STALE_INTERVALS = 3  # no pass for this many intervals: the daemon is stuck or stopped


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    evaluated: bool = True  # False: AWS could not be reached at all; most checks are missing

    @property
    def exit_status(self) -> int:
        if not self.evaluated:
            return 2
        return 1 if diagnose.verdict(self.findings) is Status.FAIL else 0


def run_doctor(
    config: Config, adapters: CommandAdapters, wall: Callable[[], float] = time.time
) -> Report:
    report = Report([passed("config", "the config file is valid")])
    report.findings += [
        passed("config", line) if ok else fail("config", line, INVENTORY_FIX)
        for ok, line in check_inventory(config, adapters)
    ]
    report.findings += _regions(config)
    try:
        nodes = adapters.desired()
    except InventoryError:
        nodes = ()  # said above
        report.findings.append(
            warn("nodes", "not checked: the login nodes could not be read", "see the config lines")
        )
    with ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="hpodlb-doctor") as pool:
        ssh = _start_node_checks(pool, config, adapters, nodes)
        drained = _drained(config)
        aws = AwsPath(config, adapters.groups, drained)
        report.findings += aws.check(nodes)
        report.evaluated = aws.reachable
        report.findings += _judge_nodes(config, nodes, ssh, aws.idle_timeout, drained)
    report.findings += _key_store(config)
    report.findings += _login_key(config)
    report.findings.append(_leadership(config))
    report.findings += _daemon(config, wall())
    return report


def _regions(config: Config) -> list[Finding]:
    """aws.region set to another region than a target group's ARN: every AWS call then asks the
    wrong region, and AWS answers only "not found"."""
    region = config.aws.region
    return [
        fail(
            "config",
            f"aws.region is {region}, but target group {tg.name} is in {tg.region}",
            f"set aws.region to {tg.region}, or leave it empty (each ARN's own region is used)",
        )
        for tg in config.target_groups
        if region and tg.region != region
    ]


def render_text(report: Report) -> str:
    width = max(len(f.area) for f in report.findings)
    lines = []
    for f in report.findings:
        lines.append(f"{f.status.value}  {f.area.ljust(width)}  {f.found}")
        if f.fix and f.status is not Status.PASS:
            lines.append(f"{'':4}  {'':{width}}  fix: {f.fix}")
    counts = {s: sum(1 for f in report.findings if f.status is s) for s in Status}
    lines.append(
        f"{counts[Status.FAIL]} FAIL, {counts[Status.WARN]} WARN, {counts[Status.PASS]} PASS"
        + ("" if report.evaluated else "; AWS could not be reached: most checks did not run")
    )
    return "\n".join(lines)


def render_json(report: Report) -> str:
    return json.dumps(
        {
            "verdict": diagnose.verdict(report.findings).value,
            "evaluated": report.evaluated,
            "exit_status": report.exit_status,
            "checks": [f.as_dict() for f in report.findings],
        },
        indent=2,
    )


# -- login nodes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _NodeFacts:
    offered: dict[str, str] | None = None
    sshd_t: str = ""
    error: str = ""  # `step: reason` of the first step that failed
    untrusted: bool = False  # presents no key we can vouch for: not logged in to


def _start_node_checks(
    pool: ThreadPoolExecutor, config: Config, adapters: CommandAdapters, nodes: Sequence[LoginNode]
) -> dict[str, Future[_NodeFacts]]:
    if adapters.keys is None:
        return {}
    side = adapters.keys.nodes
    vouched = vouched_keys(config, [n.ip for n in nodes])
    return {n.ip: pool.submit(_node_facts, side, n.ip, vouched[n.ip]) for n in nodes}


def _node_facts(side: Any, ip: str, vouched: frozenset[str]) -> _NodeFacts:
    """A login pinned to the keys we can vouch for, running `sshd -T` as root, then a probe of the
    key types that session did not show; a node presenting none of those keys is only probed, and
    sent nothing. Whatever a node does costs its own line, never doctor's run."""
    from hpodlb.keystore import key_type_of
    from hpodlb.sshnode import SshError

    seen: dict[str, str] = {}
    sshd_t, error, untrusted = "", "", not vouched
    try:
        if vouched:
            try:
                with side.connector.session(ip, vouched) as session:
                    key = session.server_key()
                    seen[key_type_of(key) or ""] = key
                    rc, out, err = session.run_root(SSHD_T)
                if rc != 0:
                    first = (out.strip() or err.strip() or f"exit status {rc}").splitlines()[0]
                    error = f"sshd-T: {first[:200]}"
                sshd_t = out
            except SshError as exc:
                if exc.step == "connect":  # nothing answers: do not wait for it a second time
                    return _NodeFacts(error=_clean(str(exc)))
                untrusted = exc.step == "host-key"
                error = "" if untrusted else str(exc)
        probe = side.probe(ip, known=seen)
    except Exception as exc:  # paramiko re-raises whatever its thread met: this node's fault
        return _NodeFacts(error=_clean(f"ssh: {type(exc).__name__}: {exc}"))
    if probe.offered is None:
        return _NodeFacts(error=_clean(probe.error))
    return _NodeFacts(
        offered=dict(probe.offered),
        sshd_t=_clean(sshd_t, keep="\n"),
        error=_clean(error),
        untrusted=untrusted,
    )


def _clean(text: str, keep: str = "") -> str:
    """A node's words, without control characters (no escape sequence reaches a terminal)."""
    return "".join(c if c.isprintable() or c in keep else "?" for c in text)


def _judge_nodes(
    config: Config,
    nodes: Sequence[LoginNode],
    ssh: dict[str, Future[_NodeFacts]],
    idle_timeout: int | None,
    drained: Mapping[str, str],
) -> Iterator[Finding]:
    if not ssh:
        if nodes:
            yield warn(
                "nodes",
                "host_keys.enabled = false: login nodes are not checked over SSH",
                "enable host_keys to have hpodlb keep and check the nodes' host keys",
            )
        return
    canonical, previous = _key_sets(config)
    hk = config.host_keys
    for node in nodes:
        area = f"node {node.ip}"
        try:
            facts = ssh[node.ip].result()
        except Exception as exc:  # a bug in gathering: this node's line, not the report's end
            yield fail(area, f"not checked: {type(exc).__name__}: {exc}", "run again with -v")
            continue
        if facts.offered is None and node.ip in drained:
            yield warn(
                area,
                f"drained, and unreachable: {facts.error}",
                f"expected while its maintenance lasts; `hpodlb undrain {node.ip}` once it is done",
            )
            continue
        if facts.offered is None:
            yield fail(area, f"unreachable: {facts.error}", _ssh_fix(facts.error, config))
            continue
        yield diagnosenode.host_keys(node.ip, facts.offered, canonical, previous)
        if facts.untrusted:
            yield warn(
                area,
                "not logged in to: it presents no key hpodlb has verified (canonical, previous, "
                "or pinned for it), so sshd is not checked",
                "`hpodlb status` says why it is held; `hpodlb keys trust IP` if it was re-imaged",
            )
            continue
        if facts.error:
            yield fail(area, facts.error, _ssh_fix(facts.error, config))
            continue
        how = "`sudo -n`" if config.ssh.sudo else "root commands (ssh.sudo = false)"
        yield passed(area, f"login as {config.ssh.user} and {how} work")
        yield from diagnosenode.sshd(
            node.ip,
            facts.sshd_t,
            sorted({tg.port for tg in config.target_groups}),
            str(hk.remote_dir),
            hk.types,
            idle_timeout,
        )


def _ssh_fix(error: str, config: Config) -> str:
    step = error.split(":", 1)[0]
    return {
        "connect": f"check that the node is up, that its sshd listens on {config.ssh.port} and "
        "answers (a hung sshd accepts TCP and says nothing), and that its security group admits "
        "the head node",
        "handshake": f"something accepts TCP on port {config.ssh.port} but does not speak SSH in "
        "time: a hung sshd, or another service on that port",
        "auth": f"install the public half of {config.ssh.key_file} in "
        f"~{config.ssh.user}/.ssh/authorized_keys on the node",
        "sudo": f"give {config.ssh.user} passwordless sudo on the node",
        "key": login_key_fix(config),
        "sshd-T": "sshd's own config check fails on the node: run `sshd -T` there",
    }.get(step, "see the error; `hpodlb status` shows the last pass's view of this node")


def _drained(config: Config) -> dict[str, str]:
    """The admin's drains (IP -> reason); when intents.json is gone or unusable, the daemon's copy
    in the state file, which it keeps in force then (the daemon's line says why)."""
    from hpodlb.intents import IntentsError, intents_path, load_intents

    try:
        if intents_path(config.state.dir).exists():
            return {ip: d.reason for ip, d in load_intents(config.state.dir).drain.items()}
    except IntentsError:
        pass
    return {ip: d.reason for ip, d in load_state(config.state.dir)[0].drains.items()}


def _key_sets(config: Config) -> tuple[dict[str, str], dict[str, str]]:
    store = KeyStore(config.host_keys.store, config.host_keys.types)
    try:
        current = {t: k.public for t, k in store.load().items()}
        previous = {t: k.public for t, k in store.load_previous().items()}
    except (KeyStoreError, OSError):
        return {}, {}
    return current, previous


# -- the head node -----------------------------------------------------------------------------


def _key_store(config: Config) -> list[Finding]:
    if not config.host_keys.enabled:
        return []
    return [
        passed("key store", line) if ok else fail("key store", line, "see `hpodlb keys --help`")
        for ok, line in check_host_keys(config)
    ]


def _login_key(config: Config) -> list[Finding]:
    """The key every login to a node uses (none without host keys: no login then)."""
    if not config.host_keys.enabled:
        return []
    ok, line = check_login_key(config)
    return [passed("ssh login", line) if ok else fail("ssh login", line, login_key_fix(config))]


def _daemon(config: Config, now: float) -> list[Finding]:
    state_dir = config.state.dir
    try:
        holder = lock_holder(state_dir)
    except OSError as exc:
        return [
            warn(
                "daemon",
                f"cannot tell whether hpodlb runs: {state_dir}: {exc.strerror}",
                "run doctor as root",
            )
        ]
    if holder is None:
        return [
            fail(
                "daemon",
                f"no hpodlb runs on this head node (nothing holds {state_dir}/hpodlb.lock)",
                "systemctl enable --now hpodlb; journalctl -u hpodlb",
            )
        ]
    return [_last_pass(config, f"pid {holder}: {_command_of(holder)}", now)]


def _last_pass(config: Config, who: str, now: float) -> Finding:
    """What the running daemon's last pass says of itself (the state file)."""
    state, warning = load_state(config.state.dir)
    last = state.last_pass
    if last is None:
        why = warning or "no pass recorded yet"
        return warn("daemon", f"running ({who}); {why}", "wait for its first pass")
    age = now - last.finished_at
    interval = config.reconcile.interval_seconds
    if age > STALE_INTERVALS * interval:
        return fail(
            "daemon",
            f"running ({who}), but its last pass ended {age:.0f}s ago (interval {interval}s)",
            "journalctl -u hpodlb: a pass is stuck, or the state dir cannot be written",
        )
    if last.standby.startswith("standby (controller: "):
        return passed("daemon", f"running ({who}); last pass {age:.0f}s ago: {last.standby}")
    if last.standby:
        return warn(
            "daemon",
            f"running ({who}); last pass {age:.0f}s ago: {last.standby}",
            "no head acts while this lasts: see the `daemon` line on leadership above",
        )
    if not last.ok:
        return warn(
            "daemon",
            f"running ({who}); last pass {age:.0f}s ago NOT converged: {last.summary}",
            "`hpodlb status` says what is held back, waiting or failing",
        )
    return passed("daemon", f"running ({who}); last pass {age:.0f}s ago converged")


def _leadership(config: Config) -> Finding:
    """Which head acts, as the daemon decides it each pass (a stand-by head is normal)."""
    from hpodlb.leader import check

    lead = check(config.cluster.leader)
    if lead.acting:
        return passed("daemon", f"this head acts: {lead.why}")
    if lead.sound:
        return passed("daemon", f"this head is on {lead.label}: {lead.why}")
    return warn(
        "daemon",
        f"this head does not act: {lead.why}",
        "run hpodlb on the heads that run slurmctld, with `scontrol ping` working for root "
        '(SLURM_CONF, munge); on a cluster with a single head, set cluster.leader = "always"',
    )


def _command_of(pid: str) -> str:
    """`hpodlb run` (or `once`, holding the lock for a pass): what the holder is, from its argv."""
    try:
        argv = Path(f"/proc/{int(pid)}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return "unknown"
    words = [a.decode(errors="replace") for a in argv]
    command = next((w for w in words if w in ("run", "once")), "")
    return f"hpodlb {command}" if command else "unknown"
