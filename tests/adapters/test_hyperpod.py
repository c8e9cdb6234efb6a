"""HyperPod-native (issue 16): clusters configured through the API (login groups from DescribeCluster),
the platform's node status, and provisioning from the cluster's own VPC config; against moto's
SageMaker (CreateCluster, DescribeCluster, ListClusterNodes) in-process.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest

from hpodlb.checks import run_checks
from hpodlb.config import load_config
from hpodlb.hyperpod import HyperPod
from hpodlb.logs import setup_logging
from hpodlb.reconcile import Reconciler
from hpodlb.report import status_text
from hpodlb.state import State
from hpodlb.targets import TargetGroup
from sim.env import SimEnv
from tests.support.aws import credentials_denied, enforce_iam, make_group

REGION = "us-west-2"
LOGIN_IPS = {"10.1.71.12", "10.1.72.45", "10.1.70.201"}


def create_cluster(name: str = "ml-cluster", login_group: str = "login-a", sm: Any = None) -> str:
    """A cluster defined the way SageMaker now recommends: each group's Slurm role in its config."""
    sm = sm or boto3.client("sagemaker", region_name=REGION)

    def group(name: str, node_type: str, count: int) -> dict[str, Any]:
        return {
            "InstanceGroupName": name,
            "InstanceType": "ml.m5.4xlarge",
            "InstanceCount": count,
            "LifeCycleConfig": {
                "SourceS3Uri": "s3://sagemaker-lifecycle/",
                "OnCreate": "on_create.sh",
            },
            "ExecutionRole": "arn:aws:iam::123456789012:role/hyperpod",
            "ThreadsPerCore": 1,
            "SlurmConfig": {"NodeType": node_type},
        }

    return str(
        sm.create_cluster(
            ClusterName=name,
            InstanceGroups=[
                group("controller-machine", "Controller", 1),
                group(login_group, "Login", 3),
                group("compute-nodes", "Compute", 2),
            ],
            VpcConfig={
                "SecurityGroupIds": ["sg-0123456789abcdef0"],
                "Subnets": ["subnet-0123456789abcdef0"],
            },
        )["ClusterArn"]
    )


def api_configured(cluster_dir: Path, arn: str, login_group: str = "login-a") -> None:
    """The resource config of such a cluster (its login group not called login-group), and no
    provisioning_parameters.json."""
    path = cluster_dir / "resource_config.json"
    data = json.loads(path.read_text())
    data["ClusterConfig"]["ClusterArn"] = arn
    for g in data["InstanceGroups"]:
        if g["Name"] == "login-group":
            g["Name"] = login_group
    path.write_text(json.dumps(data))
    (cluster_dir / "provisioning_parameters.json").unlink()


def counting(client: Any) -> list[str]:
    seen: list[str] = []
    client.meta.events.register(
        "before-call.sagemaker.*", lambda model, **_: seen.append(model.name)
    )
    return seen


@pytest.fixture
def build(
    elb: Any, write_config: Callable[..., Path]
) -> Callable[..., tuple[Reconciler, list[str], str]]:
    def make(**sections: dict[str, Any]) -> tuple[Reconciler, list[str], str]:
        tg = make_group(elb)
        config = load_config(write_config([{"arn": tg, "port": 22}], **sections), {})
        sm = boto3.client("sagemaker", region_name=REGION)
        rec = Reconciler(
            config,
            [TargetGroup(elb, tg, 22)],
            keys=None,
            boot_id="b",
            hyperpod=HyperPod(lambda _arn: sm),
        )
        return rec, counting(sm), tg

    return make


