"""What a release promises an admin: one version everywhere, and the files to install inside it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import hpodlb
from hpodlb.commandline import EXAMPLES

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
# What `hpodlb example NAME` prints, and the file in the repository it must equal.
SHIPPED = {
    "unit": "systemd/hpodlb.service",
    "config": "config/hpodlb.toml",
    "iam-policy": "config/iam-policy.json",
    "alerts": "config/alerts.yml",
    "dashboard": "config/grafana-dashboard.json",
}


def hpodlb_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hpodlb", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "HPODLB_CONFIG": "/nonexistent"},
    )


def project_version() -> str:
    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])


def test_version_is_pyprojects() -> None:
    """`hpodlb --version` prints pyproject.toml's version, the installed package's only source."""
    out = hpodlb_command("--version")
    assert (out.returncode, out.stdout, out.stderr) == (0, f"hpodlb {project_version()}\n", "")
    assert hpodlb.__version__ == project_version()


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_example_prints_the_shipped_file(name: str) -> None:
    """`hpodlb example NAME` prints the repository's file byte for byte, with no config at all."""
    out = hpodlb_command("example", name)
    assert (out.returncode, out.stderr) == (0, "")
    assert out.stdout == (REPO / SHIPPED[name]).read_text()


def test_every_shipped_file_is_tested() -> None:
    """The command offers exactly the files this test compares."""
    assert set(EXAMPLES) == set(SHIPPED)


def test_constraints_pin_every_runtime_dependency() -> None:
    """constraints.txt pins each dependency pyproject.toml names (for this Python) to a version
    its specifier allows: a new dependency, or a raised floor, means `./dev constraints` again."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            pin = Requirement(line)  # a pin may carry a marker (tomli: Python 3.10 only)
            if pin.marker is None or pin.marker.evaluate():
                (version,) = (s.version for s in pin.specifier)
                pins[canonicalize_name(pin.name)] = version
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for req in map(Requirement, project["dependencies"]):
        if req.marker is None or req.marker.evaluate():
            assert canonicalize_name(req.name) in pins, req.name
            assert req.specifier.contains(pins[canonicalize_name(req.name)]), (
                req,
                pins[canonicalize_name(req.name)],
            )


def test_the_changelogs_top_entry_is_this_version() -> None:
    """CHANGELOG.md's first `## [X.Y.Z] - DATE` entry is pyproject.toml's version: what an admin
    reads about a release is the version they install."""
    entries = re.findall(
        r"^## \[([^\]]+)\] - \d{4}-\d{2}-\d{2}$", (REPO / "CHANGELOG.md").read_text(), re.M
    )
    assert entries, "no version entry"
    assert entries[0] == project_version() == hpodlb.__version__
    assert len(set(entries)) == len(entries)
