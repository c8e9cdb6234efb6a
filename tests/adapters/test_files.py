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


# -- who could have changed a file: every input, each rule ------------------------------------------


def _owned_by_nobody(path: Path) -> str:
    os.chown(path, NOBODY, NOBODY)
    return f"is owned by uid {NOBODY}, not root"


def _group_writable(path: Path) -> str:
    path.chmod(stat.S_IMODE(path.stat().st_mode) | stat.S_IWGRP)
    return f"is writable by group or others (mode {stat.S_IMODE(path.stat().st_mode):04o})"


def _world_writable(path: Path) -> str:
    path.chmod(stat.S_IMODE(path.stat().st_mode) | stat.S_IWOTH)
    return f"is writable by group or others (mode {stat.S_IMODE(path.stat().st_mode):04o})"


FILE_RULES = {"owner": _owned_by_nobody, "group": _group_writable, "world": _world_writable}


def _login_key(path: Path) -> Path:
    """A real key pair for ssh.key_file, made by ssh-keygen as an admin would, in a 0700 dir."""
    path.parent.mkdir(mode=0o700, exist_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return path


@pytest.mark.parametrize("rule", sorted(FILE_RULES))
def test_every_input_someone_else_could_change_is_refused(
    hpodlb: Hpodlb,
    write_config: Callable[..., Path],
    cluster_dir: Path,
    arn: str,
    tmp_path: Path,
    rule: str,
) -> None:
    """Owned by another user, group-writable (the group alone), or world-writable: the config,
    the resource config, the provisioning parameters, the state dir, the dir above the key store
    and the SSH key (`ssh.key_file`) are each refused by `check-config`, with a line naming the
    path and the rule."""
    breaks = FILE_RULES[rule]
    store = tmp_path / "etc-hpodlb" / "host_keys"
    store.parent.mkdir(mode=0o755)
    KeyStore(store, ("ed25519",)).install({"ed25519": generate("ed25519")}, keep_previous=False)
    key = _login_key(tmp_path / "ssh" / "id_ed25519")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    config = write_config(
        [{"arn": arn, "port": 22}],
        host_keys={"enabled": True, "store": str(store), "types": ["ed25519"]},
        ssh={"key_file": str(key)},
    )
    good = hpodlb("check-config", "--config", str(config))
    assert good.returncode == 0, good.stdout + good.stderr

    said = breaks(config)
    out = hpodlb("check-config", "--config", str(config))
    assert (out.returncode, out.stderr.splitlines()) == (
        2,
        [f"hpodlb: config error: {config} {said}; refusing to trust it"],
    )
    config.chmod(0o600)
    os.chown(config, 0, 0)

    pp = cluster_dir / "provisioning_parameters.json"
    expected = [
        f"FAIL  login groups: {pp} {breaks(pp)}; refusing to trust it",
        f"FAIL  state dir: {state} {breaks(state)}; refusing to trust it",
        f"FAIL  key store: {store}: {store.parent} {breaks(store.parent)}; refusing to trust it",
        f"FAIL  ssh.key_file {key} {breaks(key)}; refusing to trust it",
    ]
    out = hpodlb("check-config", "--config", str(config))
    assert out.returncode == 1, out.stderr
    assert [line for line in out.stdout.splitlines() if line.startswith("FAIL")] == expected

    rc = cluster_dir / "resource_config.json"
    config = write_config(  # the rest as sound as at first: only the resource config is read
        [{"arn": arn, "port": 22}],
        cluster={"login_groups": ["login-group"]},
        state={"dir": str(tmp_path / "sound-state")},
    )
    said = breaks(rc)
    out = hpodlb("check-config", "--config", str(config))
    assert [line for line in out.stdout.splitlines() if line.startswith("FAIL")] == [
        f"FAIL  resource config: {rc} {said}; refusing to trust it"
    ]


# -- the SSH key hpodlb logs in with --------------------------------------------------------------


def _passphrase_key(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(path)],
        check=True,
        capture_output=True,
    )


def _certified_key(path: Path) -> None:
    ca = path.parent / "user_ca"
    for made in (ca, path):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(made)],
            check=True,
            capture_output=True,
        )
    subprocess.run(
        ["ssh-keygen", "-q", "-s", str(ca), "-I", "hpodlb", "-n", "nobody", f"{path}.pub"],
        check=True,
        capture_output=True,
    )


