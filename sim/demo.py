"""`./dev demo`: hpodlb's main job, end to end, against the embedded local setup.

An AWS emulator (moto server on loopback) holds an internal NLB and its target group; login nodes
are real sshd processes on loopback addresses of their own, each with its own /etc/ssh; a generated resource config lists
them. The demo runs the real `hpodlb` command as an admin would (`AWS_ENDPOINT_URL` points boto3 at
the emulator) and narrates: nodes get one identity and join, a replaced node is repaired, a
hand-added target is pruned, a half-written file changes nothing, a node leaves (cautiously).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sim.aws import FakeAws, moto_server
from sim.nodes import RELOAD_COMMAND, SIM_USER, SimCluster, sim_cluster
from sim.workdir import require_inside

RESOURCE_CONFIG = Path("opt-ml-config", "resource_config.json")  # under the work dir

CLUSTER_NAME = "ml-cluster"


def resource_config(login_nodes: dict[str, str]) -> dict[str, Any]:
    """A resource config as HyperPod writes it, with a controller, the login group and workers."""
    return {
        "ClusterConfig": {"ClusterName": CLUSTER_NAME, "ClusterType": "Slurm"},
        "InstanceGroups": [
            {
                "Name": "controller-machine",
                "InstanceType": "ml.m5.12xlarge",
                "Instances": [
                    {
                        "CustomerIpAddress": "10.1.33.120",
                        "InstanceId": "i-0controller00001",
                        "InstanceName": "controller-machine-1",
                    }
                ],
            },
            {
                "Name": "login-group",
                "InstanceType": "ml.m5.4xlarge",
                "Instances": [
                    {"CustomerIpAddress": ip, "InstanceId": iid, "InstanceName": f"login-group-{n}"}
                    for n, (ip, iid) in enumerate(login_nodes.items(), start=1)
                ],
            },
            {
                "Name": "compute-nodes",
                "InstanceType": "ml.p5.48xlarge",
                "Instances": [
                    {
                        "CustomerIpAddress": "10.1.38.128",
                        "InstanceId": "i-0compute00000001",
                        "InstanceName": "compute-nodes-1",
                    }
                ],
            },
        ],
    }


def write_config(workdir: Path, arn: str, port: int, key_file: Path) -> Path:
    """The demo's config, every path on this machine inside `workdir` (refused otherwise): the
    commands it prints may be typed again after a `--keep`."""
    config, rc_path = workdir / "config.toml", workdir / RESOURCE_CONFIG
    config.write_text(
        f"""[cluster]
resource_config = "{rc_path}"
provisioning_parameters = "{rc_path.parent / "provisioning_parameters.json"}"
login_groups = ["login-group"]
allowed_cidrs = ["127.0.0.0/8"]   # the simulated login nodes live on loopback
leader = "always"                 # one simulated head node, whatever Slurm this machine has

[reconcile]
interval_seconds = 2   # short, so that an absent target waits 2 passes 2 s apart, not 30 s

[[target_groups]]
arn = "{arn}"
port = 22

[ssh]
user = "{SIM_USER}"
port = {port}
key_file = "{key_file}"
connect_timeout_seconds = 3

[host_keys]
store = "{workdir / "host_keys"}"
reload_command = {json.dumps(RELOAD_COMMAND)}

