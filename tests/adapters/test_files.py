"""Files hpodlb reads and writes, through the real command: special files, the state dir, the lock."""

from __future__ import annotations

import os
import resource
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from hpodlb.keystore import KeyStore, generate
from sim.aws import FakeAws

Hpodlb = Callable[..., subprocess.CompletedProcess[str]]
NOBODY = 65534


def _limit_memory() -> None:
    # Should a read ever be unbounded again, it fails fast here instead of swapping the machine.
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


@pytest.fixture
def hpodlb(aws: FakeAws, fresh_env: None) -> Hpodlb:
    def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HPODLB_", "AWS_"))}
        env.update(aws.env())
        return subprocess.run(
            [sys.executable, "-m", "hpodlb", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            preexec_fn=_limit_memory,
        )

    return run


def _fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path, 0o600)


# -- special files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["resource_config.json", "provisioning_parameters.json"])
def test_a_fifo_as_a_hyperpod_file_is_an_error_not_a_hang(
    hpodlb: Hpodlb,
    write_config: Callable[..., Path],
    cluster_dir: Path,
    arn: str,
    which: str,
) -> None:
    """`plan` with a FIFO as the resource config or provisioning parameters exits 2 at once, with
    one line naming the file."""
    config = write_config([{"arn": arn, "port": 22}])
    _fifo(cluster_dir / which)
    out = hpodlb("plan", "--config", str(config))
    assert out.returncode == 2, out.stderr
    said = [line for line in out.stderr.splitlines() if line.startswith("hpodlb: ")]
    assert said == [
        f"hpodlb: cannot plan: {cluster_dir / which}: cannot read: not a regular file (a FIFO)"
    ]


def test_a_fifo_as_the_config_file_is_an_error_not_a_hang(hpodlb: Hpodlb, tmp_path: Path) -> None:
    """A FIFO given as the config file is a config error naming it, not a hang."""
    _fifo(tmp_path / "config.toml")
    out = hpodlb("check-config", "--config", str(tmp_path / "config.toml"))
    assert out.returncode == 2
    assert f"{tmp_path / 'config.toml'}: cannot read: not a regular file (a FIFO)" in out.stderr


@pytest.mark.parametrize(
    ("name", "plant", "said"),
    [
        ("ssh_host_ed25519_key.pub", _fifo, "cannot read: not a regular file (a FIFO)"),
        ("ssh_host_ed25519_key", _fifo, "cannot read: not a regular file (a FIFO)"),
        (
            "ssh_host_ed25519_key.pub",
            lambda p: (p.unlink(), p.symlink_to("/dev/zero")),
            "cannot open: a symbolic link, never followed here",
        ),
    ],
    ids=["pub-fifo", "private-fifo", "pub-dev-zero"],
)
def test_special_files_in_the_key_store_are_errors(
    hpodlb: Hpodlb,
    write_config: Callable[..., Path],
    tmp_path: Path,
    name: str,
    plant: Callable[[Path], object],
    said: str,
) -> None:
    """A FIFO or a link to /dev/zero in the key store makes `keys show` fail with the file's name,
    neither hanging nor reading without end."""
    store = KeyStore(tmp_path / "keys", ("ed25519",))
    store.install({"ed25519": generate("ed25519")}, keep_previous=False)
    current = store.set_dir()
    assert current is not None
    config = write_config(
        host_keys={"enabled": True, "store": str(store.path), "types": ["ed25519"]}
    )
    plant(current / name)
    out = hpodlb("keys", "show", "--config", str(config))
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"{current / name}: {said}" in out.stderr
    assert "MemoryError" not in out.stderr


def test_a_fifo_as_the_state_file_starts_from_an_empty_state(
    hpodlb: Hpodlb,
    write_config: Callable[..., Path],
    tmp_path: Path,
) -> None:
    """`status` with a FIFO where state.json belongs says why it is unusable, and does not hang."""
    config = write_config()
    (tmp_path / "state").mkdir(mode=0o700)
    _fifo(tmp_path / "state" / "state.json")
    out = hpodlb("status", "--config", str(config))
    assert out.returncode == 0
    assert "state.json: cannot read: not a regular file (a FIFO)" in out.stdout


# -- the state dir and the lock ---------------------------------------------------------------------


def test_a_state_dir_an_ordinary_user_owns_is_refused(
    hpodlb: Hpodlb,
    write_config: Callable[..., Path],
    arn: str,
    tmp_path: Path,
) -> None:
    """check-config, once and run refuse a state dir owned by another user, and the lock file that
    user planted as a symlink never makes root truncate its target."""
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    victim = tmp_path / "precious"
    victim.write_text("root's own data\n")
    (state / "hpodlb.lock").symlink_to(victim)
    os.lchown(state / "hpodlb.lock", NOBODY, NOBODY)
    os.chown(state, NOBODY, NOBODY)
    config = str(write_config([{"arn": arn, "port": 22}]))

    check = hpodlb("check-config", "--config", config)
    assert check.returncode == 1, check.stdout
    assert f"FAIL  state dir: {state} is owned by uid {NOBODY}, not root" in check.stdout
    for command in ("once", "run"):
        out = hpodlb(command, "--config", config)
        assert out.returncode == 1, out.stdout + out.stderr
        assert f"state dir: {state} is owned by uid {NOBODY}" in out.stderr
    assert victim.read_text() == "root's own data\n"
    assert not (state / "state.json").exists()


def test_the_lock_is_never_a_symlink_and_never_open_to_others(
    hpodlb: Hpodlb,
    write_config: Callable[..., Path],
    arn: str,
) -> None:
    """A symlink where the lock belongs is refused, not followed; the lock `once` leaves behind is
    0600 (also one an older hpodlb left 0644), so no other user can hold its flock."""
    base = Path(tempfile.mkdtemp(prefix="hpodlb-lock-"))  # world-traversable, unlike pytest's tmp
    try:
        base.chmod(0o755)
        state = base / "state"
        state.mkdir(mode=0o755)
        victim = base / "precious"
        victim.write_text("root's own data\n")
        lock = state / "hpodlb.lock"
        lock.symlink_to(victim)
        config = str(write_config([{"arn": arn, "port": 22}], state={"dir": str(state)}))
        out = hpodlb("once", "--config", config)
        assert out.returncode == 1
        assert f"{lock}: cannot open: a symbolic link, never followed here" in out.stderr
        assert victim.read_text() == "root's own data\n"

        lock.unlink()
        lock.write_text("")
        lock.chmod(0o644)
        out = hpodlb("once", "--config", config)
        assert out.returncode == 0, out.stdout + out.stderr
        assert stat.S_IMODE(lock.stat().st_mode) == 0o600
        grab = subprocess.run(
            ["flock", "--nonblock", str(lock), "true"],
            user=NOBODY,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert grab.returncode != 0
        assert "Permission denied" in grab.stderr
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=True)


def test_check_config_says_a_missing_state_dir_will_be_created(
    hpodlb: Hpodlb,
    write_config: Callable[..., Path],
    arn: str,
    tmp_path: Path,
) -> None:
    """A state dir that does not exist yet is reported as such, not as writable, and the first
    pass creates it 0700."""
    state = tmp_path / "var" / "lib" / "hpodlb"
    config = str(write_config([{"arn": arn, "port": 22}], state={"dir": str(state)}))
    check = hpodlb("check-config", "--config", config)
    assert check.returncode == 0, check.stdout
    assert (
        f"ok    state dir {state} does not exist yet; will be created 0700 by the first pass"
        in check.stdout
    )
    assert not state.exists()
    assert hpodlb("once", "--config", config).returncode == 0
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
