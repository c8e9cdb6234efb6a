"""Shared fixtures (config files written the way an admin writes them, fixture inventories, moto,
the simulated login nodes) and the layers: a test's directory says what it may need.

- `tests/unit`: no sshd, no process of the daemon; moto in-process at most. `./dev test fast`.
- `tests/adapters`: one adapter against its real part (moto over HTTP, a few real sshd nodes).
- `tests/e2e`: the daemon or a command as a process, many sshd nodes, a real slurmctld.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from sim.env import render_config
from tests.support.aws import TG_ARN
from tests.support.data import FIGURES, FIXTURES


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

    def write(
        target_groups: list[dict[str, Any]] | None = None, **sections: dict[str, Any]
    ) -> Path:
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


# Figures the reliability suite measured, printed at the end of the run (docs/design.md quotes them).


def pytest_sessionfinish(session: pytest.Session) -> None:
    """In an xdist worker: hand this worker's figures to the controller, which prints them all."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["figures"] = json.dumps(FIGURES)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    FIGURES.update(json.loads(getattr(node, "workeroutput", {}).get("figures", "{}")))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("reliability figures")
        for name, value in sorted(FIGURES.items()):
            terminalreporter.write_line(f"{name}: {value}")


# `./dev test fast` loads the "fast" profile: the generated-input tests then try a few hundred
# inputs instead of ten thousand (the full suite always runs them whole).
settings.register_profile("fast", max_examples=50)

LAYERS = ("unit", "adapters", "e2e")
# Fixtures that start real sshd login nodes or a real slurmctld, whatever the test's layer.
SSHD_FIXTURES = {"sim_env", "cluster"}
SLURM_FIXTURES = {"slurm"}


LAYER_ERROR = pytest.StashKey[str]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Markers from where a test lives and what it starts, so `-m` selections never depend on a
    file remembering its `pytestmark`; a unit test that starts sshd fails, it is no slow unit.
    Slow tests go first: run 4 at once, the suite then ends soon after its longest test."""
    here = Path(__file__).parent
    for item in items:
        parts = Path(str(item.fspath)).resolve().relative_to(here.resolve()).parts
        layer = parts[0] if parts[0] in LAYERS else None
        if layer is None:
            item.stash[LAYER_ERROR] = "tests live in tests/unit, tests/adapters or tests/e2e"
            continue
        item.add_marker(getattr(pytest.mark, layer))
        fixtures = set(getattr(item, "fixturenames", ()))
        sshd = bool(fixtures & SSHD_FIXTURES) or item.get_closest_marker("sshd") is not None
        if sshd and item.get_closest_marker("sshd") is None:
            item.add_marker(pytest.mark.sshd)
        if fixtures & SLURM_FIXTURES:
            item.add_marker(pytest.mark.slurmctld)
        if layer == "unit" and (sshd or fixtures & SLURM_FIXTURES):
            item.stash[LAYER_ERROR] = (
                "a unit test starts no sshd or slurmctld; move it to tests/adapters or tests/e2e"
            )
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test in the wrong layer fails with the reason, run alone or 4 at once (an error raised at
    collection reaches xdist's controller as an INTERNALERROR without it)."""
    if LAYER_ERROR in item.stash:
        pytest.fail(item.stash[LAYER_ERROR], pytrace=False)
