"""The sandbox's and the demo's configs name every path on this machine inside their work dir
(issue 23, item 12); `tests/e2e/test_sandbox.py` runs the sandbox and its commands and watches
the machine's directories."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpodlb.config import load_config
from sim import demo, sandbox
from sim.env import render_config
from sim.workdir import paths_outside, require_inside
from tests.support.aws import TG_ARN


def test_every_path_of_a_config_on_this_machine_is_judged(tmp_path: Path) -> None:
    """A config left at its defaults is a head node's: each of its paths here is named (the
    login nodes' remote_dir is not a path here), and a metrics textfile too once set."""
    path = tmp_path / "config.toml"
    path.write_text(
        render_config({"metrics": {"textfile": "/srv/prom/hpodlb.prom"}}, [{"arn": TG_ARN}])
    )
    assert paths_outside(load_config(path, {}), tmp_path) == [
        "cluster.resource_config = /opt/ml/config/resource_config.json",
        "cluster.provisioning_parameters = /opt/ml/config/provisioning_parameters.json",
        "ssh.key_file = /home/ubuntu/.ssh/id_rsa",
        "host_keys.store = /etc/hpodlb/host_keys",
        "state.dir = /var/lib/hpodlb",
        "metrics.textfile = /srv/prom/hpodlb.prom",
    ]
    with pytest.raises(SystemExit, match=r"outside the work dir .*host_keys.store = /etc/hpodlb"):
        require_inside(path, tmp_path)


def test_the_sandbox_and_demo_configs_stay_in_their_work_dir(tmp_path: Path) -> None:
    """Their config writers: nothing outside the work dir, the key store inside it."""
    for made in (
        sandbox.write_config(tmp_path, TG_ARN),
        demo.write_config(tmp_path, TG_ARN, 2222, tmp_path / "ssh" / "id_ed25519"),
    ):
        config = load_config(made, {})
        assert paths_outside(config, tmp_path) == []
        assert config.host_keys.store == tmp_path / "host_keys"
        assert config.state.dir == tmp_path / "state"
