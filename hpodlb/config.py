"""The daemon's one config file: TOML, validated, with `HPODLB_<SECTION>__<KEY>` overrides.

Every field carries its default and the reason for it. This module must never touch AWS, SSH or the
state dir: it only turns a file (and the environment) into a `Config` or a `ConfigError` whose message
names the file, the key and the problem on one line, because that line is what an admin sees at 3 a.m.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from hpodlb.files import UntrustedPathError, UnusableFileError, read_trusted_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Ubuntu 22.04's Python 3.10
    import tomli as tomllib

DEFAULT_CONFIG_PATH = "/etc/hpodlb/config.toml"
ENV_PREFIX = "HPODLB_"
CONFIG_MAX_BYTES = 1 << 20  # the example config is 6 KiB; anything near this is not a config

# arn:aws:elasticloadbalancing:REGION:ACCOUNT:targetgroup/NAME/ID (aws-cn and aws-us-gov too).
TARGET_GROUP_ARN = re.compile(
    r"^arn:aws(-[a-z]+)*:elasticloadbalancing:(?P<region>[a-z0-9-]+):\d{12}:"
    r"targetgroup/[A-Za-z0-9-]{1,32}/[0-9a-f]{16}$"
)
KEY_TYPES = ("rsa", "ecdsa", "ed25519")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def target_group_name(arn: str) -> str:
    """`NAME` of `arn:...:targetgroup/NAME/ID`: what an admin called it, in every message."""
    parts = arn.split("/")
    return parts[1] if len(parts) == 3 else arn


class ConfigError(Exception):
    """The config file (or an override) cannot be used; the message is one line for the admin."""


def _absolute(value: Any) -> Any:
    """Judged as written (before `Path` makes "" into "."); what is not text is pydantic's."""
    if isinstance(value, str | Path) and not Path(value).is_absolute():
        raise ValueError(
            f"{str(value)!r} is not an absolute path (a relative one would depend on the "
            "directory hpodlb was started from)"
        )
    return value