[state]
dir = "{workdir / "state"}"
"""
    )
    require_inside(config, workdir)
    return config


class Demo:
    def __init__(self, aws: FakeAws, cluster: SimCluster, workdir: Path) -> None:
        self.aws = aws
        self.cluster = cluster
        self.workdir = workdir
        self.failures: list[str] = []
        self.rc_path = workdir / RESOURCE_CONFIG
        self.rc_path.parent.mkdir()
        self.arn = aws.create_login_nlb()
        # The client key, copied: the simulated cluster's dir goes when the demo ends, and a kept
        # work dir's config must still name files that exist (`./dev demo --keep`).
        self.key_file = workdir / "ssh" / "id_ed25519"
        self.key_file.parent.mkdir(mode=0o700)
        shutil.copy2(cluster.client_key, self.key_file)
        self.config = write_config(workdir, self.arn, cluster.port, self.key_file)

    def expect(self, what: str, ok: bool) -> None:
        """Say whether a step ended as it should; the demo fails if any did not."""
        print(f"--> {'ok' if ok else 'UNEXPECTED'}: {what}", flush=True)
        if not ok:
            self.failures.append(what)

    def list_nodes(self) -> None:
        """Write the resource config as HyperPod would (to a temp file, then rename)."""
        nodes = {ip: n.instance_id for ip, n in self.cluster.nodes.items()}
        tmp = self.rc_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(resource_config(nodes), indent=2))
        tmp.replace(self.rc_path)

    def hpodlb(self, *args: str) -> int:
        print(f"\n$ hpodlb {' '.join(args)}", flush=True)
        env = {**os.environ, **self.aws.env(), "HPODLB_CONFIG": str(self.config)}
        done = subprocess.run([sys.executable, "-m", "hpodlb", *args], env=env, check=False)
        print(f"(exit status {done.returncode})", flush=True)
        return done.returncode

    def run_daemon_until_new_node(self, ip: str, instance_id: str) -> int:
        """Start `hpodlb run`, add a login node once it is up, stop it once the node is in."""
        print("\n$ hpodlb run   (stopped with SIGTERM once the new node is registered)", flush=True)
        env = {**os.environ, **self.aws.env(), "HPODLB_CONFIG": str(self.config)}
        daemon = subprocess.Popen([sys.executable, "-m", "hpodlb", "run"], env=env)
        try:
            time.sleep(3)  # its first pass
            self.cluster.add_node(ip, instance_id)
            self.list_nodes()
            deadline = time.monotonic() + 30
            while ip not in self.targets() and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(20)
        print(f"(exit status {code})", flush=True)
        return code if ip in self.targets() else 1

    def targets(self) -> list[str]:
        return sorted(ip for ip, _ in self.aws.targets(self.arn))

    def identities(self) -> int:
        """How many distinct host-key sets the login nodes present to OpenSSH's ssh-keyscan."""
        return len({frozenset(n.keyscan()) for n in self.cluster.nodes.values()})


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def run_demo(workdir: Path) -> int:
    """The scripted story; returns 0 when every step ended as it should."""
    with moto_server() as aws, sim_cluster(workdir / "sim") as cluster:
        for n in (2, 3, 4):
            cluster.add_node(cluster.ip(n), f"i-0a1b2c3d4e5f6001{n}")
        demo = Demo(aws, cluster, workdir)
        demo.list_nodes()
        for scene in SCENES:
            scene(demo)
    failures = demo.failures
    print(
        f"\nDemo {'finished: every step behaved' if not failures else 'FAILED: ' + '; '.join(failures)}"
    )
    return 1 if failures else 0


def nodes_get_one_identity_and_join(demo: Demo) -> None:
    ip, expect = demo.cluster.ip, demo.expect
    step(
        f"3 login nodes (real sshd on {ip(2)}-4:{demo.cluster.port}, each with its own host keys), "
        f"an empty target group (AWS emulator at {demo.aws.endpoint_url})"
    )
    expect(f"{demo.identities()} different host identities before", demo.identities() == 3)
    expect(
        "one pass adopts the first node's keys, pushes them, registers all",
        demo.hpodlb("once") == 0,
    )
    expect(f"one identity for all nodes (ssh-keyscan): {demo.identities()}", demo.identities() == 1)
    expect(f"target group = login nodes: {demo.targets()}", len(demo.targets()) == 3)


def a_new_node_joins(demo: Demo) -> None:
    step("HyperPod adds a 4th login node")
    demo.cluster.add_node(demo.cluster.ip(5), "i-0a1b2c3d4e5f60015")
    demo.list_nodes()
    demo.expect("keys pushed and verified, then registered, in one pass", demo.hpodlb("once") == 0)


def a_replaced_node_is_repaired(demo: Demo) -> None:
    ip3 = demo.cluster.ip(3)
    step(f"HyperPod replaces {ip3}: same IP, new instance, new root volume, new host keys")
    demo.cluster.nodes[ip3].replace("i-0ffee0000000000b3")
    demo.list_nodes()
    demo.expect(
        f"{demo.identities()} identities: users would see HOST KEY CHANGED",
        demo.identities() == 2,
    )
    demo.expect("out of rotation, repaired, back in", demo.hpodlb("once") == 0)
    demo.expect(f"one identity again: {demo.identities()}", demo.identities() == 1)


