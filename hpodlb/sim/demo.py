"""`./dev demo`: hpodlb's main job, end to end, against the embedded local setup.

An AWS emulator (moto server on loopback) holds an internal NLB and its target group; a generated
resource config lists the login nodes. The demo runs the real `hpodlb` command against them as an
admin would (`AWS_ENDPOINT_URL` points boto3 at the emulator) and narrates what happens: nodes join,
a hand-added target is pruned, a node leaves (cautiously), and a half-written file changes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from hpodlb.sim.aws import FakeAws, moto_server

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


class Demo:
    def __init__(self, aws: FakeAws, workdir: Path) -> None:
        self.aws = aws
        self.workdir = workdir
        self.rc_path = workdir / "opt-ml-config" / "resource_config.json"
        self.rc_path.parent.mkdir()
        self.arn = aws.create_login_nlb()
        self.config = workdir / "config.toml"
        self.config.write_text(
            f"""[cluster]
resource_config = "{self.rc_path}"
provisioning_parameters = "{self.rc_path.parent / "provisioning_parameters.json"}"
login_groups = ["login-group"]

[[target_groups]]
arn = "{self.arn}"
port = 22

[host_keys]
enabled = false

[state]
dir = "{workdir / "state"}"
"""
        )

    def write_nodes(self, nodes: dict[str, str]) -> None:
        tmp = self.rc_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(resource_config(nodes), indent=2))
        tmp.replace(self.rc_path)

    def hpodlb(self, *args: str) -> int:
        print(f"\n$ hpodlb {' '.join(args)}", flush=True)
        env = {**os.environ, **self.aws.env(), "HPODLB_CONFIG": str(self.config)}
        done = subprocess.run([sys.executable, "-m", "hpodlb", *args], env=env, check=False)
        print(f"(exit status {done.returncode})", flush=True)
        return done.returncode

    def targets(self) -> str:
        return ", ".join(sorted(ip for ip, _ in self.aws.targets(self.arn))) or "(none)"


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def run_demo(workdir: Path) -> int:
    """The scripted story; returns 0 when every step ended as it should."""
    failures: list[str] = []

    def expect(what: str, ok: bool) -> None:
        print(f"--> {'ok' if ok else 'UNEXPECTED'}: {what}", flush=True)
        if not ok:
            failures.append(what)

    with moto_server() as aws:
        demo = Demo(aws, workdir)
        nodes = {
            "10.1.71.12": "i-0a1b2c3d4e5f60011",
            "10.1.72.45": "i-0a1b2c3d4e5f60012",
            "10.1.70.201": "i-0a1b2c3d4e5f60013",
        }
        demo.write_nodes(nodes)
        step(
            f"An empty target group and a cluster with 3 login nodes (emulator at {aws.endpoint_url})"
        )
        expect("plan reports pending changes (exit 1)", demo.hpodlb("plan") == 1)
        expect("one pass converges (exit 0)", demo.hpodlb("once") == 0)
        expect(f"target group = login nodes: {demo.targets()}", len(aws.targets(demo.arn)) == 3)

        step("HyperPod adds a 4th login node")
        nodes["10.1.73.9"] = "i-0a1b2c3d4e5f60014"
        demo.write_nodes(nodes)
        expect("registered in the very next pass", demo.hpodlb("once") == 0)

        step("Someone registers a stray target by hand (drift)")
        aws.client("elbv2").register_targets(
            TargetGroupArn=demo.arn, Targets=[{"Id": "10.1.99.99", "Port": 22}]
        )
        expect("first pass holds it back (absence 1/2, exit 1)", demo.hpodlb("once") == 1)
        expect("second pass removes it", demo.hpodlb("once") == 0)

        step("HyperPod writes a half-finished resource config")
        whole = demo.rc_path.read_text()
        demo.rc_path.write_text(whole[: len(whole) // 3])
        before = demo.targets()
        expect("the pass refuses it (exit 2) ...", demo.hpodlb("once") == 2)
        expect(f"... and no target moved: {demo.targets()}", demo.targets() == before)
        demo.rc_path.write_text(whole)

        step("A login node is removed from the cluster")
        del nodes["10.1.72.45"]
        demo.write_nodes(nodes)
        expect("held for one pass (deregister cautiously)", demo.hpodlb("once") == 1)
        expect("deregistered on the second", demo.hpodlb("once") == 0)
        expect(f"target group = login nodes: {demo.targets()}", len(aws.targets(demo.arn)) == 3)

        step("What an admin sees")
        demo.hpodlb("status")
    print(
        f"\nDemo {'finished: every step behaved' if not failures else 'FAILED: ' + '; '.join(failures)}"
    )
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--keep", action="store_true", help="keep the work dir for a look after")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="hpodlb-demo-"))
    try:
        return run_demo(workdir)
    finally:
        if args.keep:
            print(f"work dir kept: {workdir}")
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