AbsolutePath = Annotated[Path, BeforeValidator(_absolute)]
"""Every path in the config: hpodlb runs as root from wherever systemd or an admin's shell
starts it, and a relative path would make it read, or write private keys, somewhere else each
time. A key that may also name something other than a path (a `secretsmanager:` store) takes
`AbsolutePath | ThatForm` and keeps this rule for its paths."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClusterConfig(_Section):
    resource_config: AbsolutePath = Path("/opt/ml/config/resource_config.json")
    """Where HyperPod writes the cluster's instances: the desired set comes from here."""
    provisioning_parameters: AbsolutePath = Path("/opt/ml/config/provisioning_parameters.json")
    """Names the login group (`login_group`) when `login_groups` is empty."""
    login_groups: tuple[str, ...] = ()
    """Instance groups whose instances are login nodes; empty: provisioning_parameters, else
    "login-group"."""
    allowed_cidrs: tuple[str, ...] = (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
    )
    """What NLB IP targets accept; an address outside them is refused, never registered."""
    leader: Literal["slurmctld", "always"] = "slurmctld"
    """With several head nodes, act only while this head's slurmctld is in control (`scontrol
    ping`); "always": act regardless (one head, or tests)."""

    @field_validator("allowed_cidrs")
    @classmethod
    def _cidrs_parse(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for cidr in value:
            try:
                ipaddress.IPv4Network(cidr, strict=False)
            except ValueError as exc:
                raise ValueError(f"{cidr!r} is not an IPv4 CIDR ({exc})") from None
        return value

    def networks(self) -> tuple[ipaddress.IPv4Network, ...]:
        return tuple(ipaddress.IPv4Network(c, strict=False) for c in self.allowed_cidrs)


class TargetGroupConfig(_Section):
    arn: str
    """The target group (target type `ip`) whose targets are the login nodes."""
    port: int = Field(default=22, ge=1, le=65535)
    """The port each target is registered on; targets at other ports are never touched."""

    @field_validator("arn")
    @classmethod
    def _arn_shape(cls, value: str) -> str:
        if not TARGET_GROUP_ARN.match(value):
            raise ValueError(
                f"{value!r} is not a target group ARN "
                "(arn:aws:elasticloadbalancing:REGION:ACCOUNT:targetgroup/NAME/ID)"
            )
        return value

    @property
    def region(self) -> str:
        match = TARGET_GROUP_ARN.match(self.arn)
        assert match is not None  # validated above
        return match.group("region")

    @property
    def name(self) -> str:
        return target_group_name(self.arn)


class AwsConfig(_Section):
    region: str = ""
    """Empty: the target group ARN's own region, which is the only one its API answers in."""


class ReconcileConfig(_Section):
    interval_seconds: float = Field(default=30, gt=0)
    """How often `run` passes when nothing changes; the resource config's changes trigger sooner."""
    prune: bool = True
    """Remove targets at the configured port that no login node accounts for (hand-added drift)."""
    max_deregister_fraction: float = Field(default=0.5, ge=0, le=1)
    """At most this share of a group's targets leaves within one interval_seconds, however many
    passes run in it: a bad read cannot empty it."""
    absent_passes_before_deregister: int = Field(default=2, ge=1)
    """Consecutive passes a node must be missing before its target goes, the first and the last at
    least (this - 1) x interval_seconds apart, as that many scheduled passes are: deregister
    cautiously, and a burst of file-triggered passes is not a long time."""
    min_in_service: int = Field(default=1, ge=0)
    """Never leave fewer login nodes in service (`guards.in_service`) than this, whatever the
    inputs say."""


class SshConfig(_Section):
    user: str = "ubuntu"
    port: int = Field(default=22, ge=1, le=65535)
    key_file: AbsolutePath = Path("/home/ubuntu/.ssh/id_rsa")
    sudo: bool = True
    """Prefix privileged remote commands with `sudo -n` (never prompts, fails instead)."""
    connect_timeout_seconds: float = Field(default=10, gt=0)
    """Bounds every connect, handshake and remote command, so a silent node cannot hang a pass."""


class HostKeysConfig(_Section):
    enabled: bool = True
    store: AbsolutePath = Path("/etc/hpodlb/host_keys")
    types: tuple[str, ...] = KEY_TYPES
    remote_dir: AbsolutePath = Path("/etc/ssh")
    reload_command: str = "systemctl try-reload-or-restart ssh"
    adopt_from_first_node: bool = True
    probe_interval_seconds: float = Field(default=240, ge=0)
    """Re-probe a node verified in sync at most this often; 0: every pass. New nodes, replaced
    instances, nodes out of sync and a changed canonical set are probed every pass regardless.
    240 s: a key changed by hand is seen within 5 minutes, and 200 idle nodes cost < 1% CPU."""

    @field_validator("types")
    @classmethod
    def _known_types(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [t for t in value if t not in KEY_TYPES]
        if unknown:
            raise ValueError(f"unknown key type(s) {unknown}; choose from {list(KEY_TYPES)}")
        if not value:
            raise ValueError("at least one key type is required")
        if len(set(value)) != len(value):
            raise ValueError("key types are listed twice")
        return value


class StateConfig(_Section):
    dir: AbsolutePath = Path("/var/lib/hpodlb")


class MetricsConfig(_Section):
    listen: str = ""
    """`HOST:PORT` where `hpodlb run` serves Prometheus' /metrics (HOST an IP address, `[v6]` or
    localhost; PORT 0: any free port, named in the `metrics_listening` event); empty: off.
    Off by default: an open port is an admin's decision (the example config turns it on for
    localhost)."""
    textfile: Path | None = None
    """node_exporter's textfile collector file (`DIR/hpodlb.prom`), rewritten atomically after
    each pass of `run` and `once`; empty: off. DIR must exist and be trusted like the config
    (root-owned, not writable by others, all the way up): we write there as root. That is checked
    at each write, not here: a textfile dir someone changed must cost the metrics (logged, and in
    STATUS=), never the daemon's start, a reload or every command."""
    allow: tuple[str, ...] = ()
    """Client addresses or CIDRs (IPv4 or IPv6) that may scrape `listen`: any other client's
    connection is closed as it is accepted, before it takes one of the endpoint's few slots, so
    nobody else can keep Prometheus unanswered. Empty: every client that can reach `listen`, as
    before this key existed (a Prometheus elsewhere, admitted by the security group, keeps being
    answered after an upgrade). It tells hosts apart, not users: every local user has every address
    of the head node, 127.0.0.0/8 included."""

    @field_validator("listen")
    @classmethod
    def _listen_address(cls, value: str) -> str:
        if value:
            listen_address(value)  # ValueError names the problem
        return value

    @field_validator("allow")
    @classmethod
    def _allow_parses(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(
                    f"{entry!r} is not an IP address or CIDR (e.g. 10.0.5.17, 10.0.5.0/28, ::1)"
                ) from None
        return value

    def allowed_networks(self) -> tuple[Network, ...]:
        """`allow` parsed; empty: no client is refused for its address."""
        return tuple(ipaddress.ip_network(entry, strict=False) for entry in self.allow)

    @field_validator("textfile", mode="before")
    @classmethod
    def _empty_is_off(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("textfile")
    @classmethod
    def _textfile_dir(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        _absolute(value)  # the rule every path key follows, and its message
        if value.suffix != ".prom":
            raise ValueError(f"{str(value)!r}: node_exporter reads only files named *.prom")
        return value


def listen_address(value: str) -> tuple[str, int]:
    """`127.0.0.1:9818` -> ("127.0.0.1", 9818); `[::1]:9818` -> ("::1", 9818). ValueError if it is
    not an IP address (or localhost) and a port: a host name would be resolved, and could move."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        version = 6
    else:
        version = 4
    problem = f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:9818, 0.0.0.0:9818, [::1]:9818)"
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(problem)
    if host == "localhost" and version == 4:
        return "127.0.0.1", int(port)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(problem) from None
    if address.version != version:
        raise ValueError(problem)
    return host, int(port)


class Config(_Section):
    cluster: ClusterConfig = ClusterConfig()
    target_groups: tuple[TargetGroupConfig, ...]
    aws: AwsConfig = AwsConfig()
    reconcile: ReconcileConfig = ReconcileConfig()
    ssh: SshConfig = SshConfig()
    host_keys: HostKeysConfig = HostKeysConfig()
    state: StateConfig = StateConfig()
    metrics: MetricsConfig = MetricsConfig()

    def region_for(self, tg: TargetGroupConfig | None = None) -> str:
        """Where AWS calls for `tg` go (the first target group's when none is named): aws.region
        when set, else the group ARN's own region, the only one its API answers in."""
        if self.aws.region:
            return self.aws.region
        tg = tg or (self.target_groups[0] if self.target_groups else None)
        return tg.region if tg else ""

    @field_validator("target_groups")
    @classmethod
    def _some_target_groups(
        cls, value: tuple[TargetGroupConfig, ...]
    ) -> tuple[TargetGroupConfig, ...]:
        if not value:
            raise ValueError("at least one [[target_groups]] table is required")
        arns = [tg.arn for tg in value]
        if len(set(arns)) != len(arns):
            raise ValueError("the same target group ARN is listed twice")
        return value


def config_path(explicit: str | None, environ: Mapping[str, str] = os.environ) -> Path:
    """`--config`, else `$HPODLB_CONFIG`, else the packaged default path."""
    return Path(explicit or environ.get("HPODLB_CONFIG") or DEFAULT_CONFIG_PATH)


def load_config(path: Path, environ: Mapping[str, str] = os.environ) -> Config:
    """Read, override and validate; raise ConfigError with one line per problem."""
    try:
        raw = tomllib.loads(read_trusted_file(path, CONFIG_MAX_BYTES).decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (UntrustedPathError, UnusableFileError) as exc:
        raise ConfigError(str(exc)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    sources = _apply_env_overrides(raw, path, environ)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(err, path, sources) for err in exc.errors()]
        raise ConfigError("\n".join(lines)) from None


def _apply_env_overrides(
    raw: dict[str, Any], path: Path, environ: Mapping[str, str]
) -> dict[str, str]:
    """Fold `HPODLB_SECTION__KEY=value` into the raw table; return key -> env var for messages."""
    sources: dict[str, str] = {}
    for var, value in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX) or var == "HPODLB_CONFIG":
            continue
        if "__" not in var:
            # A mistyped override (one underscore) must not be silently ignored.
            raise ConfigError(
                f"{var}: not a config override; use HPODLB_<SECTION>__<KEY> "
                "(two underscores), or unset it"
            )
        section, _, key = var[len(ENV_PREFIX) :].lower().partition("__")
        model = Config.model_fields.get(section)
        section_type = model.annotation if model else None
        if not (isinstance(section_type, type) and issubclass(section_type, _Section)):
            raise ConfigError(f"{var}: no config section [{section}] can be overridden")
        field = section_type.model_fields.get(key)
        if field is None:
            raise ConfigError(f"{var}: [{section}] has no key {key!r}")
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{section}] must be a table")
        table[key] = _env_value(value, is_list="tuple" in str(field.annotation))
        sources[f"{section}.{key}"] = var
    return sources


def _env_value(value: str, *, is_list: bool) -> Any:
    if not is_list:
        return value  # pydantic's lax mode turns "30" into 30 and "false" into False
    if value.strip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value  # pydantic then names the key and says it is not a list
    return [item.strip() for item in value.split(",") if item.strip()]


def _describe(err: Mapping[str, Any], path: Path, sources: Mapping[str, str]) -> str:
    parts: list[str] = []
    for loc in err["loc"]:
        if isinstance(loc, int):
            parts[-1] = f"{parts[-1]}[{loc}]" if parts else f"[{loc}]"
        else:
            parts.append(str(loc))
    key = ".".join(parts) or "(top level)"
    message = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    elif err["type"] == "missing":
        message = "required key is missing"
    where = f"{path}: {key}"
    if key in sources:
        where = f"{sources[key]} (overrides {path}): {key}"
    return f"{where}: {message}"