@pytest.mark.parametrize(
    ("plant", "said"),
    [
        (_fifo, ": cannot read: not a regular file (a FIFO)"),
        (
            lambda p: p.symlink_to("/dev/zero"),
            ": cannot read: not a regular file (a character device)",
        ),
        (lambda p: p.mkdir(), ": cannot read: not a regular file (a directory)"),
        (lambda p: p.write_bytes(b"-" * (65 << 10)), ": cannot read: larger than 64 KiB"),
        (lambda p: p.write_text("not a key\n"), ": not an SSH private key (OpenSSH or PEM)"),
        (lambda p: None, ": file not found"),
        (_passphrase_key, " is passphrase-protected; hpodlb needs a key without one"),
    ],
    ids=["fifo", "dev-zero", "directory", "too-large", "not-a-key", "missing", "passphrase"],
)
def test_an_ssh_key_hpodlb_cannot_use_is_one_line_naming_it(
    hpodlb: Hpodlb,
    write_config: Callable[..., Path],
    arn: str,
    tmp_path: Path,
    plant: Callable[[Path], object],
    said: str,
) -> None:
    """`check-config` reads ssh.key_file as a login reads it: a FIFO or a link to /dev/zero is
    named (no hang, no read without end), as is a file that is no key hpodlb can log in with."""
    key = tmp_path / "ssh" / "id_ed25519"
    key.parent.mkdir(mode=0o700)
    plant(key)
    config = write_config(
        [{"arn": arn, "port": 22}],
        host_keys={"enabled": True, "store": str(tmp_path / "host_keys")},
        ssh={"key_file": str(key)},
    )
    out = hpodlb("check-config", "--config", str(config), timeout=30)
    assert out.returncode == 1, out.stdout + out.stderr
    assert [line for line in out.stdout.splitlines() if line.startswith("FAIL")] == [
        f"FAIL  ssh.key_file {key}{said}"
    ]


def test_an_ssh_key_the_login_user_owns_is_used_with_its_certificate(
    hpodlb: Hpodlb, write_config: Callable[..., Path], arn: str, tmp_path: Path
) -> None:
    """The key may belong to the login user (the default is in /home/ubuntu/.ssh), in that
    user's dirs; a certificate beside it (`KEY-cert.pub`) is taken along, as ssh does."""
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    key = home / ".ssh" / "id_ed25519"
    key.parent.mkdir(mode=0o700)
    _certified_key(key)
    for path in (home, key.parent, key, Path(f"{key}-cert.pub")):
        os.chown(path, NOBODY, NOBODY)
    config = write_config(
        [{"arn": arn, "port": 22}],
        host_keys={"enabled": True, "store": str(tmp_path / "host_keys")},
        ssh={"key_file": str(key), "user": "nobody"},
    )
    out = hpodlb("check-config", "--config", str(config))
    assert out.returncode == 0, out.stdout
    (line,) = [ln for ln in out.stdout.splitlines() if ln.startswith("ok    ssh key")]
    assert line.startswith(f"ok    ssh key {key}: ssh-ed25519 SHA256:")
    assert line.endswith(", with its certificate (login as nobody)")

    os.chown(key, NOBODY + 1, NOBODY + 1)  # anyone else's: refused
    out = hpodlb("check-config", "--config", str(config))
    assert (
        f"FAIL  ssh.key_file {key} is owned by uid {NOBODY + 1}, not root or nobody" in out.stdout
    )


def test_an_absolute_path_is_judged_from_a_deleted_working_directory(tmp_path: Path) -> None:
    """An admin who installed from an unpacked directory and then deleted it still runs hpodlb
    from there: an absolute path does not depend on the working directory, so its file is read
    (it was "file not found", the walk asking for the deleted directory's name first)."""
    config = tmp_path / "config.toml"
    config.write_text("")
    config.chmod(0o600)
    gone = tmp_path / "gone"
    gone.mkdir()
    code = (
        "import os, sys; from pathlib import Path; from hpodlb.files import read_trusted_file;"
        f"os.chdir({str(gone)!r}); os.rmdir({str(gone)!r});"
        f"sys.stdout.write(repr(read_trusted_file(Path({str(config)!r}), 1024)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert (out.returncode, out.stdout, out.stderr) == (0, "b''", "")


def test_the_login_user_cannot_point_its_key_file_at_a_key_only_root_can_read(
    hpodlb: Hpodlb, write_config: Callable[..., Path], arn: str, tmp_path: Path
) -> None:
    """The login user owns the path to its key, so it may choose which file that is, but only
    among its own: a symlink it owns, to a key only root can read (another head's login key, a
    host key of the store), would have root log in with a key that user cannot read itself."""
    secret = tmp_path / "root-only" / "id_ed25519"
    secret.parent.mkdir(mode=0o700)
    _certified_key(secret)
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    link = home / ".ssh" / "id_ed25519"
    link.parent.mkdir(mode=0o700)
    link.symlink_to(secret)
    for path in (home, link.parent):
        os.chown(path, NOBODY, NOBODY)
    os.lchown(link, NOBODY, NOBODY)
    config = write_config(
        [{"arn": arn, "port": 22}],
        host_keys={"enabled": True, "store": str(tmp_path / "host_keys")},
        ssh={"key_file": str(link), "user": "nobody"},
    )
    out = hpodlb("check-config", "--config", str(config))
    assert out.returncode == 1, out.stdout
    assert (
        f"FAIL  ssh.key_file {link}: {secret} is owned by root, but nobody chose it"
        f" ({link} is nobody's): it must be nobody's own key" in out.stdout
    )
