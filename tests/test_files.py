"""Files hpodlb reads and writes, through the real command: special files."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hpodlb.keystore import KeyStore, generate
from sim.aws import FakeAws, moto_server

Hpodlb = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def aws() -> Iterator[FakeAws]:
    with moto_server() as fake:
        yield fake


@pytest.fixture
def arn(aws: FakeAws) -> str:
    return aws.create_login_nlb(name=f"t{uuid.uuid4().hex[:12]}")


def _limit_memory() -> None:
    # Should a read ever be unbounded again, it fails fast here instead of swapping the machine.
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


@pytest.fixture
def hpodlb(aws: FakeAws, fresh_env: None) -> Hpodlb:
    def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HPODLB_", "AWS_"))}
        env.update(aws.env())
        return subprocess.run(
            [sys.executable, "-m", "hpodlb", *args], env=env, capture_output=True, text=True,
            timeout=timeout, check=False, preexec_fn=_limit_memory,
        )

    return run


def _fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path, 0o600)


# -- special files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["resource_config.json", "provisioning_parameters.json"])
def test_a_fifo_as_a_hyperpod_file_is_an_error_not_a_hang(
    hpodlb: Hpodlb, write_config: Callable[..., Path], cluster_dir: Path, arn: str, which: str,
) -> None:
    """`plan` with a FIFO as the resource config or provisioning parameters exits 2 at once, with
    one line naming the file."""
    config = write_config([{"arn": arn, "port": 22}])
    _fifo(cluster_dir / which)
    out = hpodlb("plan", "--config", str(config))
    assert out.returncode == 2, out.stderr
    said = [line for line in out.stderr.splitlines() if line.startswith("hpodlb: ")]
    assert said == [f"hpodlb: cannot plan: {cluster_dir / which}: cannot read: not a regular file (a FIFO)"]


def test_a_fifo_as_the_config_file_is_an_error_not_a_hang(hpodlb: Hpodlb, tmp_path: Path) -> None:
    """A FIFO given as the config file is a config error naming it, not a hang."""
    _fifo(tmp_path / "config.toml")
    out = hpodlb("check-config", "--config", str(tmp_path / "config.toml"))
    assert out.returncode == 2
    assert f"{tmp_path / 'config.toml'}: cannot read: not a regular file (a FIFO)" in out.stderr


@pytest.mark.parametrize(
    ("name", "plant"),
    [
        ("ssh_host_ed25519_key.pub", _fifo),
        ("ssh_host_ed25519_key", _fifo),
        ("ssh_host_ed25519_key.pub", lambda p: (p.unlink(), p.symlink_to("/dev/zero"))),
    ],
    ids=["pub-fifo", "private-fifo", "pub-dev-zero"],
)
def test_special_files_in_the_key_store_are_errors(
    hpodlb: Hpodlb, write_config: Callable[..., Path], tmp_path: Path, name: str,
    plant: Callable[[Path], object],
) -> None:
    """A FIFO or a link to /dev/zero in the key store makes `keys show` fail with the file's name,
    neither hanging nor reading without end."""
    store = tmp_path / "keys"
    KeyStore(store, ("ed25519",)).save({"ed25519": generate("ed25519")}, overwrite=False)
    config = write_config(host_keys={"enabled": True, "store": str(store), "types": ["ed25519"]})
    plant(store / name)
    out = hpodlb("keys", "show", "--config", str(config))
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"{store / name}: cannot read: not a regular file" in out.stderr
    assert "MemoryError" not in out.stderr


def test_a_fifo_as_the_state_file_starts_from_an_empty_state(
    hpodlb: Hpodlb, write_config: Callable[..., Path], tmp_path: Path,
) -> None:
    """`status` with a FIFO where state.json belongs says why it is unusable, and does not hang."""
    config = write_config()
    (tmp_path / "state").mkdir(mode=0o700)
    _fifo(tmp_path / "state" / "state.json")
    out = hpodlb("status", "--config", str(config))
    assert out.returncode == 0
    assert "state.json: cannot read: not a regular file (a FIFO)" in out.stdout