def test_login_groups_come_from_the_cluster_when_nothing_names_them(
    moto_env: None,
    build: Callable[..., tuple[Reconciler, list[str], str]],
    elb: Any,
    cluster_dir: Path,
) -> None:
    """No login_groups, no provisioning_parameters.json, a login group called login-a: the pass
    asks DescribeCluster once (not every pass), registers login-a's nodes, and check-config and
    status say where the group came from."""
    arn = create_cluster()
    api_configured(cluster_dir, arn)
    rec, calls, tg = build()
    state = State()
    for _ in range(3):
        outcome = rec.run_pass(state, apply=True)
        assert outcome.converged, (outcome.errors, outcome.inventory_error)
    assert calls == ["DescribeCluster"]
    registered = {
        d["Target"]["Id"]
        for d in elb.describe_target_health(TargetGroupArn=tg)["TargetHealthDescriptions"]
    }
    assert registered == LOGIN_IPS
    where = f"login-a (from the cluster's Login instance groups, DescribeCluster {arn})"
    assert f"login groups: {where}" in status_text(state, [tg], 0).splitlines()
    assert (
        True,
        f"login groups login-a (from the cluster's Login instance groups, DescribeCluster {arn})",
    ) in list(run_checks(rec.config, rec))

    data = json.loads((cluster_dir / "resource_config.json").read_text())
    data["InstanceGroups"].append(
        {"Name": "login-b", "Instances": []}
    )  # the groups changed: ask again
    (cluster_dir / "resource_config.json").write_text(json.dumps(data))
    rec.run_pass(state, apply=True)
    assert calls == ["DescribeCluster", "DescribeCluster"]  # check-config used the cached answer


def test_denied_describe_cluster_never_guesses_a_group_that_empties_the_target_group(
    moto_env: None,
    build: Callable[..., tuple[Reconciler, list[str], str]],
    elb: Any,
    cluster_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    write_config: Callable[..., Path],
) -> None:
    """sagemaker:DescribeCluster denied (moto enforcing IAM): one warning naming the permission;
    with no group called login-group in the resource config the pass changes nothing, targets
    registered before stay; once the admin names the group, it works."""
    from moto import settings

    arn = create_cluster()
    api_configured(cluster_dir, arn)
    rec, _, tg = build(cluster={"login_groups": ["login-a"]})
    assert rec.run_pass(State(), apply=True).converged  # registered while the group was named
    sm = boto3.client(
        "sagemaker", region_name=REGION, **credentials_denied("sagemaker:DescribeCluster")
    )  # type: ignore[call-overload]
    config = load_config(write_config([{"arn": tg, "port": 22}]), {})  # the group named nowhere
    denied = Reconciler(
        config, rec.groups, keys=None, boot_id="b", hyperpod=HyperPod(lambda _arn: sm)
    )
    enforce_iam(monkeypatch)
    log = io.StringIO()
    setup_logging(verbose=False, stream=log)
    state = State()
    outcomes = [denied.run_pass(state, apply=True) for _ in range(3)]
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", float("inf"))
    assert all(
        o.inventory_error and "no group named login-group" in o.inventory_error for o in outcomes
    )
    assert all(o.applied == [] for o in outcomes)
    registered = {
        d["Target"]["Id"]
        for d in elb.describe_target_health(TargetGroupArn=tg)["TargetHealthDescriptions"]
    }
    assert registered == LOGIN_IPS
    events = [json.loads(x) for x in log.getvalue().splitlines()]
    warned = [e for e in events if e["event"] == "cluster_login_groups_unknown"]
    assert len(warned) == 1 and warned[0]["error"].startswith("sagemaker:DescribeCluster: ")
    assert "not authorized to perform: sagemaker:DescribeCluster" in warned[0]["error"]
    assert "grant sagemaker:DescribeCluster" in warned[0]["fix"]


