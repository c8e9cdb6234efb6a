"""A whole simulated head node for tests: moto server, sshd login nodes, config, resource config."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hpodlb.config import Config, load_config
from hpodlb.outcome import PassOutcome
from hpodlb.state import State, load_state, save_state
from hpodlb.wiring import build_reconciler
from sim.aws import FakeAws
from sim.demo import resource_config
from sim.nodes import RELOAD_COMMAND, SIM_USER, SimCluster


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def render_config(sections: dict[str, dict[str, Any]], target_groups: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in keys.items()]
    for tg in target_groups:
        lines.append("[[target_groups]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in tg.items()]
    return "\n".join(lines) + "\n"


class SimEnv:
    def __init__(self, aws: FakeAws, cluster: SimCluster, workdir: Path) -> None:
        self.aws = aws
        self.cluster = cluster
        self.workdir = workdir
        self.arn = aws.create_login_nlb(name=f"t{uuid.uuid4().hex[:12]}")
        self.rc = workdir / "resource_config.json"
        self.store = workdir / "host_keys"
        self.state_dir = workdir / "state"
        self.config_path = workdir / "config.toml"
        self.arns = [self.arn]
        self.tg_port = 22  # what the target groups send to (the nodes' sshd listen on cluster.port)
        self.listed: list[str] = []
        self.write_config()

    def write_config(self, **overrides: dict[str, Any]) -> Path:
        sections: dict[str, dict[str, Any]] = {
            "cluster": {
                "resource_config": str(self.rc),
                "login_groups": ["login-group"],
                "provisioning_parameters": str(self.workdir / "pp.json"),
                "allowed_cidrs": ["127.0.0.0/8"],
                "leader": "always",  # one simulated head; tests of several heads set it
            },
            "ssh": {
                "user": SIM_USER,
                "port": self.cluster.port,
                "key_file": str(self.cluster.client_key),
                # A silent node costs a test this long; a handshake under two suites' load can
                # take 2 s (it failed a login node that was only slow).
                "connect_timeout_seconds": 4,
            },
            # Probe every pass: tests change nodes between passes; the interval has tests of its own.
            "host_keys": {
                "store": str(self.store),
                "reload_command": RELOAD_COMMAND,
                "probe_interval_seconds": 0,
            },
            "state": {"dir": str(self.state_dir)},
        }
        for name, keys in overrides.items():
            sections.setdefault(name, {}).update(keys)
        groups = [{"arn": arn, "port": self.tg_port} for arn in self.arns]
        self.config_path.write_text(render_config(sections, groups))
        return self.config_path

    @property
    def config(self) -> Config:
        return load_config(self.config_path, {})

    def list_nodes(self, ips: Sequence[str]) -> None:
        """Write the resource config listing these sim nodes as the login group, in this order."""
        self.listed = list(ips)
        nodes = {ip: self.cluster.nodes[ip].instance_id for ip in ips}
        self.rc.write_text(json.dumps(resource_config(nodes)))

    def run_pass(self, *, apply: bool = True) -> PassOutcome:
        """What `hpodlb once` does, in-process (so tests can look at the outcome)."""
        state, _ = load_state(self.state_dir)
        outcome = build_reconciler(self.config).run_pass(state, apply=apply)
        if apply:
            save_state(self.state_dir, state)
        return outcome

    def state(self) -> State:
        return load_state(self.state_dir)[0]

    def registered(self) -> set[str]:
        return {ip for ip, _ in self.aws.targets(self.arn)}
