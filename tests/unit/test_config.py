"""The config file: defaults, overrides, and one clear line per mistake."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from hpodlb.config import ConfigError, config_path, load_config
from tests.support.aws import TG_ARN

REPO = Path(__file__).resolve().parents[2]


def test_example_config_is_valid_and_equals_the_defaults() -> None:
    """config/hpodlb.toml documents every key with its default, and loads."""
    config = load_config(REPO / "config" / "hpodlb.toml", {})
    assert config.reconcile.interval_seconds == 30
    assert config.reconcile.absent_passes_before_deregister == 2
    assert config.host_keys.types == ("rsa", "ecdsa", "ed25519")
    assert config.target_groups[0].region == "us-west-2"
    assert config.cluster.allowed_cidrs[-1] == "100.64.0.0/10"


def test_every_documented_key_appears_in_the_example() -> None:
    """Each field of every section is written out in the example config."""
    from hpodlb.config import Config

    text = (REPO / "config" / "hpodlb.toml").read_text()
    for name, field in Config.model_fields.items():
        section = field.annotation
        if name == "target_groups":
            assert "[[target_groups]]" in text
            continue
        assert f"[{name}]" in text
        for key in section.model_fields:  # type: ignore[union-attr]
            assert f"\n{key} = " in text, f"{name}.{key} missing from the example config"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            "[reconcile]\ninterval_seconds = -5\n",
            "reconcile.interval_seconds: Input should be greater than 0",
        ),
        ("[reconcile]\nmax_deregister_fraction = 1.5\n", "reconcile.max_deregister_fraction"),
        ('[reconcile]\nprune = "maybe"\n', "reconcile.prune"),
        ("[reconcile]\nintervall_seconds = 5\n", "reconcile.intervall_seconds: unknown key"),
        ("[colour]\nx = 1\n", "colour: unknown key"),
        ('[host_keys]\ntypes = ["dsa"]\n', "host_keys.types: unknown key type"),
        ('[cluster]\nallowed_cidrs = ["10.0.0.0/33"]\n', "cluster.allowed_cidrs"),
    ],
)
def test_bad_values_name_file_key_and_problem(tmp_path: Path, body: str, expected: str) -> None:
    """Each impossible value is refused with one line naming the file and the key."""
    path = tmp_path / "c.toml"
    path.write_text(body + f'[[target_groups]]\narn = "{TG_ARN}"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, {})
    assert str(err.value).startswith(f"{path}: ")
    assert expected in str(err.value)
    assert len(str(err.value).splitlines()) == 1


def test_malformed_arn_is_refused(tmp_path: Path) -> None:
    """A target group ARN of the wrong shape is named with its index."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[[target_groups]]\narn = "arn:aws:elasticloadbalancing:us-west-2:1:loadbalancer/x"\n'
    )
    with pytest.raises(ConfigError, match=r"target_groups\[0\]\.arn: .* is not a target group ARN"):
        load_config(path, {})


def test_missing_target_groups_is_refused(tmp_path: Path) -> None:
    """A config without any target group cannot be used."""
    path = tmp_path / "c.toml"
    path.write_text("[reconcile]\nprune = true\n")
    with pytest.raises(ConfigError, match="target_groups: required key is missing"):
        load_config(path, {})


def test_missing_and_unparsable_files(tmp_path: Path) -> None:
    """A missing file and a TOML syntax error both name the file."""
    with pytest.raises(ConfigError, match="nope.toml: file not found"):
        load_config(tmp_path / "nope.toml", {})
    bad = tmp_path / "bad.toml"
    bad.write_text("[reconcile\n")
    with pytest.raises(ConfigError, match=r"bad.toml: not valid TOML"):
        load_config(bad, {})