def test_the_platform_explains_an_unreachable_node_and_keeps_keys_from_one_going_away(
    sim_env: SimEnv,
) -> None:
    """Two login nodes that do not present the canonical keys: HyperPod says one is ShuttingDown
    (no push to it; it waits, saying why) and the other Pending (unreachable; status says it is
    being replaced). ListClusterNodes is asked once, not again while the same nodes wait (until
    5 minutes pass); then the first is Running, so it is pushed to and registered. Settled, the
    cluster is not asked, and no stale word stays in status."""
    from moto.sagemaker.models import sagemaker_backends

    from hpodlb.state import load_state, save_state
    from hpodlb.wiring import build_reconciler

    env = sim_env
    sm = env.aws.client("sagemaker")
    arn = create_cluster(name="sim-cluster", login_group="login-group", sm=sm)
    going, pending = env.cluster.ip(2), env.cluster.ip(3)
    env.cluster.add_node(going, "login-group-0")  # its own keys: a push would be due
    env.cluster.add_node(pending, "login-group-1", start=False)  # nothing answers yet
    env.list_nodes([going, pending])
    data = json.loads(env.rc.read_text())
    data["ClusterConfig"]["ClusterArn"] = arn
    env.rc.write_text(json.dumps(data))
    assert (
        subprocess.run(
            [sys.executable, "-m", "hpodlb", "keys", "generate", "--config", str(env.config_path)],
            capture_output=True,
            check=False,
        ).returncode
        == 0
    )
    nodes = sagemaker_backends["123456789012"][REGION].clusters["sim-cluster"].nodes  # moto has no
    nodes["login-group-0"].status = "ShuttingDown"  # API to change an instance's status: set it
    nodes["login-group-1"].status = "Pending"
    rec = build_reconciler(env.config)
    rec.hyperpod = HyperPod(lambda _arn: sm)
    calls = counting(sm)
    later = [0.0]
    rec.clock = lambda: time.monotonic() + later[0]

    def run_pass() -> Any:
        state, _ = load_state(env.state_dir)
        outcome = rec.run_pass(state, apply=True)
        save_state(env.state_dir, state)
        return outcome

    outcome = run_pass()
    assert outcome.applied == [] and outcome.plan is not None
    assert (going, "HyperPod is shutting this instance down: no key push") in [
        (w.node.ip, w.reason) for w in outcome.plan.waiting
    ]
    state = env.state()
    assert (state.nodes[going].platform_status, state.nodes[pending].platform_status) == (
        "ShuttingDown",
        "Pending",
    )
    rows = {
        line.split()[0]: line
        for line in status_text(state, [env.arn], 0).splitlines()
        if line.split()[0] in (going, pending)
    }
    assert rows[pending].endswith("(being replaced: Pending)")
    assert env.registered() == set()
    assert calls == ["ListClusterNodes"]

    nodes["login-group-0"].status = "Running"
    assert run_pass().applied == [] and calls == [
        "ListClusterNodes"
    ]  # the same nodes wait: not asked
    later[0] = 301.0
    again = run_pass()
    assert [a.kind.value for a in again.applied if a.ip == going] == ["push-keys", "register"]
    assert env.registered() == {going} and calls == ["ListClusterNodes"] * 2

    env.list_nodes([going])  # the Pending one leaves: every login node is in sync
    run_pass()
    assert calls == ["ListClusterNodes"] * 2 and env.state().nodes[going].platform_status == ""


def test_describe_clusters_last_answer_is_kept_for_when_it_cannot_be_asked(
    moto_env: None,
    build: Callable[..., tuple[Reconciler, list[str], str]],
    elb: Any,
    cluster_dir: Path,
) -> None:
    """Two Login groups, then DescribeCluster fails after a restart: its last answer (in the state
    file) keeps both groups, so nothing is deregistered; it is not asked again every pass."""
    sm = boto3.client("sagemaker", region_name=REGION)
    arn = create_cluster()
    sm_groups = sm.describe_cluster(ClusterName=arn)["InstanceGroups"]
    assert [g["SlurmConfig"]["NodeType"] for g in sm_groups] == ["Controller", "Login", "Compute"]
    api_configured(cluster_dir, arn)
    rec, _, tg = build()
    state = State()
    assert rec.run_pass(state, apply=True).converged
    assert state.cluster_login_groups == {arn: ["login-a"]}

    from botocore.config import Config

    dead = boto3.client(
        "sagemaker",
        region_name=REGION,
        endpoint_url="http://127.0.0.1:9",
        config=Config(retries={"total_max_attempts": 1}),
    )
    calls = counting(dead)
    broken = Reconciler(
        rec.config, rec.groups, keys=None, boot_id="b", hyperpod=HyperPod(lambda _arn: dead)
    )
    for _ in range(3):
        outcome = broken.run_pass(state, apply=True)
        assert outcome.converged and outcome.applied == []
    assert calls == ["DescribeCluster"]  # once, then not before CLUSTER_RETRY_SECONDS
    assert state.last_pass is not None
    assert state.last_pass.login_groups.startswith(
        f"login-a (from DescribeCluster's last answer for {arn} (now: "
    )
    registered = {
        d["Target"]["Id"]
        for d in elb.describe_target_health(TargetGroupArn=tg)["TargetHealthDescriptions"]
    }
    assert registered == LOGIN_IPS