def drift_is_pruned(demo: Demo) -> None:
    step("Someone registers a stray target by hand (drift)")
    demo.aws.client("elbv2").register_targets(
        TargetGroupArn=demo.arn, Targets=[{"Id": "10.1.99.99", "Port": 22}]
    )
    demo.expect("first pass holds it back (absence 1/2 passes, exit 1)", demo.hpodlb("once") == 1)
    time.sleep(2.5)  # the absence guard wants 2 passes, an interval (2 s) apart
    demo.expect("a pass one interval later removes it", demo.hpodlb("once") == 0)


def a_half_written_file_changes_nothing(demo: Demo) -> None:
    step("HyperPod writes a half-finished resource config")
    whole = demo.rc_path.read_text()
    demo.rc_path.write_text(whole[: len(whole) // 3])
    before = demo.targets()
    demo.expect("the pass refuses it (exit 2) ...", demo.hpodlb("once") == 2)
    demo.expect(f"... and no target moved: {demo.targets()}", demo.targets() == before)


def a_node_leaves_cautiously(demo: Demo) -> None:
    step("A login node is removed from the cluster")
    demo.cluster.nodes.pop(demo.cluster.ip(4)).stop()
    demo.list_nodes()
    demo.expect("held for one pass (deregister cautiously)", demo.hpodlb("once") == 1)
    time.sleep(2.5)
    demo.expect("deregistered on the second, an interval later", demo.hpodlb("once") == 0)
    demo.expect(f"target group = login nodes: {demo.targets()}", len(demo.targets()) == 3)


def the_daemon_reacts(demo: Demo) -> None:
    step("The service: `hpodlb run` reacts to a new login node without waiting for its interval")
    demo.expect(
        "the daemon registers it within seconds, then stops cleanly on SIGTERM",
        demo.run_daemon_until_new_node(demo.cluster.ip(6), "i-0a1b2c3d4e5f60016") == 0,
    )


def what_an_admin_sees(demo: Demo) -> None:
    step("What an admin sees, and the lines to hand users")
    demo.hpodlb("status")
    demo.hpodlb("keys", "show")
    demo.hpodlb("keys", "known-hosts", "--host", "smhp-login-node-lb.internal")


SCENES: tuple[Callable[[Demo], None], ...] = (
    nodes_get_one_identity_and_join,
    a_new_node_joins,
    a_replaced_node_is_repaired,
    drift_is_pruned,
    a_half_written_file_changes_nothing,
    a_node_leaves_cautiously,
    the_daemon_reacts,
    what_an_admin_sees,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--keep", action="store_true", help="keep the work dir for a look after")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print(
            "the demo runs real sshd login nodes in mount namespaces: run it as root",
            file=sys.stderr,
        )
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="hpodlb-demo-"))
    workdir.chmod(0o755)  # the simulated login user must reach its home below it
    try:
        return run_demo(workdir)
    finally:
        if args.keep:
            keep(workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def keep(workdir: Path) -> None:
    """Leave the work dir usable by `hpodlb status`, and say, last, exactly how to run it.

    status reads the config and the state file only; load_config needs the config file itself
    (root-owned, not writable by others) and every file it names is still here: resource config,
    key store, state dir and a copy of the SSH key. The AWS emulator and the login nodes are gone.
    """
    config = workdir / "config.toml"
    if not config.exists():  # the demo failed before writing it
        print(f"work dir kept: {workdir}")
        return
    with config.open("a") as out:
        out.write(
            "\n# Kept by `./dev demo --keep`. The AWS emulator and the login nodes are gone:\n"
            "# `status` and `keys show` work here; plan, once and check-config have nothing to reach.\n"
        )
    script = Path(sys.executable).with_name("hpodlb")
    hpodlb = str(script) if script.exists() else f"{sys.executable} -m hpodlb"
    print(f"\nWork dir kept; what the last pass saw: {hpodlb} status --config {config}")


if __name__ == "__main__":
    sys.exit(main())