def test_environment_overrides_single_keys(write_config: Callable[..., Path]) -> None:
    """HPODLB_<SECTION>__<KEY> overrides one key, with types coerced as in the file."""
    path = write_config()
    env = {
        "HPODLB_RECONCILE__PRUNE": "false",
        "HPODLB_RECONCILE__INTERVAL_SECONDS": "5",
        "HPODLB_CLUSTER__LOGIN_GROUPS": "login-a, login-b",
        "HPODLB_HOST_KEYS__TYPES": '["ed25519"]',
    }
    config = load_config(path, env)
    assert config.reconcile.prune is False
    assert config.reconcile.interval_seconds == 5
    assert config.cluster.login_groups == ("login-a", "login-b")
    assert config.host_keys.types == ("ed25519",)


def test_bad_environment_override_names_the_variable(write_config: Callable[..., Path]) -> None:
    """An override with a bad value or an unknown key names the variable, not just the file."""
    path = write_config()
    with pytest.raises(
        ConfigError,
        match=r"^HPODLB_RECONCILE__MIN_IN_SERVICE \(overrides .*\): reconcile.min_in_service",
    ):
        load_config(path, {"HPODLB_RECONCILE__MIN_IN_SERVICE": "-1"})
    with pytest.raises(
        ConfigError, match=r"^HPODLB_RECONCILE__TYPO: \[reconcile\] has no key 'typo'"
    ):
        load_config(path, {"HPODLB_RECONCILE__TYPO": "1"})


def test_config_path_precedence() -> None:
    """--config beats $HPODLB_CONFIG, which beats /etc/hpodlb/config.toml."""
    assert config_path("/a.toml", {"HPODLB_CONFIG": "/b.toml"}) == Path("/a.toml")
    assert config_path(None, {"HPODLB_CONFIG": "/b.toml"}) == Path("/b.toml")
    assert config_path(None, {}) == Path("/etc/hpodlb/config.toml")


@pytest.mark.parametrize("var", ["HPODLB_RECONCILE_PRUNE", "HPODLB_INTERVAL_SECONDS"])
def test_an_override_with_one_underscore_is_an_error_naming_it(
    write_config: Callable[..., Path], var: str
) -> None:
    """An HPODLB_ variable that names no key (one underscore) is refused by name, never ignored."""
    path = write_config()
    with pytest.raises(
        ConfigError, match=rf"^{var}: not a config override; use HPODLB_<SECTION>__<KEY>"
    ):
        load_config(path, {var: "maybe"})
    assert load_config(path, {"HPODLB_CONFIG": str(path)}).reconcile.prune is True


PATH_KEYS = [
    ("cluster", "resource_config", "opt/ml/config/resource_config.json"),
    ("cluster", "provisioning_parameters", "provisioning_parameters.json"),
    ("ssh", "key_file", ".ssh/id_rsa"),
    ("host_keys", "store", "secretsmanager:x"),  # before that form exists: a relative dir
    ("host_keys", "remote_dir", "etc/ssh"),
    ("state", "dir", "var/lib/hpodlb"),
    ("state", "dir", ""),  # "" would be "." for a Path
]


@pytest.mark.parametrize(("section", "key", "value"), PATH_KEYS)
def test_every_path_in_the_config_is_absolute(
    write_config: Callable[..., Path], section: str, key: str, value: str
) -> None:
    """A relative path, in the file or from an override, is refused with one line naming the
    key: it would name another file (or a new dir of private keys) wherever hpodlb started."""
    path = write_config(**{section: {key: value}})
    with pytest.raises(ConfigError) as err:
        load_config(path, {})
    assert str(err.value) == (
        f"{path}: {section}.{key}: {value!r} is not an absolute path (a relative one would "
        "depend on the directory hpodlb was started from)"
    )
    var = f"HPODLB_{section.upper()}__{key.upper()}"
    with pytest.raises(ConfigError, match=rf"^{var} \(overrides {path}\): {section}\.{key}: "):
        load_config(write_config(), {var: value})


def test_a_directory_given_as_the_config_is_named_a_directory(tmp_path: Path) -> None:
    """`--config /tmp`: a sticky, world-writable directory is said to be a directory, which is
    what is wrong with it, not "writable by group or others"."""
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    with pytest.raises(ConfigError) as err:
        load_config(sticky, {})
    assert str(err.value) == f"{sticky}: cannot read: not a regular file (a directory)"
