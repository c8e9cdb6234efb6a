"""Shared fixtures: config files written the way an admin writes them, and fixture inventories."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sim.env import render_config

FIXTURES = Path(__file__).parent / "fixtures"
TG_ARN = "arn:aws:elasticloadbalancing:us-west-2:123456789012:targetgroup/smhp-login-node-tg/0123456789abcdef"


@pytest.fixture
def cluster_dir(tmp_path: Path) -> Path:
    """A copy of the fixtures as /opt/ml/config would hold them."""
    d = tmp_path / "opt-ml-config"
    d.mkdir()
    for f in FIXTURES.glob("*.json"):
        shutil.copy(f, d / f.name)
    return d


@pytest.fixture
def write_config(tmp_path: Path, cluster_dir: Path) -> Callable[..., Path]:
    """Write a config file; keyword sections override the test defaults (host keys off)."""

    def write(target_groups: list[dict[str, Any]] | None = None, **sections: dict[str, Any]) -> Path:
        base: dict[str, dict[str, Any]] = {
            "cluster": {
                "resource_config": str(cluster_dir / "resource_config.json"),
                "provisioning_parameters": str(cluster_dir / "provisioning_parameters.json"),
                "leader": "always",  # one head; the tests of several heads set it
            },
            "host_keys": {"enabled": False},
            "state": {"dir": str(tmp_path / "state")},
        }
        for name, keys in sections.items():
            base.setdefault(name, {}).update(keys)
        path = tmp_path / "config.toml"
        path.write_text(render_config(base, target_groups or [{"arn": TG_ARN, "port": 22}]))
        return path

    return write


@pytest.fixture
def fresh_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No HPODLB_* variables from the developer's shell leak into a test."""
    import os

    for var in [v for v in os.environ if v.startswith("HPODLB_")]:
        monkeypatch.delenv(var)
    yield


@pytest.fixture
def moto_env(fresh_env: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """moto in-process (`mock_aws`), with fake credentials and no endpoint from the shell."""
    from moto import mock_aws

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        yield


@pytest.fixture
def elb(moto_env: None) -> Any:
    """An elbv2 client on in-process moto, configured as the daemon's is."""
    import boto3

    from hpodlb.targets import boto_config

    return boto3.client("elbv2", region_name="us-west-2", config=boto_config())


@pytest.fixture
def sim_env(fresh_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """Its own moto server and sshd login nodes (none yet), with this process's AWS env set."""
    import tempfile

    from sim.aws import moto_server
    from sim.env import SimEnv
    from sim.nodes import sim_cluster

    # Not under pytest's tmp dir: that is 0700 root, and the login user must reach its home.
    base = Path(tempfile.mkdtemp(prefix="hpodlb-sim-"))
    with moto_server() as aws, sim_cluster(base) as cluster:
        for key, value in aws.env().items():
            monkeypatch.setenv(key, value)
        yield SimEnv(aws, cluster, tmp_path)


@pytest.fixture(scope="module")
def aws() -> Iterator[Any]:
    """One moto server on loopback for a whole test module (tests that change AWS's environment
    variables define their own)."""
    from sim.aws import moto_server

    with moto_server() as fake:
        yield fake


@pytest.fixture
def arn(aws: Any) -> str:
    """A fresh login NLB and target group per test, on the module's moto server."""
    return str(aws.create_login_nlb(name=f"t{uuid.uuid4().hex[:12]}"))


def credentials_denied(action: str) -> dict[str, str]:
    """In moto (in-process): an IAM user allowed everything but `action`; its access key."""
    import json

    import boto3

    iam = boto3.client("iam", region_name="us-east-1")
    iam.create_user(UserName="head-node")
    policy = iam.create_policy(PolicyName="hpodlb", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "*", "Resource": "*"},
            {"Effect": "Deny", "Action": action, "Resource": "*"}]}))
    iam.attach_user_policy(UserName="head-node", PolicyArn=policy["Policy"]["Arn"])
    key = iam.create_access_key(UserName="head-node")["AccessKey"]
    return {"aws_access_key_id": key["AccessKeyId"], "aws_secret_access_key": key["SecretAccessKey"]}


def enforce_iam(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on moto checks every call against IAM (it lets all through by default)."""
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    monkeypatch.setattr(ActionAuthenticatorMixin, "request_count", 0)


# Figures the reliability suite measured, printed at the end of the run (docs/design.md quotes them).
FIGURES: dict[str, str] = {}


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("reliability figures")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {value}")
